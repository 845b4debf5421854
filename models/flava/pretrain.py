"""FLAVA's multi-task pretraining objective as one pure function, and image tokenizers
for the MIM targets.

Tasks (each a 0-d loss in the returned metrics):

- ``contrastive``: symmetric InfoNCE between the unmasked image and text class-token
  embeddings (:func:`fmm.losses.contrastive_loss`).
- ``mlm``: masked language modelling on the text encoder's output.
- ``mim``: masked image modelling: predict the image tokenizer's code of each masked patch
  from the image encoder's output.
- ``itm``: image-text matching on the multimodal encoder's class token, with negatives
  drawn on the device (:func:`fmm.losses.negative_pairs`).
- ``mmm_text`` / ``mmm_image``: masked text / image modelling on the multimodal encoder's
  output, scored on matching pairs only.

The image tokenizer is any function ``images [B, C, H, W] -> codes [B, grid, grid]`` (or
``[B, patches]``) with one integer code per patch in ``[0, image_vocab_size)``: our VQ-VAE
(``functools.partial(models.vqvae.encode, vq_params, cfg=vq_cfg)``), a fixed random codebook
(:func:`random_codebook_tokenizer`), or DALL-E's encoder as in the paper.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange

from fmm import checks, losses, random
from models.flava.config import FLAVAConfig
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
ImageTokenizer = Callable[[torch.Tensor], torch.Tensor]

TASKS = ("contrastive", "mlm", "mim", "itm", "mmm_text", "mmm_image")


def _salt(name: str) -> int:
    # fold_in(key, _salt(name)) == fold_in(key, name), computed once at import: a Python
    # int folds in under torch.compile, while hashing a string there breaks the graph.
    raw = name.encode()
    return zlib.crc32(raw) | (zlib.crc32(b"fmm:" + raw) << 32)


_SALTS = {n: _salt(n) for n in ("text_mask", "patch_mask", "itm", "dropout")}
_SALTS.update({n: _salt(n) for n in ("image", "text", "image_m", "text_m", "mm")})


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """Static choices of the objective: masking rates, the text [MASK] id, the ids never
    masked (padding, start/end tokens), and one weight per task (0 drops its term)."""

    mask_id: int
    special_ids: tuple[int, ...] = ()
    text_mask_rate: float = 0.15
    patch_mask_rate: float = 0.4
    itm_negative_rate: float = 0.5
    weights: tuple[tuple[str, float], ...] = tuple((t, 1.0) for t in TASKS)

    def __post_init__(self) -> None:
        for name in ("text_mask_rate", "patch_mask_rate", "itm_negative_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"PretrainConfig: {name} must be in [0, 1], got {getattr(self, name)}"
                )
        unknown = sorted({t for t, _ in self.weights} - set(TASKS))
        if unknown:
            raise ValueError(f"PretrainConfig: unknown tasks {unknown} in weights; tasks: {TASKS}")

    def weight(self, task: str) -> float:
        return dict(self.weights).get(task, 0.0)


def random_codebook_tokenizer(
    key: torch.Tensor, *, patch_size: int, codebook_size: int, in_channels: int = 3
) -> ImageTokenizer:
    """A fixed random image tokenizer: each ``patch_size`` patch of ``[B, C, H, W]`` pixels
    in ``[0, 1]`` gets the code of the random unit vector most aligned with it (pixels
    centred at 0.5). Returns ``tokenize(images) -> [B, H/p, W/p]`` int64.

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


def mim_targets(
    image_tokenizer: ImageTokenizer,
    images: torch.Tensor,
    patch_mask: torch.Tensor,
    *,
    cfg: FLAVAConfig,
) -> torch.Tensor:
    """Labels ``[B, patches]``: the tokenizer's code at masked patches, ``-1`` elsewhere.

    ``images: [B, C, H, W]`` as the tokenizer wants them; ``patch_mask: [B, patches]`` bool.
    The tokenizer must give one code per patch (``[B, grid, grid]`` or ``[B, patches]``).
    """
    with torch.no_grad():
        codes = image_tokenizer(images)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"image_tokenizer must return integer codes, got dtype {codes.dtype}")
    if codes.shape[0] != images.shape[0] or codes[0].numel() != cfg.num_patches:
        raise ValueError(
            f"image_tokenizer returned codes {list(codes.shape)}; FLAVA needs one code per "
            f"patch: [batch, {cfg.grid}, {cfg.grid}] or [batch, {cfg.num_patches}] "
            f"for batch {images.shape[0]}"
        )
    codes = codes.reshape(codes.shape[0], -1).long()
    if not torch.compiler.is_compiling() and codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= cfg.image_vocab_size:
            raise ValueError(
                f"image_tokenizer codes must lie in [0, image_vocab_size={cfg.image_vocab_size}), "
                f"got values in [{lo}, {hi}]"
            )
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


def draw_masks(
    batch: dict[str, torch.Tensor],
    key: torch.Tensor,
    *,
    cfg: FLAVAConfig,
    pcfg: PretrainConfig,
    image_tokenizer: ImageTokenizer,
) -> Masks:
    """Draw the text and patch masks and the ITM pairs from ``key`` (pure), and read the
    MIM targets off ``image_tokenizer``. ``batch`` as in :func:`pretraining_loss`."""
    _check_batch(batch, cfg, None)
    _check_objective(pcfg, image_tokenizer)
    return _draw_masks(batch, key, cfg, pcfg, image_tokenizer)


