"""FLAVA's encoders as pure functions: image (the shared ViT tower), text (the shared text
tower: BERT's embeddings under pre-norm blocks) and multimodal (self-attention over both),
plus the contrastive embeddings. Every stack runs through ``block_fn`` (the adapter's seam).

Param tree (PyTorch layouts)::

    image.patch             {weight [D, C, p, p], bias}: patch projection (a strided conv)
    image.cls, image.mask_token   [D]: the class token and the learned [MASK] patch
    image.pos               [patches + 1, D]: learned positions, class token first
    image.transformer / text.transformer / mm.transformer   pre-norm blocks (fmm.nn)
    image.norm, text.norm, mm.norm   the final LayerNorm of each encoder
    image.pooler, text.pooler, mm.pooler   tanh dense on the first token
    text.token / pos / token_type / norm_embed   BERT-style embeddings (fmm.nn.towers.text)
    mm.cls                  [D_mm]: the multimodal class token
    image_to_mm, text_to_mm linear maps of each encoder's hidden states into the mm width
    image_proj, text_proj   linear maps of the class tokens to the contrastive space
    heads                   pretraining heads and logit_scale (models.flava.heads)

As in FLAVA, the multimodal encoder reads each unimodal encoder's last block output
*before* its final LayerNorm (``Encoded.hidden``), and its sequence is
``[mm cls, image cls, patches..., text tokens...]``.
"""

from __future__ import annotations

from typing import Any

import torch

from fmm import checks, nn, random
from fmm.losses import logit_scale_value
from fmm.nn import towers
from fmm.nn.towers import Encoded
from fmm.nn.transformer import BlockFn
from models.flava.config import _INIT_STD, FLAVAConfig
from models.flava.heads import init_heads

Params = dict[str, Any]


def _linear(d_in: int, d_out: int, key: torch.Tensor, dtype) -> Params:
    return nn.init_linear(d_in, d_out, key, std=_INIT_STD, dtype=dtype)


def _with_pooler(tower: Params, width: int, key: torch.Tensor, dtype) -> Params:
    return {**tower, "pooler": _linear(width, width, random.fold_in(key, "pooler"), dtype)}


