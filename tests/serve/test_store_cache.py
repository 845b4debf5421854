"""train.store's bounded cache: cached (pinned=False) rows stay under max_cached_bytes, least
recently used evicted first, while pinned rows are never evicted and alone are searched."""

import sqlite3
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from train.store import EmbeddingStore

DIM = 3  # float32: 12 bytes a vector


def _vec(i: int) -> torch.Tensor:
    return (torch.arange(DIM, dtype=torch.float64) * 0.37 + i).sin().float()


def _rows(path) -> dict[str, int]:
    """``{key: pinned}`` of every row in the file, read past the store (no LRU, no hits);
    checks on the way that the cached rows, and they alone, have a recency entry."""
    conn = sqlite3.connect(path)
    try:
        rows = dict(conn.execute("SELECT key, pinned FROM embeddings").fetchall())
        recency = [key for (key,) in conn.execute("SELECT key FROM cache_lru")]
    finally:
        conn.close()
    assert sorted(recency) == sorted(k for k, pinned in rows.items() if not pinned)
    return rows


class Reference:
    """What the store should hold: pinned keys, and cached keys least recently used first."""

    def __init__(self, cap: int):
        self.cap = cap
        self.vectors: dict[str, torch.Tensor] = {}
        self.meta: dict[str, str] = {}
        self.pinned: set[str] = set()
        self.cached: list[str] = []  # least recently used first

    def size(self, key: str) -> int:
        return self.vectors[key].numel() * 4 + len(self.meta.get(key, "").encode("utf-8"))

    def use(self, key: str) -> None:
        if key in self.cached:
            self.cached.remove(key)
            self.cached.append(key)

    def put(self, items: dict, meta: dict, pinned: bool) -> None:
        for key, vec in items.items():
            self.vectors[key] = vec
            if key in meta:
                self.meta[key] = meta[key]
            if pinned:
                self.pinned.add(key)
                if key in self.cached:
                    self.cached.remove(key)
            elif key not in self.pinned:
                self.cached = [k for k in self.cached if k != key] + [key]
        while sum(self.size(k) for k in self.cached) > self.cap:
            self.delete([self.cached[0]])

    def delete(self, keys) -> None:
        for key in keys:
            self.pinned.discard(key)
            self.cached = [k for k in self.cached if k != key]
            self.vectors.pop(key, None)
            self.meta.pop(key, None)


# Few keys and caps of a few rows, so that hits, pins and evictions keep meeting.
KEYS = [f"k{i}" for i in range(10)]
METAS = [None, None, None, "", "é", "a longer meta"]  # "é": 1 character, 2 bytes


@given(
    cap=st.sampled_from([0, 26, 40, 40, 64]),
    lru_size=st.sampled_from([0, 2, 100]),
    data=st.data(),
)
def test_any_sequence_keeps_the_cap_every_pinned_row_and_evicts_least_recently_used(
    cap, lru_size, data
):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.sqlite"

        def open_store() -> EmbeddingStore:
            return EmbeddingStore(path, "fp", dim=DIM, lru_size=lru_size, max_cached_bytes=cap)

        store, ref = open_store(), Reference(cap)
        try:
            for step in range(data.draw(st.integers(10, 40), label="steps")):
                op = data.draw(st.sampled_from(["put", "put", "get", "get", "delete", "reopen"]))
                if op == "put":
                    keys = data.draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=2,
                                              unique=True))  # fmt: skip
                    pinned = data.draw(st.sampled_from([False, False, True]), label="pinned")
                    items = {k: _vec(step * 10 + i) for i, k in enumerate(keys)}
                    metas = {k: data.draw(st.sampled_from(METAS), label=k) for k in keys}
                    meta = {k: m for k, m in metas.items() if m is not None}
                    store.put_many(items, meta=meta, pinned=pinned)
                    ref.put(items, meta, pinned)
                elif op == "get":  # mostly keys that are cached now: hits that matter
                    pool = st.sampled_from(ref.cached) if ref.cached else st.sampled_from(KEYS)
                    keys = data.draw(st.lists(st.one_of(pool, st.sampled_from([*KEYS, "absent"])),
                                              max_size=3))  # fmt: skip
                    assert set(store.get_many(keys)) == {k for k in keys if k in ref.vectors}
                    for key in keys:
                        ref.use(key)
                elif op == "delete":
                    keys = data.draw(st.lists(st.sampled_from(KEYS), max_size=2))
                    assert store.delete_many(keys) == len(set(keys) & set(ref.vectors))
                    ref.delete(keys)
                else:
                    store.close()
                    store = open_store()
                stats = store.stats()
                assert stats["cached_bytes"] <= cap
                assert stats["cached_bytes"] == sum(ref.size(k) for k in ref.cached)
                assert _rows(path) == {**{k: 1 for k in ref.pinned}, **{k: 0 for k in ref.cached}}
                assert len(store) == stats["pinned"] == len(ref.pinned)
                assert set(store.lru_keys()) <= set(ref.vectors)  # evicted rows leave memory
            got = store.get_many(sorted(ref.pinned))
            assert all(torch.equal(got[k], ref.vectors[k]) for k in ref.pinned)
            assert store.meta_many(sorted(ref.pinned)) == {
                k: ref.meta[k] for k in ref.pinned if k in ref.meta
            }
        finally:
            store.close()


