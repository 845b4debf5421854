"""Users' audio clips as tables: WAV / FLAC files on disk with captions or labels.

============= ========================================================================
format        what ``path`` is
============= ========================================================================
audio-csv     a ``.csv`` / ``.tsv`` with an ``audio`` path column and a ``caption`` and/or
              ``label`` column (``audio_key``, ``audio_caption_key``,
              ``audio_label_key`` of ``open_table``); relative paths resolve against the
              file's folder
audio-jsonl   a ``.jsonl``, the same keys (a caption may be a list of strings)
audio-folder  a folder of clips with same-stem ``.txt`` captions (``0001.wav`` +
              ``0001.txt``), nested or not
audio-classes one sub-folder of clips per class (``dog_bark/1.wav``), classes sorted
============= ========================================================================

A table's ``kind``: ``"audio-classes"`` when its clips have labels (``label(i)`` indexes
``classes``: a CSV's label names sorted, or the class folders), else ``"audio-pairs"``
when they have captions (``texts(i)``), else ``"audio"`` (clips alone, e.g. for a masked
autoencoder). A CSV with both columns has both, and the ``audio-classes`` kind.
:meth:`AudioTable.audio_file` is a clip's path; clips are decoded by
:func:`train.data.audio.decode_audio`. The layout and the kinds follow the video formats
(:mod:`train.data.formats.videos`) one for one.

Example::

    table = open_table("sounds/train.csv")      # audio,caption,label rows: audio-csv
    table.kind, table.texts(0), table.audio_file(0)
"""

from __future__ import annotations

from pathlib import Path

from train.data.formats.files import read_rows
from train.data.formats.folders import CaptionFolder, ImageFolder, readable
from train.data.formats.table import FileImages, clean_texts

# What soundfile (libsndfile) reads that a folder scan counts as a clip.
AUDIO_SUFFIXES = (".wav", ".flac")
AUDIO_FORMATS = ("audio-csv", "audio-jsonl", "audio-folder", "audio-classes")
AUDIO_KINDS = ("audio-classes", "audio-pairs", "audio")


def is_audio(path: str | Path) -> bool:
    return Path(path).suffix.lower() in AUDIO_SUFFIXES


class AudioTable:
    """What every audio table adds to :class:`train.data.formats.table.FileImages`."""

    def audio_file(self, i: int) -> Path:
        """Clip ``i``'s path."""
        return Path(self.root, self.paths[i])

    def image_bytes(self, i: int) -> bytes:
        raise ValueError(f"{self.where(i)} is an audio clip: train on it with an audio recipe")


class AudioRows(AudioTable, FileImages):
    """Clips listed in a CSV/TSV/JSONL: ``captions[i]`` a tuple (or ``None`` without a
    caption column), ``labels[i]`` an index into ``classes`` (or ``None`` without a label
    column; -1 for a row with an empty label)."""

    def __init__(self, *, format, source: Path, paths, captions, labels, classes):
        super().__init__(format=format, source=source, root=source.parent, paths=paths)
        self.captions, self.labels, self.classes = captions, labels, classes
        self.class_names = tuple(readable(c) for c in classes)
        self.kind = "audio-classes" if labels else "audio-pairs" if captions else "audio"

    def texts(self, i: int) -> tuple[str, ...]:
        return self.captions[i] if self.captions else ()

    def label(self, i: int) -> int | None:
        return self.labels[i] if self.labels else None


def open_audio_rows(
    path: Path,
    *,
    format: str,
    audio_key: str = "audio",
    caption_key: str = "caption",
    label_key: str = "label",
    separator: str | None = None,
) -> AudioRows:
    """An ``audio-csv`` (``.csv`` ``,``, ``.tsv`` tab, or ``separator``) or ``audio-jsonl``
    file: a path per row under ``audio_key``, ``caption_key`` / ``label_key`` if present."""
    paths, captions, names = [], [], []
    for where, row in read_rows(
        path, format=format, required={audio_key: None}, separator=separator
    ):
        audio = row[audio_key]
        if not isinstance(audio, str) or not audio:
            raise ValueError(f"{where}: {audio_key!r} must be a path to a clip, got {audio!r}")
        paths.append(audio)
        captions.append(clean_texts(row.get(caption_key), where=where))
        label = row.get(label_key)
        names.append(None if label in (None, "") else str(label).strip())
    classes = tuple(sorted({n for n in names if n}))
    index = {c: k for k, c in enumerate(classes)}
    labels = [index[n] if n else -1 for n in names] if classes else None
    return AudioRows(
        format=format, source=path, paths=paths, classes=classes, labels=labels,
        captions=captions if any(captions) else None,
    )  # fmt: skip


class AudioFolder(AudioTable, CaptionFolder):
    """``audio-folder``: clips with optional same-stem ``.txt`` captions."""

    def __init__(self, root: Path):
        super().__init__(root, format="audio-folder", suffixes=AUDIO_SUFFIXES, noun="audio clips")
        self.kind = "audio-pairs" if any(self.captioned) else "audio"


class AudioClasses(AudioTable, ImageFolder):
    """``audio-classes``: one sub-folder of clips per class (``label(i)`` indexes ``classes``)."""

    kind = "audio-classes"

    def __init__(self, root: Path):
        super().__init__(root, format="audio-classes", suffixes=AUDIO_SUFFIXES, noun="audio clips")
