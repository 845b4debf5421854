"""Layer normalisation over the last axis, batch norm and group norm over channels."""

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


def init_batch_norm(
    channels: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Params:
    """``{"weight": ones, "bias": zeros, "running_mean": zeros, "running_var": ones}``, each
    ``[channels]`` (``nn.BatchNorm*d``'s state dict without its batch counter). The running
    statistics are leaves no gradient reaches: :func:`update_running_stats` sets them."""
    return {
        **init_layer_norm(channels, device=device, dtype=dtype),
        "running_mean": torch.zeros(channels, dtype=dtype, device=device),
        "running_var": torch.ones(channels, dtype=dtype, device=device),
    }


def batch_norm(params: Params, x: torch.Tensor, *, train: bool, eps: float = 1e-5) -> torch.Tensor:
    """Normalise ``x: [B, C, ...]`` per channel: by this batch's statistics when ``train``,
    else by the running ones. Pure: the running statistics are read, never written."""
    p = params
    if train:
        # No running tensors given, so nothing is updated in place.
        return F.batch_norm(x, None, None, p["weight"], p["bias"], training=True, eps=eps)
    return F.batch_norm(
        x, p["running_mean"], p["running_var"], p["weight"], p["bias"], training=False, eps=eps
    )


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased variance of ``x: [B, C, ...]``: two ``[C]`` tensors."""
    dims = [0, *range(2, x.ndim)]
    return x.mean(dims), x.var(dims, correction=1)


def update_running_stats(
    params: Params, mean: torch.Tensor, var: torch.Tensor, *, momentum: float = 0.1
) -> Params:
    """New batch-norm params with running statistics moved ``momentum`` of the way to
    ``mean``, ``var`` (``[C]``, from :func:`batch_statistics`), as ``nn.BatchNorm``'s update."""
    return {
        **params,
        "running_mean": torch.lerp(
            params["running_mean"], mean.to(params["running_mean"]), momentum
        ),
        "running_var": torch.lerp(params["running_var"], var.to(params["running_var"]), momentum),
    }


def init_group_norm(
    channels: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Params:
    """``{"weight": ones[channels], "bias": zeros[channels]}`` (``nn.GroupNorm``'s state dict)."""
    return init_layer_norm(channels, device=device, dtype=dtype)


def group_norm(params: Params, x: torch.Tensor, *, groups: int, eps: float = 1e-5) -> torch.Tensor:
    """Normalise ``x: [B, C, ...]`` over each of ``groups`` groups of ``C // groups`` channels
    (and every spatial position), then scale and shift per channel. Returns ``x``'s shape and
    dtype.

    The statistics are taken in at least float32 (float64 stays float64): a group spans
    ``C / groups * H * W`` values, too many to sum in half precision (TorchMultimodal's
    ``Fp32GroupNorm`` does the same, but casts float64 down too).

    Example: ``group_norm(init_group_norm(64), torch.rand(2, 64, 8, 8), groups=32)``.
    """
    if x.ndim < 2 or x.shape[1] % groups:
        raise ValueError(
            f"group_norm: x must be [batch, C, ...] with C divisible by groups={groups}, "
            f"got {list(x.shape)}"
        )
    w, b = params["weight"], params.get("bias")
    work = torch.promote_types(x.dtype, torch.float32)
    w, b = w.to(work), None if b is None else b.to(work)
    if torch.compiler.is_compiling() and x.ndim > 2:
        return _group_norm_by_channel(x.to(work), w, b, groups, eps).to(x.dtype)
    return F.group_norm(x.to(work), groups, w, b, eps).to(x.dtype)


def _group_norm_by_channel(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, groups: int, eps: float
) -> torch.Tensor:
    """``F.group_norm`` from per-channel statistics, for compiled graphs.

    Inductor lays a CPU graph with convolutions out channels-last, where its own group norm
    reduces each group's few channels with mostly-masked vectors (3-6x slower than
    contiguous); reductions per channel vectorise across channels instead. The per-channel
    means become group means through a ``[C, C]`` averaging matmul rather than a reshape,
    whose ``c // r`` broadcast inductor would fuse into the elementwise loops unvectorised.
    Two passes (the mean, then the mean squared deviation), as the exact variance.
    """
    batch, c = x.shape[:2]
    dims, ones = tuple(range(2, x.ndim)), (1,) * (x.ndim - 2)
    group = torch.arange(c, device=x.device) // (c // groups)
    average = (group[:, None] == group[None, :]).to(x.dtype) / (c // groups)
    centred = x - (x.mean(dims) @ average).view(batch, c, *ones)
    var = centred.square().mean(dims) @ average
    scale = torch.rsqrt(var + eps) * w
    out = centred * scale.view(batch, c, *ones)
    return out if b is None else out + b.view(c, *ones)
