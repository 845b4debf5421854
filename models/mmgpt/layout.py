"""The multimodal GPT as the memory planner (``train.plan``) sees it: one causal stack over
caption and image tokens, and the activations around it."""

from __future__ import annotations

from fmm import random
from models.family import Layout, Stack, plan_seq, without_dropout
from models.mmgpt.config import MMGPTConfig
from models.mmgpt.model import init


def plan(cfg: MMGPTConfig, *, seq: int | None = None, train: bool = True) -> Layout:
    """The :class:`models.family.Layout` of one caption -> image step over ``seq`` tokens
    (default ``seq_len``: a caption and a whole image); ``train`` counts the dropout masks.

    Example: ``plan(mmgpt_shapes()).stacks[0].seq == 80``.
    """
    s = plan_seq(seq, cfg.seq_len, "caption + image tokens")
    tcfg = cfg.transformer if train else without_dropout(cfg.transformer)
    image = max(s - cfg.text_len + 1, 0)
    edges = [
        (3 * s, 8), (s, 1),  # two clamped id lookups, targets, the modality mask
        (2 * s * cfg.width, None), (2 * s, 4),  # final norm input and output
        (image * cfg.image_vocab, None),  # log-probabilities of the image head
    ]  # fmt: skip
    if cfg.text_loss_weight > 0:
        edges.append((min(s, cfg.text_len) * cfg.text_vocab, None))
    if train and cfg.dropout > 0:
        edges.append((s * cfg.width, 1))
    meta = init(cfg, random.key(0).to("meta"))
    return Layout("mmgpt", meta, (Stack("decoder", tcfg, s),), tuple(edges))
