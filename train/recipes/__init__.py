"""One readable file per task. Each task exposes ``add_arguments(parser)`` and ``run(args)``:
the training recipes as a :class:`train.loop.Recipe` (``RECIPE``: a family, defaults, data
and evaluation; the loop declares their shared flags once, :mod:`train.loop.flags`), the
other tasks (``generate``, ``zeroshot``, ``serve``, ``plan``) as modules.

Here live the ``type=`` checks that refuse a bad flag value while the command line is
parsed, before any work: :func:`number` (finite, in range), :func:`device_name` (a device
this build and machine have), :func:`out_dir` (not a file) and :func:`existing_file`.
"""

from __future__ import annotations

import argparse
import math
import operator
from collections.abc import Callable
from pathlib import Path

import torch


def number(
    kind: type = int,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
) -> Callable[[str], int | float]:
    """An argparse ``type=`` for a finite ``int`` or ``float`` within bounds.

    Example: ``parser.add_argument("--lr", type=number(float, above=0))`` refuses
    ``--lr nan``, ``--lr inf`` and ``--lr 0`` with "--lr must be > 0, got '0'".
    """
    checks = [
        (symbol, holds, bound)
        for symbol, holds, bound in (
            (">=", operator.ge, at_least),
            (">", operator.gt, above),
            ("<=", operator.le, at_most),
            ("<", operator.lt, below),
        )
        if bound is not None
    ]
    wanted = " and ".join(f"{symbol} {bound}" for symbol, _, bound in checks)

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if not all(holds(value, bound) for _, holds, bound in checks):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    return parse


def device_name(text: str) -> str:
    """An argparse ``type=`` for ``--device``: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, and
    only one this torch build and machine have."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device: use cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise argparse.ArgumentTypeError(
                f"{text!r} is not available: torch {torch.__version__} was built without "
                "CUDA (use cpu)"
            )
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not available: no CUDA device is visible"
            )
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not available: this machine has {count} CUDA device(s)"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} is not available on this machine")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: the recipes run on cpu, cuda or mps")
    return text


def out_dir(text: str) -> Path:
    """An argparse ``type=`` for a run directory to write: refused when it, or a folder it
    would be made in, is a file."""
    path = Path(text)
    for existing in (path, *path.parents):
        if existing.exists():
            if existing.is_dir():
                break
            if existing == path:
                raise argparse.ArgumentTypeError(f"{text!r} is a file, not a run directory")
            raise argparse.ArgumentTypeError(f"{text!r} cannot be made: {existing} is a file")
    return path


def existing_file(text: str) -> Path:
    """An argparse ``type=`` for a file to read: it must exist and be a file."""
    path = Path(text)
    if not path.is_file():
        why = "is a directory" if path.is_dir() else "does not exist"
        raise argparse.ArgumentTypeError(f"{text!r} {why}")
    return path


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--device``, checked by :func:`device_name`."""
    parser.add_argument(
        "--device", type=device_name, default=None, help="cpu or cuda (default: cuda if available)"
    )


def device_of(args: argparse.Namespace) -> torch.device:
    """``--device``, or CUDA when available, else the CPU. A ``--device`` no parser checked
    (a recipe's own flag) is checked here, before any work."""
    if args.device is not None:
        try:
            device_name(args.device)
        except argparse.ArgumentTypeError as e:
            raise SystemExit(f"--device {e}") from None
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
