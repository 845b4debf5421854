"""The convolutional pieces the ADM U-Net and the VAE share: residual blocks (with or
without a scale-shift conditioning embedding, optionally resampling), attention over the
pixels of a feature map, the resampling convolutions of the VAE and the timestep features.

Feature maps are ``[batch, channels, H, W]``; param names follow TorchMultimodal's modules
where the layout is the same (``weight [out, in, k, k]``), so converters are key maps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from fmm import random
from fmm.nn import conv
from fmm.nn.attention import AttentionConfig, attention, init_attention
from fmm.nn.linear import init_linear, linear
from fmm.nn.norm import group_norm, init_group_norm

Params = dict[str, Any]


def timestep_features(t: torch.Tensor, dim: int, *, base: float = 10000.0) -> torch.Tensor:
    """DDPM's sinusoidal features of integer timesteps ``t: [B]``: float32 ``[B, dim]``,
    sines then cosines at frequencies ``base ** (-i / (dim // 2 - 1))`` (an odd ``dim`` pads
    one zero).

    Not ``fmm.nn.sincos_1d``: DDPM spaces its frequencies over ``dim // 2 - 1`` rather than
    ``dim // 2``, and the angles are taken in float32 as every ADM checkpoint was trained
    with (at ``t`` near 1000 float32 and float64 angles differ by ~1e-4).

    Example: ``timestep_features(torch.tensor([0, 999]), 128)  # [2, 128]``.
    """
    half = dim // 2
    step = torch.tensor(math.log(base), dtype=torch.float32, device=t.device) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=t.device) * -step)
    angles = t.to(torch.float32)[:, None] * freqs[None, :]
    out = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(out, (0, dim % 2))


def init_res_block(
    c_in: int,
    c_out: int,
    key: torch.Tensor,
    *,
    cond_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Params:
    """Params of :func:`res_block`: ``norm1 [c_in]``, ``conv1 [c_out, c_in, 3, 3]``,
    ``norm2 [c_out]``, ``conv2 [c_out, c_out, 3, 3]``; ``skip [c_out, c_in, 1, 1]`` when the
    widths differ; ``cond.weight [2 * c_out, cond_dim]`` (a scale and a shift per channel)
    when ``cond_dim`` is given."""
    k = lambda name: random.fold_in(key, name)
    params = {
        "norm1": init_group_norm(c_in, device=key.device, dtype=dtype),
        "conv1": conv.init_conv2d(c_in, c_out, 3, k("conv1"), dtype=dtype),
        "norm2": init_group_norm(c_out, device=key.device, dtype=dtype),
        # The residual branch starts small, so a deep stack starts near the identity.
        "conv2": conv.init_conv2d(
            c_out, c_out, 3, k("conv2"), std=0.1 * (9 * c_out) ** -0.5, dtype=dtype
        ),
    }
    if c_in != c_out:
        params["skip"] = conv.init_conv2d(c_in, c_out, 1, k("skip"), std=c_in**-0.5, dtype=dtype)
    if cond_dim is not None:
        params["cond"] = init_linear(cond_dim, 2 * c_out, k("cond"), dtype=dtype)
    return params


def _resample(x: torch.Tensor, how: str | None) -> torch.Tensor:
    if how == "down":
        return F.avg_pool2d(x, 2)
    if how == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


def res_block(
    params: Params,
    x: torch.Tensor,
    emb: torch.Tensor | None = None,
    *,
    groups: int,
    eps: float,
    resample: str | None = None,
    dropout: float = 0.0,
    key: torch.Tensor | None = None,
    train: bool = False,
) -> torch.Tensor:
    """BigGAN-style residual block ``[B, c_in, H, W] -> [B, c_out, H', W']``.

    ``h = conv1(resample(silu(norm1(x))))``; with ``emb: [B, cond_dim]`` (and ``cond``
    params) ``h = norm2(h) * (1 + scale) + shift`` where ``scale, shift =
    linear(silu(emb))`` (ADM's scale-shift norm), else ``h = norm2(h)``; then
    ``conv2(dropout(silu(h)))`` plus the (resampled, 1x1-projected) input. ``resample``:
    ``"down"`` (2x2 average pooling) or ``"up"`` (nearest 2x) on both paths.
    ``key`` draws the dropout when ``train``.
    """
    skip = _resample(x, resample)
    if "skip" in params:
        skip = conv.conv2d(params["skip"], skip)
    h = F.silu(group_norm(params["norm1"], x, groups=groups, eps=eps))
    h = conv.conv2d(params["conv1"], _resample(h, resample), padding=1)
    h = group_norm(params["norm2"], h, groups=groups, eps=eps)
    if emb is not None:
        scale, shift = linear(params["cond"], F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = h * (1 + scale) + shift
    h = F.silu(h)
    if train and dropout > 0.0:
        if key is None:
            raise ValueError("key= is missing: residual-block dropout in training needs key=")
        h = random.dropout(key, h, dropout)
    return skip + conv.conv2d(params["conv2"], h, padding=1)


def attention_config(channels: int, heads: int) -> AttentionConfig:
    """The attention over a ``channels``-wide feature map's pixels."""
    return AttentionConfig(dim=channels, heads=heads)


def init_attention_block(
    channels: int,
    key: torch.Tensor,
    *,
    heads: int = 1,
    cond_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Params:
    """Params of :func:`attention_block`: ``norm [channels]``, ``attn`` (``fmm.nn``'s
    self-attention: ``qkv [3C, C]``, ``out [C, C]``) and, with ``cond_dim``, ``cond.weight
    [2C, cond_dim]``: the keys and values of the conditioning tokens, per head."""
    cfg = attention_config(channels, heads)
    params = {
        "norm": init_group_norm(channels, device=key.device, dtype=dtype),
        "attn": init_attention(
            cfg, random.fold_in(key, "attn"), out_std=0.1 * channels**-0.5, dtype=dtype
        ),
    }
    if cond_dim is not None:
        params["cond"] = init_linear(
            cond_dim, 2 * channels, random.fold_in(key, "cond"), dtype=dtype
        )
    return params


def attention_block(
    params: Params,
    x: torch.Tensor,
    tokens: torch.Tensor | None = None,
    *,
    heads: int,
    groups: int,
    eps: float,
) -> torch.Tensor:
    """``x + attention(norm(x))`` over the ``H * W`` pixels of ``x: [B, C, H, W]``; same shape.

    ``tokens: [B, T, cond_dim]`` (with ``cond`` params): their keys and values are prepended
    to the pixels', so every pixel also attends to the condition while the tokens attend to
    nothing (ADM's conditioned attention). That is exactly a self-attention layer whose
    cache already holds ``T`` keys and values, so ``fmm.nn.attention`` runs it with the
    tokens in the first ``T`` slots and the pixels written after them.
    """
    b, c, hgt, wid = x.shape
    cfg = attention_config(c, heads)
    h = rearrange(group_norm(params["norm"], x, groups=groups, eps=eps), "b c h w -> b (h w) c")
    if tokens is None:
        out = attention(params["attn"], h, cfg=cfg)
    else:
        k, v = rearrange(linear(params["cond"], tokens), "b t (h n d) -> n b h t d", n=2, h=heads)
        free = torch.zeros(b, heads, hgt * wid, cfg.head_dim, dtype=k.dtype, device=k.device)
        cache = {"k": torch.cat([k, free], dim=2), "v": torch.cat([v, free], dim=2)}
        slots = torch.arange(hgt * wid, device=x.device).expand(b, -1) + tokens.shape[1]
        out, _ = attention(params["attn"], h, cfg=cfg, cache=cache, slots=slots)
    return x + rearrange(out, "b (h w) c -> b c h w", h=hgt)


def init_resample_conv(channels: int, key: torch.Tensor, *, dtype=torch.float32) -> Params:
    """Params of :func:`downsample` / :func:`upsample`: ``conv [C, C, 3, 3]``."""
    return {"conv": conv.init_conv2d(channels, channels, 3, key, dtype=dtype)}


def downsample(params: Params, x: torch.Tensor) -> torch.Tensor:
    """Halve ``x: [B, C, H, W]`` with a stride-2 3x3 convolution, padded on the bottom and
    right only (latent diffusion's asymmetric padding). ``-> [B, C, H/2, W/2]``."""
    return conv.conv2d(params["conv"], F.pad(x, (0, 1, 0, 1)), stride=2)


def upsample(params: Params, x: torch.Tensor) -> torch.Tensor:
    """Double ``x: [B, C, H, W]`` by nearest neighbours, then a 3x3 convolution."""
    return conv.conv2d(
        params["conv"], F.interpolate(x, scale_factor=2.0, mode="nearest"), padding=1
    )
