"""BLIP-2 weights from and to TorchMultimodal's ``BLIP2``, ``QformerForCLM`` and
``Blip2Phase1Loss`` modules.

TorchMultimodal's ``BLIP2`` holds the image encoder (``vision_encoder.*``: its
``VisionTransformer`` of ``vision_transformer(...)``), ``ln_vision``, ``query_tokens [1, Q,
W]``, the projections and the Q-Former (``qformer.*``: a ``QformerForCLM``, whose
``model.*`` is the ``QformerModel`` and ``head.*`` the generation head). The ITM head and
the temperature live in the loss module (``Blip2Phase1Loss``); :func:`from_torchmultimodal`
reads them under a ``loss.`` prefix of the same dict::

    sd = {**blip2.state_dict(), **{f"loss.{k}": v for k, v in loss.state_dict().items()}}
    params = from_torchmultimodal(sd, cfg)

Key map: separate ``q_proj/k_proj/v_proj`` are concatenated into our ``attn.qkv`` (and
``k_proj/v_proj`` into cross-attention's ``kv``); the image encoder's fused
``input_proj`` is our ``qkv`` as is; tokens ``[1, 1, W]`` / ``[1, P, W]`` drop their
leading ones; ``temp`` is our ``log_temp`` (its log). The ``position_ids`` buffer is
ignored. Conversions are strict: one :class:`fmm.convert.ConversionError` lists every
missing, unexpected and mis-shaped key.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fmm import random
from fmm.convert import (
    Rule,
    affine,
    export_state_dict,
    fused,
    import_state_dict,
    same,
    unbatched,
)
from models.blip2.config import Blip2Config
from models.blip2.model import Params, init

_SOURCE = "TorchMultimodal BLIP2"
_BUFFERS = ("qformer.model.embeddings.position_ids",)


def _vision_rules(cfg: Blip2Config, theirs: str = "vision_encoder") -> list[Rule]:
    rules = [
        *affine("image.patch", f"{theirs}.embeddings.conv_projection"),
        unbatched("image.cls", f"{theirs}.embeddings.cls_token", 2),
        unbatched("image.pos", f"{theirs}.embeddings.position_embeddings", 1),
        *affine("image.norm", f"{theirs}.encoder.final_layer_norm"),
    ]
    for i in range(cfg.image_layers):
        o, t = f"image.transformer.blocks.{i}", f"{theirs}.encoder.layer.{i}"
        rules += [
            *affine(f"{o}.attn.qkv", f"{t}.attention.input_proj"),
            *affine(f"{o}.attn.out", f"{t}.attention.output_proj"),
            *affine(f"{o}.norm1", f"{t}.attention_layernorm"),
            *affine(f"{o}.mlp.fc1", f"{t}.feedforward.model.0"),
            *affine(f"{o}.mlp.fc2", f"{t}.feedforward.model.2"),
            *affine(f"{o}.norm2", f"{t}.feedforward_layernorm"),
        ]
    return rules


def qformer_rules(cfg: Blip2Config, theirs: str = "") -> list[Rule]:
    """Our ``qformer.*`` and ``clm_head.*`` against a ``QformerForCLM`` state dict (its keys
    under ``theirs``, e.g. ``"qformer."`` inside ``BLIP2``)."""
    m, e = f"{theirs}model", f"{theirs}model.embeddings"
    rules = [
        same("qformer.token.weight", f"{e}.token_embeddings.weight"),
        same("qformer.pos", f"{e}.position_embeddings.weight"),
        *affine("qformer.norm_embed", f"{e}.layernorm"),
        *affine("clm_head.dense", f"{theirs}head.linear_1"),
        *affine("clm_head.norm", f"{theirs}head.layernorm"),
        *affine("clm_head.out", f"{theirs}head.linear_2"),
    ]
    for i in range(cfg.layers):
        o, t = f"qformer.transformer.blocks.{i}", f"{m}.encoder.layers.{i}"
        rules += [
            *fused(f"{o}.attn.qkv", f"{t}.self_attention", ("q_proj", "k_proj", "v_proj")),
            *affine(f"{o}.attn.out", f"{t}.self_attention.output_proj"),
            *affine(f"{o}.norm1", f"{t}.self_attn_layernorm"),
            *affine(f"{o}.mlp.fc1", f"{t}.feedforward.model.0"),
            *affine(f"{o}.mlp.fc2", f"{t}.feedforward.model.2"),
            *affine(f"{o}.norm2", f"{t}.feedforward_layernorm"),
            *affine(f"{o}.mlp_query.fc1", f"{t}.feedforward_query.model.0"),
            *affine(f"{o}.mlp_query.fc2", f"{t}.feedforward_query.model.2"),
            *affine(f"{o}.norm2_query", f"{t}.feedforward_layernorm_query"),
        ]
        if cfg.has_cross(i):
            rules += [
                *affine(f"{o}.cross.q", f"{t}.cross_attention.q_proj"),
                *fused(f"{o}.cross.kv", f"{t}.cross_attention", ("k_proj", "v_proj")),
                *affine(f"{o}.cross.out", f"{t}.cross_attention.output_proj"),
                *affine(f"{o}.norm_cross", f"{t}.cross_attn_layernorm"),
            ]
    return rules


def _rules(cfg: Blip2Config) -> list[Rule]:
    return [
        *_vision_rules(cfg),
        *affine("ln_vision", "ln_vision"),
        unbatched("query_tokens", "query_tokens", 1),
        *qformer_rules(cfg, "qformer."),
        *affine("vision_proj", "vision_proj"),
        *affine("text_proj", "text_proj"),
        *affine("itm_head", "loss.itm_head"),
        Rule("log_temp", ("loss.temp",), to_ours=torch.log, to_theirs=torch.exp),
    ]


def _stage_one(cfg: Blip2Config) -> None:
    if cfg.lm is not None:
        raise ValueError(
            "cfg has an lm: TorchMultimodal's BLIP2 has none; convert with the stage-one "
            "config, then add lm and lm_proj params"
        )


def from_torchmultimodal(
    state_dict: Mapping[str, torch.Tensor], cfg: Blip2Config, *, dtype=torch.float32
) -> Params:
    """Our params from a TorchMultimodal ``BLIP2`` state dict with its ``Blip2Phase1Loss``'s
    keys under ``loss.`` (see the module docstring), of ``cfg``'s sizes (stage one).

    Raises :class:`fmm.convert.ConversionError` listing every missing, unexpected and
    mis-shaped key.
    """
    _stage_one(cfg)
    like = init(cfg, random.key(0).to("meta"))
    return import_state_dict(
        state_dict, _rules(cfg), like=like, source=_SOURCE, ignore=_BUFFERS, dtype=dtype
    )


def to_torchmultimodal(params: Params, cfg: Blip2Config) -> dict[str, torch.Tensor]:
    """The ``BLIP2`` + ``loss.``-prefixed ``Blip2Phase1Loss`` state dict of ``params``
    (without the ``position_ids`` buffer: load it with ``strict=False``, or add it);
    the inverse of :func:`from_torchmultimodal`."""
    _stage_one(cfg)
    return export_state_dict(params, _rules(cfg))


def qformer_from_torchmultimodal(
    state_dict: Mapping[str, torch.Tensor], cfg: Blip2Config, *, dtype=torch.float32
) -> Params:
    """``{"qformer": ..., "clm_head": ...}`` from a TorchMultimodal ``QformerForCLM`` state
    dict: the Q-Former alone, for a caller who keeps the rest of the params.

    Example: ``params = {**params, **qformer_from_torchmultimodal(clm.state_dict(), cfg)}``.
    """
    full = init(cfg, random.key(0).to("meta"))
    like = {"qformer": full["qformer"], "clm_head": full["clm_head"]}
    return import_state_dict(
        state_dict, qformer_rules(cfg), like=like, source="TorchMultimodal QformerForCLM",
        ignore=("model.embeddings.position_ids",), dtype=dtype,
    )  # fmt: skip
