"""Caption -> image sampling for the multimodal GPT.

Every image position's logits are masked to image ids (:func:`models.mmgpt.modality_mask`)
before sampling, so a text token can never be drawn where an image code belongs.
"""

from __future__ import annotations

import torch

from fmm import random
from models.mmgpt.config import MMGPTConfig
from models.mmgpt.model import Params, _check_tokens, apply, mask_logits, modality_mask


def sample_logits(
    logits: torch.Tensor,
    key: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """One id per row of ``logits [B, vocab]``: greedy when ``temperature == 0``, else a draw
    from ``softmax(logits / temperature)`` restricted to the ``top_k`` largest. ``[B]`` int64.

    Ids whose logit is ``-inf`` are never drawn (Gumbel-max with an explicit key).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    if top_k is not None:
        if not 1 <= top_k <= logits.shape[-1]:
            raise ValueError(f"top_k must be in [1, {logits.shape[-1]}], got {top_k}")
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    u = random.uniform(key, logits.shape, dtype=torch.float64).clamp_min(1e-300).to(logits.device)
    gumbel = -torch.log(-torch.log(u))
    return (logits.double() / temperature + gumbel).argmax(-1)


def generate_images(
    params: Params,
    text: torch.Tensor,
    *,
    cfg: MMGPTConfig,
    key: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Sample ``image_len`` image codes after each caption of ``text [B, text_len]``.

    Returns int64 codes ``[B, image_len]`` in ``[0, image_vocab)`` (raster order; reshape to
    the VQ-VAE grid and ``models.vqvae.decode`` them). Step ``i`` draws with
    ``fold_in(key, i)``, so the same key gives the same images, call after call.

    Example::

        codes = generate_images(params, tok.encode(["a red circle"] * 8, 16), cfg=cfg, key=k)
        images = models.vqvae.decode(vq_params, codes.reshape(8, 8, 8), cfg=vq_cfg)
    """
    _check_tokens(text, cfg, "text")
    if text.shape[1] != cfg.text_len:
        raise ValueError(f"text must have shape [batch, {cfg.text_len}], got {list(text.shape)}")
    if int(text.max()) >= cfg.text_vocab or int(text.min()) < 0:
        raise ValueError(f"text ids must lie in [0, {cfg.text_vocab}), got {text.tolist()[:2]}...")
    allowed = modality_mask(cfg, "image", device=text.device)
    seq = text
    with torch.no_grad():
        for i in range(cfg.image_len):
            # Without a KV cache each step re-reads the whole prefix: fine at 80 tokens.
            logits = mask_logits(apply(params, seq, cfg=cfg)[:, -1], allowed)
            token = sample_logits(
                logits, random.fold_in(key, i), temperature=temperature, top_k=top_k
            )
            seq = torch.cat([seq, token[:, None]], dim=1)
    return seq[:, cfg.text_len :] - cfg.text_vocab
