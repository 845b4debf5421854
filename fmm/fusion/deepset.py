"""Deep-set fusion: per-modality projections to one width, an optional tanh attention
over modalities, Lp normalisation, a symmetric pooling, then an MLP.

Apart from the per-name projections, everything after them treats the modalities as a
set: renaming modalities (moving their projections along) never changes the output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fmm import random
from fmm.fusion._modalities import check_features, sorted_dims
from fmm.nn.linear import init_linear, linear
from fmm.nn.mlp import ACTIVATIONS, init_mlp, mlp

Params = dict[str, dict]

POOLINGS = ("sum", "mean", "max")


@dataclass(frozen=True, kw_only=True)
class DeepSetConfig:
    """Static shape of a deep-set fusion.

    ``dims``: ``{modality: feature size}`` (stored sorted by name); ``dim``: the common width
    each modality is projected to; ``hidden`` / ``out_dim``: the MLP after pooling.
    ``attention``: weight the projections by ``softmax_m(v . tanh(W h_m))`` before pooling.
    ``norm_p``: Lp-normalise each projection (``None``: don't). ``pooling``: sum, mean or max.

    Example: ``DeepSetConfig(dims={"image": 3, "text": 5}, dim=8, hidden=16, out_dim=4)``.
    """

    dims: Mapping[str, int] = field(default_factory=dict)
    dim: int
    hidden: int
    out_dim: int
    attention: bool = False
    norm_p: float | None = None
    pooling: str = "sum"
    act: str = "relu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", sorted_dims(dict(self.dims), "DeepSetConfig"))
        for name in ("dim", "hidden", "out_dim"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"DeepSetConfig: {name} must be positive, got {getattr(self, name)}"
                )
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"DeepSetConfig: pooling must be one of {POOLINGS}, got {self.pooling!r}"
            )
        if self.norm_p is not None and self.norm_p <= 0:
            raise ValueError(f"DeepSetConfig: norm_p must be positive or None, got {self.norm_p}")
        if self.act not in ACTIVATIONS:
            raise ValueError(
                f"DeepSetConfig: act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}"
            )


def init_deepset(cfg: DeepSetConfig, key: torch.Tensor, *, dtype=torch.float32) -> Params:
    """``{"proj": {name: linear [dim, dim_name]}, ["attention": {"hidden": [dim, dim],
    "score": [1, dim]}], "mlp": {"fc1": [hidden, dim], "fc2": [out_dim, hidden]}}``."""
    params: Params = {
        "proj": {
            name: init_linear(d, cfg.dim, random.fold_in(key, f"proj.{name}"), dtype=dtype)
            for name, d in cfg.dims
        },
        "mlp": init_mlp(
            cfg.dim, cfg.hidden, random.fold_in(key, "mlp"), out_dim=cfg.out_dim, dtype=dtype
        ),
    }
    if cfg.attention:
        k = random.fold_in(key, "attention")
        params["attention"] = {
            "hidden": init_linear(cfg.dim, cfg.dim, random.fold_in(k, 0), dtype=dtype),
            "score": init_linear(cfg.dim, 1, random.fold_in(k, 1), bias=False, dtype=dtype),
        }
    return params


def pool_set(h: torch.Tensor, pooling: str) -> torch.Tensor:
    """A symmetric reduction over the set axis: ``[batch, n, dim] -> [batch, dim]``."""
    if pooling == "sum":
        return h.sum(dim=1)
    if pooling == "mean":
        return h.mean(dim=1)
    if pooling == "max":
        return h.amax(dim=1)
    raise ValueError(f"pool_set: pooling must be one of {POOLINGS}, got {pooling!r}")


def deepset(
    params: Params, features: Mapping[str, torch.Tensor], *, cfg: DeepSetConfig
) -> torch.Tensor:
    """``{name: [batch, dim_name]}`` -> ``[batch, out_dim]``.

    Example: ``deepset(p, {"image": torch.randn(2, 3), "text": torch.randn(2, 5)}, cfg=cfg)``.
    """
    xs = check_features(features, cfg.dims, "deepset")
    h = torch.stack([linear(params["proj"][n], x) for (n, _), x in zip(cfg.dims, xs)], dim=1)
    if cfg.norm_p is not None:
        h = F.normalize(h, p=cfg.norm_p, dim=-1)
    if cfg.attention:
        a = params["attention"]
        scores = linear(a["score"], torch.tanh(linear(a["hidden"], h))).squeeze(-1)
        # Weights scale the members rather than replace pooling, so max pooling still sees
        # every modality and sum pooling with attention is a convex combination.
        h = h * torch.softmax(scores, dim=-1).unsqueeze(-1)
    return mlp(params["mlp"], pool_set(h, cfg.pooling), act=cfg.act)
