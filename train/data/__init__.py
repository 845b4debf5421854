"""Built-in data: the procedural shapes world, its word-level tokenizer, and the CLIP BPE
and BERT WordPiece tokenizers for pretrained text towers."""

from train.data.shapes import (
    COLOR_RGB,
    Scenes,
    WorldConfig,
    class_names,
    eval_set,
    is_holdout,
    prompt_templates,
    sample_scenes,
    scene_stream,
    vocabulary,
)
from train.data.tokenizers import CLIPTokenizer, WordPieceTokenizer, WordTokenizer

__all__ = [
    "COLOR_RGB",
    "CLIPTokenizer",
    "Scenes",
    "WordPieceTokenizer",
    "WordTokenizer",
    "WorldConfig",
    "class_names",
    "eval_set",
    "is_holdout",
    "prompt_templates",
    "sample_scenes",
    "scene_stream",
    "vocabulary",
]
