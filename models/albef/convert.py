"""ALBEF weights from and to TorchMultimodal's ALBEF modules.

TorchMultimodal builds ALBEF from three modules: ``ALBEFVisionEncoder`` (torchvision's
``VisionTransformer`` behind a feature extractor), a BERT text encoder
(``bert_text_encoder``) and ``ALBEFMultimodalEncoder``; ``ALBEFModel`` holds them with
momentum copies (``*_m``), and ``ALBEFModelWithSimilarity`` wraps that (``albef_model.``)
with the projections, the temperature and the feature queues (buffers).

Key map: torchvision's fused ``in_proj_weight`` is our ``qkv`` as is; TorchMultimodal's
separate ``query/key/value`` are concatenated (``kv`` of cross-attention is
``key`` + ``value``); the class token ``[1, 1, W]`` and positions ``[1, P, W]`` drop their
leading ones; TorchMultimodal's ``temp`` is our ``log_temp`` (its log); queues ``[E, Q]``
are stored as ``[Q, E]``; TorchMultimodal's empty queue id (-100) is our -1. Its text MLP's second linear is ``model.3`` when built with dropout and
``model.2`` without; both are read. The ITM/MLM/VQA heads are not in these modules, so
:func:`from_torchmultimodal` returns the parts it finds (params, momentum encoders,
queues: what the family's ``init`` and ``init_state`` would give) and the caller keeps fresh
heads.

Example::

    parts = from_torchmultimodal(tmm_model.state_dict(), cfg)
    params = {**init(cfg, key), **parts["params"]}
    momentum = parts["momentum"]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fmm import random
from fmm.convert import (
    ConversionError,
    Rule,
    affine,
    export_state_dict,
    fused,
    import_state_dict,
    same,
    unbatched,
)
from models.albef.config import ALBEFConfig
from models.albef.model import MOMENTUM_PARTS, init
from models.albef.state import EMPTY_ID

Params = dict[str, Any]
_QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "queue_ptr")
_TMM_EMPTY_ID = -100


def vision_rules(
    cfg: ALBEFConfig, *, ours: str = "image", theirs: str = "vision_encoder"
) -> list[Rule]:
    """Our ``image.*`` against an ``ALBEFVisionEncoder`` state dict under ``theirs``."""
    t = f"{theirs}.encoder" if theirs else "encoder"
    rules = [
        *affine(f"{ours}.patch", f"{t}.conv_proj"),
        unbatched(f"{ours}.cls", f"{t}.class_token", 2),
        unbatched(f"{ours}.pos", f"{t}.encoder.pos_embedding", 1),
        *affine(f"{ours}.norm", f"{t}.encoder.ln"),
    ]
    for i in range(cfg.image_layers):
        o, ly = f"{ours}.transformer.blocks.{i}", f"{t}.encoder.layers.encoder_layer_{i}"
        rules += [
            same(f"{o}.attn.qkv.weight", f"{ly}.self_attention.in_proj_weight"),
            same(f"{o}.attn.qkv.bias", f"{ly}.self_attention.in_proj_bias"),
            *affine(f"{o}.attn.out", f"{ly}.self_attention.out_proj"),
            *affine(f"{o}.norm1", f"{ly}.ln_1"),
            *affine(f"{o}.norm2", f"{ly}.ln_2"),
            *affine(f"{o}.mlp.fc1", f"{ly}.mlp.0"),
            *affine(f"{o}.mlp.fc2", f"{ly}.mlp.3"),
        ]
    return rules


def _layer_rules(o: str, ly: str, *, cross: bool, mlp_out: int) -> list[Rule]:
    rules = [
        *fused(f"{o}.attn.qkv", f"{ly}.attention", ("query", "key", "value")),
        *affine(f"{o}.attn.out", f"{ly}.attention.output"),
        *affine(f"{o}.norm1", f"{ly}.attention_layernorm"),
        *affine(f"{o}.mlp.fc1", f"{ly}.feedforward.model.0"),
        *affine(f"{o}.mlp.fc2", f"{ly}.feedforward.model.{mlp_out}"),
        *affine(f"{o}.norm2", f"{ly}.feedforward_layernorm"),
    ]
    if cross:
        rules += [
            *affine(f"{o}.cross.q", f"{ly}.cross_attention.query"),
            *fused(f"{o}.cross.kv", f"{ly}.cross_attention", ("key", "value")),
            *affine(f"{o}.cross.out", f"{ly}.cross_attention.output"),
            *affine(f"{o}.norm_cross", f"{ly}.cross_attention_layernorm"),
        ]
    return rules


def text_rules(
    cfg: ALBEFConfig,
    *,
    ours: str = "text",
    theirs: str = "text_encoder",
    mlp_out: int | None = None,
) -> list[Rule]:
    """Our ``text.*`` against a ``bert_text_encoder`` state dict under ``theirs``.
    ``mlp_out``: index of the MLP's second linear (default: 3 if ``cfg.text.dropout`` else 2)."""
    mlp_out = (3 if cfg.text.dropout > 0 else 2) if mlp_out is None else mlp_out
    p = f"{theirs}." if theirs else ""
    rules = [
        same(f"{ours}.token.weight", f"{p}embeddings.word_embeddings.weight"),
        same(f"{ours}.pos", f"{p}embeddings.position_embeddings.weight"),
        same(f"{ours}.token_type.weight", f"{p}embeddings.token_type_embeddings.weight"),
        *affine(f"{ours}.norm_embed", f"{p}embeddings.layer_norm"),
    ]
    for i in range(cfg.text.layers):
        rules += _layer_rules(
            f"{ours}.transformer.blocks.{i}", f"{p}encoder.layer.{i}", cross=False, mlp_out=mlp_out
        )
    return rules


