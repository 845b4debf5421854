"""Symmetric InfoNCE (CLIP's loss) with a learned log-temperature.

Across ranks, pass ``gather``: a function ``x [B, E] -> (x_all [N, E], offset)`` returning
every rank's rows (with gradients flowing back to this rank's) and the row index where
this rank's rows start. The default is one process: ``(x, 0)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], tuple[torch.Tensor, "int | torch.Tensor"]]

MAX_LOGIT_SCALE = math.log(100.0)


def local_gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The single-process gather: every row is local and starts at 0."""
    return x, 0


def logit_scale_value(
    logit_scale: torch.Tensor, *, max_value: float = MAX_LOGIT_SCALE
) -> torch.Tensor:
    """``exp(min(logit_scale, max_value))``: the clamp is a projection, not an edit of params."""
    return logit_scale.clamp(max=max_value).exp()


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    gather: Gather = local_gather,
    max_logit_scale: float = MAX_LOGIT_SCALE,
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy over matching pairs.

    ``image_embeds``, ``text_embeds``: ``[B, E]`` (unit norm, pair ``i`` matches ``i``);
    ``logit_scale``: 0-d log inverse temperature. Returns a 0-d loss.

    Example::

        loss = contrastive_loss(img, txt, params["logit_scale"])
        g = torch.func.grad(lambda s: contrastive_loss(img, txt, s))(params["logit_scale"])
    """
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            "contrastive_loss: image_embeds and text_embeds must both be [batch, embed], got "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    scale = logit_scale_value(logit_scale, max_value=max_logit_scale)
    all_images, offset = gather(image_embeds)
    all_texts, _ = gather(text_embeds)  # the same gather lays out both alike
    labels = torch.arange(image_embeds.shape[0], device=image_embeds.device) + offset
    image_to_text = scale * image_embeds @ all_texts.T
    text_to_image = scale * text_embeds @ all_images.T
    return 0.5 * (F.cross_entropy(image_to_text, labels) + F.cross_entropy(text_to_image, labels))
