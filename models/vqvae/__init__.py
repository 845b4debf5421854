"""VQ-VAE: a conv autoencoder with an EMA-learned codebook, turning images into code grids."""

from models.vqvae.config import VQVAEConfig, vqvae_shapes, vqvae_shapes_4x4
from models.vqvae.model import (
    apply,
    decode,
    decode_latents,
    encode,
    encode_latents,
    init,
    init_codebook_state,
    loss,
    update_codebook,
)

PRESETS = {"vqvae_shapes": vqvae_shapes, "vqvae_shapes_4x4": vqvae_shapes_4x4}

__all__ = [
    "PRESETS",
    "VQVAEConfig",
    "apply",
    "decode",
    "decode_latents",
    "encode",
    "encode_latents",
    "init",
    "init_codebook_state",
    "loss",
    "update_codebook",
    "vqvae_shapes",
    "vqvae_shapes_4x4",
]
