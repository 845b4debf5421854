"""Multi-head self- and cross-attention through ``F.scaled_dot_product_attention``.

Masks are boolean, ``True`` = may attend, broadcastable to ``[batch, heads, q_len, k_len]``;
build them with :func:`padding_mask` and :func:`causal_mask`.

With ``cache=`` the same function serves cached decoding: self-attention writes this call's
keys/values into the layer's preallocated buffers at ``slots`` and attends over every slot
under the caller's explicit offset mask; cross-attention computes the context's keys/values
once (when ``context`` is given) and reads them back from the cache afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from fmm import random
from fmm.nn.linear import init_linear, linear

Params = dict[str, dict[str, torch.Tensor]]
# One layer's cached keys and values: {"k": [B, heads, L, head_dim], "v": ...}.
KVCache = dict[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """Static shape of a multi-head attention layer.

    ``kv_dim``: width of the attended-to sequence for cross-attention (``None``: self-attention).
    ``dropout``: rate on the attention weights during training.
    ``impl``: ``"sdpa"`` (fused kernels) or ``"math"`` (matmul + softmax; ``vmap`` batches it,
    while SDPA's CPU kernels fall back to a per-example loop under ``vmap``).
    """

    dim: int
    heads: int
    kv_dim: int | None = None
    bias: bool = True
    dropout: float = 0.0
    impl: str = "sdpa"

    def __post_init__(self) -> None:
        if self.impl not in ("sdpa", "math"):
            raise ValueError(f"AttentionConfig: impl must be 'sdpa' or 'math', got {self.impl!r}")
        if self.dim % self.heads:
            raise ValueError(
                f"AttentionConfig: dim={self.dim} is not divisible by heads={self.heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


def init_attention(
    cfg: AttentionConfig, key: torch.Tensor, *, out_std: float | None = None, dtype=torch.float32
) -> Params:
    """Self-attention params ``{"qkv": [3*dim, dim], "out": [dim, dim]}``; cross-attention
    params ``{"q": [dim, dim], "kv": [2*dim, kv_dim], "out": [dim, dim]}``."""
    d, b = cfg.dim, cfg.bias
    if cfg.kv_dim is None:
        k_in, k_out = random.split(key)
        return {
            "qkv": init_linear(d, 3 * d, k_in, bias=b, dtype=dtype),
            "out": init_linear(d, d, k_out, bias=b, std=out_std, dtype=dtype),
        }
    k_q, k_kv, k_out = random.split(key, 3)
    return {
        "q": init_linear(d, d, k_q, bias=b, dtype=dtype),
        "kv": init_linear(cfg.kv_dim, 2 * d, k_kv, bias=b, dtype=dtype),
        "out": init_linear(d, d, k_out, bias=b, std=out_std, dtype=dtype),
    }


def padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """``valid: [B, k_len]`` (True = a real token) -> key mask ``[B, 1, 1, k_len]``."""
    return valid.bool()[:, None, None, :]


def causal_mask(
    q_len: int, k_len: int, *, offset: int | torch.Tensor = 0, device=None
) -> torch.Tensor:
    """``[q_len, k_len]``: query ``i`` (at absolute position ``offset + i``) sees keys ``<= offset + i``."""
    q = torch.arange(q_len, device=device)[:, None] + offset
    return torch.arange(k_len, device=device)[None, :] <= q


def attention(
    params: Params,
    x: torch.Tensor,
    *,
    cfg: AttentionConfig,
    context: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    causal: bool = False,
    key: torch.Tensor | None = None,
    train: bool = False,
    cache: KVCache | None = None,
    slots: torch.Tensor | None = None,
    donate: bool = False,
    pos: torch.Tensor | None = None,
    context_pos: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
    """Multi-head attention of ``x: [B, S, dim]`` over itself or over ``context: [B, T, kv_dim]``.

    ``mask``: bool, broadcastable to ``[B, heads, S, T]``; ``causal``: add a lower-triangular
    mask (self-attention without a cache). ``bias``: float, broadcastable to ``[B, heads,
    S, T]``, added to the scores before the softmax (Swin's relative position bias).
    ``temperature: [heads]``: scaled cosine attention (Swin V2): queries and keys are
    unit-normalised and each head's scores divided by its temperature (clamped at 0.01)
    instead of scaled by ``head_dim ** -0.5``. Returns ``[B, S, dim]``.

    ``cache``: this layer's ``{"k": [B, heads, L, head_dim], "v": ...}``; then the call
    returns ``(out [B, S, dim], new_cache)``. Self-attention writes its keys/values at
    ``slots: [B, S]`` (int64 indices into L) and attends over all ``L`` slots under ``mask``
    (broadcastable to ``[B, heads, S, L]``: the offsets are the caller's, so ``causal`` is
    refused). Cross-attention computes the keys/values of ``context`` when it is given (a
    prefill; the new cache holds them) and reads the cached ones when it is not.
    ``donate``: write the self-attention buffers in place (the caller gives them up).

    ``pos`` (broadcastable to ``x``) is added to the input of the queries and, in
    self-attention, of the keys, but not of the values; ``context_pos`` (broadcastable to
    ``context``) likewise to the context's keys only. DETR's encoder-decoder re-adds its
    positional encodings this way in every layer.

    Example::

        cfg = AttentionConfig(dim=8, heads=2)
        y = attention(init_attention(cfg, fmm.random.key(0)), x, cfg=cfg, causal=True)
        # decoding: one token per row at slot 5 of a 16-slot cache
        cache = {"k": torch.zeros(B, 2, 16, 4), "v": torch.zeros(B, 2, 16, 4)}
        y, cache = attention(p, x1, cfg=cfg, cache=cache, slots=torch.full((B, 1), 5),
                             mask=causal_mask(1, 16, offset=5))
    """
    h = cfg.heads
    if cfg.kv_dim is None:
        if pos is None:
            q, k, v = rearrange(linear(params["qkv"], x), "b s (n h d) -> n b h s d", n=3, h=h)
        else:
            qk = _rows(params["qkv"], x + pos, 0, 2 * cfg.dim)
            q, k = rearrange(qk, "b s (n h d) -> n b h s d", n=2, h=h)
            v = rearrange(_rows(params["qkv"], x, 2 * cfg.dim), "b s (h d) -> b h s d", h=h)
        if cache is not None:
            if causal:
                raise ValueError(
                    "causal=True with cache=: give the cache's offset mask as mask= instead "
                    "(its slots, not this call's positions, say who sees whom)"
                )
            if slots is None:
                raise ValueError("slots= is missing: self-attention with a cache needs slots=")
            k = _write_slots(cache["k"], slots, k, donate)
            v = _write_slots(cache["v"], slots, v, donate)
    else:
        q = rearrange(
            linear(params["q"], x if pos is None else x + pos), "b s (h d) -> b h s d", h=h
        )
        if context is not None and context_pos is not None:
            k = _rows(params["kv"], context + context_pos, 0, cfg.dim)
            v = _rows(params["kv"], context, cfg.dim)
            k, v = (rearrange(t, "b t (h d) -> b h t d", h=h) for t in (k, v))
        elif context is not None:
            k, v = rearrange(linear(params["kv"], context), "b t (n h d) -> n b h t d", n=2, h=h)
        elif cache is not None:
            k, v = cache["k"], cache["v"]
        else:
            raise ValueError("attention: a cross-attention layer needs context=")
    if causal and mask is not None:
        mask = mask & causal_mask(q.shape[-2], k.shape[-2], device=x.device)
        causal = False
    scale = None  # head_dim ** -0.5
    if temperature is not None:
        # q.k / (|q| |k| tau): the temperature folded into the unit queries, so SDPA's
        # scale is 1 and the fused kernels still serve.
        tau = temperature.clamp(min=0.01).to(q.dtype)[:, None, None]
        q, k, scale = F.normalize(q, dim=-1) / tau, F.normalize(k, dim=-1), 1.0
    drop = cfg.dropout if train else 0.0
    if drop > 0.0 and key is None:
        raise ValueError("key= is missing: attention dropout in training needs key=")
    if bias is not None:
        # One additive mask serves both paths: SDPA takes a float attn_mask as is.
        if causal:
            mask = causal_mask(q.shape[-2], k.shape[-2], device=x.device)
            causal = False
        bias = bias.to(q.dtype)
        mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
    if drop > 0.0 or cfg.impl == "math":
        out = _math_attention(q, k, v, mask, causal, drop, key, scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    out = linear(params["out"], rearrange(out, "b h s d -> b s (h d)"))
    return out if cache is None else (out, {"k": k, "v": v})


def _rows(params: dict[str, torch.Tensor], x: torch.Tensor, start: int, stop: int | None = None):
    """The output rows ``start:stop`` of a fused projection (queries and keys of ``qkv``
    from one input, values from another)."""
    bias = params.get("bias")
    return F.linear(x, params["weight"][start:stop], None if bias is None else bias[start:stop])


def _write_slots(
    buf: torch.Tensor, slots: torch.Tensor, new: torch.Tensor, donate: bool
) -> torch.Tensor:
    """``buf [B, H, L, D]`` with ``new [B, H, S, D]`` at ``slots [B, S]`` along L."""
    rows = torch.arange(buf.shape[0], device=buf.device)[:, None, None]
    heads = torch.arange(buf.shape[1], device=buf.device)[None, :, None]
    index = (rows, heads, slots[:, None, :])
    # Donated buffers belong to the loop that allocated them: writing one slot in place keeps
    # a step O(1) in memory traffic instead of copying the whole cache. index_put_, not
    # scatter_: inductor writes an index_put_ on a graph input in place, while a scatter_
    # became a copy of the whole buffer per layer (~1/3 of a GPT-2-small step at 1024 slots).
    return buf.index_put_(index, new) if donate else buf.index_put(index, new)


def _math_attention(q, k, v, mask, causal, rate, key, scale=None):
    # Also the dropout path: SDPA's own dropout draws from the global RNG, which a
    # checkpoint recompute or a compiled graph would not reproduce.
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        mask = causal_mask(q.shape[-2], k.shape[-2], device=q.device)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:  # an additive float mask (a bias, -inf where masked)
        scores = scores + mask
    weights = scores.softmax(dim=-1)
    if rate > 0.0:
        weights = random.dropout(key, weights, rate)
    return weights @ v
