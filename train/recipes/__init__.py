"""One readable file per task. Each recipe exposes ``add_arguments(parser)`` and ``run(args)``.

The flags every training recipe shares (``--device``, ``--compile``, ``--out``'s default)
live here, so that they mean the same in every recipe.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def add_device_arguments(parser: argparse.ArgumentParser, *, compile_note: str = "") -> None:
    """Add ``--compile/--no-compile`` and ``--device`` to a recipe's parser."""
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"torch.compile the train step (default: on with CUDA, off on CPU{compile_note})",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def device_of(args: argparse.Namespace) -> torch.device:
    """``--device``, or CUDA when available, else the CPU."""
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def wants_compile(args: argparse.Namespace, device: torch.device) -> bool:
    """``--compile`` if given; otherwise compile on CUDA only (on CPU it gains ~nothing)."""
    return device.type == "cuda" if args.compile is None else args.compile


def run_dir(args: argparse.Namespace, name: str) -> Path:
    """``--out``, or ``runs/<name>-<date>-<time>``; created if missing."""
    out = args.out or Path("runs") / time.strftime(f"{name}-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    return out
