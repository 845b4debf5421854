"""Run directories, saved as one unit: a crash at any moment leaves one whole save loadable.

A run directory holds ``params.safetensors`` (dotted names, as ``fmm.tree.flatten``),
``config.json`` and whatever else the run saved with them (``tokenizer.json``,
``metrics.json``, more tensor files), all plain files, and ``manifest.json``, which names
each file of the save with its size and sha256. :func:`save` goes in three steps:

1. every file is written under a hidden staged name (``.params.safetensors.<save>.staged``)
   and flushed to disk;
2. ``manifest.json`` is replaced atomically: the commit point;
3. each staged file is renamed over its plain name.

A crash before 2 leaves the previous save in place (the staged files are orphans, which the
next save removes with any temporary file a crash left). A crash between 2 and 3 leaves the
new save committed: readers take a file from its staged name while the plain one does not
match the manifest, and the next save first finishes the renames (rolls forward). Readers
(:func:`load`, :func:`load_params`, :func:`load_config`, :func:`open_run`) never write, and
check every file they read against the manifest, so they never mix two saves: a file that
does not match (edited, copied from another run, corrupt) is a :class:`CheckpointError` that
names it. Runs saved before manifests existed are read as they are.

Example::

    save(run_dir, params, config={"model": "clip", "clip": cfg.to_dict()},
         files={"tokenizer.json": tokenizer.to_json(), "metrics.json": metrics})
    params, config = load(run_dir)

Sharded train states (``save_sharded``, ``load_sharded``, ``latest_step``) live in
:mod:`train.sharded`; this module forwards those names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file

from fmm import tree
from fmm.convert import mismatch_report
from fmm.io import atomic_write, fsync_dir, is_temp_file, write_synced

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.json"
MANIFEST_FORMAT = "fmm-run/1"
_SAVE_ID = re.compile(r"^[0-9a-f]{12}$")
_STAGED_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.staged$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not match what the caller expects."""


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (a lone file, outside any run's unit)."""
    text = _json_text(obj)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _tensor_writer(params: Any) -> Callable[[str], None]:
    flat = {k: v.detach().contiguous().cpu() for k, v in tree.flatten(params).items()}
    return lambda path: save_file(flat, path, metadata={"format": "fmm"})


def save_params(path: str | os.PathLike, params: Any) -> None:
    """Write a param tree to one safetensors file, atomically (a lone file; a run's params
    go through :func:`save`)."""
    atomic_write(path, _tensor_writer(params))


def _describe(flat: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: (tuple(v.shape), v.dtype) for k, v in flat.items()}


def check_matches(flat: dict[str, torch.Tensor], like: Any, *, source: str = "checkpoint") -> None:
    """Raise one :class:`CheckpointError` listing every missing, unexpected and mis-shaped key
    of ``flat`` against the tree ``like`` (shapes and dtypes)."""
    problems = mismatch_report(_describe(flat), _describe(tree.flatten(like)))
    if problems:
        raise CheckpointError(
            "\n".join([f"{source} does not match the expected params:", *problems])
        )


# --- reading ------------------------------------------------------------------------------


def _staged(run_dir: Path, name: str, save_id: str) -> Path:
    return run_dir / f".{name}.{save_id}.staged"


def _fingerprint(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _read_manifest(run_dir: Path) -> dict | None:
    path = run_dir / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt {path}: {e}") from e
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(files, dict)
        or manifest.get("format") != MANIFEST_FORMAT
        or not _SAVE_ID.match(str(manifest.get("save")))
        or not all(isinstance(e, dict) and {"size", "sha256"} <= e.keys() for e in files.values())
    ):
        raise CheckpointError(f"corrupt {path}: not a {MANIFEST_FORMAT} manifest")
    return manifest


@dataclass(frozen=True)
class SavedRun:
    """The files of a run directory's last save; each read is checked against the manifest.

    ``manifest`` is ``None`` for a run saved before manifests: its files are read as they
    are. A file the manifest does not name (a plot, a file written on its own) likewise.
    """

    path: Path
    manifest: dict | None

    def read_bytes(self, name: str) -> bytes:
        """The bytes of ``name`` as its save wrote them."""
        plain = self.path / name
        entry = (self.manifest or {}).get("files", {}).get(name)
        if entry is None:
            try:
                return plain.read_bytes()
            except FileNotFoundError:
                raise CheckpointError(f"no {name} in {self.path}") from None
            except OSError as e:
                raise CheckpointError(f"cannot read {plain}: {e}") from e
        # Until a save's renames finish, its files are at their staged names; the last look
        # at the plain name covers a save that renamed the staged file in between.
        found = []
        for candidate in (plain, _staged(self.path, name, self.manifest["save"]), plain):
            try:
                data = candidate.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as e:
                raise CheckpointError(f"cannot read {candidate}: {e}") from e
            got = _fingerprint(data)
            if got["size"] == entry["size"] and got["sha256"] == entry["sha256"]:
                return data
            found.append(f"{got['size']} bytes, sha256 {got['sha256'][:12]}")
        raise CheckpointError(
            f"{plain} does not belong to the save {self.path / MANIFEST_FILE} records "
            f"(expected {entry['size']} bytes, sha256 {entry['sha256'][:12]}; found "
            f"{found[0] if found else 'no file'}): it is corrupt, or was changed or copied in "
            f"after that save; save the run again, or delete {MANIFEST_FILE} to read its files "
            "unchecked"
        )

    def text(self, name: str) -> str:
        """The text of ``name`` (UTF-8), e.g. ``run.text("tokenizer.json")``."""
        try:
            return self.read_bytes(name).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path / name} is not UTF-8 text: {e}") from e

    def config(self) -> dict:
        """The run's ``config.json``."""
        if self.manifest is None and not (self.path / CONFIG_FILE).is_file():
            raise CheckpointError(f"no {CONFIG_FILE} in {self.path}: not a saved run")
        try:
            return json.loads(self.text(CONFIG_FILE))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"corrupt {self.path / CONFIG_FILE}: {e}") from e

    def params(self, name: str = PARAMS_FILE, *, like: Any = None) -> Any:
        """A param tree from a safetensors file of the run. With ``like`` (a tree of the
        expected shapes, e.g. from ``init`` on the meta device), every key, shape and dtype
        is checked before anything is returned."""
        path = self.path / name
        named = name in (self.manifest or {}).get("files", {})
        if not named and not path.is_file():
            raise CheckpointError(f"no params file at {path}")
        data = self.read_bytes(name) if named else None
        try:
            flat = load_file(path) if data is None else load_bytes(data)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"corrupt params file {path}: {e}") from e
        if like is not None:
            check_matches(flat, like, source=str(path))
        return tree.unflatten(flat)


