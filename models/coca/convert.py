"""CoCa weights from and to TorchMultimodal's ``CoCaModel`` and open_clip's ``CoCa``.

The two layouts are different models (see :mod:`models.coca.config`), so each has its own
config switches and its own rule table (:mod:`fmm.convert`): import and export read the
same table both ways, and a state dict of another size raises one
:class:`fmm.convert.ConversionError` listing every missing, unexpected and mis-shaped key.

Example::

    cfg = coca_vit_b32()
    params = from_torchmultimodal(tmm_model.state_dict(), cfg)
    oc_cfg = open_clip_style(coca_vit_b32())
    params = from_open_clip(open_clip_model.state_dict(), oc_cfg)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fmm import random
from fmm.convert import (
    Rule,
    affine,
    concat,
    export_state_dict,
    fused,
    import_state_dict,
    same,
    transpose,
    unbatched,
)
from models.coca.config import CoCaConfig
from models.coca.model import Params, init

__all__ = ["from_open_clip", "from_torchmultimodal", "to_open_clip", "to_torchmultimodal"]


# --------------------------------------------------------------------------- TorchMultimodal


def _tmm_block(o: str, t: str, cross: bool) -> list[Rule]:
    rules = [
        *fused(f"{o}.attn.qkv", f"{t}.attention", ("q_proj", "k_proj", "v_proj")),
        *affine(f"{o}.attn.out", f"{t}.attention.output_proj"),
        *affine(f"{o}.norm1", f"{t}.attention_layernorm"),
        *affine(f"{o}.norm2", f"{t}.feedforward_layernorm"),
        *affine(f"{o}.mlp.fc1", f"{t}.feedforward.model.0"),
        *affine(f"{o}.mlp.fc2", f"{t}.feedforward.model.2"),
    ]
    if cross:
        rules += [
            *affine(f"{o}.cross.q", f"{t}.cross_attention.q_proj"),
            *fused(f"{o}.cross.kv", f"{t}.cross_attention", ("k_proj", "v_proj")),
            *affine(f"{o}.cross.out", f"{t}.cross_attention.output_proj"),
            *affine(f"{o}.norm_cross", f"{t}.cross_attention_layernorm"),
        ]
    return rules


def _tmm_vit_block(o: str, t: str) -> list[Rule]:
    return [
        *affine(f"{o}.attn.qkv", f"{t}.attention.input_proj"),
        *affine(f"{o}.attn.out", f"{t}.attention.output_proj"),
        *affine(f"{o}.norm1", f"{t}.attention_layernorm"),
        *affine(f"{o}.norm2", f"{t}.feedforward_layernorm"),
        *affine(f"{o}.mlp.fc1", f"{t}.feedforward.model.0"),
        *affine(f"{o}.mlp.fc2", f"{t}.feedforward.model.2"),
    ]


def _tmm_pooler(o: str, t: str) -> list[Rule]:
    return [
        same(f"{o}.query", f"{t}.query"),
        *affine(f"{o}.attn.q", f"{t}.attn.q_proj"),
        *fused(f"{o}.attn.kv", f"{t}.attn", ("k_proj", "v_proj")),
        *affine(f"{o}.attn.out", f"{t}.attn.output_proj"),
        *affine(f"{o}.norm_query", f"{t}.ln_q"),
        *affine(f"{o}.norm_context", f"{t}.ln_k"),
        *affine(f"{o}.norm", f"{t}.ln_post"),
    ]


def _tmm_rules(cfg: CoCaConfig) -> list[Rule]:
    emb, enc = "vision_encoder.embeddings", "vision_encoder.encoder"
    rules = [*affine("image.patch", f"{emb}.conv_projection")]
    if not cfg.patch_bias:
        rules = [same("image.patch.weight", f"{emb}.conv_projection.weight")]
    rules.append(unbatched("image.pos", f"{emb}.position_embeddings", 1))
    if cfg.image_cls:
        rules.append(unbatched("image.cls", f"{emb}.cls_token", 2))
    rules += [
        r for i in range(cfg.image_layers)
        for r in _tmm_vit_block(f"image.transformer.blocks.{i}", f"{enc}.layer.{i}")
    ]  # fmt: skip
    if cfg.pooler == "cascade":
        rules += _tmm_pooler("pool.caption", "vision_pooler.poolers.0")
        rules += _tmm_pooler("pool.contrastive", "vision_pooler.poolers.1")
    else:
        rules += _tmm_pooler("pool.caption", "vision_pooler")
    td, mm = "text_decoder", "multimodal_decoder.transformer_decoder"
    rules += [
        same("image_proj.weight", "vision_proj.weight"),
        same("text.token.weight", f"{td}.embeddings.token_embeddings.weight"),
        same("text.pos", f"{td}.embeddings.position_embeddings"),
        same("text.cls", f"{td}.embeddings.cls_embedding"),
        *affine("text.norm", f"{td}.ln_final"),
        same("text.proj.weight", f"{td}.text_projection.weight"),
        *affine("decoder.norm", f"{mm}.final_layer_norm"),
        same("decoder.head.weight", "multimodal_decoder.output_projection.weight"),
    ]
    rules += [
        r for i in range(cfg.text_layers)
        for r in _tmm_block(f"text.transformer.blocks.{i}", f"{td}.transformer_decoder.layer.{i}",
                            cross=False)
    ]  # fmt: skip
    rules += [
        r for i in range(cfg.decoder_layers)
        for r in _tmm_block(f"decoder.transformer.blocks.{i}", f"{mm}.layer.{i}", cross=True)
    ]  # fmt: skip
    return rules


def _without_scale(params: Params) -> Params:
    return {k: v for k, v in params.items() if k != "logit_scale"}


def _check_tmm(cfg: CoCaConfig) -> None:
    if cfg.decoder != "fused":
        raise ValueError(
            f"cfg.decoder must be 'fused' for TorchMultimodal's CoCa, got {cfg.decoder!r}"
        )


def from_torchmultimodal(state_dict: Mapping[str, torch.Tensor], cfg: CoCaConfig) -> Params:
    """Params from a TorchMultimodal ``CoCaModel`` state dict (or ``CoCaForPretraining``'s:
    its ``model.`` prefix stripped and ``contrastive_loss.logit_scale`` read; a bare
    ``CoCaModel`` has no temperature, so ``cfg.init_logit_scale`` is used).

    Example: ``params = from_torchmultimodal(coca_vit_b_32().state_dict(), coca_vit_b32())``.
    """
    _check_tmm(cfg)
    sd = dict(state_dict)
    scale = sd.pop("contrastive_loss.logit_scale", None)
    if scale is not None:
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
    like = _without_scale(init(cfg, random.key(0).to("meta")))
    params = import_state_dict(sd, _tmm_rules(cfg), like=like, source="TorchMultimodal CoCa")
    value = torch.tensor(cfg.init_logit_scale) if scale is None else scale.detach().float()
    params["logit_scale"] = value.reshape(()).clone()
    return params


def to_torchmultimodal(params: Params, cfg: CoCaConfig) -> dict[str, torch.Tensor]:
    """A TorchMultimodal ``CoCaModel`` state dict of ``params`` (the temperature, which
    ``CoCaModel`` does not hold, is left out)."""
    _check_tmm(cfg)
    return export_state_dict(_without_scale(params), _tmm_rules(cfg))


# --------------------------------------------------------------------------- open_clip


def _oc_block(o: str, t: str) -> list[Rule]:
    return [
        same(f"{o}.attn.qkv.weight", f"{t}.attn.in_proj_weight"),
        same(f"{o}.attn.qkv.bias", f"{t}.attn.in_proj_bias"),
        *affine(f"{o}.attn.out", f"{t}.attn.out_proj"),
        *affine(f"{o}.norm1", f"{t}.ln_1"),
        *affine(f"{o}.norm2", f"{t}.ln_2"),
        *affine(f"{o}.mlp.fc1", f"{t}.mlp.c_fc"),
        *affine(f"{o}.mlp.fc2", f"{t}.mlp.c_proj"),
    ]


def _oc_cross_block(o: str, t: str) -> list[Rule]:
    # open_clip packs the cross-attention's q/k/v in one in_proj; _unpack split it first.
    return [
        same(f"{o}.cross.q.weight", f"{t}.attn.in_proj_weight:q"),
        same(f"{o}.cross.q.bias", f"{t}.attn.in_proj_bias:q"),
        same(f"{o}.cross.kv.weight", f"{t}.attn.in_proj_weight:kv"),
        same(f"{o}.cross.kv.bias", f"{t}.attn.in_proj_bias:kv"),
        *affine(f"{o}.cross.out", f"{t}.attn.out_proj"),
        *affine(f"{o}.norm_cross", f"{t}.ln_1"),
        *affine(f"{o}.norm_context", f"{t}.ln_1_kv"),
        *affine(f"{o}.norm2", f"{t}.ln_2"),
        *affine(f"{o}.mlp.fc1", f"{t}.mlp.c_fc"),
        *affine(f"{o}.mlp.fc2", f"{t}.mlp.c_proj"),
    ]


def _pool_packed(cfg: CoCaConfig) -> bool:
    # nn.MultiheadAttention keeps q/k/v in one in_proj_weight when the attended width equals
    # its own (here: a text width equal to the image width), separate ones otherwise.
    return cfg.text_width == cfg.image_width


def _oc_pool_weights(cfg: CoCaConfig, p: str, v: str) -> list[Rule]:
    if _pool_packed(cfg):
        return [
            same(f"{p}.attn.q.weight", f"{v}.attn.in_proj_weight:q"),
            same(f"{p}.attn.kv.weight", f"{v}.attn.in_proj_weight:kv"),
        ]
    return [
        same(f"{p}.attn.q.weight", f"{v}.attn.q_proj_weight"),
        concat(f"{p}.attn.kv.weight", [f"{v}.attn.k_proj_weight", f"{v}.attn.v_proj_weight"]),
    ]


def _oc_rules(cfg: CoCaConfig) -> list[Rule]:
    p, v = "pool.caption", "visual.attn_pool"
    rules = [
        same("image.patch.weight", "visual.conv1.weight"),
        same("image.cls", "visual.class_embedding"),
        same("image.pos", "visual.positional_embedding"),
        *affine("image.norm_pre", "visual.ln_pre"),
        same(f"{p}.query", f"{v}.query"),
        *_oc_pool_weights(cfg, p, v),
        same(f"{p}.attn.q.bias", f"{v}.attn.in_proj_bias:q"),
        same(f"{p}.attn.kv.bias", f"{v}.attn.in_proj_bias:kv"),
        *affine(f"{p}.attn.out", f"{v}.attn.out_proj"),
        *affine(f"{p}.norm_query", f"{v}.ln_q"),
        *affine(f"{p}.norm_context", f"{v}.ln_k"),
        *affine(f"{p}.norm", "visual.ln_post"),
        Rule("image_proj.weight", ("visual.proj",), to_ours=transpose, to_theirs=transpose),
        same("text.token.weight", "text.token_embedding.weight"),
        same("text.pos", "text.positional_embedding"),
        same("text.cls", "text.cls_emb"),
        *affine("text.norm", "text.ln_final"),
        Rule("text.proj.weight", ("text.text_projection",), to_ours=transpose, to_theirs=transpose),
        *affine("decoder.norm", "text_decoder.ln_final"),
        Rule("decoder.head.weight", ("text_decoder.text_projection",), to_ours=transpose,
             to_theirs=transpose),
        same("logit_scale", "logit_scale"),
    ]  # fmt: skip
    rules += [
        r for i in range(cfg.image_layers)
        for r in _oc_block(f"image.transformer.blocks.{i}", f"visual.transformer.resblocks.{i}")
    ]  # fmt: skip
    rules += [
        r for i in range(cfg.text_layers)
        for r in _oc_block(f"text.transformer.blocks.{i}", f"text.transformer.resblocks.{i}")
    ]  # fmt: skip
    for i in range(cfg.decoder_layers):
        o = "decoder.transformer.blocks"
        rules += _oc_block(f"{o}.{2 * i}", f"text_decoder.resblocks.{i}")
        rules += _oc_cross_block(f"{o}.{2 * i + 1}", f"text_decoder.cross_attn.{i}")
    return rules


def _packed(cfg: CoCaConfig) -> list[str]:
    """open_clip's packed q/k/v tensors our params keep as separate q and kv."""
    names = ["visual.attn_pool.attn.in_proj_bias"]
    if _pool_packed(cfg):
        names.append("visual.attn_pool.attn.in_proj_weight")
    for i in range(cfg.decoder_layers):
        t = f"text_decoder.cross_attn.{i}.attn"
        names += [f"{t}.in_proj_weight", f"{t}.in_proj_bias"]
    return names


