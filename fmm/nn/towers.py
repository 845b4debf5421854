"""The shared encoder towers: one ViT and one text tower that every family configures.

A tower is embeddings, one :func:`fmm.nn.transformer` stack (pre- or post-norm, through
``block_fn`` so the adapter can shard and checkpoint each block) and an optional final norm.
Families add what is theirs (projections, poolers, heads) beside the tower's params in the
same subtree; the towers read only their own keys.

ViT params (``init_vit``)::

    patch                   {weight [width, C, p, p], bias (if cfg.patch_bias)}
                            (video, cfg.frames set: weight [width, C, tubelet, p, p])
    cls                     [width]            class token, prepended (if cfg.cls_token)
    pos                     [cfg.seq, width]   patches + 1 (video: patches times frames/tubelet)
    mask_token              [width]            (if cfg.mask_token) the [MASK] patch of MIM
    norm_pre                layer norm before the stack (if cfg.norm_pre; CLIP's ln_pre)
    transformer.blocks.N
    norm                    final layer norm (if cfg.norm)

Text params (``init_text``)::

    token.weight            [vocab, width]
    pos                     [context, width]   learned absolute positions
    token_type.weight       [types, width]     (if cfg.type_vocab_size; BERT's segments)
    norm_embed              layer norm over the summed embeddings (if cfg.norm_embed; BERT)
    transformer.blocks.N
    norm                    final layer norm (if cfg.norm)

Both towers return :class:`Encoded`: ``sequence`` after the final norm and ``hidden``, the
last block's output before it (FLAVA's multimodal encoder reads ``hidden``).

Example::

    cfg = ViTConfig(image_size=32, patch_size=4, transformer=TransformerConfig(
        width=64, layers=2, heads=4))
    out = vit(init_vit(cfg, fmm.random.key(0)), torch.rand(2, 3, 32, 32), cfg=cfg)
    out.sequence.shape  # [2, 65, 64]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from fmm import random
from fmm.nn.attention import padding_mask
from fmm.nn.conv import init_kernel
from fmm.nn.embed import embed, init_embedding, init_patch_embed, patch_embed
from fmm.nn.norm import init_layer_norm, layer_norm
from fmm.nn.swin import patch_embed_3d
from fmm.nn.transformer import BlockFn, TransformerConfig, init_transformer, transformer

Params = dict[str, Any]

__all__ = [
    "Encoded",
    "TextConfig",
    "ViTConfig",
    "encode_embeddings",
    "init_text",
    "init_vit",
    "text",
    "vit",
]


class Encoded(NamedTuple):
    """A tower's outputs, both ``[batch, seq, width]``: ``sequence`` after the final norm
    (equal to ``hidden`` when the tower has none) and ``hidden`` before it."""

    sequence: torch.Tensor
    hidden: torch.Tensor


@dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """A vision transformer tower over ``image_size``² images cut in ``patch_size``² patches.

    ``image_size``: one side of a square input, or ``(height, width)`` of a rectangular one
    (a spectrogram ``[B, 1, frames, mels]`` is ``(frames, mels)``); the patches run
    row-major over its :attr:`grid_shape`, each with its own learned position. An int and
    the equal pair build the same tower (same params, same outputs).

    ``cls_token``: False drops the class token (TorchMultimodal's CoCa ViT: an attentional
    pooler reads the patches instead).

    ``embed_std``: std of the class token and positions (``None``: ``width ** -0.5``, as
    CLIP); ``dropout``: on the embeddings in training (the blocks have their own).

    ``frames``: ``None`` for images ``[B, C, H, W]``; a count makes it a video tower over
    ``[B, C, frames, H, W]``, cut in tubes of ``tubelet`` frames x ``patch_size``² pixels
    (a 3-D patch embedding, as ViViT's tubelets), every tube a token of one space-time
    attention stack with its own learned position.
    """

    image_size: int | tuple[int, int]
    patch_size: int
    transformer: TransformerConfig
    in_channels: int = 3
    patch_bias: bool = True
    norm_pre: bool = False
    norm: bool = True
    mask_token: bool = False
    embed_std: float | None = None
    dropout: float = 0.0
    frames: int | None = None
    tubelet: int = 1
    cls_token: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.image_size, list):  # a config.json round trip gives a list
            object.__setattr__(self, "image_size", tuple(self.image_size))
        sides = self.size
        if (
            len(sides) != 2
            or self.patch_size < 1
            or any(not isinstance(n, int) or n < 1 or n % self.patch_size for n in sides)
        ):
            raise ValueError(
                f"ViTConfig: image_size={self.image_size} must be a side or a (height, width) "
                f"pair of positive multiples of patch_size={self.patch_size}"
            )
        if self.tubelet < 1 or (self.frames is not None and self.frames % self.tubelet):
            raise ValueError(
                f"ViTConfig: frames={self.frames} must be a positive multiple of "
                f"tubelet={self.tubelet}"
            )
        if self.frames is None and self.tubelet != 1:
            raise ValueError(f"ViTConfig: tubelet={self.tubelet} needs frames= (a video tower)")

    @property
    def width(self) -> int:
        return self.transformer.width

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of one input (one frame of a video)."""
        s = self.image_size
        return (s, s) if isinstance(s, int) else s

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Patches along the height and the width."""
        return self.size[0] // self.patch_size, self.size[1] // self.patch_size

    @property
    def grid(self) -> int:
        """Patches per side of a square input (a rectangular one has :attr:`grid_shape`)."""
        rows, cols = self.grid_shape
        if rows != cols:
            raise ValueError(
                f"ViTConfig: image_size={self.image_size} is not square: read grid_shape"
            )
        return rows

    @property
    def patches(self) -> int:
        """Patches per input (per tube of a video): ``rows * cols`` of :attr:`grid_shape`."""
        return self.grid_shape[0] * self.grid_shape[1]

    @property
    def tubes(self) -> int:
        """Tubes along time: 1 for an image tower."""
        return 1 if self.frames is None else self.frames // self.tubelet

    @property
    def seq(self) -> int:
        """Tokens out of the tower: the class token (if ``cls_token``) and every patch (or
        tube)."""
        return self.tubes * self.patches + int(self.cls_token)


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """A text tower over ids in ``[0, vocab_size)`` and up to ``context_length`` positions.

    ``causal``: each token attends to those before it (CLIP, GPT) rather than to all (BERT).
    ``token_std`` / ``pos_std``: init stds of the token table and positions.
    """

    vocab_size: int
    context_length: int
    transformer: TransformerConfig
    causal: bool = False
    type_vocab_size: int = 0
    norm_embed: bool = False
    norm: bool = True
    token_std: float = 0.02
    pos_std: float = 0.01
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.context_length < 1 or self.type_vocab_size < 0:
            raise ValueError(
                f"TextConfig: vocab_size={self.vocab_size} and context_length="
                f"{self.context_length} must be positive, type_vocab_size >= 0"
            )

    @property
    def width(self) -> int:
        return self.transformer.width


def init_vit(cfg: ViTConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh ViT params; leaf keys folded from their names (``patch``, ``cls``, ...)."""
    d, dev = cfg.width, key.device
    k = lambda name: random.fold_in(key, name)
    std = d**-0.5 if cfg.embed_std is None else cfg.embed_std
    params: Params = {"patch": _init_patch(cfg, k("patch"), dtype)}
    if cfg.cls_token:
        params["cls"] = random.normal(k("cls"), (d,), dtype=dtype) * std
    params["pos"] = random.normal(k("pos"), (cfg.seq, d), dtype=dtype) * std
    if cfg.mask_token:
        params["mask_token"] = random.normal(k("mask_token"), (d,), dtype=dtype) * std
    if cfg.norm_pre:
        params["norm_pre"] = init_layer_norm(d, device=dev, dtype=dtype)
    params["transformer"] = init_transformer(cfg.transformer, k("transformer"), dtype=dtype)
    if cfg.norm:
        params["norm"] = init_layer_norm(d, device=dev, dtype=dtype)
    return params


def _init_patch(cfg: ViTConfig, key: torch.Tensor, dtype: torch.dtype) -> Params:
    p, c = cfg.patch_size, cfg.in_channels
    if cfg.frames is None:
        return init_patch_embed(p, c, cfg.width, key, bias=cfg.patch_bias, dtype=dtype)
    # The same N(0, 1/fan_in) init as the 2-d patch embedding, over a tube.
    fan_in = c * cfg.tubelet * p * p
    return init_kernel(
        (cfg.width, c, cfg.tubelet, p, p), fan_in, key, out_channels=cfg.width,
        bias=cfg.patch_bias, std=fan_in**-0.5, dtype=dtype,
    )  # fmt: skip


def init_text(cfg: TextConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh text-tower params; leaf keys folded from their names (``token``, ``pos``, ...)."""
    d, dev = cfg.width, key.device
    k = lambda name: random.fold_in(key, name)
    params: Params = {
        "token": init_embedding(cfg.vocab_size, d, k("token"), std=cfg.token_std, dtype=dtype),
        "pos": random.normal(k("pos"), (cfg.context_length, d), dtype=dtype) * cfg.pos_std,
    }
    if cfg.type_vocab_size:
        params["token_type"] = init_embedding(
            cfg.type_vocab_size, d, k("token_type"), std=cfg.token_std, dtype=dtype
        )
    if cfg.norm_embed:
        params["norm_embed"] = init_layer_norm(d, device=dev, dtype=dtype)
    params["transformer"] = init_transformer(cfg.transformer, k("transformer"), dtype=dtype)
    if cfg.norm:
        params["norm"] = init_layer_norm(d, device=dev, dtype=dtype)
    return params


def encode_embeddings(
    params: Params,
    x: torch.Tensor,
    *,
    cfg: ViTConfig | TextConfig,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    key: torch.Tensor | None = None,
    train: bool = False,
    block_fn: BlockFn | None = None,
) -> Encoded:
    """A tower after its embeddings: embedding dropout (in training), the stack, the final
    norm. ``x: [B, S, width]`` -> :class:`Encoded` ``[B, S, width]``; ``mask``: bool,
    broadcastable to ``[B, heads, S, S]``.

    :func:`vit` and :func:`text` end here; a family whose embeddings are its own (the
    multimodal GPT's per-modality tables) calls it directly on ``{"transformer", "norm"}``.

    Example: ``encode_embeddings(params, x, cfg=text_cfg, causal=True).sequence``.
    """
    if train and cfg.dropout > 0.0:
        if key is None:
            raise ValueError("key= is missing: embedding dropout in training needs key=")
        x = random.dropout(random.fold_in(key, "embed"), x, cfg.dropout)
    k = random.fold_in(key, "transformer") if key is not None else None
    hidden = transformer(
        params["transformer"], x, cfg=cfg.transformer, mask=mask, causal=causal, key=k,
        train=train, block_fn=block_fn,
    )  # fmt: skip
    out = layer_norm(params["norm"], hidden, eps=cfg.transformer.norm_eps) if cfg.norm else hidden
    return Encoded(out, hidden)


def vit(
    params: Params,
    images: torch.Tensor,
    *,
    cfg: ViTConfig,
    patch_mask: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    train: bool = False,
    block_fn: BlockFn | None = None,
) -> Encoded:
    """``images: [B, C, H, W]`` -> :class:`Encoded` ``[B, 1 + patches, width]``, class
    token first, patches row-major (a rectangular tower's ``H, W`` are its ``image_size``
    pair). ``patch_mask: [B, patches]`` bool replaces those patches by ``mask_token`` (MIM).
    A video tower (``cfg.frames``) takes ``[B, C, frames, H, W]`` and returns ``[B, 1 +
    tubes * patches, width]``, tubes in (time, row, column) order.

    Shapes are the caller's to check (families check at their public boundary).
    """
    if cfg.frames is None:
        x = patch_embed(params["patch"], images)
    else:
        x = patch_embed_3d(params["patch"], images).flatten(1, 3)
    if patch_mask is not None:
        x = torch.where(patch_mask.bool()[..., None], params["mask_token"].to(x.dtype), x)
    if cfg.cls_token:
        x = torch.cat([params["cls"].to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
    x = x + params["pos"]
    if cfg.norm_pre:
        x = layer_norm(params["norm_pre"], x, eps=cfg.transformer.norm_eps)
    return encode_embeddings(params, x, cfg=cfg, key=key, train=train, block_fn=block_fn)


def text(
    params: Params,
    ids: torch.Tensor,
    *,
    cfg: TextConfig,
    valid: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    train: bool = False,
    block_fn: BlockFn | None = None,
) -> Encoded:
    """``ids: [B, S]`` (int64) -> :class:`Encoded` ``[B, S, width]``.

    ``valid: [B, S]`` bool (True = a real token): no query attends to padding.
    ``token_type_ids: [B, S]`` (default all 0, as Hugging Face's BERT) if the tower has
    segments; ``positions: [B, S]`` position ids (default ``0 .. S-1``).
    """
    if positions is None:
        x = embed(params["token"], ids) + params["pos"][: ids.shape[1]]
    else:
        x = embed(params["token"], ids) + F.embedding(positions, params["pos"])
    if cfg.type_vocab_size:
        if token_type_ids is None:
            x = x + params["token_type"]["weight"][0]
        else:
            x = x + embed(params["token_type"], token_type_ids)
    if cfg.norm_embed:
        x = layer_norm(params["norm_embed"], x, eps=cfg.transformer.norm_eps)
    mask = None if valid is None else padding_mask(valid)
    return encode_embeddings(
        params, x, cfg=cfg, mask=mask, causal=cfg.causal, key=key, train=train, block_fn=block_fn
    )
