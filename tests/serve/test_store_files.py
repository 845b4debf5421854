"""train.store and its file: a first-schema file is upgraded in place (atomically, its rows
pinned); what is not a store is refused with a one-line error naming the path; a store that
cannot write (read-only, full disk) says so, naming the path, and loses nothing."""

import os
import shutil
import sqlite3
import subprocess
import threading

import pytest
import torch

from train.store import EmbeddingStore
from train.store import schema as store_schema

# The table as the first train.store created it (no pinned/written columns, user_version 0).
FIRST_SCHEMA = """
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


def _vec(i: int, dim: int = 4) -> torch.Tensor:
    return (torch.arange(dim, dtype=torch.float64) * 0.37 + i).sin().float()


@pytest.fixture
def first_schema_file(tmp_path):
    """A store file written by the first schema: five rows of fingerprint "fp", one of "other"."""
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(FIRST_SCHEMA)
    rows = [("fp", f"k{i}", 4, "float32", _vec(i).numpy().tobytes(), f"text {i}") for i in range(5)]
    rows.append(("other", "k0", 4, "float32", _vec(9).numpy().tobytes(), None))
    conn.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?, ?, ?)", rows)
    conn.commit()
    conn.close()
    return path


def _schema(path) -> tuple[int, list[str]]:
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        return version, [row[1] for row in conn.execute("PRAGMA table_info(embeddings)")]
    finally:
        conn.close()


def test_a_first_schema_file_is_upgraded_in_place_and_its_rows_become_pinned(first_schema_file):
    with EmbeddingStore(first_schema_file, "fp", max_cached_bytes=16) as store:
        assert store.dim == 4 and len(store) == 5
        assert store.stats() == {"pinned": 5, "cached": 0, "cached_bytes": 0, "evicted": 0}
        assert all(torch.equal(store.get(f"k{i}"), _vec(i)) for i in range(5))
        assert store.meta_many(["k1"]) == {"k1": "text 1"}
        assert store.search(_vec(3), k=1)[1] == [["k3"]]
        store.put_many({"c1": _vec(11), "c2": _vec(12)}, pinned=False)  # 32 bytes > 16
        assert store.stats()["cached"] == 1 and len(store) == 5
    assert _schema(first_schema_file) == (
        store_schema.SCHEMA_VERSION,
        ["fingerprint", "key", "dim", "dtype", "vector", "meta", "pinned", "written"],
    )
    with EmbeddingStore(first_schema_file, "other") as other:  # other fingerprints too
        assert len(other) == 1 and torch.equal(other.get("k0"), _vec(9))


def test_stores_opening_a_first_schema_file_at_once_upgrade_it_once(first_schema_file):
    errors, stores = [], []

    def open_one():
        try:
            stores.append(EmbeddingStore(first_schema_file, "fp"))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert [len(s) for s in stores] == [5] * 4
    for s in stores:
        s.close()


def test_an_upgrade_that_fails_midway_leaves_the_file_as_it_was(first_schema_file, monkeypatch):
    failing = (*store_schema._COMMON[:-1], "SELECT no_such_function()", store_schema._COMMON[-1])
    monkeypatch.setattr(store_schema, "_COMMON", failing)
    with pytest.raises(OSError, match=rf"could not open {first_schema_file}: .*no_such_function"):
        EmbeddingStore(first_schema_file, "fp")
    assert _schema(first_schema_file) == (
        0,
        ["fingerprint", "key", "dim", "dtype", "vector", "meta"],
    )
    monkeypatch.undo()
    with EmbeddingStore(first_schema_file, "fp") as store:
        assert len(store) == 5


def test_a_file_that_is_not_a_store_is_refused_naming_the_path(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("these are my notes, not a database\n")
    with pytest.raises(ValueError, match=rf"{text} is not an SQLite database .*b'these are my no"):
        EmbeddingStore(text, "fp")
    assert text.read_text() == "these are my notes, not a database\n"  # untouched
    with pytest.raises(ValueError, match=rf"{tmp_path} is a directory"):
        EmbeddingStore(tmp_path, "fp")
    with pytest.raises(ValueError, match=r"the folder .*nowhere does not exist"):
        EmbeddingStore(tmp_path / "nowhere" / "s.sqlite", "fp")
    foreign = tmp_path / "app.sqlite"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match=rf"{foreign} is an SQLite database but not an embedding"):
        EmbeddingStore(foreign, "fp")
    newer = tmp_path / "newer.sqlite"
    EmbeddingStore(newer, "fp").close()
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(ValueError, match=rf"{newer} has store schema 99, newer than"):
        EmbeddingStore(newer, "fp")
    empty = tmp_path / "empty.sqlite"
    empty.touch()  # an empty file is a new database to SQLite, and to us
    with EmbeddingStore(empty, "fp") as store:
        assert len(store) == 0


def test_every_refusal_is_one_line(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x01binary\nnot sqlite")
    for path in (tmp_path / "bad", tmp_path):
        with pytest.raises(ValueError) as info:
            EmbeddingStore(path, "fp")
        assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_full_disk_fails_the_put_naming_the_path_and_loses_nothing(tmp_path):
    path = tmp_path / "full.sqlite"
    with EmbeddingStore(path, "fp", dim=64, lru_size=0) as store:
        store.put_many({f"k{i}": _vec(i, 64) for i in range(10)})
        conn = store._conn()  # this thread's connection: cap its file at today's size
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(OSError, match=rf"could not write to {path}: database or disk is full"):
            store.put_many({f"new{i}": _vec(i, 64) for i in range(500)})
        assert len(store) == 10 and store.get("new0") is None  # all or nothing
        conn.execute("PRAGMA max_page_count = 1000000")
        store.put("new0", _vec(0, 64))
        assert len(store) == 11


def test_a_read_only_store_refuses_writes_naming_the_path_and_still_serves_reads(tmp_path, caplog):
    path = tmp_path / "ro.sqlite"
    with EmbeddingStore(path, "fp", dim=4, max_cached_bytes=100) as store:
        store.put("item", _vec(0))
        store.put("cached", _vec(1), pinned=False)
        store._conn().execute("PRAGMA query_only = 1")  # SQLite's read-only mode
        with pytest.raises(OSError, match=rf"could not write to {path}: .*readonly"):
            store.put("x", _vec(2))
        for _ in range(3):  # hits on a cached row whose recency cannot be written
            assert torch.equal(store.get_many(["cached", "item"])["cached"], _vec(1))
        assert store.search(_vec(0), k=1)[1] == [["item"]]
    # close() could not write the pending hits either: it says so and does not raise
    assert f"could not record recent hits in {path}" in caplog.text


def _read_only(folder):
    """Make ``folder`` read-only; a function that undoes it, or None where this user cannot
    (root ignores permission bits: the immutable attribute is what stops it)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", folder]).returncode == 0:
        return lambda: subprocess.run(["chattr", "-i", folder], check=True)
    return None


def test_a_store_in_a_read_only_folder_fails_to_open_naming_the_path(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "s.sqlite"
    with EmbeddingStore(path, "fp") as store:
        store.put("k", _vec(0))
    before = path.read_bytes()
    undo = _read_only(folder)
    if undo is None:
        pytest.skip("cannot make a folder read-only here (root without chattr)")
    try:
        with pytest.raises(OSError, match=rf"could not open {path}: .*-wal and -shm"):
            EmbeddingStore(path, "fp")
    finally:
        undo()
    assert path.read_bytes() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_file_is_refused_naming_the_path(tmp_path):
    path = tmp_path / "secret.sqlite"
    EmbeddingStore(path, "fp").close()
    path.chmod(0)
    try:
        with pytest.raises(ValueError, match=rf"cannot read {path}: Permission denied"):
            EmbeddingStore(path, "fp")
    finally:
        path.chmod(0o644)
