"""FLAVA's encoders as pure functions: image (ViT), text (BERT embeddings, pre-norm
blocks) and multimodal (self-attention over both), plus the contrastive embeddings.

Param tree (PyTorch layouts)::

    image.patch             {weight [D, C, p, p], bias}: patch projection (a strided conv)
    image.cls, image.mask_token   [D]: the class token and the learned [MASK] patch
    image.pos               [patches + 1, D]: learned positions, class token first
    image.transformer / text.transformer / mm.transformer   pre-norm blocks (fmm.nn)
    image.norm, text.norm, mm.norm   the final LayerNorm of each encoder
    image.pooler, text.pooler, mm.pooler   tanh dense on the first token
    text.token / pos / token_type / norm_embed   BERT's embeddings (models.bert)
    mm.cls                  [D_mm]: the multimodal class token
    image_to_mm, text_to_mm linear maps of each encoder's hidden states into the mm width
    image_proj, text_proj   linear maps of the class tokens to the contrastive space
    heads                   pretraining heads and logit_scale (models.flava.heads)

As in FLAVA, the multimodal encoder reads each unimodal encoder's last block output
*before* its final LayerNorm (``Encoded.hidden``), and its sequence is
``[mm cls, image cls, patches..., text tokens...]``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from fmm import nn, random
from models import bert
from models.flava.config import FLAVAConfig
from models.flava.heads import init_heads

Params = dict[str, Any]

_INIT_STD = 0.02  # FLAVA's initializer_range


class Encoded(NamedTuple):
    """An encoder's outputs: ``sequence`` after the final LayerNorm and ``hidden`` (the last
    block's output, before it), both ``[batch, seq, width]``."""

    sequence: torch.Tensor
    hidden: torch.Tensor


def _linear(d_in: int, d_out: int, key: torch.Tensor, dtype) -> Params:
    return nn.init_linear(d_in, d_out, key, std=_INIT_STD, dtype=dtype)


def _init_image(cfg: FLAVAConfig, key: torch.Tensor, dtype) -> Params:
    d, dev = cfg.image_width, key.device
    k = lambda name: random.fold_in(key, name)
    params: Params = {
        "patch": nn.init_patch_embed(cfg.patch_size, cfg.in_channels, d, k("patch"), dtype=dtype),
        "cls": random.normal(k("cls"), (d,), dtype=dtype) * _INIT_STD,
        "pos": nn.init_learned_positions(
            cfg.num_patches + 1, d, k("pos"), std=_INIT_STD, dtype=dtype
        ),
        "transformer": nn.init_transformer(cfg.image_transformer, k("transformer"), dtype=dtype),
        "norm": nn.init_layer_norm(d, device=dev, dtype=dtype),
        "pooler": _linear(d, d, k("pooler"), dtype),
    }
    if cfg.image_masking:
        params["mask_token"] = random.normal(k("mask_token"), (d,), dtype=dtype) * _INIT_STD
    return params


