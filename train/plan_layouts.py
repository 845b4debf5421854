"""Per-family layouts for :mod:`train.plan`: what the memory model needs to know of a model
(its param tree built on the ``meta`` device, its transformer stacks, the activations
outside the blocks), plus the FLAVA native-training sizes of the reference library.

Example: ``layout("clip_vit_l14").stacks[0].seq == 257`` (256 patches and a class token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

import models
from fmm import nn, random
from fmm.nn import TransformerConfig
from models import bert, clip, gpt, mmgpt


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


# The reference library's FLAVA native-training configs (examples/flava/native/configs):
# three pre-norm stacks of one width and 16 heads; 224 px images in 16 px patches; BERT's
# 30522 word vocabulary and 77-token captions (its VL_MAX_LENGTH_DEFAULT).
FLAVA_NATIVE = {
    "flava_1.8b_like": dict(width=1280, mlp=5120, image_layers=32, text_layers=32, mm_layers=16),
    "flava_10b_like": dict(width=2048, mlp=10240, image_layers=64, text_layers=64, mm_layers=40),
}


def _flava_like(name: str, seq: int | None, train: bool) -> Layout:
    del train
    spec = FLAVA_NATIVE[name]
    w = spec["width"]
    towers = clip.CLIPConfig(
        embed_dim=768, image_size=224, patch_size=16, image_width=w,
        image_layers=spec["image_layers"], image_heads=16, context_length=77,
        vocab_size=30522, text_width=w, text_layers=spec["text_layers"], text_heads=16,
        mlp_ratio=spec["mlp"] / w, act="gelu",
    )  # fmt: skip
    mm_cfg = TransformerConfig(
        width=w, layers=spec["mm_layers"], heads=16, mlp_dim=spec["mlp"], act="gelu"
    )
    base = _clip_layout(name, towers, seq, train=False)
    s_txt = base.stacks[1].seq
    s_mm = base.stacks[0].seq + s_txt + 1  # [cls, image tokens, text tokens]
    params = dict(base.params)
    params["multimodal"] = nn.init_transformer(mm_cfg, random.fold_in(_meta_key(), "mm"))
    edges = (*base.edges, (2 * s_mm * w, None))  # the concatenated input and final norm
    note = (
        f"{name}: FLAVA native-training sizes as CLIP towers (ViT image, text) plus a "
        f"{spec['mm_layers']}-block multimodal stack over [cls, image, text]; FLAVA's "
        "pretraining heads and its frozen image tokenizer are not counted"
    )
    stacks = (*base.stacks, Stack("multimodal", mm_cfg, s_mm))
    return Layout(name, params, stacks, edges, note)


_LAYOUTS: dict[type, Callable[..., Layout]] = {
    clip.CLIPConfig: _clip_layout,
    gpt.GPTConfig: _gpt_layout,
    mmgpt.MMGPTConfig: _mmgpt_layout,
    bert.BertConfig: _bert_layout,
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
    context. ``train``: count dropout masks (the activations of a training step).

    Example: ``layout("gpt2_small", seq=512).stacks[0].seq == 512``.
    """
    if name in FLAVA_NATIVE:
        return _flava_like(name, seq, train)
    if name not in models.REGISTRY:
        raise ValueError(f"--model: unknown model {name!r}; choose one of {model_names()}")
    cfg = models.get_config(name)
    build = _LAYOUTS.get(type(cfg))
    if build is None:
        raise ValueError(
            f"--model: {name!r} is a {type(cfg).__name__}, which has no transformer blocks "
            f"to plan; choose one of {model_names()}"
        )
    return build(name, cfg, seq, train)
