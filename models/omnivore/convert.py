"""Converters between our Omnivore params and TorchMultimodal's ``Omnivore`` state dicts
(``omnivore_swin_t`` / ``_s`` / ``_b``: a ``SwinTransformer3d`` encoder and a
``ModuleDict`` of heads), written as :class:`fmm.convert.Rule` tables."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fmm import random
from fmm.convert import Rule, export_state_dict, import_state_dict, same
from fmm.nn.swin import relative_position_index
from models.omnivore.config import OmnivoreConfig
from models.omnivore.model import Params, init

_SOURCE = "TorchMultimodal Omnivore"


def _linear(ours: str, theirs: str, *, bias: bool = True) -> list[Rule]:
    names = ("weight", "bias") if bias else ("weight",)
    return [same(f"{ours}.{n}", f"{theirs}.{n}") for n in names]


def _head_prefix(name: str, modality: str, state_dict: Mapping | None) -> str:
    # Kinetics' head is nn.Sequential(Dropout, Linear): its weights sit at index 1.
    seq = f"heads.{name}.1"
    if state_dict is not None:
        return seq if f"{seq}.weight" in state_dict else f"heads.{name}"
    return seq if modality == "video" else f"heads.{name}"


def _rules(cfg: OmnivoreConfig, state_dict: Mapping | None = None) -> list[Rule]:
    rules: list[Rule] = []
    for ours, theirs in (("patch_embed", "patch_embed"), ("depth_embed", "depth_patch_embed")):
        pre = f"encoder.patch_embed.{theirs}"
        rules += _linear(f"{ours}.proj", f"{pre}.proj") + _linear(f"{ours}.norm", f"{pre}.norm")
    for i, depth in enumerate(cfg.depths):
        feature = f"encoder.features.{2 * i}"  # stages and mergings alternate in features
        for j in range(depth):
            ours, theirs = f"stages.{i}.blocks.{j}", f"{feature}.{j}"
            rules += _linear(f"{ours}.norm1", f"{theirs}.norm1")
            rules += _linear(f"{ours}.attn.qkv", f"{theirs}.attn.qkv")
            rules += _linear(f"{ours}.attn.out", f"{theirs}.attn.proj")
            rules.append(
                same(f"{ours}.attn.rel_bias", f"{theirs}.attn.relative_position_bias_table")
            )
            rules += _linear(f"{ours}.norm2", f"{theirs}.norm2")
            rules += _linear(f"{ours}.mlp.fc1", f"{theirs}.mlp.0")
            rules += _linear(f"{ours}.mlp.fc2", f"{theirs}.mlp.3")
        if i < len(cfg.depths) - 1:
            merge = f"encoder.features.{2 * i + 1}"
            rules += _linear(f"stages.{i}.merge.norm", f"{merge}.norm")
            rules += _linear(f"stages.{i}.merge.reduction", f"{merge}.reduction", bias=False)
    rules += _linear("norm", "encoder.norm")
    for name, _, modality in cfg.heads:
        rules += _linear(f"heads.{name}", _head_prefix(name, modality, state_dict))
    return rules


def _index_keys(cfg: OmnivoreConfig) -> list[str]:
    """The relative position index buffers: fixed by the window, so not params."""
    return [
        f"encoder.features.{2 * i}.{j}.attn.relative_position_index"
        for i, depth in enumerate(cfg.depths)
        for j in range(depth)
    ]


def from_torchmultimodal(
    state_dict: Mapping[str, torch.Tensor], cfg: OmnivoreConfig, *, dtype=torch.float32
) -> Params:
    """Our params from the state dict of TorchMultimodal's ``Omnivore`` (e.g.
    ``omnivore_swin_t().state_dict()``), whose heads are named as ``cfg.heads``.

    Raises :class:`fmm.convert.ConversionError` listing every missing, unexpected and
    mis-shaped key. Example: ``params = from_torchmultimodal(model.state_dict(), cfg)``.
    """
    like = init(cfg, random.key(0).to("meta"))
    return import_state_dict(
        state_dict,
        _rules(cfg, state_dict),
        like=like,
        source=_SOURCE,
        ignore=_index_keys(cfg),
        dtype=dtype,
    )


def to_torchmultimodal(params: Params, cfg: OmnivoreConfig) -> dict[str, torch.Tensor]:
    """The state dict TorchMultimodal's ``Omnivore`` loads strictly (its relative position
    index buffers included); the inverse of :func:`from_torchmultimodal`."""
    sd = export_state_dict(params, _rules(cfg))
    index = relative_position_index(cfg.window)
    sd.update({k: index.clone() for k in _index_keys(cfg)})
    return sd
