"""CLIP weights from and to the reference layouts: OpenAI/open_clip, Hugging Face, TorchMultimodal.

Each format is one rule list (:mod:`fmm.convert`) mapping our dotted names to theirs, so
import and export are the same table read both ways. Conversions are strict: a state dict
of another size or family raises one :class:`fmm.convert.ConversionError` that lists every
missing, unexpected and mis-shaped key, and nothing is returned half-converted.

Example::

    params, cfg = load_pretrained("ViT-B-16.pt", format="open_clip")
    img = encode_image(params, images, cfg=cfg)

    sd = to_hf(params, cfg)               # a transformers CLIPModel state dict
    params2 = from_hf(sd, cfg)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fmm import random
from fmm.convert import (
    ConversionError,
    Rule,
    concat,
    export_state_dict,
    import_state_dict,
    same,
    strip_prefix,
    transpose,
)
from fmm.io import read_state_dict
from models.clip.config import CLIPConfig
from models.clip.foreign_config import (
    OPEN_CLIP_CONFIGS,
    config_beside,
    config_from_hf,
    config_from_open_clip,
    config_to_hf,
    config_to_open_clip,
    images_only,
    mlp_widths,
)
from models.clip.model import init

__all__ = [
    "FORMATS",
    "OPEN_CLIP_CONFIGS",
    "config_beside",
    "config_from_hf",
    "config_from_open_clip",
    "config_from_state_dict",
    "config_to_hf",
    "config_to_open_clip",
    "detect_format",
    "from_hf",
    "from_open_clip",
    "from_torchmultimodal",
    "hf_rules",
    "load_pretrained",
    "open_clip_rules",
    "to_hf",
    "to_open_clip",
    "to_torchmultimodal",
    "torchmultimodal_rules",
]

Params = dict[str, Any]
FORMATS = ("open_clip", "hf", "torchmultimodal")

# Entries of OpenAI's original checkpoints and of Hugging Face's that are not parameters.
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
_HF_EXTRAS = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")


def _weight_bias(ours: str, theirs: str) -> list[Rule]:
    return [same(f"{ours}.weight", f"{theirs}.weight"), same(f"{ours}.bias", f"{theirs}.bias")]


def _block_rules(ours: str, theirs: str, names: Mapping[str, str], fused_qkv: bool) -> list[Rule]:
    """One transformer block; ``names`` maps our sub-layers to theirs."""
    rules = _weight_bias(f"{ours}.norm1", f"{theirs}.{names['norm1']}")
    rules += _weight_bias(f"{ours}.norm2", f"{theirs}.{names['norm2']}")
    for sub in ("out", "fc1", "fc2"):
        rules += _weight_bias(
            f"{ours}.{'attn.out' if sub == 'out' else 'mlp.' + sub}", f"{theirs}.{names[sub]}"
        )
    for part in ("weight", "bias"):
        if fused_qkv:
            rules.append(same(f"{ours}.attn.qkv.{part}", f"{theirs}.{names['qkv']}_{part}"))
        else:
            qkv = [f"{theirs}.{names[p]}.{part}" for p in ("q", "k", "v")]
            rules.append(concat(f"{ours}.attn.qkv.{part}", qkv))
    return rules


_OPENAI_BLOCK = dict(
    norm1="ln_1", norm2="ln_2", qkv="attn.in_proj", out="attn.out_proj", fc1="mlp.c_fc",
    fc2="mlp.c_proj",
)  # fmt: skip
_HF_BLOCK = dict(
    norm1="layer_norm1", norm2="layer_norm2", q="self_attn.q_proj", k="self_attn.k_proj",
    v="self_attn.v_proj", out="self_attn.out_proj", fc1="mlp.fc1", fc2="mlp.fc2",
)  # fmt: skip
_TMM_BLOCK = dict(
    norm1="norm1", norm2="norm2", qkv="self_attn.in_proj", out="self_attn.out_proj",
    fc1="linear1", fc2="linear2",
)  # fmt: skip


def _towers(cfg: CLIPConfig, image: str, text: str, names: Mapping[str, str], fused: bool):
    rules = []
    for i in range(cfg.image_layers):
        rules += _block_rules(f"image.transformer.blocks.{i}", image.format(i), names, fused)
    for i in range(cfg.text_layers):
        rules += _block_rules(f"text.transformer.blocks.{i}", text.format(i), names, fused)
    return rules


def open_clip_rules(cfg: CLIPConfig) -> list[Rule]:
    """Our names <-> the OpenAI layout that open_clip's ``CLIP`` uses."""
    images_only(cfg, "open_clip_rules")
    return [
        same("image.patch.weight", "visual.conv1.weight"),
        same("image.cls", "visual.class_embedding"),
        same("image.pos", "visual.positional_embedding"),
        *_weight_bias("image.norm_pre", "visual.ln_pre"),
        *_weight_bias("image.norm", "visual.ln_post"),
        Rule("image.proj.weight", ("visual.proj",), transpose, transpose),
        same("text.token.weight", "token_embedding.weight"),
        same("text.pos", "positional_embedding"),
        *_weight_bias("text.norm", "ln_final"),
        Rule("text.proj.weight", ("text_projection",), transpose, transpose),
        same("logit_scale", "logit_scale"),
        *_towers(
            cfg, "visual.transformer.resblocks.{}", "transformer.resblocks.{}", _OPENAI_BLOCK, True
        ),
    ]


