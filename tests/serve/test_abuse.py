"""Requests that once took the server down or made it amplify are now quick, small 4xx answers,
and the server keeps answering others meanwhile (the memory side: benchmarks/serve_abuse.py)."""

import argparse
import base64
import json
import time

import httpx
import pytest
import torch
from PIL import Image

from tests.serve import _abuse
from tests.serve._runs import running, tiny_clip_run
from train.recipes import serve
from train.serve.app import create_app

LIMITS = ["--max-body-mb", "0.5", "--max-buffered-mb", "1", "--header-timeout-s", "0.5",
          "--body-timeout-s", "0.5", "--max-connections", "64"]  # fmt: skip
SLOW = 5.0  # seconds: far past every deadline above, far below the old hangs (20-110 s)


def _server(run_dir, store, *flags, protocol=None):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--ckpt", str(run_dir), "--store", str(store), *flags])
    service = serve.build_service(args)
    limits = serve.limits_of(args)
    return service, running(create_app(service, limits=limits), limits=limits, protocol=protocol)


def _protocol(name: str) -> type:
    # uvicorn guards whichever parser it has: httptools' when installed (the serve extra),
    # else h11's (the test extra alone); both must keep every limit.
    if name == "httptools":
        pytest.importorskip("httptools")
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_clip_run(tmp_path_factory.mktemp("abuse") / "clip")


@pytest.fixture(scope="module")
def server(run_dir):
    service, serving = _server(run_dir, run_dir.parent / "store.sqlite", *LIMITS)
    with serving as url:
        yield url, service, run_dir
    service.store.close()


@pytest.fixture(scope="module", params=["httptools", "h11"])
def guarded(request, run_dir, tmp_path_factory):
    """A server on each of uvicorn's parsers, for the limits the protocol enforces."""
    store = tmp_path_factory.mktemp(request.param) / "store.sqlite"
    service, serving = _server(run_dir, store, *LIMITS, protocol=_protocol(request.param))
    with serving as url:
        yield url
    service.store.close()


def _zeroshot(template: str) -> bytes:
    image = torch.rand(3, 8, 8).tolist()
    return json.dumps({"image": image, "labels": ["a", "b"], "template": template}).encode()


def test_amplifying_bodies_are_small_quick_422s_that_never_echo_them(server):
    url, service, _ = server
    bad_pixels = json.dumps({"images": [[[[2.0] * 8] * 8] * 3] * 64}).encode()
    before = service.store.stats()
    cases = [
        (_abuse.nested_list_bomb(400_000), 422, "JSON values"),
        (b'{"texts": [' + b",".join([b"[]"] * 100_000) + b"]}", 422, "JSON values"),
        (bad_pixels, 422, "images[0][0][0][0]: Input should be less than or equal to 1"),
        (_zeroshot("{{}}{0:>20000000}"), 422, "template must contain exactly one '{}'"),
        (_zeroshot("{}{}"), 422, "template"),
        (_zeroshot("{}{x}"), 422, "template"),
        (b'{"texts": ["caf\xe9"]}', 422, "Invalid JSON"),
        (b"\xff\xfe{", 422, "Invalid JSON"),
    ]
    for body, status, needle in cases:
        path = "/v1/zeroshot" if b"labels" in body else "/v1/embed/image"
        path = "/v1/embed/text" if b"texts" in body else path
        got, answer, seconds = _abuse.exchange(url, _abuse.post(path, body))
        assert (got, seconds < SLOW) == (status, True), (needle, got, answer, seconds)
        assert needle in answer["detail"] and len(answer["detail"]) < 1_000, answer
        assert "2.0" not in answer["detail"] and "0.5]" not in answer["detail"]
    assert service.store.stats() == before  # nothing refused was embedded or stored


def test_a_template_substitutes_the_label_only(server):
    url, _, _ = server
    with httpx.Client(base_url=url) as client:
        ok = client.post("/v1/zeroshot", content=_zeroshot("{{{}}} and {{}}"),
                         headers={"content-type": "application/json"})  # fmt: skip
        want = client.post("/v1/embed/text", json={"texts": ["{a} and {}", "{b} and {}"]})
    assert ok.status_code == 200, ok.text
    labels = {row["label"]: row["logit"] for row in ok.json()["ranking"]}
    assert want.status_code == 200 and set(labels) == {"a", "b"}
    # The labels were embedded as "{a} and {}" and "{b} and {}": the store had them cached.
    assert want.json()["cached"] == [True, True]


