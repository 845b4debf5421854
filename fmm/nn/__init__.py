"""Pure layers: ``init_*(..., key) -> params`` and ``layer(params, x, ...) -> y``."""

from fmm.nn.attention import (
    AttentionConfig,
    attention,
    causal_mask,
    init_attention,
    padding_mask,
)
from fmm.nn.embed import (
    embed,
    init_embedding,
    init_learned_positions,
    init_patch_embed,
    patch_embed,
    sincos_1d,
    sincos_2d,
)
from fmm.nn.linear import init_linear, linear
from fmm.nn.mlp import ACTIVATIONS, activation, init_mlp, mlp, quick_gelu
from fmm.nn.norm import init_layer_norm, layer_norm
from fmm.nn.pool import (
    AttentionPoolConfig,
    attention_pool,
    init_attention_pool,
    pool_cls,
    pool_eot,
    pool_index,
    pool_mean,
)
from fmm.nn.transformer import (
    TransformerConfig,
    block,
    init_block,
    init_transformer,
    transformer,
)

__all__ = [
    "ACTIVATIONS",
    "AttentionConfig",
    "AttentionPoolConfig",
    "TransformerConfig",
    "activation",
    "attention",
    "attention_pool",
    "block",
    "causal_mask",
    "embed",
    "init_attention",
    "init_attention_pool",
    "init_block",
    "init_embedding",
    "init_layer_norm",
    "init_learned_positions",
    "init_linear",
    "init_mlp",
    "init_patch_embed",
    "init_transformer",
    "layer_norm",
    "linear",
    "mlp",
    "padding_mask",
    "patch_embed",
    "pool_cls",
    "pool_eot",
    "pool_index",
    "pool_mean",
    "quick_gelu",
    "sincos_1d",
    "sincos_2d",
    "transformer",
]
