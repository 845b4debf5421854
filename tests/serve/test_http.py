"""The HTTP API against a real uvicorn server on loopback, with a real httpx client: answers
equal direct computation, the store serves repeats, and bad input is a 4xx with a message."""

import argparse
import asyncio
import base64
import io
import json
import threading
import time

import httpx
import pytest
import torch
from PIL import Image

import fmm
from models import clip
from tests.serve._runs import running, tiny_clip_run, tiny_mmgpt_run
from train.loop import load_run
from train.recipes import serve, serve_streams
from train.recipes.clip import normalize_images
from train.serve import ServedModel, Service
from train.serve.app import create_app
from train.serve.front_door import HttpLimits

MAX_BODY = 64 * 1024


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def clip_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    run_dir = tiny_clip_run(root / "clip")
    service = serve.build_service(
        _args("--ckpt", str(run_dir), "--store", str(root / "store.sqlite"), "--max-wait-ms", "20")
    )
    limits = HttpLimits(max_body_bytes=MAX_BODY, max_buffered_bytes=4 * MAX_BODY)
    app = create_app(service, limits=limits)
    with running(app, limits=limits) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, run_dir, service
    service.store.close()


def _png(pixels: torch.Tensor) -> str:
    array = pixels.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_openapi_lists_every_route(clip_server):
    client, _, _ = clip_server
    paths = client.get("/openapi.json").json()["paths"]
    for route in ("/v1/embed/text", "/v1/embed/image", "/v1/zeroshot", "/v1/items",
                  "/v1/search", "/v1/generate", "/healthz", "/metrics"):  # fmt: skip
        assert route in paths