def fusion_rules(
    cfg: ALBEFConfig, *, ours: str = "fusion", theirs: str = "multimodal_encoder"
) -> list[Rule]:
    """Our ``fusion.*`` against an ``ALBEFMultimodalEncoder`` state dict under ``theirs``."""
    p = f"{theirs}." if theirs else ""
    rules = []
    for i in range(cfg.fusion_layers):
        rules += _layer_rules(f"{ours}.blocks.{i}", f"{p}layer.{i}", cross=True, mlp_out=2)
    return rules


def _model_rules(cfg: ALBEFConfig, *, similarity: bool, mlp_out: int | None) -> list[Rule]:
    pre = "albef_model." if similarity else ""
    rules = []
    for ours, suffix in (("params", ""), ("momentum", "_m")):
        rules += vision_rules(cfg, ours=f"{ours}.image", theirs=f"{pre}vision_encoder{suffix}")
        rules += text_rules(
            cfg, ours=f"{ours}.text", theirs=f"{pre}text_encoder{suffix}", mlp_out=mlp_out
        )
        rules += fusion_rules(cfg, ours=f"{ours}.fusion", theirs=f"{pre}multimodal_encoder{suffix}")
        if similarity:
            rules += affine(f"{ours}.vision_proj", f"vision_proj{suffix}")
            rules += affine(f"{ours}.text_proj", f"text_proj{suffix}")
    if similarity:
        rules.append(Rule("params.log_temp", ("temp",), to_ours=torch.log, to_theirs=torch.exp))
    return rules


def _like(cfg: ALBEFConfig, similarity: bool) -> Params:
    full = init(cfg, random.key(0).to("meta"))
    parts = MOMENTUM_PARTS if similarity else ("image", "text", "fusion")
    params = {p: full[p] for p in parts}
    like = {"params": dict(params), "momentum": dict(params)}
    if similarity:
        like["params"]["log_temp"] = full["log_temp"]
    return like


