"""Activation checkpointing: peak memory and step time of a 12-block encoder, with vs without.

``python benchmarks/activation_checkpointing.py [--batch-size 8] [--seq 256] [--width 256]``

One train step's forward and backward (``torch.autograd.grad`` of a mean-square loss over
``fmm.nn.transformer``) runs with the default block (**baseline**) and with
``fmm.adapter.checkpointed_block``, which keeps each block's input and recomputes the rest
in backward. Printed ratios are checkpointed / baseline: goal ≤ 0.4 peak memory at ≤ 1.4x
step time.

Peak memory, measured honestly on CPU: each variant runs in a fresh child process that
builds the params and input, notes its resident set size (RSS), runs one step and reads the
kernel's peak RSS (``ru_maxrss``), after a warm-up step on a sliver of the input. The figure is peak minus baseline: activations, grads
and temporaries, not params or the interpreter. The child sets glibc's
``MALLOC_MMAP_THRESHOLD_`` so freed tensors go back to the kernel and RSS tracks live
bytes. On CUDA it is ``torch.cuda.max_memory_allocated`` instead. Times are medians of
round-robin steps in this process (``--repeats``), so machine load hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch
from _common import interleaved_ms

import fmm
from fmm import nn
from fmm.adapter import checkpointed_block


def _setup(args, device):
    cfg = nn.TransformerConfig(width=args.width, layers=args.layers, heads=args.heads)
    params = nn.init_transformer(cfg, fmm.random.key(0).to(device))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, args.seq, args.width, generator=g).to(device)
    return cfg, params, x


def _step(cfg, params, x, block_fn):
    leaves = [p.detach().requires_grad_(True) for p in fmm.tree.leaves(params)]
    live = torch.utils._pytree.tree_unflatten(leaves, torch.utils._pytree.tree_structure(params))
    y = nn.transformer(live, x, cfg=cfg, block_fn=block_fn)
    return torch.autograd.grad(y.square().mean(), leaves)


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _child(args) -> None:
    """Measure one variant's peak memory increment in this fresh process; print JSON."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg, params, x = _setup(args, device)
    block_fn = checkpointed_block if args.child == "checkpointed" else None
    # A step on a sliver of the input first: lazy imports and one-off buffers land before
    # the baseline instead of counting as activations.
    _step(cfg, params, x[:1, :2], block_fn)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = _step(cfg, params, x, block_fn)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_kib()
        grads = _step(cfg, params, x, block_fn)
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    print(json.dumps({"peak_bytes": peak, "grad_bytes": grad_bytes}))


def _measure_in_child(args, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, *_shape_args(args)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _shape_args(args) -> list[str]:
    return [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("batch_size", "seq", "width", "heads", "layers", "threads", "device")
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat (tests)")
    parser.add_argument("--child", choices=("plain", "checkpointed"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.seq, args.width, args.heads, args.repeats = 2, 16, 32, 2, 1
    if args.child:
        return _child(args)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__} | {device} | threads {args.threads} | {args.layers} blocks, "
        f"width {args.width}, heads {args.heads}, batch {args.batch_size} x seq {args.seq}"
    )
    mem = {v: _measure_in_child(args, v) for v in ("plain", "checkpointed")}
    cfg, params, x = _setup(args, device)
    want, got = _step(cfg, params, x, None), _step(cfg, params, x, checkpointed_block)
    max_diff = max((a - b).abs().max().item() for a, b in zip(want, got))
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def timed(block_fn):
        return lambda: (_step(cfg, params, x, block_fn), sync())

    ms = interleaved_ms(
        {"plain": timed(None), "checkpointed": timed(checkpointed_block)},
        warmup=args.warmup,
        repeats=args.repeats,
    )
    print(f"{'variant':<14}{'peak MiB':>10}{'step ms':>10}{'memory':>9}{'time':>8}")
    for v in ("plain", "checkpointed"):
        print(
            f"{v:<14}{mem[v]['peak_bytes'] / 2**20:>10.1f}{ms[v]:>10.1f}"
            f"{mem[v]['peak_bytes'] / mem['plain']['peak_bytes']:>9.2f}"
            f"{ms[v] / ms['plain']:>7.2f}x"
        )
    print(f"grads alone: {mem['plain']['grad_bytes'] / 2**20:.1f} MiB (part of both peaks)")
    print(f"max |grad difference| checkpointed vs plain: {max_diff:.1e} (recompute is exact)")
    mem_ratio = mem["checkpointed"]["peak_bytes"] / mem["plain"]["peak_bytes"]
    time_ratio = ms["checkpointed"] / ms["plain"]
    met = mem_ratio <= 0.4 and time_ratio <= 1.4
    print(
        f"goal (<= 0.40 memory at <= 1.40x time): memory {mem_ratio:.2f}, time "
        f"{time_ratio:.2f}x -> {'met' if met else 'not met'}"
    )


if __name__ == "__main__":
    main()
