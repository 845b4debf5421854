"""The embedding store's statements on one fingerprint's rows (schema: ``train.store.schema``).

Reads by key are chunked under SQLite's cap on bound parameters. The writes run inside a
transaction their caller opened (``BEGIN IMMEDIATE``), so ticks handed out from the
fingerprint's clock are unique and increasing across every process writing the file, and
an eviction commits with the put that needed it or not at all. Used by
``train.store.EmbeddingStore``.

Example::

    conn.execute("BEGIN IMMEDIATE")
    clock = clock_of(conn, fp)
    clock = upsert(conn, fp, rows, clock)     # rows get ticks clock+1, clock+2, ...
    set_clock(conn, fp, clock)
    victims = evict(conn, fp, cap=2**20)      # least recently used cached rows, deleted
    conn.execute("COMMIT")
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

from train.store.schema import ROW_BYTES, read_snapshot

__all__ = [
    "account",
    "clock_of",
    "delete",
    "evict",
    "select_meta",
    "select_rows",
    "set_clock",
    "touch",
    "upsert",
]

# SQLite's default cap on bound parameters per statement is 32766 (999 before 3.32).
_CHUNK = 900
_UPSERT = """
INSERT INTO embeddings (fingerprint, key, dim, dtype, vector, meta, pinned, written)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (fingerprint, key) DO UPDATE SET
    dim = excluded.dim, dtype = excluded.dtype, vector = excluded.vector,
    meta = coalesce(excluded.meta, meta), pinned = max(pinned, excluded.pinned),
    written = excluded.written
"""


def _chunks(keys: list[str]) -> Iterator[tuple[list[str], str]]:
    for i in range(0, len(keys), _CHUNK):
        chunk = keys[i : i + _CHUNK]
        yield chunk, ",".join("?" * len(chunk))


def select_rows(
    conn: sqlite3.Connection, fingerprint: str, keys: list[str]
) -> list[tuple[str, str, bytes, int]]:
    """``(key, dtype, vector bytes, pinned)`` for the stored ``keys`` (distinct), any order."""
    rows = []
    for chunk, marks in _chunks(keys):
        rows += conn.execute(
            "SELECT key, dtype, vector, pinned FROM embeddings "
            f"WHERE fingerprint = ? AND key IN ({marks})",
            (fingerprint, *chunk),
        ).fetchall()
    return rows


def select_meta(conn: sqlite3.Connection, fingerprint: str, keys: list[str]) -> dict[str, str]:
    """``{key: meta}`` for the stored ``keys`` (distinct) that have a meta string."""
    out: dict[str, str] = {}
    for chunk, marks in _chunks(keys):
        out.update(
            conn.execute(
                "SELECT key, meta FROM embeddings WHERE fingerprint = ? AND meta IS NOT NULL "
                f"AND key IN ({marks})",
                (fingerprint, *chunk),
            ).fetchall()
        )
    return out


def account(conn: sqlite3.Connection, fingerprint: str) -> dict[str, int]:
    """``{"pinned": rows, "cached": rows, "cached_bytes", "evicted"}`` from one snapshot."""
    with read_snapshot(conn):
        counts = dict(
            conn.execute(
                "SELECT pinned, count(*) FROM embeddings WHERE fingerprint = ? GROUP BY pinned",
                (fingerprint,),
            ).fetchall()
        )
        cached_bytes, evicted = conn.execute(
            "SELECT cached_bytes, evicted FROM fingerprints WHERE fingerprint = ?", (fingerprint,)
        ).fetchone() or (0, 0)
    return {
        "pinned": counts.get(1, 0),
        "cached": counts.get(0, 0),
        "cached_bytes": cached_bytes,
        "evicted": evicted,
    }


def clock_of(conn: sqlite3.Connection, fingerprint: str) -> int:
    """The last tick handed out for ``fingerprint`` (0 for a new one, whose account row
    this creates)."""
    conn.execute("INSERT OR IGNORE INTO fingerprints (fingerprint) VALUES (?)", (fingerprint,))
    return conn.execute(
        "SELECT clock FROM fingerprints WHERE fingerprint = ?", (fingerprint,)
    ).fetchone()[0]


def set_clock(conn: sqlite3.Connection, fingerprint: str, clock: int) -> None:
    """Record ``clock`` as the last tick handed out."""
    conn.execute("UPDATE fingerprints SET clock = ? WHERE fingerprint = ?", (clock, fingerprint))


def touch(conn: sqlite3.Connection, fingerprint: str, keys: list[str], clock: int) -> int:
    """Mark the cached rows of ``keys`` used, oldest first (ticks ``clock + 1 ...``); pinned
    and absent keys are skipped. Returns the new clock."""
    conn.executemany(
        "UPDATE cache_lru SET used = ? WHERE fingerprint = ? AND key = ?",
        [(clock + i, fingerprint, key) for i, key in enumerate(keys, 1)],
    )
    return clock + len(keys)


def upsert(
    conn: sqlite3.Connection,
    fingerprint: str,
    rows: list[tuple[str, int, str, bytes, str | None, bool]],
    clock: int,
) -> int:
    """Insert or update ``(key, dim, dtype, vector bytes, meta, pinned)`` rows, ticks
    ``clock + 1 ...`` in order. An existing row keeps its meta when the new one is ``None``
    and stays pinned if it was. Returns the new clock."""
    conn.executemany(
        _UPSERT,
        [
            (fingerprint, key, dim, dtype, blob, meta, int(pinned), clock + i)
            for i, (key, dim, dtype, blob, meta, pinned) in enumerate(rows, 1)
        ],
    )
    return clock + len(rows)


def delete(conn: sqlite3.Connection, fingerprint: str, keys: list[str]) -> int:
    """Delete the rows of ``keys`` (distinct), pinned or cached; how many there were."""
    deleted = 0
    for chunk, marks in _chunks(keys):
        deleted += conn.execute(
            f"DELETE FROM embeddings WHERE fingerprint = ? AND key IN ({marks})",
            (fingerprint, *chunk),
        ).rowcount
    return deleted


def evict(conn: sqlite3.Connection, fingerprint: str, cap: int) -> list[str]:
    """Delete the least recently used cached rows (lowest ``used`` tick first) until the
    cached bytes are at most ``cap``; the deleted keys, and the ``evicted`` count raised by
    them. Call after :func:`clock_of` in the same transaction (it makes the account row)."""
    (excess,) = conn.execute(
        "SELECT cached_bytes - ? FROM fingerprints WHERE fingerprint = ?", (cap, fingerprint)
    ).fetchone()
    victims: list[str] = []
    if excess <= 0:
        return victims
    # e.pinned = 0 though the triggers keep cache_lru to cached rows: an older fmm's
    # INSERT OR REPLACE deletes without firing them, and must not make an item evictable.
    cursor = conn.execute(
        f"SELECT lru.key, {ROW_BYTES.format(row='e')} FROM cache_lru AS lru "
        "JOIN embeddings AS e ON e.fingerprint = lru.fingerprint AND e.key = lru.key "
        "WHERE lru.fingerprint = ? AND e.pinned = 0 ORDER BY lru.used",
        (fingerprint,),
    )
    for key, size in cursor:
        victims.append(key)
        excess -= size
        if excess <= 0:
            break
    cursor.close()
    delete(conn, fingerprint, victims)
    conn.execute(
        "UPDATE fingerprints SET evicted = evicted + ? WHERE fingerprint = ?",
        (len(victims), fingerprint),
    )
    return victims
