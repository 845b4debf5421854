"""One train step of an N-member CLIP ensemble: ``vmap`` over stacked states vs a loop.

For each N (4 and 8 by default), in the same process with the same threads:

- baseline: a Python loop of N ordinary steps (``engine="autograd"``, SDPA attention),
  what one writes without vmap;
- a loop of N ``engine="func"`` steps with "math" attention (the vmapped step's own
  per-member computation, so the vmap row's gain over it is vmap's alone);
- one ``torch.func.vmap`` of the func step over the members' stacked states.

Each row is a ratio against the baseline. The step is forward, backward, global-norm
clipping and AdamW, as in ``fmm.step.make_train_step``; every member sees the same batch.

Run from the repo root::

    python benchmarks/ensemble.py                    # N = 4 and 8, clip_tiny, batch 32
    python benchmarks/ensemble.py --members 2 4 16 --repeats 10
    python benchmarks/ensemble.py --quick            # seconds; for tests
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from _common import OPTIMIZER, max_abs_diff, median_ms, micro_config, random_batch

import fmm
from fmm.step import init_state, make_train_step
from models import clip


def member_states(cfg, members: int) -> list[dict]:
    """Fresh train states of ``members`` models that differ only in their init seed."""
    return [
        init_state(clip.init(cfg, fmm.random.key(seed)), OPTIMIZER, key=fmm.random.key(seed))
        for seed in range(members)
    ]


def step_fn(cfg, engine: str):
    """The CLIP train step (forward, backward, clip, AdamW) with the given gradient engine."""
    return make_train_step(lambda p, b, k: clip.loss(p, b, cfg=cfg), OPTIMIZER, engine=engine)


def bench_members(cfg, members: int, batch, args) -> dict[str, float]:
    """ms per ensemble step of each method for ``members`` members; checks vmap == loop."""
    math_cfg = dataclasses.replace(cfg, attn_impl="math")
    states = member_states(cfg, members)
    stacked = fmm.tree.stack(states)
    autograd_step, func_step = step_fn(cfg, "autograd"), step_fn(math_cfg, "func")
    vmapped = torch.func.vmap(func_step, in_dims=(0, None), randomness="different")
    methods = {
        "loop, autograd + sdpa (baseline)": lambda: [autograd_step(s, batch) for s in states],
        "loop, func + math": lambda: [func_step(s, batch) for s in states],
        "vmap, func + math": lambda: vmapped(stacked, batch),
    }
    ms = {
        name: median_ms(fn, warmup=args.warmup, repeats=args.repeats)
        for name, fn in methods.items()
    }
    together = fmm.tree.unstack(vmapped(stacked, batch)[0]["params"])
    # Against the func + math loop: the same arithmetic per member. (Against the autograd +
    # sdpa loop, Adam would blow rounding noise in exactly-zero gradients up to ~lr.)
    alone = [func_step(s, batch)[0]["params"] for s in states]
    diff = max(max_abs_diff(a, b) for a, b in zip(together, alone))
    print_table(members, ms, diff)
    return ms


def print_table(members: int, ms: dict[str, float], diff: float) -> None:
    """One row per method; the first is the baseline the speedups are against."""
    baseline = next(iter(ms.values()))
    print(f"\nN = {members} members")
    print(f"{'method':34s} {'ms/step':>9s} {'ms/member':>10s} {'speedup':>8s}")
    for name, t in ms.items():
        print(f"{name:34s} {t:9.1f} {t / members:10.2f} {baseline / t:7.2f}x")
    print(f"correctness: max |params after one step, vmap - loop| = {diff:.2e}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="micro model, N=2, batch 4")
    args = parser.parse_args()
    if args.quick:
        args.members, args.batch_size, args.repeats, args.warmup = [2], 4, 1, 1
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = micro_config() if args.quick else clip.clip_tiny(vocab_size=64, context_length=16)
    batch = random_batch(cfg, args.batch_size)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()}")
    print(
        f"{'micro' if args.quick else 'clip_tiny'} ({fmm.tree.count(clip.init(cfg, fmm.random.key(0))):,} "
        f"params per member), batch {args.batch_size}, median of {args.repeats} steps"
    )
    results = {n: bench_members(cfg, n, batch, args) for n in args.members}
    print()
    for n, ms in results.items():
        speedup = ms["loop, autograd + sdpa (baseline)"] / ms["vmap, func + math"]
        print(f"speedup N={n}: vmap vs loop {speedup:.2f}x")


if __name__ == "__main__":
    main()
