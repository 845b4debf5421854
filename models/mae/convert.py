"""Converters between our MAE params and TorchMultimodal's ``MaskedAutoEncoder`` state
dicts (``image_mae`` / ``vit_l_16_image_mae`` and the ``audio_mae`` presets), written as
:class:`fmm.convert.Rule` tables.

Theirs keeps the class and mask tokens as ``[1, 1, D]``, ours as ``[D]``. Their two
position tables are frozen sin-cos parameters; ours are computed from the config
(:func:`models.mae.model.positions`), so the import checks that the checkpoint's equal
ours and the export writes ours. Everything else keeps its layout.

Example::

    params = from_torchmultimodal(tmm_model.state_dict(), cfg)
    tmm_model.load_state_dict(to_torchmultimodal(params, cfg))
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fmm import random
from fmm.convert import (
    ConversionError,
    Rule,
    affine,
    export_state_dict,
    import_state_dict,
    same,
    unbatched,
)
from models.mae.config import MAEConfig
from models.mae.model import Params, init, positions

_SOURCE = "TorchMultimodal MaskedAutoEncoder"
_POSITIONS = {
    "embeddings.position_embeddings": "width",
    "decoder_embed.position_embeddings": "decoder_width",
}


def _vit_blocks(ours: str, theirs: str, layers: int) -> list[Rule]:
    rules: list[Rule] = []
    for i in range(layers):
        o, t = f"{ours}.blocks.{i}", f"{theirs}.layer.{i}"
        rules += affine(f"{o}.attn.qkv", f"{t}.attention.input_proj")
        rules += affine(f"{o}.attn.out", f"{t}.attention.output_proj")
        rules += affine(f"{o}.norm1", f"{t}.attention_layernorm")
        rules += affine(f"{o}.mlp.fc1", f"{t}.feedforward.model.0")
        rules += affine(f"{o}.mlp.fc2", f"{t}.feedforward.model.2")
        rules += affine(f"{o}.norm2", f"{t}.feedforward_layernorm")
    return rules


def _swin_blocks(ours: str, theirs: str, layers: int) -> list[Rule]:
    rules: list[Rule] = []
    for i in range(layers):
        o, t = f"{ours}.blocks.{i}", f"{theirs}.layers.{i}"
        rules.append(same(f"{o}.attn.tau", f"{t}.attn.tau"))
        rules += affine(f"{o}.attn.qkv", f"{t}.attn.qkv")
        rules += affine(f"{o}.attn.out", f"{t}.attn.proj")
        # Their bias MLP is Linear, ReLU, Dropout, Linear.
        rules += affine(f"{o}.attn.cpb.fc1", f"{t}.attn.meta_mlp.model.0")
        rules += affine(f"{o}.attn.cpb.fc2", f"{t}.attn.meta_mlp.model.3")
        rules += affine(f"{o}.norm1", f"{t}.norm1")
        rules += affine(f"{o}.mlp.fc1", f"{t}.mlp.model.0")
        rules += affine(f"{o}.mlp.fc2", f"{t}.mlp.model.2")
        rules += affine(f"{o}.norm2", f"{t}.norm2")
    return rules


def _rules(cfg: MAEConfig) -> list[Rule]:
    rules = [
        *affine("patch", "embeddings.conv_projection"),
        unbatched("cls", "embeddings.cls_token", 2),
        *_vit_blocks("transformer", "encoder", cfg.layers),
        *affine("norm", "encoder.final_layer_norm"),
        *affine("decoder.embed", "decoder_embed.decoder_embed"),
        unbatched("decoder.mask_token", "decoder_embed.mask_token", 2),
    ]
    if cfg.decoder == "vit":
        rules += _vit_blocks("decoder.transformer", "decoder_transformer", cfg.decoder_layers)
    else:
        rules += _swin_blocks("decoder.transformer", "decoder_transformer", cfg.decoder_layers)
    rules += affine("decoder.norm", "decoder_transformer.final_layer_norm")
    rules += affine("decoder.pred", "decoder_pred")
    return rules


def from_torchmultimodal(
    state_dict: Mapping[str, torch.Tensor], cfg: MAEConfig, *, dtype=torch.float32
) -> Params:
    """Our params from a TorchMultimodal ``MaskedAutoEncoder`` state dict (e.g.
    ``image_mae().state_dict()``, ``vit_b_16_audio_mae().state_dict()``) of ``cfg``'s sizes.

    Raises :class:`fmm.convert.ConversionError` listing every missing, unexpected and
    mis-shaped key, or naming a position table that is not the fixed sin-cos one.
    """
    like = init(cfg, random.key(0).to("meta"))
    params = import_state_dict(
        state_dict, _rules(cfg), like=like, source=_SOURCE, ignore=_POSITIONS, dtype=dtype
    )
    for name, width in _POSITIONS.items():
        if name not in state_dict:
            continue
        theirs = state_dict[name].detach().float().reshape(-1, getattr(cfg, width))
        ours = positions(cfg, getattr(cfg, width), device=theirs.device)
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, atol=1e-4):
            raise ConversionError(
                f"{_SOURCE}: {name} is not the fixed 2-d sin-cos table of {list(cfg.grid)} "
                "patches that MAE uses (learned positions are not supported)"
            )
    return params


def to_torchmultimodal(params: Params, cfg: MAEConfig) -> dict[str, torch.Tensor]:
    """The state dict TorchMultimodal's ``MaskedAutoEncoder`` of ``cfg``'s sizes loads
    strictly (its sin-cos tables included); the inverse of :func:`from_torchmultimodal`."""
    sd = export_state_dict(params, _rules(cfg))
    like = params["patch"]["weight"]
    for name, width in _POSITIONS.items():
        table = positions(cfg, getattr(cfg, width), device=like.device, dtype=like.dtype)
        sd[name] = table[None].clone()
    return sd
