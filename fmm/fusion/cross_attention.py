"""Cross-attention fusion: one modality's tokens attend to another's, in a stack of
:mod:`fmm.nn.transformer` blocks whose ``cross_dim`` is the context's width."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fmm.nn.transformer import BlockFn, TransformerConfig, init_transformer, transformer

Params = dict


@dataclass(frozen=True, kw_only=True)
class CrossAttentionFusionConfig:
    """``transformer``: the fusion stack; its ``cross_dim`` must be set to the context width.

    Example: ``CrossAttentionFusionConfig(transformer=TransformerConfig(width=8, layers=2,
    heads=2, cross_dim=6))`` fuses ``[B, S, 8]`` queries with a ``[B, T, 6]`` context.
    """

    transformer: TransformerConfig

    def __post_init__(self) -> None:
        if self.transformer.cross_dim is None:
            raise ValueError(
                "CrossAttentionFusionConfig: transformer.cross_dim must be the context width, got None"
            )


def init_cross_attention_fusion(
    cfg: CrossAttentionFusionConfig, key: torch.Tensor, *, dtype=torch.float32
) -> Params:
    """The fusion stack's params (those of :func:`fmm.nn.init_transformer`)."""
    return init_transformer(cfg.transformer, key, dtype=dtype)


def cross_attention_fusion(
    params: Params,
    x: torch.Tensor,
    context: torch.Tensor,
    *,
    cfg: CrossAttentionFusionConfig,
    mask: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    train: bool = False,
    block_fn: BlockFn | None = None,
) -> torch.Tensor:
    """``x: [batch, seq, width]`` attends to itself and to ``context: [batch, ctx, cross_dim]``
    -> ``[batch, seq, width]``. ``mask`` / ``context_mask`` as in :func:`fmm.nn.block`;
    ``block_fn`` runs each block (:func:`fmm.nn.transformer`'s seam, where
    ``fmm.adapter`` shards and checkpoints).

    Example: text tokens ``[B, T, 8]`` over image patches ``[B, P, 6]``.
    """
    tc = cfg.transformer
    if x.ndim != 3 or x.shape[-1] != tc.width:
        raise ValueError(
            f"cross_attention_fusion: x has shape {list(x.shape)}, want [batch, seq, {tc.width}]"
        )
    if context.ndim != 3 or context.shape[-1] != tc.cross_dim:
        raise ValueError(
            f"cross_attention_fusion: context has shape {list(context.shape)}, "
            f"want [batch, ctx, {tc.cross_dim}]"
        )
    if x.shape[0] != context.shape[0]:
        raise ValueError(
            f"cross_attention_fusion: x {list(x.shape)} and context {list(context.shape)} "
            "have different batch sizes"
        )
    return transformer(
        params,
        x,
        cfg=tc,
        mask=mask,
        context=context,
        context_mask=context_mask,
        key=key,
        train=train,
        block_fn=block_fn,
    )
