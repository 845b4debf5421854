"""CLIP: a ViT image tower and a causal text tower trained contrastively.

``clip_video_tiny`` is the same family with a video tower (``CLIPConfig.frames``): clips
against captions, as ``python -m train clip --modality video`` trains it. ``clap_tiny`` and
``clap_vit_b16`` are the family with an audio tower (a ``(frames, mels)`` ``image_size``,
one channel): spectrograms against captions, as ``python -m train clap`` trains it.

``FAMILY`` is its contract (:class:`models.family.Family`): presets, ``init``, the
contrastive ``loss`` (cross-rank ``gather`` injected), the batch it reads, the three
reference layouts' converters, the memory-planner layout and the serving hooks.
"""

from models.clip.config import (
    CLIPConfig,
    clap_tiny,
    clap_vit_b16,
    clip_tiny,
    clip_video_tiny,
    clip_vit_b16,
    clip_vit_b32,
    clip_vit_l14,
)
from models.clip.convert import (
    from_hf,
    from_open_clip,
    from_torchmultimodal,
    to_hf,
    to_open_clip,
    to_torchmultimodal,
)
from models.clip.layout import plan
from models.clip.model import (
    apply,
    batch_fields,
    encode_image,
    encode_text,
    image_features,
    image_shape,
    init,
    logit_scale,
    loss,
    text_features,
)
from models.clip.per_example import detached_embeddings, example_loss
from models.family import Converter, Family, Serving

PRESETS = {
    "clip_vit_b16": clip_vit_b16,
    "clip_vit_b32": clip_vit_b32,
    "clip_vit_l14": clip_vit_l14,
    "clip_tiny": clip_tiny,
    "clip_video_tiny": clip_video_tiny,
    "clap_tiny": clap_tiny,
    "clap_vit_b16": clap_vit_b16,
}

FAMILY = Family(
    name="clip",
    config=CLIPConfig,
    presets=PRESETS,
    init=init,
    loss=loss,
    batch=batch_fields,
    loss_extras=("gather",),
    converters={
        "open_clip": Converter(from_=from_open_clip, to=to_open_clip),
        "hf": Converter(from_=from_hf, to=to_hf),
        "torchmultimodal": Converter(from_=from_torchmultimodal, to=to_torchmultimodal),
    },
    plan=plan,
    serving=Serving(
        embed_text=encode_text,
        embed_image=encode_image,
        logit_scale=logit_scale,
        image_shape=image_shape,
    ),
    doc="contrastive image-text pretraining (OpenAI CLIP, open_clip)",
)

__all__ = [
    "FAMILY",
    "PRESETS",
    "CLIPConfig",
    "apply",
    "batch_fields",
    "clap_tiny",
    "clap_vit_b16",
    "clip_tiny",
    "clip_video_tiny",
    "clip_vit_b16",
    "clip_vit_b32",
    "clip_vit_l14",
    "detached_embeddings",
    "encode_image",
    "encode_text",
    "example_loss",
    "from_hf",
    "from_open_clip",
    "from_torchmultimodal",
    "image_features",
    "image_shape",
    "init",
    "logit_scale",
    "loss",
    "plan",
    "text_features",
    "to_hf",
    "to_open_clip",
    "to_torchmultimodal",
]
