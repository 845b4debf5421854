"""VideoGPT: a 3-d conv VQ-VAE turning clips into code grids, and a GPT over those codes
conditioned on a caption (TorchMultimodal's ``video_vqvae`` and ``MultimodalGPT``, MUGEN's
text -> video).

Two contracts (:class:`models.family.Family`): ``VQVAE_FAMILY`` (``video_vqvae``: the
reconstruction loss with the EMA codebook and batch-norm statistics as train state) and
``FAMILY`` (``videogpt``: caption -> codes loss and cached decoding through
:mod:`fmm.decoding`), each with converters from TorchMultimodal's state dicts.
"""

from models.family import Converter, Family
from models.videogpt.config import (
    VideoGPTConfig,
    VideoVQVAEConfig,
    video_vqvae_shapes,
    video_vqvae_tiny,
    videogpt_shapes,
    videogpt_tiny,
)
from models.videogpt.convert import (
    gpt_from_torchmultimodal,
    gpt_to_torchmultimodal,
    vqvae_from_torchmultimodal,
    vqvae_state_from_torchmultimodal,
    vqvae_to_torchmultimodal,
)
from models.videogpt.gpt import apply, broadcast_positions, decoder_spec, generate_codes
from models.videogpt.gpt import batch_fields as gpt_batch_fields
from models.videogpt.gpt import init as init_gpt
from models.videogpt.gpt import loss as gpt_loss
from models.videogpt.vqvae import apply as apply_vqvae
from models.videogpt.vqvae import batch_fields as vqvae_batch_fields
from models.videogpt.vqvae import decode, encode, init_state, update_state
from models.videogpt.vqvae import init as init_vqvae
from models.videogpt.vqvae import loss as vqvae_loss

VQVAE_PRESETS = {"video_vqvae_shapes": video_vqvae_shapes, "video_vqvae_tiny": video_vqvae_tiny}
PRESETS = {"videogpt_shapes": videogpt_shapes, "videogpt_tiny": videogpt_tiny}

VQVAE_FAMILY = Family(
    name="video_vqvae",
    config=VideoVQVAEConfig,
    presets=VQVAE_PRESETS,
    init=init_vqvae,
    loss=vqvae_loss,
    batch=vqvae_batch_fields,
    loss_extras=("state",),
    init_state=init_state,
    update_state=update_state,
    converters={
        "torchmultimodal": Converter(from_=vqvae_from_torchmultimodal, to=vqvae_to_torchmultimodal)
    },
    doc="video tokenizer: 3-d conv VQ-VAE with axial attention and an EMA codebook",
)

FAMILY = Family(
    name="videogpt",
    config=VideoGPTConfig,
    presets=PRESETS,
    init=init_gpt,
    loss=gpt_loss,
    batch=gpt_batch_fields,
    decoder_spec=decoder_spec,
    converters={
        "torchmultimodal": Converter(from_=gpt_from_torchmultimodal, to=gpt_to_torchmultimodal)
    },
    doc="caption -> video codes with a decoder-only transformer (VideoGPT / MUGEN)",
)

__all__ = [
    "FAMILY",
    "PRESETS",
    "VQVAE_FAMILY",
    "VQVAE_PRESETS",
    "VideoGPTConfig",
    "VideoVQVAEConfig",
    "apply",
    "apply_vqvae",
    "broadcast_positions",
    "decode",
    "decoder_spec",
    "encode",
    "generate_codes",
    "gpt_batch_fields",
    "gpt_from_torchmultimodal",
    "gpt_loss",
    "gpt_to_torchmultimodal",
    "init_gpt",
    "init_state",
    "init_vqvae",
    "update_state",
    "video_vqvae_shapes",
    "video_vqvae_tiny",
    "videogpt_shapes",
    "videogpt_tiny",
    "vqvae_batch_fields",
    "vqvae_from_torchmultimodal",
    "vqvae_loss",
    "vqvae_state_from_torchmultimodal",
    "vqvae_to_torchmultimodal",
]