@pytest.fixture
def cache(tmp_path):
    # Room for three 12-byte vectors without meta.
    with EmbeddingStore(tmp_path / "c.sqlite", "fp", dim=DIM, max_cached_bytes=36) as s:
        yield s


def test_a_recently_hit_cached_row_outlives_an_older_one(cache):
    cache.put_many({"a": _vec(0), "b": _vec(1), "c": _vec(2)}, pinned=False)
    assert torch.equal(cache.get("a"), _vec(0))  # a is now fresher than b and c
    cache.put("d", _vec(3), pinned=False)
    assert _rows(cache.path) == {"a": 0, "c": 0, "d": 0}
    assert cache.stats() == {"pinned": 0, "cached": 3, "cached_bytes": 36, "evicted": 1}
    assert cache.get("b") is None and "b" not in cache.lru_keys()  # gone from memory too


def test_hits_reach_the_file_in_the_next_write_not_one_write_per_hit(cache):
    cache.put_many({"a": _vec(0), "b": _vec(1), "c": _vec(2)}, pinned=False)
    watcher = sqlite3.connect(cache.path)
    version = watcher.execute("PRAGMA data_version").fetchone()
    for _ in range(50):
        cache.get_many(["a", "c"])
    assert watcher.execute("PRAGMA data_version").fetchone() == version  # nothing committed
    cache.put("d", _vec(3), pinned=False)  # carries the hits: b is the oldest
    assert set(_rows(cache.path)) == {"a", "c", "d"}
    watcher.close()


def test_pending_hits_are_written_at_close(tmp_path):
    path = tmp_path / "c.sqlite"
    with EmbeddingStore(path, "fp", dim=DIM, max_cached_bytes=36) as s:
        s.put_many({"a": _vec(0), "b": _vec(1), "c": _vec(2)}, pinned=False)
        s.get("a")
    with EmbeddingStore(path, "fp", dim=DIM, max_cached_bytes=36) as s:
        s.put("d", _vec(3), pinned=False)
    assert set(_rows(path)) == {"a", "c", "d"}


def test_a_batch_bigger_than_the_cap_keeps_its_longest_tail_that_fits(cache):
    cache.put("old", _vec(9), pinned=False)
    cache.put_many({f"k{i}": _vec(i) for i in range(5)}, meta={"k4": "ab"}, pinned=False)
    assert _rows(cache.path) == {"k3": 0, "k4": 0}  # k4 holds 14 bytes: k2 no longer fits
    assert cache.stats()["cached_bytes"] == 26 and cache.stats()["evicted"] == 4
    with EmbeddingStore(cache.path, "fp", dim=DIM, max_cached_bytes=11) as tiny:
        assert tiny.stats()["cached"] == 0  # a smaller cap at open trims at once
        tiny.put("x", _vec(0), pinned=False)  # 12 bytes > 11: kept nowhere, no error
        assert tiny.get("x") is None and tiny.stats()["cached_bytes"] == 0


def test_pinned_rows_are_never_evicted_and_never_count(cache):
    cache.put_many({f"p{i}": _vec(i) for i in range(10)})
    cache.put_many({f"c{i}": _vec(i) for i in range(10)}, pinned=False)
    stats = cache.stats()
    assert stats["pinned"] == 10 and stats["cached"] == 3 and stats["cached_bytes"] == 36
    assert len(cache) == 10 and len(cache.get_many([f"p{i}" for i in range(10)])) == 10


def test_a_pinned_put_pins_a_cached_key_and_a_cached_put_never_unpins(cache):
    cache.put("k", _vec(0), meta="a text", pinned=False)
    cache.put("k", _vec(1))  # now an item: searched, no longer counted as cache
    assert _rows(cache.path) == {"k": 1} and cache.stats()["cached_bytes"] == 0
    cache.put("k", _vec(2), pinned=False)  # a cached put over an item updates its vector
    assert _rows(cache.path) == {"k": 1} and torch.equal(cache.get("k"), _vec(2))
    assert cache.meta_many(["k"]) == {"k": "a text"}  # a put without meta keeps it
    cache.put_many({f"c{i}": _vec(i) for i in range(5)}, pinned=False)
    assert _rows(cache.path)["k"] == 1


def test_search_and_len_see_pinned_rows_only(cache):
    query = torch.tensor([1.0, 0.0, 0.0])
    cache.put("item", torch.tensor([0.0, 1.0, 0.0]))
    cache.put("cached", query.clone(), pinned=False)  # the perfect match, but only cached
    scores, keys = cache.search(query, k=5)
    assert keys == [["item"]] and scores.shape == (1, 1) and len(cache) == 1
    cache.put("cached", query.clone())  # pinned now: the index picks it up
    assert cache.search(query, k=5)[1] == [["cached", "item"]] and len(cache) == 2
    assert cache.delete_many(["cached", "absent"]) == 1
    assert cache.search(query, k=5)[1] == [["item"]]


def test_bad_cache_arguments_are_refused_with_a_message_naming_them(tmp_path):
    with pytest.raises(ValueError, match="max_cached_bytes must be an int >= 0 or None, got -1"):
        EmbeddingStore(tmp_path / "x.sqlite", "fp", max_cached_bytes=-1)
    with EmbeddingStore(tmp_path / "x.sqlite", "fp") as s:
        with pytest.raises(TypeError, match="pinned must be True or False, got 'no'"):
            s.put("k", _vec(0), pinned="no")
        assert s.stats() == {"pinned": 0, "cached": 0, "cached_bytes": 0, "evicted": 0}
