"""FLAVA: image, text and multimodal encoders with contrastive, masked (MLM, MIM, MMM) and
matching (ITM) pretraining, and a converter from TorchMultimodal's ``flava_model``.

``FAMILY`` is its contract (:class:`models.family.Family`): presets (the published model,
a tiny one, and TorchMultimodal's 1.8B / 10B native-training sizes), ``init``, the
pretraining ``loss`` (cross-rank ``gather`` for the contrastive term), the batch it reads
(MIM targets as ``image_codes``), the TorchMultimodal converter, the planner layout and
the retrieval embeddings.
"""

from models.family import Converter, Family, Serving
from models.flava.config import (
    TASKS,
    FLAVAConfig,
    PretrainConfig,
    flava_1_8b,
    flava_10b,
    flava_model,
    flava_tiny,
)
from models.flava.convert import from_torchmultimodal, tmm_rules, to_torchmultimodal
from models.flava.heads import init_heads, init_itm_head, init_masked_head, itm_head, masked_head
from models.flava.layout import plan
from models.flava.model import (
    apply,
    embed_image,
    embed_text,
    encode_image,
    encode_multimodal,
    encode_text,
    image_shape,
    init,
    init_model,
    logit_scale,
    pooler,
    project_image,
    project_text,
)
from models.flava.pretrain import (
    Masks,
    batch_fields,
    draw_masks,
    loss,
    mim_targets,
    random_codebook_tokenizer,
    task_losses,
)

PRESETS = {
    "flava_model": flava_model,
    "flava_tiny": flava_tiny,
    "flava_1.8b": flava_1_8b,
    "flava_10b": flava_10b,
}

FAMILY = Family(
    name="flava",
    config=FLAVAConfig,
    presets=PRESETS,
    init=init,
    loss=loss,
    batch=batch_fields,
    loss_extras=("gather",),
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
    doc="multi-task image-text pretraining: contrastive, MLM, MIM, ITM, MMM (FLAVA)",
)

__all__ = [
    "FAMILY",
    "PRESETS",
    "TASKS",
    "FLAVAConfig",
    "Masks",
    "PretrainConfig",
    "apply",
    "batch_fields",
    "draw_masks",
    "embed_image",
    "embed_text",
    "encode_image",
    "encode_multimodal",
    "encode_text",
    "flava_1_8b",
    "flava_10b",
    "flava_model",
    "flava_tiny",
    "from_torchmultimodal",
    "image_shape",
    "init",
    "init_heads",
    "init_itm_head",
    "init_masked_head",
    "init_model",
    "itm_head",
    "logit_scale",
    "loss",
    "masked_head",
    "mim_targets",
    "plan",
    "pooler",
    "project_image",
    "project_text",
    "random_codebook_tokenizer",
    "task_losses",
    "tmm_rules",
    "to_torchmultimodal",
]
