"""Checkpoints, written atomically: a crash mid-save leaves the previous one loadable.

Single process: a run directory holds ``params.safetensors`` (dotted names, as
``fmm.tree.flatten``) and ``config.json``. Every file is written to a temporary name in the
same folder, flushed and renamed over the old one.

Example::

    save(run_dir, params, config={"model": "clip", "clip": cfg.to_dict()})
    params, config = load(run_dir)

Sharded (any number of processes): :func:`save_sharded` writes a whole train state (params,
optimizer state, step, RNG keys, data-loader position; ``DTensor`` shards or plain
tensors) with ``torch.distributed.checkpoint`` into ``<root>/step_<n>/``, through a
temporary folder renamed into place, then points ``<root>/latest`` at it. A resumed run
continues bit for bit, and a checkpoint saved at one world size loads at another (DCP
reshards ``DTensor``s; plain tensors are taken as replicated). See ``train/sharded.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fmm import tree
from fmm.io import atomic_write

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
LATEST_FILE = "latest"
EXTRA_FILE = "extra.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not match what the caller expects."""


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


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier() -> None:
    if (d := _dist()) is not None:
        d.barrier()


def _is_main() -> bool:
    d = _dist()
    return d is None or d.get_rank() == 0


@contextlib.contextmanager
def _single_process_ok():
    # Without a process group DCP warns that it assumes one process: that is the intent here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _flat_state(state: Any) -> dict[str, torch.Tensor]:
    flat = tree.flatten(state)
    bad = [k for k, v in flat.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"state leaves must be tensors; not tensors: {', '.join(bad)}")
    # Views share storage, so DCP's in-place load writes into the caller's tensors (and never
    # into a leaf that requires grad).
    return {k: v.detach() for k, v in flat.items()}


def save_sharded(
    root: str | os.PathLike, step: int, state: Any, *, extra: dict | None = None, keep: int = 2
) -> Path:
    """Save a train state (a tree of tensors, ``DTensor`` shards included) as step ``step``.

    Every rank calls it. Written into ``<root>/.tmp-step_<n>``, renamed to
    ``<root>/step_<n>`` and then ``<root>/latest`` is rewritten atomically, so a crash at any
    point leaves the previous checkpoint as the latest. ``extra``: JSON-ready data saved by
    rank 0 (e.g. the loss history). ``keep``: how many step folders to keep (oldest go).
    Returns the step folder.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    final, tmp = _step_dir(root, step), root / f".tmp-step_{step:08d}"
    flat = _flat_state(state)
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that crashed
        tmp.mkdir(parents=True)
    _barrier()
    with _single_process_ok():
        dcp.save(flat, checkpoint_id=tmp)
    if _is_main():
        write_json(tmp / EXTRA_FILE, {"step": step, **(extra or {})})
        if final.exists():  # re-saving a step: move the old one aside, never delete it first
            old = root / f".old-step_{step:08d}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        write_json(root / LATEST_FILE, {"step": step, "dir": final.name})
        steps = sorted(root.glob("step_*"))
        for stale in steps[: max(0, len(steps) - keep)]:
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def latest_step(root: str | os.PathLike) -> int | None:
    """The step of ``<root>/latest``, or ``None`` when no checkpoint was completed there."""
    pointer = Path(root) / LATEST_FILE
    if not pointer.is_file():
        return None
    try:
        return int(json.loads(pointer.read_text())["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint pointer {pointer}: {e}") from e


def _check_sharded(folder: Path, flat: dict[str, torch.Tensor]) -> None:
    """One error listing every missing, unexpected and mis-shaped key, before loading."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        saved = FileSystemReader(folder).read_metadata().state_dict_metadata
    except (OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"corrupt checkpoint {folder}: {e}") from e
    missing = sorted(flat.keys() - saved.keys())
    unexpected = sorted(saved.keys() - flat.keys())
    mismatched = [
        f"{k}: expected {list(flat[k].shape)}, got {list(saved[k].size)}"
        for k in sorted(flat.keys() & saved.keys())
        if isinstance(saved[k], TensorStorageMetadata) and tuple(saved[k].size) != flat[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {folder} does not match the expected state:"]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  mismatched {m}" for m in mismatched]
        raise CheckpointError("\n".join(lines))


def load_sharded(
    root: str | os.PathLike, state: Any, *, step: int | None = None
) -> tuple[int, dict]:
    """Fill ``state``'s tensors in place from the latest checkpoint (or ``step``) in ``root``.

    ``state``: a tree shaped like the saved one (e.g. a freshly initialised train state),
    with ``DTensor`` shards at any world size or plain tensors. Every rank calls it.
    Returns ``(step, extra)``. Missing or mismatched keys raise :class:`CheckpointError`.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    root = Path(root)
    step = latest_step(root) if step is None else step
    if step is None:
        raise CheckpointError(f"no completed checkpoint in {root} (no {LATEST_FILE} file)")
    folder = _step_dir(root, step)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} is missing")
    flat = _flat_state(state)
    _check_sharded(folder, flat)
    targets = dict(flat)
    try:
        with _single_process_ok():
            dcp.load(flat, checkpoint_id=folder)
        # DCP may swap a dict entry (0-d tensors, without a process group) instead of copying
        # into it; the caller's tensors are the ones that must hold the values.
        with torch.no_grad():
            for k, v in flat.items():
                if v is not targets[k]:
                    targets[k].copy_(v)
    except (Exception, CheckpointException) as e:  # the latter is a BaseException
        raise CheckpointError(f"cannot load {folder}: {e}") from e
    try:
        extra = json.loads((folder / EXTRA_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt or missing {folder / EXTRA_FILE}: {e}") from e
    return step, extra
