"""Boxes and the set-prediction losses of DETR-style detectors (MDETR).

A box is 4 numbers on the last axis, either ``cxcywh`` (centre, width, height: what the
models predict, in ``[0, 1]`` of the image) or ``xyxy`` (corners ``x0 < x1``, ``y0 < y1``:
what areas and overlaps are computed on). Every geometric function broadcasts over the
leading axes, so pairwise tables are ``f(a[:, None], b[None])`` and matched pairs are
``f(a, b)``: one implementation serves the matcher's cost and the loss.

The losses take a matching as a tensor, ``query_of [B, T]`` (the query each target box was
assigned to, -1 for padding targets), from :func:`fmm.matching.match`, and stay pure
tensor code with fixed shapes (no per-example Python lists), so they compile into the step.

Example::

    giou = generalized_iou(cxcywh_to_xyxy(pred[:, :, None]), cxcywh_to_xyxy(tgt[:, None]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` centre-size boxes -> corner boxes ``[..., 4]``."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` corner boxes -> centre-size boxes ``[..., 4]`` (inverse of the above)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of corner boxes ``[..., 4]`` -> ``[...]``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _intersection_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.maximum(a[..., :2], b[..., :2])
    hi = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    return inter, box_area(a) + box_area(b) - inter


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of corner boxes ``a``, ``b`` (broadcast ``[..., 4]``) -> ``[...]``."""
    inter, union = _intersection_union(a, b)
    return inter / union


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU (Rezatofighi et al. 2019) of corner boxes, broadcast ``[..., 4]`` ->
    ``[...]``: ``IoU - (C - U) / C`` with ``C`` the area of the smallest box enclosing both.

    In ``[-1, 1]``, symmetric, 1 exactly for identical boxes, and equal to the IoU when
    the enclosing box is the union (one box contains the other). Boxes must have
    positive area (the matcher's ``x1 > x0`` holds for a sigmoid-predicted ``w, h > 0``).
    """
    inter, union = _intersection_union(a, b)
    lo = torch.minimum(a[..., :2], b[..., :2])
    hi = torch.maximum(a[..., 2:], b[..., 2:])
    enclosing = (hi - lo).clamp(min=0).prod(-1)
    return inter / union - (enclosing - union) / enclosing


def assignment(query_of: torch.Tensor, queries: int) -> torch.Tensor:
    """The matching as a 0/1 table: ``query_of: [B, T]`` (-1 = no target) ->
    ``[B, queries, T]`` float, 1 where query ``q`` was assigned target ``t``."""
    slots = torch.arange(queries, device=query_of.device)
    return (query_of[:, None, :] == slots[None, :, None]).float()


def _matched(values: torch.Tensor, query_of: torch.Tensor) -> torch.Tensor:
    """``values: [B, Q, D]`` at each target's query -> ``[B, T, D]`` (padding targets read
    query 0 and are masked by the caller)."""
    index = query_of.clamp(min=0)[..., None].expand(-1, -1, values.shape[-1])
    return values.gather(1, index)


def box_losses(
    pred_boxes: torch.Tensor,
    target_boxes: torch.Tensor,
    query_of: torch.Tensor,
    num_boxes: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 and generalised-IoU losses of the matched pairs, each summed over the real
    targets and divided by ``num_boxes`` (DETR's normalisation).

    ``pred_boxes: [B, Q, 4]``, ``target_boxes: [B, T, 4]`` (both ``cxcywh``),
    ``query_of: [B, T]`` (-1 = padding target). Returns ``(l1 [], giou [])``.
    """
    valid = (query_of >= 0).to(pred_boxes.dtype)
    pred = _matched(pred_boxes, query_of)
    l1 = ((pred - target_boxes).abs().sum(-1) * valid).sum() / num_boxes
    giou = generalized_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target_boxes))
    return l1, ((1 - giou) * valid).sum() / num_boxes


def token_targets(token_map: torch.Tensor, classes: int) -> torch.Tensor:
    """Each target's distribution over the ``classes`` logits of the soft-token head:
    uniform over its tokens. ``token_map: [B, T, S]`` bool (target ``t`` is named by token
    ``s``), ``S < classes`` -> ``[B, T, classes]`` (the last logit, "no object", gets 0)."""
    m = token_map.float()
    m = m / m.sum(-1, keepdim=True).clamp(min=1)
    return F.pad(m, (0, classes - m.shape[-1]))


def soft_token_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    query_of: torch.Tensor,
    num_boxes: torch.Tensor | float,
    *,
    no_object_weight: float = 0.1,
) -> torch.Tensor:
    """MDETR's soft-token prediction loss: cross-entropy of each query's ``logits [B, Q, C]``
    against its matched target's token distribution ``targets [B, T, C]``
    (:func:`token_targets`), or against the last class ("no object") for unmatched
    queries, whose terms weigh ``no_object_weight``. Summed, divided by ``num_boxes``.
    """
    a = assignment(query_of, logits.shape[1])  # [B, Q, T]
    matched = a.sum(-1)  # [B, Q]: 1 for a matched query
    no_object = torch.zeros_like(logits[0, 0])
    no_object[-1] = 1
    want = a @ targets + (1 - matched)[..., None] * no_object
    nll = -(logits.log_softmax(-1) * want).sum(-1)
    weight = matched + (1 - matched) * no_object_weight
    return (nll * weight).sum() / num_boxes


def contrastive_alignment_loss(
    queries: torch.Tensor,
    tokens: torch.Tensor,
    token_map: torch.Tensor,
    query_of: torch.Tensor,
    num_boxes: torch.Tensor | float,
    *,
    temperature: float = 0.07,
) -> torch.Tensor:
    """MDETR's contrastive alignment loss between unit query embeddings ``queries [B, Q, D]``
    and unit token embeddings ``tokens [B, S, D]``: a query matched to a target is pulled
    toward the tokens naming it and pushed from every token; a token named by a matched
    target likewise toward its queries. ``token_map: [B, T, S]`` bool, ``query_of: [B, T]``.

    For each query with positives ``P``: ``-mean_{s in P} l[q, s] + logsumexp_s l[q, s]``
    with ``l = queries @ tokens^T / temperature``; the same per token over queries; the two
    sums averaged and divided by ``num_boxes``. As MDETR, every token (padding too) is in
    the normaliser.
    """
    logits = queries @ tokens.transpose(-1, -2) / temperature  # [B, Q, S]
    positive = (assignment(query_of, queries.shape[1]) @ token_map.float()) > 0
    pos_logits = logits.masked_fill(~positive, 0)

    def direction(dim: int) -> torch.Tensor:
        count = positive.sum(dim)
        term = -pos_logits.sum(dim) / (count + 1e-6) + logits.logsumexp(dim)
        return term.masked_fill(count == 0, 0).sum()

    return (direction(2) + direction(1)) / 2 / num_boxes
