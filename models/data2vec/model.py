"""data2vec as pure functions over an explicit param tree: one objective for images, text
and audio (Baevski et al., 2022).

Params (``init``), the shared tower's layout plus a regression head::

    image   patch, cls, pos [1 + grid², width], mask_token [width], transformer, norm
            (fmm.nn.towers.init_vit)
    audio   the same names over a (frames, mels) patch grid: pos [1 + patches, width]
    text    token, pos, norm_embed (post-norm) or norm (pre-norm), transformer
            (fmm.nn.towers.init_text; a masked token is ``cfg.mask_id``'s row)
    head    {weight [width, width], bias}   the student's linear regression head

The teacher is the same tree less ``head``, an EMA of the student held as train state
(:mod:`models.data2vec.state`).

Example::

    cfg = data2vec_image_tiny()
    params = init(cfg, fmm.random.key(0))
    state = init_state(cfg, params, fmm.random.key(1))
    y = targets(state["teacher"], torch.rand(2, 3, 32, 32), cfg=cfg)  # [2, 64, 64]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fmm import checks, random
from fmm.nn import init_layer_norm, init_linear
from fmm.nn.embed import init_learned_positions, init_patch_embed, patch_embed
from fmm.nn.towers import Encoded, encode_embeddings, init_text, init_vit, text, vit
from fmm.nn.transformer import BlockFn, block, init_transformer
from models.data2vec.config import Data2VecConfig

Params = dict[str, Any]


def init(cfg: Data2VecConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params (see the module docstring); leaf keys folded from their names."""
    checks.check_type("cfg", cfg, Data2VecConfig)
    k = lambda name: random.fold_in(key, name)
    tower, d = cfg.tower, cfg.width
    if cfg.modality == "image":
        params = init_vit(tower, k("tower"), dtype=dtype)
    elif cfg.modality == "text":
        params = init_text(tower, k("tower"), dtype=dtype)
    else:
        # The ViT tower's names and inits, over a non-square (frames, mels) grid.
        kt = lambda name: random.fold_in(k("tower"), name)
        params = {
            "patch": init_patch_embed(cfg.patch_size, 1, d, kt("patch"), dtype=dtype),
            "cls": random.normal(kt("cls"), (d,), dtype=dtype) * 0.02,
            "pos": init_learned_positions(cfg.patches + 1, d, kt("pos"), std=0.02, dtype=dtype),
            "mask_token": random.normal(kt("mask_token"), (d,), dtype=dtype) * 0.02,
            "transformer": init_transformer(cfg.transformer, kt("transformer"), dtype=dtype),
        }
        if cfg.norm_first:
            params["norm"] = init_layer_norm(d, device=key.device, dtype=dtype)
    params["head"] = init_linear(d, d, k("head"), dtype=dtype)
    return params


def _tower(params, x, cfg: Data2VecConfig, mask, valid, key, train, block_fn) -> Encoded:
    """The tower on ``x``; ``mask [B, patches]`` bool swaps those patches for the mask
    embedding (images, audio; text arrives already masked)."""
    tower = cfg.tower
    if cfg.modality == "image":
        return vit(params, x, cfg=tower, patch_mask=mask, key=key, train=train, block_fn=block_fn)
    if cfg.modality == "text":
        return text(params, x, cfg=tower, valid=valid, key=key, train=train, block_fn=block_fn)
    tokens = patch_embed(params["patch"], x)
    if mask is not None:
        tokens = torch.where(mask[..., None], params["mask_token"].to(tokens.dtype), tokens)
    cls = params["cls"].to(tokens.dtype).expand(x.shape[0], 1, -1)
    tokens = torch.cat([cls, tokens], 1) + params["pos"]
    return encode_embeddings(params, tokens, cfg=tower, key=key, train=train, block_fn=block_fn)


def _recording(block_fn: BlockFn | None, outputs: list[torch.Tensor]) -> BlockFn:
    # Per-block outputs through the block_fn seam: the tower stays one call and the
    # adapter's routing (sharding, checkpointing) still runs every block.
    run = block if block_fn is None else block_fn

    def record(block_params, x, **kwargs):
        y = run(block_params, x, **kwargs)
        outputs.append(y)
        return y

    return record


