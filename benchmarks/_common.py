"""Helpers shared by the benchmark scripts (timing, random batches, a micro config).

Scripts run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path``.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

import fmm
from fmm import optim
from fmm.step import init_state, make_train_step
from models import clip

OPTIMIZER = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3, weight_decay=0.1))


def micro_config() -> clip.CLIPConfig:
    """A CLIP small enough that a benchmark's ``--quick`` run takes seconds."""
    return dataclasses.replace(
        clip.clip_tiny(vocab_size=64, context_length=16),
        image_size=8, patch_size=4, image_width=16, image_layers=1, image_heads=2,
        text_width=16, text_layers=1, text_heads=2, embed_dim=8,
    )  # fmt: skip


def median_ms(fn, *, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def interleaved_times(calls: dict, *, warmup: int, repeats: int) -> dict[str, list[float]]:
    """ms of each of ``repeats`` calls of each ``calls[name]()``, timed round-robin (one call
    of each per round) so that a load change on a shared machine hits every contender alike."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_ms(calls: dict, *, warmup: int, repeats: int) -> dict[str, float]:
    """Median ms of each ``calls[name]()``, timed round-robin (see :func:`interleaved_times`)."""
    times = interleaved_times(calls, warmup=warmup, repeats=repeats)
    return {name: statistics.median(t) for name, t in times.items()}


def random_batch(cfg, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random images and tokens, with the end-of-text id (the largest) once in every row."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.randint(0, cfg.vocab_size - 1, (batch_size, cfg.context_length), generator=g)
    eot = torch.randint(1, cfg.context_length, (batch_size,), generator=g)
    tokens[torch.arange(batch_size), eot] = cfg.vocab_size - 1
    return {"images": images, "tokens": tokens}


def max_abs_diff(a, b) -> float:
    """The largest elementwise difference between two trees of the same structure."""
    return max((x - y).abs().max().item() for x, y in zip(fmm.tree.leaves(a), fmm.tree.leaves(b)))


def pure_step(loss, params, *, compile: bool):
    """fmm's train step over ``loss(params, batch, key) -> loss | (loss, metrics)`` with
    :data:`OPTIMIZER`, as ``run(batch) -> loss``, the state kept between calls (the
    counterpart of ``clip_vs_reference.module_step`` for a reference module)."""
    step = make_train_step(loss, OPTIMIZER, compile=compile)
    state = [init_state(params, OPTIMIZER, key=fmm.random.key(1))]

    def run(batch):
        state[0], metrics = step(state[0], batch)
        return metrics["loss"]

    return run


def race_steps(builders: dict, batch, *, warmup: int, repeats: int, width: int) -> dict:
    """Build each contender's step (``name -> () -> step``), run its first step on ``batch``
    (its time and loss printed; one that fails, e.g. a reference that does not compile, is
    reported and left out), then time them all round robin: ``name -> ms per step``."""
    steps = {}
    for name, build in builders.items():
        step = build()
        start = time.perf_counter()
        try:
            loss = float(step(batch))
        except Exception as e:  # a reference that does not compile is a result, not a crash
            print(f"{name:{width}s} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        steps[name] = lambda s=step: s(batch)
        print(f"{name:{width}s} first step {time.perf_counter() - start:6.1f} s, loss {loss:.6f}")
    return interleaved_ms(steps, warmup=warmup, repeats=repeats)


def print_vs_fastest(ms: dict[str, float], refs: list[str], *, width: int) -> None:
    """The ms/step table, each row's speed against the fastest of ``refs``, and the
    ``fmm eager`` / ``fmm compiled`` speedups over it."""
    best = min(refs, key=ms.get) if refs else None
    print(f"\n{'':{width}s} {'ms/step':>9s} {'vs fastest reference':>21s}")
    for name, t in ms.items():
        print(
            f"{name:{width}s} {t:9.2f} {ms[best] / t:20.2f}x"
            if best
            else f"{name:{width}s} {t:9.2f}"
        )
    for name in ("fmm eager", "fmm compiled"):
        if best and name in ms:
            print(f"{name} speedup vs fastest reference ({best}): {ms[best] / ms[name]:.2f}x")
