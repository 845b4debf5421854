"""Image paths and captions listed in a file, open_clip's convention: CSV / TSV (a header
row, then one sample per row) and JSONL (one JSON object per line).

::

    filepath,title                       {"filepath": "images/dog.jpg", "title": "a dog"}
    images/dog.jpg,a dog on the grass    {"filepath": "images/cat.jpg", "title": ["a cat", "my cat"]}

Relative paths resolve against the file's folder; a row may repeat another row's image (a
second caption). A JSONL caption may also be a list of strings.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from train.data.formats.table import FileImages, clean_texts, missing_key

_SEPARATORS = {".csv": ",", ".tsv": "\t"}


class Rows(FileImages):
    """Pairs from a CSV/TSV/JSONL file: ``paths[i]`` as written, ``captions[i]`` a tuple."""

    def __init__(self, *, format: str, source: Path, paths: list[str], captions: list[tuple]):
        super().__init__(format=format, source=source, root=source.parent, paths=paths)
        self.captions = captions

    def texts(self, i: int) -> tuple[str, ...]:
        return self.captions[i]


def read_rows(
    path: Path, *, format: str, required: dict[str, str | None], separator: str | None = None
) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` for each row of a CSV/TSV (``format`` ``csv`` / ``tsv``,
    ``separator`` overriding the extension's) or JSONL file, ``where`` naming the file and
    line. ``required``: key -> the flag that names it; a row (a CSV's header) without one
    is a ``ValueError`` naming both. Any format of rows of paths reads them so (images
    here, video and audio clips in their formats)."""
    if format.endswith("jsonl"):
        yield from _json_lines(path, required)
        return
    if separator is None:
        separator = _SEPARATORS.get(path.suffix.lower(), "\t" if format.endswith("tsv") else ",")
    if len(separator) != 1:
        raise ValueError(f"--csv-separator must be one character, got {separator!r}")
    # utf-8-sig: a spreadsheet's byte-order mark must not become part of the first column.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=separator)
        columns = reader.fieldnames or []
        for key, flag in required.items():
            if key not in columns:
                hint = "" if len(columns) > 1 else f" (is --csv-separator {separator!r} right?)"
                raise ValueError(str(missing_key(key, flag, path, columns)) + hint)
        for row in reader:
            yield f"{path} line {reader.line_num}", row


def _json_lines(path: Path, required: dict[str, str | None]) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key, flag in required.items():
                if key not in row:
                    raise missing_key(key, flag, where, list(row))
            yield where, row


def open_csv(
    path: Path, *, format: str, img_key: str, caption_key: str, separator: str | None
) -> Rows:
    """A CSV (``,``) or TSV (tab) file; ``separator`` overrides the one its extension says."""
    return _open_rows(path, format, img_key, caption_key, separator)


def open_jsonl(path: Path, *, img_key: str, caption_key: str) -> Rows:
    """A JSONL file: one object per line with ``img_key`` and ``caption_key``."""
    return _open_rows(path, "jsonl", img_key, caption_key, None)


def _open_rows(path: Path, format: str, img_key: str, caption_key: str, separator) -> Rows:
    paths, captions = [], []
    required = {img_key: "--csv-img-key", caption_key: "--csv-caption-key"}
    for where, row in read_rows(path, format=format, required=required, separator=separator):
        image = row[img_key]
        if not isinstance(image, str) or not image:
            raise ValueError(f"{where}: {img_key!r} (--csv-img-key) must be a path, got {image!r}")
        paths.append(image)
        captions.append(clean_texts(row[caption_key], where=where))
    return Rows(format=format, source=path, paths=paths, captions=captions)
