"""Token, patch and position embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from fmm import random

Params = dict[str, torch.Tensor]


def init_embedding(
    num: int, dim: int, key: torch.Tensor, *, std: float = 0.02, dtype: torch.dtype = torch.float32
) -> Params:
    """A lookup table ``{"weight": [num, dim]}`` drawn from ``N(0, std**2)``."""
    return {"weight": random.normal(key, (num, dim), dtype=dtype) * std}


def embed(params: Params, ids: torch.Tensor) -> torch.Tensor:
    """Look up ``ids: [...]`` (int64) in the table. Returns ``[..., dim]``."""
    return F.embedding(ids, params["weight"])


def init_patch_embed(
    patch: int,
    in_channels: int,
    dim: int,
    key: torch.Tensor,
    *,
    bias: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Params:
    """A strided convolution's params: ``weight [dim, in_channels, patch, patch]``, ``bias [dim]``."""
    fan_in = in_channels * patch * patch
    params = {
        "weight": random.normal(key, (dim, in_channels, patch, patch), dtype=dtype) * fan_in**-0.5
    }
    if bias:
        params["bias"] = torch.zeros(dim, dtype=dtype, device=key.device)
    return params


def patch_embed(params: Params, images: torch.Tensor) -> torch.Tensor:
    """Cut ``images: [B, C, H, W]`` into non-overlapping patches and project each.

    Returns ``[B, (H/p)*(W/p), dim]`` in row-major patch order.
    """
    patch = params["weight"].shape[-1]
    x = F.conv2d(images, params["weight"], params.get("bias"), stride=patch)
    return rearrange(x, "b d h w -> b (h w) d")


def init_learned_positions(
    seq: int, dim: int, key: torch.Tensor, *, std: float = 0.01, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A learned position table ``[seq, dim]`` (a bare leaf, added to the sequence)."""
    return random.normal(key, (seq, dim), dtype=dtype) * std


def sincos_1d(
    positions: torch.Tensor, dim: int, *, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fixed sinusoidal features of ``positions: [S]``: ``[S, dim]``, sines then cosines."""
    if dim % 2:
        raise ValueError(f"sincos_1d needs an even dim, got {dim}")
    freqs = base ** (
        -torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim // 2)
    )
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)


def sincos_2d(
    grid_h: int, grid_w: int, dim: int, *, device: torch.device | str = "cpu", dtype=torch.float32
) -> torch.Tensor:
    """Fixed 2-d sin-cos features for a ``grid_h x grid_w`` patch grid: ``[grid_h*grid_w, dim]``.

    Half the channels encode the row, half the column (MAE's layout).
    """
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device).repeat(grid_h)
    return torch.cat(
        [sincos_1d(rows, dim // 2, dtype=dtype), sincos_1d(cols, dim // 2, dtype=dtype)], -1
    )
