"""webdataset tar shards, read by index rather than streamed.

A shard is a plain tar whose members are grouped into samples by key, webdataset's rule:
the member's path up to the first dot of its basename (``000042.jpg`` and ``000042.txt``
are sample ``000042``; the extension is lower-cased). A sample's image is its first
``jpg``/``jpeg``/``png``/``webp`` member, its caption the ``txt`` member.

webdataset's own pipeline streams shards front to back: it cannot say which sample comes
next after a resume, nor give two ranks disjoint samples without whole shards each. This
table instead lists every shard's members once, reading only tar headers (the standard
``tarfile`` module seeks over the data), and then reads any sample's bytes at their
offset: a map-style table like the others, shuffled, sharded and resumed exactly the same
way. Shards must be uncompressed (a ``.tar``, as webdataset and img2dataset write them).
"""

from __future__ import annotations

import os
import re
import tarfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from train.data.formats.table import Table, require

_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext
_OPEN_SHARDS = 16  # file handles one process keeps (of possibly thousands of shards)


def shard_paths(path: str) -> list[Path]:
    """The shards ``path`` names: one ``.tar``, a folder of them (sorted), or a brace
    pattern ``shards/{000000..000099}.tar`` (expanded with ``braceexpand``)."""
    if "{" in path:
        braceexpand = require("braceexpand", format="wds")
        shards = [Path(p) for p in braceexpand.braceexpand(path)]
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"--data {path}: {len(missing)} of {len(shards)} shards do not exist, "
                f"the first {missing[0]}"
            )
        return shards
    p = Path(path)
    if p.is_dir():
        shards = sorted(q for q in p.iterdir() if q.suffix == ".tar" and q.is_file())
        if not shards:
            raise ValueError(f"--data {path}: a folder without .tar shards")
        return shards
    if not p.is_file():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    return [p]


class Shards(Table):
    """``wds``: samples of tar shards, by (shard, offset). ``where(i)`` is
    ``shard-000001.tar:000042``."""

    format = "wds"

    def __init__(self, source: str):
        self.source, self.shards = source, [str(p) for p in shard_paths(source)]
        keys, columns = [], []
        for number, shard in enumerate(self.shards):
            for key, image, text in _index(shard):
                keys.append(key)
                columns.append((number, *image, *text))
        if not keys:
            raise ValueError(f"{source}: no samples in {len(self.shards)} shard(s)")
        self.keys = keys
        # shard, image offset, image size, text offset, text size (-1: no such member).
        self.index = np.array(columns, dtype=np.int64)
        self._handles: OrderedDict = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.keys)

    def image_bytes(self, i: int) -> bytes:
        shard, offset, size = self.index[i, :3].tolist()
        if offset < 0:
            raise ValueError(f"{self.where(i)}: no {'/'.join(_IMAGE_EXTENSIONS)} member")
        return self._read(shard, offset, size)

    def texts(self, i: int) -> tuple[str, ...]:
        shard, _, _, offset, size = self.index[i].tolist()
        if offset < 0:
            return ()
        text = self._read(shard, offset, size).decode("utf-8").strip()
        return (text,) if text else ()

    def where(self, i: int) -> str:
        return f"{Path(self.shards[int(self.index[i, 0])]).name}:{self.keys[i]}"

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        # A forked DataLoader worker inherits the parent's handles, and with them one file
        # position shared by every process: each process opens its own.
        if self._pid != os.getpid():
            self._handles, self._pid = OrderedDict(), os.getpid()
        f = self._handles.pop(shard, None)
        if f is None:
            f = open(self.shards[shard], "rb")  # noqa: SIM115 (kept open, closed on eviction)
            if len(self._handles) >= _OPEN_SHARDS:
                self._handles.popitem(last=False)[1].close()
        self._handles[shard] = f  # most recently used last
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.shards[shard]}: truncated at byte {offset + len(data)}")
        return data

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()  # files reopen in the process that reads
        return state

    def __del__(self) -> None:
        for f in getattr(self, "_handles", {}).values():
            f.close()


def _index(shard: str) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
    """(key, (image offset, size), (text offset, size)) per sample of one shard, in the
    order samples first appear; a member that is neither image nor caption is ignored."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for member in tar:
                match = _KEY.match(member.name)
                if not member.isfile() or match is None:
                    continue
                key, extension = match.group(1), match.group(2).lower()
                if extension in _IMAGE_EXTENSIONS or extension == "txt":
                    entry = samples.setdefault(key, {})
                    entry.setdefault(extension, (member.offset_data, member.size))
    except tarfile.ReadError as e:
        raise ValueError(f"{shard}: not an uncompressed tar shard ({e})") from None
    missing = (-1, 0)
    rows = []
    for key, members in samples.items():
        image = next((members[e] for e in _IMAGE_EXTENSIONS if e in members), missing)
        rows.append((key, image, members.get("txt", missing)))
    return rows
