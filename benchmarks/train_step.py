"""The CLIP train step, compiled vs eager, and its model FLOP utilisation (MFU).

One step is forward, backward, global-norm clipping and AdamW
(``fmm.step.make_train_step``). Measured in one process with the same threads:

- the machine's peak float32 matmul rate: the best of a few large ``torch.mm`` calls;
- the step's FLOPs: counted exactly by ``torch.utils.flop_counter.FlopCounterMode`` on one
  eager step (matmuls, batched matmuls and the patch convolution, forward and backward;
  elementwise ops, norms, softmax and the optimizer count 0, as is usual for MFU);
- eager and compiled (``torch.compile(fullgraph=True)``) ms/step: the median of
  ``--repeats`` steps after ``--warmup`` steps; the compiled step's first call, which
  compiles, is reported on its own.

Achieved FLOP/s = FLOPs / median step time; MFU = achieved / peak; speedup = eager ms /
compiled ms.

Run from the repo root::

    python benchmarks/train_step.py                        # clip_tiny, batch 128
    python benchmarks/train_step.py --config small --batch-size 64
    python benchmarks/train_step.py --quick                # micro model, no compile
    python benchmarks/train_step.py --quick --compile      # micro model, compiled too
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torch._dynamo
from _common import OPTIMIZER, median_ms, micro_config, random_batch
from torch.utils.flop_counter import FlopCounterMode

import fmm
from fmm.step import init_state, make_train_step
from models import clip

CONFIGS = {
    "micro": micro_config,
    "tiny": lambda: clip.clip_tiny(vocab_size=64, context_length=16),
    # ~10x tiny's FLOPs per example: 64 px images in 8 px patches, widths 256, 6 layers.
    "small": lambda: clip.CLIPConfig(
        embed_dim=256,
        image_size=64,
        patch_size=8,
        image_width=256,
        image_layers=6,
        image_heads=4,
        context_length=32,
        vocab_size=1000,
        text_width=256,
        text_layers=6,
        text_heads=4,
        act="gelu",
    ),
}


def peak_matmul_flops(n: int, repeats: int) -> float:
    """The best float32 FLOP/s of ``n x n @ n x n`` over ``repeats`` calls (one warm-up)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def make_step(cfg, *, compile: bool):
    """The CLIP train step on ``cfg``, eager or ``torch.compile(fullgraph=True)``-ed."""
    return make_train_step(lambda p, b, k: clip.loss(p, b, cfg=cfg), OPTIMIZER, compile=compile)


def step_flops(cfg, state, batch) -> int:
    """FLOPs of one eager step, counted op by op.

    Counted with "math" attention: FlopCounterMode has no formula for SDPA's CPU kernel
    (it would count attention as 0), while the math path's two batched matmuls per layer
    are exactly the FLOPs that SDPA performs.
    """
    step = make_step(dataclasses.replace(cfg, attn_impl="math"), compile=False)
    counter = FlopCounterMode(display=False)
    with counter:
        step(state, batch)
    return counter.get_total_flops()


def time_steps(step, state, batch, args) -> float:
    """Median ms/step, chaining states as a training loop does."""
    current = [state]

    def one_step():
        current[0], _ = step(current[0], batch)

    return median_ms(one_step, warmup=args.warmup, repeats=args.repeats)


def time_compiled(cfg, state, batch, args) -> tuple[float, float]:
    """``(first call seconds, which includes compiling; median ms/step after it)``."""
    torch._dynamo.reset()
    step = make_step(cfg, compile=True)
    start = time.perf_counter()
    state, _ = step(state, batch)
    first = time.perf_counter() - start
    return first, time_steps(step, state, batch, args)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--batch-size", type=int, default=128, help="as the CLIP recipe")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--peak-size", type=int, default=2048, help="n of the n^3 peak matmul")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the compiled step (default: on, off with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="micro model, batch 8, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.config, args.batch_size, args.repeats, args.warmup = "micro", 8, 2, 1
        args.peak_size = 512
    if args.compile is None:
        args.compile = not args.quick
    return args


def print_table(ms: dict[str, float], flops: int, peak: float) -> None:
    """ms/step, speedup, achieved FLOP/s and MFU of each variant; eager is the baseline."""
    print(f"\n{'':10s} {'ms/step':>9s} {'speedup':>8s} {'GFLOP/s':>9s} {'MFU':>7s}")
    for name, t in ms.items():
        achieved = flops / (t / 1e3)
        speedup = ms["eager"] / t
        print(f"{name:10s} {t:9.2f} {speedup:7.2f}x {achieved / 1e9:9.2f} {achieved / peak:7.2%}")
    print(f"{'peak mm':10s} {'':9s} {'':8s} {peak / 1e9:9.2f} {1:7.2%}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]()
    params = clip.init(cfg, fmm.random.key(0))
    state = init_state(params, OPTIMIZER, key=fmm.random.key(1))
    batch = random_batch(cfg, args.batch_size)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()}")
    print(f"config {args.config} ({fmm.tree.count(params):,} params), batch {args.batch_size}")

    peak = peak_matmul_flops(args.peak_size, repeats=5)
    print(f"peak float32 matmul ({args.peak_size}^3, best of 5): {peak / 1e9:.2f} GFLOP/s")
    flops = step_flops(cfg, state, batch)
    print(f"model FLOPs per step (FlopCounterMode, fwd + bwd): {flops / 1e9:.3f} GFLOP")

    ms = {"eager": time_steps(make_step(cfg, compile=False), state, batch, args)}
    if args.compile:
        first, ms["compiled"] = time_compiled(cfg, state, batch, args)
        print(f"compiled: first call (compiles) {first:.1f} s")
    print_table(ms, flops, peak)
    if args.compile:
        print(
            f"\nspeedup compiled vs eager: {ms['eager'] / ms['compiled']:.2f}x | "
            f"MFU eager {flops / (ms['eager'] / 1e3) / peak:.2%} | "
            f"MFU compiled {flops / (ms['compiled'] / 1e3) / peak:.2%}"
        )


if __name__ == "__main__":
    main()
