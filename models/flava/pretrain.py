"""FLAVA's multi-task pretraining objective as one pure function, the batch it reads, and a
random-codebook image tokenizer for the MIM targets.

Tasks (each a 0-d loss in the returned metrics):

- ``contrastive``: symmetric InfoNCE between the unmasked image and text class-token
  embeddings (:func:`fmm.losses.contrastive_loss`; ``gather`` brings the other ranks').
- ``mlm``: masked language modelling on the text encoder's output.
- ``mim``: masked image modelling: predict each masked patch's code (``image_codes``).
- ``itm``: image-text matching on the multimodal encoder's class token, with negatives
  drawn on the device (:func:`fmm.losses.negative_pairs`).
- ``mmm_text`` / ``mmm_image``: masked text / image modelling on the multimodal encoder's
  output, scored on matching pairs only.

The objective's static choices (rates, [MASK] id, task weights) are ``cfg.pretrain``. The
MIM targets are a batch field, ``image_codes [B, grid, grid]``: one code per patch in
``[0, image_vocab_size)``, computed by the data pipeline with any image tokenizer (our
VQ-VAE, ``functools.partial(models.vqvae.encode, vq_params, cfg=vq_cfg)``; a fixed random
codebook, :func:`random_codebook_tokenizer`; or DALL-E's encoder as in the paper). So the
loss is a pure function of ``(params, batch, key)``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange

from fmm import checks, losses, random
from fmm.losses import local_gather
from fmm.losses.contrastive import Gather
from fmm.nn.transformer import BlockFn
from models.family import Field
from models.flava.config import TASKS, FLAVAConfig
from models.flava.heads import itm_head, masked_head
from models.flava.model import (
    _check_ids,
    _check_images,
    _encode_image,
    _encode_multimodal,
    _encode_text,
    _project,
    init,
)

Params = dict[str, Any]


def random_codebook_tokenizer(
    key: torch.Tensor, *, patch_size: int, codebook_size: int, in_channels: int = 3
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A fixed random image tokenizer: each ``patch_size`` patch of ``[B, C, H, W]`` pixels
    in ``[0, 1]`` gets the code of the random unit vector most aligned with it (pixels
    centred at 0.5). Returns ``tokenize(images) -> [B, H/p, W/p]`` int64, the
    ``image_codes`` of a batch.

    A cheap stand-in for a learned tokenizer: codes then depend on each patch's colour and
    local shape, which is what MIM should learn to predict.

    Example: ``tok = random_codebook_tokenizer(key(0), patch_size=4, codebook_size=64)``.
    """
    dim = in_channels * patch_size * patch_size
    codebook = F.normalize(random.normal(key, (codebook_size, dim)), dim=-1)

    def tokenize(images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != in_channels:
            raise ValueError(
                f"tokenize: images must be [batch, {in_channels}, H, W], got {list(images.shape)}"
            )
        patches = rearrange(
            images - 0.5, "b c (h p) (w q) -> b h w (c p q)", p=patch_size, q=patch_size
        )
        return (patches @ codebook.to(images).T).argmax(-1)

    return tokenize


def _needs_codes(cfg: FLAVAConfig) -> bool:
    return cfg.pretrain.weight("mim") != 0.0 or cfg.pretrain.weight("mmm_image") != 0.0


def batch_fields(cfg: FLAVAConfig) -> dict[str, Field]:
    """The batch :func:`loss` reads: ``images [batch, C, H, W]``, ``tokens [batch, seq]``
    (``seq <= max_positions``), optionally ``attention_mask [batch, seq]`` (default: every
    id but ``pad_id`` is real), and ``image_codes [batch, grid, grid]``, the MIM targets
    (optional when ``cfg.pretrain`` weighs neither ``mim`` nor ``mmm_image``)."""
    c, s, g = cfg.in_channels, cfg.image_size, cfg.grid
    return {
        "images": Field("float", ("batch", c, s, s), doc="pixels, normalised as in training"),
        "tokens": Field(
            "int", ("batch", "seq"), high=cfg.vocab_size, limits={"seq": cfg.max_positions},
            doc=f"caption ids; {cfg.pad_id} pads",
        ),
        "attention_mask": Field(
            "bool", ("batch", "seq"), optional=True, doc="True = a real token"
        ),
        "image_codes": Field(
            "int", ("batch", g, g), high=cfg.image_vocab_size, optional=not _needs_codes(cfg),
            doc="the image tokenizer's code of every patch (MIM targets)",
        ),
    }  # fmt: skip


def mim_targets(
    image_codes: torch.Tensor, patch_mask: torch.Tensor, *, cfg: FLAVAConfig
) -> torch.Tensor:
    """Labels ``[B, patches]``: ``image_codes [B, grid, grid]`` at the masked patches of
    ``patch_mask [B, patches]`` (bool), ``-1`` (ignored) elsewhere.

    Example: ``mim_targets(tokenize(images), masks.patch_mask, cfg=cfg)``.
    """
    _check_codes(image_codes, cfg, "image_codes")
    checks.check_mask("patch_mask", patch_mask, (image_codes.shape[0], cfg.num_patches))
    return _mim_targets(image_codes, patch_mask)


def _mim_targets(image_codes: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
    codes = rearrange(image_codes, "b h w -> b (h w)").long()
    return torch.where(patch_mask.bool(), codes, torch.full_like(codes, losses.IGNORE))


class Masks(NamedTuple):
    """What one step hides and pairs, all ``[B, ...]`` tensors: ``masked_tokens`` and
    ``mlm_labels [B, S]``, ``patch_mask [B, patches]`` (bool) and ``mim_labels``, and the ITM
    ``partner [B]`` (whose text each image is fused with) and ``itm_labels [B]``."""

    masked_tokens: torch.Tensor
    mlm_labels: torch.Tensor
    patch_mask: torch.Tensor
    mim_labels: torch.Tensor
    partner: torch.Tensor
    itm_labels: torch.Tensor


def draw_masks(batch: dict[str, torch.Tensor], key: torch.Tensor, *, cfg: FLAVAConfig) -> Masks:
    """Draw the text and patch masks and the ITM pairs from ``key`` (pure) and read the MIM
    targets off ``batch["image_codes"]``. ``batch`` as in :func:`loss`."""
    _check_batch(batch, cfg, None)
    _check_objective(cfg, key)
    return _draw_masks(batch, key, cfg)


def _codes_shape(cfg: FLAVAConfig, batch: int | str = "batch") -> tuple:
    return (batch, cfg.grid, cfg.grid)


def _check_codes(codes, cfg: FLAVAConfig, name: str, batch: int | str = "batch") -> None:
    checks.check_ids(
        name, codes, _codes_shape(cfg, batch), high=cfg.image_vocab_size,
        hint=f"one code per patch of the {cfg.grid}x{cfg.grid} grid",
    )  # fmt: skip


def _check_batch(batch: dict[str, torch.Tensor], cfg: FLAVAConfig, like) -> None:
    needs = ("images", "tokens", "image_codes") if _needs_codes(cfg) else ("images", "tokens")
    checks.check_keys(batch, needs)
    images, tokens = batch["images"], batch["tokens"]
    _check_images(images, cfg, like, "batch['images']")
    _check_ids(tokens, cfg, "batch['tokens']")
    checks.check_same_batch(("batch['images']", images), ("batch['tokens']", tokens))
    if "attention_mask" in batch:
        checks.check_mask(
            "batch['attention_mask']", batch["attention_mask"], tokens.shape, of="batch['tokens']"
        )
    if "image_codes" in batch:
        _check_codes(batch["image_codes"], cfg, "batch['image_codes']", images.shape[0])


def _check_objective(cfg: FLAVAConfig, key) -> None:
    if key is None:
        raise ValueError(
            "key= is missing: FLAVA's objective draws its text and patch masks and its ITM "
            "negatives from key="
        )
    p = cfg.pretrain
    for name, ids in (("mask_id", (p.mask_id,)), ("special_ids", p.special_ids)):
        if any(i >= cfg.vocab_size for i in ids):
            raise ValueError(
                f"cfg.pretrain.{name}={getattr(p, name)} lies outside the vocabulary "
                f"[0, {cfg.vocab_size}): set FLAVAConfig(pretrain=PretrainConfig(...))"
            )


def _valid(batch, cfg: FLAVAConfig) -> torch.Tensor:
    if "attention_mask" in batch:
        return batch["attention_mask"].bool()
    return batch["tokens"] != cfg.pad_id


def _draw_masks(batch, key, cfg: FLAVAConfig) -> Masks:
    images, tokens, p = batch["images"], batch["tokens"], cfg.pretrain
    b = images.shape[0]
    maskable = _valid(batch, cfg)
    for special in p.special_ids:
        maskable = maskable & (tokens != special)
    masked_tokens, mlm_labels = losses.mask_tokens(
        random.fold_in(key, "text_mask"), tokens, rate=p.text_mask_rate, mask_id=p.mask_id,
        allowed=maskable,
    )  # fmt: skip
    patch_mask = losses.random_mask(
        random.fold_in(key, "patch_mask"), (b, cfg.num_patches), p.patch_mask_rate
    ).to(images.device)
    if "image_codes" in batch:
        mim_labels = _mim_targets(batch["image_codes"], patch_mask)
    else:  # no MIM target: both image terms score nothing
        mim_labels = torch.full(patch_mask.shape, losses.IGNORE, device=images.device)
    partner, itm_labels = losses.negative_pairs(random.fold_in(key, "itm"), b, p.itm_negative_rate)
    return Masks(masked_tokens, mlm_labels, patch_mask, mim_labels, partner, itm_labels)


def task_losses(
    params: Params,
    batch: dict[str, torch.Tensor],
    masks: Masks,
    key: torch.Tensor | None = None,
    *,
    cfg: FLAVAConfig,
    train: bool = False,
    block_fn: BlockFn | None = None,
    gather: Gather = local_gather,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``({task: 0-d loss}, {"mlm_acc", "mim_acc", "itm_acc"})`` for one batch and its
    ``masks``. ``key`` is needed only for dropout in training."""
    checks.check_params(params, init=init, cfg=cfg)
    _check_batch(batch, cfg, params["image"]["patch"]["weight"])
    checks.check_type("masks", masks, Masks)
    return _task_losses(params, batch, masks, key, cfg, train, block_fn, gather)


def _task_losses(params: Params, batch, masks: Masks, key, cfg, train, block_fn, gather):
    images, tokens = batch["images"], batch["tokens"]
    k = (lambda name: random.fold_in(key, name)) if key is not None else (lambda name: None)
    valid = _valid(batch, cfg)
    heads, out = params["heads"], {}
    head = partial(masked_head, act=cfg.act, eps=cfg.head_norm_eps)
    image_of = lambda patch_mask, name: _encode_image(
        params["image"], images, cfg, patch_mask, k(name), train, block_fn
    )
    text_of = lambda ids, name: _encode_text(
        params["text"], ids, cfg, valid, None, k(name), train, block_fn
    )

    image, text = image_of(None, "image"), text_of(tokens, "text")
    image_emb = F.normalize(_project(params, "image_proj", image.sequence), dim=-1)
    text_emb = F.normalize(_project(params, "text_proj", text.sequence), dim=-1)
    out["contrastive"] = losses.contrastive_loss(
        image_emb, text_emb, heads["logit_scale"], gather=gather
    )

    image_m, text_m = image_of(masks.patch_mask, "image_m"), text_of(masks.masked_tokens, "text_m")
    mlm_logits = head(heads["mlm"], text_m.sequence)
    mim_logits = head(heads["mim"], image_m.sequence[:, 1:])
    out["mlm"] = losses.masked_cross_entropy(mlm_logits, masks.mlm_labels)
    out["mim"] = losses.masked_cross_entropy(mim_logits, masks.mim_labels)

    partner = masks.partner
    mm = _encode_multimodal(
        params, image_m.hidden, text_m.hidden[partner], cfg, valid[partner], k("mm"), train,
        block_fn,
    )  # fmt: skip
    itm_logits = itm_head(heads["itm"], mm)
    out["itm"] = losses.matching_loss(itm_logits, masks.itm_labels)

    # Masked multimodal modelling is scored on matching pairs only: a negative's text does
    # not describe its image. For a positive, partner[i] == i, so labels line up.
    positive = masks.itm_labels.bool()[:, None]
    unscored = lambda labels: torch.where(positive, labels, torch.full_like(labels, losses.IGNORE))
    n_image = image_m.hidden.shape[1]  # class token + patches
    out["mmm_text"] = losses.masked_cross_entropy(
        head(heads["mmm_text"], mm[:, 1 + n_image :]), unscored(masks.mlm_labels)
    )
    out["mmm_image"] = losses.masked_cross_entropy(
        head(heads["mmm_image"], mm[:, 2 : 1 + n_image]), unscored(masks.mim_labels)
    )
    accuracy = {
        "mlm_acc": losses.masked_accuracy(mlm_logits.detach(), masks.mlm_labels),
        "mim_acc": losses.masked_accuracy(mim_logits.detach(), masks.mim_labels),
        "itm_acc": losses.matching_accuracy(itm_logits.detach(), masks.itm_labels),
    }
    return out, accuracy


def loss(
    params: Params,
    batch: dict[str, torch.Tensor],
    *,
    cfg: FLAVAConfig,
    key: torch.Tensor | None = None,
    train: bool = True,
    block_fn: BlockFn | None = None,
    gather: Gather = local_gather,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FLAVA's pretraining objective: ``(sum of the task losses weighted by
    cfg.pretrain [], metrics)`` for one batch (:func:`batch_fields`).

    ``key`` (required) draws the text and patch masks and the ITM negatives (and dropout,
    with ``train``); ``block_fn`` runs every block of the five encoder passes;
    ``gather`` brings the other ranks' contrastive embeddings. Metrics: every task's loss
    by name, and ``mlm_acc``, ``mim_acc``, ``itm_acc``, all detached.

    Example::

        codes = random_codebook_tokenizer(k, patch_size=8, codebook_size=64)(pixels)
        batch = {"images": normalised, "tokens": ids, "image_codes": codes}
        value, metrics = loss(params, batch, cfg=flava_tiny(), key=fmm.random.key(1))
    """
    checks.check_params(params, init=init, cfg=cfg)
    _check_batch(batch, cfg, params["image"]["patch"]["weight"])
    _check_objective(cfg, key)
    masks = _draw_masks(batch, key, cfg)
    dropout = random.fold_in(key, "dropout") if train and cfg.dropout > 0 else None
    out, accuracy = _task_losses(params, batch, masks, dropout, cfg, train, block_fn, gather)
    weights, zero = cfg.pretrain, torch.zeros((), device=out["mlm"].device)
    total = sum((weights.weight(t) * out[t] for t in TASKS if weights.weight(t) != 0.0), zero)
    return total, {**{t: out[t].detach() for t in TASKS}, **accuracy}
