"""Idle OpenMP workers, handed back so that the thread doing the work runs at full speed.

Every thread that runs a parallel torch op gets its own team of OpenMP worker threads
(GNU libgomp, what torch's Linux wheels ship), and the team outlives the op. Once the
process holds more of these workers than it has cores, libgomp stops letting any of them
spin between parallel regions: each region then wakes its workers from sleep. An inductor
decode step is hundreds of small parallel regions, so on this project's 2-core machine a
scheduler thread stepping while the main thread's team merely exists took 47 ms a token
instead of 32 (``benchmarks/serve_generate.py``'s lone stream).

So a thread that has finished its share (the start-up probes on the main thread, an
engine's batch, a per-request generation) calls :func:`release_workers`, and a thread
about to wait for work does too. The next parallel op on that thread builds its team
again (~0.15 ms). Example::

    scheduler.warmup()      # the probes ran here, on the caller's thread
    release_workers()       # ... whose workers now leave the cores to the scheduler's
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["release_workers", "releasing"]

_OMP_PAUSE_SOFT = 1


@functools.cache
def _libgomp() -> Any:
    # The libgomp this process has loaded (torch's own, whatever its file is called);
    # None where there is none (macOS, an Intel OpenMP build): nothing to hand back.
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return None
    for line in maps.read_text().splitlines():
        path = line.split()[-1]
        if "/libgomp" in path and ".so" in path:
            lib = ctypes.CDLL(path)
            return lib if hasattr(lib, "omp_pause_resource_all") else None
    return None


def release_workers() -> bool:
    """Hand back the calling thread's idle OpenMP workers (libgomp's
    ``omp_pause_resource_all(omp_pause_soft)``: it frees the caller's team only, and only
    outside a parallel region). Returns whether there was a libgomp to ask and it agreed."""
    lib = _libgomp()
    return lib is not None and lib.omp_pause_resource_all(_OMP_PAUSE_SOFT) == 0


def releasing(fn: Callable) -> Callable:
    """``fn`` that hands back its thread's OpenMP workers when it returns (or raises): for
    work a pool thread runs now and then (an engine's batch, one generation)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            release_workers()

    return run
