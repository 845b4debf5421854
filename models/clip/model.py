"""CLIP as pure functions: ``init``, ``encode_image``, ``encode_text``, ``apply``, ``loss``.

Param tree (PyTorch layouts, so converters are key maps)::

    image.patch.weight          [width, 3, patch, patch]   (no bias, as in OpenAI CLIP)
    image.cls                   [width]
    image.pos                   [grid*grid + 1, width]
    image.norm_pre / norm_post  layer norms
    image.transformer.blocks.N  pre-norm blocks
    image.proj.weight           [embed, width]
    text.token.weight           [vocab, width]
    text.pos                    [context, width]
    text.transformer.blocks.N
    text.norm_final
    text.proj.weight            [embed, width]
    logit_scale                 []   log inverse temperature
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import repeat

from fmm import checks, nn, random
from fmm.losses import contrastive_loss, local_gather, logit_scale_value
from fmm.losses.contrastive import Gather
from fmm.nn.transformer import BlockFn
from models.clip.config import CLIPConfig
from models.family import Field

Params = dict[str, Any]


def init(cfg: CLIPConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params for ``cfg``; every leaf's key is folded from its path, so the result is a
    pure function of ``(cfg, key)``. Pass a key on the ``meta`` device to get shapes only.

    Example: ``params = init(clip_tiny(), fmm.random.key(0))``.
    """
    checks.check_type("cfg", cfg, CLIPConfig)
    ki, kt = random.fold_in(key, "image"), random.fold_in(key, "text")
    wi, wt, dev = cfg.image_width, cfg.text_width, key.device
    image = {
        "patch": nn.init_patch_embed(
            cfg.patch_size,
            cfg.in_channels,
            wi,
            random.fold_in(ki, "patch"),
            bias=False,
            dtype=dtype,
        ),
        "cls": random.normal(random.fold_in(ki, "cls"), (wi,), dtype=dtype) * wi**-0.5,
        "pos": random.normal(random.fold_in(ki, "pos"), (cfg.grid**2 + 1, wi), dtype=dtype)
        * wi**-0.5,
        "norm_pre": nn.init_layer_norm(wi, device=dev, dtype=dtype),
        "transformer": nn.init_transformer(
            cfg.image_transformer, random.fold_in(ki, "transformer"), dtype=dtype
        ),
        "norm_post": nn.init_layer_norm(wi, device=dev, dtype=dtype),
        "proj": nn.init_linear(
            wi, cfg.embed_dim, random.fold_in(ki, "proj"), bias=False, dtype=dtype
        ),
    }
    text = {
        "token": nn.init_embedding(
            cfg.vocab_size, wt, random.fold_in(kt, "token"), std=0.02, dtype=dtype
        ),
        "pos": nn.init_learned_positions(
            cfg.context_length, wt, random.fold_in(kt, "pos"), std=0.01, dtype=dtype
        ),
        "transformer": nn.init_transformer(
            cfg.text_transformer, random.fold_in(kt, "transformer"), dtype=dtype
        ),
        "norm_final": nn.init_layer_norm(wt, device=dev, dtype=dtype),
        "proj": nn.init_linear(
            wt, cfg.embed_dim, random.fold_in(kt, "proj"), bias=False, dtype=dtype
        ),
    }
    logit_scale = torch.full((), cfg.init_logit_scale, dtype=dtype, device=dev)
    return {"image": image, "text": text, "logit_scale": logit_scale}


# Input checks; the callers check the params first, so the param leaves read here exist.
def _check_images(params: Params, images: torch.Tensor, cfg: CLIPConfig, name: str) -> None:
    want = ("batch", cfg.in_channels, cfg.image_size, cfg.image_size)
    checks.check_float(name, images, want, like=params["image"]["patch"]["weight"])


def _check_tokens(tokens: torch.Tensor, cfg: CLIPConfig, name: str) -> None:
    checks.check_ids(
        name, tokens, ("batch", range(1, cfg.context_length + 1)), high=cfg.vocab_size,
        hint=f"context_length={cfg.context_length}",
    )  # fmt: skip


def _image_features(params: Params, images, cfg: CLIPConfig, block_fn) -> torch.Tensor:
    p = params["image"]
    x = nn.patch_embed(p["patch"], images)
    cls = repeat(p["cls"], "d -> b 1 d", b=x.shape[0]).to(x.dtype)
    x = torch.cat([cls, x], dim=1) + p["pos"]
    x = nn.layer_norm(p["norm_pre"], x, eps=cfg.norm_eps)
    x = nn.transformer(p["transformer"], x, cfg=cfg.image_transformer, block_fn=block_fn)
    return nn.layer_norm(p["norm_post"], x, eps=cfg.norm_eps)


def _text_features(params: Params, tokens, cfg: CLIPConfig, block_fn) -> torch.Tensor:
    p = params["text"]
    x = nn.embed(p["token"], tokens) + p["pos"][: tokens.shape[1]]
    x = nn.transformer(
        p["transformer"], x, cfg=cfg.text_transformer, causal=True, block_fn=block_fn
    )
    return nn.layer_norm(p["norm_final"], x, eps=cfg.norm_eps)


def _encode_image(params: Params, images, cfg: CLIPConfig, normalize: bool, block_fn):
    x = nn.pool_cls(_image_features(params, images, cfg, block_fn))
    x = nn.linear(params["image"]["proj"], x)
    return F.normalize(x, dim=-1) if normalize else x


def _encode_text(params: Params, tokens, cfg: CLIPConfig, normalize: bool, block_fn):
    x = nn.pool_eot(_text_features(params, tokens, cfg, block_fn), tokens)
    x = nn.linear(params["text"]["proj"], x)
    return F.normalize(x, dim=-1) if normalize else x


