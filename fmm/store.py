"""A persistent embedding store on SQLite (WAL) with an in-memory LRU in front.

Compute once, serve many times: a vector is filed under its **content key** (the sha256 of
what was embedded) *and* the **model fingerprint** (a hash of the config and every weight),
so a retrained, requantized or reconfigured model never reads another model's vectors.
Rows are ``(fingerprint, key) -> vector bytes, dtype, dim, meta``; a put of many vectors is
one transaction, so a writer killed at any moment leaves every committed batch whole and
no partial one. SQLite's WAL mode lets readers proceed while a writer commits.

Example::

    fp = model_fingerprint(cfg.to_dict(), params)
    with EmbeddingStore("embeddings.sqlite", fp, dim=512) as store:
        key = content_key("text", "a red circle")
        store.put(key, vector, meta="a red circle")
        store.get(key)                      # the same tensor, bit for bit
        scores, keys = store.search(query, k=5)   # exact top-5 by cosine
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from fmm import tree
from fmm.quant import QuantizedWeight

__all__ = ["EmbeddingStore", "content_key", "model_fingerprint"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    fingerprint TEXT NOT NULL,
    key TEXT NOT NULL,
    dim INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    vector BLOB NOT NULL,
    meta TEXT,
    UNIQUE (fingerprint, key)
)
"""
# SQLite's default cap on bound parameters per statement is 32766 (999 before 3.32).
_CHUNK = 900
_DTYPES = {"float16", "bfloat16", "float32", "float64"}


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def model_fingerprint(config: Mapping[str, Any], params: Any) -> str:
    """A sha256 hex digest of ``config`` (canonical JSON: sorted keys) and every weight of
    ``params`` (dotted name, dtype, shape and raw bytes, in name order).

    Any change to a config field or to one bit of one weight changes the fingerprint;
    quantized leaves hash their int8 values and scales.

    Example: ``model_fingerprint(cfg.to_dict(), params) -> "3f1c...e9"`` (64 hex digits).
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"model_fingerprint: config must be a dict, got {type(config).__name__}")
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode())
    for name, leaf in sorted(tree.flatten(params).items()):
        parts = (leaf.values, leaf.scale) if isinstance(leaf, QuantizedWeight) else (leaf,)
        for t in parts:
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"model_fingerprint: leaf {name!r} is a {type(t).__name__}, not a tensor"
                )
            h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
            h.update(_tensor_bytes(t))
    return h.hexdigest()


def content_key(kind: str, payload: bytes | str) -> str:
    """sha256 hex digest of ``kind`` and ``payload`` (``str`` is hashed as UTF-8).

    ``kind`` (``"text"``, ``"image"``, ...) separates namespaces, so a text and an image
    with the same bytes get different keys.

    Example: ``content_key("text", "a red circle")`` -> 64 hex digits.
    """
    if not isinstance(kind, str) or not kind or "\0" in kind:
        raise ValueError(f"content_key: kind must be a non-empty string without NUL, got {kind!r}")
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    elif not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"content_key: payload must be bytes or str, got {type(payload).__name__}")
    return hashlib.sha256(kind.encode() + b"\0" + bytes(payload)).hexdigest()


class EmbeddingStore:
    """Vectors ``[dim]`` by content key for one model ``fingerprint``, in SQLite at ``path``.

    ``dim``: the vector width (``None``: taken from the first stored vector).
    ``lru_size``: hot vectors kept in memory (0 disables the cache).

    Thread-safe: each thread gets its own SQLite connection; writes are serialised. Many
    processes may open the same file (WAL: readers never block on the writer).

    Example::

        with EmbeddingStore(tmp / "e.sqlite", fingerprint="abc", dim=3) as s:
            s.put_many({"k1": torch.ones(3), "k2": torch.zeros(3)})
            s.get_many(["k1", "nope"])   # {"k1": tensor([1., 1., 1.])}
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fingerprint: str,
        *,
        dim: int | None = None,
        lru_size: int = 10_000,
    ):
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(
                f"EmbeddingStore: fingerprint must be a non-empty str, got {fingerprint!r}"
            )
        if dim is not None and (not isinstance(dim, int) or dim < 1):
            raise ValueError(f"EmbeddingStore: dim must be an int >= 1 or None, got {dim!r}")
        if not isinstance(lru_size, int) or lru_size < 0:
            raise ValueError(f"EmbeddingStore: lru_size must be an int >= 0, got {lru_size!r}")
        self.path = os.fspath(path)
        self.fingerprint = fingerprint
        self.lru_size = lru_size
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._lru: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self._lru_lock = threading.Lock()
        self._index_lock = threading.Lock()
        self._index: dict[str, Any] | None = None
        self._closed = False
        conn = self._conn()
        with self._write_lock:
            conn.execute(_SCHEMA)
        row = conn.execute(
            "SELECT dim FROM embeddings WHERE fingerprint = ? LIMIT 1", (fingerprint,)
        ).fetchone()
        if row is not None and dim is not None and row[0] != dim:
            raise ValueError(
                f"EmbeddingStore: {self.path} holds dim={row[0]} vectors for this fingerprint, "
                f"but dim={dim} was given"
            )
        self.dim = dim if dim is not None else (row[0] if row else None)

    # -- connections ---------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError(f"EmbeddingStore({self.path!r}) is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # Autocommit mode: transactions are opened explicitly with BEGIN IMMEDIATE.
            conn = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a killed process (only a power cut
            # can lose the last commits), at a fraction of FULL's fsync cost.
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def close(self) -> None:
        """Close every connection this store opened (from any thread). Idempotent."""
        self._closed = True
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        with self._lru_lock:
            self._lru.clear()
        self._index = None

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        """Vectors stored for this fingerprint."""
        (n,) = (
            self._conn()
            .execute("SELECT count(*) FROM embeddings WHERE fingerprint = ?", (self.fingerprint,))
            .fetchone()
        )
        return n

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore({self.path!r}, fingerprint={self.fingerprint[:12]!r}, dim={self.dim})"
        )

    # -- LRU -----------------------------------------------------------------------------

    def _remember(self, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        if not self.lru_size:
            return
        with self._lru_lock:
            for key, vec in items:
                self._lru[key] = vec
                self._lru.move_to_end(key)
            while len(self._lru) > self.lru_size:
                self._lru.popitem(last=False)

    def cached_keys(self) -> list[str]:
        """Keys in the in-memory LRU, least recently used first."""
        with self._lru_lock:
            return list(self._lru)

    # -- get / put -----------------------------------------------------------------------

    @staticmethod
    def _check_keys(keys: Any, where: str) -> list[str]:
        if isinstance(keys, str) or not isinstance(keys, Iterable):
            raise TypeError(f"{where}: keys must be a list of str, got {type(keys).__name__}")
        keys = list(keys)
        bad = [k for k in keys if not isinstance(k, str) or not k]
        if bad:
            raise TypeError(f"{where}: every key must be a non-empty str, got {bad[:3]!r}")
        return keys

    def get_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """``{key: vector [dim]}`` for the keys stored under this fingerprint (misses are
        absent). Hot keys come from the LRU; the rest in a few SQL queries."""
        keys = self._check_keys(keys, "get_many")
        out: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        with self._lru_lock:
            for key in keys:
                vec = self._lru.get(key)
                if vec is None:
                    missing.append(key)
                else:
                    self._lru.move_to_end(key)
                    out[key] = vec.clone()
        missing = list(dict.fromkeys(missing))
        found: list[tuple[str, torch.Tensor]] = []
        conn = self._conn()
        for i in range(0, len(missing), _CHUNK):
            chunk = missing[i : i + _CHUNK]
            rows = conn.execute(
                "SELECT key, dtype, vector FROM embeddings WHERE fingerprint = ? AND key IN "
                f"({','.join('?' * len(chunk))})",
                (self.fingerprint, *chunk),
            ).fetchall()
            for key, dtype, blob in rows:
                found.append((key, _from_blob(blob, dtype)))
        self._remember(found)
        out.update((key, vec.clone()) for key, vec in found)
        return {key: out[key] for key in keys if key in out}

    def get(self, key: str) -> torch.Tensor | None:
        """The vector stored under ``key``, or ``None``."""
        return self.get_many([key]).get(key)

    def _check_vector(self, key: str, vec: Any, dim: int | None) -> torch.Tensor:
        if (
            not isinstance(vec, torch.Tensor)
            or str(vec.dtype).removeprefix("torch.") not in _DTYPES
        ):
            got = vec.dtype if isinstance(vec, torch.Tensor) else type(vec).__name__
            raise TypeError(f"put_many: items[{key!r}] must be a float tensor [dim], got {got}")
        if vec.ndim != 1 or (dim is not None and vec.shape[0] != dim):
            raise ValueError(
                f"put_many: items[{key!r}] must have shape [{dim if dim else 'dim'}], "
                f"got {list(vec.shape)}"
            )
        return vec.detach().cpu().contiguous()

    def put_many(
        self, items: Mapping[str, torch.Tensor], meta: Mapping[str, str] | None = None
    ) -> None:
        """Store ``{key: vector [dim]}`` in one transaction (all or none), replacing old
        vectors under the same keys. ``meta``: an optional string per key (the text, a
        file name) kept beside the vector."""
        if not isinstance(items, Mapping):
            raise TypeError(
                f"put_many: items must be a dict of key -> tensor, got {type(items).__name__}"
            )
        keys = self._check_keys(items.keys(), "put_many")
        meta = dict(meta or {})
        stray = sorted(set(meta) - set(keys))
        if stray:
            raise KeyError(f"put_many: meta has keys that are not in items: {stray[:3]}")
        bad_meta = [k for k, m in meta.items() if not isinstance(m, str)]
        if bad_meta:
            raise TypeError(f"put_many: meta values must be str, not for keys {bad_meta[:3]}")
        dim = self.dim
        vectors: dict[str, torch.Tensor] = {}
        for key in keys:
            vec = self._check_vector(key, items[key], dim)
            dim = vec.shape[0]
            vectors[key] = vec
        if not vectors:
            return
        rows = [
            (self.fingerprint, key, dim, str(v.dtype).removeprefix("torch."), _tensor_bytes(v),
             meta.get(key))
            for key, v in vectors.items()
        ]  # fmt: skip
        conn = self._conn()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT OR REPLACE INTO embeddings "
                    "(fingerprint, key, dim, dtype, vector, meta) VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        self.dim = dim
        self._remember((k, v.clone()) for k, v in vectors.items())

    def put(self, key: str, vector: torch.Tensor, meta: str | None = None) -> None:
        """Store one vector ``[dim]`` under ``key``."""
        self.put_many({key: vector}, None if meta is None else {key: meta})

    def meta_many(self, keys: list[str]) -> dict[str, str]:
        """The ``meta`` strings stored beside ``keys`` (keys without one are absent)."""
        keys = list(dict.fromkeys(self._check_keys(keys, "meta_many")))
        out: dict[str, str] = {}
        conn = self._conn()
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i : i + _CHUNK]
            out.update(
                conn.execute(
                    "SELECT key, meta FROM embeddings WHERE fingerprint = ? AND meta IS NOT NULL "
                    f"AND key IN ({','.join('?' * len(chunk))})",
                    (self.fingerprint, *chunk),
                ).fetchall()
            )
        return out

    # -- search --------------------------------------------------------------------------

    def _matrix(self) -> tuple[list[str], dict[str, torch.Tensor]]:
        """Every stored key and, per metric, the vectors as ``[dim, n]`` fp32 (unit rows
        for ``"cosine"``), refreshed when the table changed
        (in this process or another): only rows newer than the last refresh are read."""
        conn = self._conn()
        with self._index_lock:
            n, last = conn.execute(
                "SELECT count(*), coalesce(max(rowid), 0) FROM embeddings WHERE fingerprint = ?",
                (self.fingerprint,),
            ).fetchone()
            index = self._index
            if index is not None and index["n"] == n and index["last"] == last:
                return index["keys"], index["matrix"]
            if index is None or last < index["last"]:
                index = {"keys": [], "pos": {}, "rows": [], "last": 0}
            for rowid, key, dtype, blob in conn.execute(
                "SELECT rowid, key, dtype, vector FROM embeddings "
                "WHERE fingerprint = ? AND rowid > ? ORDER BY rowid",
                (self.fingerprint, index["last"]),
            ):
                vec = _from_blob(blob, dtype).float()
                # INSERT OR REPLACE gives a replaced key a new rowid: overwrite in place.
                if key in index["pos"]:
                    index["rows"][index["pos"][key]] = vec
                else:
                    index["pos"][key] = len(index["keys"])
                    index["keys"].append(key)
                    index["rows"].append(vec)
                index["last"] = rowid
            if len(index["keys"]) != n:  # rows were deleted elsewhere: rebuild from scratch
                self._index = None
                index = {"keys": [], "pos": {}, "rows": [], "last": 0}
                for rowid, key, dtype, blob in conn.execute(
                    "SELECT rowid, key, dtype, vector FROM embeddings WHERE fingerprint = ? "
                    "ORDER BY rowid",
                    (self.fingerprint,),
                ):
                    index["pos"][key] = len(index["keys"])
                    index["keys"].append(key)
                    index["rows"].append(_from_blob(blob, dtype).float())
                    index["last"] = rowid
            index["n"] = len(index["keys"])
            width = self.dim or 0
            matrix = torch.stack(index["rows"]) if index["rows"] else torch.zeros(0, width)
            # Kept as contiguous [dim, n]: a product with a transposed view ran ~10^4 times
            # slower on this CPU's BLAS for one query (25 ms vs 2 us for 128 vectors).
            index["matrix"] = {
                "dot": matrix.T.contiguous(),
                "cosine": F.normalize(matrix, dim=-1).T.contiguous(),
            }
            self._index = index
            return index["keys"], index["matrix"]

    def search(
        self, query: torch.Tensor, k: int, *, metric: str = "cosine"
    ) -> tuple[torch.Tensor, list[list[str]]]:
        """Exact top-``k`` stored vectors for each query, best first.

        ``query``: ``[dim]`` or ``[q, dim]``; ``metric``: ``"cosine"`` or ``"dot"``.
        Returns ``(scores [q, min(k, len(self))], keys: q lists of as many keys)``.

        Example: ``scores, keys = store.search(store.get(key), k=3)`` -> ``keys[0][0] == key``.
        """
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"search: k must be an int >= 1, got {k!r}")
        if metric not in ("cosine", "dot"):
            raise ValueError(f"search: metric must be 'cosine' or 'dot', got {metric!r}")
        if not isinstance(query, torch.Tensor) or not query.is_floating_point():
            got = query.dtype if isinstance(query, torch.Tensor) else type(query).__name__
            raise TypeError(f"search: query must be a float tensor [dim] or [q, dim], got {got}")
        if query.ndim not in (1, 2):
            raise ValueError(f"search: query must be [dim] or [q, dim], got {list(query.shape)}")
        q = query.detach().float().cpu().reshape(-1, query.shape[-1])
        if self.dim is not None and q.shape[1] != self.dim:
            raise ValueError(
                f"search: query has dim {q.shape[1]} but the store holds dim={self.dim} "
                f"vectors: got {list(query.shape)}"
            )
        keys, matrices = self._matrix()
        if not keys:
            return q.new_zeros(q.shape[0], 0), [[] for _ in range(q.shape[0])]
        if metric == "cosine":
            q = F.normalize(q, dim=-1)
        scores, idx = (q @ matrices[metric]).topk(min(k, len(keys)), dim=-1)
        return scores, [[keys[i] for i in row] for row in idx.tolist()]


def _from_blob(blob: bytes, dtype: str) -> torch.Tensor:
    if dtype not in _DTYPES:
        raise ValueError(f"EmbeddingStore: a row has unknown dtype {dtype!r}")
    # bytearray: a writable buffer the tensor owns, so it outlives the SQLite row.
    return torch.frombuffer(bytearray(blob), dtype=getattr(torch, dtype))
