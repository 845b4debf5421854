"""Captions from CoCa through :mod:`fmm.decoding`'s KV cache.

The unimodal and multimodal decoders are one causal stack for decoding
(:attr:`CoCaConfig.causal_blocks`: blocks without cross-attention, then cross-attending
ones); the captioning queries are the context, whose keys and values each cross-attending
block computes once at the prefill. The class token is not part of a caption: it only
feeds the contrastive embedding, so decoding never runs it.
"""

from __future__ import annotations

import functools

import torch

from fmm import checks, decoding, nn
from models.coca.config import CoCaConfig
from models.coca.model import Params, _check_images, _image, head, init


def _embed(params: Params, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    text = params["text"]
    return nn.embed(text["token"], tokens) + text["pos"][positions]


def _blocks(params: Params) -> list[Params]:
    return [*params["text"]["transformer"]["blocks"], *params["decoder"]["transformer"]["blocks"]]


@functools.cache
def decoder_spec(cfg: CoCaConfig) -> decoding.DecoderSpec:
    """How :mod:`fmm.decoding` runs CoCa's causal stack (unimodal then multimodal blocks,
    cross-attending the captioning queries given as ``context=``). Cached per config, so
    compile guards hold.

    Example::

        spec = decoder_spec(cfg)
        out = fmm.decoding.generate(params, sot, cfg=spec, max_new_tokens=20,
                                    context=image_queries(params, images, cfg=cfg))
    """
    return decoding.DecoderSpec(
        transformer=cfg.causal_blocks,
        embed=_embed,
        head=functools.partial(head, cfg=cfg),
        blocks=_blocks,
        # The last position belongs to the class token in training.
        max_positions=cfg.context_length - 1,
        vocab_size=cfg.vocab_size,
        init=init,
        config=cfg,
    )


def generate_captions(
    params: Params,
    images: torch.Tensor,
    *,
    cfg: CoCaConfig,
    sot_id: int,
    max_new_tokens: int,
    eos_id: int | None = None,
    prompt: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    pad_id: int | None = None,
    compile: bool | str = False,
) -> decoding.Generation:
    """Caption ``images [B, 3, H, W]``: encode them once, then continue ``prompt [B, S]``
    (default: the start-of-text id ``sot_id`` alone) by ``max_new_tokens`` tokens with one
    cached decode step per token. Greedy by default (``temperature=0``); a row stops at
    ``eos_id`` (later tokens are ``pad_id``, default ``cfg.pad_id``).

    Returns :class:`fmm.decoding.Generation` ``(tokens [B, max_new_tokens], lengths [B])``.

    Example::

        out = generate_captions(params, images, cfg=cfg, sot_id=1, eos_id=2,
                                max_new_tokens=12)
    """
    checks.check_params(params, init=init, cfg=cfg)
    _check_images(params, images, cfg, "images")
    if prompt is None:
        prompt = torch.full((images.shape[0], 1), sot_id, dtype=torch.int64, device=images.device)
    checks.check_same_batch(("images", images), ("prompt", prompt))
    with torch.no_grad():
        queries = _image(params, images, cfg, None)[1]
        return decoding.generate(
            params, prompt, cfg=decoder_spec(cfg), max_new_tokens=max_new_tokens, key=key,
            temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
            pad_id=cfg.pad_id if pad_id is None else pad_id, context=queries, compile=compile,
        )  # fmt: skip
