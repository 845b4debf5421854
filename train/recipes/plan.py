"""``python -m train plan``: per-rank training memory of a model too large for this machine.

::

    python -m train plan --model flava_10b --world-size 8 64 --batch 8
    python -m train plan --model gpt2_medium --world-size 1 8 --seq 512 --precision fp32

builds the model on the meta device (no memory) and prints its parameter count and, per
world size, the GiB per rank for params, gradients and AdamW state under DDP and FSDP, and
for activations with and without per-block checkpointing. The memory model and its
assumptions are in :mod:`train.plan` and printed under the table.
"""

from __future__ import annotations

import argparse

from train import plan as planning
from train.recipes import number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="a preset of a family with a plan layout "
        "(gpt2_small, clip_vit_l14, flava_10b, ...; see `python -m train plan --help`)",
    )  # fmt: skip
    parser.add_argument(
        "--world-size",
        type=number(at_least=1),
        nargs="+",
        default=[1, 8],
        help="ranks, one or more (default 1 8)",
    )
    parser.add_argument(
        "--batch", type=number(at_least=1), default=8, help="examples per rank (default 8)"
    )
    parser.add_argument(
        "--seq", type=number(at_least=1), default=None, help="tokens per example (text tokens for CLIP/FLAVA); "
        "default: the model's context",
    )  # fmt: skip
    parser.add_argument(
        "--precision", default="bf16-mixed", help=f"one of {sorted(planning.PRECISIONS)}"
    )


def run(args: argparse.Namespace) -> planning.Plan:
    result = planning.plan(
        args.model,
        world_sizes=args.world_size,
        batch=args.batch,
        seq=args.seq,
        precision=args.precision,
    )
    print(planning.format_plan(result))
    return result
