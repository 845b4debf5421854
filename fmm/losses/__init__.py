"""Pure losses: no in-place edits of params, distributed gathers passed in as functions."""

from fmm.losses.contrastive import (
    MAX_LOGIT_SCALE,
    contrastive_loss,
    local_gather,
    logit_scale_value,
)
from fmm.losses.masked import (
    IGNORE,
    mask_tokens,
    masked_accuracy,
    masked_cross_entropy,
    random_mask,
)
from fmm.losses.matching import matching_accuracy, matching_loss, negative_pairs
from fmm.losses.vq import commitment_loss, reconstruction_loss

__all__ = ["MAX_LOGIT_SCALE", "contrastive_loss", "local_gather", "logit_scale_value"]
__all__ += ["commitment_loss", "reconstruction_loss"]
__all__ += ["IGNORE", "mask_tokens", "masked_accuracy", "masked_cross_entropy", "random_mask"]
__all__ += ["matching_accuracy", "matching_loss", "negative_pairs"]
