"""Pooling a sequence ``[batch, seq, dim]`` to one vector per example ``[batch, dim]``."""

from __future__ import annotations

import torch


def pool_cls(x: torch.Tensor) -> torch.Tensor:
    """The first token (a class token prepended by the encoder). ``[B, S, D] -> [B, D]``."""
    return x[:, 0]


def pool_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the sequence, counting only positions where ``mask: [B, S]`` is True."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def pool_index(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The token at ``index: [B]`` (int64) of each sequence. ``[B, S, D] -> [B, D]``."""
    return torch.gather(x, 1, index.view(-1, 1, 1).expand(-1, 1, x.shape[-1])).squeeze(1)


def pool_eot(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The end-of-text token, found as the largest id in ``tokens: [B, S]`` (CLIP's rule)."""
    return pool_index(x, tokens.argmax(dim=-1))
