"""ALBEF ("Align before Fuse"): ViT and BERT encoders aligned contrastively with momentum
distillation, fused by a cross-attention encoder with ITM, MLM, retrieval and VQA heads.
Momentum encoders and feature queues are explicit state (:mod:`models.albef.state`)."""

from models.albef.config import ALBEFConfig, albef_base, albef_tiny, with_answers
from models.albef.convert import from_tmm, to_tmm
from models.albef.losses import (
    hard_negatives,
    itc_loss,
    itc_similarities,
    itm_loss,
    positive_targets,
    pretrain_loss,
    sample_categorical,
    vqa_loss,
)
from models.albef.model import (
    MOMENTUM_PARTS,
    apply,
    encode_image,
    encode_text,
    fuse,
    image_embedding,
    init,
    itm_logits,
    mlm_logits,
    rank_texts,
    temperature,
    text_embedding,
    vqa,
    vqa_logits,
)
from models.albef.state import (
    enqueue,
    init_momentum,
    init_queue,
    momentum_features,
    momentum_update,
)

PRESETS = {"albef_base": albef_base, "albef_tiny": albef_tiny}

__all__ = [
    "MOMENTUM_PARTS",
    "PRESETS",
    "ALBEFConfig",
    "albef_base",
    "albef_tiny",
    "apply",
    "encode_image",
    "encode_text",
    "enqueue",
    "from_tmm",
    "fuse",
    "hard_negatives",
    "image_embedding",
    "init",
    "init_momentum",
    "init_queue",
    "itc_loss",
    "itc_similarities",
    "itm_logits",
    "itm_loss",
    "mlm_logits",
    "momentum_features",
    "momentum_update",
    "positive_targets",
    "pretrain_loss",
    "rank_texts",
    "sample_categorical",
    "temperature",
    "text_embedding",
    "to_tmm",
    "vqa",
    "vqa_logits",
    "vqa_loss",
    "with_answers",
]
