"""GPT as the memory planner (``train.plan``) sees it: one decoder stack and the
activations around it."""

from __future__ import annotations

from fmm import random
from models.family import Layout, Stack, plan_seq, without_dropout
from models.gpt.config import GPTConfig
from models.gpt.model import init


def plan(cfg: GPTConfig, *, seq: int | None = None, train: bool = True) -> Layout:
    """The :class:`models.family.Layout` of one next-token step over ``seq`` tokens per
    sequence (default ``context_length``); ``train`` counts the dropout masks.

    Example: ``plan(gpt2_small(), seq=512).stacks[0].seq == 512``.
    """
    s = plan_seq(seq, cfg.context_length, "tokens per sequence")
    tcfg = cfg.transformer if train else without_dropout(cfg.transformer)
    edges = [
        (2 * s, 8),  # token ids, targets
        (2 * s * cfg.width, None), (2 * s, 4),  # final norm input and output
        (s * cfg.vocab_size, 4),  # float32 log-probabilities kept by cross-entropy
    ]  # fmt: skip
    if train and cfg.dropout > 0:
        edges.append((s * cfg.width, 1))
    meta = init(cfg, random.key(0).to("meta"))
    return Layout("gpt", meta, (Stack("decoder", tcfg, s),), tuple(edges))
