"""The :class:`Table` every data format opens to, and what the formats share.

A table is map-style and random access: sample ``i`` is an encoded image
(:meth:`Table.image_bytes`), its texts (:meth:`Table.texts`) and a name for messages
(:meth:`Table.where`). It holds no open file: DataLoader workers receive it pickled, and a
format that reads from open files (webdataset shards, Arrow) reopens them lazily in each
process.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# What a folder scan counts as an image (lower-case suffixes); PIL reads all of them.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DATA_EXTRA = "pip install 'fmm[data]'"


class MissingPackage(ImportError, ValueError):
    """An optional package a data format needs is not installed. A ``ValueError`` too, so
    the command line answers it in one line."""


def require(module: str, *, format: str) -> ModuleType:
    """Import an optional package for ``format``, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingPackage(
            f"--data-format {format} needs the {module!r} package: {DATA_EXTRA}"
        ) from e


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def clean_texts(values: object, *, where: str) -> tuple[str, ...]:
    """A caption field as a tuple of non-blank strings: a string, a list of strings, or
    empty (``None``, ``""``) for none. Anything else is a ``ValueError`` naming ``where``."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = (values,)
    if not isinstance(values, Sequence) or not all(isinstance(v, str) for v in values):
        raise ValueError(
            f"{where}: a caption must be a string or a list of strings, got {values!r}"
        )
    return tuple(v.strip() for v in values if v.strip())


def missing_key(key: str, flag: str | None, source: str | Path, found: Sequence[str]) -> ValueError:
    """The error for a column or key the data lacks: names it, the flag that chooses it
    (if one does), the file and what the file has instead."""
    shown = ", ".join(repr(k) for k in list(found)[:20]) or "none"
    more = f" (and {len(found) - 20} more)" if len(found) > 20 else ""
    chosen_by = f" ({flag})" if flag else ""
    return ValueError(f"{source} has no {key!r}{chosen_by}; it has: {shown}{more}")


class Table:
    """Samples of one dataset, by index.

    ``kind`` says what a sample carries: ``"pairs"`` (an image and its captions),
    ``"classes"`` (an image and :meth:`label`, an index into ``classes``) or ``"vqa"`` (an
    image, its question as ``texts(i)`` and :meth:`answers`). ``format`` is the format's
    name (``"csv"``, ``"wds"``, ...), ``source`` the path it was opened from.

    Example::

        table = open_table("data/train.csv")
        image = decode(table.image_bytes(0), where=table.where(0))
        caption = table.texts(0)[0]
    """

    kind: str = "pairs"
    format: str
    source: str

    def __len__(self) -> int:
        raise NotImplementedError

    def image_bytes(self, i: int) -> bytes:
        """The encoded image of sample ``i``; ``OSError`` / ``ValueError`` if it cannot be
        read (a missing file, a sample without an image member)."""
        raise NotImplementedError

    def texts(self, i: int) -> tuple[str, ...]:
        """Sample ``i``'s captions, ``()`` when it has none (pairs); its question (vqa);
        ``()`` for classes."""
        raise NotImplementedError

    def where(self, i: int) -> str:
        """Sample ``i`` for a person: ``photos/dog.jpg``, ``shard-000001.tar:000042``,
        ``row 17``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.format} table: {len(self)} {self.kind} from {self.source}>"


class FileImages(Table):
    """Images as files: ``paths`` relative to ``root`` (or absolute), read when asked."""

    def __init__(self, *, format: str, source: str | Path, root: str | Path, paths: list[str]):
        if not paths:
            raise ValueError(f"{source}: no samples (an empty dataset)")
        self.format, self.source, self.root, self.paths = format, str(source), str(root), paths

    def __len__(self) -> int:
        return len(self.paths)

    def image_bytes(self, i: int) -> bytes:
        return Path(self.root, self.paths[i]).read_bytes()

    def where(self, i: int) -> str:
        return self.paths[i]
