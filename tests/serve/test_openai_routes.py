"""The OpenAI-compatible routes, driven by the ``openai`` Python client against a live server
(and by httpx where the wire format itself is the point): completions are what
``/v1/generate`` streams for the same prompt and seed, streamed chunks add up to the same
text and end with ``data: [DONE]``, stop strings cut the text, embeddings are what
``Service.embed_text`` computes (float and base64), refusals are 4xx in OpenAI's shape
naming the field, and schemathesis finds nothing against the document on a GPT-2 server."""

import base64
import json
import threading

import httpx
import numpy as np
import pytest

from tests.serve._runs import running, tiny_clip_run
from tests.serve.test_gpt_serving import write_gpt2_dir
from tests.serve.test_openapi_fuzz import _fuzz
from train.recipes import serve
from train.serve import Service
from train.serve.app import create_app
from train.serve.openai_routes import _StopScan

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module", params=["alone", "scheduled"])
def gpt2(request, tmp_path_factory):
    """``(base URL, served model)`` of a tiny random GPT-2 (context 48), each request in
    its own cache or all through one scheduler (eager: the routes are the point here)."""
    path = tmp_path_factory.mktemp("gpt2")
    write_gpt2_dir(path)
    batching = serve.Batching(max_slots=4, compile=None) if request.param == "scheduled" else None
    model = serve.load_model(path, batching=batching)
    with running(create_app(Service(model, max_generations=8))) as url:
        yield url, model


@pytest.fixture(scope="module")
def client(gpt2):
    return openai.OpenAI(base_url=f"{gpt2[0]}/v1", api_key="unused", max_retries=0)


def _generated(model, prompt, **options):
    *steps, last = model.generate(prompt, stop=threading.Event(), **options)
    return [e["token"] for e in steps], last["text"], last["stop_reason"]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_completion_is_what_generate_gives_for_the_same_seed(gpt2, client, temperature):
    _, model = gpt2
    prompt = "a red circle above"
    _, text, _ = _generated(model, prompt, temperature=temperature, seed=3, max_new_tokens=10)
    got = client.completions.create(
        model="gpt2", prompt=prompt, max_tokens=10, temperature=temperature, seed=3
    )
    assert got.object == "text_completion" and got.model == "gpt2" and got.id.startswith("cmpl-")
    [choice] = got.choices
    assert (choice.text, choice.index, choice.finish_reason) == (text, 0, "length")
    prompt_tokens = len(model.tokenize([prompt])[0])
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (prompt_tokens, 10)
    assert got.usage.total_tokens == prompt_tokens + 10
    # The same prompt as token ids is the same generation.
    ids = model.tokenize([prompt])[0]
    again = client.completions.create(
        model="gpt2", prompt=ids, max_tokens=10, temperature=temperature, seed=3
    )
    assert again.choices[0].text == text


