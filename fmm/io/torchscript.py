"""The tensors of a TorchScript archive (``torch.jit.save``), read without running any of it.

``torch.jit.load`` compiles the archive's code and calls it: a scripted ``__setstate__``
runs at load time, so a crafted ``.pt`` file can write files or worse. This module reads
the archive as data. A TorchScript archive is a zip holding one folder ``<root>/``:

- ``data.pkl``: the module tree, pickled. Each module is an object of a ``__torch__.*``
  class whose state is a dict of its attributes; each tensor is a ``_rebuild_tensor_v2``
  call over a storage record ``("storage", <dtype>Storage, key, location, numel)``.
- ``data/<key>``: the raw (little-endian) bytes of each storage.
- ``code/<package path>.py``: each class's TorchScript source. Only two lines of each
  module class are read, as text: ``__parameters__ = [...]`` and ``__buffers__ = [...]``,
  which say which attributes belong in a state dict.
- ``constants.pkl`` / ``constants/``: tensors the code uses as constants. They are not part
  of a state dict and are not read.

``data.pkl`` is read by a restricted unpickler: only the tensor rebuild, the
``torch.jit._pickle`` list builders, ``collections.OrderedDict``, storage types,
``torch.device`` and ``complex`` resolve; ``__torch__.*`` classes become inert
placeholders that only record their state; any other global is refused by name. The
result equals ``torch.jit.load(path).state_dict()``: same keys in the same order (each
module's parameters, then its buffers, then its submodules), bitwise-equal tensors.

Example::

    if is_torchscript_archive("ViT-B-32.pt"):           # OpenAI's original CLIP files
        state_dict = read_torchscript_state_dict("ViT-B-32.pt")
"""

from __future__ import annotations

import ast
import collections
import os
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ArchiveError", "is_torchscript_archive", "read_torchscript_state_dict"]


class ArchiveError(ValueError):
    """The archive is malformed, or asks for something a weights file must not do."""


# The element types a storage record may name ("torch FloatStorage" in the pickle).
_STORAGE_DTYPES = {
    "ByteStorage": torch.uint8,
    "CharStorage": torch.int8,
    "ShortStorage": torch.int16,
    "IntStorage": torch.int32,
    "LongStorage": torch.int64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "BoolStorage": torch.bool,
    "Float8_e4m3fnStorage": torch.float8_e4m3fn,
    "Float8_e5m2Storage": torch.float8_e5m2,
}


@dataclass(frozen=True)
class _StorageType:
    """What ``torch <X>Storage`` resolves to: a dtype inside a storage record, not callable."""

    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    """One ``data/<key>`` entry as a flat tensor of its dtype."""

    key: str
    flat: torch.Tensor


class _ScriptObject:
    """An inert stand-in for an object of a ``__torch__.*`` class: it records the state the
    pickle hands it and runs nothing (the real class's ``__setstate__`` is TorchScript)."""

    qualified_name = ""
    args: tuple = ()
    state: Any = None  # stays None if the pickle never BUILDs the object

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _identity_list(data: list) -> list:
    return data


def _restore_type_tag(value: Any, type_str: str) -> Any:
    return value


