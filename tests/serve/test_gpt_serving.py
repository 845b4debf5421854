"""Serving a Hugging Face GPT-2 directory: the streamed tokens are what ``transformers``
generates greedily and what ``fmm.decoding.generate`` samples for the same seed; EOS, the
context limit and bad options behave; the HTTP route streams it as server-sent events."""

import json
import shutil
import threading

import httpx
import pytest
import torch

import fmm
from fmm import decoding
from models import gpt
from tests.reference import reference
from tests.serve._runs import running
from train import checkpoint
from train.recipes import serve
from train.serve.app import create_app

CORPUS = [
    "a red circle above a blue square",
    "the small green triangle is left of the big yellow star",
    "héllo wörld, naïve café — ünïcode",
    "numbers 1234567890 and punctuation!?",
] * 4


def _tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_gpt2_dir(path, *, eos_token_id=None):
    """A random-weight GPT-2 as ``save_pretrained`` writes it, with a byte-level BPE
    ``tokenizer.json``; returns the transformers model too."""
    transformers = reference("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=320, n_positions=48, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=None, eos_token_id=eos_token_id,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(path)
    _tokenizer().save(str(path / "tokenizer.json"))
    return model


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    return path, write_gpt2_dir(path)


def _events(model, prompt, **options):
    return list(model.generate(prompt, stop=threading.Event(), **options))


def test_greedy_stream_is_what_transformers_generates(gpt2_dir):
    path, hf = gpt2_dir
    served = serve.load_model(path)
    prompt = "a red circle above"
    *steps, last = _events(served, prompt, temperature=0, max_new_tokens=12)
    ids = torch.tensor([served_tokenizer(path).encode(prompt).ids])
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[
            0, ids.shape[1] :
        ]
    assert [e["token"] for e in steps] == want.tolist() == last["tokens"]
    assert [e["index"] for e in steps] == list(range(12))
    assert last["stop_reason"] == "length" and last["done"]
    assert "".join(e["text"] for e in steps) == last["text"]
    assert last["text"] == served_tokenizer(path).decode(want.tolist())


def served_tokenizer(path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json"))


def test_sampled_stream_draws_what_decoding_generate_draws_for_the_seed(gpt2_dir):
    path, _ = gpt2_dir
    served = serve.load_model(path)
    prompt = "the small green"
    *steps, _ = _events(served, prompt, temperature=0.9, top_k=20, seed=7, max_new_tokens=10)
    cfg, params = gpt.load_pretrained(path)
    ids = torch.tensor([served_tokenizer(path).encode(prompt).ids])
    want = decoding.generate(
        params, ids, cfg=gpt.decoder_spec(cfg), max_new_tokens=10, key=fmm.random.key(7),
        temperature=0.9, top_k=20,
    ).tokens[0]  # fmt: skip
    assert [e["token"] for e in steps] == want.tolist()


def test_eos_ends_the_stream(gpt2_dir, tmp_path):
    path, _ = gpt2_dir
    greedy = [e["token"] for e in _events(serve.load_model(path), "héllo", temperature=0)[:-1]]
    eos_dir = tmp_path / "eos"
    shutil.copytree(path, eos_dir)
    config = json.loads((eos_dir / "config.json").read_text())
    config["eos_token_id"] = greedy[3]
    (eos_dir / "config.json").write_text(json.dumps(config))
    *steps, last = _events(serve.load_model(eos_dir), "héllo", temperature=0)
    first = greedy.index(greedy[3])  # the stream ends at the first time EOS is drawn
    assert [e["token"] for e in steps] == greedy[:first]
    assert last["stop_reason"] == "eos" and last["tokens"] == greedy[:first]


def test_bad_options_and_directories_say_what_is_wrong(gpt2_dir, tmp_path):
    path, _ = gpt2_dir
    served = serve.load_model(path)
    with pytest.raises(ValueError, match="guidance"):
        _events(served, "a", guidance=2.0)
    with pytest.raises(ValueError, match="context of 48 tokens"):
        _events(served, "a red circle", max_new_tokens=48)
    with pytest.raises(ValueError, match="prompt: encodes to no tokens"):
        _events(served, "")
    with pytest.raises(ValueError, match="context of 48 tokens"):
        _events(served, "a red circle " * 30)
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(path, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        serve.load_model(no_tok)
    (no_tok / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        gpt.load_pretrained(no_tok)
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(checkpoint.CheckpointError, match="'bert'"):
        serve.load_model(other)


def test_int8_model_generates(gpt2_dir):
    path, _ = gpt2_dir
    *steps, last = _events(serve.load_model(path, quantize="int8"), "a red", temperature=0)
    prompt_len = len(served_tokenizer(path).encode("a red").ids)
    assert len(steps) == 48 - prompt_len + 1 == len(last["tokens"])  # the default fills the context


def test_http_streams_tokens_and_refuses_bad_options(gpt2_dir):
    path, _ = gpt2_dir
    service = serve.Service(serve.load_model(path))
    want = _events(service.model, "a blue", temperature=0, max_new_tokens=5)[-1]["tokens"]
    with running(create_app(service)) as url, httpx.Client(base_url=url, timeout=30) as client:
        body = {"prompt": "a blue", "temperature": 0, "max_new_tokens": 5}
        with client.stream("POST", "/v1/generate", json=body) as r:
            assert r.status_code == 200
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert [e["token"] for e in events[:-1]] == want == events[-1]["tokens"]
        bad = client.post("/v1/generate", json={"prompt": "a", "guidance": 3.0})
        assert bad.status_code == 422 and "guidance" in bad.json()["detail"]
        over = client.post("/v1/generate", json={"prompt": "a", "max_new_tokens": 100})
        assert over.status_code == 422 and "less than or equal to 48" in over.json()["detail"]
        long = client.post("/v1/generate", json={"prompt": "a blue", "max_new_tokens": 48})
        assert long.status_code == 422 and "context" in long.json()["detail"]
        limits = client.get("/openapi.json").json()["components"]["schemas"]["Generate"]
        assert limits["properties"]["guidance"]["maximum"] == 1.0
        health = client.get("/healthz").json()
        assert health["model"] == "gpt2" and health["serves"]["generate"]
