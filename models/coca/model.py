"""CoCa as pure functions: ``init``, ``encode_image``, ``encode_text``, ``caption_logits``,
``apply``, ``loss``.

Param tree (PyTorch layouts, so converters are key maps)::

    image                       the shared ViT (fmm.nn.towers): patch, [cls], pos, [norm_pre],
                                transformer.blocks.N (no final norm)
    pool.caption                attentional pooler (fmm.nn.pool) + norm (its ln_post):
                                caption_queries queries ("parallel": 1 + caption_queries,
                                the contrastive one first) over the image tokens
    pool.contrastive            ("cascade" only) one query over pool.caption's outputs
    image_proj.weight           [embed, text_width]
    text.token.weight           [vocab, text_width]
    text.pos                    [context_length, text_width]
    text.cls                    [text_width]  class token, appended after the caption
    text.transformer.blocks.N   causal unimodal blocks
    text.norm                   layer norm of the class token (ln_final)
    text.proj.weight            [embed, text_width]
    decoder.transformer.blocks.N  causal multimodal blocks (cfg.decoder_blocks)
    decoder.norm                final layer norm
    decoder.head.weight         [vocab, text_width]
    logit_scale                 []   log inverse temperature

The caption's tokens run through the unimodal blocks and then the multimodal ones: one
causal stack (:attr:`CoCaConfig.causal_blocks`), which is what cached decoding runs
(:mod:`models.coca.generate`). The class token only feeds the contrastive embedding.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from fmm import checks, nn, random
from fmm.losses import contrastive_loss, local_gather, logit_scale_value
from fmm.losses.contrastive import Gather
from fmm.nn import towers
from fmm.nn.transformer import BlockFn, init_block
from models.coca.config import CoCaConfig
from models.family import Field

Params = dict[str, Any]


def init(cfg: CoCaConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params for ``cfg``, a pure function of ``(cfg, key)`` (leaf keys folded from
    their paths; a ``meta`` key gives shapes only).

    Example: ``params = init(coca_tiny(), fmm.random.key(0))``.
    """
    checks.check_type("cfg", cfg, CoCaConfig)
    k = lambda name: random.fold_in(key, name)
    d, dev = cfg.text_width, key.device

    def pooler(pool_cfg, name):
        p = nn.init_attention_pool(pool_cfg, random.fold_in(k("pool"), name), dtype=dtype)
        return {**p, "norm": nn.init_layer_norm(d, device=dev, dtype=dtype)}

    pool = {"caption": pooler(cfg.pool, "caption")}
    if cfg.pooler == "cascade":
        pool["contrastive"] = pooler(cfg.contrastive_pool, "contrastive")
    text = towers.init_text(cfg.text_tower, k("text"), dtype=dtype)
    kt = lambda name: random.fold_in(k("text"), name)
    text["cls"] = random.normal(kt("cls"), (d,), dtype=dtype) * 0.01
    text["norm"] = nn.init_layer_norm(d, device=dev, dtype=dtype)
    text["proj"] = nn.init_linear(d, cfg.embed_dim, kt("proj"), bias=False, dtype=dtype)
    kd = lambda name: random.fold_in(k("decoder"), name)
    blocks = [
        init_block(c, random.fold_in(kd("transformer"), i), dtype=dtype)
        for i, c in enumerate(cfg.decoder_blocks)
    ]
    return {
        "image": towers.init_vit(cfg.image_tower, k("image"), dtype=dtype),
        "pool": pool,
        "image_proj": nn.init_linear(d, cfg.embed_dim, k("image_proj"), bias=False, dtype=dtype),
        "text": text,
        "decoder": {
            "transformer": {"blocks": blocks},
            "norm": nn.init_layer_norm(d, device=dev, dtype=dtype),
            "head": nn.init_linear(d, cfg.vocab_size, kd("head"), bias=False, dtype=dtype),
        },
        "logit_scale": torch.full((), cfg.init_logit_scale, dtype=dtype, device=dev),
    }


