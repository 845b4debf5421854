"""The masked autoencoder as pure functions over an explicit param tree.

Params (``init``)::

    patch               {weight [width, C, p, p], bias}   the patch embedding
    cls                 [width]                            class token
    transformer.blocks.N                                   the ViT encoder's pre-norm blocks
    norm                                                   its final layer norm
    decoder.embed       {weight [decoder_width, width], bias}
    decoder.mask_token  [decoder_width]                    stands in for every masked patch
    decoder.transformer.blocks.N                           ViT blocks, or Swin V2 blocks
    decoder.norm
    decoder.pred        {weight [p*p*C, decoder_width], bias}

The positions are fixed 2-d sin-cos tables (:func:`positions`), computed from the config,
not params: nothing trains them, as in MAE.

Example::

    cfg = mae_tiny()
    params = init(cfg, fmm.random.key(0))
    out = reconstruct(params, torch.rand(2, 3, 32, 32), cfg=cfg, key=fmm.random.key(1))
    out.pred.shape, out.mask.sum(1)  # [2, 64, 48], 48 of 64 masked per image
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from einops import rearrange

from fmm import checks, random
from fmm.nn import init_layer_norm, init_linear, layer_norm, linear
from fmm.nn.embed import init_patch_embed, patch_embed, sincos_1d
from fmm.nn.swin import init_window_attention
from fmm.nn.transformer import BlockFn, block, init_block, init_transformer, transformer
from models.family import Field
from models.mae.config import MAEConfig

Params = dict[str, Any]
INPUTS = {"image": "images", "audio": "spectrograms"}


class Encoding(NamedTuple):
    """The encoder's output ``sequence [B, 1 + kept, width]`` (class token first, the
    visible patches in ``keep`` order) and the masking that chose them: ``keep [B, kept]``,
    ``restore [B, patches]``, ``mask [B, patches]`` (1 = masked). Unmasked (no key):
    ``sequence [B, 1 + patches, width]`` and the rest None."""

    sequence: torch.Tensor
    keep: torch.Tensor | None = None
    restore: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class Reconstruction(NamedTuple):
    """:func:`reconstruct`'s outputs: ``encoded`` (:class:`Encoding`), ``pred [B, patches,
    p*p*C]`` for every patch, ``target [B, patches, p*p*C]`` (the input's patches,
    :func:`patchify`) and ``mask [B, patches]`` (1 = masked)."""

    encoded: Encoding
    pred: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor


def positions(cfg: MAEConfig, dim: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The fixed sin-cos positions ``[1 + patches, dim]``: a zero row for the class token,
    then patch ``k`` (row-major over the ``(gh, gw)`` grid) gets ``[sincos(k mod gh),
    sincos(k div gh)]``, each half of ``dim``.

    On a square grid that is (column, row), MAE's table. On a non-square one (AudioMAE's
    64 x 8 spectrogram grid) it is the enumeration TorchMultimodal builds, kept so that its
    checkpoints see the positions they were trained with.
    """
    gh = cfg.grid[0]
    k = torch.arange(cfg.patches, device=device)
    table = torch.cat(
        [sincos_1d(k % gh, dim // 2, dtype=dtype), sincos_1d(k // gh, dim // 2, dtype=dtype)], -1
    )
    return torch.cat([torch.zeros(1, dim, dtype=dtype, device=device), table])


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``x: [B, C, H, W]`` -> ``[B, (H/p)*(W/p), p*p*C]``: row-major patches, each flattened
    as (pixel row, pixel column, channel), the layout of the decoder's predictions.

    Example: ``patchify(torch.rand(2, 3, 32, 32), 4).shape == (2, 64, 48)``.
    """
    return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=patch, q=patch)


def unpatchify(patches: torch.Tensor, cfg: MAEConfig) -> torch.Tensor:
    """The inverse of :func:`patchify`: ``[B, patches, p*p*C]`` -> ``[B, C, H, W]``."""
    p, (gh, gw) = cfg.patch_size, cfg.grid
    return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=gh, w=gw, p=p, q=p)


def init(cfg: MAEConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params (see the module docstring); leaf keys folded from their names."""
    checks.check_type("cfg", cfg, MAEConfig)
    k = lambda name: random.fold_in(key, name)
    d, dd, dev = cfg.width, cfg.decoder_width, key.device
    params: Params = {
        "patch": init_patch_embed(cfg.patch_size, cfg.in_channels, d, k("patch"), dtype=dtype),
        "cls": random.normal(k("cls"), (d,), dtype=dtype) * 0.02,
        "transformer": init_transformer(cfg.encoder, k("transformer"), dtype=dtype),
        "norm": init_layer_norm(d, device=dev, dtype=dtype),
    }
    kd = lambda name: random.fold_in(k("decoder"), name)
    if cfg.decoder == "vit":
        stack = init_transformer(cfg.decoder_stack, kd("transformer"), dtype=dtype)
    else:
        stack = {
            "blocks": [
                _init_swin_block(cfg, i, kd("transformer"), dtype)
                for i in range(cfg.decoder_layers)
            ]
        }
    params["decoder"] = {
        "embed": init_linear(d, dd, kd("embed"), dtype=dtype),
        "mask_token": random.normal(kd("mask_token"), (dd,), dtype=dtype) * 0.02,
        "transformer": stack,
        "norm": init_layer_norm(dd, device=dev, dtype=dtype),
        "pred": init_linear(dd, cfg.patch_dim, kd("pred"), dtype=dtype),
    }
    return params


def _init_swin_block(cfg: MAEConfig, i: int, key: torch.Tensor, dtype) -> Params:
    sc, kb = cfg.decoder_stack, random.fold_in(key, i)
    params = init_block(sc, kb, dtype=dtype)
    params["attn"] = init_window_attention(sc.self_attention, cfg.block_window(i), kb, dtype=dtype)
    return params


def _encode(params, x, cfg: MAEConfig, key, train, block_fn) -> Encoding:
    pos = positions(cfg, cfg.width, device=x.device, dtype=x.dtype)
    tokens = patch_embed(params["patch"], x) + pos[1:]
    keep = restore = mask = None
    if key is not None:
        keep, restore, mask = random.random_masking(
            random.fold_in(key, "mask"), x.shape[0], cfg.patches, cfg.ratio
        )
        tokens = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
    cls = (params["cls"] + pos[0]).expand(x.shape[0], 1, -1)
    k = random.fold_in(key, "encoder") if key is not None and train else None
    hidden = transformer(
        params["transformer"], torch.cat([cls, tokens], 1), cfg=cfg.encoder, key=k,
        train=train, block_fn=block_fn,
    )  # fmt: skip
    out = layer_norm(params["norm"], hidden, eps=cfg.norm_eps)
    return Encoding(out, keep, restore, None if mask is None else mask.to(x.dtype))


def _decode(params, encoded: torch.Tensor, restore, cfg: MAEConfig, key, train, block_fn):
    p = params["decoder"]
    y = linear(p["embed"], encoded)
    b, seen, dd = y.shape
    # The visible patches then a mask token per hidden one, put back in patch order.
    fill = p["mask_token"].to(y.dtype).expand(b, cfg.patches + 1 - seen, dd)
    patches = torch.cat([y[:, 1:], fill], 1)
    if restore is not None:
        patches = torch.gather(patches, 1, restore[..., None].expand(-1, -1, dd))
    y = torch.cat([y[:, :1], patches], 1) + positions(cfg, dd, device=y.device, dtype=y.dtype)
    if not cfg.use_cls_in_decoder:
        y = y[:, 1:]
    sc = cfg.decoder_stack
    if cfg.decoder == "vit":
        y = transformer(p["transformer"], y, cfg=sc, key=key, train=train, block_fn=block_fn)
    else:
        run = block if block_fn is None else block_fn
        y = rearrange(y, "b (t h w) d -> b t h w d", t=1, h=cfg.grid[0])
        for i, bp in enumerate(p["transformer"]["blocks"]):
            ki = random.fold_in(key, i) if key is not None else None
            y = run(bp, y, cfg=sc, key=ki, train=train, window=cfg.block_window(i))
        y = rearrange(y, "b t h w d -> b (t h w) d")
    pred = linear(p["pred"], layer_norm(p["norm"], y, eps=sc.norm_eps))
    return pred[:, 1:] if cfg.use_cls_in_decoder else pred


def _check(params, x, cfg: MAEConfig, name: str) -> None:
    checks.check_params(params, init=init, cfg=cfg)
    checks.check_float(name, x, ("batch", *cfg.input_shape), like=params["patch"]["weight"])


def encode(
    params: Params,
    x: torch.Tensor,
    *,
    cfg: MAEConfig,
    key: torch.Tensor | None = None,
    train: bool = False,
    block_fn: BlockFn | None = None,
) -> Encoding:
    """The encoder on ``x: [B, C, H, W]`` (audio: ``[B, 1, frames, mels]``).

    With ``key``: MAE's view, the class token and only the visible patches, ``cfg.ratio``
    of them masked by :func:`fmm.random.random_masking` (``sequence [B, 1 + kept, width]``).
    Without: every patch, ``[B, 1 + patches, width]``, for downstream use and linear probes
    (``sequence[:, 0]`` the class token, ``sequence[:, 1:].mean(1)`` the mean patch).

    Example: ``feats = encode(params, images, cfg=cfg).sequence[:, 1:].mean(1)``.
    """
    _check(params, x, cfg, "x")
    return _encode(params, x, cfg, key, train, block_fn)


def reconstruct(
    params: Params,
    x: torch.Tensor,
    *,
    cfg: MAEConfig,
    key: torch.Tensor,
    train: bool = False,
    block_fn: BlockFn | None = None,
) -> Reconstruction:
    """Mask ``x`` (``key`` draws the mask, and with ``train`` the decoder's bias dropout),
    encode the visible patches, decode every patch. Returns :class:`Reconstruction`;
    ``unpatchify(out.pred, cfg)`` is the reconstructed input ``[B, C, H, W]`` (normalised
    per patch when ``cfg.norm_pix_loss``).

    Example: ``out = reconstruct(params, images, cfg=cfg, key=fmm.random.key(1))``.
    """
    _check(params, x, cfg, "x")
    if key is None:
        raise ValueError("key= is missing: reconstruct draws the mask from key=")
    return _reconstruct(params, x, cfg, key, train, block_fn)


def _reconstruct(params, x, cfg, key, train, block_fn) -> Reconstruction:
    encoded = _encode(params, x, cfg, key, train, block_fn)
    k = random.fold_in(key, "decoder") if train else None
    pred = _decode(params, encoded.sequence, encoded.restore, cfg, k, train, block_fn)
    return Reconstruction(encoded, pred, patchify(x, cfg.patch_size), encoded.mask)


def composite(out: Reconstruction, cfg: MAEConfig) -> torch.Tensor:
    """What a reconstruction figure shows: the input's visible patches as they are and, at
    each masked patch, the prediction. With ``cfg.norm_pix_loss`` the predictions are in
    units of each patch's own mean and std, so they are mapped back with the true patch's
    statistics (as MAE's figures do). Returns ``[B, C, H, W]``.

    Example: ``picture = composite(reconstruct(params, x, cfg=cfg, key=k), cfg)``.
    """
    pred = out.pred.to(out.target.dtype)
    if cfg.norm_pix_loss:
        mean, var = out.target.mean(-1, keepdim=True), out.target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    return unpatchify(torch.where(out.mask.bool()[..., None], pred, out.target), cfg)


def masked_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, norm_pix: bool
) -> torch.Tensor:
    """MAE's loss: the mean over masked patches of each patch's mean squared error.
    ``pred``, ``target: [B, patches, D]``, ``mask: [B, patches]`` (1 = masked) -> ``[]``.

    ``norm_pix``: each target patch is first normalised by its own mean and (unbiased)
    variance, ``(t - mean) / sqrt(var + 1e-6)``. Visible patches weigh nothing.
    """
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    work = torch.promote_types(pred.dtype, torch.float32)  # float32 at least, float64 kept
    per_patch = (pred.to(work) - target.to(work)).pow(2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def batch_fields(cfg: MAEConfig) -> dict[str, Field]:
    """The batch :func:`loss` reads: ``images [batch, C, H, W]`` or, for audio,
    ``spectrograms [batch, 1, frames, mels]`` (floats, normalised as in training)."""
    doc = {"image": "pixels", "audio": "log-mel spectrograms, frames by mels"}[cfg.modality]
    return {INPUTS[cfg.modality]: Field("float", ("batch", *cfg.input_shape), doc=doc)}


def loss(
    params: Params,
    batch: dict[str, torch.Tensor],
    *,
    cfg: MAEConfig,
    key: torch.Tensor | None = None,
    train: bool = True,
    block_fn: BlockFn | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MAE's objective on ``batch`` (:func:`batch_fields`): reconstruct the masked patches.

    ``key`` (required) draws the mask, which is the objective itself, so evaluation
    (``train=False``) masks too; ``train`` turns on the decoder's bias dropout. Returns
    ``(loss [], {"masked_mse": ...})``.

    Example: ``value, metrics = loss(params, {"images": x}, cfg=mae_tiny(), key=k)``.
    """
    name = INPUTS[cfg.modality]
    checks.check_keys(batch, (name,))
    x = batch[name]
    _check(params, x, cfg, f"batch[{name!r}]")
    if key is None:
        raise ValueError("key= is missing: the MAE loss draws its mask from key=")
    out = _reconstruct(params, x, cfg, key, train, block_fn)
    value = masked_loss(out.pred, out.target, out.mask, norm_pix=cfg.norm_pix_loss)
    return value, {"masked_mse": value.detach()}
