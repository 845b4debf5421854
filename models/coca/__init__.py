"""CoCa (contrastive captioners): one model that embeds images and captions contrastively
and writes captions, a ViT with an attentional pooler, a causal unimodal text decoder and a
causal multimodal decoder cross-attending the pooled image queries.

``FAMILY`` is its contract (:class:`models.family.Family`): presets, ``init``, the
contrastive + captioning ``loss`` (cross-rank ``gather`` injected), the batch it reads,
cached caption decoding, the TorchMultimodal and open_clip converters and the serving hooks.
"""

from models.coca.config import (
    CoCaConfig,
    coca_tiny,
    coca_vit_b32,
    coca_vit_l14,
    open_clip_style,
)
from models.coca.convert import (
    from_open_clip,
    from_torchmultimodal,
    to_open_clip,
    to_torchmultimodal,
)
from models.coca.generate import decoder_spec, generate_captions
from models.coca.model import (
    Output,
    apply,
    batch_fields,
    caption_logits,
    encode_batch_text,
    encode_image,
    encode_text,
    head,
    image_queries,
    image_shape,
    init,
    logit_scale,
    loss,
)
from models.family import Converter, Family, Serving

PRESETS = {"coca_tiny": coca_tiny, "coca_vit_b32": coca_vit_b32, "coca_vit_l14": coca_vit_l14}

FAMILY = Family(
    name="coca",
    config=CoCaConfig,
    presets=PRESETS,
    init=init,
    loss=loss,
    batch=batch_fields,
    loss_extras=("gather",),
    decoder_spec=decoder_spec,
    converters={
        "torchmultimodal": Converter(from_=from_torchmultimodal, to=to_torchmultimodal),
        "open_clip": Converter(from_=from_open_clip, to=to_open_clip),
    },
    serving=Serving(
        embed_text=encode_batch_text,
        embed_image=encode_image,
        logit_scale=logit_scale,
        image_shape=image_shape,
    ),
    doc="contrastive captioner: image-text embeddings and captions in one model (CoCa)",
)

__all__ = [
    "FAMILY",
    "PRESETS",
    "CoCaConfig",
    "Output",
    "apply",
    "batch_fields",
    "caption_logits",
    "coca_tiny",
    "coca_vit_b32",
    "coca_vit_l14",
    "decoder_spec",
    "encode_batch_text",
    "encode_image",
    "encode_text",
    "from_open_clip",
    "from_torchmultimodal",
    "generate_captions",
    "head",
    "image_queries",
    "image_shape",
    "init",
    "logit_scale",
    "loss",
    "open_clip_style",
    "to_open_clip",
    "to_torchmultimodal",
]
