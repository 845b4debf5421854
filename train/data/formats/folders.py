"""Datasets that are folders of image files.

- ``folder``: images with same-stem ``.txt`` captions (``0001.jpg`` + ``0001.txt``), in
  nested sub-folders or not: the layout img2dataset writes. An image without a ``.txt`` is
  a sample without a caption. Captions are read when asked, so opening a million-image
  folder lists it once and reads nothing else.
- ``imagefolder``: one sub-folder per class (``dogs/1.jpg``, ``cats/2.png``), classes in
  sorted order, images anywhere below their class folder (torchvision's ImageFolder).

Hidden files and folders (``.ipynb_checkpoints``) are skipped. Both take the file
suffixes that count as samples (images by default), so a folder of video clips opens the
same way (``video-folder``, ``audio-classes``, ...: :mod:`train.data.formats.clips`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from train.data.formats.table import IMAGE_SUFFIXES, FileImages


def scan(root: Path) -> list[str]:
    """Every non-hidden file below ``root``, as sorted ``/``-separated relative paths."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(root)
        found += [(rel / f).as_posix() for f in files if not f.startswith(".")]
    return sorted(found)


def looks_captioned(root: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> bool:
    """Whether the first folder below ``root`` that holds images (files ending in one of
    ``suffixes``) also holds ``.txt`` files (a caption folder) rather than none (an
    ImageFolder's class folder). Stops there: cheap on a large tree."""
    for _, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if any(_has_suffix(f, suffixes) for f in files):
            return any(f.lower().endswith(".txt") for f in files)
    return False


class CaptionFolder(FileImages):
    """``folder``: images (files ending in one of ``suffixes``; ``noun`` names them in
    errors) with optional same-stem ``.txt`` captions."""

    def __init__(
        self,
        root: Path,
        *,
        format: str = "folder",
        suffixes: Sequence[str] = IMAGE_SUFFIXES,
        noun: str = "images",
    ):
        files = scan(root)
        present = set(files)
        paths = [f for f in files if _has_suffix(f, suffixes)]
        if not paths:
            raise ValueError(f"{root}: no {noun} (looked for {', '.join(suffixes)})")
        super().__init__(format=format, source=root, root=root, paths=paths)
        # One flag per image, not a second list of paths: the caption's path is derived.
        self.captioned = bytes(_caption_of(p) in present for p in paths)

    def texts(self, i: int) -> tuple[str, ...]:
        if not self.captioned[i]:
            return ()
        text = Path(self.root, _caption_of(self.paths[i])).read_text(encoding="utf-8")
        return (text.strip(),) if text.strip() else ()


def _caption_of(image: str) -> str:
    return image[: len(image) - len(Path(image).suffix)] + ".txt"


class ImageFolder(FileImages):
    """``imagefolder``: ``kind = "classes"``; ``label(i)`` indexes ``classes``, the class
    folders' names in sorted order; ``class_names`` are the same names readable (``_`` as
    spaces, ``golden_retriever`` -> ``golden retriever``) for prompts."""

    kind = "classes"

    def __init__(
        self,
        root: Path,
        *,
        format: str = "imagefolder",
        suffixes: Sequence[str] = IMAGE_SUFFIXES,
        noun: str = "images",
    ):
        classes = sorted(
            d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        if not classes:
            raise ValueError(f"{root}: no class sub-folders (an ImageFolder has one per class)")
        paths, labels = [], []
        for label, name in enumerate(classes):
            found = [f"{name}/{f}" for f in scan(root / name) if _has_suffix(f, suffixes)]
            if not found:
                raise ValueError(f"{root / name}: a class folder without {noun}")
            paths += found
            labels += [label] * len(found)
        super().__init__(format=format, source=root, root=root, paths=paths)
        self.classes = tuple(classes)
        self.class_names = tuple(readable(c) for c in classes)
        self.labels = labels

    def label(self, i: int) -> int:
        return self.labels[i]

    def texts(self, i: int) -> tuple[str, ...]:
        return ()


def _has_suffix(path: str, suffixes: Sequence[str]) -> bool:
    return Path(path).suffix.lower() in suffixes


def readable(class_folder: str) -> str:
    """A class folder's name as prompts use it: ``"golden_retriever"`` -> ``"golden retriever"``."""
    return class_folder.replace("_", " ").strip()
