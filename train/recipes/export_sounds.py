"""``python -m train export-shapes DIR --format audio-csv --n N``: the sound world on disk,
as a user's audio dataset would be.

::

    python -m train export-shapes data/sounds --format audio-csv --n 2000 --seconds 2

writes ``N`` training clips (:func:`train.data.sounds.sample_sounds`: no held-out pitch x
timbre class sounds in them) as 16-bit mono WAV files at 16 kHz, ``DIR/clips/NNNNNN.wav``,
listed in ``DIR/train.csv`` (``audio,caption,label,heldout``: the label is the clip's first
sound's class, "high tone"), and ``DIR/val.csv`` + ``DIR/val/``: every class ``--per-class``
times, held-out classes included (the ``heldout`` column says which: zero-shot
evaluation). Both open as ``audio-csv`` tables (:mod:`train.data.formats.audio`);
``DIR/export.json`` records the settings. The same ``--seed`` gives the same clips.
Written into ``DIR.partial`` and renamed at the end, as every export is
(:func:`train.recipes.export_shapes.written`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from train.data.audio import write_audio
from train.data.sounds import (
    Sounds,
    SoundWorldConfig,
    class_names,
    eval_set,
    is_holdout,
    sample_sounds,
)
from train.recipes.export_shapes import _write_rows, _write_settings, written

_BATCH = 64  # clips synthesised at once (the clips do not depend on it: one generator)
_VAL_STREAM = 2**40  # the val clips' seed, apart from the training clips'


def export_sounds(
    out: Path,
    *,
    n: int,
    seed: int = 0,
    seconds: float = 2.0,
    per_class: int = 20,
    overwrite: bool = False,
) -> Path:
    """Write the ``audio-csv`` export of the module's docstring to ``out``; returns the path
    to pass as ``--data`` (``out/train.csv``).

    Example: `export_sounds(Path("data/sounds"), n=2000)`.
    """
    world = SoundWorldConfig(seconds=seconds)
    val_n = len(class_names(world)) * per_class
    with (
        written(out, overwrite=overwrite) as partial,
        tqdm(total=n + val_n, desc="export-shapes audio-csv", unit="clip") as bar,
    ):
        generator = torch.Generator().manual_seed(seed)
        batches = (
            sample_sounds(world, min(_BATCH, n - start), generator=generator)
            for start in range(0, n, _BATCH)
        )
        _write_clips(partial, "train", world, batches, bar)
        _write_clips(
            partial, "val", world, [eval_set(world, per_class, seed=seed + _VAL_STREAM)], bar
        )
        settings = {
            "format": "audio-csv", "data": "train.csv", "n": n, "seed": seed,
            "per_class": per_class, "world": dataclasses.asdict(world),
        }  # fmt: skip
        _write_settings(partial, settings)
    return Path(out) / "train.csv"


def _write_clips(
    root: Path, name: str, world: SoundWorldConfig, batches: Iterable[Sounds], bar: tqdm
) -> None:
    """``root/<name>.csv`` (``audio,caption,label,heldout``) listing
    ``root/<clips|name>/NNNNNN.wav``."""
    folder = "clips" if name == "train" else name
    (root / folder).mkdir()
    names = class_names(world)
    rows = []
    for sounds in batches:
        held = is_holdout(world, sounds.labels).tolist()
        for wave, caption, label, h in zip(
            sounds.waves, sounds.captions, sounds.labels.tolist(), held
        ):
            path = f"{folder}/{len(rows):06d}.wav"
            write_audio(root / path, wave, rate=world.sample_rate)
            rows.append((path, caption, names[label], int(h)))
            bar.update()
    _write_rows(root / f"{name}.csv", ("audio", "caption", "label", "heldout"), rows)
