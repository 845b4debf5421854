"""data2vec's masks over a patch grid, as pure functions of a key.

Every example masks exactly ``n - floor(n * (1 - ratio))`` of its ``n`` patches (MAE's
rounding, so a share means the same here as in :mod:`models.mae`). Uniform random masking is
:func:`fmm.random.random_masking`'s; block masking ranks the patches by a random score
that is constant over blocks of the grid (so whole blocks go first), breaking ties inside
a block by a second draw, and masks the first ``count`` in that order: BEiT's blocks and
wav2vec's time spans with an exact share, in two stable sorts and no host sync.
"""

from __future__ import annotations

import torch

from fmm import random


def patch_mask(
    key: torch.Tensor,
    batch: int,
    grid: tuple[int, int],
    ratio: float,
    *,
    block: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """A bool mask ``[batch, rows * cols]`` (row-major over ``grid = (rows, cols)``), True at
    exactly ``n - floor(n * (1 - ratio))`` of the ``n`` patches of each example.

    ``block = (bh, bw)``: patches are masked a block of ``bh x bw`` at a time (the last
    block partly); each example's block boundaries are shifted by a random phase along the
    axes a block does not span, so no patch is always on an edge. ``(1, 1)``: uniform
    random masking (:func:`fmm.random.random_masking`).

    Example: ``patch_mask(fmm.random.key(0), 2, (8, 8), 0.6, block=(2, 2)).sum(1)`` is
    ``[39, 39]``.
    """
    (gh, gw), (bh, bw), n = grid, block, grid[0] * grid[1]
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"patch_mask: ratio must be in [0, 1), got {ratio}")
    if not (1 <= bh <= gh and 1 <= bw <= gw):
        raise ValueError(f"patch_mask: block={block} must lie within grid={grid}")
    if (bh, bw) == (1, 1):
        return random.random_masking(key, batch, n, ratio)[2].bool()
    dev = key.device
    sizes = torch.tensor([bh, bw], device=dev)
    spans = torch.tensor([bh < gh, bw < gw], device=dev)
    phase = (random.uniform(random.fold_in(key, "phase"), (batch, 2)) * sizes).long() * spans
    rows = (torch.arange(gh, device=dev) + phase[:, :1]) // bh  # [batch, gh]
    cols = (torch.arange(gw, device=dev) + phase[:, 1:]) // bw  # [batch, gw]
    per_row = gw // bw + 2  # blocks along a row, with room for the phase
    blocks = (rows[:, :, None] * per_row + cols[:, None, :]).flatten(1)  # [batch, n]
    coarse = random.uniform(random.fold_in(key, "blocks"), (batch, (gh // bh + 2) * per_row))
    fine = random.uniform(random.fold_in(key, "patches"), (batch, n))
    # Lexicographic order by (block score, patch score): two stable sorts.
    order = torch.argsort(fine, dim=1, stable=True)
    by_block = torch.argsort(coarse.gather(1, blocks).gather(1, order), dim=1, stable=True)
    rank = torch.argsort(order.gather(1, by_block), dim=1, stable=True)
    return rank < n - int(n * (1 - ratio))
