"""A multimodal GPT: caption tokens then VQ-VAE image tokens, with per-modality embeddings
and heads and a logits mask restricting sampling to the output modality.

``FAMILY`` is its contract (:class:`models.family.Family`): presets, ``init``, the
caption -> image ``loss``, the batch it reads, cached image decoding (text ids masked)
and the memory-planner layout.
"""

from models.family import Family
from models.mmgpt.config import MMGPTConfig, mmgpt_shapes
from models.mmgpt.generate import generate_images, image_decoder_spec
from models.mmgpt.layout import plan
from models.mmgpt.model import (
    MODALITIES,
    apply,
    batch_fields,
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

FAMILY = Family(
    name="mmgpt",
    config=MMGPTConfig,
    presets=PRESETS,
    init=init,
    loss=loss,
    batch=batch_fields,
    decoder_spec=image_decoder_spec,
    plan=plan,
    doc="caption -> image tokens (VQ-VAE codes) with a decoder-only transformer",
)

__all__ = [
    "FAMILY",
    "MODALITIES",
    "PRESETS",
    "MMGPTConfig",
    "apply",
    "batch_fields",
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
    "plan",
    "sequence",
]
