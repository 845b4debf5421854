"""train.store: what is put is what is got, per model fingerprint; search is exact; readers and
a writer share a store safely; a writer killed mid-batch leaves every committed row intact."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import fmm
from fmm import quant
from tests.scripts.store_writer import expected_key, expected_vector
from train.store import EmbeddingStore, content_key, model_fingerprint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path):
    with EmbeddingStore(tmp_path / "e.sqlite", "fp-a", dim=5, lru_size=3) as s:
        yield s


def _vec(i: int, dim: int = 5, dtype=torch.float32) -> torch.Tensor:
    return (torch.arange(dim, dtype=torch.float64) * 0.37 + i).sin().to(dtype)


def test_a_hit_returns_exactly_what_was_put_and_misses_are_absent(store):
    items = {content_key("text", f"item {i}"): _vec(i) for i in range(7)}
    store.put_many(items, meta={k: f"text {i}" for i, k in enumerate(items)})
    keys = list(items)
    got = store.get_many([keys[2], "absent", keys[0]])
    assert list(got) == [keys[2], keys[0]]
    for k, v in got.items():
        assert torch.equal(v, items[k]) and v.dtype == torch.float32
    assert store.get("absent") is None and len(store) == 7
    assert store.meta_many(keys[:2]) == {keys[0]: "text 0", keys[1]: "text 1"}
    got[keys[2]].zero_()  # a caller mutating a result must not corrupt the cache
    assert torch.equal(store.get(keys[2]), items[keys[2]])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_round_trip_bit_for_bit(tmp_path, dtype):
    with EmbeddingStore(tmp_path / "d.sqlite", "fp", lru_size=0) as s:
        s.put("k", _vec(3, dim=9, dtype=dtype))
        got = s.get("k")
    assert got.dtype == dtype and torch.equal(got, _vec(3, dim=9, dtype=dtype))


def test_vectors_persist_across_reopen_and_a_changed_fingerprint_misses(tmp_path):
    path = tmp_path / "e.sqlite"
    with EmbeddingStore(path, "model-1") as s:
        s.put_many({"k": _vec(1), "j": _vec(2)})
    with EmbeddingStore(path, "model-1") as s:
        assert s.dim == 5 and torch.equal(s.get("k"), _vec(1))
    with EmbeddingStore(path, "model-2") as s:
        assert s.get_many(["k", "j"]) == {} and len(s) == 0
        assert s.search(torch.ones(5), k=3)[1] == [[]]
    with pytest.raises(ValueError, match=r"holds dim=5.*dim=4"):
        EmbeddingStore(path, "model-1", dim=4)


def test_model_fingerprint_changes_with_any_config_field_or_weight_bit():
    params = {"a": {"weight": torch.randn(4, 3)}, "b": torch.zeros(2)}
    config = {"width": 3, "act": "gelu"}
    fp = model_fingerprint(config, params)
    assert len(fp) == 64 and fp == model_fingerprint(dict(reversed(config.items())), params)
    assert model_fingerprint({**config, "width": 4}, params) != fp
    nudged = {"a": {"weight": params["a"]["weight"].clone()}, "b": params["b"]}
    nudged["a"]["weight"].view(torch.int32)[0, 0] ^= 1  # one bit of one weight
    assert model_fingerprint(config, nudged) != fp
    assert model_fingerprint(config, quant.quantize(params, min_size=1)) != fp


def test_content_keys_separate_kinds_and_accept_str_or_bytes():
    assert content_key("text", "abc") == content_key("text", b"abc")
    assert content_key("text", "abc") != content_key("image", "abc")
    assert len(content_key("image", bytes(range(256)))) == 64
    with pytest.raises(ValueError, match="kind"):
        content_key("", "abc")
    with pytest.raises(TypeError, match="payload"):
        content_key("text", 3)


def test_lru_keeps_the_most_recently_used_keys(store):
    store.put_many({f"k{i}": _vec(i) for i in range(3)})
    assert store.lru_keys() == ["k0", "k1", "k2"]
    store.get("k0")  # k0 is now the freshest
    store.put("k3", _vec(3))  # evicts k1, the least recently used
    assert store.lru_keys() == ["k2", "k0", "k3"]
    assert torch.equal(store.get("k1"), _vec(1))  # still on disk; read back into the LRU
    assert store.lru_keys() == ["k0", "k3", "k1"]


def test_search_is_exact_top_k_by_cosine_and_sees_new_and_replaced_vectors(store):
    g = torch.Generator().manual_seed(0)
    vectors = {f"k{i}": torch.randn(5, generator=g) for i in range(40)}
    store.put_many(vectors)
    queries = torch.randn(3, 5, generator=g)
    scores, keys = store.search(queries, k=4)
    matrix = torch.stack(list(vectors.values()))
    ref = (
        torch.nn.functional.normalize(queries, dim=-1)
        @ torch.nn.functional.normalize(matrix, dim=-1).T
    )
    best, idx = ref.topk(4, dim=-1)
    torch.testing.assert_close(scores, best)
    assert keys == [[f"k{i}" for i in row] for row in idx.tolist()]
    store.put("k7", queries[0] * 2.0)  # replacing a key moves it to the top for query 0
    scores, keys = store.search(queries[0], k=50)
    assert keys[0][0] == "k7" and scores.shape == (1, 40) and scores[0, 0] == pytest.approx(1.0)
    dot_scores, _ = store.search(queries[0], k=1, metric="dot")
    assert dot_scores[0, 0] >= (queries[0] @ matrix.T).max() - 1e-5


def test_a_write_from_another_connection_is_visible_to_search(tmp_path):
    path = tmp_path / "e.sqlite"
    with EmbeddingStore(path, "fp", dim=3) as reader, EmbeddingStore(path, "fp", dim=3) as w:
        w.put("a", torch.tensor([1.0, 0.0, 0.0]))
        assert reader.search(torch.tensor([1.0, 0.0, 0.0]), k=2)[1] == [["a"]]
        w.put("b", torch.tensor([0.0, 1.0, 0.0]))
        assert reader.search(torch.tensor([0.0, 1.0, 0.0]), k=1)[1] == [["b"]]


def test_bad_input_is_refused_with_a_message_naming_it(store):
    store.put("k", _vec(0))
    with pytest.raises(ValueError, match=r"items\['x'\] must have shape \[5\], got \[4\]"):
        store.put("x", torch.ones(4))
    with pytest.raises(ValueError, match=r"shape \[5\], got \[1, 5\]"):
        store.put_many({"x": torch.ones(1, 5)})
    with pytest.raises(TypeError, match="float tensor"):
        store.put("x", torch.ones(5, dtype=torch.int64))
    with pytest.raises(TypeError, match="non-empty str"):
        store.get_many([1, 2])
    with pytest.raises(TypeError, match="list of str"):
        store.get_many("k")
    with pytest.raises(KeyError, match="meta has keys"):
        store.put_many({"a": _vec(1)}, meta={"b": "x"})
    with pytest.raises(ValueError, match=r"query has dim 4.*dim=5"):
        store.search(torch.ones(4), k=1)
    with pytest.raises(ValueError, match=r"query must be \[dim\] or \[q, dim\], got \[1, 1, 5\]"):
        store.search(torch.ones(1, 1, 5), k=1)
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        store.search(torch.ones(5), k=0)
    with pytest.raises(ValueError, match="metric"):
        store.search(torch.ones(5), k=1, metric="l2")
    with pytest.raises(ValueError, match="lru_size"):
        EmbeddingStore(store.path, "fp", lru_size=-1)
    assert len(store) == 1  # refused puts wrote nothing


def test_reader_threads_and_a_writer_thread_share_a_store_safely(tmp_path):
    store = EmbeddingStore(tmp_path / "e.sqlite", "fp", dim=8, lru_size=16)
    errors: list[BaseException] = []
    done = threading.Event()

    def writer():
        try:
            for b in range(30):
                store.put_many({f"{b}-{i}": _vec(b * 10 + i, dim=8) for i in range(10)})
        except BaseException as e:
            errors.append(e)
        finally:
            done.set()

    def reader(seed: int):
        try:
            while not done.is_set():
                keys = [f"{b}-{i}" for b in range(seed, 30, 4) for i in range(0, 10, 3)]
                for k, v in store.get_many(keys).items():
                    b, i = map(int, k.split("-"))
                    assert torch.equal(v, _vec(b * 10 + i, dim=8)), k
                scores, found = store.search(_vec(seed, dim=8), k=3)
                assert scores.shape[1] == len(found[0]) <= 3
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader, args=(s,)) for s in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(store) == 300
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.get("0-0")


def _kill_writer_at_batch_2(path, dim: int, batch_size: int, *extra: str) -> list[int]:
    """Run tests/scripts/store_writer.py and SIGKILL it once batch 2's transaction is under
    way; the batches it had committed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests/scripts/store_writer.py"), str(path), "fp", str(dim),
         str(batch_size), *extra],
        stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    committed = []
    try:
        for line in proc.stdout:
            event, n = line.split()
            if event == "commit":
                committed.append(int(n))
            elif int(n) == 2:
                break  # batch 2's transaction is under way
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    return committed


