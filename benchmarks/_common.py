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
