"""Per-family layouts for :mod:`train.plan`: what the memory model needs to know of a model
(its param tree built on the ``meta`` device, its transformer stacks, the activations
outside the blocks), plus FLAVA at the sizes of the reference library's native-training
configs (``flava_1.8b``, ``flava_10b``).

Example: ``layout("clip_vit_l14").stacks[0].seq == 257`` (256 patches and a class token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

import models
from fmm import random
from fmm.nn import TransformerConfig
from models import bert, clip, flava, gpt, mmgpt

# Values each activation keeps besides its input: quick_gelu keeps its sigmoid too; relu
# keeps only its output, which the next layer saves anyway.
ACT_SAVED = {"gelu": 2, "gelu_tanh": 2, "silu": 2, "quick_gelu": 3, "relu": 1}


@dataclass(frozen=True)
class Stack:
    """One transformer stack as the memory model sees it: ``seq`` tokens per example through
    ``cfg.layers`` blocks; ``context`` tokens per example cross-attended (0: none)."""

    name: str
    cfg: TransformerConfig
    seq: int
    context: int = 0


@dataclass(frozen=True)
class Layout:
    """What the memory model needs of a model: its param tree (on ``meta``), its stacks, and
    the activation values per example outside the blocks as ``(count, bytes each)`` pairs
    (``bytes`` None: the compute dtype)."""

    name: str
    params: Any
    stacks: tuple[Stack, ...]
    edges: tuple[tuple[int, int | None], ...] = ()
    note: str = ""


def _check_seq(seq: int | None, limit: int, what: str) -> int:
    if seq is None:
        return limit
    if not 1 <= seq <= limit:
        raise ValueError(f"--seq must be in [1, {limit}] ({what}), got {seq}")
    return seq


def _clip_layout(name: str, cfg: clip.CLIPConfig, seq: int | None, train: bool) -> Layout:
    del train  # CLIP has no dropout
    s_img, s_txt = cfg.grid**2 + 1, _check_seq(seq, cfg.context_length, "text tokens")
    it, tt = cfg.image_transformer, cfg.text_transformer
    pixels = cfg.in_channels * cfg.image_size**2
    edges = (
        (pixels, None),
        # norm_pre and norm_post inputs, and norm_post's output kept alive by the cls view
        (3 * s_img * it.width, None), (4 * s_img, 4),
        (s_txt, 8), (s_txt * tt.width, None), (2 * s_txt, 4), (tt.width, None),
    )  # fmt: skip
    stacks = (Stack("image", it, s_img), Stack("text", tt, s_txt))
    return Layout(name, clip.init(cfg, _meta_key()), stacks, edges)


def _gpt_layout(name: str, cfg: gpt.GPTConfig, seq: int | None, train: bool) -> Layout:
    s = _check_seq(seq, cfg.context_length, "tokens per sequence")
    tcfg = cfg.transformer if train else _eval(cfg.transformer)
    edges = [
        (2 * s, 8),  # token ids, targets
        (2 * s * cfg.width, None), (2 * s, 4),  # final norm input and output
        (s * cfg.vocab_size, 4),  # float32 log-probabilities kept by cross-entropy
    ]  # fmt: skip
    if train and cfg.dropout > 0:
        edges.append((s * cfg.width, 1))
    return Layout(name, gpt.init(cfg, _meta_key()), (Stack("decoder", tcfg, s),), tuple(edges))


def _mmgpt_layout(name: str, cfg: mmgpt.MMGPTConfig, seq: int | None, train: bool) -> Layout:
    s = _check_seq(seq, cfg.seq_len, "caption + image tokens")
    tcfg = cfg.transformer if train else _eval(cfg.transformer)
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
    return Layout(name, mmgpt.init(cfg, _meta_key()), (Stack("decoder", tcfg, s),), tuple(edges))


def _bert_layout(name: str, cfg: bert.BertConfig, seq: int | None, train: bool) -> Layout:
    s = _check_seq(seq, cfg.max_positions, "tokens per sequence")
    tcfg = cfg.transformer if train else _eval(cfg.transformer)
    edges = [(s, 8), (s * cfg.width, None), (2 * s, 4)]  # ids, embedding norm input, stats
    if train and cfg.dropout > 0:
        edges.append((s * cfg.width, 1))
    return Layout(name, bert.init(cfg, _meta_key()), (Stack("encoder", tcfg, s),), tuple(edges))


def _eval(cfg: TransformerConfig) -> TransformerConfig:
    return replace(cfg, dropout=0.0, attn_dropout=0.0)


# The reference library's FLAVA native-training configs (examples/flava/native/configs/
# 1.8b.yaml and 10b.yaml): three pre-norm stacks of one width and 16 heads, 224 px images in
# 16 px patches, BERT's 30522 word vocabulary; FLAVA's image-text data uses 77-token
# captions (its VL_MAX_LENGTH_DEFAULT), the planner's default text length for FLAVA.
FLAVA_TEXT_TOKENS = 77


def _flava_native(width: int, mlp: int, layers: int, mm_layers: int) -> flava.FLAVAConfig:
    return flava.FLAVAConfig(
        image_width=width, image_layers=layers, image_heads=16, image_mlp_dim=mlp,
        text_width=width, text_layers=layers, text_heads=16, text_mlp_dim=mlp,
        mm_width=width, mm_layers=mm_layers, mm_heads=16, mm_mlp_dim=mlp,
    )  # fmt: skip


FLAVA_NATIVE = {
    "flava_1.8b": lambda: _flava_native(1280, 5120, 32, 16),
    "flava_10b": lambda: _flava_native(2048, 10240, 64, 40),
}


def _masked_head(tokens: int, width: int, vocab: int, act: str) -> list[tuple[int, int | None]]:
    # dense output, activation output, norm output (+ float32 stats), log-probabilities
    return [(tokens * width * (ACT_SAVED[act] + 1), None), (2 * tokens, 4), (tokens * vocab, None)]


def _flava_layout(name: str, cfg: flava.FLAVAConfig, seq: int | None, train: bool) -> Layout:
    """One step of ``models.flava.pretraining_loss``: image and text encoders twice (plain
    for the contrastive loss, masked for MLM/MIM/ITM/MMM), the multimodal encoder once on
    the masked pair, and the MLM, MIM and two MMM heads over every token."""
    if seq is None:
        seq = min(FLAVA_TEXT_TOKENS, cfg.max_positions)
    s_t = _check_seq(seq, cfg.max_positions, "text tokens")
    s_i, d_i, d_t, d_m = cfg.num_patches + 1, cfg.image_width, cfg.text_width, cfg.mm_width
    s_m = 1 + s_i + s_t
    it, tt, mt = (
        t if train else _eval(t)
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
    return Layout(name, flava.init(cfg, _meta_key()), stacks, tuple(edges))


_LAYOUTS: dict[type, Callable[..., Layout]] = {
    clip.CLIPConfig: _clip_layout,
    gpt.GPTConfig: _gpt_layout,
    mmgpt.MMGPTConfig: _mmgpt_layout,
    bert.BertConfig: _bert_layout,
    flava.FLAVAConfig: _flava_layout,
}


def _meta_key() -> torch.Tensor:
    return random.key(0).to("meta")


def model_names() -> list[str]:
    """Every name :func:`layout` accepts: registry presets of transformer families, plus the
    FLAVA native-training sizes."""
    ok = [n for n, b in models.REGISTRY.items() if type(b()) in _LAYOUTS]
    return sorted(ok) + list(FLAVA_NATIVE)


def layout(name: str, *, seq: int | None = None, train: bool = True) -> Layout:
    """The :class:`Layout` of model ``name`` (a :data:`models.REGISTRY` preset or a FLAVA
    native size), params built by the family's ``init`` on the meta device.

    ``seq``: tokens per example (the text tokens for CLIP/FLAVA), default the model's
    context (77 text tokens for FLAVA, as in its image-text pretraining). ``train``: count dropout masks (the activations of a training step).

    Example: ``layout("gpt2_small", seq=512).stacks[0].seq == 512``.
    """
    if name in FLAVA_NATIVE:
        cfg = FLAVA_NATIVE[name]()
    elif name in models.REGISTRY:
        cfg = models.get_config(name)
    else:
        raise ValueError(f"--model: unknown model {name!r}; choose one of {model_names()}")
    build = _LAYOUTS.get(type(cfg))
    if build is None:
        raise ValueError(
            f"--model: {name!r} is a {type(cfg).__name__}, for which the planner has no "
            f"layout (it plans {', '.join(sorted(t.__name__ for t in _LAYOUTS))}); choose one "
            f"of {model_names()}"
        )
    return build(name, cfg, seq, train)
