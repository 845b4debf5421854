"""The flags every training recipe shares, declared once, and ``--config`` replays.

:func:`add_train_arguments` adds ``--out --overwrite --steps --batch-size --lr
--weight-decay --warmup --seed --device --compile --dist --ac --precision
--checkpoint-every --resume --config --log``; a recipe passes only its
:class:`Defaults` and adds its own extras. Each means the same in every recipe.

A run saves the exact flags it ran with in ``run.json`` (:func:`resolved`), and
``--config FILE`` (JSON, or YAML by the ``.yaml``/``.yml`` suffix) replays them:
:func:`config_defaults` checks every key and value against the recipe's own flags (a key
the recipe does not know is a one-line error) and makes them the parser's defaults, so
flags on the command line still override the file.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.distributed import MODES, PRECISIONS
from train.recipes import add_device_argument, number, out_dir

RUN_FILE = "run.json"
LOGGERS = ("tensorboard",)
# Flags about this invocation, not about what is trained: a replay decides them anew.
_LAUNCH_ONLY = ("config", "resume", "overwrite")
_NOT_FLAGS = ("help", "task", "debug")


@dataclass(frozen=True)
class Defaults:
    """A recipe's defaults for the shared flags. ``min_batch_size``: the smallest batch its
    objective accepts (a contrastive loss needs 2). ``steps`` or ``batch_size`` ``None``:
    the recipe's ``resolve`` sets them from other flags, as ``depends`` says in ``--help``."""

    steps: int | None
    batch_size: int | None
    lr: float
    weight_decay: float
    warmup: int
    min_batch_size: int = 1
    depends: str = ""


def add_train_arguments(parser: argparse.ArgumentParser, defaults: Defaults, *, name: str) -> None:
    """Add the shared training flags to a recipe's ``parser`` with the recipe's defaults."""
    d = defaults
    add = parser.add_argument
    shown = lambda value: "%(default)s" if value is not None else d.depends
    add("--out", type=out_dir, default=None, help=f"run directory (default: runs/{name}-<time>)")
    add(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (without it, an existing run is refused)",
    )
    add(
        "--steps",
        type=number(at_least=1),
        default=d.steps,
        help=f"optimizer steps (default: {shown(d.steps)})",
    )
    add(
        "--batch-size",
        type=number(at_least=d.min_batch_size),
        default=d.batch_size,
        help=f"examples per step over all processes (default: {shown(d.batch_size)})",
    )
    add(
        "--lr",
        type=number(float, above=0),
        default=d.lr,
        help="peak AdamW learning rate (default: %(default)s)",
    )
    add(
        "--weight-decay",
        type=number(float, at_least=0),
        default=d.weight_decay,
        help="AdamW decoupled weight decay (default: %(default)s)",
    )
    add(
        "--warmup",
        type=number(at_least=0),
        default=d.warmup,
        help="linear warmup steps before the cosine decay (default: %(default)s)",
    )
    add(
        "--seed",
        type=number(at_least=0),
        default=0,
        help="seed for init, the data stream and the step keys (default: %(default)s)",
    )
    add_device_argument(parser)
    add(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the pure train step (default: on with CUDA, off on CPU)",
    )
    add(
        "--dist",
        choices=MODES,
        default=None,
        help="data parallel over torchrun processes: ddp, or fsdp (FSDP2, params sharded)",
    )
    add("--ac", action="store_true", help="activation checkpointing per transformer block")
    add(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32, or bf16-mixed (bf16 compute, fp32 params and grad reduction)",
    )
    add(
        "--checkpoint-every",
        type=number(at_least=0),
        default=0,
        help="save the whole train state to OUT/checkpoints every N steps and at the end "
        "(default: off)",
    )
    add(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in OUT/checkpoints, bit for bit",
    )
    add(
        "--config",
        type=Path,
        default=None,
        help="replay a run.json (or any JSON/YAML file of these flags); flags given here win",
    )
    add(
        "--eval-every",
        type=number(at_least=0),
        default=0,
        help="evaluate every N steps where the recipe can (--val-data, --zeroshot-data), "
        "into metrics.jsonl (default: off)",
    )
    add(
        "--log",
        choices=LOGGERS,
        default=None,
        help="also log metrics to TensorBoard (OUT/tensorboard; needs the tensorboard package)",
    )


def _read(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror or e}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml  # pyyaml: safe_load builds plain data only, never objects

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path}: not YAML: {str(e).splitlines()[0]}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {path}: not JSON ({e}); name YAML files .yaml") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flags, got {type(data).__name__}")
    return data


def _value(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    flag = action.option_strings[-1] if action.option_strings else key
    if action.nargs == 0:  # store_true / --x/--no-x
        if not isinstance(value, bool) and value is not None:
            raise ValueError(f"{where}: {key} ({flag}) must be true or false, got {value!r}")
        return value
    if value is None:
        return None
    if isinstance(action, argparse._AppendAction) and isinstance(value, list):  # repeatable
        return [_value(action, key, item, where) for item in value]
    if isinstance(value, (dict, list, bool)):
        raise ValueError(f"{where}: {key} ({flag}) takes one value, got {value!r}")
    if action.type is not None:
        try:
            value = action.type(str(value))
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{where}: {key} ({flag}) {e}") from None
    if action.choices is not None and value not in action.choices:
        choices = list(action.choices)
        raise ValueError(f"{where}: {key} ({flag}) must be one of {choices}, got {value!r}")
    return value


def config_defaults(parser: argparse.ArgumentParser, path: Path, *, recipe: str) -> dict:
    """The flags of ``path`` (a ``run.json`` or a JSON/YAML mapping of flag names, dashes or
    underscores) checked against ``parser``'s own, as values for ``parser.set_defaults``.

    A key the recipe does not know, a value its flag refuses, or another recipe's
    ``run.json`` is a ``ValueError`` naming the file and the key.
    """
    where = f"--config {path}"
    data = _read(path)
    saved = data.pop("recipe", recipe)
    if saved != recipe:
        raise ValueError(f"{where} is a run of the {saved!r} recipe, not {recipe!r}")
    actions = {a.dest: a for a in parser._actions if a.dest not in _NOT_FLAGS}
    values = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions or dest == "config":
            known = ", ".join(sorted(d for d in actions if d != "config"))
            raise ValueError(
                f"{where}: unknown key {key!r} for `python -m train {recipe}` (known: {known})"
            )
        values[dest] = _value(actions[dest], str(key), value, where)
    return values


def resolved(args: argparse.Namespace, *, recipe: str) -> dict:
    """What ``run.json`` records: every flag as this run resolved it (paths as text),
    except those that say how to launch (``--config``, ``--resume``, ``--overwrite``)."""
    out: dict[str, Any] = {"recipe": recipe}
    for dest, value in sorted(vars(args).items()):
        if dest not in _NOT_FLAGS and dest not in _LAUNCH_ONLY:
            out[dest] = str(value) if isinstance(value, Path) else value
    return out
