"""Pooling a sequence ``[batch, seq, dim]``: to one vector per example ``[batch, dim]``
(class token, mean, a token at an index, end-of-text) or to a few learned-query vectors
``[batch, queries, dim]`` (the attentional pooler of CoCa and BLIP-2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fmm import checks, random
from fmm.nn.attention import AttentionConfig, attention, init_attention, padding_mask
from fmm.nn.norm import init_layer_norm, layer_norm

Params = dict[str, Any]


def pool_cls(x: torch.Tensor) -> torch.Tensor:
    """The first token (a class token prepended by the encoder). ``[B, S, D] -> [B, D]``."""
    return x[:, 0]


def pool_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the sequence, counting only positions where ``mask: [B, S]`` is True."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def pool_index(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The token at ``index: [B]`` (int64) of each sequence. ``[B, S, D] -> [B, D]``."""
    return torch.gather(x, 1, index.view(-1, 1, 1).expand(-1, 1, x.shape[-1])).squeeze(1)


def pool_eot(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The end-of-text token, found as the largest id in ``tokens: [B, S]`` (CLIP's rule)."""
    return pool_index(x, tokens.argmax(dim=-1))


@dataclass(frozen=True, kw_only=True)
class AttentionPoolConfig:
    """Static shape of an attentional pooler: ``queries`` learned vectors of width ``dim``
    cross-attend (``heads`` heads) a sequence of width ``context_dim`` (default ``dim``).

    ``attn_impl``: ``"sdpa"`` or ``"math"`` (see :class:`fmm.nn.AttentionConfig`).
    """

    dim: int
    heads: int
    queries: int
    context_dim: int | None = None
    norm_eps: float = 1e-5
    attn_impl: str = "sdpa"

    def __post_init__(self) -> None:
        if self.queries < 1:
            raise ValueError(f"AttentionPoolConfig: queries must be >= 1, got {self.queries}")
        # AttentionConfig refuses bad dim/heads/attn_impl: at construction, not at first call.
        AttentionConfig(dim=self.dim, heads=self.heads, impl=self.attn_impl)

    @property
    def kv_dim(self) -> int:
        return self.dim if self.context_dim is None else self.context_dim

    @property
    def attention(self) -> AttentionConfig:
        return AttentionConfig(
            dim=self.dim, heads=self.heads, kv_dim=self.kv_dim, impl=self.attn_impl
        )


def init_attention_pool(
    cfg: AttentionPoolConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> Params:
    """Params ``{"query": [queries, dim], "norm_query", "norm_context": layer norms,
    "attn": {"q": [dim, dim], "kv": [2*dim, context_dim], "out": [dim, dim]}}``.

    Example: ``p = init_attention_pool(AttentionPoolConfig(dim=8, heads=2, queries=4), key)``.
    """
    dev = key.device
    return {
        # The queries are layer-normalised before use, so their init scale is immaterial.
        "query": random.normal(random.fold_in(key, "query"), (cfg.queries, cfg.dim), dtype=dtype),
        "norm_query": init_layer_norm(cfg.dim, device=dev, dtype=dtype),
        "norm_context": init_layer_norm(cfg.kv_dim, device=dev, dtype=dtype),
        "attn": init_attention(cfg.attention, random.fold_in(key, "attn"), dtype=dtype),
    }


def attention_pool(
    params: Params,
    x: torch.Tensor,
    *,
    cfg: AttentionPoolConfig,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool ``x: [B, S, context_dim]`` to ``[B, queries, dim]``: the normalised learned
    queries cross-attend the normalised sequence.

    ``mask: [B, S]`` (bool, True = a real position): padding is never attended; every row
    needs at least one real position.

    Example::

        cfg = AttentionPoolConfig(dim=8, heads=2, queries=4, context_dim=6)
        pooled = attention_pool(init_attention_pool(cfg, fmm.random.key(0)),
                                torch.randn(3, 10, 6), cfg=cfg)   # [3, 4, 8]
    """
    checks.check_float("x", x, ("batch", "seq", cfg.kv_dim), like=params["query"])
    if mask is not None:
        checks.check_mask("mask", mask, tuple(x.shape[:2]), of="x[:, :, 0]")
        mask = padding_mask(mask)
    query = layer_norm(params["norm_query"], params["query"], eps=cfg.norm_eps)
    context = layer_norm(params["norm_context"], x, eps=cfg.norm_eps)
    return attention(
        params["attn"],
        query.expand(x.shape[0], -1, -1),
        cfg=cfg.attention,
        context=context,
        mask=mask,
    )