def test_text_embeddings_equal_direct_and_repeat_from_the_store(clip_server):
    client, run_dir, _ = clip_server
    texts = ["a red circle", "a small blue square above a green triangle"]
    first = client.post("/v1/embed/text", json={"texts": texts})
    assert first.status_code == 200, first.text
    again = client.post("/v1/embed/text", json={"texts": texts}).json()
    run = load_run(run_dir, family="clip")
    cfg, params, tok = run.cfg, run.params, run.tokenizer
    with torch.no_grad():
        want = clip.encode_text(params, tok.encode(texts, cfg.context_length), cfg=cfg)
    got = torch.tensor(first.json()["embeddings"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert first.json()["cached"] == [False, False] and again["cached"] == [True, True]
    torch.testing.assert_close(torch.tensor(again["embeddings"]), got)


def test_image_as_png_or_lists_embeds_as_direct(clip_server):
    client, run_dir, _ = clip_server
    pixels = torch.randint(0, 256, (3, 8, 8)).float() / 255
    by_png = client.post("/v1/embed/image", json={"images": [_png(pixels)]})
    by_lists = client.post("/v1/embed/image", json={"images": [pixels.tolist()]})
    assert by_png.status_code == by_lists.status_code == 200, by_png.text
    run = load_run(run_dir, family="clip")
    cfg, params = run.cfg, run.params
    with torch.no_grad():
        want = clip.encode_image(params, normalize_images(pixels[None]), cfg=cfg)
    torch.testing.assert_close(torch.tensor(by_png.json()["embeddings"]), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(by_lists.json()["embeddings"]), want, atol=1e-5, rtol=0)


def test_zeroshot_ranks_every_label_once_by_probability(clip_server):
    client, _, _ = clip_server
    labels = ["a red circle", "a blue square", "a green triangle"]
    image = torch.rand(3, 8, 8).tolist()
    r = client.post("/v1/zeroshot", json={"image": image, "labels": labels, "template": "{}"})
    assert r.status_code == 200, r.text
    ranking = r.json()["ranking"]
    assert sorted(row["label"] for row in ranking) == sorted(labels)
    probs = [row["prob"] for row in ranking]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5


def test_stored_items_are_found_by_text_and_vector_search(clip_server):
    client, _, _ = clip_server
    texts = ["a yellow star", "a purple hexagon", "a large orange cross"]
    keys = client.post("/v1/items", json={"texts": texts}).json()["keys"]
    assert len(keys) == 3
    hits = client.post("/v1/search", json={"text": "a purple hexagon", "k": 2}).json()["results"]
    assert hits[0]["key"] == keys[1] and hits[0]["meta"] == "a purple hexagon"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5) and len(hits) == 2
    before = len(clip_server[2].store)
    client.post("/v1/search", json={"text": "a never stored caption", "k": 1})
    assert len(clip_server[2].store) == before  # a query is not an item
    vector = client.post("/v1/embed/text", json={"texts": ["a yellow star"]}).json()
    top = client.post("/v1/search", json={"vector": vector["embeddings"][0], "k": 1}).json()
    assert top["results"][0]["key"] == keys[0]


def test_bad_requests_get_4xx_with_a_message_never_500(clip_server):
    client, _, _ = clip_server
    send = lambda path, body: client.post(
        path, content=body, headers={"content-type": "application/json"}
    )
    zeroshot = {"image": torch.rand(3, 8, 8).tolist(), "labels": ["a", "b"]}
    cases = [
        (send("/v1/embed/text", b'{"texts": ["a", '), 422, "JSON"),
        (
            client.post("/v1/embed/text", json={"texts": "a red circle"}),
            422,
            "texts: Input should be a valid array",
        ),
        (client.post("/v1/embed/text", json={"texts": [1, 2]}), 422, "string"),
        (client.post("/v1/embed/text", json={"texts": []}), 422, "at least 1"),
        (client.post("/v1/embed/text", json={"txts": ["a"]}), 422, "texts"),
        (client.post("/v1/embed/text", json={"texts": ["a" * 3000]}), 422, "2000"),
        (
            client.post("/v1/embed/image", json={"images": [[[[0.5] * 7] * 8] * 3]}),
            422,
            "images[0][0][0]: List should have at least 8 items",
        ),
        (
            client.post("/v1/embed/image", json={"images": [[[[2.0] * 8] * 8] * 3]}),
            422,
            "images[0][0][0][0]: Input should be less than or equal to 1",
        ),
        (client.post("/v1/embed/image", json={"images": ["not base64!"]}), 422, "base64"),
        (client.post("/v1/embed/image", json={"images": ["aGVsbG8="]}), 422, "not a PNG or JPEG"),
        (client.post("/v1/zeroshot", json={"image": [[[0.5]]], "labels": ["x"]}), 422, "labels"),
        (client.post("/v1/zeroshot", json={**zeroshot, "template": "a"}), 422, "{}"),
        (client.post("/v1/search", json={"k": 3}), 422, "exactly one"),
        (
            client.post("/v1/search", json={"vector": [0.1, 0.2], "k": 1}),
            422,
            "vector: List should have at least 8",
        ),
        (client.post("/v1/search", json={"text": "a", "k": 0}), 422, "greater than or equal"),
        (client.post("/v1/generate", json={"prompt": "a red circle"}), 404, "does not generate"),
        (client.post("/v1/embed/text", json={"texts": ["a"] * 40_000}), 413, "at most"),
        (send("/v1/embed/text", iter([b'{"texts": ["', b"a" * MAX_BODY, b'"]}'])), 413, "at most"),
        (client.post("/v1/nope", json={}), 404, "Not Found"),
        (client.get("/v1/embed/text"), 405, "Method Not Allowed"),
    ]
    for i, (response, status, needle) in enumerate(cases):
        assert response.status_code == status, (i, response.status_code, response.text)
        assert needle in json.dumps(response.json()["detail"]), (i, response.text)


def test_health_and_metrics_report_what_happened(clip_server):
    client, _, _ = clip_server

    async def burst():
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=30) as aclient:
            texts = [f"a red circle number {i}" for i in range(12)]
            return await asyncio.gather(
                *(aclient.post("/v1/embed/text", json={"texts": [t]}) for t in texts)
            )

    assert all(r.status_code == 200 for r in asyncio.run(burst()))
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["serves"]["text"] and health["serves"]["store"]
    assert not health["serves"]["generate"]
    m = client.get("/metrics").json()
    assert m["queue_depth"] == 0 and m["batches"]["text"]["max_size"] > 1
    assert 0 < m["cache_hit_rate"] < 1 and m["counters"]["http 200"] >= 12
    assert m["latency_ms"]["/v1/embed/text"]["p99"] >= m["latency_ms"]["/v1/embed/text"]["p50"]
    assert m["buffered_bytes"] == 0 and m["requests_in_flight"] == 1  # this one
    assert m["store"]["cached"] >= 12 and m["tcp"]["backlog"] >= 1
    for counter in ("listen_overflows", "listen_drops", "resets_on_data_after_close"):
        assert m["tcp"][counter] is None or m["tcp"][counter] >= 0


