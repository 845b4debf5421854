"""A multimodal GPT: caption tokens then VQ-VAE image tokens, with per-modality embeddings
and heads and a logits mask restricting sampling to the output modality."""

from models.mmgpt.config import MMGPTConfig, mmgpt_shapes
from models.mmgpt.generate import generate_images, image_decoder_spec
from models.mmgpt.model import (
    MODALITIES,
    apply,
    embed_tokens,
    features,
    init,
    loss,
    mask_logits,
    modality_mask,
    output_logits,
    sequence,
)

PRESETS = {"mmgpt_shapes": mmgpt_shapes}

__all__ = [
    "MODALITIES",
    "PRESETS",
    "MMGPTConfig",
    "apply",
    "embed_tokens",
    "features",
    "generate_images",
    "image_decoder_spec",
    "init",
    "loss",
    "mask_logits",
    "mmgpt_shapes",
    "modality_mask",
    "output_logits",
    "sequence",
]
