"""The training pipeline over a user's table: samples, bad-data skipping, and a resumable,
per-rank :class:`LoaderSource` for the loop.

:class:`Samples` is a map-style dataset: the key ``(epoch, i)`` gives sample ``i`` of a
:class:`train.data.formats.Table` decoded (:func:`train.data.images.decode`), cropped by
:func:`train.data.images.train_transform` with a generator seeded from ``(seed, epoch, i)``
(so a resumed run crops every sample as the uninterrupted one did) and its text fields from
the family's tokenizer (:class:`Captions`: one of a pair's captions at random), all in the
``DataLoader``'s workers.

Bad samples never kill a long run: an unreadable, truncated or missing image, a
decompression bomb or an empty caption is replaced by the next index (``i + 1, i + 2, ...``,
a fixed order, so the replacement is the same on every run) and counted; more than
``max_bad_fraction`` of the samples tried so far (judged over at least
:data:`JUDGED_FROM` samples, so a few bad files among the first batches do not stop a run)
stops it with a ``ValueError`` naming examples.

:class:`LoaderSource` is a :class:`train.loop.source.BatchSource` with ``per_rank = True``:
every epoch is a permutation drawn from ``(seed, epoch)``, cut into global batches of
``batch_size`` (the last incomplete one is dropped, so a global batch is never short), and
rank ``r`` of ``W`` reads rows ``[r * B/W, (r + 1) * B/W)`` of each, the rows
``train.loop.source.rows_of`` would give it. Its position (epoch, batches done in it, the
counts) is part of the loop's checkpoint, so ``--resume`` continues with exactly the next
sample.

Example::

    table = open_table("data/train.csv")
    samples = Samples(table, Captions(tokenizer, 77), size=224, mean=OPENAI_MEAN,
                      std=OPENAI_STD, seed=0)
    source = LoaderSource(samples, batch_size=256, seed=0, workers=4)
    batch = next(source)   # {"images": [256, 3, 224, 224] float32, "tokens": [256, 77] int64}
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from train.data.images import BadSample, decode, train_transform

JUDGED_FROM = 1000  # the bad fraction is of max(tried, this): early bad files get some grace
CHAIN = 64  # replacements tried for one sample before the data is called unreadable
SHOWN = 5  # bad samples named in the log and in report()


def default_workers() -> int:
    """``min(4, cpus - 1)`` loader processes (0: decode in the main process), the CPUs being
    those this process may run on."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(4, (cpus or 1) - 1))