def hf_rules(cfg: CLIPConfig) -> list[Rule]:
    """Our names <-> ``transformers.CLIPModel``."""
    images_only(cfg, "hf_rules")
    v, t = "vision_model", "text_model"
    return [
        same("image.patch.weight", f"{v}.embeddings.patch_embedding.weight"),
        same("image.cls", f"{v}.embeddings.class_embedding"),
        same("image.pos", f"{v}.embeddings.position_embedding.weight"),
        *_weight_bias("image.norm_pre", f"{v}.pre_layrnorm"),  # sic: HF's spelling
        *_weight_bias("image.norm", f"{v}.post_layernorm"),
        same("image.proj.weight", "visual_projection.weight"),
        same("text.token.weight", f"{t}.embeddings.token_embedding.weight"),
        same("text.pos", f"{t}.embeddings.position_embedding.weight"),
        *_weight_bias("text.norm", f"{t}.final_layer_norm"),
        same("text.proj.weight", "text_projection.weight"),
        same("logit_scale", "logit_scale"),
        *_towers(cfg, f"{v}.encoder.layers.{{}}", f"{t}.encoder.layers.{{}}", _HF_BLOCK, False),
    ]


def torchmultimodal_rules(cfg: CLIPConfig) -> list[Rule]:
    """Our names <-> TorchMultimodal's ``CLIP(encoder_a=CLIPViTEncoder, encoder_b=CLIPTextEncoder)``.

    TorchMultimodal keeps the temperature in its loss module, not in ``CLIP``: the rules
    cover everything but ``logit_scale``.
    """
    images_only(cfg, "torchmultimodal_rules")
    a, b = "encoder_a", "encoder_b"
    return [
        same("image.patch.weight", f"{a}.conv.weight"),
        same("image.cls", f"{a}.cls_token_embedding"),
        same("image.pos", f"{a}.positional_embedding"),
        *_weight_bias("image.norm_pre", f"{a}.ln_pre"),
        *_weight_bias("image.norm", f"{a}.ln_post"),
        Rule("image.proj.weight", (f"{a}.projection",), transpose, transpose),
        same("text.token.weight", f"{b}.token_embedding.weight"),
        same("text.pos", f"{b}.positional_embedding"),
        *_weight_bias("text.norm", f"{b}.ln_final"),
        same("text.proj.weight", f"{b}.projection.weight"),
        *_towers(cfg, f"{a}.encoder.layers.{{}}", f"{b}.encoder.layers.{{}}", _TMM_BLOCK, True),
    ]


def _like(cfg: CLIPConfig) -> Params:
    return init(cfg, random.key(0).to("meta"))


def _check_format_of(state_dict: Mapping[str, Any], expected: str) -> None:
    found = detect_format(state_dict)
    if found is not None and found != expected:
        raise ConversionError(
            f"this state dict is in the {found!r} layout, not {expected!r}: "
            f"use format={found!r} (from_{found})"
        )


