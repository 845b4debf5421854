"""fmm.decoding's prefix prefill: embeddings before the prompt (BLIP-2's projected queries
before a frozen GPT). Greedy tokens through the cache equal the argmax of a full forward of
``models.blip2.caption_logits`` at every step; left-padded rows equal their rows alone."""

import functools

import pytest
import torch

import fmm
from fmm import decoding, nn
from models import blip2, gpt

STEPS = 6


@functools.cache
def _model():
    cfg = blip2.blip2_gpt_tiny()
    params = blip2.init(cfg, fmm.random.key(3))
    images = fmm.random.normal(fmm.random.key(4), (3, 3, cfg.image_size, cfg.image_size))
    return cfg, params, images


def _prefix(params, images, cfg):
    """The projected queries at the LM's positions ``0..Q-1``: the LM's block inputs."""
    img = blip2.encode_image(params, images, cfg=cfg)
    queries = blip2.qformer(params, cfg=cfg, image_embeds=img)
    return nn.linear(params["lm_proj"], queries) + params["lm"]["pos"][: cfg.queries]


def test_greedy_through_the_cache_equals_argmax_of_caption_logits():
    cfg, params, images = _model()
    with torch.no_grad():
        prefix = _prefix(params, images, cfg)
        prompt = torch.tensor([[2, 5], [2, 7], [2, 9]])
        out = decoding.generate(
            params["lm"], prompt, cfg=gpt.decoder_spec(cfg.lm), prefix=prefix,
            max_new_tokens=STEPS,
        )  # fmt: skip
        tokens = prompt
        for _ in range(STEPS):
            logits = blip2.caption_logits(params, images, tokens, cfg=cfg)
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.tokens, tokens[:, prompt.shape[1] :])


def test_prefill_logits_equal_the_full_forward():
    cfg, params, images = _model()
    spec = gpt.decoder_spec(cfg.lm)
    prompt = torch.tensor([[2, 5, 6, 7]] * 3)
    with torch.no_grad():
        prefix = _prefix(params, images, cfg)
        cache = decoding.init_cache(spec, 3, cfg.queries + 8)
        logits, cache = decoding.prefill(params["lm"], prompt, cache, cfg=spec, prefix=prefix)
        full = blip2.caption_logits(params, images, prompt, cfg=cfg)
        torch.testing.assert_close(logits[:, cfg.queries :], full, atol=1e-5, rtol=1e-5)
        assert cache["pos"].tolist() == [cfg.queries + 4] * 3
        # The next step reads the prefix from the cache.
        step, _ = decoding.decode_step(params["lm"], torch.tensor([8, 8, 8]), cache, cfg=spec)
        longer = torch.cat([prompt, torch.full((3, 1), 8)], dim=1)
        ref = blip2.caption_logits(params, images, longer, cfg=cfg)[:, -1]
        torch.testing.assert_close(step, ref, atol=1e-5, rtol=1e-5)


def test_left_padded_rows_equal_each_row_alone():
    cfg, params, images = _model()
    spec = gpt.decoder_spec(cfg.lm)
    prompt = torch.tensor([[0, 0, 2, 5], [2, 7, 8, 9], [0, 2, 6, 6]])
    lengths = torch.tensor([2, 4, 3])
    with torch.no_grad():
        prefix = _prefix(params, images, cfg)
        both = decoding.generate(
            params["lm"], prompt, cfg=spec, prefix=prefix, lengths=lengths, max_new_tokens=4
        )
        for b in range(3):
            alone = decoding.generate(
                params["lm"], prompt[b : b + 1, 4 - int(lengths[b]) :], cfg=spec,
                prefix=prefix[b : b + 1], max_new_tokens=4,
            )  # fmt: skip
            assert torch.equal(both.tokens[b], alone.tokens[0])


def test_prefix_refusals_name_the_argument():
    cfg, params, _ = _model()
    spec = gpt.decoder_spec(cfg.lm)
    prompt = torch.tensor([[2, 5]])
    cache = decoding.init_cache(spec, 1, 16)
    with pytest.raises(ValueError, match="prefix"):
        decoding.prefill(params["lm"], prompt, cache, cfg=spec, prefix=torch.zeros(1, 3, 5))
    _, cache = decoding.prefill(params["lm"], prompt, cache, cfg=spec)
    with pytest.raises(ValueError, match="prefix= is only allowed on an empty cache"):
        decoding.prefill(params["lm"], prompt, cache, cfg=spec, prefix=torch.zeros(1, 3, 64))
    with pytest.raises(ValueError, match="after a prefix of 3"):
        decoding.generate(
            params["lm"], prompt, cfg=spec, prefix=torch.zeros(1, 3, 64), max_new_tokens=4,
            max_len=6,
        )  # fmt: skip
