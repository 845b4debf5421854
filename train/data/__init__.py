"""Built-in data: the procedural shapes world and its word-level tokenizer."""

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
from train.data.tokenizer import WordTokenizer

__all__ = [
    "COLOR_RGB",
    "Scenes",
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