def test_kill_9_mid_batch_leaves_every_committed_row_intact(tmp_path):
    path, dim, batch_size = tmp_path / "killed.sqlite", 16, 4000
    committed = _kill_writer_at_batch_2(path, dim, batch_size)
    assert committed == [0, 1]
    with EmbeddingStore(path, "fp", dim=dim) as store:
        for b in committed:
            keys = [expected_key(b, i) for i in range(batch_size)]
            got = store.get_many(keys)
            assert len(got) == batch_size
            assert all(torch.equal(got[k], expected_vector(b, i, dim)) for i, k in enumerate(keys))
        # the batch in flight is all or nothing: never a torn half
        partial = store.get_many([expected_key(2, i) for i in range(batch_size)])
        assert len(partial) in (0, batch_size)
        assert len(store) == batch_size * len(committed) + len(partial)
        store.put("after", torch.ones(dim))  # and the store still takes writes
        assert torch.equal(store.get("after"), torch.ones(dim))


def test_kill_9_mid_batch_of_an_evicting_cache_leaves_the_cap_and_whole_batches(tmp_path):
    path, dim, batch_size = tmp_path / "killed.sqlite", 16, 4000
    cap = batch_size * dim * 4 * 3 // 2  # a batch and a half: every later batch evicts
    committed = _kill_writer_at_batch_2(path, dim, batch_size, "--max-cached-bytes", str(cap))
    assert committed == [0, 1]

    def after(last: int) -> set[str]:  # batch `last` whole, the second half of the one before
        half = range(batch_size // 2, batch_size)
        return {expected_key(last, i) for i in range(batch_size)} | {
            expected_key(last - 1, i) for i in half
        }

    conn = sqlite3.connect(path)
    rows = dict(conn.execute("SELECT key, pinned FROM embeddings").fetchall())
    (recount,) = conn.execute("SELECT sum(length(vector)) FROM embeddings").fetchone()
    conn.close()
    last = 2 if set(rows) == after(2) else 1  # batch 2 may have committed before the kill
    assert set(rows) == after(last) and set(rows.values()) == {0}
    with EmbeddingStore(path, "fp", dim=dim, max_cached_bytes=cap) as store:
        stats = store.stats()
        assert stats["cached_bytes"] == recount == cap and stats["pinned"] == 0
        assert stats["evicted"] == {1: batch_size // 2, 2: 3 * batch_size // 2}[last]
        got = store.get_many(sorted(rows))
        assert all(torch.equal(v, expected_vector(*map(int, k[1:].split("-")), dim))
                   for k, v in got.items())  # fmt: skip
        store.put("after", torch.ones(dim), pinned=False)  # still takes writes, cap held
        assert store.get("after") is not None and store.stats()["cached_bytes"] <= cap


def test_embeddings_of_a_real_model_are_filed_under_its_fingerprint(tmp_path):
    from models import clip

    cfg = clip.clip_tiny()
    params = clip.init(cfg, fmm.random.key(0))
    fp = model_fingerprint(cfg.to_dict(), params)
    tokens = torch.randint(0, 60, (2, 16))
    with torch.no_grad():
        emb = clip.encode_text(params, tokens, cfg=cfg)
    keys = [content_key("tokens", t.numpy().tobytes()) for t in tokens]
    with EmbeddingStore(tmp_path / "e.sqlite", fp, dim=cfg.embed_dim) as s:
        s.put_many(dict(zip(keys, emb)))
        got = s.get_many(keys)
    assert all(torch.equal(got[k], e) for k, e in zip(keys, emb))
    assert model_fingerprint(cfg.to_dict(), quant.quantize(params)) != fp
