"""Omnivore as pure functions: ``init``, ``encode``, ``classify``, ``loss``.

One Swin-3D encoder reads every modality as a video ``[B, C, T, H, W]``: an image is a
one-frame video, an RGB-D map a one-frame video with a fourth (depth) channel, embedded by
its own patch projection and added to the RGB one. Param tree (PyTorch layouts)::

    patch_embed.proj.weight       [dim, 3, *patch]   RGB tubes -> tokens, then .norm
    depth_embed.proj.weight       [dim, 1, *patch]   the depth channel's, then .norm
    stages.i.blocks.j             fmm.nn.block params; attn.rel_bias [(2t-1)(2h-1)(2w-1), heads]
    stages.i.merge                patch merging to stage i+1 (all but the last stage)
    norm                          [features]
    heads.<name>.weight           [classes, features]   one linear head per dataset
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fmm import checks, random
from fmm.nn import init_block, init_layer_norm, init_linear, layer_norm, linear
from fmm.nn.swin import (
    init_patch_embed_3d,
    init_patch_merging,
    init_window_attention,
    patch_embed_3d,
    patch_merging,
)
from fmm.nn.transformer import BlockFn, block
from models.family import Field
from models.omnivore.config import CHANNELS, OmnivoreConfig

Params = dict[str, Any]
# The batch field holding each modality's inputs.
INPUTS = {"image": "images", "video": "videos", "rgbd": "rgbd"}


def init(cfg: OmnivoreConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params for ``cfg``, each subtree keyed by its path.

    Example: ``params = init(omnivore_tiny(), fmm.random.key(0))``.
    """
    checks.check_type("cfg", cfg, OmnivoreConfig)
    dev = key.device

    def embed(name, channels):
        proj = init_patch_embed_3d(
            cfg.patch, channels, cfg.dim, random.fold_in(key, name), dtype=dtype
        )
        return {"proj": proj, "norm": init_layer_norm(cfg.dim, device=dev, dtype=dtype)}

    stages = []
    for i in range(len(cfg.depths)):
        sc, ks = cfg.stage(i), random.fold_in(key, f"stage{i}")
        blocks = []
        for j in range(sc.layers):
            kb = random.fold_in(ks, j)
            params = init_block(sc, kb, dtype=dtype)
            params["attn"] = init_window_attention(
                sc.self_attention, cfg.block_window(j), kb, dtype=dtype
            )
            blocks.append(params)
        stage: Params = {"blocks": blocks}
        if i < len(cfg.depths) - 1:
            stage["merge"] = init_patch_merging(sc.width, random.fold_in(ks, "merge"), dtype=dtype)
        stages.append(stage)
    heads = {
        name: init_linear(cfg.features, n, random.fold_in(key, f"head.{name}"), dtype=dtype)
        for name, n, _ in cfg.heads
    }
    return {
        "patch_embed": embed("patch_embed", 3),
        "depth_embed": embed("depth_embed", 1),
        "stages": stages,
        "norm": init_layer_norm(cfg.features, device=dev, dtype=dtype),
        "heads": heads,
    }


def _as_video(x: torch.Tensor) -> torch.Tensor:
    # An image or RGB-D map [B, C, H, W] is a one-frame video.
    return x.unsqueeze(2) if x.ndim == 4 else x


def _embed(params: Params, x: torch.Tensor, cfg: OmnivoreConfig) -> torch.Tensor:
    eps, rgb = cfg.norm_eps, params["patch_embed"]
    tokens = layer_norm(rgb["norm"], patch_embed_3d(rgb["proj"], x[:, :3]), eps=eps)
    if x.shape[1] == 4:
        depth = params["depth_embed"]
        d = layer_norm(depth["norm"], patch_embed_3d(depth["proj"], x[:, 3:]), eps=eps)
        tokens = tokens + d
    return tokens


def _encode(params, x, cfg, key=None, train=False, block_fn=None) -> torch.Tensor:
    run = block if block_fn is None else block_fn
    h = _embed(params, _as_video(x), cfg)
    for i, stage in enumerate(params["stages"]):
        ks = random.fold_in(key, f"stage{i}") if key is not None else None
        for j, bp in enumerate(stage["blocks"]):
            kb = random.fold_in(ks, j) if ks is not None else None
            # Each block its own config: its drop-path rate follows cfg's linear schedule.
            bc, win = cfg.block(i, j), cfg.block_window(j)
            h = run(bp, h, cfg=bc, key=kb, train=train, window=win)
        if "merge" in stage:
            h = patch_merging(stage["merge"], h, eps=cfg.norm_eps)
    return layer_norm(params["norm"], h, eps=cfg.norm_eps).mean(dim=(1, 2, 3))


