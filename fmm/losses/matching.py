"""Image-text matching (ITM): a binary classifier over fused pairs, and pure negative
sampling that never syncs with the host.

A matching head maps a fused pair to two logits ``[no match, match]``; labels are 1 for a
true pair and 0 for a negative. Negatives are built by pairing example ``i`` with
example ``(i + shift_i) % B`` for a random ``shift_i`` in ``[1, B)``, so an example is
never its own negative and the permutation is a tensor computed on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmm import random


def matching_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits: [B, 2]`` (no match, match) against ``labels: [B]`` in
    ``{0, 1}``. Returns a 0-d loss.

    Symmetric in the classes: swapping the two logit columns and flipping every label
    gives the same loss.

    Example: ``loss = matching_loss(itm_head(fused[:, 0]), labels)``.
    """
    if logits.ndim != 2 or logits.shape[-1] != 2:
        raise ValueError(f"matching_loss: logits must be [batch, 2], got {list(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"matching_loss: labels must be [batch] = [{logits.shape[0]}], got {list(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"matching_loss: labels must be integers, got {labels.dtype}")
    return F.cross_entropy(logits, labels)


def matching_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Share of pairs whose argmax over ``logits: [B, 2]`` equals ``labels: [B]``. 0-d."""
    return (logits.argmax(-1) == labels).to(logits.dtype).mean()


def negative_pairs(
    key: torch.Tensor, batch: int, rate: float = 0.5, *, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partners for ITM: ``(partner [B] int64, labels [B] int64)``.

    With probability ``rate`` example ``i`` is paired with another example
    ``(i + shift) % batch`` (``shift`` uniform in ``[1, batch)``; label 0), otherwise with
    itself (label 1). Read the second modality as ``text[partner]``. Needs ``batch >= 2``.

    Example::

        partner, itm_labels = negative_pairs(k, B)
        fused = fuse(image_tokens, text_tokens[partner])
    """
    if batch < 2:
        raise ValueError(f"negative_pairs: needs batch >= 2 to draw negatives, got {batch}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"negative_pairs: rate must be in [0, 1], got {rate}")
    device = key.device if device is None else device
    k_neg, k_shift = random.split(key.to(device))
    negative = random.bernoulli(k_neg, rate, (batch,))
    shift = 1 + (random.uniform(k_shift, (batch,)) * (batch - 1)).long().clamp_max(batch - 2)
    index = torch.arange(batch, device=device)
    partner = torch.where(negative, (index + shift) % batch, index)
    return partner, (~negative).long()
