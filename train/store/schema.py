"""The embedding store's SQLite schema, its cache accounting, and the upgrade of older files.

Tables (schema version 2, kept in ``PRAGMA user_version``):

- ``embeddings``: one row per ``(fingerprint, key)``: ``dim``, ``dtype``, ``vector`` bytes,
  ``meta``, ``pinned`` (1: a user's item, kept until deleted; 0: a cached embedding that
  may be evicted) and ``written``, the tick of the row's last write (search reads the
  pinned rows written since it last looked).
- ``cache_lru``: one row per cached row: ``used``, the tick of its last write or hit; the
  least recently used is evicted first.
- ``fingerprints``: per fingerprint, the ``clock`` (the last tick handed out: ticks are
  unique and increasing), the ``cached_bytes`` of its cached rows and the count of rows
  ever ``evicted``.

Triggers keep ``cached_bytes`` equal to the sum of :data:`ROW_BYTES` over the cached rows,
and ``cache_lru`` in step with them, on every insert, update and delete, so no code path
can forget the accounting, and eviction reads one row instead of summing the table.

Files made by the first schema (no ``pinned``/``written`` columns, ``user_version`` 0)
are upgraded in place in one transaction: their rows become pinned. Example::

    conn = sqlite3.connect(path, isolation_level=None)
    ensure_schema(conn, path)       # creates, upgrades, or checks and returns
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator

import torch

__all__ = [
    "DTYPES",
    "ROW_BYTES",
    "SCHEMA_VERSION",
    "check_database_file",
    "ensure_schema",
    "read_snapshot",
    "vector_from_blob",
]

SCHEMA_VERSION = 2
_SQLITE_MAGIC = b"SQLite format 3\x00"
# A row's size for the cache cap: its vector bytes plus its meta's UTF-8 bytes.
ROW_BYTES = "(length({row}.vector) + coalesce(length(CAST({row}.meta AS BLOB)), 0))"
# The vector dtypes a row may hold, by their torch name without "torch.".
DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
_FIRST_COLUMNS = {"fingerprint", "key", "dim", "dtype", "vector", "meta"}

_EMBEDDINGS = """
CREATE TABLE embeddings (
    fingerprint TEXT NOT NULL,
    key TEXT NOT NULL,
    dim INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    vector BLOB NOT NULL,
    meta TEXT,
    pinned INTEGER NOT NULL DEFAULT 1,
    written INTEGER NOT NULL DEFAULT 0,
    UNIQUE (fingerprint, key)
)
"""
# Version 1 -> 2: the same two columns, so an upgraded file equals a new one row for row.
_UPGRADE_FROM_1 = (
    "ALTER TABLE embeddings ADD COLUMN pinned INTEGER NOT NULL DEFAULT 1",
    "ALTER TABLE embeddings ADD COLUMN written INTEGER NOT NULL DEFAULT 0",
)
_NEW, _OLD = ROW_BYTES.format(row="NEW"), ROW_BYTES.format(row="OLD")
# A cached row's recency entry follows its last write (a hit updates it separately). An
# upsert, not INSERT OR REPLACE: inside a trigger the outer statement's policy would win.
_RECENCY_OF_NEW = """INSERT INTO cache_lru (fingerprint, key, used)
        SELECT NEW.fingerprint, NEW.key, NEW.written WHERE NEW.pinned = 0
        ON CONFLICT (fingerprint, key) DO UPDATE SET used = excluded.used;"""
_COMMON = (
    """CREATE TABLE fingerprints (
        fingerprint TEXT PRIMARY KEY,
        clock INTEGER NOT NULL DEFAULT 0,
        cached_bytes INTEGER NOT NULL DEFAULT 0,
        evicted INTEGER NOT NULL DEFAULT 0
    )""",
    # Recency lives in its own narrow table: a hit rewrites ~150 bytes there, where an
    # UPDATE of the embeddings row would rewrite its whole vector (6x slower at 2 KiB).
    """CREATE TABLE cache_lru (
        fingerprint TEXT NOT NULL,
        key TEXT NOT NULL,
        used INTEGER NOT NULL,
        PRIMARY KEY (fingerprint, key)
    ) WITHOUT ROWID""",
    "CREATE INDEX cache_lru_by_use ON cache_lru (fingerprint, used)",
    # Search reads the pinned rows written after the last tick it saw.
    "CREATE INDEX embeddings_by_write ON embeddings (fingerprint, pinned, written)",
    f"""CREATE TRIGGER cached_row_inserted AFTER INSERT ON embeddings WHEN NEW.pinned = 0
    BEGIN
        INSERT OR IGNORE INTO fingerprints (fingerprint) VALUES (NEW.fingerprint);
        UPDATE fingerprints SET cached_bytes = cached_bytes + {_NEW}
        WHERE fingerprint = NEW.fingerprint;
        {_RECENCY_OF_NEW}
    END""",
    f"""CREATE TRIGGER cached_row_deleted AFTER DELETE ON embeddings WHEN OLD.pinned = 0
    BEGIN
        UPDATE fingerprints SET cached_bytes = cached_bytes - {_OLD}
        WHERE fingerprint = OLD.fingerprint;
        DELETE FROM cache_lru WHERE fingerprint = OLD.fingerprint AND key = OLD.key;
    END""",
    # Every write sets the vector: this fires on each, and on a change of class.
    f"""CREATE TRIGGER cached_row_updated AFTER UPDATE OF vector, meta, pinned ON embeddings
    WHEN OLD.pinned = 0 OR NEW.pinned = 0
    BEGIN
        UPDATE fingerprints
        SET cached_bytes = cached_bytes - (OLD.pinned = 0) * {_OLD} + (NEW.pinned = 0) * {_NEW}
        WHERE fingerprint = NEW.fingerprint;
        DELETE FROM cache_lru
        WHERE NEW.pinned = 1 AND fingerprint = NEW.fingerprint AND key = NEW.key;
        {_RECENCY_OF_NEW}
    END""",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)


def check_database_file(path: str) -> None:
    """``ValueError`` naming ``path`` unless it is an SQLite file, an empty file, or absent
    in an existing folder (where SQLite creates it). Reads the first 16 bytes at most.

    Example: ``check_database_file("notes.txt")`` -> ``ValueError: EmbeddingStore:
    notes.txt is not an SQLite database (it starts with b'# my notes\\n')``.
    """
    if os.path.isdir(path):
        raise ValueError(f"EmbeddingStore: {path} is a directory, not an SQLite database file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"EmbeddingStore: {path}: the folder {folder} does not exist")
    if not os.path.exists(path):
        return
    try:
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except OSError as e:
        raise ValueError(f"EmbeddingStore: cannot read {path}: {e.strerror or e}") from e
    if head and head != _SQLITE_MAGIC:
        raise ValueError(
            f"EmbeddingStore: {path} is not an SQLite database (it starts with {head!r})"
        )


def ensure_schema(conn: sqlite3.Connection, path: str) -> None:
    """Bring the database behind ``conn`` (autocommit mode) to :data:`SCHEMA_VERSION`:
    create it, upgrade a first-schema file in place, or only check (one read, no write,
    when it is current). All in one transaction: a failure leaves the file as it was.

    ``ValueError`` naming ``path`` for a database that is not an embedding store, or one
    written by a newer fmm.
    """
    if _version(conn, path) == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-read under the write lock: another process may have upgraded it meanwhile.
        if _version(conn, path) != SCHEMA_VERSION:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(embeddings)")}
            if not columns:
                _refuse_foreign(conn, path)
                steps: tuple[str, ...] = (_EMBEDDINGS, *_COMMON)
            elif columns == _FIRST_COLUMNS:
                steps = (*_UPGRADE_FROM_1, *_COMMON)
            else:
                raise ValueError(
                    f"EmbeddingStore: {path} has an 'embeddings' table that is not an "
                    f"embedding store's (columns {sorted(columns)})"
                )
            for statement in steps:
                conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _version(conn: sqlite3.Connection, path: str) -> int:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"EmbeddingStore: {path} has store schema {version}, newer than this fmm's "
            f"{SCHEMA_VERSION}: upgrade fmm to open it"
        )
    return version


def _refuse_foreign(conn: sqlite3.Connection, path: str) -> None:
    # A typo'd --store path must not grow our tables inside someone else's database.
    tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    if tables:
        raise ValueError(
            f"EmbeddingStore: {path} is an SQLite database but not an embedding store "
            f"(it has tables {sorted(tables)[:5]} and no 'embeddings')"
        )


def vector_from_blob(blob: bytes, dtype: str) -> torch.Tensor:
    """A row's vector ``[dim]`` from its bytes and dtype name; ``ValueError`` for a dtype
    outside :data:`DTYPES`. Example: ``vector_from_blob(bytes(12), "float32")`` -> 3 zeros."""
    if dtype not in DTYPES:
        raise ValueError(f"EmbeddingStore: a row has unknown dtype {dtype!r}")
    # bytearray: a writable buffer the tensor owns, so it outlives the SQLite row.
    return torch.frombuffer(bytearray(blob), dtype=getattr(torch, dtype))


@contextlib.contextmanager
def read_snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """Reads on ``conn`` (autocommit mode) inside the block see one snapshot of the file,
    so a count and the rows it counted agree while another connection writes.

    Example: ``with read_snapshot(conn): n = count(conn); rows = read(conn)``.
    """
    conn.execute("BEGIN")
    try:
        yield
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")
