"""ALBEF as the memory planner (``train.plan``) sees it: one pretraining step of
:func:`models.albef.loss`, its encoder passes, heads and the activations outside the blocks."""

from __future__ import annotations

from fmm import random, tree
from models.albef.config import ALBEFConfig
from models.albef.model import MOMENTUM_PARTS, init
from models.family import ACT_SAVED, Layout, Stack, plan_seq, without_dropout

# ALBEF's pretraining truncates captions to 25 tokens (its Pretrain.py, max_length=25): the
# planner's default text length.
TEXT_TOKENS = 25


def plan(cfg: ALBEFConfig, *, seq: int | None = None, train: bool = True) -> Layout:
    """The :class:`models.family.Layout` of one pretraining step of :func:`models.albef.loss`
    (ITC + ITM + MLM): the image encoder once, the text encoder twice (plain, and MLM-
    corrupted), the fusion encoder four times over text tokens cross-attending to the image
    tokens (the matched pairs, each image with a hard-negative text, each text with a
    hard-negative image, the MLM pair), and the ITC, ITM and MLM heads. The momentum
    encoders run under ``no_grad`` and save nothing.

    Pretraining only: a VQA step (``batch(cfg, task="vqa")``) runs one text and one fusion
    pass and a small answer head, a subset of this, so the plan bounds it from above.
    ``seq``: text tokens (default 25, ALBEF's caption length, at most ``max_positions``);
    ``train``: count dropout masks.

    Example: ``plan(albef_base()).stacks[0].seq == 257`` (256 patches and a class token).
    """
    t = cfg.text
    if seq is None:
        seq = min(TEXT_TOKENS, t.max_positions)
    s_t = plan_seq(seq, t.max_positions, "text tokens")
    s_i, d_i, d_t = cfg.grid**2 + 1, cfg.image_width, t.width
    e, q = cfg.embed_dim, cfg.queue_size
    it, tt, ft = (
        c if train else without_dropout(c)
        for c in (cfg.image_transformer, t.transformer, cfg.fusion.transformer)
    )
    stacks = (
        Stack("image", it, s_i), Stack("text", tt, s_t), Stack("text masked", tt, s_t),
        *(Stack(f"fusion {pair}", ft, s_t, context=s_i)
          for pair in ("matched", "negative text", "negative image", "masked")),
    )  # fmt: skip
    edges = [
        (cfg.in_channels * cfg.image_size**2, None),  # pixels
        # the final norm's input and output (its [CLS] projected, the context of the
        # matched and masked fusion passes), and the float32 statistics
        (2 * s_i * d_i, None), (2 * s_i, 4),
        (2 * s_t, 8), (2 * s_t * d_t, None), (4 * s_t, 4),  # ids, embedding norms, twice
        (2 * (e + 2), None),  # the projected [CLS] and its norm, image and text
        # ITC, each direction: its momentum feature among the candidates, and similarities,
        # log-probabilities and soft targets over the queue (and over the momentum batch,
        # left out: batch << queue_size)
        (2 * (e + 3 * q), None),
        (2, 8), (2 * s_i * d_i, None),  # hard-negative indices; the negatives' image tokens
        (3 * s_t * d_t + 3 * 2, None), (3, 8),  # ITM: fused tokens, logits, labels
        # MLM head: its input, dense and GELU outputs, norm output, log-probabilities, labels
        (s_t * d_t * (ACT_SAVED["gelu"] + 2), None), (2 * s_t, 4),
        (s_t * t.vocab_size, None), (s_t, 8),
    ]  # fmt: skip
    if train and t.dropout > 0:  # the text tower's embedding dropout masks, both passes
        edges.append((2 * s_t * d_t, 1))
    params = init(cfg, random.key(0).to("meta"))
    momentum = tree.count({p: params[p] for p in MOMENTUM_PARTS})
    state_gib = (4 * momentum + q * (8 * e + 8)) / 2**30  # idx: int64
    note = (
        "not counted either: ALBEF's train state, float32 and whole on every rank during a "
        f"step (momentum encoders of {momentum / 1e6:.2f}M params and two {q} x {e} queues: "
        f"{state_gib:.2f} GiB), and the two queues ITC's similarities save once per step "
        f"whatever the batch ({2 * q * e:,} values: {8 * q * e / 2**30:.2f} GiB in float32)."
    )
    return Layout("albef", params, stacks, tuple(edges), note)
