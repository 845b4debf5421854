"""Axial attention: multi-head self-attention along one axis of a grid at a time, summed
over the axes (Ho et al. 2019; VideoGPT's residual blocks over ``(T, H, W)``).

Each axis has its own :func:`fmm.nn.attention` layer; the other axes are folded into the
batch, so a ``T x H x W`` video costs ``T + H + W`` keys per query instead of ``T * H * W``.
Queries, keys and values are projected without a bias and the output with one, as VideoGPT.

Example::

    p = init_axial_attention(64, 3, fmm.random.key(0))
    y = axial_attention(p, torch.rand(2, 4, 8, 8, 64), heads=2)   # [2, 4, 8, 8, 64]
"""

from __future__ import annotations

import torch

from fmm import random
from fmm.nn.attention import AttentionConfig, attention, init_attention

Params = dict[str, list]


def init_axial_attention(
    dim: int, n_axes: int, key: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> Params:
    """``{"axes": [attention params] * n_axes}``: per axis ``qkv.weight [3*dim, dim]`` and
    ``out.weight [dim, dim]``, ``out.bias [dim]``."""
    if not isinstance(n_axes, int) or n_axes < 1:
        raise ValueError(f"n_axes must be a positive int, got {n_axes!r}")
    cfg = AttentionConfig(dim=dim, heads=1)
    axes = []
    for i in range(n_axes):
        p = init_attention(cfg, random.fold_in(key, i), dtype=dtype)
        del p["qkv"]["bias"]  # unbiased q/k/v projections (VideoGPT's layout)
        axes.append(p)
    return {"axes": axes}


def axial_attention(
    params: Params, x: torch.Tensor, *, heads: int, impl: str = "sdpa"
) -> torch.Tensor:
    """Sum over axes ``i`` of self-attention along axis ``i`` of ``x: [B, d1, ..., dn, dim]``.

    Returns ``[B, d1, ..., dn, dim]``. ``heads`` must divide ``dim``; ``impl`` as in
    :class:`fmm.nn.AttentionConfig`.
    """
    axes = params["axes"]
    dim = axes[0]["out"]["weight"].shape[0]
    if x.ndim != len(axes) + 2 or x.shape[-1] != dim:
        raise ValueError(
            f"axial_attention: x must be [batch, {len(axes)} grid axes..., {dim}], "
            f"got {list(x.shape)}"
        )
    cfg = AttentionConfig(dim=dim, heads=heads, impl=impl)
    out = torch.zeros_like(x)
    for i, p in enumerate(axes):
        # Axis i becomes the sequence; every other grid axis joins the batch.
        moved = x.movedim(i + 1, -2)
        seq = moved.reshape(-1, *moved.shape[-2:])
        y = attention(p, seq, cfg=cfg).reshape(moved.shape)
        out = out + y.movedim(-2, i + 1)
    return out
