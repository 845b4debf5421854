"""FLAVA as the memory planner (``train.plan``) sees it: five encoder passes, the heads and
the activations outside the blocks."""

from __future__ import annotations

from fmm import random
from models.family import ACT_SAVED, Layout, Stack, plan_seq, without_dropout
from models.flava.config import FLAVAConfig
from models.flava.model import init

# FLAVA's image-text data uses 77-token captions (its VL_MAX_LENGTH_DEFAULT): the planner's
# default text length.
TEXT_TOKENS = 77


def _masked_head(tokens: int, width: int, vocab: int, act: str) -> list[tuple[int, int | None]]:
    # dense output, activation output, norm output (+ float32 stats), log-probabilities
    return [(tokens * width * (ACT_SAVED[act] + 1), None), (2 * tokens, 4), (tokens * vocab, None)]


def plan(cfg: FLAVAConfig, *, seq: int | None = None, train: bool = True) -> Layout:
    """The :class:`models.family.Layout` of one step of :func:`models.flava.loss`: image
    and text encoders twice (plain for the contrastive loss, masked for MLM/MIM/ITM/MMM),
    the multimodal encoder once on the masked pair, and the MLM, MIM and two MMM heads over
    every token. ``seq``: text tokens (default 77, at most ``max_positions``); ``train``:
    count dropout masks.

    Example: ``plan(flava_model()).stacks[0].seq == 197`` (196 patches and a class token).
    """
    if seq is None:
        seq = min(TEXT_TOKENS, cfg.max_positions)
    s_t = plan_seq(seq, cfg.max_positions, "text tokens")
    s_i, d_i, d_t, d_m = cfg.num_patches + 1, cfg.image_width, cfg.text_width, cfg.mm_width
    s_m = 1 + s_i + s_t
    it, tt, mt = (
        t if train else without_dropout(t)
        for t in (cfg.image_transformer, cfg.text_transformer, cfg.mm_transformer)
    )
    stacks = (
        Stack("image", it, s_i), Stack("image masked", it, s_i),
        Stack("text", tt, s_t), Stack("text masked", tt, s_t), Stack("multimodal", mt, s_m),
    )  # fmt: skip
    edges = [
        (cfg.in_channels * cfg.image_size**2, None), (s_i, 1),  # pixels, patch mask
        (4 * s_i * d_i, None), (4 * s_i, 4),  # final norms' inputs and outputs, twice
        (2 * s_t, 8), (s_t, 1), (2 * s_t * d_t, None), (4 * s_t, 4),  # ids, pad mask, embed norms
        (5 * s_t * d_t, None), (4 * s_t, 4),  # final norms, twice; the ITM-shuffled hidden
        (2 * s_m * d_m, None), (2 * s_m, 4),  # the multimodal final norm
        *_masked_head(s_t, d_t, cfg.vocab_size, cfg.act),
        *_masked_head(s_i - 1, d_i, cfg.image_vocab_size, cfg.act),
        *_masked_head(s_t, d_m, cfg.vocab_size, cfg.act),
        *_masked_head(s_i - 1, d_m, cfg.image_vocab_size, cfg.act),
    ]  # fmt: skip
    if train and cfg.dropout > 0:  # a mask on each of the five stacks' inputs
        edges.append((2 * s_i * d_i + 2 * s_t * d_t + s_m * d_m, 1))
    return Layout("flava", init(cfg, random.key(0).to("meta")), stacks, tuple(edges))
