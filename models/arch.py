"""Generic architectures that take their parts as functions plus params subtrees.

Each part is a pure ``fn(params_subtree, x) -> y``; an architecture wires parts together
and reads ``params = {"encoders": {name: ...}, "fusion": ..., "head": ...}`` (or
``"projections"`` / ``"heads"``). A model family is then a few lines: bind the configs
of its parts with ``functools.partial`` and pass them in. Modalities are mappings read in
sorted-name order, so nothing depends on the order a caller built them in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

Part = Callable[[Any, Any], Any]


def _check_names(
    inputs: Mapping[str, Any], parts: Mapping[str, Any], who: str, what: str
) -> list[str]:
    missing, extra = sorted(set(parts) - set(inputs)), sorted(set(inputs) - set(parts))
    if missing or extra:
        raise ValueError(
            f"{who}: inputs {sorted(inputs)} do not match the {what} {sorted(parts)} "
            f"(missing {missing}, extra {extra})"
        )
    return sorted(parts)


def _check_params(params: Mapping[str, Any], keys: tuple[str, ...], who: str) -> None:
    missing = [k for k in keys if k not in params]
    if missing:
        raise ValueError(f"{who}: params lack {missing}; got keys {sorted(params)}")


def encode_all(
    params: Mapping[str, Any], inputs: Mapping[str, Any], *, encoders: Mapping[str, Part]
) -> dict[str, Any]:
    """``{name: encoders[name](params[name], inputs[name])}`` over sorted names; the input
    and encoder names must match exactly.

    Example: ``encode_all({"image": p}, {"image": x}, encoders={"image": nn.linear})``.
    """
    names = _check_names(inputs, encoders, "encode_all", "encoders")
    for name in names:
        if name not in params:
            raise ValueError(
                f"encode_all: params['encoders'] has no {name!r}; got {sorted(params)}"
            )
    return {name: encoders[name](params[name], inputs[name]) for name in names}


def late_fusion(
    params: Mapping[str, Any],
    inputs: Mapping[str, Any],
    *,
    encoders: Mapping[str, Part],
    fusion: Part,
    head: Part,
) -> Any:
    """Encoders -> fusion -> head. ``inputs: {name: x_name}``; each encoder maps its input to
    ``[batch, dim_name]``, ``fusion`` maps ``{name: [batch, dim_name]}`` to ``[batch, d]`` and
    ``head`` maps that to the output (e.g. logits ``[batch, classes]``).

    ``params = {"encoders": {name: ...}, "fusion": ..., "head": ...}``.

    Example::

        logits = late_fusion(params, {"image": images, "text": tokens},
                             encoders={"image": enc_img, "text": enc_txt},
                             fusion=partial(fusion.concat, cfg=fcfg), head=nn.linear)
    """
    _check_params(params, ("encoders", "fusion", "head"), "late_fusion")
    features = encode_all(params["encoders"], inputs, encoders=encoders)
    return head(params["head"], fusion(params["fusion"], features))


def two_tower(
    params: Mapping[str, Any],
    inputs: Mapping[str, Any],
    *,
    encoders: Mapping[str, Part],
    projections: Mapping[str, Part] | None = None,
    rows: str | None = None,
) -> torch.Tensor:
    """Two encoders -> (optional) projections -> unit-normalised embeddings -> logits
    ``[batch_rows, batch_cols] = exp(logit_scale) * rows @ cols.T``.

    ``rows``: the modality along the logits' rows (default: the first name in sorted order).
    ``params = {"encoders": {a: ..., b: ...}, ["projections": {a: ..., b: ...}],
    "logit_scale": []}`` (the log of the temperature's inverse, as in CLIP).

    Example: ``two_tower(p, {"image": x, "text": t}, encoders=..., rows="image")``.
    """
    _check_params(params, ("encoders", "logit_scale"), "two_tower")
    if len(encoders) != 2:
        raise ValueError(f"two_tower: needs exactly two encoders, got {sorted(encoders)}")
    names = _check_names(inputs, encoders, "two_tower", "encoders")
    if rows is not None and rows not in names:
        raise ValueError(f"two_tower: rows={rows!r} is not one of the modalities {names}")
    first = names[0] if rows is None else rows
    second = names[1] if first == names[0] else names[0]
    features = encode_all(params["encoders"], inputs, encoders=encoders)
    if projections is not None:
        _check_params(params, ("projections",), "two_tower")
        _check_names(features, projections, "two_tower", "projections")
        features = {n: projections[n](params["projections"][n], features[n]) for n in names}
    a, b = (F.normalize(features[n], dim=-1) for n in (first, second))
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"two_tower: embeddings {first!r} {list(a.shape)} and {second!r} {list(b.shape)} "
            "have different widths"
        )
    return params["logit_scale"].exp() * a @ b.T


def fusion_encoder(
    params: Mapping[str, Any],
    inputs: Mapping[str, Any],
    *,
    encoders: Mapping[str, Part],
    fusion: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor],
    query: str,
    context: str,
    heads: Mapping[str, Part],
) -> dict[str, Any]:
    """Encoders -> cross-attention fusion encoder -> heads.

    Each encoder maps its input to tokens ``[batch, seq_name, width_name]``;
    ``fusion(params, query_tokens, context_tokens) -> [batch, seq_query, width]`` (e.g.
    :func:`fmm.fusion.cross_attention_fusion` with its config bound); every head maps the
    fused tokens to its output. Returns ``{head name: output}``.
    ``params = {"encoders": {...}, "fusion": ..., "heads": {name: ...}}``.

    Example: ``fusion_encoder(p, {"image": x, "text": t}, ..., query="text", context="image")``.
    """
    _check_params(params, ("encoders", "fusion", "heads"), "fusion_encoder")
    if query == context or query not in encoders or context not in encoders:
        raise ValueError(
            f"fusion_encoder: query={query!r} and context={context!r} must be two different "
            f"modalities among the encoders {sorted(encoders)}"
        )
    tokens = encode_all(params["encoders"], inputs, encoders=encoders)
    fused = fusion(params["fusion"], tokens[query], tokens[context])
    for name in sorted(heads):
        if name not in params["heads"]:
            raise ValueError(
                f"fusion_encoder: params['heads'] has no {name!r}; got {sorted(params['heads'])}"
            )
    return {name: heads[name](params["heads"][name], fused) for name in sorted(heads)}
