"""Concat fusion: the modalities' features side by side, in sorted-name order."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fmm.fusion._modalities import check_features, sorted_dims


@dataclass(frozen=True, kw_only=True)
class ConcatConfig:
    """``dims``: ``{modality: feature size}``; stored sorted by name.

    Example: ``ConcatConfig(dims={"text": 5, "image": 3}).out_dim == 8``.
    """

    dims: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", sorted_dims(dict(self.dims), "ConcatConfig"))

    @property
    def out_dim(self) -> int:
        return sum(d for _, d in self.dims)


def init_concat(cfg: ConcatConfig, key: torch.Tensor | None = None) -> dict:
    """Concat fusion has no params: ``{}`` (kept so every fusion has the same interface)."""
    return {}


def concat(
    params: dict, features: Mapping[str, torch.Tensor], *, cfg: ConcatConfig
) -> torch.Tensor:
    """``{name: [batch, dim_name]}`` -> ``[batch, sum(dims)]``, blocks in sorted-name order.

    Example: ``concat({}, {"text": t, "image": i}, cfg=cfg)`` is ``torch.cat([i, t], -1)``.
    """
    return torch.cat(check_features(features, cfg.dims, "concat"), dim=-1)