def from_open_clip(
    state_dict: Mapping[str, torch.Tensor], cfg: CLIPConfig, *, dtype=torch.float32
) -> Params:
    """Params from an OpenAI / open_clip ``CLIP`` state dict (``module.`` prefixes and the
    non-parameter entries of OpenAI's original files are accepted)."""
    sd = strip_prefix(state_dict, "module.")
    _check_format_of(sd, "open_clip")
    return import_state_dict(
        sd, open_clip_rules(cfg), like=_like(cfg), source="open_clip",
        ignore=_OPENAI_EXTRAS, dtype=dtype,
    )  # fmt: skip


def from_hf(
    state_dict: Mapping[str, torch.Tensor], cfg: CLIPConfig, *, dtype=torch.float32
) -> Params:
    """Params from a ``transformers.CLIPModel`` state dict."""
    sd = strip_prefix(state_dict, "module.")
    _check_format_of(sd, "hf")
    return import_state_dict(
        sd, hf_rules(cfg), like=_like(cfg), source="hf", ignore=_HF_EXTRAS, dtype=dtype
    )


def from_torchmultimodal(
    state_dict: Mapping[str, torch.Tensor],
    cfg: CLIPConfig,
    *,
    logit_scale: float | None = None,
    dtype=torch.float32,
) -> Params:
    """Params from a TorchMultimodal ``CLIP`` state dict.

    Its ``CLIP`` module has no temperature (it lives in ``ContrastiveLossWithTemperature``):
    pass that loss's ``logit_scale`` (log inverse temperature) or get ``cfg.init_logit_scale``.
    """
    sd = strip_prefix(state_dict, "module.")
    _check_format_of(sd, "torchmultimodal")
    like = _like(cfg)
    scale = like.pop("logit_scale")
    params = import_state_dict(
        sd, torchmultimodal_rules(cfg), like=like, source="torchmultimodal", dtype=dtype
    )
    value = cfg.init_logit_scale if logit_scale is None else float(logit_scale)
    params["logit_scale"] = torch.tensor(value, dtype=dtype or torch.float32).reshape(scale.shape)
    return params


def to_open_clip(params: Params, cfg: CLIPConfig) -> dict[str, torch.Tensor]:
    """An open_clip ``CLIP`` state dict of ``params`` (loads with ``strict=True``)."""
    return export_state_dict(params, open_clip_rules(cfg))


def to_hf(params: Params, cfg: CLIPConfig) -> dict[str, torch.Tensor]:
    """A ``transformers.CLIPModel`` state dict of ``params``."""
    return export_state_dict(params, hf_rules(cfg))


def to_torchmultimodal(params: Params, cfg: CLIPConfig) -> dict[str, torch.Tensor]:
    """A TorchMultimodal ``CLIP`` state dict of ``params`` (the temperature is not part of it)."""
    return export_state_dict(params, torchmultimodal_rules(cfg))


_MARKERS = {
    "open_clip": "visual.conv1.weight",
    "hf": "vision_model.embeddings.patch_embedding.weight",
    "torchmultimodal": "encoder_a.conv.weight",
}


def detect_format(state_dict: Mapping[str, Any]) -> str | None:
    """Which of :data:`FORMATS` a CLIP state dict is in, or ``None`` if none matches."""
    for name, marker in _MARKERS.items():
        if marker in state_dict:
            return name
    return None


class _Probe(NamedTuple):
    """Where a format keeps the tensors whose shapes give the config."""

    patch: str  # conv weight [width, 3, patch, patch]
    image_pos: str  # [grid² + 1, width]
    image_block: str  # a per-block key with "{}" for the index
    token: str  # [vocab, text_width]
    text_pos: str  # [context, text_width]
    text_block: str
    image_fc1: str  # first MLP weight of image block 0: [hidden, width]
    text_fc1: str  # and of text block 0
    embed_dim: Callable[[Mapping[str, torch.Tensor]], int]


