"""FSDP2: per-rank memory and step time for 1 vs 2 ranks, same global batch.

``python benchmarks/fsdp.py [--width 256] [--layers 6] [--batch-size 32] [--steps 6]``

Launches ``torchrun --nproc_per_node N`` for N = 1 (**baseline**) and N = 2 on this
machine (gloo on CPU, NCCL with one GPU per rank). Each rank trains a CLIP whose towers
have ``--layers`` blocks of ``--width`` through ``fmm.adapter`` + FSDP2
(``train.distributed``) on its share of a fixed global batch, and reports:

- param and AdamW-state bytes it holds (its shards): the memory FSDP divides;
- peak RSS increment over the steps (CPU) or ``max_memory_allocated`` (CUDA): what it
  really used, params, grads, optimizer state, activations and communication buffers;
- median step time after one warm-up step.

Printed ratios are 2 ranks / 1 rank, per rank. On a 2-core CPU the two ranks share the
cores (each runs 1 thread, as under torchrun), so step time says more about communication
overhead than about speed-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _worker(args) -> None:
    """One torchrun rank: build, shard, train ``--steps``, print JSON (rank 0)."""
    import fmm
    from fmm import optim
    from fmm.adapter import ModelAdapter
    from models import clip
    from train import distributed as D

    env = D.setup()
    cfg = dataclasses.replace(
        clip.clip_tiny(vocab_size=64, context_length=16),
        image_width=args.width, text_width=args.width, image_layers=args.layers,
        text_layers=args.layers, image_heads=args.width // 64, text_heads=args.width // 64,
        embed_dim=args.width // 2,
    )  # fmt: skip
    params = fmm.tree.map(lambda p: p.to(env.device), clip.init(cfg, fmm.random.key(0)))
    adapter = ModelAdapter(
        params, functools.partial(clip.loss, cfg=cfg, gather=D.all_gather_with_grad)
    )
    model = D.wrap(adapter, "fsdp", device=env.device)
    del params
    opt = optim.adamw(1e-4)
    step = D.make_step(model, adapter, opt, loss_call=lambda m, b, k: m(b), mode="fsdp",
                       max_grad_norm=1.0, device=env.device)  # fmt: skip
    local = fmm.tree.map(lambda p: D.local(p.detach()), adapter.tree())
    state = {"opt_state": opt.init(local), "step": torch.zeros((), dtype=torch.int64),
             "key": fmm.random.key(1)}  # fmt: skip
    opt_bytes = sum(x.numel() * x.element_size() for x in fmm.tree.leaves(state["opt_state"]))
    g = torch.Generator().manual_seed(0)
    per = args.batch_size // env.world_size
    rows = slice(env.rank * per, (env.rank + 1) * per)
    images = torch.rand(args.batch_size, 3, 32, 32, generator=g)[rows].to(env.device)
    tokens = torch.randint(1, 63, (args.batch_size, 16), generator=g)[rows].to(env.device)
    batch = {"images": images, "tokens": tokens}
    cuda = env.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib() * 1024
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        float(metrics["loss"])  # waits for the step
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    report = {
        "param_bytes": D.local_param_bytes(model),
        "opt_bytes": opt_bytes,
        "peak_bytes": peak,
        "step_ms": statistics.median(times[1:]) * 1e3,
        "params": fmm.tree.count(adapter.tree()) if env.world_size == 1 else None,
    }
    reports = [None] * env.world_size
    torch.distributed.all_gather_object(reports, report)
    if env.is_main:
        print("REPORT " + json.dumps(reports))
    D.teardown()


def _launch(n: int, args) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={n}", __file__, "--worker", f"--width={args.width}",
           f"--layers={args.layers}", f"--batch-size={args.batch_size}", f"--steps={args.steps}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"torchrun with {n} ranks failed:\n{out.stderr[-4000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line[len("REPORT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 steps (tests)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.width, args.layers, args.batch_size, args.steps = 64, 1, 4, 2
    if args.batch_size % 2:
        raise SystemExit(f"--batch-size must be even (split over 2 ranks), got {args.batch_size}")
    if args.worker:
        return _worker(args)
    print(
        f"torch {torch.__version__} | 1 thread per rank | CLIP towers {args.layers} x width "
        f"{args.width} | global batch {args.batch_size} | {args.steps} steps"
    )
    one, two = _launch(1, args), _launch(2, args)
    print(f"params: {one[0]['params']:,}")
    rows = [("1 rank", one[0])] + [(f"2 ranks, rank {i}", r) for i, r in enumerate(two)]
    print(f"{'':<18}{'param MiB':>10}{'adam MiB':>10}{'peak MiB':>10}{'step ms':>10}")
    for name, r in rows:
        print(
            f"{name:<18}{r['param_bytes'] / 2**20:>10.2f}{r['opt_bytes'] / 2**20:>10.2f}"
            f"{r['peak_bytes'] / 2**20:>10.1f}{r['step_ms']:>10.1f}"
        )
    base = one[0]
    for key, label in [("param_bytes", "param bytes"), ("opt_bytes", "AdamW state bytes"),
                       ("peak_bytes", "peak memory"), ("step_ms", "step time")]:  # fmt: skip
        ratio = max(r[key] for r in two) / base[key]
        print(f"2 ranks / 1 rank, per rank (worst rank), {label}: {ratio:.2f}")


if __name__ == "__main__":
    main()