def init_model(
    cfg: FLAVAConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> Params:
    """The encoders and projections (what TorchMultimodal's ``flava_model`` holds), without
    the pretraining heads. Pure in ``(cfg, key)``; a ``meta`` key gives shapes only."""
    k = lambda name: random.fold_in(key, name)
    # BERT's init gives the embeddings, the pooler and blocks of the same shapes (a block's
    # params do not depend on where its norms sit); FLAVA adds a final norm.
    text = bert.init(cfg.text_embeddings, k("text"), dtype=dtype)
    text["norm"] = nn.init_layer_norm(cfg.text_width, device=key.device, dtype=dtype)
    return {
        "image": _init_image(cfg, k("image"), dtype),
        "text": text,
        "mm": {
            "cls": random.normal(k("mm.cls"), (cfg.mm_width,), dtype=dtype) * _INIT_STD,
            "transformer": nn.init_transformer(
                cfg.mm_transformer, k("mm.transformer"), dtype=dtype
            ),
            "norm": nn.init_layer_norm(cfg.mm_width, device=key.device, dtype=dtype),
            "pooler": _linear(cfg.mm_width, cfg.mm_width, k("mm.pooler"), dtype),
        },
        "image_to_mm": _linear(cfg.image_width, cfg.mm_width, k("image_to_mm"), dtype),
        "text_to_mm": _linear(cfg.text_width, cfg.mm_width, k("text_to_mm"), dtype),
        "image_proj": _linear(cfg.image_width, cfg.embed_dim, k("image_proj"), dtype),
        "text_proj": _linear(cfg.text_width, cfg.embed_dim, k("text_proj"), dtype),
    }


def init(cfg: FLAVAConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params for pretraining: :func:`init_model` plus ``heads`` (MLM, MIM, MMM, ITM
    heads and the contrastive ``logit_scale``).

    Example: ``params = init(flava_tiny(), fmm.random.key(0))``.
    """
    return {
        **init_model(cfg, key, dtype=dtype),
        "heads": init_heads(cfg, random.fold_in(key, "heads"), dtype=dtype),
    }


def _check_images(images: torch.Tensor, cfg: FLAVAConfig) -> None:
    want = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(
            f"images must be [batch, {want[0]}, {want[1]}, {want[2]}], got {list(images.shape)}"
        )


def _check_ids(input_ids: torch.Tensor, cfg: FLAVAConfig) -> None:
    if input_ids.dtype == torch.bool or input_ids.dtype.is_floating_point:
        raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if input_ids.ndim != 2 or not 1 <= input_ids.shape[1] <= cfg.max_positions:
        raise ValueError(
            f"input_ids must be [batch, seq] with 1 <= seq <= max_positions={cfg.max_positions}, "
            f"got {list(input_ids.shape)}"
        )
    # Data-dependent: eager only (compile would graph-break on it).
    if not torch.compiler.is_compiling() and input_ids.numel():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, {cfg.vocab_size}), got values in [{lo}, {hi}]"
            )


def _stack(params: Params, x, cfg, tcfg, mask, key, train, name) -> torch.Tensor:
    if train and cfg.dropout > 0.0:
        if key is None:
            raise ValueError(f"{name}: dropout in training needs key=")
        x = random.dropout(random.fold_in(key, "embed"), x, cfg.dropout)
    k = random.fold_in(key, "transformer") if key is not None else None
    return nn.transformer(params["transformer"], x, cfg=tcfg, mask=mask, key=k, train=train)


def encode_image(
    params: Params,
    images: torch.Tensor,
    *,
    cfg: FLAVAConfig,
    patch_mask: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    train: bool = False,
) -> Encoded:
    """Encode ``images: [B, C, H, W]`` with the image params (``params["image"]``) into
    ``[B, patches + 1, image_width]`` (class token first).

    ``patch_mask: [B, patches]`` bool, True = replace that patch by the [MASK] token (MIM).

    Example: ``out = encode_image(params["image"], images, cfg=cfg); out.sequence[:, 0]``.
    """
    _check_images(images, cfg)
    x = nn.patch_embed(params["patch"], images)
    if patch_mask is not None:
        if "mask_token" not in params:
            raise ValueError("encode_image: patch_mask given but cfg.image_masking is False")
        if patch_mask.shape != x.shape[:2]:
            raise ValueError(
                f"patch_mask must be [batch, patches] = {list(x.shape[:2])}, "
                f"got {list(patch_mask.shape)}"
            )
        x = torch.where(patch_mask.bool()[..., None], params["mask_token"].to(x.dtype), x)
    cls = params["cls"].expand(x.shape[0], 1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1) + params["pos"]
    hidden = _stack(params, x, cfg, cfg.image_transformer, None, key, train, "encode_image")
    return Encoded(nn.layer_norm(params["norm"], hidden, eps=cfg.norm_eps), hidden)


def encode_text(
    params: Params,
    input_ids: torch.Tensor,
    *,
    cfg: FLAVAConfig,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    train: bool = False,
) -> Encoded:
    """Encode ``input_ids: [B, S]`` with the text params (``params["text"]``) into
    ``[B, S, text_width]``.

    ``attention_mask: [B, S]`` (True = a real token); by default every token but
    ``cfg.pad_id`` is real (FLAVA's rule). ``token_type_ids: [B, S]`` default all 0.
    """
    _check_ids(input_ids, cfg)
    if attention_mask is None:
        attention_mask = input_ids != cfg.pad_id
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {list(input_ids.shape)}, "
            f"got {list(attention_mask.shape)}"
        )
    x = bert.embed(params, input_ids, cfg=cfg.text_embeddings, token_type_ids=token_type_ids)
    mask = nn.padding_mask(attention_mask)
    hidden = _stack(params, x, cfg, cfg.text_transformer, mask, key, train, "encode_text")
    return Encoded(nn.layer_norm(params["norm"], hidden, eps=cfg.norm_eps), hidden)


def encode_multimodal(
    params: Params,
    image_hidden: torch.Tensor,
    text_hidden: torch.Tensor,
    *,
    cfg: FLAVAConfig,
    text_mask: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    train: bool = False,
) -> torch.Tensor:
    """Fuse ``image_hidden: [B, Ni, image_width]`` and ``text_hidden: [B, St, text_width]``
    (the ``hidden`` of each encoder) into ``[B, 1 + Ni + St, mm_width]``: the mm class
    token, then the image tokens, then the text tokens.

    ``text_mask: [B, St]`` (True = real token) hides text padding from every query; ``None``
    attends to all tokens, as TorchMultimodal's FLAVA does.
    """
    for name, x, width in (
        ("image_hidden", image_hidden, cfg.image_width),
        ("text_hidden", text_hidden, cfg.text_width),
    ):
        if x is None:
            raise ValueError(f"encode_multimodal: {name} is missing; FLAVA fuses image and text")
        if x.ndim != 3 or x.shape[-1] != width:
            raise ValueError(f"{name} must be [batch, seq, {width}], got {list(x.shape)}")
    if image_hidden.shape[0] != text_hidden.shape[0]:
        raise ValueError(
            f"image_hidden {list(image_hidden.shape)} and text_hidden {list(text_hidden.shape)} "
            "have different batch sizes"
        )
    image = nn.linear(params["image_to_mm"], image_hidden)
    text = nn.linear(params["text_to_mm"], text_hidden)
    mm = params["mm"]
    cls = mm["cls"].expand(image.shape[0], 1, -1).to(image.dtype)
    x = torch.cat([cls, image, text], dim=1)
    mask = None
    if text_mask is not None:
        if text_mask.shape != text_hidden.shape[:2]:
            raise ValueError(
                f"text_mask must be [batch, seq] = {list(text_hidden.shape[:2])}, "
                f"got {list(text_mask.shape)}"
            )
        keep = torch.ones(x.shape[0], 1 + image.shape[1], dtype=torch.bool, device=x.device)
        mask = nn.padding_mask(torch.cat([keep, text_mask.bool()], dim=1))
    hidden = _stack(mm, x, cfg, cfg.mm_transformer, mask, key, train, "encode_multimodal")
    return nn.layer_norm(mm["norm"], hidden, eps=cfg.norm_eps)


def pooler(params: Params, sequence: torch.Tensor) -> torch.Tensor:
    """An encoder's pooled output ``tanh(dense(sequence[:, 0]))``: ``[B, S, D] -> [B, D]``
    (``params`` is that encoder's subtree, e.g. ``params["mm"]``)."""
    return torch.tanh(nn.linear(params["pooler"], nn.pool_cls(sequence)))


def project_image(params: Params, image_sequence: torch.Tensor) -> torch.Tensor:
    """The contrastive image embedding (not normalised): ``image_proj`` of the class token.
    ``[B, patches + 1, image_width] -> [B, embed_dim]``."""
    return nn.linear(params["image_proj"], nn.pool_cls(image_sequence))


def project_text(params: Params, text_sequence: torch.Tensor) -> torch.Tensor:
    """The contrastive text embedding (not normalised): ``text_proj`` of the first token.
    ``[B, S, text_width] -> [B, embed_dim]``."""
    return nn.linear(params["text_proj"], nn.pool_cls(text_sequence))


def embed_image(params: Params, images: torch.Tensor, *, cfg: FLAVAConfig) -> torch.Tensor:
    """Unit-norm image embeddings for retrieval: ``[B, C, H, W] -> [B, embed_dim]``."""
    seq = encode_image(params["image"], images, cfg=cfg).sequence
    return torch.nn.functional.normalize(project_image(params, seq), dim=-1)


def embed_text(
    params: Params,
    input_ids: torch.Tensor,
    *,
    cfg: FLAVAConfig,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unit-norm text embeddings for retrieval: ``[B, S] -> [B, embed_dim]``."""
    seq = encode_text(params["text"], input_ids, cfg=cfg, attention_mask=attention_mask).sequence
    return torch.nn.functional.normalize(project_text(params, seq), dim=-1)


def apply(
    params: Params,
    images: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    cfg: FLAVAConfig,
    attention_mask: torch.Tensor | None = None,
    patch_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The whole model on image-text pairs ``images: [B, C, H, W]``, ``input_ids: [B, S]``.

    Returns ``{"image": [B, Ni, Di], "text": [B, S, Dt], "multimodal": [B, 1+Ni+S, Dm],
    "image_embed": [B, E], "text_embed": [B, E]}`` (sequences after their final norms,
    embeddings not normalised). An explicit ``attention_mask`` also hides text padding in
    the multimodal encoder.

    Example::

        cfg = flava_tiny()
        out = apply(init(cfg, fmm.random.key(0)), images, tokens, cfg=cfg)
    """
    if images is None or input_ids is None:
        raise ValueError(
            "apply: FLAVA's multimodal forward needs both images and input_ids; use "
            "encode_image / encode_text for one modality"
        )
    if images.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"images {list(images.shape)} and input_ids {list(input_ids.shape)} have "
            "different batch sizes"
        )
    image = encode_image(params["image"], images, cfg=cfg, patch_mask=patch_mask)
    text = encode_text(params["text"], input_ids, cfg=cfg, attention_mask=attention_mask)
    mm = encode_multimodal(params, image.hidden, text.hidden, cfg=cfg, text_mask=attention_mask)
    return {
        "image": image.sequence,
        "text": text.sequence,
        "multimodal": mm,
        "image_embed": project_image(params, image.sequence),
        "text_embed": project_text(params, text.sequence),
    }