def test_images_are_png_or_jpeg_of_bounded_size_checked_before_decoding(server):
    url, _, _ = server
    half_png = base64.b64decode(_abuse.encoded(Image.new("RGB", (40, 40), "red"), "PNG"))
    cases = [
        (base64.b64encode(_abuse.png_claiming(20_000, 20_000)).decode(), "1024 pixels a side"),
        (base64.b64encode(_abuse.png_claiming(2_000, 10)).decode(), "2000x10 pixels"),
        (_abuse.tiny_gif(), "not a PNG or JPEG image"),
        (_abuse.broken_tiff(), "not a PNG or JPEG image"),
        (_abuse.encoded(Image.new("RGB", (4, 4)), "BMP"), "not a PNG or JPEG image"),
        (base64.b64encode(half_png[: len(half_png) // 2]).decode(), "damaged"),
    ]
    for payload, needle in cases:
        body = json.dumps({"images": ["", payload][1:]}).encode()
        status, answer, seconds = _abuse.exchange(url, _abuse.post("/v1/embed/image", body))
        assert (status, seconds < SLOW) == (422, True), (needle, status, answer)
        assert needle in answer["detail"] and answer["detail"].startswith("images[0]:"), answer
    accepted = [_abuse.encoded(Image.new("RGB", (300, 200), "blue"), "JPEG"),
                _abuse.encoded(Image.new("LA", (9, 31)), "PNG")]  # fmt: skip
    with httpx.Client(base_url=url) as client:
        r = client.post("/v1/embed/image", json={"images": accepted})
    assert r.status_code == 200 and len(r.json()["embeddings"]) == 2, r.text


def test_a_body_that_is_not_json_is_415(server):
    url, _, _ = server
    status, answer, _ = _abuse.exchange(
        url, _abuse.post("/v1/embed/text", b'{"texts": ["a"]}', content_type="text/plain")
    )
    assert status == 415 and "application/json" in answer["detail"]


def test_slow_senders_get_408_while_healthz_keeps_answering(guarded):
    url = guarded
    sockets: list = []
    try:
        start = time.perf_counter()
        slow = [_abuse.slow_headers(url, sockets) for _ in range(8)]
        slow += [_abuse.slow_body(url, sockets) for _ in range(2)]
        with httpx.Client(base_url=url, timeout=SLOW) as client:
            for _ in range(5):
                assert client.get("/healthz").status_code == 200
                time.sleep(0.1)
        answers = [_abuse.parse_answer(_abuse.read_all(sock)) for sock in slow]
        seconds = time.perf_counter() - start
    finally:
        for sock in sockets:
            sock.close()
    assert [status for status, _ in answers] == [408] * 10, answers
    assert "headers did not arrive within 0.5 s" in answers[0][1]["detail"]
    assert "body did not arrive within 0.5 s" in answers[-1][1]["detail"]
    assert seconds < SLOW


def test_headers_past_the_limit_are_431_sent_at_once_or_dribbled(guarded):
    url = guarded
    request = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-filler: " + b"a" * 40_000 + b"\r\n\r\n"
    status, answer, _ = _abuse.exchange(url, request)
    assert status == 431 and "16384 bytes" in answer["detail"], answer
    with _abuse.connect(url, SLOW) as sock:  # a header that never ends, 2 KB at a time
        sock.sendall(b"GET /healthz HTTP/1.1\r\nx-filler: ")
        try:
            for _ in range(20):
                sock.sendall(b"a" * 2048)
                time.sleep(0.005)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-way: the answer is already in the socket
        status, answer = _abuse.parse_answer(_abuse.read_all(sock))
    assert status == 431, answer


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_buffered_bodies_and_connections_share_bounded_budgets(run_dir, tmp_path, parser):
    flags = ["--max-body-mb", "0.25", "--max-buffered-mb", "0.5", "--body-timeout-s", "1",
             "--max-connections", "4"]  # fmt: skip
    service, serving = _server(
        run_dir, tmp_path / "store.sqlite", *flags, protocol=_protocol(parser)
    )
    quarter = 2**18
    sockets: list = []
    with serving as url:
        try:
            held = [_abuse.slow_body(url, sockets, length=quarter) for _ in range(2)]
            time.sleep(0.2)  # both bodies' bytes are now reserved: the budget is spent
            status, answer, _ = _abuse.exchange(url, _abuse.post("/v1/embed/text", b"{}"))
            assert status == 503 and "reading" in answer["detail"], answer
            idle = [_abuse.connect(url, 5.0) for _ in range(2)]  # 4 connections open
            sockets += idle
            time.sleep(0.1)
            status, answer, _ = _abuse.exchange(url, _abuse.post("/v1/embed/text", b"{}"))
            assert status == 503 and "4 connections are open" in answer["detail"], answer
            assert [_abuse.parse_answer(_abuse.read_all(s))[0] for s in held] == [408, 408]
        finally:
            for sock in sockets:
                sock.close()
        time.sleep(0.2)  # the slow ones are gone: their budget and connections are back
        with httpx.Client(base_url=url) as client:
            assert client.post("/v1/embed/text", json={"texts": ["a"]}).status_code == 200
            assert client.get("/metrics").json()["buffered_bytes"] == 0
    service.store.close()


def test_healthz_names_the_run_not_where_it_lies(server):
    url, _, run_dir = server
    with httpx.Client(base_url=url) as client:
        health = client.get("/healthz")
    assert health.json()["info"]["run"] == run_dir.name
    assert str(run_dir.parent) not in health.text


def test_served_embeddings_are_cached_rows_and_only_items_are_pinned(server):
    url, _, _ = server
    with httpx.Client(base_url=url) as client:
        before = client.get("/metrics").json()["store"]
        client.post("/v1/embed/text", json={"texts": ["a cached caption", "another one"]})
        middle = client.get("/metrics").json()["store"]
        keys = client.post("/v1/items", json={"texts": ["a kept caption"]}).json()["keys"]
        after = client.get("/metrics").json()["store"]
        hits = client.post("/v1/search", json={"text": "a cached caption", "k": 1000}).json()
    assert middle["pinned"] == before["pinned"] and middle["cached"] == before["cached"] + 2
    assert after["pinned"] == before["pinned"] + 1
    found = {hit["key"] for hit in hits["results"]}
    assert keys[0] in found and len(found) == after["pinned"]  # cached rows are never results