def _check_input(params, x, name: str, modality: str | None = None) -> None:
    """``x`` as a modality takes it, or (``modality`` None) any of them."""
    like = params["patch_embed"]["proj"]["weight"]
    if modality is None:
        ndim = x.ndim if isinstance(x, torch.Tensor) and x.ndim in (4, 5) else 5
        dims = ("batch", range(3, 5), *("frames",) * (ndim == 5), "height", "width")
    else:
        dims = (
            "batch",
            CHANNELS[modality],
            *("frames",) * (modality == "video"),
            "height",
            "width",
        )
    checks.check_float(name, x, dims, like=like)


def encode(params: Params, x: torch.Tensor, *, cfg: OmnivoreConfig) -> torch.Tensor:
    """Pooled features of ``x``: a video ``[B, 3 or 4, T, H, W]`` or an image / RGB-D map
    ``[B, 3 or 4, H, W]`` (4 channels: RGB then depth). Returns ``[B, features]``.

    Example: ``f = encode(params, torch.rand(2, 3, 16, 16), cfg=omnivore_tiny())``.
    """
    checks.check_params(params, init=init, cfg=cfg)
    _check_input(params, x, "x")
    return _encode(params, x, cfg)


def classify(params: Params, x: torch.Tensor, head: str, *, cfg: OmnivoreConfig) -> torch.Tensor:
    """Logits ``[B, classes]`` of dataset head ``head`` for ``x`` (as :func:`encode` takes)."""
    names = [n for n, _, _ in cfg.heads]
    if head not in names:
        raise ValueError(f"head must be one of {names}, got {head!r}")
    return linear(params["heads"][head], encode(params, x, cfg=cfg))


def batch_fields(cfg: OmnivoreConfig) -> dict[str, Field]:
    """The batch :func:`loss` reads: each modality's inputs that a head uses (``images [batch,
    3, S, S]``, ``videos [batch, 3, frames, S, S]``, ``rgbd [batch, 4, S, S]``, floats) and
    ``<head>_labels [batch]`` class ids per head."""
    s = cfg.image_size
    shapes = {
        "image": ("batch", 3, s, s),
        "video": ("batch", 3, cfg.frames, s, s),
        "rgbd": ("batch", 4, s, s),
    }
    fields = {
        INPUTS[m]: Field("float", shapes[m], doc=f"{m} pixels, normalised as in training")
        for m in cfg.modalities
    }
    for name, n, modality in cfg.heads:
        fields[f"{name}_labels"] = Field(
            "int", ("batch",), high=n, doc=f"{name} class ids (read with {INPUTS[modality]})"
        )
    return fields


def loss(
    params: Params,
    batch: dict[str, torch.Tensor],
    *,
    cfg: OmnivoreConfig,
    key: torch.Tensor | None = None,
    train: bool = True,
    block_fn: BlockFn | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The sum over heads of each head's cross-entropy on its modality's inputs: one encoder
    trained on every modality at once (Omnivore's joint training, one batch per modality).

    Each modality is encoded once and read by every head on it. Returns ``(loss [],
    metrics)`` with ``<head>_loss`` and ``<head>_accuracy`` (0-d) per head. ``key``: the
    blocks' drop path in training (``cfg.stochastic_depth > 0`` needs it; each modality's
    encoding folds in its own key); ``block_fn``: the adapter's seam, reaching every Swin
    block.

    Example: ``value, metrics = loss(params, batch, cfg=omnivore_tiny(), key=k)``.
    """
    fields = batch_fields(cfg)
    checks.check_keys(batch, tuple(fields))
    checks.check_params(params, init=init, cfg=cfg)
    for m in cfg.modalities:
        _check_input(params, batch[INPUTS[m]], f"batch[{INPUTS[m]!r}]", m)
    features = {}
    for m in cfg.modalities:
        km = random.fold_in(key, m) if key is not None else None
        features[m] = _encode(params, batch[INPUTS[m]], cfg, km, train, block_fn)
    total, metrics = 0.0, {}
    for name, _, modality in cfg.heads:
        labels = batch[f"{name}_labels"]
        high = fields[f"{name}_labels"].high
        checks.check_ids(f"batch['{name}_labels']", labels, ("batch",), high=high)
        logits = linear(params["heads"][name], features[modality])
        value = F.cross_entropy(logits.float(), labels)
        total = total + value
        metrics[f"{name}_loss"] = value.detach()
        metrics[f"{name}_accuracy"] = (logits.argmax(-1) == labels).float().mean().detach()
    return total, metrics
