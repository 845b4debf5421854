"""Layer normalisation over the last axis."""

from __future__ import annotations

import torch
import torch.nn.functional as F

Params = dict[str, torch.Tensor]


def init_layer_norm(
    dim: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Params:
    """``{"weight": ones[dim], "bias": zeros[dim]}``. Deterministic, so it takes no key."""
    return {
        "weight": torch.ones(dim, dtype=dtype, device=device),
        "bias": torch.zeros(dim, dtype=dtype, device=device),
    }


def layer_norm(params: Params, x: torch.Tensor, *, eps: float = 1e-5) -> torch.Tensor:
    """Normalise ``x: [..., dim]`` over ``dim``, then scale and shift. Returns ``[..., dim]``."""
    w = params["weight"]
    return F.layer_norm(x, w.shape, w, params.get("bias"), eps)
