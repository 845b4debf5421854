"""train.serve.engine: batching under concurrency equals direct computation; a full queue
refuses at once; timeouts, cancellation and failures free their slots."""

import asyncio
import dataclasses
import threading

import pytest
import torch

import fmm
from models import clip
from train.serve import Batcher, Engine, Metrics, Overloaded, percentile


@pytest.fixture(scope="module")
def tiny():
    cfg = dataclasses.replace(
        clip.clip_tiny(vocab_size=40, context_length=8),
        image_size=8, patch_size=4, image_width=16, image_layers=1, image_heads=2,
        text_width=16, text_layers=1, text_heads=2, embed_dim=8,
    )  # fmt: skip
    params = clip.init(cfg, fmm.random.key(0))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, cfg.vocab_size - 1, (24, cfg.context_length), generator=g)
    tokens[:, -1] = cfg.vocab_size - 1  # end-of-text: the largest id
    return cfg, params, tokens


def _blocking(release: threading.Event, seen: list):
    def fn(items):
        seen.extend(items)
        release.wait(timeout=10)
        return torch.tensor(items, dtype=torch.float32)[:, None]

    return fn


def test_concurrent_requests_equal_direct_computation_and_are_batched(tiny):
    cfg, params, tokens = tiny
    encode = lambda rows: clip.encode_text(params, torch.stack(rows), cfg=cfg)

    async def main():
        engine = Engine({"text": encode}, max_batch=8, max_wait_ms=20)
        try:
            outs = await asyncio.gather(*(engine.embed("text", [row]) for row in tokens))
            return torch.cat([vectors for vectors, _ in outs]), engine
        finally:
            await engine.aclose()

    got, engine = asyncio.run(main())
    with torch.no_grad():
        want = clip.encode_text(params, tokens, cfg=cfg)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    sizes = engine.metrics.batch_sizes["text"]
    assert sum(size * n for size, n in sizes.items()) == len(tokens)  # none lost, none twice
    assert max(sizes) > 1 and max(sizes) <= 8
    assert engine.depth == 0


def test_full_queue_refuses_at_once_and_recovers():
    release, seen = threading.Event(), []

    async def main():
        batcher = Batcher(_blocking(release, seen), max_batch=2, max_wait_ms=0, max_queue=4)
        first = asyncio.ensure_future(batcher.run([1, 2, 3]))
        await asyncio.sleep(0.05)
        assert batcher.depth == 3
        with pytest.raises(Overloaded, match="3 of 4 slots held, 2 more requested"):
            await batcher.run([4, 5])  # all or none: nothing of it was queued
        assert batcher.depth == 3
        release.set()
        assert await first == [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0])]
        assert batcher.depth == 0
        assert await batcher.run([6]) == [torch.tensor([6.0])]
        assert batcher.metrics.counters["refused_overloaded"] == 1
        await batcher.aclose()

    asyncio.run(main())
    assert 4 not in seen and 5 not in seen


def test_timeout_frees_slots_and_skips_queued_items():
    release, seen = threading.Event(), []

    async def main():
        batcher = Batcher(_blocking(release, seen), max_batch=1, max_wait_ms=0, max_queue=8)
        with pytest.raises(TimeoutError):
            await batcher.run([1, 2, 3], timeout=0.1)  # 1 is running, 2 and 3 still queued
        assert batcher.depth == 0
        release.set()
        assert await batcher.run([4], timeout=5) == [torch.tensor([4.0])]
        await batcher.aclose()

    asyncio.run(main())
    assert seen == [1, 4]  # the timed-out request's queued items never reached the model


def test_cancellation_frees_slots():
    release, seen = threading.Event(), []

    async def main():
        batcher = Batcher(_blocking(release, seen), max_batch=1, max_wait_ms=0, max_queue=8)
        task = asyncio.ensure_future(batcher.run([1, 2]))
        await asyncio.sleep(0.05)
        assert batcher.depth == 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert batcher.depth == 0
        release.set()
        assert await batcher.run([3]) == [torch.tensor([3.0])]
        await batcher.aclose()

    asyncio.run(main())
    assert seen == [1, 3]


def test_model_failure_reaches_every_request_of_its_batch_only():
    def fn(items):
        if "bad" in items:
            raise ValueError("cannot embed 'bad'")
        return torch.ones(len(items), 2)

    async def main():
        batcher = Batcher(fn, max_batch=4, max_wait_ms=30)
        outs = await asyncio.gather(
            batcher.run(["ok"]), batcher.run(["bad"]), return_exceptions=True
        )
        assert all(isinstance(o, ValueError) for o in outs)  # one batch, one failure
        assert len(await batcher.run(["ok"])) == 1
        assert batcher.depth == 0
        await batcher.aclose()

    asyncio.run(main())


def test_wrong_result_count_is_an_error_not_a_hang():
    async def main():
        batcher = Batcher(lambda items: [0], max_batch=4, max_wait_ms=30)
        with pytest.raises(RuntimeError, match="1 results for 2 items"):
            await asyncio.gather(batcher.run(["a"]), batcher.run(["b"]))
        await batcher.aclose()

    asyncio.run(main())


