"""The texts and batches of ``python -m train blip2``'s phases on the shapes world.

One tokenizer holds the world's caption words and the questions' words, since the LM and the
Q-Former read the same ids. Texts are captions or, for a ``qa_share`` of single-object
scenes, a question and its answer word ("what colour is the circle red"). Each phase draws
its batch from a ``torch.Generator`` (:class:`train.loop.SeededSource`):

- :func:`lm_batch`: ``queries`` placeholder tokens, then the text (the LM phase),
- :func:`stage_one_batch`: images and captions for the Q-Former (ITC + ITM + ITG),
- :func:`stage_two_batch`: images and texts for the frozen LM behind the queries.
"""

from __future__ import annotations

import dataclasses

import torch

from train.data import WordTokenizer, WorldConfig, sample_scenes, vocabulary
from train.recipes.clip import normalize_images  # as `python -m train clip` trained the tower

TEXT_LEN = 16  # <sot> + the longest caption (12 words) + <eot>, with room
QA_WORDS = ("what", "colour", "shape", "is", "one")


def tokenizer_for(world: WorldConfig) -> WordTokenizer:
    """The world's caption words and the questions' words (one tokenizer for both models)."""
    words = vocabulary(world)
    return WordTokenizer([*words, *(w for w in QA_WORDS if w not in words)])


def question(world: WorldConfig, colour: int, shape: int, about: str) -> tuple[str, str]:
    """``(question, answer word)`` about a scene's object: its colour or its shape."""
    if about == "colour":
        return f"what colour is the {world.shapes[shape]}", world.colors[colour]
    return f"what shape is the {world.colors[colour]} one", world.shapes[shape]


def _texts(world, qa_share: float, generator, batch_size: int):
    """Scenes and texts: a ``qa_share`` of single-object scenes (so a question has one
    answer) with a question and its answer, the rest captioned scenes."""
    n_qa = round(batch_size * qa_share)
    single = dataclasses.replace(world, p_two_objects=0.0)
    qa = sample_scenes(single, n_qa, generator=generator) if n_qa else None
    rest = (
        sample_scenes(world, batch_size - n_qa, generator=generator) if n_qa < batch_size else None
    )
    texts, images = [], []
    if qa is not None:
        about = torch.rand(n_qa, generator=generator) < 0.5
        for c, s, a in zip(qa.colors.tolist(), qa.shapes.tolist(), about.tolist()):
            q, answer = question(world, c, s, "colour" if a else "shape")
            texts.append(f"{q} {answer}")
        images.append(qa.images)
    if rest is not None:
        texts += rest.captions
        images.append(rest.images)
    return torch.cat(images), texts


def lm_batch(world, tokenizer, queries: int, qa_share: float, generator, batch_size: int):
    """The LM phase: ``queries`` placeholder (pad) tokens, then the text; only the text's
    words and <eot> are targets. ``tokens, mask [B, queries + TEXT_LEN]``."""
    _, texts = _texts(world, qa_share, generator, batch_size)
    ids = tokenizer.encode(texts, TEXT_LEN)
    tokens = torch.cat([torch.zeros(batch_size, queries, dtype=ids.dtype), ids], dim=1)
    mask = tokens != tokenizer.pad_id
    mask[:, : queries + 1] = False  # <sot> follows the prefix in stage two: never a target
    return {"tokens": tokens, "mask": mask}


def stage_one_batch(world, tokenizer, generator, batch_size: int):
    """Stage one: captioned scenes, ``images`` and Q-Former ``tokens`` (<sot> as [CLS])."""
    scenes = sample_scenes(world, batch_size, generator=generator)
    return {
        "images": normalize_images(scenes.images),
        "tokens": tokenizer.encode(scenes.captions, TEXT_LEN),
    }


def stage_two_batch(world, tokenizer, qa_share: float, generator, batch_size: int):
    """Stage two: scenes with captions or question-answer texts as LM ``tokens`` and ``mask``."""
    images, texts = _texts(world, qa_share, generator, batch_size)
    tokens = tokenizer.encode(texts, TEXT_LEN)
    return {
        "images": normalize_images(images),
        "tokens": tokens,
        "mask": tokens != tokenizer.pad_id,
    }
