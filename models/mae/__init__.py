"""MAE: masked autoencoders for images and audio spectrograms (He et al.; AudioMAE).

``FAMILY`` is its contract (:class:`models.family.Family`): TorchMultimodal's image
(ViT-B/16, L/16) and audio (ViT-S/B/L-16 with a Swin V2 decoder) presets and a tiny one
per modality, ``init``, the masked-patch reconstruction ``loss``, the batch it reads and
the converters from and to TorchMultimodal's ``MaskedAutoEncoder``.
"""

from models.family import Converter, Family
from models.mae.config import (
    MAEConfig,
    mae_audio_tiny,
    mae_audio_vit_b16,
    mae_audio_vit_l16,
    mae_audio_vit_s16,
    mae_tiny,
    mae_vit_b16,
    mae_vit_l16,
)
from models.mae.convert import from_torchmultimodal, to_torchmultimodal
from models.mae.model import (
    Encoding,
    Reconstruction,
    batch_fields,
    composite,
    encode,
    init,
    loss,
    masked_loss,
    patchify,
    positions,
    reconstruct,
    unpatchify,
)

PRESETS = {
    "mae_vit_b16": mae_vit_b16,
    "mae_vit_l16": mae_vit_l16,
    "mae_audio_vit_s16": mae_audio_vit_s16,
    "mae_audio_vit_b16": mae_audio_vit_b16,
    "mae_audio_vit_l16": mae_audio_vit_l16,
    "mae_tiny": mae_tiny,
    "mae_audio_tiny": mae_audio_tiny,
}

FAMILY = Family(
    name="mae",
    config=MAEConfig,
    presets=PRESETS,
    init=init,
    loss=loss,
    batch=batch_fields,
    converters={"torchmultimodal": Converter(from_=from_torchmultimodal, to=to_torchmultimodal)},
    doc="masked autoencoders for images and spectrograms (MAE, AudioMAE)",
)

__all__ = [
    "FAMILY",
    "PRESETS",
    "Encoding",
    "MAEConfig",
    "Reconstruction",
    "batch_fields",
    "composite",
    "encode",
    "from_torchmultimodal",
    "init",
    "loss",
    "mae_audio_tiny",
    "mae_audio_vit_b16",
    "mae_audio_vit_l16",
    "mae_audio_vit_s16",
    "mae_tiny",
    "mae_vit_b16",
    "mae_vit_l16",
    "masked_loss",
    "patchify",
    "positions",
    "reconstruct",
    "to_torchmultimodal",
    "unpatchify",
]
