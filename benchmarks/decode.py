"""Greedy decoding speed of a GPT-2-small-sized model: fmm's preallocated cache against
Hugging Face ``generate`` and a concatenating cache.

Every method continues the same random prompt with the same random weights (Hugging
Face's ``GPT2LMHeadModel`` initialisation, converted with ``models.gpt.from_hf``) up to
``--context`` tokens, greedily, in the same process with the same threads. Rows:

- ``concat cache``: a key/value cache that grows by ``torch.cat`` every step, held per
  layer, as TorchMultimodal's decoder does (written below over our params; eager). Each
  step copies the whole cache, so its cost grows with the position;
- ``transformers, dynamic cache``: ``model.generate`` with its default cache;
- ``transformers, static cache``: ``cache_implementation="static"`` (preallocated; on a CPU
  transformers does not compile it);
- ``fmm eager`` / ``fmm compiled``: ``fmm.decoding.generate``, ``compile=False`` / ``True``
  (inductor; the one-off compile is timed apart and excluded);
- ``fmm int8 eager (approx.)``: the same loop over ``fmm.quant.quantize(params)`` (int8
  weights, per-channel scales; fbgemm's int8 linear). A different, approximate model, shown
  for what it buys: the share of its greedy tokens equal to ``transformers'`` is printed
  with the others. It is not a baseline, and not the same-model comparison.

``speedup`` is the best baseline's time over the row's time. Then the per-token decoding
time at a late position (just before ``--context``) divided by that at position 64: the
cost of one step from a longer cache. It is measured as ``(t(prompt, n+1 new tokens) -
t(prompt, 1 new token)) / n``, so it excludes the prefill. fmm's step attends over the
whole preallocated cache with a mask, so its cost does not grow with the position.

Run from the repo root (the default takes a few minutes on a 2-core CPU; the full
GPT-2 context is ``--context 1024``)::

    python benchmarks/decode.py                          # context 256, batch 1 and 8
    python benchmarks/decode.py --context 1024 --repeats 1
    python benchmarks/decode.py --quick                  # seconds; for tests
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import interleaved_ms
from einops import rearrange

import fmm
from fmm import decoding, nn, quant
from models import gpt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.reference import reference  # test-only reference packages

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------- the concat baseline


def _concat_forward(params, tokens, kv, offset, cfg):
    """Logits of the last position of ``tokens [B, S]`` following ``offset`` cached tokens;
    each layer's ``kv[i] = (k, v)`` grows by concatenation (``None`` before the first call)."""
    t = cfg.transformer
    positions = torch.arange(offset, offset + tokens.shape[1])
    x = nn.embed(params["token"], tokens) + params["pos"][positions]
    for i, bp in enumerate(params["transformer"]["blocks"]):
        h = nn.layer_norm(bp["norm1"], x, eps=t.norm_eps)
        q, k, v = rearrange(
            nn.linear(bp["attn"]["qkv"], h), "b s (n h d) -> n b h s d", n=3, h=t.heads
        )
        if kv[i] is not None:
            k, v = torch.cat([kv[i][0], k], dim=2), torch.cat([kv[i][1], v], dim=2)
        kv[i] = (k, v)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=offset == 0 and q.shape[2] > 1)
        x = x + nn.linear(bp["attn"]["out"], rearrange(a, "b h s d -> b s (h d)"))
        x = x + nn.mlp(bp["mlp"], nn.layer_norm(bp["norm2"], x, eps=t.norm_eps), act=t.act)
    return gpt.head(params, x[:, -1], eps=cfg.norm_eps)


def concat_generate(params, prompt, new, cfg):
    """Greedy decoding with a concatenating cache: ``[B, new]`` tokens."""
    kv = [None] * cfg.layers
    logits = _concat_forward(params, prompt, kv, 0, cfg)
    out, offset = [], prompt.shape[1]
    for _ in range(new):
        tok = logits.argmax(-1)
        out.append(tok)
        if len(out) == new:
            break
        logits = _concat_forward(params, tok[:, None], kv, offset, cfg)
        offset += 1
    return torch.stack(out, 1)


# --------------------------------------------------------------------------- the methods


def methods(model, params, cfg, context):
    """``name -> fn(prompt, new) -> [B, new]`` greedy tokens; baselines first."""

    def hf(cache):
        def run(prompt, new):
            kw = {} if cache is None else {"cache_implementation": cache}
            out = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                min_new_tokens=new, do_sample=False, pad_token_id=0, **kw,
            )  # fmt: skip
            return out[:, prompt.shape[1] :]

        return run

    def ours(compile, weights=params):
        def run(prompt, new):
            # A fixed cache size: one compiled step serves every prompt length.
            return decoding.generate(
                weights, prompt, cfg=cfg, max_new_tokens=new, max_len=context, compile=compile
            ).tokens

        return run

    return {
        "concat cache": lambda prompt, new: concat_generate(params, prompt, new, cfg),
        "transformers, dynamic cache": hf(None),
        "transformers, static cache": hf("static"),
        "fmm eager": ours(False),
        "fmm compiled": ours(True),
        # Not the same model: int8 weights (fmm.quant) read 4x fewer bytes per token. Its
        # agreement with transformers' tokens is printed; it is no baseline.
        INT8: ours(False, quant.quantize(params)),
    }


