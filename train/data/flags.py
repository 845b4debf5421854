"""The data flags of the recipes that train on a user's table (clip, flava, albef), declared
once: :func:`add_data_arguments` adds them, :func:`open_data` opens ``--data`` (before any
directory is made), :func:`loader_source` builds the loop's source over it.

``--data PATH`` (any format of :mod:`train.data.formats`; without it a recipe trains on the
built-in shapes world), ``--data-format``, ``--csv-img-key``, ``--csv-caption-key``,
``--csv-separator``, ``--image-column``, ``--text-column``, ``--image-root``, ``--split``,
``--vqa-annotations``, ``--workers``, ``--max-bad-fraction``, ``--vocab-size``.

Example::

    python -m train clip --data photos/train.csv --csv-caption-key caption --workers 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from train.data.formats import FORMATS, open_table
from train.data.pipeline import LoaderSource, Samples, default_workers
from train.data.tokenizers.bpe import DEFAULT_VOCAB
from train.recipes import number

_KINDS = {
    "pairs": "image-caption pairs",
    "classes": "an ImageFolder of classes (no captions)",
    "vqa": "VQA questions and answers",
    "video-pairs": "video clips with captions",
    "video-classes": "video clips with labels",
    "videos": "video clips (no captions or labels)",
    "audio-pairs": "audio clips with captions",
    "audio-classes": "audio clips with labels",
    "audio": "audio clips (no captions or labels)",
}
_PATTERN = "*?[{"


def data_path(text: str) -> str:
    """An argparse ``type=`` for ``--data``: a file or folder that exists, or a glob / brace
    pattern (``shards/{000000..000099}.tar``, checked when it is opened)."""
    if not any(c in text for c in _PATTERN) and not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text!r}: no such file or folder")
    return text


def add_data_arguments(parser: argparse.ArgumentParser, *, wants: tuple = ("pairs",)) -> None:
    """Add the data flags to a recipe's ``parser``; ``wants``: the table kinds it trains on
    (for the help)."""
    add = parser.add_argument
    kinds = " or ".join(_KINDS[k] for k in wants)
    add(
        "--data", type=data_path, default=None, metavar="PATH",
        help=f"train on this dataset ({kinds}: a CSV/TSV/JSONL, a caption folder, "
        "webdataset shards, a datasets folder or parquet, COCO/Karpathy/VQA JSON; default: "
        "the built-in shapes world)",
    )  # fmt: skip
    add("--data-format", choices=FORMATS, default=None, help="the format of --data "
        "(default: from the path)")  # fmt: skip
    add("--csv-img-key", default="filepath", help="CSV/JSONL image path column "
        "(default: %(default)s)")  # fmt: skip
    add("--csv-caption-key", default="title", help="CSV/JSONL caption column "
        "(default: %(default)s)")  # fmt: skip
    add("--csv-separator", default=None, help="CSV separator (default: from the extension)")
    add("--image-column", default="image", help="datasets/parquet image column "
        "(default: %(default)s)")  # fmt: skip
    add("--text-column", default="text", help="datasets/parquet text column "
        "(default: %(default)s)")  # fmt: skip
    add("--image-root", type=Path, default=None, help="where COCO/Karpathy/VQA images lie")
    add("--split", default=None, help="Karpathy split (train|val|test) or datasets split")
    add("--vqa-annotations", type=Path, default=None, help="VQA-v2 annotations JSON "
        "(default: found beside the questions file)")  # fmt: skip
    add(
        "--workers", type=number(at_least=0), default=None,
        help=f"data loader processes; 0 decodes in the training process (default: "
        f"min(4, CPUs - 1) = {default_workers()} here)",
    )  # fmt: skip
    add(
        "--max-bad-fraction", type=number(float, at_least=0, at_most=1), default=0.01,
        help="stop when more than this share of the samples read are unreadable or "
        "uncaptioned (skipped and counted below it; default: %(default)s)",
    )  # fmt: skip
    add(
        "--vocab-size", type=number(at_least=260), default=DEFAULT_VOCAB,
        help="most ids of the BPE tokenizer trained on --data's captions (from scratch; "
        "default: %(default)s)",
    )  # fmt: skip


def open_data(args: argparse.Namespace, *, wants: str, recipe: str):
    """``--data`` opened as a :class:`train.data.formats.Table` of kind ``wants`` (one-line
    ``ValueError`` otherwise, naming the flag), or ``None`` without ``--data``."""
    if args.data is None:
        return None
    table = open_table(
        args.data,
        format=args.data_format,
        img_key=args.csv_img_key,
        caption_key=args.csv_caption_key,
        separator=args.csv_separator,
        image_column=args.image_column,
        text_column=args.text_column,
        image_root=args.image_root,
        split=args.split,
        annotations=args.vqa_annotations,
    )
    if table.kind != wants:
        raise ValueError(
            f"--data {args.data} is {_KINDS[table.kind]}: `python -m train {recipe}` trains "
            f"on {_KINDS[wants]}"
        )
    return table


def loader_source(args: argparse.Namespace, samples: Samples, *, finish=None) -> LoaderSource:
    """The loop's source over ``samples`` with the flags (``--batch-size``, ``--seed``,
    ``--workers``, ``--max-bad-fraction``), this process's rank of the job."""
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return LoaderSource(
        samples,
        batch_size=args.batch_size,
        seed=args.seed,
        workers=args.workers,
        rank=rank,
        world_size=world,
        max_bad_fraction=args.max_bad_fraction,
        finish=finish,
        where=f"--data {args.data}",
    )
