"""Swin-3D's layers: 3-D patch embedding, (shifted) window attention with a relative position
bias, and patch merging, on channels-last video grids ``[B, T, H, W, C]``.

Window attention cuts the grid into ``size = (t, h, w)`` windows and runs
:func:`fmm.nn.attention` inside each, with a learned bias per head and relative offset.
Alternate blocks shift the windows by ``shift`` (half a window) with a cyclic roll, masked so
that a window made of wrapped-around pieces attends only within each piece. A Swin block is
:func:`fmm.nn.block` given ``window=`` (see :class:`Window`), so the adapter's ``block_fn``
seam, checkpointing and sharding serve it unchanged. ``Window(v2=True)`` is Swin V2's
variant on 2-D grids (``t = 1``), AudioMAE's decoder: scaled cosine attention, a continuous
position bias from a small MLP, res-post-norm blocks.

Example::

    cfg = AttentionConfig(dim=32, heads=2)
    win = Window(size=(2, 4, 4), shift=(1, 2, 2))
    p = init_window_attention(cfg, win, fmm.random.key(0))
    y = window_attention(p, x, cfg=cfg, window=win)   # x, y: [B, T, H, W, 32]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange

from fmm import random
from fmm.nn.attention import AttentionConfig, attention, init_attention
from fmm.nn.linear import init_linear, linear
from fmm.nn.mlp import init_mlp, mlp
from fmm.nn.norm import init_layer_norm, layer_norm

Params = dict
Size3 = tuple[int, int, int]


@dataclass(frozen=True)
class Window:
    """A block's attention windows: ``size`` ``(t, h, w)`` tokens and the cyclic ``shift``
    (zeros: plain windows; Swin alternates zeros and ``size // 2``).

    ``v2``: Swin V2's block, as AudioMAE's decoder has it (2-D windows, ``t = 1``): scaled
    cosine attention with a learned temperature per head (``attn.tau``), a continuous
    position bias from a small ReLU MLP over log-spaced ``(dh, dw)`` offsets (``attn.cpb``)
    instead of the bias table, and each branch normalised before its residual sum
    (``x + norm1(attn(x))``, "res-post-norm"). ``bias_dropout``: dropout on that MLP's
    hidden layer in training.
    """

    size: Size3
    shift: Size3 = (0, 0, 0)
    v2: bool = False
    bias_dropout: float = 0.0

    def __post_init__(self) -> None:
        if len(self.size) != 3 or len(self.shift) != 3 or min(self.size) < 1:
            raise ValueError(f"Window: size and shift must be 3 sizes, got {self!r}")
        if any(not 0 <= s < n for s, n in zip(self.shift, self.size)):
            raise ValueError(f"Window: each shift must lie in [0, size), got {self!r}")
        if self.v2 and self.size[0] != 1:
            raise ValueError(f"Window: a v2 window is 2-D (size[0] == 1), got {self!r}")

    def fit(self, grid: Size3) -> Window:
        """The window a ``grid``-sized input gets: along an axis no longer than the window,
        one window covers it and nothing shifts (Video Swin's rule)."""
        size = tuple(min(s, n) for s, n in zip(self.size, grid))
        shift = tuple(0 if n <= s else k for s, n, k in zip(self.size, grid, self.shift))
        return replace(self, size=size, shift=shift)


def init_patch_embed_3d(
    patch: Size3, in_channels: int, dim: int, key: torch.Tensor, *, dtype=torch.float32
) -> Params:
    """A strided 3-D convolution's params: ``weight [dim, in_channels, *patch]``, ``bias [dim]``."""
    fan_in = in_channels * math.prod(patch)
    return {
        "weight": random.normal(key, (dim, in_channels, *patch), dtype=dtype) * fan_in**-0.5,
        "bias": torch.zeros(dim, dtype=dtype, device=key.device),
    }


def patch_embed_3d(params: Params, x: torch.Tensor) -> torch.Tensor:
    """Cut ``x: [B, C, T, H, W]`` into ``patch``-sized tubes and project each, zero-padding
    ``T, H, W`` up to multiples of the patch at the end (an image, ``T = 1``, becomes one
    tube of its frame and zeros). Returns channels-last ``[B, T/pt, H/ph, W/pw, dim]``."""
    patch = params["weight"].shape[2:]
    pad = [(-n) % p for n, p in zip(x.shape[2:], patch)]
    x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
    y = F.conv3d(x, params["weight"], params.get("bias"), stride=tuple(patch))
    return rearrange(y, "b c t h w -> b t h w c")


def relative_position_index(size: Size3, *, device=None) -> torch.Tensor:
    """``[V, V]`` (``V = t*h*w``): the bias-table row of each (query, key) pair of a window,
    i.e. their offset ``(dt, dh, dw)`` numbered in ``[0, (2t-1)(2h-1)(2w-1))``."""
    axes = [torch.arange(n, device=device) for n in size]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1)  # [3, V]
    offset = coords[:, :, None] - coords[:, None, :]
    spans = [2 * n - 1 for n in size]
    strides = torch.tensor([spans[1] * spans[2], spans[2], 1], device=device)
    shifted = offset + torch.tensor(size, device=device)[:, None, None] - 1
    return (shifted * strides[:, None, None]).sum(0)


# The hidden width of a v2 window's position-bias MLP (Swin V2's and AudioMAE's).
CPB_HIDDEN = 384


def init_window_attention(
    cfg: AttentionConfig, window: Window, key: torch.Tensor, *, out_std=None, dtype=torch.float32
) -> Params:
    """:func:`fmm.nn.init_attention`'s ``qkv``, ``out`` plus ``rel_bias [(2t-1)(2h-1)(2w-1),
    heads]``, the bias of each relative offset and head (std 0.02, as Swin draws it).

    A v2 window has instead ``tau [heads]`` (ones) and ``cpb {fc1 [384, 2], fc2 [heads,
    384]}``, the MLP that maps a log-spaced ``(dh, dw)`` offset to a bias per head."""
    params = init_attention(cfg, random.fold_in(key, "attn"), out_std=out_std, dtype=dtype)
    if window.v2:
        params["tau"] = torch.ones(cfg.heads, dtype=dtype, device=key.device)
        params["cpb"] = init_mlp(
            2, CPB_HIDDEN, random.fold_in(key, "cpb"), out_dim=cfg.heads, dtype=dtype
        )
        return params
    rows = math.prod(2 * n - 1 for n in window.size)
    table = random.normal(random.fold_in(key, "rel_bias"), (rows, cfg.heads), dtype=dtype)
    params["rel_bias"] = table * 0.02
    return params


def _bias(table: torch.Tensor, full: Size3, size: Size3) -> torch.Tensor:
    """``[1, heads, V, V]``: the bias of a ``size`` window read off the ``full`` window's
    table. A window shrunk to a small input reads the first ``V`` rows and columns of the
    full window's index, as Video Swin (torchvision, TorchMultimodal) does, so converted
    weights give their outputs; that is the true offset table whenever only the leading
    axes shrank (an image's single frame)."""
    vol = math.prod(size)
    index = relative_position_index(full, device=table.device)[:vol, :vol]
    return rearrange(table[index], "q k h -> 1 h q k")


def _continuous_bias(
    params: Params, size: Size3, key: torch.Tensor | None, rate: float, train: bool
) -> torch.Tensor:
    """``[1, heads, V, V]``: a v2 window's bias, its MLP applied to each (query, key) pair's
    offset ``(dh, dw)`` mapped to ``sign(d) * log(1 + |d|)``."""
    axes = [torch.arange(n, device=params["fc1"]["weight"].device) for n in size[1:]]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1)  # [2, V]
    offset = rearrange(coords[:, :, None] - coords[:, None, :], "c q k -> q k c").float()
    offset = (torch.sign(offset) * torch.log1p(offset.abs())).to(params["fc1"]["weight"].dtype)
    bias = mlp(params, offset, act="relu", dropout=rate, key=key, train=train)
    return rearrange(bias, "q k h -> 1 h q k")