def from_torchmultimodal(
    state_dict: Mapping[str, torch.Tensor], cfg: ALBEFConfig
) -> dict[str, Params]:
    """Our parts from an ``ALBEFModel`` or ``ALBEFModelWithSimilarity`` state dict.

    Returns ``{"params": {image, text, fusion[, vision_proj, text_proj, log_temp]},
    "momentum": {...same encoders...}[, "queue": {...}]}`` (queue and projections only from
    ``ALBEFModelWithSimilarity``). Raises :class:`fmm.convert.ConversionError` listing every
    missing, unexpected and mis-shaped key.
    """
    similarity = any(k.startswith("albef_model.") for k in state_dict)
    pre = "albef_model." if similarity else ""
    mlp_out = (
        3 if f"{pre}text_encoder.encoder.layer.0.feedforward.model.3.weight" in state_dict else 2
    )
    out = import_state_dict(
        state_dict,
        _model_rules(cfg, similarity=similarity, mlp_out=mlp_out),
        like=_like(cfg, similarity),
        source="TorchMultimodal ALBEF",
        ignore=_QUEUE_KEYS if similarity else (),
    )
    if similarity:
        out["queue"] = _queue_from_tmm(state_dict, cfg)
    return out


def _queue_from_tmm(sd: Mapping[str, torch.Tensor], cfg: ALBEFConfig) -> Params:
    missing = [k for k in _QUEUE_KEYS if k not in sd]
    want = {"image_queue": (cfg.embed_dim, cfg.queue_size), "idx_queue": (1, cfg.queue_size)}
    bad = [
        f"{k}: expected {list(s)}, got {list(sd[k].shape)}"
        for k, s in want.items()
        if k in sd and tuple(sd[k].shape) != s
    ]
    if missing or bad:
        raise ConversionError(f"TorchMultimodal ALBEF queues: missing {missing}, mismatched {bad}")
    idx = sd["idx_queue"].reshape(-1).to(torch.int64)
    return {
        "image": sd["image_queue"].T.float().contiguous(),
        "text": sd["text_queue"].T.float().contiguous(),
        "idx": torch.where(idx == _TMM_EMPTY_ID, EMPTY_ID, idx),
        "ptr": sd["queue_ptr"].reshape(()).to(torch.int64).clone(),
    }


def to_torchmultimodal(
    params: Params,
    cfg: ALBEFConfig,
    *,
    momentum: Params | None = None,
    queue: Params | None = None,
    text_mlp_out: int | None = None,
) -> dict[str, torch.Tensor]:
    """The state dict of TorchMultimodal's ``ALBEFModel`` of ``params`` (momentum encoders
    from ``momentum``, default: copies of ``params`` as TorchMultimodal starts them), or of
    ``ALBEFModelWithSimilarity`` when ``queue`` is given. ``text_mlp_out``: index of the
    text MLP's second linear in TorchMultimodal's ``nn.Sequential`` (default: 3 if
    ``cfg.text.dropout`` else 2, as ``bert_text_encoder`` builds it)."""
    similarity = queue is not None
    parts = MOMENTUM_PARTS if similarity else ("image", "text", "fusion")
    momentum = {p: params[p] for p in parts} if momentum is None else momentum
    tree = {"params": {p: params[p] for p in parts}, "momentum": {p: momentum[p] for p in parts}}
    if similarity:
        tree["params"]["log_temp"] = params["log_temp"]
    sd = export_state_dict(tree, _model_rules(cfg, similarity=similarity, mlp_out=text_mlp_out))
    if similarity:
        idx = queue["idx"].to(torch.int64)
        sd["image_queue"] = queue["image"].T.contiguous().clone()
        sd["text_queue"] = queue["text"].T.contiguous().clone()
        sd["idx_queue"] = torch.where(idx == EMPTY_ID, _TMM_EMPTY_ID, idx)[None].clone()
        sd["queue_ptr"] = queue["ptr"].reshape(1).clone()
    return sd
