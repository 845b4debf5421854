"""A persistent embedding store on SQLite (WAL) with an in-memory LRU in front, that grows
only where the user asked.

Compute once, serve many times: a vector is filed under its **content key** (the sha256 of
what was embedded) *and* the **model fingerprint** (a hash of the config and every weight;
both in ``train.store.keys``), so a retrained or requantized model never reads another
model's vectors. A row is one of two kinds:

- **pinned** (``put_many(..., pinned=True)``, the default): a user's item. Kept until
  deleted; ``len(store)`` counts these and ``search`` searches only these.
- **cached** (``pinned=False``): an embedding computed on the way (the server's
  ``/v1/embed/*``). Served by ``get_many`` like any row, never searched; for this
  fingerprint the cached rows' bytes (vector plus UTF-8 meta) stay at most
  ``max_cached_bytes``, least recently used (put or hit) evicted first.

A put is one transaction with its evictions, so a writer killed at any moment leaves every
committed batch whole, no partial one, and the cap held. WAL lets readers proceed while a
writer commits. The schema and its upgrade of older files live in ``train.store.schema``,
the search matrices in ``train.store.index``.

Example::

    fp = model_fingerprint(cfg.to_dict(), params)
    with EmbeddingStore("embeddings.sqlite", fp, dim=512, max_cached_bytes=2**30) as store:
        store.put(content_key("text", "a red circle"), vector, meta="a red circle")
        store.put(content_key("text", "a query"), other, pinned=False)   # evictable
        store.get(content_key("text", "a red circle"))   # the same tensor, bit for bit
        scores, keys = store.search(query, k=5)          # exact top-5 pinned rows by cosine
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from train.store import sql
from train.store.index import PinnedIndex
from train.store.keys import content_key, model_fingerprint, tensor_bytes
from train.store.memory import PendingUses, VectorLRU
from train.store.schema import (
    DTYPES,
    check_database_file,
    ensure_schema,
    vector_from_blob,
)

__all__ = ["EmbeddingStore", "content_key", "model_fingerprint"]

_log = logging.getLogger(__name__)
# Hits on cached rows are written in batches: with the next put, or once this many keys
# or this many seconds have piled up (eviction order is all they change).
_USES_PER_WRITE, _USES_MAX_AGE_S = 16_384, 2.0


class EmbeddingStore:
    """Vectors ``[dim]`` by content key for one model ``fingerprint``, in SQLite at ``path``.

    ``dim``: the vector width (``None``: taken from the first stored vector).
    ``lru_size``: hot vectors kept in memory (0 disables the LRU).
    ``max_cached_bytes``: the most bytes this fingerprint's cached (``pinned=False``) rows
    may hold (``None``: unbounded); enforced by this object's puts, and at open. Pinned
    rows never count and are never evicted.

    Thread-safe: each thread gets its own SQLite connection; writes are serialised. Many
    processes may open the same file (WAL: readers never block on the writer). Another
    process's evictions and deletions reach this object's LRU only as its rows age out.

    Errors name the path: ``ValueError`` when ``path`` is not an embedding store (a
    directory, another kind of file, another database, a newer schema), ``OSError`` when
    it cannot be read or written now (read-only, disk full, locked past 30 s).

    Example::

        with EmbeddingStore(tmp / "e.sqlite", fingerprint="abc", dim=3) as s:
            s.put_many({"k1": torch.ones(3), "k2": torch.zeros(3)})
            s.get_many(["k1", "nope"])   # {"k1": tensor([1., 1., 1.])}
            s.stats()    # {"pinned": 2, "cached": 0, "cached_bytes": 0, "evicted": 0}
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fingerprint: str,
        *,
        dim: int | None = None,
        lru_size: int = 10_000,
        max_cached_bytes: int | None = None,
    ):
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(
                f"EmbeddingStore: fingerprint must be a non-empty str, got {fingerprint!r}"
            )
        if dim is not None and (not isinstance(dim, int) or dim < 1):
            raise ValueError(f"EmbeddingStore: dim must be an int >= 1 or None, got {dim!r}")
        if not isinstance(lru_size, int) or lru_size < 0:
            raise ValueError(f"EmbeddingStore: lru_size must be an int >= 0, got {lru_size!r}")
        if max_cached_bytes is not None and (
            not isinstance(max_cached_bytes, int)
            or isinstance(max_cached_bytes, bool)
            or max_cached_bytes < 0
        ):
            raise ValueError(
                "EmbeddingStore: max_cached_bytes must be an int >= 0 or None, "
                f"got {max_cached_bytes!r}"
            )
        self.path = os.fspath(path)
        check_database_file(self.path)
        self.fingerprint = fingerprint
        self.max_cached_bytes = max_cached_bytes
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._lru = VectorLRU(lru_size)
        self._uses = PendingUses(max_keys=_USES_PER_WRITE, max_age_s=_USES_MAX_AGE_S)
        self._index = PinnedIndex()
        self._closed = False
        try:
            with self._sql_errors("open"):
                conn = self._conn()
                with self._write_lock:
                    ensure_schema(conn, self.path)
                row = conn.execute(
                    "SELECT dim FROM embeddings WHERE fingerprint = ? LIMIT 1", (fingerprint,)
                ).fetchone()
            if row is not None and dim is not None and row[0] != dim:
                raise ValueError(
                    f"EmbeddingStore: {self.path} holds dim={row[0]} vectors for this "
                    f"fingerprint, but dim={dim} was given"
                )
            self.dim = dim if dim is not None else (row[0] if row else None)
            if max_cached_bytes is not None and self.stats()["cached_bytes"] > max_cached_bytes:
                with self._transaction("evict from") as conn:
                    sql.clock_of(conn, fingerprint)
                    self._evict(conn)
        except BaseException:
            self._close_connections()
            raise

    # -- connections and transactions ----------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError(f"EmbeddingStore({self.path!r}) is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # Autocommit mode: transactions are opened explicitly with BEGIN IMMEDIATE.
            conn = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            with self._conns_lock:
                self._conns.append(conn)
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a killed process (only a power cut
            # can lose the last commits), at a fraction of FULL's fsync cost.
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _sql_errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as e:  # read-only, disk full, locked, I/O error
            hint = ""
            if "unable to open" in str(e) or "readonly" in str(e):
                hint = " (a store writes its file, and -wal and -shm files beside it)"
            raise OSError(f"EmbeddingStore: could not {doing} {self.path}: {e}{hint}") from e
        except sqlite3.DatabaseError as e:  # not a database, or a corrupted one
            raise ValueError(
                f"EmbeddingStore: {self.path} is not a usable SQLite database: {e}"
            ) from e

    @contextlib.contextmanager
    def _transaction(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._sql_errors(doing), self._write_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # SQLite has already rolled back after some errors (a full disk).
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _close_connections(self) -> None:
        self._closed = True
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()

    def close(self) -> None:
        """Write pending hit recency, then close every connection this store opened (from
        any thread). Idempotent."""
        if self._closed:
            return
        self._write_uses_now()
        self._close_connections()
        self._lru.clear()
        self._index.clear()

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        """Pinned vectors stored for this fingerprint (the items ``search`` searches)."""
        return self.stats()["pinned"]

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore({self.path!r}, fingerprint={self.fingerprint[:12]!r}, dim={self.dim})"
        )

    def stats(self) -> dict[str, int]:
        """This fingerprint's rows: ``{"pinned": rows, "cached": rows, "cached_bytes": their
        vector + meta bytes, "evicted": cached rows evicted since the file was made}``."""
        with self._sql_errors("read"):
            return sql.account(self._conn(), self.fingerprint)

    # -- the recency of hits -------------------------------------------------------------

    @property
    def lru_size(self) -> int:
        """How many hot vectors are kept in memory."""
        return self._lru.size

    def lru_keys(self) -> list[str]:
        """Keys in the in-memory LRU, least recently used first."""
        return self._lru.keys()

    def _write_uses(self, conn: sqlite3.Connection, clock: int) -> int:
        # Inside a write transaction. If it fails the hits are lost: only eviction order
        # depended on them.
        return sql.touch(conn, self.fingerprint, self._uses.take(), clock)

    def _write_uses_now(self) -> None:
        if not self._uses:
            return
        try:
            with self._transaction("record hits in") as conn:
                clock = self._write_uses(conn, sql.clock_of(conn, self.fingerprint))
                sql.set_clock(conn, self.fingerprint, clock)
        except OSError:  # a read-only or full store still serves reads
            _log.warning("could not record recent hits in %s", self.path, exc_info=True)

    # -- get / put / delete --------------------------------------------------------------

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
        """``{key: vector [dim]}`` for the keys stored under this fingerprint, pinned or
        cached (misses are absent), in request order. Hot keys come from the LRU, the rest
        in a few SQL queries; a hit on a cached row makes it the most recently used."""
        keys = self._check_keys(keys, "get_many")
        found = self._lru.lookup(keys)
        missing = [key for key in dict.fromkeys(keys) if key not in found]
        read: list[tuple[str, torch.Tensor, bool]] = []
        if missing:
            with self._sql_errors("read"):
                rows = sql.select_rows(self._conn(), self.fingerprint, missing)
            read = [(key, vector_from_blob(b, dtype), bool(p)) for key, dtype, b, p in rows]
        self._lru.remember(read)
        found.update((key, (vec, pinned)) for key, vec, pinned in read)
        if self._uses.note([key for key in keys if key in found and not found[key][1]]):
            self._write_uses_now()
        return {key: found[key][0].clone() for key in keys if key in found}

    def get(self, key: str) -> torch.Tensor | None:
        """The vector ``[dim]`` stored under ``key``, or ``None``."""
        return self.get_many([key]).get(key)

    def _check_vector(self, key: str, vec: Any, dim: int | None) -> torch.Tensor:
        if not isinstance(vec, torch.Tensor) or str(vec.dtype).removeprefix("torch.") not in DTYPES:
            got = vec.dtype if isinstance(vec, torch.Tensor) else type(vec).__name__
            raise TypeError(f"put_many: items[{key!r}] must be a float tensor [dim], got {got}")
        if vec.ndim != 1 or (dim is not None and vec.shape[0] != dim):
            raise ValueError(
                f"put_many: items[{key!r}] must have shape [{dim if dim else 'dim'}], "
                f"got {list(vec.shape)}"
            )
        return vec.detach().cpu().contiguous()

    def put_many(
        self,
        items: Mapping[str, torch.Tensor],
        meta: Mapping[str, str] | None = None,
        *,
        pinned: bool = True,
    ) -> None:
        """Store ``{key: vector [dim]}`` in one transaction (all or none, evictions
        included), replacing the vectors under keys already stored. ``meta``: an optional
        string per key (the text, a file name) kept beside the vector; a put without one
        keeps the meta already there.

        ``pinned=True``: the rows are items, kept until deleted, searched. ``pinned=False``:
        cached rows, evictable; a key already pinned stays pinned (its vector is updated),
        and a pinned put of a cached key pins it. When the cached rows pass
        ``max_cached_bytes`` the least recently used go first, and the batch's own rows
        count as used in order: a batch bigger than the cap keeps its longest tail that
        fits (none of it, if its last row alone is too big).
        """
        if not isinstance(items, Mapping):
            raise TypeError(
                f"put_many: items must be a dict of key -> tensor, got {type(items).__name__}"
            )
        if not isinstance(pinned, bool):
            raise TypeError(f"put_many: pinned must be True or False, got {pinned!r}")
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
            vectors[key] = vec = self._check_vector(key, items[key], dim)
            dim = vec.shape[0]
        if not vectors:
            return
        rows = [
            (key, dim, str(v.dtype).removeprefix("torch."), tensor_bytes(v), meta.get(key), pinned)
            for key, v in vectors.items()
        ]
        with self._transaction("write to") as conn:
            clock = self._write_uses(conn, sql.clock_of(conn, self.fingerprint))
            clock = sql.upsert(conn, self.fingerprint, rows, clock)
            sql.set_clock(conn, self.fingerprint, clock)
            evicted = set(self._evict(conn))
        self.dim = dim
        self._lru.remember((k, v.clone(), pinned) for k, v in vectors.items() if k not in evicted)

    def put(
        self, key: str, vector: torch.Tensor, meta: str | None = None, *, pinned: bool = True
    ) -> None:
        """Store one vector ``[dim]`` under ``key`` (see :meth:`put_many`)."""
        self.put_many({key: vector}, None if meta is None else {key: meta}, pinned=pinned)

    def delete_many(self, keys: list[str]) -> int:
        """Delete these keys' rows, pinned or cached, in one transaction; how many existed."""
        keys = list(dict.fromkeys(self._check_keys(keys, "delete_many")))
        with self._transaction("delete from") as conn:
            deleted = sql.delete(conn, self.fingerprint, keys)
        self._lru.forget(keys)
        self._uses.drop(keys)
        return deleted

    def meta_many(self, keys: list[str]) -> dict[str, str]:
        """The ``meta`` strings stored beside ``keys`` (keys without one are absent)."""
        keys = list(dict.fromkeys(self._check_keys(keys, "meta_many")))
        with self._sql_errors("read"):
            return sql.select_meta(self._conn(), self.fingerprint, keys)

    def _evict(self, conn: sqlite3.Connection) -> list[str]:
        # Inside a write transaction, after clock_of: the victims leave memory too.
        if self.max_cached_bytes is None:
            return []
        victims = sql.evict(conn, self.fingerprint, self.max_cached_bytes)
        self._lru.forget(victims)
        self._uses.drop(victims)
        return victims

    # -- search --------------------------------------------------------------------------

    def search(
        self, query: torch.Tensor, k: int, *, metric: str = "cosine"
    ) -> tuple[torch.Tensor, list[list[str]]]:
        """Exact top-``k`` pinned vectors for each query, best first (cached rows are
        never results).

        ``query``: ``[dim]`` or ``[q, dim]``; ``metric``: ``"cosine"`` or ``"dot"``.
        Returns ``(scores [q, min(k, len(self))], keys: q lists of as many keys)``.

        Example: ``scores, keys = store.search(store.get(key), k=3)`` -> ``keys[0][0] == key``.
        """
        with self._sql_errors("search"):
            return self._index.search(
                self._conn(), self.fingerprint, query, k, metric=metric, dim=self.dim
            )