def _shift_mask(grid: Size3, window: Window, device) -> torch.Tensor:
    """``[windows, 1, V, V]`` bool: after the roll by ``-shift``, the tokens of a window that
    were neighbours before it (the same piece of the wrapped grid) may attend each other."""
    region = torch.zeros(grid, dtype=torch.long, device=device)
    for axis, (n, s, k) in enumerate(zip(grid, window.size, window.shift)):
        if k == 0:
            continue  # an unshifted axis wraps nothing
        i = torch.arange(n, device=device)
        piece = (i >= n - s).long() + (i >= n - k).long()
        region = region * 3 + piece.view([-1 if a == axis else 1 for a in range(3)])
    t, h, w = window.size
    cells = rearrange(region, "(a t) (b h) (c w) -> (a b c) (t h w)", t=t, h=h, w=w)
    return (cells[:, :, None] == cells[:, None, :])[:, None]


def window_attention(
    params: Params,
    x: torch.Tensor,
    *,
    cfg: AttentionConfig,
    window: Window,
    key: torch.Tensor | None = None,
    train: bool = False,
) -> torch.Tensor:
    """Multi-head self-attention within (shifted) windows. ``x: [B, T, H, W, dim]`` ->
    ``[B, T, H, W, dim]``.

    The grid is zero-padded at the end to whole windows (padded tokens take part, as in
    Video Swin), rolled by ``-shift``, attended window by window with ``params["rel_bias"]``
    (and the shift mask), then rolled back and cropped. ``window`` is the configured one;
    :meth:`Window.fit` adapts it to ``x``. ``key``: attention dropout in training.
    """
    b, *grid = x.shape[:4]
    fit = window.fit(tuple(grid))
    pad = [(-n) % s for n, s in zip(grid, fit.size)]
    x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
    padded = tuple(n + p for n, p in zip(grid, pad))
    shifted = any(fit.shift)
    if shifted:
        x = torch.roll(x, shifts=tuple(-k for k in fit.shift), dims=(1, 2, 3))
    t, h, w = fit.size
    tokens = rearrange(x, "b (a t) (c h) (d w) e -> (b a c d) (t h w) e", t=t, h=h, w=w)
    tau = None
    if window.v2:
        k_bias = random.fold_in(key, "cpb") if key is not None else None
        bias = _continuous_bias(params["cpb"], fit.size, k_bias, window.bias_dropout, train)
        tau = params["tau"]
    else:
        bias = _bias(params["rel_bias"], window.size, fit.size)
    mask = None
    if shifted:
        mask = _shift_mask(padded, fit, x.device).repeat(b, 1, 1, 1)
    y = attention(
        params, tokens, cfg=cfg, mask=mask, bias=bias, temperature=tau, key=key, train=train
    )
    grids = {"a": padded[0] // t, "c": padded[1] // h, "d": padded[2] // w}
    y = rearrange(y, "(b a c d) (t h w) e -> b (a t) (c h) (d w) e", t=t, h=h, w=w, **grids)
    if shifted:
        y = torch.roll(y, shifts=fit.shift, dims=(1, 2, 3))
    return y[:, : grid[0], : grid[1], : grid[2]]


def init_patch_merging(dim: int, key: torch.Tensor, *, dtype=torch.float32) -> Params:
    """``{"norm": [4*dim], "reduction": {"weight": [2*dim, 4*dim]}}`` (no bias)."""
    return {
        "norm": init_layer_norm(4 * dim, device=key.device, dtype=dtype),
        "reduction": init_linear(4 * dim, 2 * dim, key, bias=False, dtype=dtype),
    }


def patch_merging(params: Params, x: torch.Tensor, *, eps: float = 1e-5) -> torch.Tensor:
    """Merge each 2x2 patch of space into one token of twice the width; time is kept.
    ``x: [B, T, H, W, dim]`` -> ``[B, T, ceil(H/2), ceil(W/2), 2*dim]`` (odd sizes pad a zero
    row/column). The four neighbours are concatenated in (0,0), (1,0), (0,1), (1,1) order."""
    h, w = x.shape[-3:-1]
    x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    x = torch.cat([x[..., i::2, j::2, :] for j in (0, 1) for i in (0, 1)], dim=-1)
    return linear(params["reduction"], layer_norm(params["norm"], x, eps=eps))
