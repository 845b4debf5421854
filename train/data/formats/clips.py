"""Users' clips as tables: video or audio files on disk with captions or labels.

One layout for both media (:data:`train.data.formats.videos.VIDEO`,
:data:`train.data.formats.audio.AUDIO`); ``<m>`` below is ``video`` or ``audio``:

============= ========================================================================
format        what ``path`` is
============= ========================================================================
<m>-csv       a ``.csv`` / ``.tsv`` with a ``<m>`` path column and a ``caption`` and/or
              ``label`` column (the keys are ``open_table`` arguments); relative paths
              resolve against the file's folder
<m>-jsonl     a ``.jsonl``, the same keys (a caption may be a list of strings)
<m>-folder    a folder of clips with same-stem ``.txt`` captions (``0001.mp4`` +
              ``0001.txt``), nested or not
<m>-classes   one sub-folder of clips per class (``walking/1.mp4``), classes sorted
============= ========================================================================

A table's ``kind``: ``"<m>-classes"`` when its clips have labels (``label(i)`` indexes
``classes``: a CSV's label names sorted, or the class folders), else ``"<m>-pairs"`` when
they have captions (``texts(i)``), else the bare kind (clips alone, e.g. for a video VQ-VAE
or a masked autoencoder). A CSV with both columns has both, and the classes kind.
:meth:`ClipTable.clip_file` is a clip's path; the medium's decoder reads it. A row without
a caption or label is a sample the loader skips and counts, like a bad file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from train.data.formats.files import read_rows
from train.data.formats.folders import CaptionFolder, ImageFolder, readable
from train.data.formats.table import FileImages, clean_texts


@dataclass(frozen=True)
class Media:
    """A kind of clip: ``name`` (``"video"``: its formats are ``video-csv`` ...), the file
    ``suffixes`` a folder scan counts, ``noun`` for messages (``"videos"``), ``bare``: the
    kind of a table of clips alone, ``key_flag``: the CLI flag naming the path column, if
    the recipes have one."""

    name: str
    suffixes: tuple[str, ...]
    noun: str
    bare: str
    key_flag: str | None = None

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(f"{self.name}-{f}" for f in ("csv", "jsonl", "folder", "classes"))

    @property
    def kinds(self) -> tuple[str, ...]:
        return (f"{self.name}-classes", f"{self.name}-pairs", self.bare)

    def holds(self, path: str | Path) -> bool:
        """Whether ``path``'s suffix is one of this medium's."""
        return Path(path).suffix.lower() in self.suffixes


class ClipTable:
    """What every clip table adds to :class:`train.data.formats.table.FileImages`."""

    media: Media

    def clip_file(self, i: int) -> Path:
        """Clip ``i``'s path."""
        return Path(self.root, self.paths[i])

    def image_bytes(self, i: int) -> bytes:
        m = self.media.name
        a = "an" if m[0] in "aeiou" else "a"
        raise ValueError(f"{self.where(i)} is {a} {m} clip: train on it with {a} {m} recipe")


class ClipRows(ClipTable, FileImages):
    """Clips listed in a CSV/TSV/JSONL: ``captions[i]`` a tuple (or ``None`` without a
    caption column), ``labels[i]`` an index into ``classes`` (or ``None`` without a label
    column; -1 for a row with an empty label)."""

    def __init__(self, media: Media, *, format, source: Path, paths, captions, labels, classes):
        super().__init__(format=format, source=source, root=source.parent, paths=paths)
        self.media, self.captions, self.labels, self.classes = media, captions, labels, classes
        self.class_names = tuple(readable(c) for c in classes)
        self.kind = media.kinds[0 if labels else 1 if captions else 2]

    def texts(self, i: int) -> tuple[str, ...]:
        return self.captions[i] if self.captions else ()

    def label(self, i: int) -> int | None:
        return self.labels[i] if self.labels else None


def open_clip_rows(
    media: Media,
    path: Path,
    *,
    format: str,
    key: str,
    caption_key: str = "caption",
    label_key: str = "label",
    separator: str | None = None,
) -> ClipRows:
    """A ``<m>-csv`` (``.csv`` ``,``, ``.tsv`` tab, or ``separator``) or ``<m>-jsonl`` file:
    a path per row under ``key``, ``caption_key`` / ``label_key`` if present."""
    named = f"{key!r}" + (f" ({media.key_flag})" if media.key_flag else "")
    paths, captions, names = [], [], []
    rows = read_rows(path, format=format, required={key: media.key_flag}, separator=separator)
    for where, row in rows:
        clip = row[key]
        if not isinstance(clip, str) or not clip:
            raise ValueError(
                f"{where}: {named} must be a path to a {media.name} clip, got {clip!r}"
            )
        paths.append(clip)
        captions.append(clean_texts(row.get(caption_key), where=where))
        label = row.get(label_key)
        names.append(None if label in (None, "") else str(label).strip())
    classes = tuple(sorted({n for n in names if n}))
    index = {c: k for k, c in enumerate(classes)}
    labels = [index[n] if n else -1 for n in names] if classes else None
    return ClipRows(
        media, format=format, source=path, paths=paths, classes=classes, labels=labels,
        captions=captions if any(captions) else None,
    )  # fmt: skip


class ClipFolder(ClipTable, CaptionFolder):
    """``<m>-folder``: clips with optional same-stem ``.txt`` captions."""

    def __init__(self, media: Media, root: Path):
        self.media = media
        super().__init__(root, format=media.formats[2], suffixes=media.suffixes, noun=media.noun)
        self.kind = media.kinds[1] if any(self.captioned) else media.bare


class ClipClasses(ClipTable, ImageFolder):
    """``<m>-classes``: one sub-folder of clips per class (``label(i)`` indexes ``classes``)."""

    def __init__(self, media: Media, root: Path):
        self.media, self.kind = media, media.kinds[0]
        super().__init__(root, format=media.formats[3], suffixes=media.suffixes, noun=media.noun)
