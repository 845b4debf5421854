"""Single-process checkpoints: params as safetensors plus a JSON config, written atomically.

A run directory holds ``params.safetensors`` (dotted names, as ``fmm.tree.flatten``) and
``config.json``. Every file is written to a temporary name in the same folder, flushed and
renamed over the old one, so a crash mid-save leaves the previous checkpoint loadable.

Example::

    save(run_dir, params, config={"model": "clip", "clip": cfg.to_dict()})
    params, config = load(run_dir)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fmm import tree

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not match what the caller expects."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` over ``path`` (same folder, fsynced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_params(path: str | os.PathLike, params: Any) -> None:
    """Write a param tree to one safetensors file, atomically."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tree.flatten(params).items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata={"format": "fmm"}))


def _describe(flat: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: (tuple(v.shape), v.dtype) for k, v in flat.items()}


def check_matches(flat: dict[str, torch.Tensor], like: Any, *, source: str = "checkpoint") -> None:
    """Raise one :class:`CheckpointError` listing every missing, unexpected and mis-shaped key
    of ``flat`` against the tree ``like``."""
    want, got = _describe(tree.flatten(like)), _describe(flat)
    missing = sorted(want.keys() - got.keys())
    unexpected = sorted(got.keys() - want.keys())
    mismatched = [
        f"{k}: expected {list(want[k][0])} {want[k][1]}, got {list(got[k][0])} {got[k][1]}"
        for k in want.keys() & got.keys()
        if want[k] != got[k]
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the expected params:"]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  mismatched {m}" for m in sorted(mismatched)]
        raise CheckpointError("\n".join(lines))


def load_params(path: str | os.PathLike, *, like: Any = None) -> Any:
    """Read a param tree. With ``like`` (a tree of the expected shapes, e.g. from ``init`` on
    the meta device), every key, shape and dtype is checked before anything is returned."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no params file at {path}")
    try:
        flat = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt params file {path}: {e}") from e
    if like is not None:
        check_matches(flat, like, source=str(path))
    return tree.unflatten(flat)


def save(run_dir: str | os.PathLike, params: Any, *, config: dict) -> None:
    """Save ``params`` and a JSON-ready ``config`` into ``run_dir`` (each file atomically)."""
    run_dir = Path(run_dir)
    save_params(run_dir / PARAMS_FILE, params)
    write_json(run_dir / CONFIG_FILE, config)


def load_config(run_dir: str | os.PathLike) -> dict:
    """The ``config.json`` of a run directory."""
    config_path = Path(run_dir) / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in {run_dir}: not a saved run")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupt {config_path}: {e}") from e


def load(run_dir: str | os.PathLike, *, like: Any = None) -> tuple[Any, dict]:
    """``(params, config)`` from a run directory written by :func:`save`."""
    config = load_config(run_dir)
    return load_params(Path(run_dir) / PARAMS_FILE, like=like), config