def test_streamed_chunks_add_up_to_the_answer_and_end_with_done(gpt2, client):
    url, _ = gpt2
    body = {"model": "gpt2", "prompt": ["a blue", "the small green"], "max_tokens": 6,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    whole = client.completions.create(**{**body, "stream": False, "stream_options": None})
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = [line for line in answer.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    texts, reasons = ["", ""], [None, None]
    for c in chunks[:-1]:
        assert c["object"] == "text_completion" and c["id"] == chunks[0]["id"]
        [choice] = c["choices"]
        texts[choice["index"]] += choice["text"]
        reasons[choice["index"]] = reasons[choice["index"]] or choice["finish_reason"]
    assert texts == [c.text for c in whole.choices] and reasons == ["length", "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole.usage.model_dump(
        exclude_none=True
    )
    # And the client reads the same stream.
    streamed = client.completions.create(**{**body, "stream_options": None})
    assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == 0) == texts[0]


def test_a_stop_string_cuts_the_text_and_ends_the_generation(gpt2, client):
    _, model = gpt2
    _, text, _ = _generated(model, "a red", temperature=0, max_new_tokens=20)
    stop = text[5:8]  # a piece from the middle: the text ends before its first occurrence
    got = client.completions.create(
        model="gpt2", prompt="a red", max_tokens=20, temperature=0, stop=[stop, "never seen"]
    )
    assert got.choices[0].text == text[: text.find(stop)]
    assert got.choices[0].finish_reason == "stop" and got.usage.completion_tokens < 20
    streamed = client.completions.create(
        model="gpt2", prompt="a red", max_tokens=20, temperature=0, stop=stop, stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == text[: text.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_scan_holds_back_what_may_begin_a_stop_string():
    scan = _StopScan(["END", "xy"])
    assert scan.feed("abcE") == ("abc", False)  # "E" may begin "END"
    assert scan.feed("Nq") == ("ENq", False)
    assert scan.feed("zE") == ("z", False)
    assert scan.feed("ND tail") == ("", True)
    assert _StopScan(["xy"]).feed("axyb") == ("a", True)
    tail = _StopScan(["END"])
    assert tail.feed("abEN") == ("ab", False) and tail.flush() == "EN"


def _refused(call):
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value.status_code, caught.value.body


def test_refusals_are_4xx_in_openais_shape_naming_the_field(gpt2, client):
    def complete(**kw):
        return lambda: client.completions.create(**{"model": "gpt2", "prompt": "a", **kw})

    for kw, param in [({"n": 2}, "n"), ({"echo": True}, "echo"), ({"logprobs": 2}, "logprobs"),
                      ({"max_tokens": 49}, "max_tokens"), ({"temperature": 3}, "temperature"),
                      ({"prompt": ["a"] * 17}, "prompt"), ({"stop": ["a"] * 5}, "stop"),
                      ({"prompt": [10**6]}, "prompt")]:  # fmt: skip
        status, body = _refused(complete(**kw))
        assert status == 400 and body["type"] == "invalid_request_error", (kw, body)
        assert body["param"] == param, (kw, body)
    # Prompt tokens plus max_tokens past the context (48) is refused before any work.
    status, body = _refused(complete(prompt=[1] * 40, max_tokens=10))
    assert status == 400 and body["param"] == "max_tokens" and "context of 48" in body["message"]
    status, body = _refused(complete(model="gpt-4"))
    assert status == 400 and body["param"] == "model" and "'gpt2'" in body["message"]
    status, body = _refused(lambda: client.embeddings.create(model="gpt2", input="a"))
    assert status == 404 and "text encoder" in body["message"]
    answer = httpx.post(f"{gpt2[0]}/v1/completions", content=b"{", timeout=10,
                        headers={"content-type": "application/json"})  # fmt: skip
    assert answer.status_code == 400 and set(answer.json()["error"]) >= {"message", "type"}
    answer = httpx.post(f"{gpt2[0]}/v1/completions", content=b"{}", timeout=10)
    assert answer.status_code == 415 and "application/json" in answer.json()["error"]["message"]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == ["gpt2"]


def test_embeddings_are_the_services_float_and_base64(tmp_path):
    model = serve.load_model(tiny_clip_run(tmp_path / "clip"))
    service = Service(model)
    texts = ["a red circle", "a blue square above a green star"]
    with running(create_app(service)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        got = client.embeddings.create(model="clip", input=texts)  # the client asks for base64
        plain = httpx.post(f"{url}/v1/embeddings", timeout=10,
                           json={"model": "clip", "input": texts[0]}).json()  # fmt: skip
        coded = httpx.post(f"{url}/v1/embeddings", timeout=10, json={
            "model": "clip", "input": texts, "encoding_format": "base64"}).json()  # fmt: skip
        status, body = _refused(lambda: client.embeddings.create(
            model="clip", input="a", dimensions=3))  # fmt: skip
        refused_batch = httpx.post(f"{url}/v1/embeddings", timeout=10,
                                   json={"model": "clip", "input": ["a"] * 257})  # fmt: skip
    want = model.embed_text(texts).numpy()
    assert got.object == "list" and got.model == "clip"
    assert [d.index for d in got.data] == [0, 1]
    np.testing.assert_allclose([d.embedding for d in got.data], want, atol=1e-6)
    np.testing.assert_allclose(plain["data"][0]["embedding"], want[0], atol=1e-6)
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in coded["data"]]
    np.testing.assert_allclose(decoded, want, atol=1e-6)
    counts = sum(map(len, model.tokenize(texts)))
    assert got.usage.prompt_tokens == got.usage.total_tokens == counts > 0
    assert status == 400 and body["param"] == "dimensions"
    assert refused_batch.status_code == 400 and refused_batch.json()["error"]["param"] == "input"


def test_schemathesis_finds_nothing_on_a_text_generator(gpt2, tmp_path, monkeypatch):
    # A prompt's tokens plus max_tokens must fit the context: a bound between two fields
    # (and a text's token count) that no JSON schema states, so a schema-valid body may
    # still be refused (400, as documented); every other check runs.
    only = ("--include-path-regex", "^/v1/(completions|models)$")
    _fuzz(gpt2[0], tmp_path, monkeypatch, *only, "--exclude-checks", "positive_data_acceptance")
