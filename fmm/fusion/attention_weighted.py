"""Attention-weighted fusion: project every modality to one width, then average the
projections with softmax weights that a shared scorer computes per example."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fmm import random
from fmm.fusion._modalities import check_features, sorted_dims
from fmm.nn.linear import init_linear, linear

Params = dict[str, dict]


@dataclass(frozen=True, kw_only=True)
class AttentionWeightedConfig:
    """``dims``: ``{modality: feature size}`` (stored sorted); ``dim``: the fused width.

    Example: ``AttentionWeightedConfig(dims={"image": 3, "text": 5}, dim=7)``.
    """

    dims: Mapping[str, int] = field(default_factory=dict)
    dim: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", sorted_dims(dict(self.dims), "AttentionWeightedConfig"))
        if self.dim < 1:
            raise ValueError(f"AttentionWeightedConfig: dim must be positive, got {self.dim}")


def init_attention_weighted(
    cfg: AttentionWeightedConfig, key: torch.Tensor, *, dtype=torch.float32
) -> Params:
    """``{"proj": {name: linear [dim, dim_name]}, "score": linear [1, dim]}``."""
    return {
        "proj": {
            name: init_linear(d, cfg.dim, random.fold_in(key, f"proj.{name}"), dtype=dtype)
            for name, d in cfg.dims
        },
        "score": init_linear(cfg.dim, 1, random.fold_in(key, "score"), dtype=dtype),
    }


def _projected(params: Params, features, cfg: AttentionWeightedConfig, who: str) -> torch.Tensor:
    xs = check_features(features, cfg.dims, who)
    return torch.stack(
        [linear(params["proj"][name], x) for (name, _), x in zip(cfg.dims, xs)], dim=1
    )


def modality_weights(
    params: Params, features: Mapping[str, torch.Tensor], *, cfg: AttentionWeightedConfig
) -> torch.Tensor:
    """Softmax weights over modalities ``[batch, n_modalities]``, columns in sorted-name order."""
    h = _projected(params, features, cfg, "modality_weights")
    return torch.softmax(linear(params["score"], h).squeeze(-1), dim=-1)


def attention_weighted(
    params: Params, features: Mapping[str, torch.Tensor], *, cfg: AttentionWeightedConfig
) -> torch.Tensor:
    """``{name: [batch, dim_name]}`` -> ``[batch, dim]``: ``sum_m w_m proj_m(x_m)``.

    Example: ``attention_weighted(p, {"image": i, "text": t}, cfg=cfg)``.
    """
    h = _projected(params, features, cfg, "attention_weighted")
    w = torch.softmax(linear(params["score"], h).squeeze(-1), dim=-1)
    return torch.einsum("bm,bmd->bd", w, h)