def _check_oc(cfg: CoCaConfig) -> None:
    want = {"image_cls": True, "image_norm_pre": True, "patch_bias": False,
            "pooler": "parallel", "decoder": "split"}  # fmt: skip
    bad = [f"{k}={getattr(cfg, k)!r}" for k, v in want.items() if getattr(cfg, k) != v]
    if bad:
        raise ValueError(
            f"cfg is not laid out as open_clip's CoCa ({', '.join(bad)}): pass "
            f"models.coca.open_clip_style(cfg)"
        )


def from_open_clip(state_dict: Mapping[str, torch.Tensor], cfg: CoCaConfig) -> Params:
    """Params from an open_clip ``CoCa`` state dict; ``cfg`` must be laid out as open_clip's
    (:func:`models.coca.open_clip_style`).

    Example: ``params = from_open_clip(model.state_dict(), open_clip_style(coca_vit_b32()))``.
    """
    _check_oc(cfg)
    sd, d = dict(state_dict), cfg.text_width
    for name in _packed(cfg):
        if name in sd:
            packed = sd.pop(name)
            sd[f"{name}:q"], sd[f"{name}:kv"] = packed[:d], packed[d:]
    like = init(cfg, random.key(0).to("meta"))
    return import_state_dict(sd, _oc_rules(cfg), like=like, source="open_clip CoCa")


def to_open_clip(params: Params, cfg: CoCaConfig) -> dict[str, torch.Tensor]:
    """An open_clip ``CoCa`` state dict of ``params`` (``cfg`` laid out as open_clip's)."""
    _check_oc(cfg)
    sd = export_state_dict(params, _oc_rules(cfg))
    for name in _packed(cfg):
        sd[name] = torch.cat([sd.pop(f"{name}:q"), sd.pop(f"{name}:kv")])
    return sd
