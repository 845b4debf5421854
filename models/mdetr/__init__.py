"""MDETR: text-modulated detection (a ResNet and RoBERTa into one transformer encoder,
object queries decoded to boxes, token logits and alignment embeddings), Hungarian-matched
losses, and the TorchMultimodal converter.

``FAMILY`` is its contract (:class:`models.family.Family`): presets, ``init``, the
grounding ``loss``, the batch it reads and the TorchMultimodal converter.
"""

from models.family import Converter, Family
from models.mdetr.config import (
    PRESETS,
    MDETRConfig,
    mdetr_resnet50,
    mdetr_resnet101,
    mdetr_tiny,
    roberta_base,
)
from models.mdetr.convert import from_torchmultimodal, tmm_rules, to_torchmultimodal
from models.mdetr.model import (
    apply,
    batch_fields,
    ground,
    init,
    loss,
    match_cost,
    sine_positions,
)

FAMILY = Family(
    name="mdetr",
    config=MDETRConfig,
    presets=PRESETS,
    init=init,
    loss=loss,
    batch=batch_fields,
    converters={"torchmultimodal": Converter(from_=from_torchmultimodal, to=to_torchmultimodal)},
    doc="text-modulated detection (phrase grounding): ResNet + RoBERTa + DETR decoder",
)

__all__ = [
    "FAMILY",
    "PRESETS",
    "MDETRConfig",
    "apply",
    "batch_fields",
    "from_torchmultimodal",
    "ground",
    "init",
    "loss",
    "match_cost",
    "mdetr_resnet50",
    "mdetr_resnet101",
    "mdetr_tiny",
    "roberta_base",
    "sine_positions",
    "tmm_rules",
    "to_torchmultimodal",
]