class Output(NamedTuple):
    """:func:`apply`'s outputs: unit ``image_embeds``/``text_embeds`` ``[B, embed]`` and the
    captioning ``logits [B, S, vocab]`` (position ``i`` predicts token ``i + 1``)."""

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    logits: torch.Tensor


# --------------------------------------------------------------------------- checks


def _check_images(params: Params, images: torch.Tensor, cfg: CoCaConfig, name: str) -> None:
    like = params["image"]["patch"]["weight"]
    checks.check_float(name, images, ("batch", *cfg.image_shape), like=like)


def _check_tokens(tokens: torch.Tensor, cfg: CoCaConfig, name: str) -> None:
    # The class token takes the last position, so a caption has one fewer.
    checks.check_ids(
        name, tokens, ("batch", range(1, cfg.context_length)), high=cfg.vocab_size,
        hint=f"at most context_length - 1 = {cfg.context_length - 1} tokens",
    )  # fmt: skip


# --------------------------------------------------------------------------- parts


def _pool(params: Params, x: torch.Tensor, pool_cfg, eps: float) -> torch.Tensor:
    return nn.layer_norm(params["norm"], nn.attention_pool(params, x, cfg=pool_cfg), eps=eps)


def _image(params: Params, images, cfg: CoCaConfig, block_fn):
    """``(contrastive embedding [B, embed] before its norm, captioning queries [B, N, width])``."""
    x = towers.vit(params["image"], images, cfg=cfg.image_tower, block_fn=block_fn).sequence
    pooled = _pool(params["pool"]["caption"], x, cfg.pool, cfg.norm_eps)
    if cfg.pooler == "cascade":
        queries = pooled
        pooled = _pool(params["pool"]["contrastive"], queries, cfg.contrastive_pool, cfg.norm_eps)
        pooled = pooled[:, 0]
    else:
        pooled, queries = pooled[:, 0], pooled[:, 1:]
    return nn.linear(params["image_proj"], pooled), queries


