"""Omnivore: one Swin-3D encoder for images, videos and RGB-D maps, one head per dataset.

``FAMILY`` is its contract (:class:`models.family.Family`): presets at Swin-T/S/B sizes
and a tiny one, ``init``, the joint classification ``loss`` over every head's modality, the
batch it reads, and the converter from TorchMultimodal's ``omnivore_swin_*`` state dicts.
"""

from models.family import Converter, Family
from models.omnivore.config import (
    OmnivoreConfig,
    omnivore_shapes,
    omnivore_swin_b,
    omnivore_swin_s,
    omnivore_swin_t,
    omnivore_tiny,
)
from models.omnivore.convert import from_torchmultimodal, to_torchmultimodal
from models.omnivore.model import batch_fields, classify, encode, init, loss

PRESETS = {
    "omnivore_swin_t": omnivore_swin_t,
    "omnivore_swin_s": omnivore_swin_s,
    "omnivore_swin_b": omnivore_swin_b,
    "omnivore_tiny": omnivore_tiny,
    "omnivore_shapes": omnivore_shapes,
}

FAMILY = Family(
    name="omnivore",
    config=OmnivoreConfig,
    presets=PRESETS,
    init=init,
    loss=loss,
    batch=batch_fields,
    converters={"torchmultimodal": Converter(from_=from_torchmultimodal, to=to_torchmultimodal)},
    doc="one Swin-3D encoder for images, videos and depth (Omnivore), a head per dataset",
)

__all__ = [
    "FAMILY",
    "PRESETS",
    "OmnivoreConfig",
    "batch_fields",
    "classify",
    "encode",
    "from_torchmultimodal",
    "init",
    "loss",
    "omnivore_shapes",
    "omnivore_swin_b",
    "omnivore_swin_s",
    "omnivore_swin_t",
    "omnivore_tiny",
    "to_torchmultimodal",
]
