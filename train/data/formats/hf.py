"""Hugging Face ``datasets``: a folder written by ``save_to_disk``, or Parquet files.

The image column (``--image-column``) may be an ``Image`` feature, a ``{"bytes", "path"}``
struct (what an ``Image`` feature stores), raw bytes or a path string (relative paths
against the dataset's folder); the text column (``--text-column``) a string or a list of
strings. Rows are read from the memory-mapped Arrow files, by index: the table pickles as
the files' paths, so DataLoader workers map the same files rather than copy them.
Parquet files are converted to Arrow once by ``datasets`` (into its cache), as
``load_dataset("parquet", ...)`` does.
"""

from __future__ import annotations

import glob
from pathlib import Path

from train.data.formats.table import Table, clean_texts, missing_key, require

_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class HFTable(Table):
    """``hf``: one row a sample; ``where(i)`` is ``row i``."""

    format = "hf"

    def __init__(self, source: str, *, image_column: str, text_column: str, split: str | None):
        datasets = require("datasets", format="hf")
        self.source = source
        dataset, self.root = _load(datasets, source, split)
        for column, flag in ((image_column, "--image-column"), (text_column, "--text-column")):
            if column not in dataset.column_names:
                raise missing_key(column, flag, source, dataset.column_names)
        if isinstance(dataset.features[image_column], datasets.Image):
            # The encoded bytes, not a decoded PIL image: decoding is train.data.images'.
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        if len(dataset) == 0:
            raise ValueError(f"{source}: no samples (an empty dataset)")
        self.images = dataset.select_columns([image_column])
        self.captions = dataset.select_columns([text_column])
        self.image_column, self.text_column = image_column, text_column

    def __len__(self) -> int:
        return len(self.images)

    def image_bytes(self, i: int) -> bytes:
        value = self.images[i][self.image_column]
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            value = value.get("path")
        if isinstance(value, bytes):
            return value
        if isinstance(value, str) and value:
            return Path(self.root, value).read_bytes()
        raise ValueError(f"row {i}: {self.image_column!r} holds no image ({value!r})")

    def texts(self, i: int) -> tuple[str, ...]:
        return clean_texts(self.captions[i][self.text_column], where=f"{self.source} row {i}")

    def where(self, i: int) -> str:
        return f"row {i}"


def _load(datasets, source: str, split: str | None):
    """(Dataset, the folder relative image paths resolve against)."""
    p = Path(source)
    if p.is_dir() and any((p / m).is_file() for m in _MARKERS):
        loaded = datasets.load_from_disk(str(p))
        return _split(loaded, source, split), p
    if p.is_dir():
        files = sorted(str(f) for f in p.glob("*.parquet"))
        root = p
    else:
        files = sorted(glob.glob(source)) if not p.is_file() else [source]
        root = Path(files[0]).parent if files else p.parent
    if not files or not all(f.endswith(".parquet") for f in files):
        raise ValueError(
            f"--data {source}: --data-format hf reads a save_to_disk folder "
            f"({' or '.join(_MARKERS)} inside) or .parquet files; found none"
        )
    loaded = datasets.load_dataset("parquet", data_files=files, split="train")
    return loaded, root


def _split(loaded, source: str, split: str | None):
    if not hasattr(loaded, "keys"):  # a Dataset, not a DatasetDict
        return loaded
    splits = list(loaded.keys())
    if split is None and len(splits) == 1:
        split = splits[0]
    if split not in splits:
        given = "" if split is None else f" {split!r} is not one of them;"
        raise ValueError(f"{source} has splits {', '.join(splits)}:{given} choose one with --split")
    return loaded[split]