def _cls_mask(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``[B, 1, S+1, S+1]``: every query row sees every key (the causal mask is added by the
    stack) except the class token's row, where key ``j`` is hidden when token ``j - 1`` is
    padding. That one-slot shift is both references' (TorchMultimodal's ``build_mask``,
    open_clip's legacy ``correct_cls_mask=False``, which CoCa checkpoints were trained with):
    the class token always sees token 0 and, in a padded row, sees the first padding token but
    not itself."""
    b, s = tokens.shape
    real = tokens != pad_id
    cls_row = torch.cat([torch.ones_like(real[:, :1]), real], dim=1)  # [B, S+1]
    rows = torch.ones(b, s, s + 1, dtype=torch.bool, device=tokens.device)
    return torch.cat([rows, cls_row[:, None]], dim=1)[:, None]


def _text(params: Params, tokens, cfg: CoCaConfig, block_fn):
    """``(contrastive embedding [B, embed] before its norm, token states [B, S, width])``."""
    p = params["text"]
    x = nn.embed(p["token"], tokens)
    x = torch.cat([x, p["cls"].to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)
    x = x + p["pos"][: x.shape[1]]
    hidden = towers.encode_embeddings(
        p, x, cfg=cfg.text_tower, mask=_cls_mask(tokens, cfg.pad_id), causal=True,
        block_fn=block_fn,
    ).hidden  # fmt: skip
    cls = nn.layer_norm(p["norm"], hidden[:, -1], eps=cfg.norm_eps)
    return nn.linear(p["proj"], cls), hidden[:, :-1]


def _decode(params: Params, states, queries, cfg: CoCaConfig, block_fn) -> torch.Tensor:
    """The multimodal decoder: ``states [B, S, width]`` cross-attending ``queries`` ->
    logits ``[B, S, vocab]``."""
    p = params["decoder"]
    h = nn.transformer(
        p["transformer"], states, cfg=cfg.decoder_blocks, causal=True, context=queries,
        block_fn=block_fn,
    )  # fmt: skip
    return head(params, h, cfg=cfg)


def head(params: Params, h: torch.Tensor, *, cfg: CoCaConfig) -> torch.Tensor:
    """The output head: final norm and vocabulary projection, ``[B, S, width] -> [B, S, vocab]``."""
    p = params["decoder"]
    return nn.linear(p["head"], nn.layer_norm(p["norm"], h, eps=cfg.norm_eps))


def _apply(params: Params, images, tokens, cfg: CoCaConfig, block_fn) -> Output:
    image_embed, queries = _image(params, images, cfg, block_fn)
    text_embed, states = _text(params, tokens, cfg, block_fn)
    return Output(
        F.normalize(image_embed, dim=-1),
        F.normalize(text_embed, dim=-1),
        _decode(params, states, queries, cfg, block_fn),
    )


# --------------------------------------------------------------------------- public


def image_queries(
    params: Params, images: torch.Tensor, *, cfg: CoCaConfig, block_fn: BlockFn | None = None
) -> torch.Tensor:
    """The captioning queries the multimodal decoder cross-attends:
    ``[B, 3, H, W] -> [B, caption_queries, text_width]``."""
    checks.check_params(params, init=init, cfg=cfg, only=("image", "pool", "image_proj"))
    _check_images(params, images, cfg, "images")
    return _image(params, images, cfg, block_fn)[1]


def encode_image(
    params: Params,
    images: torch.Tensor,
    *,
    cfg: CoCaConfig,
    normalize: bool = True,
    block_fn: BlockFn | None = None,
) -> torch.Tensor:
    """Contrastive image embeddings ``[B, 3, H, W] -> [B, embed]`` (unit norm unless
    ``normalize=False``).

    Example: ``encode_image(params, torch.rand(2, 3, 32, 32), cfg=coca_tiny())``.
    """
    checks.check_params(params, init=init, cfg=cfg, only=("image", "pool", "image_proj"))
    _check_images(params, images, cfg, "images")
    x = _image(params, images, cfg, block_fn)[0]
    return F.normalize(x, dim=-1) if normalize else x


def encode_text(
    params: Params,
    tokens: torch.Tensor,
    *,
    cfg: CoCaConfig,
    normalize: bool = True,
    block_fn: BlockFn | None = None,
) -> torch.Tensor:
    """Contrastive text embeddings ``[B, S] (int64, S < context_length) -> [B, embed]``, read
    at the class token appended after the caption (unit norm unless ``normalize=False``)."""
    checks.check_params(params, init=init, cfg=cfg, only=("text",))
    _check_tokens(tokens, cfg, "tokens")
    x = _text(params, tokens, cfg, block_fn)[0]
    return F.normalize(x, dim=-1) if normalize else x


def encode_batch_text(
    params: Params, tokens: torch.Tensor, *, cfg: CoCaConfig, block_fn: BlockFn | None = None
) -> torch.Tensor:
    """Unit text embeddings of a batch's ``tokens [B, S + 1]`` (``S + 1 <= context_length``)
    as :func:`loss` reads them: the caption without its last token, which only the
    captioning term predicts (TorchMultimodal's text decoder drops it the same way). What
    the serving and zero-shot hooks embed, so ranking matches training."""
    checks.check_ids(
        "tokens", tokens, ("batch", range(2, cfg.context_length + 1)), high=cfg.vocab_size,
        hint=f"2 to context_length = {cfg.context_length} tokens",
    )  # fmt: skip
    return encode_text(params, tokens[:, :-1], cfg=cfg, block_fn=block_fn)


def _check_pairs(params: Params, images, tokens, cfg: CoCaConfig, names: tuple[str, str]):
    checks.check_params(params, init=init, cfg=cfg)
    _check_images(params, images, cfg, names[0])
    _check_tokens(tokens, cfg, names[1])
    checks.check_same_batch((names[0], images), (names[1], tokens))


def apply(
    params: Params,
    images: torch.Tensor,
    tokens: torch.Tensor,
    *,
    cfg: CoCaConfig,
    block_fn: BlockFn | None = None,
) -> Output:
    """The whole model on ``images [B, 3, H, W]`` and captions ``tokens [B, S]``
    (``S < context_length``): :class:`Output` (both unit embeddings and the captioning
    logits ``[B, S, vocab]``, teacher-forced).

    Example: ``out = apply(params, images, tokens, cfg=cfg); out.logits.argmax(-1)``.
    """
    _check_pairs(params, images, tokens, cfg, ("images", "tokens"))
    return _apply(params, images, tokens, cfg, block_fn)


def caption_logits(
    params: Params,
    images: torch.Tensor,
    tokens: torch.Tensor,
    *,
    cfg: CoCaConfig,
    block_fn: BlockFn | None = None,
) -> torch.Tensor:
    """Teacher-forced captioning logits ``[B, S, vocab]`` of ``tokens [B, S]`` given
    ``images``: the full causal forward that cached decoding must equal."""
    return apply(params, images, tokens, cfg=cfg, block_fn=block_fn).logits


def loss(
    params: Params,
    batch: dict[str, torch.Tensor],
    *,
    cfg: CoCaConfig,
    key: torch.Tensor | None = None,
    train: bool = True,
    block_fn: BlockFn | None = None,
    gather: Gather = local_gather,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``contrastive_weight * contrastive + caption_weight * captioning`` on ``batch =
    {"images": [B, 3, H, W], "tokens": [B, S + 1]}``: the decoders read ``tokens[:, :-1]``
    (the class token after them) and predict ``tokens[:, 1:]``, padding (``pad_id``) ignored,
    as TorchMultimodal's ``CoCaForPretraining`` over captions of ``context_length`` tokens.

    Returns ``(loss [], {"contrastive", "caption", "logit_scale"})``, detached. ``gather``
    brings the other ranks' embeddings (``fmm.losses.contrastive``'s seam); CoCa has no
    dropout, so ``key`` and ``train`` change nothing.
    """
    del key, train  # no stochastic layer
    checks.check_keys(batch, ("images", "tokens"))
    images, tokens = batch["images"], batch["tokens"]
    checks.check_ids(
        "batch['tokens']", tokens, ("batch", range(2, cfg.context_length + 1)),
        high=cfg.vocab_size, hint=f"2 to context_length = {cfg.context_length} tokens",
    )  # fmt: skip
    _check_pairs(params, images, tokens[:, :-1], cfg, ("batch['images']", "batch['tokens']"))
    out = _apply(params, images, tokens[:, :-1], cfg, block_fn)
    contrastive = contrastive_loss(
        out.image_embeds, out.text_embeds, params["logit_scale"], gather=gather
    )
    caption = F.cross_entropy(
        out.logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), ignore_index=cfg.pad_id
    )
    value = cfg.contrastive_weight * contrastive + cfg.caption_weight * caption
    return value, {
        "contrastive": contrastive.detach(),
        "caption": caption.detach(),
        "logit_scale": logit_scale_value(params["logit_scale"]).detach(),
    }


def logit_scale(params: Params) -> torch.Tensor:
    """The zero-shot scale ``[]``: logits are ``logit_scale(params) * image @ text.T``."""
    checks.check_keys(params, ("logit_scale",), name="params")
    return logit_scale_value(params["logit_scale"])


def image_shape(cfg: CoCaConfig) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the images the image tower takes."""
    return cfg.image_shape


def batch_fields(cfg: CoCaConfig) -> dict[str, Field]:
    """The batch :func:`loss` reads: ``images [batch, 3, H, W]`` float and ``tokens [batch,
    seq]`` int64 caption ids (``2 <= seq <= context_length``, ``pad_id`` after the end)."""
    return {
        "images": Field("float", ("batch", *cfg.image_shape), doc="pixels, normalised"),
        "tokens": Field(
            "int",
            ("batch", "seq"),
            high=cfg.vocab_size,
            limits={"seq": cfg.context_length},
            doc="caption ids, padded with pad_id",
        ),
    }
