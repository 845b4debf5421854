"""ALBEF ("Align before Fuse"): ViT and BERT encoders aligned contrastively with momentum
distillation, fused by a cross-attention encoder with ITM, MLM, retrieval and VQA heads.
Momentum encoders and feature queues are explicit state (:mod:`models.albef.state`).

``FAMILY`` is its contract (:class:`models.family.Family`): presets, ``init``, one ``loss``
for pretraining and VQA (``batch(cfg, task=...)`` says which fields), the momentum
encoders and queues as ``init_state`` / ``update_state``, the TorchMultimodal converter, the
memory-planner layout (of a pretraining step) and the retrieval embeddings.
"""

from models.albef.config import ALBEFConfig, albef_base, albef_tiny, with_answers
from models.albef.convert import from_torchmultimodal, to_torchmultimodal
from models.albef.layout import plan
from models.albef.losses import (
    hard_negatives,
    itc_loss,
    itc_similarities,
    itm_loss,
    positive_targets,
    sample_categorical,
)
from models.albef.model import (
    MOMENTUM_PARTS,
    apply,
    embed_image,
    embed_text,
    encode_image,
    encode_text,
    fuse,
    image_embedding,
    image_shape,
    init,
    itm_logits,
    logit_scale,
    mlm_logits,
    rank_texts,
    temperature,
    text_embedding,
    vqa,
    vqa_logits,
)
from models.albef.objective import TASKS, batch_fields, loss
from models.albef.state import (
    check_state,
    enqueue,
    init_momentum,
    init_queue,
    init_state,
    momentum_features,
    momentum_update,
    update_state,
)
from models.family import Converter, Family, Serving

PRESETS = {"albef_base": albef_base, "albef_tiny": albef_tiny}

FAMILY = Family(
    name="albef",
    config=ALBEFConfig,
    presets=PRESETS,
    init=init,
    loss=loss,
    batch=batch_fields,
    loss_extras=("state",),
    init_state=init_state,
    update_state=update_state,
    converters={
        "torchmultimodal": Converter(from_=from_torchmultimodal, to=to_torchmultimodal),
    },
    plan=plan,
    serving=Serving(
        embed_text=embed_text,
        embed_image=embed_image,
        logit_scale=logit_scale,
        image_shape=image_shape,
    ),
    doc="align before fuse: momentum-distilled contrast, fused matching, MLM, VQA (ALBEF)",
)

__all__ = [
    "FAMILY",
    "MOMENTUM_PARTS",
    "PRESETS",
    "TASKS",
    "ALBEFConfig",
    "albef_base",
    "albef_tiny",
    "apply",
    "batch_fields",
    "check_state",
    "embed_image",
    "embed_text",
    "encode_image",
    "encode_text",
    "enqueue",
    "from_torchmultimodal",
    "fuse",
    "hard_negatives",
    "image_embedding",
    "image_shape",
    "init",
    "init_momentum",
    "init_queue",
    "init_state",
    "itc_loss",
    "itc_similarities",
    "itm_logits",
    "itm_loss",
    "logit_scale",
    "loss",
    "mlm_logits",
    "momentum_features",
    "momentum_update",
    "plan",
    "positive_targets",
    "rank_texts",
    "sample_categorical",
    "temperature",
    "text_embedding",
    "to_torchmultimodal",
    "update_state",
    "vqa",
    "vqa_logits",
    "with_answers",
]
