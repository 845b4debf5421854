"""Masked prediction: choose positions to hide with an explicit key, then score the
predictions at those positions only (BERT's MLM, BEiT/FLAVA's MIM, FLAVA's MMM).

Labels use ``ignore_index`` (``-1`` by default) at positions that were not masked, so a
batch is a dense ``[batch, seq]`` tensor and nothing indexes by a data-dependent mask:
the loss compiles without graph breaks and never syncs with the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmm import random

IGNORE = -1


def masked_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE
) -> torch.Tensor:
    """Mean cross-entropy over the positions whose label is not ``ignore_index``.

    ``logits: [..., classes]``, ``labels: [...]`` (int64). Returns a 0-d loss; a batch with
    no scored position gives exactly 0 (not NaN), so a rare empty mask cannot poison a run.

    Example::

        loss = masked_cross_entropy(head(hidden), labels)  # hidden [B, S, D], labels [B, S]
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"masked_cross_entropy: logits {list(logits.shape)} must be labels' shape "
            f"{list(labels.shape)} plus a class axis"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"masked_cross_entropy: labels must be integers, got {labels.dtype}")
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    count = (flat_labels != ignore_index).sum().clamp_min(1)
    return total / count.to(total.dtype)


def masked_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE
) -> torch.Tensor:
    """Share of scored positions (label != ``ignore_index``) whose argmax is the label.
    ``logits: [..., classes]``, ``labels: [...]``. Returns a 0-d tensor (0 if none)."""
    scored = labels != ignore_index
    hits = ((logits.argmax(-1) == labels) & scored).sum()
    return hits.to(logits.dtype) / scored.sum().clamp_min(1).to(logits.dtype)


def random_mask(
    key: torch.Tensor, shape: tuple[int, ...], rate: float, *, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool ``shape`` mask, each position True with probability ``rate`` where ``allowed``
    (bool, broadcastable to ``shape``; default everywhere). Pure in ``key``.

    Example: ``hide = random_mask(k, (B, S), 0.15, allowed=tokens > 2)``.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"random_mask: rate must be in [0, 1], got {rate}")
    mask = random.bernoulli(key, rate, shape)
    return mask if allowed is None else mask & allowed.bool()


def mask_tokens(
    key: torch.Tensor,
    ids: torch.Tensor,
    *,
    rate: float,
    mask_id: int,
    allowed: torch.Tensor | None = None,
    ignore_index: int = IGNORE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide tokens for masked modelling: ``ids: [B, S]`` int64 -> ``(masked_ids, labels)``.

    Each position where ``allowed`` (bool ``[B, S]``, e.g. not padding or special tokens)
    is replaced by ``mask_id`` with probability ``rate``; ``labels`` hold the original id
    there and ``ignore_index`` elsewhere. (Always the mask token: BERT's 10% random / 10%
    kept replacements do not help models this small.)

    Example: ``masked, labels = mask_tokens(k, tokens, rate=0.15, mask_id=V, allowed=tokens > 2)``.
    """
    if ids.ndim != 2:
        raise ValueError(f"mask_tokens: ids must be [batch, seq], got {list(ids.shape)}")
    if allowed is not None and allowed.shape != ids.shape:
        raise ValueError(
            f"mask_tokens: allowed {list(allowed.shape)} must have the shape of ids {list(ids.shape)}"
        )
    hide = random_mask(key, tuple(ids.shape), rate, allowed=allowed)
    masked = torch.where(hide, torch.full_like(ids, mask_id), ids)
    labels = torch.where(hide, ids, torch.full_like(ids, ignore_index))
    return masked, labels