def derived_seed(*words: int) -> int:
    """A 63-bit seed mixed from ints (``(seed, epoch, index)``) by NumPy's ``SeedSequence``:
    nearby inputs give unrelated streams."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0] >> 1)


def image_id(data: bytes) -> int:
    """A non-negative 63-bit id of an image file's bytes (BLAKE2b): equal files, equal ids;
    distinct files collide with odds ~n^2 / 2^64."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class Captions:
    """The text fields of a pairs table: one of sample ``i``'s captions, drawn with the
    sample's generator, as ``tokens [context] int64``; with ``mask``, ``attention_mask
    [context] bool`` (True = a real token). An empty caption (or none) is a
    :class:`BadSample`. Picklable, so workers receive it."""

    def __init__(self, tokenizer: Any, context: int, *, mask: bool = False):
        self.tokenizer, self.context, self.mask = tokenizer, context, mask

    def __call__(self, table, i: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        captions = [t for t in table.texts(i) if t.strip()]
        if not captions:
            raise BadSample(table.where(i), "no caption (empty or missing)")
        pick = int(torch.randint(len(captions), (), generator=generator))
        return self.fields(captions[pick])

    def fields(self, text: str) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer.encode([text], self.context)[0]
        out = {"tokens": tokens}
        if self.mask:
            out["attention_mask"] = tokens != self.tokenizer.pad_id
        return out


class Labels:
    """The label of sample ``i`` of a labelled table (classes of images, clips or sounds) as ``{name: int64 []}``; a
    sample without one is a :class:`BadSample`. Picklable, so workers receive it."""

    def __init__(self, name: str = "labels"):
        self.name = name

    def __call__(self, table, i: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        label = table.label(i)
        if label is None or label < 0:
            raise BadSample(table.where(i), "no label")
        return {self.name: torch.tensor(label, dtype=torch.int64)}


def answer_vocabulary(table, *, limit: int = 3129) -> tuple[str, ...]:
    """The ``limit`` answers given most often over a VQA table (3129: the VQA-v2 classifier
    convention), most frequent first (ties: first seen)."""
    counts: dict[str, int] = {}
    for i in range(len(table)):
        for answer in table.answers(i):
            counts[answer] = counts.get(answer, 0) + 1
    return tuple(sorted(counts, key=lambda a: -counts[a])[:limit])


class Questions:
    """The text fields of a VQA table: the question as ``tokens`` and ``attention_mask``
    (:class:`Captions`), and ``answers``: the id in ``vocabulary`` of the answer most
    annotators gave (ties: the first) among those it holds; a question without one is a
    :class:`BadSample`."""

    def __init__(self, tokenizer: Any, context: int, vocabulary: Sequence[str]):
        self.text = Captions(tokenizer, context, mask=True)
        self.ids = {a: k for k, a in enumerate(vocabulary)}

    def __call__(self, table, i: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        question = " ".join(table.texts(i)).strip()
        given = [a for a in table.answers(i) if a in self.ids]
        if not question or not given:
            what = "no question" if not question else "no answer in the training answers"
            raise BadSample(table.where(i), what)
        answer = max(given, key=given.count)
        return {**self.text.fields(question), "answers": torch.tensor(self.ids[answer])}


class Samples(torch.utils.data.Dataset):
    """Sample ``(epoch, i)`` of ``table``: ``images [3, size, size] float32`` (random resized
    crop, normalised by ``mean``/``std``) and the fields of ``text(table, i, generator)``.

    With ``image_ids``, also ``idx [] int64``: a 63-bit digest of the image file's bytes, so
    rows that share an image (a caption per row, as COCO exported to CSV is) are one
    example to ALBEF's contrastive loss (equal ids are positives), not each other's
    negatives.

    ``samples[(epoch, i)]`` returns ``(fields, bad)``: ``bad`` lists the ``(where,
    reason)`` of every sample skipped on the way (``i`` unreadable: ``i + 1`` is used, and
    so on); ``fields`` is ``None`` when :data:`CHAIN` samples in a row were bad.
    """

    def __init__(
        self,
        table,
        text: Callable[[Any, int, torch.Generator], dict[str, torch.Tensor]],
        *,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int,
        image_ids: bool = False,
    ):
        self.table, self.text, self.image_ids = table, text, image_ids
        self.size, self.mean, self.std, self.seed = size, tuple(mean), tuple(std), seed

    def __len__(self) -> int:
        return len(self.table)

    def sample(self, epoch: int, i: int) -> dict[str, torch.Tensor]:
        """Sample ``i`` as it is in ``epoch``, or :class:`BadSample`."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, i))
        fields = self.text(self.table, i, generator)
        where = self.table.where(i)
        try:
            data = self.table.image_bytes(i)
        except (OSError, ValueError) as e:
            raise BadSample(where, f"cannot read the image: {e}") from e
        # A JPEG decodes at 1/2..1/8 scale while both sides stay >= 5/4 size: the crop (>= 0.9
        # of the area) is then still shrunk to size, at a fraction of the decoding cost.
        image = decode(data, where=where, draft=self.size * 5 // 4)
        images = train_transform(
            image, size=self.size, mean=self.mean, std=self.std, generator=generator
        )
        if self.image_ids:
            fields["idx"] = torch.tensor(image_id(data), dtype=torch.int64)
        return {"images": images, **fields}

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        bad = []
        for j in range(i, i + CHAIN):
            try:
                return self.sample(epoch, j % len(self.table)), bad
            except BadSample as e:
                bad.append((e.where, e.reason))
        return None, bad


def training_captions(table, *, limit: int = 200_000) -> list[str]:
    """Captions to train a tokenizer on: every caption of up to ``limit`` samples spread
    evenly over ``table`` (a pairs table; empty ones left out)."""
    step = max(1, len(table) // limit)
    return [t for i in range(0, len(table), step) for t in table.texts(i) if t.strip()]


def collate(items: list) -> tuple[dict[str, torch.Tensor] | None, list]:
    """``(batch, bad)`` from a list of :meth:`Samples.__getitem__` results; ``batch`` is
    ``None`` when a sample found nothing readable."""
    bad = [b for _, skipped in items for b in skipped]
    if any(fields is None for fields, _ in items):
        return None, bad
    names = items[0][0].keys()
    return {k: torch.stack([fields[k] for fields, _ in items]) for k in names}, bad


class _Batches:
    """This rank's share of every global batch, epoch after epoch, from ``start``
    ``(epoch, batch)``: lists of ``(epoch, index)`` keys."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world_size: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        per = batch_size // world_size
        self.rows = slice(rank * per, (rank + 1) * per)
        self.per_epoch = n // batch_size
        self.start = (0, 0)

    def order(self, epoch: int) -> torch.Tensor:
        """The permutation of epoch ``epoch`` (the same on every rank)."""
        g = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        epoch, k = self.start
        while True:
            order = self.order(epoch)
            for b in range(k, self.per_epoch):
                rows = order[b * self.batch_size : (b + 1) * self.batch_size][self.rows]
                yield [(epoch, int(i)) for i in rows]
            epoch, k = epoch + 1, 0


_STATE = ("epoch", "batch", "skipped", "tried")


class LoaderSource:
    """Global batches of ``samples`` for the loop (this rank's rows: ``per_rank``), read by
    a ``DataLoader`` with ``workers`` processes (persistent, prefetching; 0: in this one).

    ``batch_size``: the global batch (a multiple of ``world_size``, at most
    ``len(samples)``); ``finish(batch) -> batch``: runs on each batch in this process (e.g.
    FLAVA's image codes); ``max_bad_fraction``: see the module docstring. The counts are
    this rank's (a rank over the limit stops, and torchrun stops the others).
    """

    per_rank = True

    def __init__(
        self,
        samples: Samples,
        *,
        batch_size: int,
        seed: int,
        workers: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        max_bad_fraction: float = 0.01,
        finish: Callable[[dict], dict] | None = None,
        where: str = "--data",
    ):
        if batch_size > len(samples):
            raise ValueError(
                f"{where}: --batch-size {batch_size} is more than its {len(samples)} samples"
            )
        workers = default_workers() if workers is None else workers
        self.samples, self.where, self.finish = samples, where, finish
        self.max_bad_fraction, self.show = max_bad_fraction, rank == 0
        self._batches = _Batches(len(samples), batch_size, seed, rank, world_size)
        self._loader = torch.utils.data.DataLoader(
            samples,
            batch_sampler=self._batches,
            num_workers=workers,
            collate_fn=collate,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )
        self._iter = None
        self._position = dict.fromkeys(_STATE, 0)
        self._last = None  # (position before, batch): the loop's check draws one, puts it back
        self._pending = None
        self.first_bad: list[str] = []

    @property
    def batches_per_epoch(self) -> int:
        return self._batches.per_epoch

    def __iter__(self) -> LoaderSource:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        before = dict(self._position)
        if self._pending is not None:
            batch, skipped, tried = self._pending
            self._pending = None
        else:
            if self._iter is None:
                self._batches.start = (before["epoch"], before["batch"])
                self._iter = iter(self._loader)
            batch, bad = next(self._iter)
            skipped, tried = self._count(batch, bad)
            if self.finish is not None:
                batch = self.finish(batch)
        p = self._position
        p["skipped"] += skipped
        p["tried"] += tried
        p["batch"] += 1
        if p["batch"] == self._batches.per_epoch:
            p["epoch"], p["batch"] = p["epoch"] + 1, 0
        self._last = (before, (batch, skipped, tried))
        self._judge()
        return batch

    def _count(self, batch: dict | None, bad: list) -> tuple[int, int]:
        for where, reason in bad:
            if len(self.first_bad) < SHOWN:
                self.first_bad.append(f"{where} ({reason})")
                if self.show:
                    tqdm.write(f"{self.where}: skipped {where}: {reason}")
        if batch is None:
            raise ValueError(
                f"{self.where}: {CHAIN} samples in a row are unreadable, e.g. "
                + "; ".join(f"{w} ({r})" for w, r in bad[:3])
            )
        rows = self._batches.rows
        return len(bad), len(bad) + (rows.stop - rows.start)

    def _judge(self) -> None:
        p = self._position
        allowed = self.max_bad_fraction * max(p["tried"], JUDGED_FROM)
        if p["skipped"] > allowed:
            raise ValueError(
                f"{self.where}: {p['skipped']} of the {p['tried']} samples read so far are "
                f"unreadable or have no caption (more than --max-bad-fraction "
                f"{self.max_bad_fraction}), e.g. " + "; ".join(self.first_bad)
            )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The position: ``epoch``, ``batch`` (done in it), ``skipped`` and ``tried``."""
        return {k: torch.tensor(v, dtype=torch.int64) for k, v in self._position.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        position = {k: int(state[k]) for k in _STATE}
        if self._last is not None and self._last[0] == position:
            self._pending = self._last[1]  # one batch back: the one drawn, not read again
        else:
            self._iter, self._pending = None, None  # the workers' prefetched batches go
        self._last = None
        self._position = position

    def report(self) -> dict:
        """``{"skipped_samples": n, "epochs": e}`` (whole epochs done) and, once a sample
        was skipped, ``"first_bad"``: the first few, with why."""
        out = {"skipped_samples": self._position["skipped"], "epochs": self._position["epoch"]}
        if self.first_bad:
            out["first_bad"] = list(self.first_bad)
        return out
