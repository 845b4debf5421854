"""CLIP: a ViT image tower and a causal text tower trained contrastively."""

from models.clip.config import CLIPConfig, clip_tiny, clip_vit_b16, clip_vit_b32, clip_vit_l14
from models.clip.model import (
    apply,
    encode_image,
    encode_text,
    image_features,
    init,
    loss,
    text_features,
)
from models.clip.per_example import detached_embeddings, example_loss

PRESETS = {
    "clip_vit_b16": clip_vit_b16,
    "clip_vit_b32": clip_vit_b32,
    "clip_vit_l14": clip_vit_l14,
    "clip_tiny": clip_tiny,
}

__all__ = [
    "PRESETS",
    "CLIPConfig",
    "apply",
    "clip_tiny",
    "clip_vit_b16",
    "clip_vit_b32",
    "clip_vit_l14",
    "detached_embeddings",
    "encode_image",
    "encode_text",
    "example_loss",
    "image_features",
    "init",
    "loss",
    "text_features",
]
