"""Checking a ``{name: [batch, dim]}`` mapping of modality features against a config.

Every fusion layer reads its modalities in sorted-name order, so a result never depends
on the order a caller happened to build the mapping in.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def sorted_dims(dims: Mapping[str, int], who: str) -> tuple[tuple[str, int], ...]:
    """``dims`` as ``((name, dim), ...)`` sorted by name, each dim a positive int."""
    if not dims:
        raise ValueError(f"{who}: dims must name at least one modality, got {dict(dims)!r}")
    for name, dim in dims.items():
        if not isinstance(name, str) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{who}: dims[{name!r}] must be a positive int, got {dim!r}")
    return tuple(sorted(dims.items()))


def check_features(
    features: Mapping[str, torch.Tensor], dims: tuple[tuple[str, int], ...], who: str
) -> list[torch.Tensor]:
    """The tensors of ``features`` in the sorted order of ``dims``, after checking that
    exactly the configured modalities are present, each ``[batch, dim_name]``, with one batch."""
    want = {name for name, _ in dims}
    missing, extra = sorted(want - set(features)), sorted(set(features) - want)
    if missing or extra:
        raise ValueError(
            f"{who}: modalities {sorted(features)} do not match the config's {sorted(want)} "
            f"(missing {missing}, extra {extra})"
        )
    out, batch = [], None
    for name, dim in dims:
        x = features[name]
        if x.ndim != 2 or x.shape[1] != dim:
            raise ValueError(
                f"{who}: modality {name!r} has shape {list(x.shape)}, want [batch, {dim}]"
            )
        if batch is not None and x.shape[0] != batch[1]:
            raise ValueError(
                f"{who}: modality {name!r} has batch {x.shape[0]} but {batch[0]!r} has "
                f"{batch[1]} (shapes {list(x.shape)} and {list(features[batch[0]].shape)})"
            )
        batch = batch or (name, x.shape[0])
        out.append(x)
    return out
