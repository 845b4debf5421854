"""Users' datasets as :class:`Table` s: ``open_table(path)`` reads what ``path`` points at.

========== ============================================================ ==========
format     what ``path`` is                                             kind
========== ============================================================ ==========
csv, tsv   a ``.csv`` / ``.tsv`` file: image path + caption per row     pairs
jsonl      a ``.jsonl`` file, the same keys                             pairs
folder     a folder of images with same-stem ``.txt`` captions          pairs
wds        webdataset shards: a ``.tar``, a folder of them, or a brace  pairs
           pattern ``shards/{000000..000099}.tar``
hf         a ``datasets`` folder (``save_to_disk``) or ``.parquet``     pairs
           file(s): a file, a folder, a glob
coco       COCO captions JSON (``captions_*.json``), with image_root    pairs
karpathy   ``dataset_coco.json`` / ``dataset_flickr30k.json``, with     pairs
           image_root and split
vqa        VQA-v2 questions JSON (annotations beside it) or a list of   vqa
           ``{"image", "question", "answer"}``
imagefolder one sub-folder of images per class                          classes
video-csv  a ``.csv`` / ``.tsv`` / ``.jsonl`` (video-jsonl) with a ``video`` video-*
video-jsonl column and ``caption`` / ``label`` (:mod:`.videos`)
video-folder a folder of clips with same-stem ``.txt`` captions            video-*
video-classes one sub-folder of clips per class                         video-classes
audio-csv  the same with an ``audio`` column of WAV/FLAC clips             audio-*
audio-jsonl (:mod:`.audio`)
audio-folder a folder of clips with same-stem ``.txt`` captions            audio-*
audio-classes one sub-folder of clips per class                         audio-classes
========== ============================================================ ==========

``format`` (``--data-format``) overrides what the path looks like. Example::

    table = open_table("photos/train.csv", caption_key="caption")
    len(table), table.texts(0), table.where(0)   # 12000, ("a dog on the grass",), "dog.jpg"
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from train.data.formats.audio import AUDIO
from train.data.formats.captions import open_coco, open_karpathy
from train.data.formats.clips import ClipClasses, ClipFolder, open_clip_rows
from train.data.formats.files import open_csv, open_jsonl
from train.data.formats.folders import CaptionFolder, ImageFolder, looks_captioned, readable
from train.data.formats.hf import HFTable
from train.data.formats.shards import Shards
from train.data.formats.table import IMAGE_SUFFIXES, MissingPackage, Table, is_image
from train.data.formats.videos import VIDEO
from train.data.formats.vqa import open_vqa

FORMATS = (
    *("csv", "tsv", "jsonl", "folder", "imagefolder", "wds", "hf", "coco", "karpathy", "vqa"),
    *VIDEO.formats,
    *AUDIO.formats,
)
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")

__all__ = ["FORMATS", "MissingPackage", "Table", "open_table", "readable", "sniff"]


def open_table(
    path: str | Path,
    *,
    format: str | None = None,
    img_key: str = "filepath",
    caption_key: str = "title",
    separator: str | None = None,
    image_column: str = "image",
    text_column: str = "text",
    image_root: str | Path | None = None,
    split: str | None = None,
    annotations: str | Path | None = None,
    video_key: str = "video",
    video_caption_key: str = "caption",
    video_label_key: str = "label",
    audio_key: str = "audio",
    audio_caption_key: str = "caption",
    audio_label_key: str = "label",
) -> Table:
    """Open the dataset at ``path`` as a :class:`Table` (``format`` sniffed when ``None``).

    ``img_key`` / ``caption_key`` / ``separator``: csv, tsv and jsonl columns
    (``--csv-img-key``, ``--csv-caption-key``, ``--csv-separator``); ``image_column`` /
    ``text_column``: hf columns; ``image_root``: where coco, karpathy and vqa images lie;
    ``split``: karpathy's train|val|test, or a ``datasets`` DatasetDict's split;
    ``annotations``: a VQA-v2 annotations file when it is not beside the questions;
    ``video_key`` / ``video_caption_key`` / ``video_label_key``: video-csv and video-jsonl
    columns (``--video-key``, ``--video-caption-key``, ``--video-label-key``);
    ``audio_key`` / ``audio_caption_key`` / ``audio_label_key``: audio-csv and audio-jsonl's.
    Errors are ``ValueError`` s naming the flag, file or key (a missing optional package
    too: :class:`MissingPackage`); a missing path is ``FileNotFoundError``.
    """
    text = str(path)
    if format is None:
        format = sniff(text)
    elif format not in FORMATS:
        raise ValueError(f"--data-format {format!r} is not one of: {', '.join(FORMATS)}")
    pattern = format in ("wds", "hf") and _is_pattern(text)
    if not pattern and not Path(text).exists():
        raise FileNotFoundError(f"--data {text}: no such file or folder")
    path = Path(text)
    if format in ("csv", "tsv"):
        return open_csv(
            _file(path, format), format=format, img_key=img_key, caption_key=caption_key,
            separator=separator,
        )  # fmt: skip
    if format == "jsonl":
        return open_jsonl(_file(path, format), img_key=img_key, caption_key=caption_key)
    if format == "folder":
        return CaptionFolder(_folder(path, format))
    if format == "imagefolder":
        return ImageFolder(_folder(path, format))
    if format in ("video-csv", "video-jsonl"):
        return open_clip_rows(
            VIDEO, _file(path, format), format=format, key=video_key,
            caption_key=video_caption_key, label_key=video_label_key, separator=separator,
        )  # fmt: skip
    if format == "video-folder":
        return ClipFolder(VIDEO, _folder(path, format))
    if format == "video-classes":
        return ClipClasses(VIDEO, _folder(path, format))
    if format in ("audio-csv", "audio-jsonl"):
        return open_clip_rows(
            AUDIO, _file(path, format), format=format, key=audio_key,
            caption_key=audio_caption_key, label_key=audio_label_key, separator=separator,
        )  # fmt: skip
    if format == "audio-folder":
        return ClipFolder(AUDIO, _folder(path, format))
    if format == "audio-classes":
        return ClipClasses(AUDIO, _folder(path, format))
    if format == "wds":
        return Shards(text)
    if format == "hf":
        return HFTable(text, image_column=image_column, text_column=text_column, split=split)
    if format == "coco":
        return open_coco(_file(path, format), image_root=image_root)
    if format == "karpathy":
        return open_karpathy(_file(path, format), image_root=image_root, split=split)
    return open_vqa(_file(path, format), image_root=image_root, annotations=annotations)


def sniff(path: str) -> str:
    """The format ``path`` looks like (see the module's table); a ``ValueError`` naming
    ``--data-format`` when it is ambiguous or unknown."""
    p = Path(path)
    if _is_pattern(path):
        # "shards/{000000..000099}.tar", "data/*.parquet": what the pattern ends with.
        known = {".tar": "wds", ".parquet": "hf"}
        if p.suffix.lower() in known:
            return known[p.suffix.lower()]
        return _unknown(path, "a pattern of neither .tar nor .parquet files")
    if p.is_file():
        suffix = p.suffix.lower()
        known = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".tar": "wds", ".parquet": "hf"}
        for media in ("video", "audio"):
            if suffix in (".csv", ".tsv", ".jsonl") and _has_column(p, media):
                return f"{media}-jsonl" if suffix == ".jsonl" else f"{media}-csv"
        if suffix in known:
            return known[suffix]
        if suffix == ".json":
            return _sniff_json(p)
        return _unknown(path, f"a {suffix or 'suffix-less'} file")
    if p.is_dir():
        return _sniff_folder(p)
    raise FileNotFoundError(f"--data {path}: no such file or folder")


def _sniff_folder(p: Path) -> str:
    names = [e.name for e in p.iterdir() if not e.name.startswith(".")]
    suffixes = {Path(n).suffix.lower() for n in names}
    if any(n in _HF_MARKERS for n in names):
        return "hf"
    # img2dataset writes a .parquet of urls beside its shards and folders: those come first.
    if ".tar" in suffixes:
        return "wds"
    first = _first_sample(p)
    for media in (VIDEO, AUDIO):
        if first == media.name:
            folder, classes = media.formats[2:]
            if any(media.holds(n) for n in names) or ".txt" in suffixes:
                return folder
            return folder if looks_captioned(p, media.suffixes) else classes
    if any(is_image(n) for n in names) or ".txt" in suffixes:
        return "folder"
    if any((p / n).is_dir() for n in names):
        return "folder" if looks_captioned(p) else "imagefolder"
    if ".parquet" in suffixes:
        return "hf"
    return _unknown(str(p), f"a folder with no images ({', '.join(IMAGE_SUFFIXES)}), .tar or "
                    ".parquet files")  # fmt: skip


def _has_column(p: Path, key: str) -> bool:
    """Whether a CSV/TSV header or the first JSONL object has ``key`` (``video`` /
    ``audio``, the default clip keys): a table of clips, not of images."""
    with open(p, encoding="utf-8-sig") as f:
        first = next((line for line in f if line.strip()), "")
    if p.suffix.lower() == ".jsonl":
        try:
            return key in json.loads(first)
        except (json.JSONDecodeError, TypeError):
            return False
    # The csv module reads the header line: a quoted "video" column is a video column too.
    header = next(csv.reader([first], delimiter="\t" if p.suffix.lower() == ".tsv" else ","))
    return key in [c.strip() for c in header]


def _first_sample(root: Path) -> str | None:
    """What the first image or clip below ``root`` (sorted walk, hidden skipped) is:
    ``"image"``, ``"video"``, ``"audio"`` or ``None`` (none). Stops there: cheap on a large
    tree."""
    for _, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if is_image(f):
                return "image"
            for media in (VIDEO, AUDIO):
                if media.holds(f):
                    return media.name
    return None


def _sniff_json(p: Path) -> str:
    """coco, karpathy or vqa, by the JSON's top-level keys (the whole file is parsed: the
    format's opener parses it again, a cost that is small beside reading the images)."""
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--data {p}: not a JSON file ({e})") from None
    if isinstance(data, dict):
        images = data.get("images")
        if "questions" in data:
            return "vqa"
        if isinstance(images, list) and "annotations" in data:
            return "coco"
        if isinstance(images, list) and images and "sentences" in images[0]:
            return "karpathy"
    if isinstance(data, list) and data and isinstance(data[0], dict) and "question" in data[0]:
        return "vqa"
    return _unknown(str(p), "a JSON file of neither COCO captions, a Karpathy split nor VQA")


def _unknown(path: str, what: str) -> str:
    raise ValueError(
        f"--data {path}: cannot tell its format ({what}); name it with --data-format, "
        f"one of: {', '.join(FORMATS)}"
    )


def _is_pattern(text: str) -> bool:
    return any(c in text for c in "*?[{")


def _file(path: Path, format: str) -> Path:
    if not path.is_file():
        raise ValueError(f"--data-format {format} reads a file; {path} is a folder")
    return path


def _folder(path: Path, format: str) -> Path:
    if not path.is_dir():
        raise ValueError(f"--data-format {format} reads a folder; {path} is a file")
    return path
