"""GPT: published sizes, Hugging Face GPT-2 parity on identical weights, converter strictness."""

import dataclasses
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fmm
from fmm import decoding
from fmm.convert import ConversionError
from models import gpt
from tests.reference import reference

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def hf():
    """A 2-layer GPT-2 at the real width (768, 12 heads) with random weights, and ours."""
    transformers = reference("transformers")
    torch.manual_seed(0)
    hc = transformers.GPT2Config(
        vocab_size=257, n_positions=128, n_embd=768, n_layer=2, n_head=12,
        bos_token_id=None, eos_token_id=None, initializer_range=0.05,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(hc).eval()
    # Non-zero biases and norms, so a dropped or misplaced one shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.05 * torch.randn_like(p))
    cfg = gpt.config_from_hf(hc)
    return model, cfg, gpt.from_hf(model.state_dict(), cfg)


def test_gpt2_small_has_gpt2s_dimensions_and_124m_params():
    cfg = gpt.gpt2_small()
    params = gpt.init(cfg, fmm.random.key(0).to("meta"))
    assert fmm.tree.count(params) == 124_439_808  # GPT-2 small, head tied to the embedding
    flat = fmm.tree.flatten(params)
    assert flat["token.weight"].shape == (50257, 768)
    assert flat["pos"].shape == (1024, 768)
    assert flat["transformer.blocks.11.attn.qkv.weight"].shape == (3 * 768, 768)
    assert not any("head" in k for k in flat)  # tied: one tensor, never two keys


def test_logits_match_hugging_face_gpt2(hf):
    model, cfg, params = hf
    tokens = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(tokens).logits
    torch.testing.assert_close(gpt.apply(params, tokens, cfg=cfg), want, atol=1e-5, rtol=0)
    with torch.no_grad():
        want_loss = model(tokens, labels=tokens).loss
    value, metrics = gpt.loss(params, {"tokens": tokens}, cfg=cfg, train=False)
    torch.testing.assert_close(value, want_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(metrics["perplexity"], want_loss.exp(), atol=1e-4, rtol=0)


def test_greedy_tokens_match_hugging_face_generate_for_64_new_tokens(hf):
    model, cfg, params = hf
    prompt = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64,
            do_sample=False, pad_token_id=0,
        )[:, 12:]  # fmt: skip
    got = decoding.generate(params, prompt, cfg=cfg, max_new_tokens=64).tokens
    assert torch.equal(got, want)


def test_left_padded_prompts_match_hugging_face_with_an_attention_mask(hf):
    model, cfg, params = hf
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, cfg.vocab_size, (2, 10), generator=g)
    lengths = torch.tensor([10, 6])
    mask = torch.arange(10)[None, :] >= (10 - lengths)[:, None]
    prompt = prompt.masked_fill(~mask, 0)
    with torch.no_grad():
        want = model.generate(
            prompt, attention_mask=mask.long(), max_new_tokens=16, do_sample=False,
            pad_token_id=0,
        )[:, 10:]  # fmt: skip
    got = decoding.generate(params, prompt, cfg=cfg, max_new_tokens=16, lengths=lengths).tokens
    assert torch.equal(got, want)


def test_to_hf_loads_strictly_and_round_trips(hf):
    model, cfg, params = hf
    sd = gpt.to_hf(params, cfg)
    assert set(sd) == set(model.state_dict())
    model.load_state_dict(sd, strict=True)
    back = gpt.from_hf(sd, cfg)
    for a, b in zip(fmm.tree.leaves(back), fmm.tree.leaves(params)):
        assert torch.equal(a, b)


def test_from_hf_accepts_the_mask_buffers_of_older_checkpoints(hf):
    model, cfg, params = hf
    sd = dict(model.state_dict())
    for i in range(cfg.layers):
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    back = gpt.from_hf(sd, cfg)
    assert torch.equal(back["token"]["weight"], params["token"]["weight"])
    del sd["lm_head.weight"]  # a bare GPT2Model's state dict has no head either
    gpt.from_hf(sd, cfg)


def test_from_hf_lists_every_missing_unexpected_and_misshaped_key(hf):
    model, cfg, _ = hf
    sd = dict(model.state_dict())
    del sd["transformer.h.1.mlp.c_fc.bias"]
    sd["transformer.h.0.attn.c_attn.weight"] = sd["transformer.h.0.attn.c_attn.weight"].t()
    sd["transformer.h.2.ln_1.weight"] = torch.ones(768)
    with pytest.raises(ConversionError) as err:
        gpt.from_hf(sd, cfg)
    msg = str(err.value)
    assert "missing: transformer.h.1.mlp.c_fc.bias" in msg
    assert "unexpected: transformer.h.2.ln_1.weight" in msg
    assert "mismatched transformer.h.0.attn.c_attn.weight: expected [768, 2304]" in msg
    untied = dict(model.state_dict())
    untied["lm_head.weight"] = untied["lm_head.weight"] + 1
    with pytest.raises(ConversionError, match="ties them"):
        gpt.from_hf(untied, cfg)