def test_engine_store_hits_skip_the_model(tiny):
    from train.store import EmbeddingStore, content_key, model_fingerprint

    cfg, params, tokens = tiny
    calls = []

    def encode(rows):
        calls.append(len(rows))
        return clip.encode_text(params, torch.stack(rows), cfg=cfg)

    keys = [content_key("text", row.numpy().tobytes()) for row in tokens[:4]]

    async def main(store):
        engine = Engine({"text": encode}, store=store, max_batch=8, max_wait_ms=1)
        try:
            first, hits1 = await engine.embed("text", list(tokens[:4]), keys=keys)
            again, hits2 = await engine.embed("text", list(tokens[:4]), keys=keys)
        finally:
            await engine.aclose()
        return first, hits1, again, hits2, engine

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fp = model_fingerprint(cfg.to_dict(), params)
        with EmbeddingStore(f"{tmp}/s.sqlite", fp, dim=cfg.embed_dim) as store:
            first, hits1, again, hits2, engine = asyncio.run(main(store))
    assert hits1 == [False] * 4 and hits2 == [True] * 4
    assert sum(calls) == 4  # the second request never reached the model
    torch.testing.assert_close(again, first)
    assert engine.metrics.snapshot()["cache_hit_rate"] == 0.5


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(lambda x: x, max_batch=0)
    with pytest.raises(ValueError, match="max_queue"):
        Batcher(lambda x: x, max_queue=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        Batcher(lambda x: x, max_wait_ms=-1)

    async def main():
        engine = Engine({"text": lambda x: torch.zeros(len(x), 2)})
        with pytest.raises(KeyError, match="unknown kind 'image'"):
            await engine.embed("image", [1])
        with pytest.raises(ValueError, match="2 keys for 1 items"):
            await engine.embed("text", ["a"], keys=["k1", "k2"])
        await engine.aclose()

    asyncio.run(main())


def test_metrics_percentiles_and_snapshot():
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert percentile([1.0, 2.0], 99) == 2.0
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    m = Metrics(window=3)
    for s in (0.001, 0.002, 0.003, 0.004):  # the first falls out of the window
        m.observe_latency("/r", s)
    m.observe_batch("text", 4)
    m.observe_batch("text", 2)
    snap = m.snapshot(queue_depth=7)
    assert snap["latency_ms"]["/r"] == {"count": 3, "p50": 3.0, "p90": 4.0, "p99": 4.0}
    assert snap["batches"]["text"]["mean_size"] == 3.0
    assert snap["queue_depth"] == 7 and snap["cache_hit_rate"] is None


def test_a_failing_store_write_still_answers_and_is_counted():
    class BrokenStore:
        def get_many(self, keys):
            return {}

        def put_many(self, items, meta=None, *, pinned=True):
            raise OSError("disk full")

    async def main():
        engine = Engine({"text": lambda xs: torch.ones(len(xs), 2)}, store=BrokenStore())
        vectors, hits = await engine.embed("text", ["a", "b"], keys=["ka", "kb"])
        await engine.aclose()
        return vectors, hits, engine

    vectors, hits, engine = asyncio.run(main())
    assert torch.equal(vectors, torch.ones(2, 2)) and hits == [False, False]
    assert engine.metrics.counters["store_write_errors"] == 1


def test_popular_content_is_computed_once_however_many_ask_at_once(tmp_path):
    from train.store import EmbeddingStore

    computed = []

    def fn(items):
        computed.extend(items)
        return torch.stack([torch.tensor([float(len(x)), 1.0]) for x in items])

    async def main(store):
        engine = Engine({"text": fn}, store=store, max_batch=64, max_wait_ms=30)
        texts = ["a red circle"] * 10 + ["a cat", "a cat"]
        outs = await asyncio.gather(*(engine.embed("text", [t], keys=[t]) for t in texts))
        again = await engine.embed(
            "text", ["a cat", "a red circle"], keys=["a cat", "a red circle"]
        )
        await engine.aclose()
        return outs, again, engine

    with EmbeddingStore(tmp_path / "s.sqlite", "fp", dim=2) as store:
        outs, again, engine = asyncio.run(main(store))
    assert sorted(computed) == ["a cat", "a red circle"]  # one model row per distinct text
    assert all(torch.equal(v[0], torch.tensor([12.0, 1.0])) for v, _ in outs[:10])
    assert again[1] == [True, True] and engine.metrics.counters["deduplicated"] == 10


def test_unkeyed_items_are_never_merged():
    seen = []

    def fn(items):
        seen.extend(items)
        return torch.zeros(len(items), 2)

    async def main():
        engine = Engine({"text": fn}, max_batch=8, max_wait_ms=30)
        await asyncio.gather(*(engine.embed("text", ["same"]) for _ in range(4)))
        await engine.aclose()

    asyncio.run(main())
    assert seen == ["same"] * 4  # without keys there is no identity to merge on
