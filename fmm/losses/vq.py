"""Losses of vector-quantised autoencoders: commitment and reconstruction."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def commitment_loss(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Mean squared distance from encoder outputs ``z: [..., dim]`` to their codes ``z_q``.

    Pulls the encoder towards the codebook; ``z_q`` is a constant here (the codebook learns
    by EMA or by its own loss), so the gradient reaches ``z`` only. Returns a 0-d tensor.
    """
    if z.shape != z_q.shape:
        raise ValueError(
            f"commitment_loss: z and z_q must have one shape, got {list(z.shape)} and "
            f"{list(z_q.shape)}"
        )
    return F.mse_loss(z, z_q.detach())


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between ``reconstruction`` and ``target`` (``[B, C, H, W]``). 0-d."""
    if reconstruction.shape != target.shape:
        raise ValueError(
            f"reconstruction_loss: reconstruction and target must have one shape, got "
            f"{list(reconstruction.shape)} and {list(target.shape)}"
        )
    return F.mse_loss(reconstruction, target)
