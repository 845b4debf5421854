"""Counters, batch-size histograms and latency percentiles of a serving process.

Plain ints and dicts, no locks: each counter has one writer thread (the event loop, or the
engine's model thread for ``deduplicated`` and ``store_write_errors``), and ``GET /metrics``
reads them all as one JSON-ready snapshot.

Example::

    m = Metrics()
    m.count("requests"); m.observe_latency("/v1/embed/text", 0.012); m.observe_batch("text", 8)
    m.snapshot()["latency_ms"]["/v1/embed/text"]["p50"]   # 12.0
"""

from __future__ import annotations

import collections
import math


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` by the nearest-rank method."""
    if not values:
        raise ValueError("percentile: values is empty")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile: q must lie in [0, 100], got {q}")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class Metrics:
    """Named counters, per-kind batch-size histograms, per-route latency windows (the last
    ``window`` requests per route, so memory is bounded)."""

    def __init__(self, *, window: int = 10_000):
        self.counters: collections.Counter[str] = collections.Counter()
        self.batch_sizes: dict[str, collections.Counter[int]] = collections.defaultdict(
            collections.Counter
        )
        self._latency: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=window)
        )

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``."""
        self.counters[name] += n

    def observe_batch(self, kind: str, size: int) -> None:
        """Record one model call of ``size`` items for input ``kind``."""
        self.batch_sizes[kind][size] += 1

    def observe_latency(self, route: str, seconds: float) -> None:
        """Record one request's wall time on ``route``."""
        self._latency[route].append(seconds)

    def snapshot(self, **gauges: float) -> dict:
        """All figures as one JSON-ready dict; ``gauges`` (e.g. ``queue_depth=3``) are added."""
        hits, misses = self.counters["cache_hits"], self.counters["cache_misses"]
        batches = {}
        for kind, sizes in self.batch_sizes.items():
            calls = sum(sizes.values())
            items = sum(size * n for size, n in sizes.items())
            batches[kind] = {
                "calls": calls,
                "items": items,
                "mean_size": round(items / calls, 3),
                "max_size": max(sizes),
                "histogram": {str(k): v for k, v in sorted(sizes.items())},
            }
        latency = {
            route: {
                "count": len(xs),
                **{f"p{q}": round(percentile(list(xs), q) * 1e3, 3) for q in (50, 90, 99)},
            }
            for route, xs in self._latency.items()
            if xs
        }
        return {
            "counters": dict(sorted(self.counters.items())),
            "cache_hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
            "batches": batches,
            "latency_ms": latency,
            **gauges,
        }