def open_run(run_dir: str | os.PathLike) -> SavedRun:
    """The last save of ``run_dir``, to read several of its files as one save.

    Example::

        run = open_run("runs/mmgpt")
        config = run.config()
        params = run.params(like=mmgpt.init(cfg, meta_key))
        tokenizer = WordTokenizer.from_json(run.text("tokenizer.json"))
    """
    run_dir = Path(run_dir)
    return SavedRun(run_dir, _read_manifest(run_dir))


def load_params(path: str | os.PathLike, *, like: Any = None) -> Any:
    """Read a param tree from a safetensors file (checked against its run's manifest when
    the run names it). With ``like``, every key, shape and dtype is checked first."""
    path = Path(path)
    return open_run(path.parent).params(path.name, like=like)


def load_config(run_dir: str | os.PathLike) -> dict:
    """The ``config.json`` of a run directory."""
    return open_run(run_dir).config()


def load(run_dir: str | os.PathLike, *, like: Any = None) -> tuple[Any, dict]:
    """``(params, config)`` from a run directory written by :func:`save`, from one save."""
    run = open_run(run_dir)
    config = run.config()
    return run.params(like=like), config


# --- saving -------------------------------------------------------------------------------


def _writer(name: str, value: Any) -> Callable[[str], None]:
    """How ``save`` writes ``files[name]``: text and bytes as they are, otherwise by the
    name's suffix (``.json``: JSON, ``.safetensors``: a param tree)."""
    if not name or name != Path(name).name or name.startswith(".") or name == MANIFEST_FILE:
        raise ValueError(f"files: {name!r} is not a plain file name a run can hold")
    if isinstance(value, str):
        return lambda path: Path(path).write_text(value)
    if isinstance(value, bytes):
        return lambda path: Path(path).write_bytes(value)
    if name.endswith(".safetensors"):
        return _tensor_writer(value)
    if name.endswith(".json"):
        text = _json_text(value)
        return lambda path: Path(path).write_text(text)
    raise ValueError(
        f"files[{name!r}]: give str or bytes, or name it .json or .safetensors, "
        f"not a {type(value).__name__}"
    )


