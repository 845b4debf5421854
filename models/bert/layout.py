"""BERT as the memory planner (``train.plan``) sees it: one encoder stack and the
activations outside it."""

from __future__ import annotations

from fmm import random
from models.bert.config import BertConfig
from models.bert.model import init
from models.family import Layout, Stack, plan_seq, without_dropout


def plan(cfg: BertConfig, *, seq: int | None = None, train: bool = True) -> Layout:
    """The :class:`models.family.Layout` of one encoder pass over ``seq`` tokens (default
    ``max_positions``); ``train`` counts the dropout masks.

    Example: ``plan(bert_base(), seq=128).stacks[0].seq == 128``.
    """
    s = plan_seq(seq, cfg.max_positions, "tokens per sequence")
    tcfg = cfg.transformer if train else without_dropout(cfg.transformer)
    edges = [(s, 8), (s * cfg.width, None), (2 * s, 4)]  # ids, embedding norm input, stats
    if train and cfg.dropout > 0:
        edges.append((s * cfg.width, 1))
    params = init(cfg, random.key(0).to("meta"))
    return Layout("bert", params, (Stack("encoder", tcfg, s),), tuple(edges))
