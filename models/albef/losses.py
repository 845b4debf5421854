"""ALBEF's loss terms as pure functions: contrastive with momentum distillation (ITC) and
image-text matching on hard negatives (ITM); :mod:`models.albef.objective` composes them
with masked language modelling into the family's one ``loss``.

The generic pieces come from ``fmm.losses`` (the matching loss); what is ALBEF's own lives
here: the queue-aware contrastive targets, the distillation, and hard negatives mined from
the similarity matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmm import random
from fmm.losses import matching_accuracy, matching_loss


def itc_similarities(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    temp: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image_feat @ text_all.T / temp, text_feat @ image_all.T / temp)``: ``[B, N]`` each,
    for unit features ``[B, E]`` against the momentum batch + queue ``[N, E]``."""
    if image_feat.shape != text_feat.shape or image_all.shape != text_all.shape:
        raise ValueError(
            f"itc_similarities: image_feat {list(image_feat.shape)} / text_feat "
            f"{list(text_feat.shape)} and image_all {list(image_all.shape)} / text_all "
            f"{list(text_all.shape)} must pair up"
        )
    if image_feat.shape[-1] != image_all.shape[-1]:
        raise ValueError(
            f"itc_similarities: features are {image_feat.shape[-1]}-d but the candidates are "
            f"{image_all.shape[-1]}-d"
        )
    return image_feat @ text_all.T / temp, text_feat @ image_all.T / temp


def positive_targets(idx: torch.Tensor, idx_all: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` rows summing to 1: uniform over the candidates whose id equals the row's
    (``idx [B]`` against ``idx_all [N]``; a row always finds itself in ``idx_all[:B]``)."""
    pos = (idx[:, None] == idx_all[None, :]).to(torch.float32)
    return pos / pos.sum(1, keepdim=True)


def itc_loss(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    targets: torch.Tensor,
    *,
    sim_i2t_m: torch.Tensor | None = None,
    sim_t2i_m: torch.Tensor | None = None,
    alpha: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies against soft targets
    ``(1 - alpha) * targets + alpha * softmax(sim_m)`` (momentum distillation; ``alpha`` a
    float or a 0-d tensor, e.g. ramped up over the first steps). All ``[B, N]``;
    returns a 0-d loss, symmetric under swapping the two directions.

    Example: ``itc_loss(s_i2t, s_t2i, torch.eye(B))`` is CLIP's loss at ``alpha=0``.
    """
    if sim_i2t.shape != sim_t2i.shape or targets.shape != sim_i2t.shape:
        raise ValueError(
            f"itc_loss: sim_i2t {list(sim_i2t.shape)}, sim_t2i {list(sim_t2i.shape)} and "
            f"targets {list(targets.shape)} must have one shape"
        )
    t_i2t = t_t2i = targets
    # A tensor alpha (ramped by the caller) always mixes, so no branch reads its value.
    if isinstance(alpha, torch.Tensor) or alpha != 0.0:
        if sim_i2t_m is None or sim_t2i_m is None:
            raise ValueError("sim_i2t_m= and sim_t2i_m= are missing: alpha > 0 needs both")
        t_i2t = alpha * sim_i2t_m.detach().softmax(1) + (1 - alpha) * targets
        t_t2i = alpha * sim_t2i_m.detach().softmax(1) + (1 - alpha) * targets
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * t_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * t_t2i).sum(1).mean()
    return 0.5 * (loss_i2t + loss_t2i)


def sample_categorical(key: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """One index per row of ``logits [B, N]`` drawn with probability ``softmax(logits)``
    (``-inf`` = never), by the Gumbel-max trick: on device, no host sync, reproducible from
    ``key`` (``torch.multinomial`` would draw from the global generator). Returns ``[B]``."""
    u = random.uniform(key, logits.shape, dtype=torch.float32).clamp(1e-12, 1.0 - 1e-7)
    return (logits.float() - torch.log(-torch.log(u))).argmax(dim=1)


def hard_negatives(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, idx: torch.Tensor, key: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF's hard-negative mining within the batch: for each image a text drawn with
    probability ``softmax(sim_i2t)`` and for each text an image by ``softmax(sim_t2i)``, never
    one with the same id. ``sim_*: [B, B]`` (batch columns only), ``idx: [B]``.

    Returns ``(negative text index per image, negative image index per text)``, ``[B]`` each.
    A row with no other id in the batch falls back to a uniform pick among the other rows.
    """
    b = idx.shape[0]
    if b < 2 or sim_i2t.shape != (b, b) or sim_t2i.shape != (b, b):
        raise ValueError(
            f"hard_negatives: need a batch >= 2 and sims [{b}, {b}], got sim_i2t "
            f"{list(sim_i2t.shape)} and sim_t2i {list(sim_t2i.shape)}"
        )
    same = idx[:, None] == idx[None, :]
    eye = torch.eye(b, dtype=torch.bool, device=idx.device)
    fallback = torch.zeros(b, b, device=idx.device).masked_fill(eye, float("-inf"))
    picks = []
    for stream, sim in enumerate((sim_i2t, sim_t2i)):
        logits = sim.detach().float().masked_fill(same, float("-inf"))
        logits = torch.where(same.all(1, keepdim=True), fallback, logits)
        picks.append(sample_categorical(random.fold_in(key, stream), logits))
    return picks[0], picks[1]


def itm_loss(
    pos_logits: torch.Tensor, neg_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matching loss of matched pairs ``pos_logits [B, 2]`` (label 1) and mismatched pairs
    ``neg_logits [N, 2]`` (label 0), averaged over all pairs. Returns ``(loss, accuracy)``."""
    if pos_logits.ndim != 2 or pos_logits.shape[1] != 2 or neg_logits.shape[1:] != (2,):
        raise ValueError(
            f"itm_loss: logits must be [pairs, 2], got pos {list(pos_logits.shape)} and "
            f"neg {list(neg_logits.shape)}"
        )
    logits = torch.cat([pos_logits, neg_logits])
    labels = torch.cat(
        [
            torch.ones(pos_logits.shape[0], dtype=torch.int64, device=logits.device),
            torch.zeros(neg_logits.shape[0], dtype=torch.int64, device=logits.device),
        ]
    )
    return matching_loss(logits, labels), matching_accuracy(logits, labels).detach()