def _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` for our own storages, every argument checked."""
    if not isinstance(storage, _Storage):
        raise ArchiveError(f"a tensor is built over {type(storage).__name__}, not a storage")
    key, numel = storage.key, storage.flat.numel()
    ints = (offset, *size, *stride)
    if not all(type(i) is int and i >= 0 for i in ints) or len(size) != len(stride):
        raise ArchiveError(
            f"a tensor over data/{key} has a bad view: offset {offset!r}, size {size!r}, "
            f"stride {stride!r}"
        )
    if all(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= numel:
        raise ArchiveError(
            f"a tensor of size {list(size)}, stride {list(stride)} at offset {offset} reads "
            f"past the end of data/{key} ({numel} elements)"
        )
    if type(requires_grad) is not bool or hooks or metadata:
        raise ArchiveError(f"a tensor over data/{key} carries hooks or metadata")
    return storage.flat.as_strided(tuple(size), tuple(stride), offset)


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch.jit._pickle", "build_intlist"): _identity_list,
    ("torch.jit._pickle", "build_tensorlist"): _identity_list,
    ("torch.jit._pickle", "build_doublelist"): _identity_list,
    ("torch.jit._pickle", "build_boollist"): _identity_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "device"): torch.device,
    ("builtins", "complex"): complex,
}


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl``: allowed globals only, storages read from ``data/<key>``."""

    def __init__(self, archive: zipfile.ZipFile, root: str) -> None:
        super().__init__(archive.open(f"{root}/data.pkl"))
        self._archive, self._root = archive, root
        self._storages: dict[str, _Storage] = {}
        self._classes: dict[str, type[_ScriptObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self._classes:
                self._classes[qualified] = type(
                    name, (_ScriptObject,), {"qualified_name": qualified}
                )
            return self._classes[qualified]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[module, name]
        raise ArchiveError(
            f"data.pkl refers to {module}.{name}, which a weights file may not use (allowed: "
            "tensor rebuilds, storage types, TorchScript list builders, OrderedDict, "
            "torch.device, complex, __torch__ classes)"
        )

    def persistent_load(self, record: Any) -> _Storage:
        if not (isinstance(record, tuple) and len(record) == 5 and record[0] == "storage"):
            raise ArchiveError(
                f"data.pkl has a persistent record that is not a storage: {record!r:.80}"
            )
        _, storage_type, key, _location, numel = record
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise ArchiveError(f"data.pkl has a malformed storage record {record!r:.80}")
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type.dtype, numel)
        storage = self._storages[key]
        if storage.flat.dtype != storage_type.dtype or storage.flat.numel() != numel:
            raise ArchiveError(f"data/{key} is recorded twice with different types or sizes")
        return storage

    def _read_storage(self, key: str, dtype: torch.dtype, numel: Any) -> _Storage:
        entry = f"{self._root}/data/{key}"
        try:
            info = self._archive.getinfo(entry)
        except KeyError:
            raise ArchiveError(
                f"a storage record names data/{key}, which is not in the archive"
            ) from None
        itemsize = dtype.itemsize
        if type(numel) is not int or numel < 0 or info.file_size != numel * itemsize:
            raise ArchiveError(
                f"data/{key} holds {info.file_size} bytes, but its record says {numel!r} "
                f"{dtype} elements ({numel * itemsize if type(numel) is int else '?'} bytes)"
            )
        buffer = bytearray(info.file_size)
        try:
            with self._archive.open(info) as f:
                complete = f.readinto(buffer) == len(buffer)
        except zipfile.BadZipFile as e:
            raise ArchiveError(f"data/{key} is corrupt: {e}") from e
        if not complete:
            raise ArchiveError(f"data/{key} ends early")
        flat = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        return _Storage(key, flat)


@dataclass(frozen=True)
class _ClassSource:
    """What a class's TorchScript source declares."""

    is_module: bool
    parameters: tuple[str, ...] = ()
    buffers: tuple[str, ...] = ()
    restores_own_state: bool = False  # defines __setstate__: its state means what code says


_CLASS_LINE = re.compile(r"class (\w+)(?:\((\w+)\))?:")
_NAMES_LINE = re.compile(r"  (__parameters__|__buffers__) = (.*)")


def _parse_classes(source: str) -> dict[str, _ClassSource]:
    """Every class of one ``code/`` file, read as text (the names lists by literal_eval)."""
    classes: dict[str, dict] = {}
    current = None
    for line in source.splitlines():
        header = _CLASS_LINE.fullmatch(line)
        if header:
            current = classes[header[1]] = {"is_module": header[2] == "Module"}
        elif current is not None and line.startswith("  "):
            names = _NAMES_LINE.fullmatch(line)
            if names:
                current[names[1].strip("_")] = _names_list(names[2], what=names[1])
            elif line.startswith("  def __setstate__("):
                current["restores_own_state"] = True
        elif line and not line.startswith(" "):
            current = None
    return {name: _ClassSource(**fields) for name, fields in classes.items()}


def _names_list(text: str, *, what: str) -> tuple[str, ...]:
    try:
        value = ast.literal_eval(text)  # a literal only: nothing is evaluated
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = None
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ArchiveError(f"a class's {what} is not a list of names: {text:.80}")
    return tuple(value)


class _Sources:
    """Class declarations from ``<root>/code/``, each file parsed once when first needed."""

    def __init__(self, archive: zipfile.ZipFile, root: str) -> None:
        self._archive, self._root = archive, root
        self._files: dict[str, dict[str, _ClassSource]] = {}

    def __getitem__(self, qualified_name: str) -> _ClassSource:
        module, _, name = qualified_name.rpartition(".")
        entry = f"{self._root}/code/{module.replace('.', '/')}.py"
        if entry not in self._files:
            try:
                text = self._archive.read(entry).decode("utf-8", errors="replace")
            except KeyError:
                text = ""
            self._files[entry] = _parse_classes(text)
        if name not in self._files[entry]:
            raise ArchiveError(f"class {qualified_name} is not defined under code/")
        return self._files[entry][name]


def _collect(
    module: _ScriptObject, prefix: str, sources: _Sources, out: dict, ancestors: tuple = ()
) -> None:
    """Add ``module``'s parameters, then buffers, then its submodules' to ``out``."""
    name = module.qualified_name
    if id(module) in ancestors:
        raise ArchiveError(f"{prefix.rstrip('.')} ({name}) contains itself")
    declared = sources[name]
    if declared.restores_own_state:
        raise ArchiveError(
            f"{name} defines __setstate__, code that loading would run to make its state: refused"
        )
    state = module.state
    if not isinstance(state, dict):
        raise ArchiveError(f"{name}'s state is a {type(state).__name__}, not its attributes")
    absent = [a for a in declared.parameters + declared.buffers if a not in state]
    if absent:
        raise ArchiveError(f"{name} declares {absent} but its state lacks them")
    for group in (declared.parameters, declared.buffers):
        for attribute, value in state.items():
            if attribute not in group or value is None:  # None: an unset bias, say
                continue
            if not isinstance(value, torch.Tensor):
                raise ArchiveError(f"{prefix}{attribute} is a {type(value).__name__}, not a tensor")
            out[prefix + attribute] = value
    for attribute, value in state.items():
        if isinstance(value, _ScriptObject) and sources[value.qualified_name].is_module:
            _collect(value, f"{prefix}{attribute}.", sources, out, (*ancestors, id(module)))


def _root(archive: zipfile.ZipFile) -> str:
    names = archive.namelist()
    roots = [
        n.removesuffix("/data.pkl") for n in names if n.count("/") == 1 and n.endswith("/data.pkl")
    ]
    if len(roots) != 1:
        raise ArchiveError(f"expected one <root>/data.pkl in the archive, found {len(roots)}")
    return roots[0]


def _check_byteorder(archive: zipfile.ZipFile, root: str) -> None:
    entry = f"{root}/byteorder"  # older archives lack it: little-endian
    order = (
        archive.read(entry).decode("ascii", "replace").strip()
        if entry in archive.namelist()
        else "little"
    )
    if order != sys.byteorder:
        raise ArchiveError(
            f"its storages are {order!r}-endian, this machine is {sys.byteorder!r}-endian"
        )


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zip with ``<root>/data.pkl`` and ``<root>/constants.pkl`` (what
    ``torch.jit.save`` writes; ``torch.save`` files have no ``constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return f"{_root(archive)}/constants.pkl" in archive.namelist()
    except (zipfile.BadZipFile, ArchiveError):
        return False


def read_torchscript_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``torch.jit.load(path).state_dict()``, read without running the archive's code.

    Returns ``{dotted name: tensor}`` on the CPU (whatever device the archive names), the
    tensors sharing memory where the archive's storages are shared. Raises
    :class:`ArchiveError` saying what is wrong: not a readable zip, a global that is not
    allowed (named), a storage record naming a missing entry or disagreeing with its size,
    a module whose state only its own ``__setstate__`` code could interpret.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArchiveError(f"not a readable zip archive ({e})") from e
    with archive:
        root = _root(archive)
        _check_byteorder(archive, root)
        try:
            tree = _ArchiveUnpickler(archive, root).load()
        except ArchiveError:
            raise
        except Exception as e:  # a malformed pickle can trip the machinery anywhere
            raise ArchiveError(f"data.pkl cannot be unpickled: {type(e).__name__}: {e}") from e
        if not isinstance(tree, _ScriptObject):
            raise ArchiveError(f"data.pkl holds a {type(tree).__name__}, not a scripted module")
        state_dict: dict[str, torch.Tensor] = {}
        _collect(tree, "", _Sources(archive, root), state_dict)
        return state_dict
