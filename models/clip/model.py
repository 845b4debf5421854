"""CLIP as pure functions: ``init``, ``encode_image``, ``encode_text``, ``apply``, ``loss``.

Both towers are :mod:`fmm.nn.towers`' (``cfg.image_tower``, ``cfg.text_tower``); CLIP adds
a projection to each and the learned temperature. Param tree (PyTorch layouts, so
converters are key maps)::

    image.patch.weight          [width, 3, patch, patch]   (no bias, as in OpenAI CLIP)
                                video tower: [width, 3, tubelet, patch, patch]
                                audio tower: [width, 1, patch, patch]
    image.cls                   [width]
    image.pos                   [patches + 1, width]       video: [tubes*patches + 1, width]
                                (patches: grid², or (frames/patch)*(mels/patch) for audio)
    image.norm_pre              layer norm before the stack (OpenAI's ln_pre)
    image.transformer.blocks.N  pre-norm blocks
    image.norm                  final layer norm (ln_post)
    image.proj.weight           [embed, width]
    text.token.weight           [vocab, width]
    text.pos                    [context, width]
    text.transformer.blocks.N   causal pre-norm blocks
    text.norm                   final layer norm (ln_final)
    text.proj.weight            [embed, width]
    logit_scale                 []   log inverse temperature
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fmm import checks, nn, random
from fmm.losses import contrastive_loss, local_gather, logit_scale_value
from fmm.losses.contrastive import Gather
from fmm.nn import towers
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
    image = towers.init_vit(cfg.image_tower, ki, dtype=dtype)
    image["proj"] = nn.init_linear(
        cfg.image_width, cfg.embed_dim, random.fold_in(ki, "proj"), bias=False, dtype=dtype
    )
    text = towers.init_text(cfg.text_tower, kt, dtype=dtype)
    text["proj"] = nn.init_linear(
        cfg.text_width, cfg.embed_dim, random.fold_in(kt, "proj"), bias=False, dtype=dtype
    )
    logit_scale = torch.full((), cfg.init_logit_scale, dtype=dtype, device=key.device)
    return {"image": image, "text": text, "logit_scale": logit_scale}


# Input checks; the callers check the params first, so the param leaves read here exist.
def _check_images(params: Params, images: torch.Tensor, cfg: CLIPConfig, name: str) -> None:
    checks.check_float(
        name, images, ("batch", *cfg.input_shape), like=params["image"]["patch"]["weight"]
    )


def _check_tokens(tokens: torch.Tensor, cfg: CLIPConfig, name: str) -> None:
    checks.check_ids(
        name, tokens, ("batch", range(1, cfg.context_length + 1)), high=cfg.vocab_size,
        hint=f"context_length={cfg.context_length}",
    )  # fmt: skip


def _image_features(params: Params, images, cfg: CLIPConfig, block_fn) -> torch.Tensor:
    return towers.vit(params["image"], images, cfg=cfg.image_tower, block_fn=block_fn).sequence


def _text_features(params: Params, tokens, cfg: CLIPConfig, block_fn) -> torch.Tensor:
    return towers.text(params["text"], tokens, cfg=cfg.text_tower, block_fn=block_fn).sequence


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
    """The image tower's token sequence after the final norm: ``[B, 3, H, W] -> [B, 1+grid², width]``
    (a video tower: ``[B, 3, frames, H, W] -> [B, 1 + tubes * grid², width]``; an audio
    tower: ``[B, 1, frames, mels] -> [B, 1 + patches, width]``).

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
    """Image embeddings ``[B, 3, H, W] -> [B, embed]``, unit norm unless ``normalize=False``
    (a video tower, ``cfg.frames`` set, embeds clips ``[B, 3, frames, H, W]``; an audio
    tower, ``image_size=(frames, mels)``, spectrograms ``[B, 1, frames, mels]``).

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
    """The batch :func:`loss` reads: ``images [batch, C, H, W]`` (a video tower: ``[batch, C,
    frames, H, W]``) float and ``tokens [batch, seq]`` int64 ids (``seq <= context_length``;
    the end-of-text token is each row's largest id)."""
    return {
        "images": Field(
            "float", ("batch", *cfg.input_shape), doc="pixels, normalised as in training"
        ),
        "tokens": Field(
            "int",
            ("batch", "seq"),
            high=cfg.vocab_size,
            limits={"seq": cfg.context_length},
            doc="caption ids, the end-of-text token the largest id of each row",
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


def image_shape(cfg: CLIPConfig) -> tuple[int, ...]:
    """``(channels, height, width)`` of the images the image tower takes; a video tower's
    ``(channels, frames, height, width)``."""
    return cfg.input_shape
