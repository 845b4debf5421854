"""FLAVA: image, text and multimodal encoders with contrastive, masked (MLM, MIM, MMM) and
matching (ITM) pretraining, and a converter from TorchMultimodal's ``flava_model``."""

from models.flava.config import FLAVAConfig, flava_model, flava_tiny
from models.flava.convert import from_torchmultimodal, tmm_rules, to_torchmultimodal
from models.flava.heads import init_heads, init_itm_head, init_masked_head, itm_head, masked_head
from models.flava.model import (
    Encoded,
    apply,
    embed_image,
    embed_text,
    encode_image,
    encode_multimodal,
    encode_text,
    init,
    init_model,
    pooler,
    project_image,
    project_text,
)
from models.flava.pretrain import (
    TASKS,
    Masks,
    PretrainConfig,
    draw_masks,
    mim_targets,
    pretraining_loss,
    random_codebook_tokenizer,
    task_losses,
)

PRESETS = {"flava_model": flava_model, "flava_tiny": flava_tiny}

__all__ = [
    "PRESETS",
    "TASKS",
    "Encoded",
    "FLAVAConfig",
    "Masks",
    "PretrainConfig",
    "apply",
    "draw_masks",
    "embed_image",
    "embed_text",
    "encode_image",
    "encode_multimodal",
    "encode_text",
    "flava_model",
    "flava_tiny",
    "from_torchmultimodal",
    "init",
    "init_heads",
    "init_itm_head",
    "init_masked_head",
    "init_model",
    "itm_head",
    "masked_head",
    "mim_targets",
    "pooler",
    "pretraining_loss",
    "project_image",
    "project_text",
    "random_codebook_tokenizer",
    "task_losses",
    "tmm_rules",
    "to_torchmultimodal",
]
