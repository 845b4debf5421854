"""int8 weight-only quantization (``fmm.quant``) against fp32: kernels, size, latency, accuracy.

Measured in one process with the same threads:

1. **kernels** on one ``[64, 1024] @ [1024, 1024]^T`` linear: fp32 ``F.linear`` (**baseline**),
   fbgemm's dynamic int8 linear on a prepacked weight (what ``fmm.quant`` uses), dequantize
   then ``F.linear``, ``torch._int_mm`` (int8 x int8 -> int32) with the activations already
   int8 and with their per-row quantization and the rescale included, and
   ``torch._weight_int8pack_mm``. ``ratio`` = row ms / baseline ms (< 1 is faster).
2. **size and latency** per config (the trained ``tiny`` checkpoint and a randomly initialised
   ``b32``, ViT-B/32, where the weights' values do not change the time): bytes on disk of
   ``train.checkpoint.save_params`` (fp32, baseline) vs ``fmm.quant.save_quantized``; min and
   median ms of ``encode_image`` and ``encode_text`` on one batch, fp32 vs int8, timed
   round-robin (on a shared, loaded machine the minimum is the better estimate).
   Goals: size ratio <= 0.3, latency ratio <= 1.0.
3. **accuracy** of the trained tiny CLIP on the shapes world: zero-shot top-1 fp32 vs int8
   (``train.evaluate.zero_shot_accuracy``, held-out images), and the cosine of int8 to fp32
   image and text embeddings. Goals: drop <= 1 point, cosine >= 0.99.

Run from the repo root::

    python -m train clip --out runs/clip                 # once: a trained tiny CLIP
    python benchmarks/quant.py --ckpt runs/clip          # [--configs tiny b32] [--repeats 5]
    python benchmarks/quant.py --quick                   # seconds; its figures mean nothing
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import interleaved_times, micro_config, random_batch

import fmm
from fmm import quant
from models import clip
from train import checkpoint
from train.data import WorldConfig, eval_set
from train.evaluate import zero_shot_accuracy
from train.loop import load_run
from train.recipes.clip import normalize_images


def interleaved(calls: dict, *, warmup: int, repeats: int) -> dict[str, tuple[float, float]]:
    """``(min ms, median ms)`` of each ``calls[name]()``, timed round-robin.

    Both are printed: on a machine shared with other jobs the median mostly measures the
    others' load, while the minimum is the closest estimate of the uncontended time.
    """
    times = interleaved_times(calls, warmup=warmup, repeats=repeats)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def _int_mm_linear(x: torch.Tensor, qw: quant.QuantizedWeight) -> torch.Tensor:
    # The whole path an _int_mm kernel would need: quantize each activation row, multiply
    # in int32, rescale by both scales.
    sx = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    y = torch._int_mm(torch.round(x / sx).to(torch.int8), qw.values.T)
    return y * (sx * qw.scale)


def kernels(repeats: int, warmup: int, quick: bool) -> None:
    m, k, n = (8, 128, 128) if quick else (64, 1024, 1024)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * k**-0.5
    qw = quant.quantize_weight(w)
    x8 = torch.round(x / (x.abs().max() / 127)).to(torch.int8)
    calls = {
        "fp32 F.linear (baseline)": lambda: F.linear(x, w),
        "fbgemm dynamic int8 (fmm.quant)": lambda: F.linear(x, qw),
        "dequantize + F.linear": lambda: F.linear(x, qw.dequantize()),
        "torch._int_mm (x already int8)": lambda: torch._int_mm(x8, qw.values.T),
        "per-row int8 x + torch._int_mm": lambda: _int_mm_linear(x, qw),
        "torch._weight_int8pack_mm": lambda: torch._weight_int8pack_mm(x, qw.values, qw.scale),
    }
    ms = interleaved(calls, warmup=warmup, repeats=repeats)
    best, med = ms["fp32 F.linear (baseline)"]
    print(f"\n1. kernels: [{m}, {k}] @ [{n}, {k}]^T   (min ms, median ms; ratios to fp32)")
    for name, (lo, mid) in ms.items():
        print(
            f"  {name:34s} min {lo:9.3f} ms  ratio {lo / best:6.2f}   "
            f"median {mid:9.3f} ms  ratio {mid / med:6.2f}"
        )


def size_and_latency(name, cfg, params, batch_size, repeats, warmup) -> None:
    q = quant.quantize(params)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save_params(Path(tmp) / "fp32.safetensors", params)
        quant.save_quantized(Path(tmp) / "int8.safetensors", q)
        fp32_bytes = os.path.getsize(Path(tmp) / "fp32.safetensors")
        int8_bytes = os.path.getsize(Path(tmp) / "int8.safetensors")
    batch = random_batch(cfg, batch_size)
    images, tokens = batch["images"], batch["tokens"]
    with torch.no_grad():
        calls = {
            "image fp32": lambda: clip.encode_image(params, images, cfg=cfg),
            "image int8": lambda: clip.encode_image(q, images, cfg=cfg),
            "text fp32": lambda: clip.encode_text(params, tokens, cfg=cfg),
            "text int8": lambda: clip.encode_text(q, tokens, cfg=cfg),
        }
        ms = interleaved(calls, warmup=warmup, repeats=repeats)
    print(f"\n2. {name}: {fmm.tree.count(params):,} params, batch {batch_size}")
    print(
        f"  size on disk: fp32 {fp32_bytes / 2**20:8.2f} MiB   int8 {int8_bytes / 2**20:8.2f} MiB"
        f"   ratio {int8_bytes / fp32_bytes:.3f} (goal <= 0.3)"
    )
    for tower in ("image", "text"):
        for stat, i in (("min", 0), ("median", 1)):
            a, b = ms[f"{tower} fp32"][i], ms[f"{tower} int8"][i]
            print(
                f"  encode_{tower:5s} {stat:6s}: fp32 {a:9.2f} ms   int8 {b:9.2f} ms   "
                f"ratio {b / a:.3f} (goal <= 1.0)"
            )


def accuracy(cfg, params, tokenizer, n_per_class: int) -> None:
    world = WorldConfig()
    q = quant.quantize(params)

    def score(p):
        return zero_shot_accuracy(
            world,
            lambda im: clip.encode_image(p, normalize_images(im), cfg=cfg),
            lambda texts: clip.encode_text(p, tokenizer.encode(texts, cfg.context_length), cfg=cfg),
            n_per_class=n_per_class,
            seed=1,
        )

    with torch.no_grad():
        fp32, int8 = score(params), score(q)
        images, _ = eval_set(world, 2, seed=3)
        tokens = tokenizer.encode(
            ["a small red circle above a blue square"] * 2, cfg.context_length
        )
        cos = {
            "image": F.cosine_similarity(
                clip.encode_image(params, normalize_images(images), cfg=cfg),
                clip.encode_image(q, normalize_images(images), cfg=cfg),
            ),
            "text": F.cosine_similarity(
                clip.encode_text(params, tokens, cfg=cfg), clip.encode_text(q, tokens, cfg=cfg)
            ),
        }
    agree = (fp32["predictions"] == int8["predictions"]).float().mean().item()
    print(f"\n3. zero-shot on the shapes world ({fp32['images']} held-out images)")
    print(
        f"  top-1 fp32 {fp32['top1']:.4f}   int8 {int8['top1']:.4f}   "
        f"drop {100 * (fp32['top1'] - int8['top1']):+.2f} points (goal <= 1)   "
        f"same prediction on {100 * agree:.1f}% of images"
    )
    for tower, c in cos.items():
        print(f"  {tower} embedding cosine int8 vs fp32: min {c.min():.5f} mean {c.mean():.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, help="a run dir of `python -m train clip`")
    parser.add_argument("--train-steps", type=int, default=150, help="train one if no --ckpt")
    parser.add_argument("--configs", nargs="+", default=["tiny", "b32"], choices=["tiny", "b32"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--eval-per-class", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--kernels-only", action="store_true", help="section 1 only")
    parser.add_argument("--quick", action="store_true", help="micro model, 1 repeat")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.warmup, args.eval_per_class = 1, 1, 1
    print(
        f"torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"quantized engine {torch.backends.quantized.engine}"
    )
    kernels(args.repeats * 10, args.warmup, args.quick)
    if args.kernels_only:
        return

    if args.quick:
        cfg = micro_config()
        size_and_latency("micro", cfg, clip.init(cfg, fmm.random.key(0)), 2, 1, 1)
        return
    if args.ckpt is None:
        from train.recipes.clip import RECIPE as recipe

        args.ckpt = Path(tempfile.mkdtemp(prefix="quant-bench-"))
        sub = argparse.ArgumentParser()
        recipe.add_arguments(sub)
        started = time.perf_counter()
        recipe.run(sub.parse_args(["--out", str(args.ckpt), "--steps", str(args.train_steps)]))
        print(f"trained {args.ckpt} in {time.perf_counter() - started:.0f} s")
    run = load_run(args.ckpt, family="clip")
    cfg, params, tokenizer = run.cfg, run.params, run.tokenizer
    for name in args.configs:
        if name == "tiny":
            size_and_latency(
                f"tiny (trained, {args.ckpt})", cfg, params, args.batch_size, args.repeats,
                args.warmup,
            )  # fmt: skip
        else:
            b32 = clip.clip_vit_b32()
            size_and_latency(
                "b32 (ViT-B/32, random init)", b32, clip.init(b32, fmm.random.key(0)),
                args.batch_size, args.repeats, args.warmup,
            )  # fmt: skip
    accuracy(cfg, params, tokenizer, args.eval_per_class)


if __name__ == "__main__":
    main()
