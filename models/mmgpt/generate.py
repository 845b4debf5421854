"""Caption -> image sampling for the multimodal GPT, through :mod:`fmm.decoding`'s KV cache.

The decoding spec's head masks every text id to ``-inf`` (:func:`models.mmgpt.modality_mask`),
so whatever the sampler (greedy, temperature, top-k, top-p), a text token can never be drawn
where an image code belongs: after a caption, every generated token is an image token.
"""

from __future__ import annotations

import functools

import torch

from fmm import checks, decoding, random
from fmm.nn import layer_norm
from models.mmgpt.config import MMGPTConfig
from models.mmgpt.model import (
    Params,
    _check_text,
    _modality_embed,
    init,
    mask_logits,
    modality_mask,
    output_logits,
)


def _embed(params: Params, tokens: torch.Tensor, positions: torch.Tensor, *, cfg: MMGPTConfig):
    # embed_tokens at explicit per-sequence positions (decoding passes them as a tensor).
    return _modality_embed(params, tokens, cfg) + params["pos"][positions]


def _image_head(params: Params, h: torch.Tensor, *, cfg: MMGPTConfig) -> torch.Tensor:
    logits = output_logits(params, layer_norm(params["norm"], h, eps=cfg.norm_eps), cfg=cfg)
    return mask_logits(logits, modality_mask(cfg, "image", device=logits.device))


@functools.cache
def image_decoder_spec(cfg: MMGPTConfig) -> decoding.DecoderSpec:
    """How :mod:`fmm.decoding` runs this model to draw images: logits over the whole
    ``vocab_size`` with text ids masked out. Cached per config, so compile guards hold."""
    return decoding.DecoderSpec(
        transformer=cfg.transformer,
        embed=functools.partial(_embed, cfg=cfg),
        head=functools.partial(_image_head, cfg=cfg),
        max_positions=cfg.seq_len,
        vocab_size=cfg.vocab_size,
        init=init,
        config=cfg,
    )


def generate_images(
    params: Params,
    text: torch.Tensor,
    *,
    cfg: MMGPTConfig,
    key: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance: float = 1.0,
    null_text: torch.Tensor | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """Sample ``image_len`` image codes after each caption of ``text [B, text_len]``.

    Returns int64 codes ``[B, image_len]`` in ``[0, image_vocab)`` (raster order; reshape to
    the VQ-VAE grid and ``models.vqvae.decode`` them). ``temperature=0`` is greedy; otherwise
    ``key`` is needed, and the same key draws the same images, call after call.

    ``guidance != 1`` is classifier-free guidance: the image logits become
    ``uncond + guidance * (cond - uncond)``, where ``uncond`` continues ``null_text``
    (``[1 or B, text_len]``, the empty caption the model was trained on with caption dropout).

    Example::

        codes = generate_images(params, tok.encode(["a red circle"] * 8, 16), cfg=cfg,
                                key=fmm.random.key(0))
        images = models.vqvae.decode(vq_params, codes.reshape(8, 8, 8), cfg=vq_cfg)
    """
    checks.check_params(params, init=init, cfg=cfg)
    _check_text(text, cfg)
    if guidance != 1.0:
        if null_text is None:
            raise ValueError(
                f"null_text is missing: guidance={guidance} needs null_text of shape "
                f"[1 or batch, {cfg.text_len}]"
            )
        _check_text(null_text, cfg, "null_text")
        if null_text.shape[0] not in (1, len(text)):
            raise ValueError(
                f"null_text must have shape [1 or batch={len(text)}, {cfg.text_len}], "
                f"got {list(null_text.shape)}"
            )
        with torch.no_grad():
            return _guided(
                params, text, null_text.expand(len(text), -1), cfg=cfg, key=key, scale=guidance,
                sampling=decoding.Sampling(temperature=temperature, top_k=top_k, top_p=top_p),
            )  # fmt: skip
    with torch.no_grad():
        out = decoding.generate(
            params,
            text,
            cfg=image_decoder_spec(cfg),
            max_new_tokens=cfg.image_len,
            key=key,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            compile=compile,
        )
    return out.tokens - cfg.text_vocab


def _guided(params, text, null_text, *, cfg: MMGPTConfig, key, scale: float, sampling):
    # A thin loop over fmm.decoding's prefill/decode_step: conditional and unconditional rows
    # share one cache, and both are fed the token drawn from the guided logits.
    spec = image_decoder_spec(cfg)
    if sampling.temperature > 0 and key is None:
        raise ValueError("key= is missing: sampling with temperature > 0 needs key=")
    b, tv = len(text), cfg.text_vocab
    dtype = params["pos"].dtype
    cache = decoding.init_cache(spec, 2 * b, cfg.seq_len - 1, dtype=dtype, device=text.device)
    # The cache is this loop's own: donated, each step writes its slot in place.
    rows = torch.cat([text, null_text])
    logits, cache = decoding.prefill(params, rows, cache, cfg=spec, last_only=True, donate=True)
    logits = logits[:, -1]
    keys = random.split(key if key is not None else random.key(0), cfg.image_len)
    codes = []
    for i in range(cfg.image_len):
        # Only the image slice is combined and sampled (text ids are -inf in both halves).
        cond, uncond = logits[:b, tv:], logits[b:, tv:]
        code = sampling(uncond + scale * (cond - uncond), keys[i].to(text.device))
        codes.append(code)
        if i + 1 < cfg.image_len:
            logits, cache = decoding.decode_step(
                params, (code + tv).repeat(2), cache, cfg=spec, donate=True
            )
    return torch.stack(codes, dim=1)
