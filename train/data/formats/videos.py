"""Users' video clips as tables: files on disk with captions or labels.

============= ========================================================================
format        what ``path`` is
============= ========================================================================
video-csv     a ``.csv`` / ``.tsv`` with a ``video`` path column and a ``caption`` and/or
              ``label`` column (``--video-key``, ``--video-caption-key``,
              ``--video-label-key``); relative paths resolve against the file's folder
video-jsonl   a ``.jsonl``, the same keys (a caption may be a list of strings)
video-folder  a folder of clips with same-stem ``.txt`` captions (``0001.mp4`` +
              ``0001.txt``), nested or not
video-classes one sub-folder of clips per class (``walking/1.mp4``), classes sorted
============= ========================================================================

A table's ``kind``: ``"video-classes"`` when its clips have labels (``label(i)`` indexes
``classes``: a CSV's label names sorted, or the class folders), else ``"video-pairs"``
when they have captions (``texts(i)``), else ``"videos"`` (clips alone, e.g. for a video
VQ-VAE). A CSV with both columns has both, and the ``video-classes`` kind.
:meth:`VideoTable.video_file` is a clip's path; clips are decoded by
:func:`train.data.videos.decode_video`. A row without a caption or label is a sample the
loader skips and counts, like a bad file.

Example::

    table = open_table("clips/train.csv")      # video,caption rows: sniffed as video-csv
    table.kind, table.texts(0), table.video_file(0)
"""

from __future__ import annotations

from pathlib import Path

from train.data.formats.files import read_rows
from train.data.formats.folders import CaptionFolder, ImageFolder, readable
from train.data.formats.table import FileImages, clean_texts

# Suffix -> the one FFmpeg demuxer that may read it (train.data.videos forces it).
VIDEO_DEMUXERS = {
    ".mp4": "mov", ".m4v": "mov", ".mov": "mov", ".mkv": "matroska", ".webm": "matroska",
    ".avi": "avi", ".mpg": "mpeg", ".mpeg": "mpeg", ".ts": "mpegts", ".ogv": "ogg",
}  # fmt: skip
VIDEO_SUFFIXES = tuple(VIDEO_DEMUXERS)
VIDEO_FORMATS = ("video-csv", "video-jsonl", "video-folder", "video-classes")
VIDEO_KINDS = ("video-classes", "video-pairs", "videos")


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


class VideoTable:
    """What every video table adds to :class:`train.data.formats.table.FileImages`."""

    def video_file(self, i: int) -> Path:
        """Clip ``i``'s path."""
        return Path(self.root, self.paths[i])

    def image_bytes(self, i: int) -> bytes:
        raise ValueError(f"{self.where(i)} is a video clip: train on it with a video recipe")


class VideoRows(VideoTable, FileImages):
    """Clips listed in a CSV/TSV/JSONL: ``captions[i]`` a tuple (or ``None`` without a
    caption column), ``labels[i]`` an index into ``classes`` (or ``None`` without a label
    column; -1 for a row with an empty label)."""

    def __init__(self, *, format, source: Path, paths, captions, labels, classes):
        super().__init__(format=format, source=source, root=source.parent, paths=paths)
        self.captions, self.labels, self.classes = captions, labels, classes
        self.class_names = tuple(readable(c) for c in classes)
        self.kind = "video-classes" if labels else "video-pairs" if captions else "videos"

    def texts(self, i: int) -> tuple[str, ...]:
        return self.captions[i] if self.captions else ()

    def label(self, i: int) -> int | None:
        return self.labels[i] if self.labels else None


def open_video_rows(
    path: Path,
    *,
    format: str,
    video_key: str = "video",
    caption_key: str = "caption",
    label_key: str = "label",
    separator: str | None = None,
) -> VideoRows:
    """A ``video-csv`` (``.csv`` ``,``, ``.tsv`` tab, or ``separator``) or ``video-jsonl``
    file: a path per row under ``video_key``, ``caption_key`` / ``label_key`` if present."""
    paths, captions, names = [], [], []
    rows = read_rows(path, format=format, required={video_key: "--video-key"}, separator=separator)
    for where, row in rows:
        video = row[video_key]
        if not isinstance(video, str) or not video:
            raise ValueError(f"{where}: {video_key!r} (--video-key) must be a path, got {video!r}")
        paths.append(video)
        captions.append(clean_texts(row.get(caption_key), where=where))
        label = row.get(label_key)
        names.append(None if label in (None, "") else str(label).strip())
    classes = tuple(sorted({n for n in names if n}))
    index = {c: k for k, c in enumerate(classes)}
    labels = [index[n] if n else -1 for n in names] if classes else None
    return VideoRows(
        format=format, source=path, paths=paths, classes=classes, labels=labels,
        captions=captions if any(captions) else None,
    )  # fmt: skip


class VideoFolder(VideoTable, CaptionFolder):
    """``video-folder``: clips with optional same-stem ``.txt`` captions."""

    def __init__(self, root: Path):
        super().__init__(root, format="video-folder", suffixes=VIDEO_SUFFIXES, noun="videos")
        self.kind = "video-pairs" if any(self.captioned) else "videos"


class VideoClasses(VideoTable, ImageFolder):
    """``video-classes``: one sub-folder of clips per class (``label(i)`` indexes ``classes``)."""

    kind = "video-classes"

    def __init__(self, root: Path):
        super().__init__(root, format="video-classes", suffixes=VIDEO_SUFFIXES, noun="videos")