def init_model(
    cfg: FLAVAConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> Params:
    """The encoders and projections (what TorchMultimodal's ``flava_model`` holds), without
    the pretraining heads. Pure in ``(cfg, key)``; a ``meta`` key gives shapes only."""
    checks.check_type("cfg", cfg, FLAVAConfig)
    k = lambda name: random.fold_in(key, name)
    k_image, k_text = k("image"), k("text")
    return {
        "image": _with_pooler(
            towers.init_vit(cfg.image_tower, k_image, dtype=dtype), cfg.image_width, k_image, dtype
        ),
        "text": _with_pooler(
            towers.init_text(cfg.text_tower, k_text, dtype=dtype), cfg.text_width, k_text, dtype
        ),
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


# The parts of the tree the encoders and projections read (init_model's; init adds heads).
MODEL_PARTS = ("image", "text", "mm", "image_to_mm", "text_to_mm", "image_proj", "text_proj")


def _check_images(images: torch.Tensor, cfg: FLAVAConfig, like, name: str = "images") -> None:
    want = ("batch", cfg.in_channels, cfg.image_size, cfg.image_size)
    checks.check_float(name, images, want, like=like)


def _check_ids(input_ids: torch.Tensor, cfg: FLAVAConfig, name: str = "input_ids") -> None:
    checks.check_ids(
        name, input_ids, ("batch", range(1, cfg.max_positions + 1)), high=cfg.vocab_size,
        hint=f"max_positions={cfg.max_positions}",
    )  # fmt: skip


def _check_patch_mask(patch_mask, images, cfg: FLAVAConfig, name: str = "patch_mask") -> None:
    if not cfg.image_masking:
        raise ValueError(f"{name} is given but cfg.image_masking is False")
    checks.check_mask(name, patch_mask, (images.shape[0], cfg.num_patches))


def encode_image(
    params: Params,
    images: torch.Tensor,
    *,
    cfg: FLAVAConfig,
    patch_mask: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    train: bool = False,
    block_fn: BlockFn | None = None,
) -> Encoded:
    """Encode ``images: [B, C, H, W]`` with the image params (``params["image"]``) into
    :class:`fmm.nn.towers.Encoded` ``[B, patches + 1, image_width]`` (class token first).

    ``patch_mask: [B, patches]`` bool, True = replace that patch by the [MASK] token (MIM).
    ``key`` is needed only for dropout in training.

    Example: ``out = encode_image(params["image"], images, cfg=cfg); out.sequence[:, 0]``.
    """
    checks.check_params(params, init=init, cfg=cfg, at="image")
    _check_images(images, cfg, params["patch"]["weight"])
    if patch_mask is not None:
        _check_patch_mask(patch_mask, images, cfg)
    return _encode_image(params, images, cfg, patch_mask, key, train, block_fn)


def _encode_image(params: Params, images, cfg: FLAVAConfig, patch_mask, key, train, block_fn):
    return towers.vit(
        params, images, cfg=cfg.image_tower, patch_mask=patch_mask, key=key, train=train,
        block_fn=block_fn,
    )  # fmt: skip


def encode_text(
    params: Params,
    input_ids: torch.Tensor,
    *,
    cfg: FLAVAConfig,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    train: bool = False,
    block_fn: BlockFn | None = None,
) -> Encoded:
    """Encode ``input_ids: [B, S]`` with the text params (``params["text"]``) into
    :class:`fmm.nn.towers.Encoded` ``[B, S, text_width]``.

    ``attention_mask: [B, S]`` (True = a real token); by default every token but
    ``cfg.pad_id`` is real (FLAVA's rule). ``token_type_ids: [B, S]`` default all 0.
    """
    checks.check_params(params, init=init, cfg=cfg, at="text")
    _check_ids(input_ids, cfg)
    if attention_mask is not None:
        checks.check_mask("attention_mask", attention_mask, input_ids.shape, of="input_ids")
    if token_type_ids is not None:
        checks.check_ids(
            "token_type_ids", token_type_ids, input_ids.shape, high=cfg.type_vocab_size,
            of="input_ids",
        )  # fmt: skip
    return _encode_text(
        params, input_ids, cfg, attention_mask, token_type_ids, key, train, block_fn
    )


def _encode_text(
    params: Params, input_ids, cfg: FLAVAConfig, attention_mask, token_type_ids, key, train,
    block_fn,
) -> Encoded:  # fmt: skip
    valid = input_ids != cfg.pad_id if attention_mask is None else attention_mask
    return towers.text(
        params, input_ids, cfg=cfg.text_tower, valid=valid, token_type_ids=token_type_ids,
        key=key, train=train, block_fn=block_fn,
    )  # fmt: skip


def encode_multimodal(
    params: Params,
    image_hidden: torch.Tensor,
    text_hidden: torch.Tensor,
    *,
    cfg: FLAVAConfig,
    text_mask: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    train: bool = False,
    block_fn: BlockFn | None = None,
) -> torch.Tensor:
    """Fuse ``image_hidden: [B, Ni, image_width]`` and ``text_hidden: [B, St, text_width]``
    (the ``hidden`` of each encoder) into ``[B, 1 + Ni + St, mm_width]``: the mm class
    token, then the image tokens, then the text tokens.

    ``text_mask: [B, St]`` (True = real token) hides text padding from every query; ``None``
    attends to all tokens, as TorchMultimodal's FLAVA does.
    """
    checks.check_params(params, init=init, cfg=cfg, only=("image_to_mm", "text_to_mm", "mm"))
    for name, x, width, like in (
        ("image_hidden", image_hidden, cfg.image_width, params["image_to_mm"]["weight"]),
        ("text_hidden", text_hidden, cfg.text_width, params["text_to_mm"]["weight"]),
    ):
        if x is None:
            raise ValueError(f"{name} is missing: FLAVA's multimodal encoder fuses image and text")
        checks.check_float(name, x, ("batch", "seq", width), like=like)
    checks.check_same_batch(("image_hidden", image_hidden), ("text_hidden", text_hidden))
    if text_mask is not None:
        checks.check_mask("text_mask", text_mask, text_hidden.shape[:2])
    return _encode_multimodal(
        params, image_hidden, text_hidden, cfg, text_mask, key, train, block_fn
    )


def _encode_multimodal(
    params: Params, image_hidden, text_hidden, cfg: FLAVAConfig, text_mask, key, train, block_fn
) -> torch.Tensor:
    image = nn.linear(params["image_to_mm"], image_hidden)
    text = nn.linear(params["text_to_mm"], text_hidden)
    mm = params["mm"]
    cls = mm["cls"].expand(image.shape[0], 1, -1).to(image.dtype)
    x = torch.cat([cls, image, text], dim=1)
    mask = None
    if text_mask is not None:
        keep = torch.ones(x.shape[0], 1 + image.shape[1], dtype=torch.bool, device=x.device)
        mask = nn.padding_mask(torch.cat([keep, text_mask.bool()], dim=1))
    # The same key names as the towers' stacks: embedding dropout, then the blocks.
    if train and cfg.dropout > 0.0:
        if key is None:
            raise ValueError("key= is missing: the multimodal encoder's dropout needs key=")
        x = random.dropout(random.fold_in(key, "embed"), x, cfg.dropout)
    k = random.fold_in(key, "transformer") if key is not None else None
    hidden = nn.transformer(
        mm["transformer"], x, cfg=cfg.mm_transformer, mask=mask, key=k, train=train,
        block_fn=block_fn,
    )  # fmt: skip
    return nn.layer_norm(mm["norm"], hidden, eps=cfg.norm_eps)


def pooler(params: Params, sequence: torch.Tensor) -> torch.Tensor:
    """An encoder's pooled output ``tanh(dense(sequence[:, 0]))``: ``[B, S, D] -> [B, D]``
    (``params`` is that encoder's subtree, e.g. ``params["mm"]``)."""
    checks.check_keys(params, ("pooler",), name="params")
    weight = params["pooler"]["weight"]
    checks.check_float("sequence", sequence, ("batch", "seq", weight.shape[1]), like=weight)
    return torch.tanh(nn.linear(params["pooler"], nn.pool_cls(sequence)))


def _project(params: Params, part: str, sequence: torch.Tensor) -> torch.Tensor:
    return nn.linear(params[part], nn.pool_cls(sequence))


def project_image(params: Params, image_sequence: torch.Tensor) -> torch.Tensor:
    """The contrastive image embedding (not normalised): ``image_proj`` of the class token.
    ``[B, patches + 1, image_width] -> [B, embed_dim]``."""
    checks.check_keys(params, ("image_proj",), name="params")
    weight = params["image_proj"]["weight"]
    dims = ("batch", "seq", weight.shape[1])
    checks.check_float("image_sequence", image_sequence, dims, like=weight)
    return _project(params, "image_proj", image_sequence)


def project_text(params: Params, text_sequence: torch.Tensor) -> torch.Tensor:
    """The contrastive text embedding (not normalised): ``text_proj`` of the first token.
    ``[B, S, text_width] -> [B, embed_dim]``."""
    checks.check_keys(params, ("text_proj",), name="params")
    weight = params["text_proj"]["weight"]
    dims = ("batch", "seq", weight.shape[1])
    checks.check_float("text_sequence", text_sequence, dims, like=weight)
    return _project(params, "text_proj", text_sequence)


def embed_image(params: Params, images: torch.Tensor, *, cfg: FLAVAConfig) -> torch.Tensor:
    """Unit-norm image embeddings for retrieval: ``[B, C, H, W] -> [B, embed_dim]``."""
    checks.check_params(params, init=init, cfg=cfg, only=("image", "image_proj"))
    _check_images(images, cfg, params["image"]["patch"]["weight"])
    seq = _encode_image(params["image"], images, cfg, None, None, False, None).sequence
    return torch.nn.functional.normalize(_project(params, "image_proj", seq), dim=-1)


def embed_text(
    params: Params,
    input_ids: torch.Tensor,
    *,
    cfg: FLAVAConfig,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unit-norm text embeddings for retrieval: ``[B, S] -> [B, embed_dim]``."""
    checks.check_params(params, init=init, cfg=cfg, only=("text", "text_proj"))
    _check_ids(input_ids, cfg)
    if attention_mask is not None:
        checks.check_mask("attention_mask", attention_mask, input_ids.shape, of="input_ids")
    seq = _encode_text(
        params["text"], input_ids, cfg, attention_mask, None, None, False, None
    ).sequence
    return torch.nn.functional.normalize(_project(params, "text_proj", seq), dim=-1)


def logit_scale(params: Params) -> torch.Tensor:
    """The zero-shot scale ``[]``: logits are ``scale * embed_image @ embed_text.T`` (the
    learned ``heads.logit_scale``, clamped as the contrastive loss clamps it)."""
    checks.check_keys(params, ("heads",), name="params")
    return logit_scale_value(params["heads"]["logit_scale"])


def image_shape(cfg: FLAVAConfig) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images the model reads."""
    return (cfg.in_channels, cfg.image_size, cfg.image_size)


def apply(
    params: Params,
    images: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    cfg: FLAVAConfig,
    attention_mask: torch.Tensor | None = None,
    patch_mask: torch.Tensor | None = None,
    block_fn: BlockFn | None = None,
) -> dict[str, torch.Tensor]:
    """The whole model on image-text pairs ``images: [B, C, H, W]``, ``input_ids: [B, S]``.

    Returns ``{"image": [B, Ni, Di], "text": [B, S, Dt], "multimodal": [B, 1+Ni+S, Dm],
    "image_embed": [B, E], "text_embed": [B, E]}`` (sequences after their final norms,
    embeddings not normalised). An explicit ``attention_mask`` also hides text padding in
    the multimodal encoder. ``params``: :func:`init` or :func:`init_model`'s tree.

    Example::

        cfg = flava_tiny()
        out = apply(init(cfg, fmm.random.key(0)), images, tokens, cfg=cfg)
    """
    if images is None or input_ids is None:
        missing = "images" if images is None else "input_ids"
        raise ValueError(
            f"{missing} is missing: FLAVA's multimodal forward needs both images and "
            "input_ids; use encode_image / encode_text for one modality"
        )
    checks.check_params(params, init=init, cfg=cfg, only=MODEL_PARTS)
    _check_images(images, cfg, params["image"]["patch"]["weight"])
    _check_ids(input_ids, cfg)
    checks.check_same_batch(("images", images), ("input_ids", input_ids))
    if attention_mask is not None:
        checks.check_mask("attention_mask", attention_mask, input_ids.shape, of="input_ids")
    if patch_mask is not None:
        _check_patch_mask(patch_mask, images, cfg)
    image = _encode_image(params["image"], images, cfg, patch_mask, None, False, block_fn)
    text = _encode_text(params["text"], input_ids, cfg, attention_mask, None, None, False, block_fn)
    mm = _encode_multimodal(
        params, image.hidden, text.hidden, cfg, attention_mask, None, False, block_fn
    )
    return {
        "image": image.sequence,
        "text": text.sequence,
        "multimodal": mm,
        "image_embed": _project(params, "image_proj", image.sequence),
        "text_embed": _project(params, "text_proj", text.sequence),
    }