def _roll_forward(run_dir: Path, manifest: dict) -> None:
    """Finish a committed save: rename its staged files still there over their plain names."""
    renamed = False
    for name in manifest["files"]:
        staged = _staged(run_dir, name, manifest["save"])
        if staged.exists():
            os.replace(staged, run_dir / name)
            renamed = True
    if renamed:
        fsync_dir(run_dir)


def _settle(run_dir: Path) -> dict | None:
    """Before a save: finish the last committed one, then remove what crashed saves left
    (staged files nothing committed, temporary files). Returns the manifest, if any."""
    try:
        manifest = _read_manifest(run_dir)
    except CheckpointError as e:
        warnings.warn(f"{e}; this save replaces it", stacklevel=3)
        manifest = None
    if manifest is not None:
        _roll_forward(run_dir, manifest)
    for path in run_dir.iterdir():
        if (_STAGED_NAME.match(path.name) or is_temp_file(path.name)) and path.is_file():
            path.unlink(missing_ok=True)
    return manifest


def save(
    run_dir: str | os.PathLike, params: Any, *, config: dict, files: dict[str, Any] | None = None
) -> None:
    """Save ``params``, a JSON-ready ``config`` and the run's other ``files`` into
    ``run_dir`` as one unit (see the module docstring): a crash at any point leaves either
    the previous save or this one, never a mix.

    ``files``: ``{name: value}``; a str or bytes is written as it is, anything else by the
    name's suffix: ``.json`` as JSON, ``.safetensors`` as a param tree. Files of an earlier
    save that this one does not name stay as they are, still checked.

    Example: ``save(out, params, config=config, files={"metrics.json": metrics,
    "tokenizer.json": tokenizer.to_json(), "vqvae.safetensors": vq_params})``.
    """
    run_dir = Path(run_dir)
    writers = {PARAMS_FILE: _tensor_writer(params), CONFIG_FILE: _writer(CONFIG_FILE, config)}
    for name, value in (files or {}).items():
        if name in writers:
            raise ValueError(f"files: {name!r} is written from save's own arguments")
        writers[name] = _writer(name, value)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = _settle(run_dir)
    save_id = secrets.token_hex(6)
    entries, staged = {}, []
    try:
        for name, write in writers.items():
            staged.append(_staged(run_dir, name, save_id))
            write_synced(staged[-1], write)
            entries[name] = _fingerprint(staged[-1].read_bytes())
        fsync_dir(run_dir)
    except BaseException:  # nothing is committed yet: leave the previous save as it was
        for path in staged:
            path.unlink(missing_ok=True)
        raise
    kept = {
        name: entry
        for name, entry in (previous or {}).get("files", {}).items()
        if name not in entries and (run_dir / name).is_file()
    }
    manifest = {"format": MANIFEST_FORMAT, "save": save_id, "files": {**kept, **entries}}
    write_json(run_dir / MANIFEST_FILE, manifest)  # the commit point
    _roll_forward(run_dir, manifest)


_SHARDED = ("save_sharded", "load_sharded", "latest_step")


def __getattr__(name: str) -> Any:
    # The sharded API moved to train.sharded (which imports this module); old names still work.
    if name in _SHARDED:
        from train import sharded

        return getattr(sharded, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
