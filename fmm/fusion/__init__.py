"""Fusion layers: combine per-modality features ``{name: [batch, dim_name]}`` into one.

Every layer reads modalities in sorted-name order, so results never depend on the
mapping's insertion order; a missing or extra modality, or a wrong shape, is an error
naming the modality. See ``docs/fusion.md``.
"""

from fmm.fusion.attention_weighted import (
    AttentionWeightedConfig,
    attention_weighted,
    init_attention_weighted,
    modality_weights,
)
from fmm.fusion.concat import ConcatConfig, concat, init_concat
from fmm.fusion.cross_attention import (
    CrossAttentionFusionConfig,
    cross_attention_fusion,
    init_cross_attention_fusion,
)
from fmm.fusion.deepset import POOLINGS, DeepSetConfig, deepset, init_deepset, pool_set

__all__ = [
    "POOLINGS",
    "AttentionWeightedConfig",
    "ConcatConfig",
    "CrossAttentionFusionConfig",
    "DeepSetConfig",
    "attention_weighted",
    "concat",
    "cross_attention_fusion",
    "deepset",
    "init_attention_weighted",
    "init_concat",
    "init_cross_attention_fusion",
    "init_deepset",
    "modality_weights",
    "pool_set",
]
