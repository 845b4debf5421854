"""BERT weights from and to Hugging Face's ``transformers.BertModel``.

Hugging Face keeps separate ``query``/``key``/``value`` projections; ours is one fused
``attn.qkv`` whose output axis stacks q, k, v (heads inside each, as
:func:`fmm.nn.attention` splits it), so the three are concatenated along dim 0. Every other
tensor keeps its layout (``nn.Linear`` is ``[out, in]`` like ours). Both bare ``BertModel``
keys and the ``bert.``-prefixed keys of its task models are accepted; task heads
(``cls.*``, ``classifier.*``) are not ours to load and count as unexpected: drop them first.
The ``position_ids``/``token_type_ids`` buffers that some checkpoints save are ignored.
Conversions are strict: one :class:`fmm.convert.ConversionError` lists every missing,
unexpected and mis-shaped key.

Example::

    cfg = config_from_hf(hf_model.config)
    params = from_hf(hf_model.state_dict(), cfg)
    hf_model.load_state_dict(to_hf(params, cfg))
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fmm import random
from fmm.convert import (
    Rule,
    affine,
    export_state_dict,
    fused,
    import_state_dict,
    same,
    strip_prefix,
)
from models.bert.config import BertConfig
from models.bert.model import init

Params = dict[str, Any]

_ACTS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def hf_rules(cfg: BertConfig) -> list[Rule]:
    """The key map between our params and a bare ``BertModel`` state dict."""
    rules = [
        same("token.weight", "embeddings.word_embeddings.weight"),
        same("pos", "embeddings.position_embeddings.weight"),
        same("token_type.weight", "embeddings.token_type_embeddings.weight"),
        *affine("norm_embed", "embeddings.LayerNorm"),
    ]
    for i in range(cfg.layers):
        ours, theirs = f"transformer.blocks.{i}", f"encoder.layer.{i}"
        attn = f"{theirs}.attention"
        rules += fused(f"{ours}.attn.qkv", f"{attn}.self", ("query", "key", "value"))
        rules += affine(f"{ours}.attn.out", f"{attn}.output.dense")
        rules += affine(f"{ours}.norm1", f"{attn}.output.LayerNorm")
        rules += affine(f"{ours}.mlp.fc1", f"{theirs}.intermediate.dense")
        rules += affine(f"{ours}.mlp.fc2", f"{theirs}.output.dense")
        rules += affine(f"{ours}.norm2", f"{theirs}.output.LayerNorm")
    if cfg.pooler:
        rules += affine("pooler", "pooler.dense")
    return rules


def from_hf(state_dict: Mapping[str, torch.Tensor], cfg: BertConfig) -> Params:
    """Our params from a ``BertModel`` state dict (bare keys, or ``bert.``-prefixed as in
    ``BertForMaskedLM`` and friends; with ``cfg.pooler=False`` for checkpoints without one).

    Example: ``from_hf(safetensors.torch.load_file("model.safetensors"), minilm_l6())``.

    Raises :class:`fmm.convert.ConversionError` listing every missing, unexpected and
    mis-shaped key.
    """
    sd = strip_prefix(state_dict, "module.")
    if any(k.startswith("bert.") for k in sd):
        # Task models nest the encoder under "bert."; anything else (heads) stays as is and
        # is reported as unexpected.
        sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    like = init(cfg, random.key(0).to("meta"))
    return import_state_dict(sd, hf_rules(cfg), like=like, source="hf", ignore=_BUFFERS)


def to_hf(params: Params, cfg: BertConfig, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """A ``BertModel`` state dict of ``params``, ready for ``load_state_dict`` (pass
    ``prefix="bert."`` for the encoder of a task model)."""
    return {prefix + k: v for k, v in export_state_dict(params, hf_rules(cfg)).items()}


def _fields(hf_config: Any) -> Mapping[str, Any]:
    if isinstance(hf_config, (str, os.PathLike)):
        path = Path(hf_config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"config_from_hf: no config.json at {str(path)!r}")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"config_from_hf: {str(path)!r} is not valid JSON: {e}") from None
    if isinstance(hf_config, Mapping):
        return hf_config
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    return vars(hf_config)


def config_from_hf(hf_config: Any, *, pooler: bool = True) -> BertConfig:
    """A :class:`BertConfig` from a ``transformers.BertConfig``, its ``to_dict()``, or the
    path of a ``config.json`` (or of the folder holding it).

    ``pooler``: whether the checkpoint has a pooler (``BertModel`` does; ``BertForMaskedLM``
    does not). Raises ``ValueError`` naming a missing field or a BERT variant this model
    does not implement.

    Example: ``config_from_hf("all-MiniLM-L6-v2/config.json") == minilm_l6()``.
    """
    f = _fields(hf_config)
    need = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    )
    missing = [k for k in need if k not in f]
    if missing:
        raise ValueError(f"config_from_hf: hf_config lacks the fields {missing}")
    act = f.get("hidden_act", "gelu")
    if act not in _ACTS:
        raise ValueError(
            f"config_from_hf: unsupported hidden_act {act!r}; supported: {sorted(_ACTS)}"
        )
    position_type = f.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(
            f"config_from_hf: position_embedding_type={position_type!r} is not supported "
            "(only 'absolute')"
        )
    for flag in ("is_decoder", "add_cross_attention"):
        if f.get(flag, False):
            raise ValueError(f"config_from_hf: {flag}=True is not supported (an encoder only)")
    pad = f.get("pad_token_id")
    return BertConfig(
        vocab_size=f["vocab_size"],
        width=f["hidden_size"],
        layers=f["num_hidden_layers"],
        heads=f["num_attention_heads"],
        mlp_dim=f["intermediate_size"],
        max_positions=f.get("max_position_embeddings", 512),
        type_vocab_size=f.get("type_vocab_size", 2),
        act=_ACTS[act],
        norm_eps=f.get("layer_norm_eps", 1e-12),
        dropout=f.get("hidden_dropout_prob", 0.1),
        attn_dropout=f.get("attention_probs_dropout_prob", 0.1),
        pad_id=0 if pad is None else pad,
        pooler=pooler,
    )
