"""MDETR <-> TorchMultimodal's state dicts (``mdetr_resnet101`` / ``mdetr_for_phrase_grounding``).

With ``cfg.contrastive_dim`` set the layout is ``MDETRForPhraseGrounding``'s (the model
under ``model.``, the two alignment projections beside it); without, the bare ``MDETR`` of
``mdetr_resnet101``. The backbone is torchvision's ResNet under
``image_backbone.body`` (``downsample.0`` / ``.1`` are our ``downsample.conv`` / ``.bn``),
the text encoder TorchMultimodal's RoBERTa (``nn.TransformerEncoderLayer`` blocks, whose
fused ``in_proj`` is our ``qkv``). The decoder's cross-attention stores queries, keys and
values in one ``in_proj`` too, while ours keeps ``q`` and ``kv`` apart: the converter
splits it into ``in_proj_weight[q]`` / ``in_proj_weight[kv]`` entries (the names its errors
use) before the rule table and joins them after.

Example::

    tmm = torchmultimodal.models.mdetr.model.mdetr_for_phrase_grounding()
    params = from_torchmultimodal(tmm.state_dict(), mdetr_resnet101())
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fmm import random
from fmm.convert import Rule, affine, export_state_dict, import_state_dict, same
from models.mdetr.config import MDETRConfig
from models.mdetr.model import init

SOURCE = "TorchMultimodal MDETR"


def _bn(ours: str, theirs: str) -> list[Rule]:
    return affine(ours, theirs, ("weight", "bias", "running_mean", "running_var"))


def _backbone_rules(cfg: MDETRConfig, ours: str, theirs: str) -> list[Rule]:
    rules = [
        same(f"{ours}.conv1.weight", f"{theirs}.conv1.weight"),
        *_bn(f"{ours}.bn1", f"{theirs}.bn1"),
    ]
    for s, depth in enumerate(cfg.backbone.depths, 1):
        for i in range(depth):
            o, t = f"{ours}.layer{s}.{i}", f"{theirs}.layer{s}.{i}"
            for c in (1, 2, 3):
                rules += [
                    same(f"{o}.conv{c}.weight", f"{t}.conv{c}.weight"),
                    *_bn(f"{o}.bn{c}", f"{t}.bn{c}"),
                ]
            if i == 0:
                rules.append(same(f"{o}.downsample.conv.weight", f"{t}.downsample.0.weight"))
                rules += _bn(f"{o}.downsample.bn", f"{t}.downsample.1")
    return rules


def _block_rules(o: str, t: str, *, mlp: tuple[str, str], norms: tuple[str, ...]) -> list[Rule]:
    rules = [
        same(f"{o}.attn.qkv.weight", f"{t}.self_attn.in_proj_weight"),
        same(f"{o}.attn.qkv.bias", f"{t}.self_attn.in_proj_bias"),
        *affine(f"{o}.attn.out", f"{t}.self_attn.out_proj"),
        *affine(f"{o}.mlp.fc1", f"{t}.{mlp[0]}"),
        *affine(f"{o}.mlp.fc2", f"{t}.{mlp[1]}"),
    ]
    for ours, theirs in zip(("norm1", "norm2", "norm_cross"), norms):
        rules += affine(f"{o}.{ours}", f"{t}.{theirs}")
    return rules


def _cross_rules(o: str, t: str) -> list[Rule]:
    c = f"{t}.cross_attn_image"
    return [
        same(f"{o}.cross.q.weight", f"{c}.in_proj_weight[q]"),
        same(f"{o}.cross.q.bias", f"{c}.in_proj_bias[q]"),
        same(f"{o}.cross.kv.weight", f"{c}.in_proj_weight[kv]"),
        same(f"{o}.cross.kv.bias", f"{c}.in_proj_bias[kv]"),
        *affine(f"{o}.cross.out", f"{c}.out_proj"),
    ]


def tmm_rules(cfg: MDETRConfig) -> list[Rule]:
    """Our names <-> TorchMultimodal's (before the cross-attention split, see the module doc)."""
    m = "model." if cfg.contrastive_dim is not None else ""
    text = f"{m}text_encoder"
    rules = [
        *_backbone_rules(cfg, "backbone", f"{m}image_backbone.body"),
        *affine("image_proj", f"{m}image_projection"),
        same("text.token.weight", f"{text}.embeddings.word_embeddings.weight"),
        same("text.pos", f"{text}.embeddings.position_embeddings.weight"),
        same("text.token_type.weight", f"{text}.embeddings.token_type_embeddings.weight"),
        *affine("text.norm_embed", f"{text}.embeddings.layer_norm"),
        *affine("text_proj.fc", f"{m}text_projection.fc"),
        *affine("text_proj.norm", f"{m}text_projection.layer_norm"),
        *affine("decoder.norm", f"{m}transformer.decoder.norm"),
        same("query", f"{m}query_embed.weight"),
        *affine("class_head", f"{m}class_embed"),
    ]
    for i in range(cfg.text.layers):
        rules += _block_rules(
            f"text.transformer.blocks.{i}", f"{text}.encoder.layers.layers.{i}",
            mlp=("linear1", "linear2"), norms=("norm1", "norm2"),
        )  # fmt: skip
    # TorchMultimodal's MLP has a Dropout module between its layers only when dropout > 0.
    mlp = ("mlp.model.0", "mlp.model.3" if cfg.dropout > 0 else "mlp.model.2")
    for i in range(cfg.encoder_layers):
        rules += _block_rules(
            f"encoder.blocks.{i}",
            f"{m}transformer.encoder.layers.{i}",
            mlp=mlp,
            norms=("norm1", "norm2"),
        )
    for i in range(cfg.decoder_layers):
        o, t = f"decoder.blocks.{i}", f"{m}transformer.decoder.layers.{i}"
        rules += _block_rules(o, t, mlp=mlp, norms=("norm1", "norm4", "norm3")) + _cross_rules(o, t)
    for j, name in enumerate(("fc1", "fc2", "fc3")):
        rules += affine(f"box_head.{name}", f"{m}bbox_embed.model.{2 * j}")
    if cfg.contrastive_dim is not None:
        rules += affine("align_image", "contrastive_alignment_image_projection")
        rules += affine("align_text", "contrastive_alignment_text_projection")
    return rules


