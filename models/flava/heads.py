"""FLAVA's pretraining heads: masked prediction (MLM, MIM and the two MMM heads), image-text
matching, and the contrastive temperature.

Param tree under ``heads``::

    mlm, mim, mmm_text, mmm_image   {transform {weight, bias}, norm, decoder {weight, bias}}
    itm                             {pooler {weight, bias}, out {weight [2, D], bias [2]}}
    logit_scale                     [] log inverse temperature (clamped in the loss, not here)
"""

from __future__ import annotations

from typing import Any

import torch

from fmm import nn, random
from models.flava.config import _INIT_STD

Params = dict[str, Any]


def init_masked_head(
    width: int, vocab: int, key: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> Params:
    """A masked-prediction head ``[..., width] -> [..., vocab]``: dense, activation,
    LayerNorm, then a decoder to the vocabulary."""
    k_t, k_d = random.split(key)
    return {
        "transform": nn.init_linear(width, width, k_t, std=_INIT_STD, dtype=dtype),
        "norm": nn.init_layer_norm(width, device=key.device, dtype=dtype),
        "decoder": nn.init_linear(width, vocab, k_d, std=_INIT_STD, dtype=dtype),
    }


def masked_head(
    params: Params, hidden: torch.Tensor, *, act: str = "gelu", eps: float = 1e-5
) -> torch.Tensor:
    """Logits over the vocabulary: ``hidden: [..., width] -> [..., vocab]``."""
    h = nn.activation(act)(nn.linear(params["transform"], hidden))
    return nn.linear(params["decoder"], nn.layer_norm(params["norm"], h, eps=eps))


def init_itm_head(width: int, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """The matching head: a tanh pooler on the first token, then two logits."""
    k_p, k_o = random.split(key)
    return {
        "pooler": nn.init_linear(width, width, k_p, std=_INIT_STD, dtype=dtype),
        "out": nn.init_linear(width, 2, k_o, std=_INIT_STD, dtype=dtype),
    }


def itm_head(params: Params, mm_sequence: torch.Tensor) -> torch.Tensor:
    """Matching logits ``[B, 2]`` (no match, match) from the multimodal sequence
    ``[B, S, mm_width]``'s first token."""
    pooled = torch.tanh(nn.linear(params["pooler"], nn.pool_cls(mm_sequence)))
    return nn.linear(params["out"], pooled)


def init_heads(cfg, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Every pretraining head for ``cfg`` (a :class:`FLAVAConfig`) and ``logit_scale``."""
    k = lambda name: random.fold_in(key, name)
    return {
        "mlm": init_masked_head(cfg.text_width, cfg.vocab_size, k("mlm"), dtype=dtype),
        "mim": init_masked_head(cfg.image_width, cfg.image_vocab_size, k("mim"), dtype=dtype),
        "mmm_text": init_masked_head(cfg.mm_width, cfg.vocab_size, k("mmm_text"), dtype=dtype),
        "mmm_image": init_masked_head(
            cfg.mm_width, cfg.image_vocab_size, k("mmm_image"), dtype=dtype
        ),
        "itm": init_itm_head(cfg.mm_width, k("itm"), dtype=dtype),
        "logit_scale": torch.full((), cfg.logit_scale_init, dtype=dtype, device=key.device),
    }
