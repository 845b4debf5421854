"""A store hit (``train.store.EmbeddingStore``) against recomputing the embeddings.

For N items (captions for the text tower, images for the image tower; N = 1 and 64 by
default) measured in one process: computing their CLIP embeddings in one batch (**baseline**), then reading the
same N vectors back by content key from the store, hot (in the LRU) and cold (a fresh
store object with the LRU off, so every vector comes from SQLite). ``speedup`` = compute
ms / hit ms (goal >= 100x). Also printed: the ``put_many`` time (one transaction) and an
exact top-10 ``search`` over every stored vector.

Configs: ``tiny`` (clip_tiny, the shapes-world model) and ``b32`` (ViT-B/32, random init:
the weights' values do not change the time).

Run from the repo root::

    python benchmarks/store.py             # [--configs tiny b32] [--items 1 64] [--repeats 10]
    python benchmarks/store.py --quick     # seconds; its figures mean nothing
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import micro_config, random_batch

import fmm
from models import clip
from train.store import EmbeddingStore, content_key, model_fingerprint

CONFIGS = {
    "micro": micro_config,
    "tiny": lambda: clip.clip_tiny(vocab_size=64, context_length=16),
    "b32": clip.clip_vit_b32,
}


def timed(fn, *, warmup: int, repeats: int) -> tuple[float, float]:
    """``(min ms, median ms)`` of ``fn()``: on a loaded machine the minimum is the better
    estimate of the uncontended time, so both are printed."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times), statistics.median(times)


@functools.cache
def model(name: str) -> tuple:
    cfg = CONFIGS[name]()
    # Non-finite draws zeroed, as in benchmarks/quant.py (a known fmm.random.normal issue).
    params = fmm.tree.map(
        lambda x: torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0),
        clip.init(cfg, fmm.random.key(0)),
    )
    return cfg, params


def bench(name: str, items: int, repeats: int, warmup: int) -> None:
    cfg, params = model(name)
    fp = model_fingerprint(cfg.to_dict(), params)
    batch = random_batch(cfg, items)
    print(f"\n{name}: {fmm.tree.count(params):,} params, {items} items per call")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        path = Path(tmp) / "store.sqlite"
        for kind, x, encode in (
            ("text", batch["tokens"], clip.encode_text),
            ("image", batch["images"], clip.encode_image),
        ):
            compute = lambda: encode(params, x, cfg=cfg)  # noqa: B023
            vectors = compute()
            keys = [content_key(kind, row.numpy().tobytes()) for row in x]
            with EmbeddingStore(path, fp, dim=cfg.embed_dim) as store:
                put_ms = timed(
                    lambda: store.put_many(dict(zip(keys, vectors))),  # noqa: B023
                    warmup=1,
                    repeats=repeats,
                )
                got = store.get_many(keys)
                assert all(torch.equal(got[k], v) for k, v in zip(keys, vectors))
                compute_ms = timed(compute, warmup=warmup, repeats=repeats)
                hot_ms = timed(lambda: store.get_many(keys), warmup=warmup, repeats=repeats)  # noqa: B023
                search_ms = timed(
                    lambda: store.search(vectors[0], k=10),  # noqa: B023
                    warmup=warmup,
                    repeats=repeats,
                )
                stored = len(store)
            with EmbeddingStore(path, fp, lru_size=0) as cold:
                cold_ms = timed(lambda: cold.get_many(keys), warmup=warmup, repeats=repeats)  # noqa: B023
            print(
                f"  {kind:5s} compute (baseline) min {compute_ms[0]:10.3f} ms "
                f"median {compute_ms[1]:10.3f} ms"
            )
            for label, t in (("hit, LRU", hot_ms), ("hit, SQLite", cold_ms)):
                print(
                    f"  {kind:5s} {label:18s} min {t[0]:10.3f} ms median {t[1]:10.3f} ms   "
                    f"speedup min {compute_ms[0] / t[0]:9.1f}x median "
                    f"{compute_ms[1] / t[1]:9.1f}x (goal >= 100x)"
                )
            print(
                f"  {kind:5s} put_many           min {put_ms[0]:10.3f} ms   "
                f"search top-10 of {stored}: min {search_ms[0]:.3f} ms"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "b32"], choices=list(CONFIGS))
    parser.add_argument("--items", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="micro model, 1 repeat")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.configs, args.items, args.repeats, args.warmup = ["micro"], [4], 1, 0
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()}")
    for name in args.configs:
        for items in args.items:
            bench(name, items, args.repeats, args.warmup)


if __name__ == "__main__":
    main()
