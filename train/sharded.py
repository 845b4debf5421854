"""Sharded checkpoints of a whole train state, for any number of processes.

:func:`save_sharded` writes a train state (params, optimizer state, step, RNG keys,
data-loader position; ``DTensor`` shards or plain tensors) with
``torch.distributed.checkpoint`` into ``<root>/step_<n>/``, through a temporary folder
renamed into place, then points ``<root>/latest`` at it. A resumed run continues bit for
bit, and a checkpoint saved at one world size loads at another (DCP reshards ``DTensor``s;
plain tensors are taken as replicated).

Resuming never unpickles a user's file: DCP keeps a checkpoint's index in ``.metadata`` as
a pickle, which :class:`SafeFileSystemReader` reads with an unpickler that builds DCP's
metadata types and nothing else, and every saved entry must be a tensor (DCP would unpickle
a non-tensor entry's bytes).

Example::

    save_sharded("runs/clip/checkpoints", step, state, extra={"losses": losses})
    step, extra = load_sharded("runs/clip/checkpoints", template)
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from fmm import tree
from fmm.convert import mismatch_report
from train.checkpoint import CheckpointError, write_json

LATEST_FILE = "latest"
EXTRA_FILE = "extra.json"

# What a DCP .metadata pickle is made of (as torch 2.13 writes it, DTensor shards included):
# its dataclasses, the file system writer's storage index, torch.Size, dtypes and layouts,
# and the checkpoint's path.
_METADATA_TYPES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath"},
}  # fmt: skip
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = name in _METADATA_TYPES.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata type")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """DCP's ``FileSystemReader``, but ``.metadata`` is read by an unpickler that builds only
    DCP's metadata types: a crafted file is a :class:`CheckpointError`, never code that runs.

    Pass it as ``dcp.load(state, storage_reader=SafeFileSystemReader(folder))``.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
        except FileNotFoundError as e:
            raise CheckpointError(f"checkpoint metadata {path} is missing") from e
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError,
                TypeError, ValueError, OSError) as e:  # fmt: skip
            raise CheckpointError(f"{path} is not a checkpoint's metadata: {e}") from e
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


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
    """One error listing every missing, unexpected, mis-shaped and non-tensor key, before
    loading."""
    saved = SafeFileSystemReader(folder).read_metadata().state_dict_metadata
    is_tensor = {k: isinstance(v, TensorStorageMetadata) for k, v in saved.items()}
    not_tensors = sorted(k for k in flat.keys() & saved.keys() if not is_tensor[k])
    got = {k: tuple(v.size) if is_tensor[k] else None for k, v in saved.items()}
    want = {k: tuple(v.shape) for k, v in flat.items()}
    problems = mismatch_report({k: v for k, v in got.items() if k not in not_tensors}, want)
    problems = [p for p in problems if p.removeprefix("  missing: ") not in not_tensors]
    problems += [f"  not a tensor (a pickle we do not load): {k}" for k in not_tensors]
    if problems:
        lines = [f"checkpoint {folder} does not match the expected state:", *problems]
        raise CheckpointError("\n".join(lines))


def load_sharded(
    root: str | os.PathLike, state: Any, *, step: int | None = None
) -> tuple[int, dict]:
    """Fill ``state``'s tensors in place from the latest checkpoint (or ``step``) in ``root``.

    ``state``: a tree shaped like the saved one (e.g. a freshly initialised train state),
    with ``DTensor`` shards at any world size or plain tensors. Every rank calls it.
    Returns ``(step, extra)``. Missing or mismatched keys, and a ``.metadata`` holding
    anything but DCP's metadata, raise :class:`CheckpointError`.
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
            dcp.load(flat, checkpoint_id=folder, storage_reader=SafeFileSystemReader(folder))
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
