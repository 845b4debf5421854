"""Is a row's result bitwise the same at every batch size? Measured on this machine for the
matmul shapes a GPT decoder runs (GPT-2 small and the tiny test preset), eager and
compiled, and for the whole decode step and the slot prefill of ``fmm.batching``.

What the scheduler's buckets rest on (``train.serve.scheduler``): its decode step runs over
the smallest bucket of rows that covers the live slots, and its prefill batches waiting
prompts' chunks, so a request's tokens stay those it gets alone only if a row's arithmetic
does not change with the row count. For each shape the script prints the row counts grouped by
the bits of their rows ({1} {2..15} {16..64}: three ways of rounding a row), for the plain
``F.linear`` (``--linears rows``), for ``fmm.invariance.ColumnLinears`` (``columns``) and for
``PackedLinears`` (``packed``, the server's default on CPU: one group, where oneDNN allows).

Run from the repo root (about two minutes on 2 cores, most of it inductor compiles)::

    python benchmarks/batch_invariance.py
    python benchmarks/batch_invariance.py --sizes 1 2 3 4 8 --no-compile
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fmm  # noqa: E402
from fmm import batching, probes  # noqa: E402
from fmm.invariance import linears_mode  # noqa: E402
from fmm.kv_cache import init_cache  # noqa: E402
from models import gpt  # noqa: E402

# (name, in features, out features) of a GPT block and its head.
GPT2_SMALL = [("qkv", 768, 2304), ("attn out", 768, 768), ("mlp in", 768, 3072),
              ("mlp out", 3072, 768), ("head", 768, 50257)]  # fmt: skip
TINY = [("qkv", 32, 96), ("attn out", 32, 32), ("mlp in", 32, 128), ("mlp out", 128, 32),
        ("head", 32, 97)]  # fmt: skip


def classes(fn, x: torch.Tensor, sizes: list[int]) -> list[list[int]]:
    """``sizes`` grouped by the bits of ``fn(x[:n])``'s rows: ``n`` and ``n'`` share a group
    when every row both compute is bitwise equal."""
    out: list[tuple[torch.Tensor, list[int]]] = []
    for n in sizes:
        y = fn(x[:n])
        for ref, group in out:
            k = min(len(ref), n)
            if torch.equal(ref[:k], y[:k]):
                group.append(n)
                break
        else:
            out.append((y, [n]))
    return [group for _, group in out]


def matmuls(shapes, sizes: list[int], compiled: bool, linears: str) -> None:
    g = torch.Generator().manual_seed(0)
    plain = _under(linears, F.linear)
    for name, k, n in shapes:
        w, b = torch.randn(n, k, generator=g) / k**0.5, torch.randn(n, generator=g)
        x = torch.randn(max(sizes), k, generator=g)
        if compiled:
            torch._dynamo.reset()
        linear = torch.compile(plain, dynamic=False) if compiled else plain
        groups = classes(functools.partial(_affine, linear, w, b), x, sizes)
        print(f"  {name:<9} {k:>5} -> {n:<6} rows alike at {_ranges(groups)}", flush=True)


def _under(linears: str, fn):
    """``fn`` run under the pool's mode for ``linears`` (none for "rows")."""

    def run(*args):
        with linears_mode(linears)():
            return fn(*args)

    return run


def _affine(linear, w, b, x):
    return linear(x, w, b)


def _ranges(groups: list[list[int]]) -> str:
    # [[1], [2, 3, ..., 15], [16, ...]] -> "{1} {2..15} {16..64}"
    return " ".join(f"{{{g[0]}..{g[-1]}}}" if g == list(range(g[0], g[-1] + 1)) and len(g) > 2
                    else "{" + ",".join(map(str, g)) + "}" for g in groups)  # fmt: skip


