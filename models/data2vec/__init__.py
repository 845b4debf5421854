"""data2vec: one self-supervised objective for images, text and audio (Baevski et al., 2022).

A student on masked input regresses, through a linear head, the average of its EMA
teacher's top-K block outputs (each normalised) on the unmasked input, at the masked
positions only. The teacher is explicit train state (:mod:`models.data2vec.state`), as
ALBEF's momentum encoders are.

``FAMILY`` is its contract (:class:`models.family.Family`): the paper's base sizes per
modality and a tiny preset each, ``init``, the ``loss``, the batch it reads and the
teacher as ``init_state`` / ``update_state``. No reference implementation is a parity
target (TorchMultimodal has no data2vec); see ``docs/data2vec.md``.
"""

from models.data2vec.config import (
    Data2VecConfig,
    data2vec_audio_base,
    data2vec_audio_tiny,
    data2vec_image_base,
    data2vec_image_tiny,
    data2vec_text_base,
    data2vec_text_tiny,
)
from models.data2vec.masking import patch_mask
from models.data2vec.model import encode, features, init, regression_loss, targets
from models.data2vec.objective import INPUTS, batch_fields, loss
from models.data2vec.state import check_state, ema_decay, ema_update, init_state, update_state
from models.family import Family

PRESETS = {
    "data2vec_image_base": data2vec_image_base,
    "data2vec_text_base": data2vec_text_base,
    "data2vec_audio_base": data2vec_audio_base,
    "data2vec_image_tiny": data2vec_image_tiny,
    "data2vec_text_tiny": data2vec_text_tiny,
    "data2vec_audio_tiny": data2vec_audio_tiny,
}

FAMILY = Family(
    name="data2vec",
    config=Data2VecConfig,
    presets=PRESETS,
    init=init,
    loss=loss,
    batch=batch_fields,
    loss_extras=("state",),
    init_state=init_state,
    update_state=update_state,
    doc="self-distillation of top-K teacher layers on masked input, for images, text, audio",
)

__all__ = [
    "FAMILY",
    "INPUTS",
    "PRESETS",
    "Data2VecConfig",
    "batch_fields",
    "check_state",
    "data2vec_audio_base",
    "data2vec_audio_tiny",
    "data2vec_image_base",
    "data2vec_image_tiny",
    "data2vec_text_base",
    "data2vec_text_tiny",
    "ema_decay",
    "ema_update",
    "encode",
    "features",
    "init",
    "init_state",
    "loss",
    "patch_mask",
    "regression_loss",
    "targets",
    "update_state",
]
