"""Per-example gradients of CLIP: ``vmap(grad)`` against a Python loop of ``grad``.

Both compute the same B gradients (each example's InfoNCE term against the batch's
detached embeddings, as in ``examples/per_example_grads.py``) in the same process with
the same threads. The baseline is the loop with the default SDPA attention, which is what
one writes without vmap; every other row is a ratio against it. "math" attention is the
one vmap batches: SDPA's CPU kernel has no batching rule, so ``vmap`` runs that op alone
as a per-example loop, with a warning (the "vmap(grad), sdpa" row shows what that costs).

Run from the repo root::

    python benchmarks/per_example_grads.py                  # batch 32, clip_tiny
    python benchmarks/per_example_grads.py --batch-size 64 --repeats 10
    python benchmarks/per_example_grads.py --quick          # seconds; for tests
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings

import torch
from _common import max_abs_diff, median_ms, micro_config, random_batch

import fmm
from models import clip


def vmap_grads(params, batch, cfg):
    """All B per-example gradients in one vectorised call: leaves ``[B, ...]``."""
    grad_one = torch.func.grad(clip.example_loss)
    batched = torch.func.vmap(grad_one, in_dims=(None, 0, 0, 0, None, None))
    index = torch.arange(len(batch["images"]))
    return batched(
        params,
        batch["images"],
        batch["tokens"],
        index,
        *clip.detached_embeddings(params, batch, cfg=cfg),
        cfg=cfg,
    )


def loop_grads(params, batch, cfg):
    """The same gradients, one ``grad`` call per example (the baseline)."""
    grad_one, bank = (
        torch.func.grad(clip.example_loss),
        clip.detached_embeddings(params, batch, cfg=cfg),
    )
    images, tokens = batch["images"], batch["tokens"]
    grads = [
        grad_one(params, images[i], tokens[i], torch.tensor(i), *bank, cfg=cfg)
        for i in range(len(images))
    ]
    return fmm.tree.stack(grads)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per method")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="a micro model, batch 4, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.repeats = 4, 1
    return args


def time_methods(params, batch, cfg, args) -> dict[str, float]:
    """Median ms per call of each way to get the B per-example gradients; baseline first."""
    math_cfg = dataclasses.replace(cfg, attn_impl="math")
    methods = {
        "loop of grad, sdpa (baseline)": lambda: loop_grads(params, batch, cfg),
        "loop of grad, math": lambda: loop_grads(params, batch, math_cfg),
        "vmap(grad), math": lambda: vmap_grads(params, batch, math_cfg),
        "vmap(grad), sdpa": lambda: vmap_grads(params, batch, cfg),
    }
    with warnings.catch_warnings():
        # vmap over SDPA warns that it loops over examples: that is what its row measures.
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return {
            name: median_ms(fn, warmup=args.warmup, repeats=args.repeats)
            for name, fn in methods.items()
        }


def print_table(ms: dict[str, float], batch_size: int) -> None:
    """One row per method, with its speedup over the first (the baseline)."""
    baseline = next(iter(ms.values()))
    print(f"{'method':32s} {'ms/batch':>10s} {'ms/example':>11s} {'speedup':>8s}")
    for name, t in ms.items():
        print(f"{name:32s} {t:10.1f} {t / batch_size:11.2f} {baseline / t:7.2f}x")


def check(params, batch, cfg) -> None:
    """Prints the largest difference between the vmapped (math) and looped (sdpa) grads."""
    reference = loop_grads(params, batch, cfg)
    mapped = vmap_grads(params, batch, dataclasses.replace(cfg, attn_impl="math"))
    largest = max(g.abs().max().item() for g in fmm.tree.leaves(reference))
    print(
        f"correctness: max |vmap(grad) math - loop sdpa| = {max_abs_diff(mapped, reference):.2e}"
        f" (largest |grad| {largest:.2f})"
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = micro_config() if args.quick else clip.clip_tiny(vocab_size=64, context_length=16)
    params, batch = clip.init(cfg, fmm.random.key(0)), random_batch(cfg, args.batch_size)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()}")
    print(
        f"{'micro' if args.quick else 'clip_tiny'} ({fmm.tree.count(params):,} params), "
        f"{args.batch_size} per-example grads per call, median of {args.repeats}"
    )
    ms = time_methods(params, batch, cfg, args)
    print_table(ms, args.batch_size)
    check(params, batch, cfg)
    speedup = ms["loop of grad, sdpa (baseline)"] / ms["vmap(grad), math"]
    print(f"speedup vmap(grad) math vs loop sdpa: {speedup:.2f}x")


if __name__ == "__main__":
    main()