def test_config_from_hf_refuses_variants_it_does_not_implement():
    transformers = reference("transformers")
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        gpt.config_from_hf(transformers.GPT2Config(scale_attn_by_inverse_layer_idx=True))
    assert gpt.config_from_hf(transformers.GPT2Config()) == gpt.gpt2_small()


def test_an_mlp_width_no_float_ratio_reproduces_converts_exactly():
    transformers = reference("transformers")
    hf_cfg = transformers.GPT2Config(n_embd=28, n_head=2, n_layer=1, n_inner=61, n_positions=8)
    cfg = gpt.config_from_hf(hf_cfg)  # int(28 * (61 / 28)) is 60, not 61
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    params = gpt.from_hf(model.state_dict(), cfg)
    assert params["transformer"]["blocks"][0]["mlp"]["fc1"]["weight"].shape == (61, 28)


def test_a_config_json_missing_fields_reads_as_transformers_defaults_and_bad_ones_are_named(
    tmp_path,
):
    transformers = reference("transformers")
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
    hf = transformers.GPT2Config.from_pretrained(tmp_path)
    cfg = gpt.config_from_hf(hf)  # what transformers itself reads from that file
    assert cfg == dataclasses.replace(gpt.gpt2_small(), layers=2)
    fields = json.loads((tmp_path / "config.json").read_text())
    assert gpt.config_from_hf(SimpleNamespace(**fields)) == cfg
    with pytest.raises(ValueError, match="n_embd must be a positive int, got 'wide'"):
        gpt.config_from_hf(SimpleNamespace(n_embd="wide"))


def test_apply_rejects_sequences_longer_than_the_context():
    cfg = gpt.gpt_tiny(context_length=8)
    params = gpt.init(cfg, fmm.random.key(0))
    with pytest.raises(
        ValueError,
        match=r"tokens must have shape \[batch, 1\.\.8\] \(context_length=8\), got \[1, 9\]",
    ):
        gpt.apply(params, torch.zeros(1, 9, dtype=torch.int64), cfg=cfg)
    with pytest.raises(ValueError, match="exceeds the model's 8 positions"):
        decoding.generate(params, torch.zeros(1, 4, dtype=torch.int64), cfg=cfg, max_new_tokens=6)


def test_gpt_config_is_its_own_decoder_spec_and_decodes_like_apply():
    cfg = gpt.gpt_tiny()
    params = gpt.init(cfg, fmm.random.key(1))
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    assert cfg.decoder_spec is gpt.decoder_spec(cfg)  # cached: compile guards hold
    cache = decoding.init_cache(cfg, 2, 9)
    logits, cache = decoding.prefill(params, tokens[:, :5], cache, cfg=cfg)
    steps = [logits]
    for i in range(5, 9):
        step, cache = decoding.decode_step(params, tokens[:, i], cache, cfg=cfg)
        steps.append(step[:, None])
    want = gpt.apply(params, tokens, cfg=cfg)
    torch.testing.assert_close(torch.cat(steps, 1), want, atol=1e-5, rtol=0)


def test_the_decoding_guide_snippets_run():
    text = (Path(__file__).resolve().parents[2] / "docs" / "decoding.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(snippets) >= 3
    namespace = {}
    for code in snippets:
        exec(code, namespace)  # our own documentation


def test_a_masked_loss_counts_only_the_real_targets():
    cfg = gpt.gpt_tiny()
    params = gpt.init(cfg, fmm.random.key(2))
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False  # row 1 is padded after its 6th token
    value, _ = gpt.loss(params, {"tokens": tokens, "mask": mask}, cfg=cfg)
    logits = gpt.apply(params, tokens[:, :-1], cfg=cfg)
    per_token = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), tokens[:, 1:], reduction="none"
    )
    want = torch.cat([per_token[0], per_token[1, :5]]).mean()
    torch.testing.assert_close(value, want)
    padded = tokens.clone()
    padded[1, 6:] = 0  # what sits under the mask changes nothing
    torch.testing.assert_close(
        gpt.loss(params, {"tokens": padded, "mask": mask}, cfg=cfg)[0], value
    )
