"""VQ-VAE: a conv autoencoder with an EMA-learned codebook, turning images into code grids.

``FAMILY`` is its contract (:class:`models.family.Family`): presets, ``init``, the
reconstruction ``loss``, the batch it reads, and the EMA codebook as train state
(``init_state`` / ``update_state`` around :func:`update_codebook`).
"""

from models.family import Family
from models.vqvae.config import VQVAEConfig, vqvae_shapes, vqvae_shapes_4x4
from models.vqvae.model import (
    apply,
    batch_fields,
    decode,
    decode_latents,
    encode,
    encode_latents,
    init,
    init_codebook_state,
    init_state,
    loss,
    update_codebook,
    update_state,
)

PRESETS = {"vqvae_shapes": vqvae_shapes, "vqvae_shapes_4x4": vqvae_shapes_4x4}

FAMILY = Family(
    name="vqvae",
    config=VQVAEConfig,
    presets=PRESETS,
    init=init,
    loss=loss,
    batch=batch_fields,
    loss_extras=("state",),
    init_state=init_state,
    update_state=update_state,
    doc="image tokenizer: conv autoencoder with an EMA codebook (VQ-VAE)",
)

__all__ = [
    "FAMILY",
    "PRESETS",
    "VQVAEConfig",
    "apply",
    "batch_fields",
    "decode",
    "decode_latents",
    "encode",
    "encode_latents",
    "init",
    "init_codebook_state",
    "init_state",
    "loss",
    "update_codebook",
    "update_state",
    "vqvae_shapes",
    "vqvae_shapes_4x4",
]
