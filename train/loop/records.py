"""What a run shows and keeps while it trains: the progress bar, ``metrics.jsonl``,
optional TensorBoard, and the clock.

- The bar shows the loss, examples per second and the share of wall time spent waiting
  for data (drawing the batch and moving it to the device). With ``--compile`` it says
  that the first step compiles before it starts.
- ``metrics.jsonl``: one JSON line per step, ``{"step": n, "loss": ..., "grad_norm": ...,
  <the family's metrics>}``, appended and flushed as the run goes. A resumed run first
  rewrites it (atomically) with the history its checkpoint holds, so lines of steps the
  checkpoint never reached do not survive a crash.
- :class:`Clock`: the first step is timed apart (with ``--compile`` it holds the
  compilation), so ``train_seconds`` and ``examples_per_second`` are those of the steps
  after it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fmm.io import atomic_write

METRICS_LOG = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The 0-d tensors of a step's metrics as floats (one host sync per step)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, torch.Tensor) and v.ndim == 0}


def tensorboard_available() -> bool:
    """Whether ``--log tensorboard`` can run here (the ``tensorboard`` package)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


class MetricsLog:
    """``OUT/metrics.jsonl`` (and ``OUT/tensorboard`` with ``tensorboard=True``), from
    ``history`` (the records of the steps before this process's first)."""

    def __init__(self, out: Path, history: list[dict], *, tensorboard: bool = False):
        path = out / METRICS_LOG
        text = "".join(json.dumps(r) + "\n" for r in history)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        self._file = path.open("a")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(out / TENSORBOARD_DIR))

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in record.items():
                if name != "step":
                    self._writer.add_scalar(f"train/{name}", value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


class Clock:
    """Wall time of the first step (compilation included) apart from the rest, and the
    time spent waiting for data."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_step = 0.0
        self.rest = 0.0
        self.data_wait = 0.0
        self.steps = 0

    def data(self, seconds: float) -> None:
        self.data_wait += seconds

    def step(self, seconds: float) -> None:
        if self.steps == 0:
            self.first_step = seconds
        else:
            self.rest += seconds
        self.steps += 1

    def wall(self) -> float:
        return time.perf_counter() - self.started

    def data_share(self) -> float:
        return self.data_wait / max(self.wall(), 1e-9)

    def report(self, batch_size: int) -> dict:
        """``first_step_seconds`` (with ``--compile``: compiling), ``train_seconds`` and
        ``examples_per_second`` of the steps after the first, ``data_wait_fraction`` of
        the loop's wall time, ``wall_seconds``."""
        later = self.steps - 1
        return {
            "first_step_seconds": round(self.first_step, 3),
            "train_seconds": round(self.rest, 3),
            "examples_per_second": round(later * batch_size / self.rest, 1) if later else None,
            "data_wait_fraction": round(self.data_share(), 4),
            "wall_seconds": round(self.wall(), 3),
        }


def progress(name: str, start: int, steps: int, *, show: bool):
    """The run's bar over steps ``start .. steps - 1``."""
    return tqdm(
        range(start, steps),
        desc=f"train {name}",
        unit="step",
        dynamic_ncols=True,
        initial=start,
        total=steps,
        disable=not show,
    )


def show(bar, record: dict, clock: Clock, *, batch_size: int, data: dict | None = None) -> None:
    """Loss, examples/s (steps after the first), the data-wait share and the data source's
    counts (``data``: e.g. ``{"skipped_samples": 3}``) on the bar."""
    later = clock.steps - 1
    rate = f"{later * batch_size / clock.rest:.0f}" if later and clock.rest else "-"
    counts = {k: v for k, v in (data or {}).items() if isinstance(v, int) and v}
    bar.set_postfix(
        loss=f"{record['loss']:.4g}", ex_per_s=rate, data=f"{clock.data_share():.0%}", **counts
    )