BASELINES = ("concat cache", "transformers, dynamic cache", "transformers, static cache")
INT8 = "fmm int8 eager (approx.)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=256, help="generate up to this length")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 small has 12")
    parser.add_argument(
        "--step-tokens", type=int, default=64,
        help="steps per per-token timing (enough to outweigh the prefill's jitter at batch 8)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=0, help="untimed calls per method")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--only-steps", action="store_true", help="skip the tokens/s table (per-token ratio only)"
    )
    parser.add_argument("--quick", action="store_true", help="2 layers, context 48, batch 1")
    args = parser.parse_args()
    if args.quick:
        args.context, args.prompt_len, args.layers, args.batch_sizes = 48, 8, 2, [1]
        args.step_tokens, args.repeats, args.warmup = 2, 1, 0
    return args


def build(args):
    transformers = reference("transformers")
    torch.manual_seed(0)
    hc = transformers.GPT2Config(
        n_layer=args.layers, n_positions=max(1024, args.context),
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(hc).eval()
    cfg = gpt.config_from_hf(hc)
    return model, cfg, gpt.from_hf(model.state_dict(), cfg)


def run_batch(model, params, cfg, batch, args) -> None:
    g = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, cfg.vocab_size, (batch, args.context), generator=g)
    fns = methods(model, params, cfg, args.context)
    new = args.context - args.prompt_len
    start = time.perf_counter()
    fns["fmm compiled"](prompt[:, : args.prompt_len], 2)
    compile_s = time.perf_counter() - start
    print(f"\nbatch {batch}: prompt {args.prompt_len} -> context {args.context} ({new} new tokens)")
    print(f"fmm compiled: first call (compiles the decode step) {compile_s:.1f} s")
    if not args.only_steps:
        tokens_per_second(fns, prompt[:, : args.prompt_len], new, batch, args)
    per_token_ratio(fns, prompt, args)


def tokens_per_second(fns, short, new, batch, args) -> None:
    tokens = {}

    def call(name, fn):
        def run():
            tokens[name] = fn(short, new)  # kept: their agreement is printed below

        return run

    ms = interleaved_ms(
        {name: call(name, fn) for name, fn in fns.items()},
        warmup=args.warmup,
        repeats=args.repeats,
    )
    best = min(ms[b] for b in BASELINES)
    print(f"{'method':30s} {'s':>8s} {'tokens/s':>9s} {'speedup':>8s}")
    for name, t in ms.items():
        mark = " (best baseline)" if t == best and name in BASELINES else ""
        print(f"{name:30s} {t / 1e3:8.2f} {batch * new / t * 1e3:9.1f} {best / t:7.2f}x{mark}")
    ref = tokens["transformers, dynamic cache"]
    agree = {n: f"{(t == ref).float().mean().item():.3f}" for n, t in tokens.items()}
    print(f"greedy tokens equal to transformers' (fraction): {agree}")


def per_token_ratio(fns, prompt, args) -> None:
    early, late, n = 64, args.context - args.step_tokens - 1, args.step_tokens
    if late <= early:
        return
    # Per-token time right after a prompt of length p: (t(n+1 new) - t(1 new)) / n, so the
    # prefill and the first pick cancel out.
    steps = {}
    for name in ("concat cache", "transformers, dynamic cache", "fmm compiled"):
        for p in (early, late):
            for k in (1, n + 1):
                steps[(name, p, k)] = functools.partial(fns[name], prompt[:, :p], k)
    got = interleaved_ms(steps, warmup=0, repeats=args.repeats + 1)
    print(f"per-token decode time at position {late} / at position {early}:")
    for name in ("concat cache", "transformers, dynamic cache", "fmm compiled"):
        at = [(got[(name, p, n + 1)] - got[(name, p, 1)]) / n for p in (early, late)]
        if min(at) <= 0:  # the n steps took less than the prefill's run-to-run jitter
            print(f"  {name:30s} not measurable: raise --step-tokens or --repeats")
            continue
        print(f"  {name:30s} {at[0]:7.1f} ms -> {at[1]:7.1f} ms   ratio {at[1] / at[0]:5.2f}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model, cfg, params = build(args)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()}")
    print(
        f"GPT-2 small dims, {cfg.layers} layers ({fmm.tree.count(params):,} params), float32, "
        f"greedy, median of {args.repeats}"
    )
    with torch.inference_mode():
        for batch in args.batch_sizes:
            run_batch(model, params, cfg, batch, args)


if __name__ == "__main__":
    main()