def _check_batch(batch: dict[str, torch.Tensor], cfg: FLAVAConfig, like) -> None:
    checks.check_keys(batch, ("images", "tokens"))
    _check_images(batch["images"], cfg, like, "batch['images']")
    _check_ids(batch["tokens"], cfg, "batch['tokens']")
    checks.check_same_batch(
        ("batch['images']", batch["images"]), ("batch['tokens']", batch["tokens"])
    )
    if "tokenizer_images" in batch:  # any layout the tokenizer reads, one row per example
        checks.check_type("batch['tokenizer_images']", batch["tokenizer_images"], torch.Tensor)
        checks.check_same_batch(
            ("batch['images']", batch["images"]),
            ("batch['tokenizer_images']", batch["tokenizer_images"]),
        )


def _check_objective(pcfg: PretrainConfig, image_tokenizer: ImageTokenizer) -> None:
    checks.check_type("pcfg", pcfg, PretrainConfig)
    if not callable(image_tokenizer):
        raise TypeError(
            "image_tokenizer must be a function images -> codes, got "
            f"{type(image_tokenizer).__name__}"
        )


def _draw_masks(batch, key, cfg: FLAVAConfig, pcfg: PretrainConfig, image_tokenizer) -> Masks:
    images, tokens = batch["images"], batch["tokens"]
    b = images.shape[0]
    k = lambda name: random.fold_in(key, _SALTS[name])
    maskable = tokens != cfg.pad_id
    for special in pcfg.special_ids:
        maskable = maskable & (tokens != special)
    masked_tokens, mlm_labels = losses.mask_tokens(
        k("text_mask"), tokens, rate=pcfg.text_mask_rate, mask_id=pcfg.mask_id, allowed=maskable
    )
    patch_mask = losses.random_mask(k("patch_mask"), (b, cfg.num_patches), pcfg.patch_mask_rate)
    patch_mask = patch_mask.to(images.device)
    mim_labels = mim_targets(
        image_tokenizer, batch.get("tokenizer_images", images), patch_mask, cfg=cfg
    )
    partner, itm_labels = losses.negative_pairs(k("itm"), b, pcfg.itm_negative_rate)
    return Masks(masked_tokens, mlm_labels, patch_mask, mim_labels, partner, itm_labels)


def task_losses(
    params: Params,
    batch: dict[str, torch.Tensor],
    masks: Masks,
    key: torch.Tensor | None = None,
    *,
    cfg: FLAVAConfig,
    train: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``({task: 0-d loss}, {"mlm_acc", "mim_acc", "itm_acc"})`` for one batch and its
    ``masks``. ``key`` is needed only for dropout in training."""
    checks.check_params(params, init=init, cfg=cfg)
    _check_batch(batch, cfg, params["image"]["patch"]["weight"])
    checks.check_type("masks", masks, Masks)
    return _task_losses(params, batch, masks, key, cfg, train)


def _task_losses(params: Params, batch, masks: Masks, key, cfg: FLAVAConfig, train: bool):
    images, tokens = batch["images"], batch["tokens"]
    k = (lambda name: random.fold_in(key, _SALTS[name])) if key is not None else (lambda n: None)
    valid = tokens != cfg.pad_id
    heads, out = params["heads"], {}
    head = partial(masked_head, act=cfg.act, eps=cfg.head_norm_eps)

    image = _encode_image(params["image"], images, cfg, None, k("image"), train)
    text = _encode_text(params["text"], tokens, cfg, valid, None, k("text"), train)
    image_emb = F.normalize(_project(params, "image_proj", image.sequence), dim=-1)
    text_emb = F.normalize(_project(params, "text_proj", text.sequence), dim=-1)
    out["contrastive"] = losses.contrastive_loss(image_emb, text_emb, heads["logit_scale"])

    image_m = _encode_image(params["image"], images, cfg, masks.patch_mask, k("image_m"), train)
    text_m = _encode_text(params["text"], masks.masked_tokens, cfg, valid, None, k("text_m"), train)
    mlm_logits = head(heads["mlm"], text_m.sequence)
    mim_logits = head(heads["mim"], image_m.sequence[:, 1:])
    out["mlm"] = losses.masked_cross_entropy(mlm_logits, masks.mlm_labels)
    out["mim"] = losses.masked_cross_entropy(mim_logits, masks.mim_labels)

    partner = masks.partner
    mm = _encode_multimodal(
        params, image_m.hidden, text_m.hidden[partner], cfg, valid[partner], k("mm"), train
    )
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


def pretraining_loss(
    params: Params,
    batch: dict[str, torch.Tensor],
    key: torch.Tensor,
    *,
    cfg: FLAVAConfig,
    pcfg: PretrainConfig,
    image_tokenizer: ImageTokenizer,
    train: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(weighted sum of the task losses [], metrics)`` for one batch.

    ``batch``: ``images [B, C, H, W]`` (model input), ``tokens [B, S]`` int64, and
    optionally ``tokenizer_images`` (what ``image_tokenizer`` reads; default ``images``).
    ``key`` draws the text and patch masks and the ITM negatives (and dropout). Metrics:
    every task's loss by name, and ``mlm_acc``, ``mim_acc``, ``itm_acc``.

    Example::

        loss_fn = partial(pretraining_loss, cfg=cfg, pcfg=pcfg, image_tokenizer=tok)
        step = train.step.make_train_step(loss_fn, optimizer)
    """
    checks.check_params(params, init=init, cfg=cfg)
    _check_batch(batch, cfg, params["image"]["patch"]["weight"])
    _check_objective(pcfg, image_tokenizer)
    masks = _draw_masks(batch, key, cfg, pcfg, image_tokenizer)
    dropout = random.fold_in(key, _SALTS["dropout"]) if train and cfg.dropout > 0 else None
    out, accuracy = _task_losses(params, batch, masks, dropout, cfg, train)
    total = sum(pcfg.weight(t) * out[t] for t in TASKS if pcfg.weight(t) != 0.0)
    return total, {**{t: out[t].detach() for t in TASKS}, **accuracy}