def prefill_rows(shapes, chunks: list[int], most: int, linears: str) -> None:
    """A batched prefill's matmul is ``[n * chunk, k]``: rows against ``n = 1`` (alone)."""
    g = torch.Generator().manual_seed(1)
    linear = _under(linears, F.linear)
    for name, k, n in shapes:
        w, b = torch.randn(n, k, generator=g) / k**0.5, torch.randn(n, generator=g)
        for c in chunks:
            x = torch.randn(most * c, k, generator=g)
            alone = linear(x[:c], w, b)
            bad = [
                m
                for m in range(1, most + 1)
                if not torch.equal(linear(x[: m * c], w, b)[:c], alone)
            ]
            print(f"  {name:<9} {k:>5} -> {n:<6} chunk {c:>3}: n prompts differing from alone "
                  f"at {bad or 'none'}", flush=True)  # fmt: skip


def decode_steps(cfg, sizes: list[int], chunks: list[int], backend, linears: str) -> None:
    """The scheduler's own start-up probes (:func:`fmm.probes.invariant_buckets`, and
    :func:`fmm.probes.invariant_prefill` at a budget of the largest chunk) on random
    weights, in a pool of ``max(sizes)`` slots of 64 positions."""
    spec = gpt.decoder_spec(cfg)
    params = gpt.init(cfg, fmm.random.key(0))
    pool = init_cache(spec, max(sizes), 64)
    started = time.perf_counter()
    step = batching.compiled_decode(backend, linears=linears)
    buckets, reasons = probes.invariant_buckets(step, params, pool, sizes, cfg=spec,
                                                linears=linears)  # fmt: skip
    print(f"  {cfg.layers} layers x {cfg.width}, vocab {cfg.vocab_size}, {backend or 'eager'} "
          f"step, {linears} linears: exact buckets {buckets} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    for reason in reasons:
        print(f"    {reason}")
    if backend is None:  # the prefill is eager
        started = time.perf_counter()
        with linears_mode(linears)():
            allowed = probes.invariant_prefill(params, pool, chunks, max(chunks), cfg=spec)
        print(f"    prefill, {{chunk length: row counts exact}}: {allowed} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(range(1, 65)))
    p.add_argument("--buckets", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-compile", action="store_true")
    p.add_argument(
        "--linears",
        nargs="+",
        choices=("rows", "columns", "packed"),
        default=["rows", "columns", "packed"],
        help="plain F.linear, fmm.invariance.ColumnLinears, PackedLinears (the server's default)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    with torch.inference_mode():
        for (label, shapes), linears in itertools.product(
            (("GPT-2 small", GPT2_SMALL), ("tiny preset", TINY)), args.linears
        ):
            print(f"{label} matmuls, {linears} linears, eager, batch sizes "
                  f"{args.sizes[0]}..{args.sizes[-1]}:")  # fmt: skip
            matmuls(shapes, args.sizes, compiled=False, linears=linears)
            if not args.no_compile:
                print(f"{label} matmuls, {linears} linears, inductor, batch sizes {args.buckets}:")
                matmuls(shapes, args.buckets, compiled=True, linears=linears)
            print(f"{label} matmuls of a batched prefill (n prompts x chunk rows), {linears} "
                  f"linears, eager:")  # fmt: skip
            prefill_rows(shapes, [c for c in args.chunks if c >= 4], most=8, linears=linears)
        # GPT-2 small's matmul shapes in 2 layers (the rounding is per matmul shape).
        small = gpt.GPTConfig(vocab_size=50257, context_length=64, width=768, layers=2, heads=12)
        tiny = gpt.GPTConfig(vocab_size=97, context_length=64, width=32, layers=2, heads=4)
        print(f"the scheduler's probes: whole decode step at buckets {args.buckets}, prefill "
              f"chunks {args.chunks}:")  # fmt: skip
        for cfg, linears in itertools.product((tiny, small), args.linears):
            for backend in [None] + ([] if args.no_compile else ["inductor"]):
                decode_steps(cfg, args.buckets, args.chunks, backend, linears)


if __name__ == "__main__":
    main()