def test_full_queue_is_503_and_timeout_504_then_slots_come_back():
    release = threading.Event()

    def stuck(texts):
        release.wait(timeout=10)
        return torch.zeros(len(texts), 2)

    model = ServedModel(name="stuck", fingerprint="f" * 64, dim=2, embed_text=stuck)
    service = Service(model, max_batch=1, max_wait_ms=0, max_queue=2, timeout_s=0.3)
    with running(create_app(service)) as url, httpx.Client(base_url=url, timeout=10) as client:
        timed_out = client.post("/v1/embed/text", json={"texts": ["a", "b"]})
        assert timed_out.status_code == 504 and "budget" in timed_out.json()["detail"]
        assert client.get("/metrics").json()["queue_depth"] == 0
        full = client.post("/v1/embed/text", json={"texts": ["a", "b", "c"]})
        assert full.status_code == 503 and "queue is full" in full.json()["detail"]
        assert full.headers["retry-after"] == "1"
        release.set()
        assert client.post("/v1/embed/text", json={"texts": ["a"]}).status_code == 200


def test_generation_streams_the_greedy_codes_as_events(tmp_path):
    from models import mmgpt
    from train.recipes.generate import drawing_kit

    run_dir = tiny_mmgpt_run(tmp_path / "mmgpt")
    # aot_eager: the scheduler's path without inductor's minute of start-up compiles
    # (tests/serve/test_scheduler.py checks the inductor step).
    service = serve.build_service(_args("--ckpt", str(run_dir), "--compile-step", "aot_eager"))
    with running(create_app(service)) as url, httpx.Client(base_url=url, timeout=30) as client:
        body = {"prompt": "a red circle", "temperature": 0}
        with client.stream("POST", "/v1/generate", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith(
                "text/event-stream"
            )
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert client.post("/v1/embed/text", json={"texts": ["a"]}).status_code == 404
        bad = client.post("/v1/generate", json={"prompt": "a", "temperature": -1})
        assert bad.status_code == 422
    run = drawing_kit(load_run(run_dir, family="mmgpt"))
    want = mmgpt.generate_images(
        run["params"], run["tokenizer"].encode(["a red circle"], run["cfg"].text_len),
        cfg=run["cfg"], temperature=0,
    )[0].tolist()  # fmt: skip
    *steps, last = events
    assert [e["index"] for e in steps] == list(range(len(want)))
    assert [e["token"] for e in steps] == want and last["tokens"] == want
    image = Image.open(io.BytesIO(base64.b64decode(last["image_png"])))
    assert image.size == (8, 8)


def test_guided_stream_draws_what_generate_images_draws_and_stops_when_asked(tmp_path):
    from models import mmgpt
    from train.recipes.generate import drawing_kit

    run = drawing_kit(load_run(tiny_mmgpt_run(tmp_path / "mmgpt"), family="mmgpt"))
    tok, cfg = run["tokenizer"], run["cfg"]
    options = {"temperature": 1.0, "top_k": 5, "guidance": 3.0, "seed": 7}
    events = list(
        serve_streams.stream_image_codes(run, "a blue star", stop=threading.Event(), **options)
    )
    want = mmgpt.generate_images(
        run["params"], tok.encode(["a blue star"], cfg.text_len), cfg=cfg,
        key=fmm.random.key(7), temperature=1.0, top_k=5, guidance=3.0,
        null_text=tok.encode([""], cfg.text_len),
    )[0].tolist()  # fmt: skip
    assert events[-1]["tokens"] == want
    stop = threading.Event()
    stream = serve_streams.stream_image_codes(run, "a blue star", stop=stop, **options)
    next(stream)
    stop.set()
    assert list(stream) == []  # no further codes once stopped


def test_a_client_that_leaves_stops_its_generation_and_frees_the_slot():
    produced, stopped = [], threading.Event()

    def slow(prompt, *, stop, **options):
        for i in range(200):
            if stop.is_set():
                stopped.set()
                return
            produced.append(i)
            yield {"index": i, "token": i}
            time.sleep(0.02)

    model = ServedModel(name="slow", fingerprint="0" * 64, generate=slow)
    service = Service(model, max_generations=1)
    with running(create_app(service)) as url, httpx.Client(base_url=url, timeout=10) as client:
        with client.stream("POST", "/v1/generate", json={"prompt": "x"}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            busy = client.post("/v1/generate", json={"prompt": "y"})
            assert busy.status_code == 503 and "generations running" in busy.json()["detail"]
        assert stopped.wait(5)  # the generator saw the stop flag after the client left
        deadline = time.monotonic() + 5
        while client.get("/metrics").json()["generations_running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/metrics").json()["generations_running"] == 0
    assert len(produced) < 200