def _split_cross(state_dict: Mapping[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state_dict.items():
        if ".cross_attn_image.in_proj_" in name and isinstance(value, torch.Tensor):
            out[f"{name}[q]"], out[f"{name}[kv]"] = value[:width], value[width:]
        else:
            out[name] = value
    return out


def _join_cross(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state_dict.items():
        if name.endswith("[q]"):
            base = name[: -len("[q]")]
            out[base] = torch.cat((value, state_dict[f"{base}[kv]"]))
        elif not name.endswith("[kv]"):
            out[name] = value
    return out


def from_torchmultimodal(
    state_dict: Mapping[str, torch.Tensor],
    cfg: MDETRConfig,
    *,
    dtype: torch.dtype | None = torch.float32,
) -> dict:
    """Our params from a TorchMultimodal MDETR ``state_dict`` laid out for ``cfg`` (see the
    module doc). Raises :class:`fmm.convert.ConversionError` listing every missing,
    unexpected and mis-shaped key."""
    like = init(cfg, random.key(0).to("meta"))
    return import_state_dict(
        _split_cross(state_dict, cfg.width), tmm_rules(cfg), like=like, source=SOURCE, dtype=dtype
    )


def to_torchmultimodal(params: dict, cfg: MDETRConfig) -> dict[str, torch.Tensor]:
    """TorchMultimodal's ``state_dict`` of our ``params``: the inverse of :func:`from_torchmultimodal`."""
    return _join_cross(export_state_dict(params, tmm_rules(cfg)))
