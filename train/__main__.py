"""``python -m train [--debug] <task> [options]``: the command line of fmm's recipes.

A user's mistake is answered with one line on stderr, ``python -m train <task>: error:
<what, naming the flag or path>``, and exit status 2, without a traceback. User errors are:

- a flag argparse refuses: unknown, missing, a bad choice, or a value a recipe's ``type=``
  check refuses (not finite, out of range, a ``--device`` this build lacks, an ``--out``
  that is a file, a missing input file);
- a recipe's own refusal, ``SystemExit`` with a message (``--resume`` with no checkpoint);
- ``ValueError`` and its subclasses, which our code raises for a bad value the user handed
  over (``CheckpointError`` for runs, ``ConversionError`` for weights, ``plan``'s unknown
  model, a JSON file that does not parse);
- ``OSError`` and its subclasses: a path that is missing, a folder where a file should be,
  a file that is not an image, a port in use, a full disk.

Anything else (``TypeError``, ``KeyError``, ``RuntimeError``, ``AssertionError``, ...) is a
bug of ours: it prints its traceback and exits with status 1. ``--debug`` (before the task)
or ``FMM_DEBUG=1`` prints the traceback of user errors too. A message that is a list (a
checkpoint's missing keys) keeps its lines.

:func:`main` runs a command line without this handling, for programs and tests: errors are
raised as they are (an argparse refusal as :class:`UsageError`, a ``SystemExit(2)`` that
carries its message).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback

from train.loop import Recipe, config_defaults
from train.recipes import albef as albef_recipe
from train.recipes import blip2 as blip2_recipe
from train.recipes import clap, clip, coca, export_shapes, generate, mmgpt, serve, vqvae, zeroshot
from train.recipes import data2vec as data2vec_recipe
from train.recipes import diffusion as diffusion_recipe
from train.recipes import evaluate as evaluate_recipe
from train.recipes import flava as flava_recipe
from train.recipes import mae as mae_recipe
from train.recipes import mdetr as mdetr_recipe
from train.recipes import omnivore as omnivore_recipe
from train.recipes import plan as plan_recipe
from train.recipes import videogpt as videogpt_recipe

TASKS = {
    "clip": (clip.RECIPE, clip.RECIPE.help),
    "vqvae": (vqvae.RECIPE, vqvae.RECIPE.help),
    "mmgpt": (mmgpt.RECIPE, mmgpt.RECIPE.help),
    "generate": (generate, "draw images for a caption with a trained mmgpt run, scored by CLIP"),
    "zeroshot": (zeroshot, "rank labels for your images with pretrained CLIP weights"),
    "flava": (flava_recipe.RECIPE, flava_recipe.RECIPE.help),
    "serve": (serve, "serve a clip or mmgpt run over HTTP: embeddings, search, generation"),
    "plan": (plan_recipe, "per-rank memory of training a model under DDP and FSDP (meta device)"),
    "albef": (albef_recipe.RECIPE, albef_recipe.RECIPE.help),
    "evaluate": (evaluate_recipe, "recall and zero-shot of a run or weights on your data"),
    "export-shapes": (export_shapes, "write shapes-world scenes as a csv/folder/wds/hf dataset"),
    "omnivore": (omnivore_recipe.RECIPE, omnivore_recipe.RECIPE.help),
    "video-vqvae": (videogpt_recipe.VQVAE_RECIPE, videogpt_recipe.VQVAE_RECIPE.help),
    "videogpt": (videogpt_recipe.RECIPE, videogpt_recipe.RECIPE.help),
    "mae": (mae_recipe.RECIPE, mae_recipe.RECIPE.help),
    "clap": (clap.RECIPE, clap.RECIPE.help),
    "data2vec": (data2vec_recipe.RECIPE, data2vec_recipe.RECIPE.help),
    "mdetr": (mdetr_recipe.RECIPE, mdetr_recipe.RECIPE.help),
    "diffusion": (diffusion_recipe.RECIPE, diffusion_recipe.RECIPE.help),
    "blip2": (blip2_recipe.RECIPE, blip2_recipe.RECIPE.help),
    "coca": (coca.RECIPE, coca.RECIPE.help),
}
USER_ERRORS = (ValueError, OSError)


class UsageError(SystemExit):
    """A command line argparse refused: exit status 2; the message is already on stderr."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


class _Parser(argparse.ArgumentParser):
    """Refusals in one line, naming the flag: ``... error: --lr must be > 0, got '0'``."""

    def error(self, message: str) -> None:
        message = re.sub(r"^argument ([^:]+): ", r"\1 ", message)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise UsageError(message)


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; a training recipe's ``--config FILE`` becomes its flags' defaults
    (checked against them), so the flags on the command line override the file."""
    parser = _Parser(prog="python -m train", description="fmm training recipes")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of user errors too (as FMM_DEBUG=1 does)",
    )
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    tasks = {}
    for name, (recipe, help_text) in TASKS.items():
        tasks[name] = sub.add_parser(name, help=help_text, description=help_text)
        recipe.add_arguments(tasks[name])
    args = parser.parse_args(argv)
    if isinstance(TASKS[args.task][0], Recipe) and args.config is not None:
        task = tasks[args.task]
        try:
            task.set_defaults(**config_defaults(task, args.config, recipe=args.task))
        except ValueError as e:
            task.error(str(e))
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command line; errors are raised, not answered (see :func:`cli`)."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    TASKS[args.task][0].run(args)
    return 0


def _user_message(error: BaseException) -> str | None:
    """The one-line answer to a user error, or ``None`` for a bug (or a plain exit)."""
    if isinstance(error, UsageError):
        return None  # argparse's line is printed already
    if isinstance(error, SystemExit):
        return None if error.code is None or isinstance(error.code, int) else str(error.code)
    if isinstance(error, USER_ERRORS):
        return str(error) or type(error).__name__
    return None


def cli(argv: list[str] | None = None) -> int:
    """``python -m train``: :func:`main`, with user errors answered in one line (status 2)."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)  # a refused flag exits 2 here, its line printed
    debug = args.debug or os.environ.get("FMM_DEBUG", "") not in ("", "0")
    try:
        TASKS[args.task][0].run(args)
    except (Exception, SystemExit) as error:
        message = _user_message(error)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"python -m train {args.task}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