_PROBES = {
    "open_clip": _Probe(
        "visual.conv1.weight", "visual.positional_embedding",
        "visual.transformer.resblocks.{}.ln_1.weight", "token_embedding.weight",
        "positional_embedding", "transformer.resblocks.{}.ln_1.weight",
        "visual.transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.0.mlp.c_fc.weight",
        lambda sd: sd["visual.proj"].shape[1],
    ),
    "hf": _Probe(
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.position_embedding.weight",
        "vision_model.encoder.layers.{}.layer_norm1.weight",
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.encoder.layers.{}.layer_norm1.weight",
        "vision_model.encoder.layers.0.mlp.fc1.weight",
        "text_model.encoder.layers.0.mlp.fc1.weight",
        lambda sd: sd["visual_projection.weight"].shape[0],
    ),
    "torchmultimodal": _Probe(
        "encoder_a.conv.weight", "encoder_a.positional_embedding",
        "encoder_a.encoder.layers.{}.norm1.weight", "encoder_b.token_embedding.weight",
        "encoder_b.positional_embedding", "encoder_b.encoder.layers.{}.norm1.weight",
        "encoder_a.encoder.layers.0.linear1.weight", "encoder_b.encoder.layers.0.linear1.weight",
        lambda sd: sd["encoder_a.projection"].shape[1],
    ),
}  # fmt: skip


def config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], format: str, *, act: str = "quick_gelu"
) -> CLIPConfig:
    """Infer the config from weight shapes, as OpenAI's loader does. Heads are width / 64
    (the convention of every published CLIP); ``act`` cannot be read off weights (OpenAI's
    and Hugging Face's CLIPs use ``quick_gelu``)."""
    _check_format(format)
    sd = strip_prefix(state_dict, "module.")
    found = detect_format(sd)
    if found != format:
        hint = f": use format={found!r}" if found else ""
        raise ConversionError(
            f"format={format!r} but the state dict is in {found or 'no known CLIP'} layout{hint}"
        )
    probe = _PROBES[format]
    try:

        def depth(pattern: str) -> int:
            n = 0
            while pattern.format(n) in sd:
                n += 1
            return n

        width, channels, patch, _ = sd[probe.patch].shape
        vocab, text_width = sd[probe.token].shape
        return CLIPConfig(
            embed_dim=probe.embed_dim(sd),
            image_size=math.isqrt(sd[probe.image_pos].shape[0] - 1) * patch,
            patch_size=patch,
            image_width=width,
            image_layers=depth(probe.image_block),
            image_heads=width // 64,
            in_channels=channels,
            context_length=sd[probe.text_pos].shape[0],
            vocab_size=vocab,
            text_width=text_width,
            text_layers=depth(probe.text_block),
            text_heads=text_width // 64,
            **mlp_widths(
                (width, sd[probe.image_fc1].shape[0]), (text_width, sd[probe.text_fc1].shape[0])
            ),
            act=act,
        )
    except KeyError as e:
        raise ConversionError(
            f"{format} state dict lacks {e.args[0]!r}: cannot infer its config"
        ) from e


# ----------------------------------------------------------------------------- files

_FROM = {"open_clip": from_open_clip, "hf": from_hf, "torchmultimodal": from_torchmultimodal}


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")


def load_pretrained(
    path: str | Path,
    *,
    format: str,
    cfg: CLIPConfig | None = None,
    act: str = "quick_gelu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Params, CLIPConfig]:
    """``(params, cfg)`` from a checkpoint file a user already has.

    ``format``: one of :data:`FORMATS`. ``cfg``: the model's config; if omitted, a Hugging
    Face ``config.json`` beside the file is used (``format="hf"``; a ``config.json`` of
    another kind is a :class:`ConversionError` saying what it is and what to pass), else
    the sizes are read off the weights (see :func:`config_from_state_dict`; ``act`` then
    names the activation).
    """
    _check_format(format)
    if cfg is not None and not isinstance(cfg, CLIPConfig):
        raise TypeError(f"cfg must be a CLIPConfig or None, got {type(cfg).__name__}")
    state_dict = read_state_dict(path)
    if cfg is None:
        beside = Path(path).with_name("config.json")
        if format == "hf" and beside.is_file():
            cfg = config_beside(beside)
        else:
            cfg = config_from_state_dict(state_dict, format, act=act)
    return _FROM[format](state_dict, cfg, dtype=dtype), cfg
