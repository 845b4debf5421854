"""GPT weights from and to Hugging Face's ``transformers.GPT2LMHeadModel``.

Hugging Face's GPT-2 stores its projections as ``Conv1D`` weights ``[in, out]``: each is
transposed into our ``[out, in]``. Its fused ``c_attn`` already stacks q, k, v along the
output axis, as our ``attn.qkv`` does. ``lm_head.weight`` is tied to ``wte`` (accepted and
ignored on import, written on export), and the causal-mask buffers ``attn.bias`` /
``attn.masked_bias`` that older versions save are accepted and ignored. Conversions are
strict: one :class:`fmm.convert.ConversionError` lists every missing, unexpected and
mis-shaped key.

Example::

    cfg = config_from_hf(hf_model.config)
    params = from_hf(hf_model.state_dict(), cfg)
    hf_model.load_state_dict(to_hf(params, cfg))
    cfg, params = load_pretrained("path/to/gpt2")  # a save_pretrained / Hub directory
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from fmm import random
from fmm.convert import (
    ConversionError,
    Rule,
    export_state_dict,
    import_state_dict,
    same,
    strip_prefix,
    transpose,
)
from fmm.io import read_state_dict
from models.gpt.config import GPTConfig
from models.gpt.model import init

Params = dict[str, Any]

_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def _conv1d(ours: str, theirs: str) -> list[Rule]:
    return [
        Rule(f"{ours}.weight", (f"{theirs}.weight",), to_ours=transpose, to_theirs=transpose),
        same(f"{ours}.bias", f"{theirs}.bias"),
    ]


def _norm(ours: str, theirs: str) -> list[Rule]:
    return [same(f"{ours}.weight", f"{theirs}.weight"), same(f"{ours}.bias", f"{theirs}.bias")]


def hf_rules(cfg: GPTConfig) -> list[Rule]:
    """The key map between our params and a ``GPT2LMHeadModel`` state dict (tied head aside)."""
    rules = [
        same("token.weight", "transformer.wte.weight"),
        same("pos", "transformer.wpe.weight"),
        *_norm("norm", "transformer.ln_f"),
    ]
    for i in range(cfg.layers):
        ours, theirs = f"transformer.blocks.{i}", f"transformer.h.{i}"
        rules += _norm(f"{ours}.norm1", f"{theirs}.ln_1")
        rules += _norm(f"{ours}.norm2", f"{theirs}.ln_2")
        rules += _conv1d(f"{ours}.attn.qkv", f"{theirs}.attn.c_attn")
        rules += _conv1d(f"{ours}.attn.out", f"{theirs}.attn.c_proj")
        rules += _conv1d(f"{ours}.mlp.fc1", f"{theirs}.mlp.c_fc")
        rules += _conv1d(f"{ours}.mlp.fc2", f"{theirs}.mlp.c_proj")
    return rules


def _buffers(cfg: GPTConfig) -> list[str]:
    names = ["lm_head.weight"]
    for i in range(cfg.layers):
        names += [f"transformer.h.{i}.attn.bias", f"transformer.h.{i}.attn.masked_bias"]
    return names


def from_hf(state_dict: Mapping[str, torch.Tensor], cfg: GPTConfig) -> Params:
    """Our params from a ``GPT2LMHeadModel`` (or bare ``GPT2Model``) state dict.

    Raises :class:`fmm.convert.ConversionError` listing every missing, unexpected and
    mis-shaped key, or if ``lm_head.weight`` is present but differs from ``wte`` (an untied
    head has no place in our tree).
    """
    sd = dict(state_dict)
    if not any(k.startswith("transformer.") for k in sd):
        sd = {f"transformer.{k}": v for k, v in sd.items()}  # GPT2Model has no prefix
    sd = strip_prefix(sd, "module.")
    head = sd.get("lm_head.weight")
    wte = sd.get("transformer.wte.weight")
    tied = head is None or wte is None or head.shape != wte.shape or torch.equal(head, wte)
    if not tied:
        raise ConversionError(
            "hf: lm_head.weight differs from transformer.wte.weight; GPT ties them"
        )
    like = init(cfg, random.key(0).to("meta"))
    return import_state_dict(sd, hf_rules(cfg), like=like, source="hf", ignore=_buffers(cfg))


def to_hf(params: Params, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """A ``GPT2LMHeadModel`` state dict of ``params`` (``lm_head.weight`` = ``wte``), ready
    for ``load_state_dict``."""
    sd = export_state_dict(params, hf_rules(cfg))
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def config_from_hf(hf_config: Any) -> GPTConfig:
    """A :class:`GPTConfig` from a ``transformers.GPT2Config`` (or anything with its fields).

    Raises ``ValueError`` for GPT-2 variants this model does not implement.
    """
    act = getattr(hf_config, "activation_function", "gelu_new")
    if act not in _ACTS:
        raise ValueError(f"config_from_hf: unsupported activation_function {act!r}")
    for flag in (
        "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn",
        "add_cross_attention",
    ):
        if getattr(hf_config, flag, False):
            raise ValueError(f"config_from_hf: {flag}=True is not supported")
    if not getattr(hf_config, "scale_attn_weights", True):
        raise ValueError("config_from_hf: scale_attn_weights=False is not supported")
    width = _field(hf_config, "n_embd", int)
    # n_inner is an integer: kept as mlp_dim, since a float ratio need not reproduce it.
    inner = getattr(hf_config, "n_inner", None)
    return GPTConfig(
        vocab_size=_field(hf_config, "vocab_size", int),
        context_length=_field(hf_config, "n_positions", int),
        width=width,
        layers=_field(hf_config, "n_layer", int),
        heads=_field(hf_config, "n_head", int),
        mlp_dim=None if inner is None else int(inner),
        act=_ACTS[act],
        norm_eps=_field(hf_config, "layer_norm_epsilon", float),
    )


# transformers' GPT2Config defaults: a config.json without a field means this value there too.
_HF_DEFAULTS = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "layer_norm_epsilon": 1e-5,
}


def _field(hf_config: Any, name: str, kind: type) -> Any:
    value = getattr(hf_config, name, _HF_DEFAULTS[name])
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if not ok or (kind is int and not isinstance(value, int)):
        raise ValueError(
            f"config_from_hf: {name} must be a positive {kind.__name__}, got {value!r}"
        )
    return kind(value)


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def load_pretrained(directory: str | Path) -> tuple[GPTConfig, Params]:
    """``(cfg, params)`` from a Hugging Face GPT-2 directory (what ``save_pretrained`` writes
    or the Hub holds): ``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``.

    Raises ``FileNotFoundError`` naming what is missing, ``ValueError`` for a config of
    another family, and :class:`fmm.convert.ConversionError` for weights that do not fit.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"no config.json in {directory}: not a Hugging Face model directory"
        )
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    if hf.get("model_type") != "gpt2":
        raise ValueError(
            f"{config_path}: model_type is {hf.get('model_type')!r}; load_pretrained reads gpt2"
        )
    weights = next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"no weights in {directory}: expected one of {WEIGHT_FILES}")
    cfg = config_from_hf(SimpleNamespace(**hf))
    return cfg, from_hf(read_state_dict(weights), cfg)
