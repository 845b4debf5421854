"""The caption files retrieval papers evaluate on: several captions per image.

- ``coco``: COCO's ``captions_train2017.json``, ``{"images": [{"id", "file_name"}],
  "annotations": [{"image_id", "caption"}]}``; images under ``image_root``.
- ``karpathy``: Karpathy's splits ``dataset_coco.json`` / ``dataset_flickr30k.json``,
  ``{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}``; ``split``
  is train (with ``restval``, as every paper trains), val or test; images under
  ``image_root`` (``image_root/filepath/filename``).

One sample per image, ``texts(i)`` all its captions, in the file's order.
"""

from __future__ import annotations

import json
from pathlib import Path

from train.data.formats.table import FileImages, clean_texts, missing_key

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


class Captioned(FileImages):
    """Images with every caption of each."""

    def __init__(self, *, format: str, source: Path, root: Path, paths, captions):
        super().__init__(format=format, source=source, root=root, paths=paths)
        self.captions = captions

    def texts(self, i: int) -> tuple[str, ...]:
        return self.captions[i]


def read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None


def image_root_of(image_root: str | Path | None, format: str) -> Path:
    if image_root is None:
        raise ValueError(f"--data-format {format} needs --image-root, the folder of its images")
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"--image-root {root}: no such folder")
    return root


def field(entry: dict, key: str, where: str) -> object:
    if not isinstance(entry, dict) or key not in entry:
        found = list(entry) if isinstance(entry, dict) else []
        raise missing_key(key, None, where, found)
    return entry[key]


def open_coco(path: Path, *, image_root: str | Path | None) -> Captioned:
    root = image_root_of(image_root, "coco")
    data = read_json(path)
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or key not in data:
            raise missing_key(key, None, path, list(data) if isinstance(data, dict) else [])
    files, by_id = [], {}
    for n, image in enumerate(data["images"]):
        where = f"{path} images[{n}]"
        by_id[field(image, "id", where)] = len(files)
        files.append(str(field(image, "file_name", where)))
    captions: list[list[str]] = [[] for _ in files]
    for n, note in enumerate(data["annotations"]):
        where = f"{path} annotations[{n}]"
        image_id = field(note, "image_id", where)
        if image_id not in by_id:
            raise ValueError(f"{where}: image_id {image_id!r} is not in 'images'")
        captions[by_id[image_id]] += clean_texts(field(note, "caption", where), where=where)
    return Captioned(
        format="coco", source=path, root=root, paths=files, captions=[tuple(c) for c in captions]
    )


def open_karpathy(path: Path, *, image_root: str | Path | None, split: str | None) -> Captioned:
    data = read_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{path}: a Karpathy split file has an 'images' list")
    if split not in KARPATHY_SPLITS:
        counts = {
            s: sum(i.get("split") in kept for i in images) for s, kept in KARPATHY_SPLITS.items()
        }
        shown = ", ".join(f"{s} ({n} images)" for s, n in counts.items())
        given = "" if split is None else f" (not {split!r})"
        raise ValueError(f"{path}: --split must be one of {shown}{given}")
    root = image_root_of(image_root, "karpathy")
    files, captions = [], []
    for n, image in enumerate(images):
        where = f"{path} images[{n}]"
        if field(image, "split", where) not in KARPATHY_SPLITS[split]:
            continue
        name = str(field(image, "filename", where))
        files.append(f"{image['filepath']}/{name}" if image.get("filepath") else name)
        sentences = field(image, "sentences", where)
        raw = [field(s, "raw", f"{where} sentences") for s in sentences]
        captions.append(clean_texts(raw, where=where))
    return Captioned(format="karpathy", source=path, root=root, paths=files, captions=captions)