def _targets(teacher, x, cfg: Data2VecConfig, valid, block_fn) -> torch.Tensor:
    layers: list[torch.Tensor] = []
    _tower(teacher, x, cfg, None, valid, None, False, _recording(block_fn, layers))
    start = 0 if cfg.modality == "text" else 1  # the class token is no target
    normed = []
    for h in layers[-cfg.top_k :]:
        h = _wide(h[:, start:])
        if cfg.target_norm == "instance":
            h = F.instance_norm(h.transpose(1, 2), eps=1e-5).transpose(1, 2)
        else:
            h = F.layer_norm(h, h.shape[-1:], eps=1e-5)
        normed.append(h)
    return torch.stack(normed).mean(0)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (normalising and regressing low-precision outputs), float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_input(params, x, cfg: Data2VecConfig, name: str, valid=None) -> None:
    if cfg.modality == "text":
        seq = ("batch", range(1, cfg.context_length + 1))
        hint = f"context_length={cfg.context_length}"
        checks.check_ids(name, x, seq, high=cfg.vocab_size, hint=hint)
        if valid is not None:
            checks.check_mask("valid", valid, x.shape, of=name)
    else:
        checks.check_float(name, x, ("batch", *cfg.input_shape), like=params["patch"]["weight"])


def targets(
    teacher: Params,
    x: torch.Tensor,
    *,
    cfg: Data2VecConfig,
    valid: torch.Tensor | None = None,
    block_fn: BlockFn | None = None,
) -> torch.Tensor:
    """The regression targets: the teacher (no dropout, no gradient) on the unmasked
    ``x``, the mean of its top ``cfg.top_k`` block outputs, each normalised by
    ``cfg.target_norm`` without affine params. At least float32, ``[B, patches, width]`` (the class
    token dropped) or, for text, ``[B, seq, width]``. ``valid [B, seq]``: text padding.

    Example: ``y = targets(state["teacher"], images, cfg=cfg)``.
    """
    checks.check_params(teacher, init=init, cfg=cfg, only=_parts(cfg), name="teacher")
    _check_input(teacher, x, cfg, "x", valid)
    with torch.no_grad():
        return _targets(teacher, x, cfg, valid, block_fn)


def _parts(cfg: Data2VecConfig) -> tuple[str, ...]:
    """The teacher's top-level params: the student's (:func:`init`) less its head."""
    if cfg.modality == "text":
        embed = ("norm_embed",) if not cfg.norm_first else ()
        return ("token", "pos", *embed, "transformer", *(("norm",) if cfg.norm_first else ()))
    return (
        "patch",
        "cls",
        "pos",
        "mask_token",
        "transformer",
        *(("norm",) if cfg.norm_first else ()),
    )


def regression_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """data2vec's loss: smooth L1 with ``beta`` (0: the squared error) averaged over
    channels, then over the positions where ``mask`` is True only. ``pred``, ``target``:
    ``[B, S, D]``; ``mask``: ``[B, S]``. A mask with no True gives 0.

    Example: ``regression_loss(head(h)[..., :], y, mask, beta=2.0)``.
    """
    pred, target = _wide(pred), _wide(target)
    if beta == 0:
        per = (pred - target).pow(2)
    else:
        per = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    weight = mask.to(per.dtype)
    return (per.mean(-1) * weight).sum() / weight.sum().clamp_min(1.0)


def encode(
    params: Params,
    x: torch.Tensor,
    *,
    cfg: Data2VecConfig,
    valid: torch.Tensor | None = None,
    block_fn: BlockFn | None = None,
) -> torch.Tensor:
    """The student's features of the unmasked ``x`` (no dropout): images ``[B, 1 +
    patches, width]`` and spectrograms likewise (class token first), text ``[B, seq,
    width]``. What a linear probe reads (:func:`features`).

    Example: ``h = encode(params, images, cfg=cfg)[:, 1:].mean(1)``.
    """
    checks.check_params(params, init=init, cfg=cfg)
    _check_input(params, x, cfg, "x", valid)
    return _tower(params, x, cfg, None, valid, None, False, block_fn).sequence


def features(
    params: Params, x: torch.Tensor, *, cfg: Data2VecConfig, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """One vector per example ``[B, width]`` for linear probing: the mean of the student's
    patch features (images, audio) or of its valid tokens' features (text).

    Example: ``probe_inputs = features(params, images, cfg=cfg)``.
    """
    h = encode(params, x, cfg=cfg, valid=valid)
    if cfg.modality != "text":
        return h[:, 1:].mean(1)
    w = (
        torch.ones(h.shape[:2], dtype=h.dtype, device=h.device)
        if valid is None
        else valid.to(h.dtype)
    )
    return (h * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