def image_features(
    params: Params, images: torch.Tensor, *, cfg: CLIPConfig, block_fn: BlockFn | None = None
) -> torch.Tensor:
    """The image tower's token sequence after the final norm: ``[B, 3, H, W] -> [B, 1+grid², width]``.

    ``block_fn`` runs each transformer block (see :func:`fmm.nn.transformer`); ``fmm.adapter``
    passes one to shard or checkpoint blocks. Default: :func:`fmm.nn.block`."""
    checks.check_params(params, init=init, cfg=cfg, only=("image",))
    _check_images(params, images, cfg, "images")
    return _image_features(params, images, cfg, block_fn)


def text_features(
    params: Params, tokens: torch.Tensor, *, cfg: CLIPConfig, block_fn: BlockFn | None = None
) -> torch.Tensor:
    """The text tower's causal token sequence after the final norm: ``[B, T] -> [B, T, width]``."""
    checks.check_params(params, init=init, cfg=cfg, only=("text",))
    _check_tokens(tokens, cfg, "tokens")
    return _text_features(params, tokens, cfg, block_fn)


def encode_image(
    params: Params,
    images: torch.Tensor,
    *,
    cfg: CLIPConfig,
    normalize: bool = True,
    block_fn: BlockFn | None = None,
) -> torch.Tensor:
    """Image embeddings ``[B, 3, H, W] -> [B, embed]``, unit norm unless ``normalize=False``.

    Example: ``encode_image(params, torch.rand(2, 3, 224, 224), cfg=clip_vit_b16())``.
    """
    checks.check_params(params, init=init, cfg=cfg, only=("image",))
    _check_images(params, images, cfg, "images")
    return _encode_image(params, images, cfg, normalize, block_fn)


def encode_text(
    params: Params,
    tokens: torch.Tensor,
    *,
    cfg: CLIPConfig,
    normalize: bool = True,
    block_fn: BlockFn | None = None,
) -> torch.Tensor:
    """Text embeddings ``[B, T] (int64) -> [B, embed]`` read at the end-of-text token (the
    largest id in each row), unit norm unless ``normalize=False``."""
    checks.check_params(params, init=init, cfg=cfg, only=("text",))
    _check_tokens(tokens, cfg, "tokens")
    return _encode_text(params, tokens, cfg, normalize, block_fn)


def _check_pairs(params: Params, images, tokens, cfg: CLIPConfig, names: tuple[str, str]):
    checks.check_params(params, init=init, cfg=cfg)
    _check_images(params, images, cfg, names[0])
    _check_tokens(tokens, cfg, names[1])
    checks.check_same_batch((names[0], images), (names[1], tokens))


def _apply(params: Params, images, tokens, cfg: CLIPConfig, block_fn):
    return (
        _encode_image(params, images, cfg, True, block_fn),
        _encode_text(params, tokens, cfg, True, block_fn),
        logit_scale_value(params["logit_scale"]),
    )


def apply(
    params: Params,
    images: torch.Tensor,
    tokens: torch.Tensor,
    *,
    cfg: CLIPConfig,
    block_fn: BlockFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both towers: ``(image_embeds [B, E], text_embeds [B, E], scale [])`` where
    ``scale * image_embeds @ text_embeds.T`` are CLIP's logits."""
    _check_pairs(params, images, tokens, cfg, ("images", "tokens"))
    return _apply(params, images, tokens, cfg, block_fn)


def batch_fields(cfg: CLIPConfig) -> dict[str, Field]:
    """The batch :func:`loss` reads: ``images [batch, C, H, W]`` float and ``tokens
    [batch, seq]`` int64 ids (``seq <= context_length``; the end-of-text token is each row's
    largest id)."""
    c, s = cfg.in_channels, cfg.image_size
    return {
        "images": Field("float", ("batch", c, s, s), doc="pixels, normalised as in training"),
        "tokens": Field(
            "int", ("batch", "seq"), high=cfg.vocab_size, doc="caption ids, end-of-text last"
        ),
    }


def loss(
    params: Params,
    batch: dict[str, torch.Tensor],
    *,
    cfg: CLIPConfig,
    key: torch.Tensor | None = None,
    train: bool = True,
    block_fn: BlockFn | None = None,
    gather: Gather = local_gather,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric contrastive loss of ``batch = {"images": [B, C, H, W], "tokens": [B, T]}``.

    Returns ``(loss [], {"logit_scale": []})``, the clamped scale, detached. ``gather``
    (``fmm.losses.contrastive``'s seam) brings the other ranks' embeddings with gradients,
    so every image meets every caption of the global batch. ``key`` and ``train`` are the
    contract's: CLIP has no dropout, so neither changes the result.

    Example: ``value, metrics = loss(params, {"images": x, "tokens": t}, cfg=clip_tiny())``.
    """
    del key, train  # no stochastic layer in CLIP
    checks.check_keys(batch, ("images", "tokens"))
    _check_pairs(
        params, batch["images"], batch["tokens"], cfg, ("batch['images']", "batch['tokens']")
    )
    img, txt, scale = _apply(params, batch["images"], batch["tokens"], cfg, block_fn)
    value = contrastive_loss(img, txt, params["logit_scale"], gather=gather)
    return value, {"logit_scale": scale.detach()}


def logit_scale(params: Params) -> torch.Tensor:
    """The zero-shot scale ``[]``: logits are ``logit_scale(params) * image @ text.T``."""
    checks.check_keys(params, ("logit_scale",), name="params")
    return logit_scale_value(params["logit_scale"])


def image_shape(cfg: CLIPConfig) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the images the image tower takes."""
    return (cfg.in_channels, cfg.image_size, cfg.image_size)
