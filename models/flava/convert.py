"""FLAVA weights from and to TorchMultimodal's ``flava_model`` (a ``FLAVAModel``).

TorchMultimodal keeps separate ``query``/``key``/``value`` projections; ours is one fused
``attn.qkv`` (q, k, v stacked along the output axis), so the three are concatenated. Its
class tokens, mask token and image positions carry leading ``[1, 1, D]`` / ``[1, N, D]``
axes that ours drop. Everything else keeps its layout. The pretraining heads
(``params["heads"]``) are not part of ``flava_model``: :func:`from_torchmultimodal` returns
the encoders and projections only (add heads with :func:`models.flava.init_heads`), and
:func:`to_torchmultimodal` ignores ``heads``. Conversions are strict: one
:class:`fmm.convert.ConversionError` lists every missing, unexpected and mis-shaped key.

Example::

    params = from_torchmultimodal(tmm_model.state_dict(), cfg)
    tmm_model.load_state_dict(to_torchmultimodal(params, cfg))
"""

from __future__ import annotations

from collections.abc import Mapping
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
    unbatched,
)
from models.flava.config import FLAVAConfig
from models.flava.model import init_model

Params = dict[str, Any]


def _blocks(ours: str, theirs: str, layers: int, fc2_index: int) -> list[Rule]:
    rules: list[Rule] = []
    for i in range(layers):
        o, t = f"{ours}.blocks.{i}", f"{theirs}.layer.{i}"
        rules += fused(f"{o}.attn.qkv", f"{t}.attention", ("query", "key", "value"))
        rules += affine(f"{o}.attn.out", f"{t}.attention.output")
        rules += affine(f"{o}.norm1", f"{t}.attention_layernorm")
        rules += affine(f"{o}.mlp.fc1", f"{t}.feedforward.model.0")
        rules += affine(f"{o}.mlp.fc2", f"{t}.feedforward.model.{fc2_index}")
        rules += affine(f"{o}.norm2", f"{t}.feedforward_layernorm")
    return rules


def tmm_rules(cfg: FLAVAConfig) -> list[Rule]:
    """The key map between :func:`models.flava.init_model`'s params and a ``FLAVAModel``
    state dict."""
    # TorchMultimodal's MLP puts a Dropout module between activation and fc2 when dropout > 0.
    fc2 = 3 if cfg.dropout > 0 else 2
    img, txt, mm = "image_encoder", "text_encoder", "mm_encoder"
    emb = f"{img}.embeddings"
    rules = [
        *affine("image.patch", f"{emb}.patch_embeddings.projection"),
        unbatched("image.cls", f"{emb}.cls_token", 2),
        unbatched("image.pos", f"{emb}.position_embeddings", 1),
    ]
    if cfg.image_masking:
        rules.append(unbatched("image.mask_token", f"{emb}.mask_token", 2))
    rules += _blocks("image.transformer", f"{img}.encoder", cfg.image_layers, fc2)
    rules += affine("image.norm", f"{img}.layernorm")
    rules += affine("image.pooler", f"{img}.pooler.dense")
    rules += [
        same("text.token.weight", f"{txt}.embeddings.word_embeddings.weight"),
        same("text.pos", f"{txt}.embeddings.position_embeddings.weight"),
        same("text.token_type.weight", f"{txt}.embeddings.token_type_embeddings.weight"),
        *affine("text.norm_embed", f"{txt}.embeddings.layer_norm"),
    ]
    rules += _blocks("text.transformer", f"{txt}.encoder", cfg.text_layers, fc2)
    rules += affine("text.norm", f"{txt}.layernorm")
    rules += affine("text.pooler", f"{txt}.pooler.dense")
    rules.append(unbatched("mm.cls", f"{mm}.cls_token", 2))
    rules += _blocks("mm.transformer", f"{mm}.encoder", cfg.mm_layers, fc2)
    rules += affine("mm.norm", f"{mm}.layernorm")
    rules += affine("mm.pooler", f"{mm}.pooler.dense")
    for ours, theirs in (
        ("image_to_mm", "image_to_mm_projection"),
        ("text_to_mm", "text_to_mm_projection"),
        ("image_proj", "image_projection"),
        ("text_proj", "text_projection"),
    ):
        rules += affine(ours, theirs)
    return rules


def from_torchmultimodal(
    state_dict: Mapping[str, torch.Tensor],
    cfg: FLAVAConfig,
    *,
    dtype: torch.dtype | None = torch.float32,
) -> Params:
    """Our encoder and projection params from a TorchMultimodal ``flava_model`` state dict
    (a ``model.``-prefixed ``FLAVAForPreTraining`` / ``FLAVAForClassification`` dict: pass
    ``{k[6:]: v for k, v in sd.items() if k.startswith("model.")}``). ``dtype``: cast
    every tensor (``None`` keeps the checkpoint's).

    Raises :class:`fmm.convert.ConversionError` listing every missing, unexpected and
    mis-shaped key (e.g. a checkpoint of another size or family).
    """
    sd = strip_prefix(state_dict, "module.")
    like = init_model(cfg, random.key(0).to("meta"))
    return import_state_dict(
        sd, tmm_rules(cfg), like=like, source="torchmultimodal flava", dtype=dtype
    )


def to_torchmultimodal(params: Params, cfg: FLAVAConfig) -> dict[str, torch.Tensor]:
    """A ``FLAVAModel`` state dict of ``params`` (``heads``, if present, are left out),
    ready for ``load_state_dict``."""
    return export_state_dict({k: v for k, v in params.items() if k != "heads"}, tmm_rules(cfg))
