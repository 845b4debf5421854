"""Image grids for the generation recipes (VQ-VAE reconstructions, generated samples).

Written with the non-interactive Agg backend, atomically, like ``train.plots``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import torch
from einops import rearrange

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from train.checkpoint import atomic_write


def tile(images: torch.Tensor, columns: int, *, pad: int = 1) -> torch.Tensor:
    """Lay ``images: [N, C, H, W]`` in ``[0, 1]`` out row by row, ``columns`` per row, with a
    ``pad``-pixel white gutter. Returns ``[rows*(H+pad)+pad, columns*(W+pad)+pad, C]``;
    the last row is padded with white tiles."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(
            f"images must be a non-empty [N, C, H, W] tensor, got {list(images.shape)}"
        )
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    n, c, h, w = images.shape
    rows = -(-n // columns)
    filler = torch.ones(rows * columns - n, c, h, w, dtype=images.dtype)
    x = torch.cat([images.detach().float().cpu().clamp(0, 1), filler])
    x = torch.nn.functional.pad(x, (pad, 0, pad, 0), value=1.0)
    grid = rearrange(x, "(r k) c h w -> (r h) (k w) c", k=columns)
    return torch.nn.functional.pad(grid, (0, 0, 0, pad, 0, pad), value=1.0)


def save_image_grid(
    images: torch.Tensor,
    path: str | Path,
    *,
    columns: int = 8,
    title: str = "",
    row_labels: list[str] | None = None,
    column_labels: list[str] | None = None,
) -> None:
    """Save ``images: [N, C, H, W]`` (pixels in ``[0, 1]``) as a PNG grid, atomically.

    ``row_labels``: one caption per grid row, written at its left; ``column_labels``: one
    per column, written above it.
    """
    grid = tile(images, columns)
    rows = -(-images.shape[0] // columns)
    height, width = grid.shape[:2]
    scale = 4 / images.shape[-1]  # inches per image: keep 32 px tiles readable
    left = 2.6 if row_labels else 0.2
    fig = plt.figure(
        figsize=(left + width * scale * 0.25 + 0.2, height * scale * 0.25 + 0.6), dpi=110
    )
    ax = fig.add_axes(
        (left / fig.get_figwidth(), 0.02, 1 - (left + 0.2) / fig.get_figwidth(), 0.86)
    )
    ax.imshow(grid.numpy(), interpolation="nearest")
    if column_labels:
        w = images.shape[-1] + 1
        ax.set_xticks(
            [1 + w * c + w / 2 for c in range(columns)], column_labels[:columns], fontsize=8
        )
        ax.xaxis.tick_top()
    else:
        ax.set_xticks([])
    if row_labels:
        h = images.shape[-2] + 1
        ax.set_yticks([1 + h * r + h / 2 for r in range(rows)], row_labels[:rows], fontsize=8)
    else:
        ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    fig.suptitle(title, fontsize=9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
