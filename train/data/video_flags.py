"""The data flags of the recipes that train on a user's video clips (video-vqvae), declared
once beside :mod:`train.data.flags` (whose :func:`~train.data.flags.loader_source` they
share): :func:`add_video_data_arguments`, :func:`open_video_data`, :func:`video_source`
and :func:`eval_clips`.

``--data PATH`` (a video table of :mod:`train.data.formats.videos`; without it a recipe
trains on the built-in moving shapes), ``--data-format``, ``--video-key``,
``--video-caption-key``, ``--video-label-key``, ``--csv-separator``, ``--frame-sampling``
(``uniform`` or ``stride=K``), ``--val-data``, ``--eval-clips``, ``--workers``,
``--max-bad-fraction``.

Example::

    python -m train video-vqvae --data clips/train.csv --frame-sampling stride=2 --workers 4
"""

from __future__ import annotations

import argparse

import torch

from train.data.flags import _KINDS, data_path, loader_source
from train.data.formats import open_table
from train.data.formats.videos import VIDEO
from train.data.images import BadSample
from train.data.pipeline import LoaderSource, default_workers
from train.data.videos import Sampling, VideoSamples
from train.recipes import number


def _sampling(text: str) -> str:
    """``--frame-sampling``, checked; kept as text (run.json replays the flags)."""
    try:
        Sampling.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_video_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the video data flags to a recipe's ``parser``."""
    add = parser.add_argument
    add(
        "--data", type=data_path, default=None, metavar="PATH",
        help="train on these video clips (a CSV/TSV/JSONL with a video column, a folder of "
        "clips with .txt captions, or one sub-folder per class; default: the built-in "
        "moving shapes)",
    )  # fmt: skip
    add("--data-format", choices=VIDEO.formats, default=None,
        help="the format of --data (default: from the path)")  # fmt: skip
    add("--video-key", default="video", help="CSV/JSONL clip path column (default: %(default)s)")
    add("--video-caption-key", default="caption", help="CSV/JSONL caption column "
        "(default: %(default)s)")  # fmt: skip
    add("--video-label-key", default="label", help="CSV/JSONL label column "
        "(default: %(default)s)")  # fmt: skip
    add("--csv-separator", default=None, help="CSV separator (default: from the extension)")
    add(
        "--frame-sampling", type=_sampling, default="uniform", metavar="uniform|stride=K",
        help="the frames a clip gives: spread over the whole clip, or every K-th from a "
        "start drawn per sample (default: uniform)",
    )  # fmt: skip
    add("--val-data", type=data_path, default=None, metavar="PATH",
        help="held-out clips to evaluate on, the format of --data (default: --data's first "
        "--eval-clips clips)")  # fmt: skip
    add("--eval-clips", type=number(at_least=1), default=256,
        help="clips of --val-data (or --data) evaluated (default: %(default)s)")  # fmt: skip
    add(
        "--workers", type=number(at_least=0), default=None,
        help=f"data loader processes; 0 decodes in the training process (default: "
        f"min(4, CPUs - 1) = {default_workers()} here)",
    )  # fmt: skip
    add(
        "--max-bad-fraction", type=number(float, at_least=0, at_most=1), default=0.01,
        help="stop when more than this share of the clips read are unreadable "
        "(skipped and counted below it; default: %(default)s)",
    )  # fmt: skip


def open_video_data(args: argparse.Namespace, *, recipe: str, path: str | None = None):
    """``path`` (default ``--data``) opened as a video table, or ``None`` without one; a
    table of images (or anything else) is a one-line ``ValueError`` naming the flag."""
    path = args.data if path is None else path
    if path is None:
        return None
    table = open_table(
        path, format=args.data_format, separator=args.csv_separator,
        video_key=args.video_key, video_caption_key=args.video_caption_key,
        video_label_key=args.video_label_key,
    )  # fmt: skip
    if table.kind not in VIDEO.kinds:
        raise ValueError(
            f"{path} is {_KINDS[table.kind]}: `python -m train {recipe}` trains on video "
            f"clips (--data-format one of {', '.join(VIDEO.formats)})"
        )
    return table


def video_source(
    args: argparse.Namespace, table, *, frames: int, size: int, fields=None, finish=None
) -> LoaderSource:
    """The loop's source of ``videos [batch, 3, frames, size, size]`` in ``[0, 1]`` (and
    ``fields``' fields) over ``table``, per rank and resumable; ``finish`` runs on each batch
    in the training process."""
    samples = VideoSamples(
        table,
        fields,
        frames=frames,
        size=size,
        sampling=Sampling.parse(args.frame_sampling),
        seed=args.seed,
    )
    return loader_source(args, samples, finish=finish)


def eval_clips(
    args: argparse.Namespace, table, *, recipe: str, frames: int, size: int, fields=None
) -> dict[str, torch.Tensor]:
    """``{"videos": [N, 3, frames, size, size]}`` in ``[0, 1]`` and ``fields``' fields
    ``[N, ...]``: the first ``--eval-clips`` readable clips of ``--val-data`` (else of
    ``table``, the training clips), decoded here; unreadable ones are left out."""
    if args.val_data is not None:
        table = open_video_data(args, recipe=recipe, path=args.val_data)
    sampling = Sampling.parse(args.frame_sampling)
    samples = VideoSamples(
        table, fields, frames=frames, size=size, sampling=sampling, seed=args.seed
    )
    kept = []
    for i in range(len(table)):
        if len(kept) == args.eval_clips:
            break
        try:
            kept.append(samples.sample(0, i))
        except BadSample:
            continue
    if not kept:
        raise ValueError(f"{args.val_data or args.data}: no readable clip to evaluate on")
    return {k: torch.stack([clip[k] for clip in kept]) for k in kept[0]}
