"""BLIP-2: a Q-Former (learned queries sharing self-attention with the text, cross-attending
to a frozen image encoder every other layer) trained in stage one by image-text contrast,
matching on hard negatives and image-grounded generation, and in stage two as the bridge
into a frozen decoder LM (fmm's GPT) whose prefix the projected queries become.

``FAMILY`` is its contract (:class:`models.family.Family`): presets, ``init``, one ``loss``
for both stages (``cfg.stage``), the batch it reads and the TorchMultimodal converter.
"""

from models.blip2.config import (
    Blip2Config,
    blip2_gpt_tiny,
    blip2_tiny,
    blip2_vit_g,
    blip2_vit_g_gpt2,
)
from models.blip2.convert import (
    from_torchmultimodal,
    qformer_from_torchmultimodal,
    qformer_rules,
    to_torchmultimodal,
)
from models.blip2.model import (
    FROZEN_PARTS,
    block_mask,
    caption_logits,
    clm_logits,
    decoder_ids,
    embed_image,
    embed_text,
    encode_image,
    init,
    itm_logits,
    multimodal_causal_mask,
    qformer,
    temperature,
)
from models.blip2.objective import (
    batch_fields,
    itc_loss,
    itc_similarities,
    itg_loss,
    loss,
    stage_one_losses,
    stage_one_mask,
    stage_two_loss,
)
from models.family import Converter, Family

PRESETS = {
    "blip2_vit_g": blip2_vit_g,
    "blip2_vit_g_gpt2": blip2_vit_g_gpt2,
    "blip2_tiny": blip2_tiny,
    "blip2_gpt_tiny": blip2_gpt_tiny,
}

FAMILY = Family(
    name="blip2",
    config=Blip2Config,
    presets=PRESETS,
    init=init,
    loss=loss,
    batch=batch_fields,
    converters={
        "torchmultimodal": Converter(from_=from_torchmultimodal, to=to_torchmultimodal),
    },
    doc="a Q-Former bridging a frozen image encoder and a frozen LM (BLIP-2, both stages)",
)

__all__ = [
    "FAMILY",
    "FROZEN_PARTS",
    "PRESETS",
    "Blip2Config",
    "batch_fields",
    "blip2_gpt_tiny",
    "blip2_tiny",
    "blip2_vit_g",
    "blip2_vit_g_gpt2",
    "block_mask",
    "caption_logits",
    "clm_logits",
    "decoder_ids",
    "embed_image",
    "embed_text",
    "encode_image",
    "from_torchmultimodal",
    "init",
    "itc_loss",
    "itc_similarities",
    "itg_loss",
    "itm_logits",
    "loss",
    "multimodal_causal_mask",
    "qformer",
    "qformer_from_torchmultimodal",
    "qformer_rules",
    "stage_one_losses",
    "stage_one_mask",
    "stage_two_loss",
    "temperature",
    "to_torchmultimodal",
]
