"""Batch sources: where the loop's global batches come from, and their position for resume.

A source is any iterator of global batches (``{field: tensor [batch, ...]}`` on the CPU)
that can also say where it is: ``state_dict() -> {name: tensor}`` and
``load_state_dict(state)``. The loop saves that state in every checkpoint, so a resumed run
draws exactly the batches the uninterrupted run would have drawn.

Under data parallelism every rank draws the whole global batch from the same source and
keeps its rows (:func:`rows_of`): the data position is one state for the whole job, and a
2-rank job sees the batches of a 1-rank job. A source that reads only this rank's rows
(decoding files is too costly to do on every rank) says so with ``per_rank = True``; its
position must still be the same on every rank. A source may also have ``report() -> dict``:
its counts (``{"skipped_samples": n}``), shown on the progress bar and saved in
``metrics.json``.

Example::

    def draw(generator, batch_size):
        scenes = sample_scenes(world, batch_size, generator=generator)
        return {"images": scenes.images, "tokens": tokenizer.encode(scenes.captions, 16)}

    source = SeededSource(draw, batch_size=128, seed=0)
    batch = next(source)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

import torch

from models.family import Field

Batch = dict[str, torch.Tensor]


class BatchSource(Protocol):
    """What the loop needs of a data source: global batches and a resumable position."""

    def __iter__(self) -> Iterator[Batch]: ...

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...


class SeededSource:
    """Global batches ``draw(generator, batch_size) -> {field: tensor}`` from one seeded
    ``torch.Generator``; the generator's state and the count of batches drawn are the data
    position."""

    def __init__(
        self, draw: Callable[[torch.Generator, int], Batch], *, batch_size: int, seed: int
    ):
        self._draw = draw
        self.batch_size = batch_size
        self._generator = torch.Generator().manual_seed(seed)
        self._drawn = 0

    def __iter__(self) -> SeededSource:
        return self

    def __next__(self) -> Batch:
        batch = self._draw(self._generator, self.batch_size)
        self._drawn += 1
        return batch

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "generator": self._generator.get_state(),
            "drawn": torch.tensor(self._drawn, dtype=torch.int64),
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._generator.set_state(state["generator"])
        self._drawn = int(state["drawn"])


def rows_of(batch: Batch, fields: Mapping[str, Field], *, rank: int, world_size: int) -> Batch:
    """This rank's equal share of a global batch: the rows ``[rank * B/W, (rank + 1) * B/W)``
    of every field whose first dimension is ``"batch"``; other fields (a scalar schedule
    value) go to every rank whole.

    Example: ``rows_of({"images": x [8, ...]}, fields, rank=1, world_size=2)`` keeps ``x[4:8]``.
    """
    if world_size == 1:
        return batch
    out = {}
    for name, value in batch.items():
        spec = fields.get(name)
        if spec is not None and spec.shape[:1] == ("batch",):
            per = value.shape[0] // world_size
            value = value[rank * per : (rank + 1) * per]
        out[name] = value
    return out


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Every tensor of ``batch`` on ``device``."""
    return {k: v.to(device) for k, v in batch.items()}
