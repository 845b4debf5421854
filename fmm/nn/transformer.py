"""Transformer blocks and stacks, pre-norm (ViT / CLIP / GPT) or post-norm (BERT / ALBEF).

A pre-norm block (``norm_first=True``, the default) computes ``x + attn(norm1(x))``
[``+ cross(norm_cross(x), context)``] then ``x + mlp(norm2(x))``. A post-norm block
(``norm_first=False``) normalises after each residual sum instead:
``x = norm1(x + attn(x))`` [``x = norm_cross(x + cross(x, context))``] then
``x = norm2(x + mlp(x))``. Both use the same param names, so one converter layout serves
either. A stack is ``{"blocks": [block, ...]}``; the final norm of a pre-norm stack, if
any, belongs to the model that owns the stack.

The same block decodes: given its layer of :mod:`fmm.decoding`'s KV cache it writes this
call's keys/values at explicit slots and returns ``(y, new_layer_cache)``, so training and
cached decoding run one implementation, pre- or post-norm, with or without cross-attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fmm import random
from fmm.nn.attention import AttentionConfig, KVCache, attention, init_attention
from fmm.nn.mlp import activation, init_mlp, mlp
from fmm.nn.norm import init_layer_norm, layer_norm
from fmm.nn.swin import Window, window_attention

Params = dict[str, Any]
BlockFn = Callable[..., Any]
# One layer of fmm.decoding's cache: {"k", "v"[, "ck", "cv"]: [B, heads, len, head_dim]}.
LayerCache = dict[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Static shape of a transformer stack.

    ``cross_dim``: if set, every block also cross-attends to a context of that width.
    ``dropout``: residual-branch dropout; ``attn_dropout``: on attention weights.
    ``drop_path``: stochastic depth, the probability that training skips a residual branch
    for an example (:func:`fmm.random.drop_path`; a stack with a per-block schedule gives
    each block its own config, as Omnivore does).
    ``attn_impl``: ``"sdpa"`` or ``"math"`` (see :class:`fmm.nn.AttentionConfig`).
    ``norm_first``: pre-norm (True) or post-norm (False) blocks; see the module docstring.
    ``mlp_dim``: the MLP's hidden width, overriding ``int(width * mlp_ratio)`` (checkpoints
    such as BERT's state it as an integer, which a float ratio need not reproduce).
    ``cross_only``: a block without self-attention (``norm_cross, cross, norm2, mlp``:
    open_clip's CoCa decoder alternates such blocks with plain ones); it needs ``cross_dim``.
    ``norm_context``: a layer norm ``norm_context`` over the context before the
    cross-attention's keys and values (open_clip's ``ln_1_kv``).
    ``query_mlp``: a block of BLIP-2's Q-Former. The first ``queries`` tokens of ``x``
    (:func:`block`'s ``queries=``) are learned queries with an MLP of their own
    (``norm2_query``, ``mlp_query``); only they cross-attend (with ``cross_dim``); the rest
    (text) take ``norm2`` and ``mlp``. Self-attention runs over all tokens together.
    """

    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    act: str = "gelu"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    attn_dropout: float = 0.0
    cross_dim: int | None = None
    attn_impl: str = "sdpa"
    norm_first: bool = True
    mlp_dim: int | None = None
    drop_path: float = 0.0
    cross_only: bool = False
    norm_context: bool = False
    query_mlp: bool = False

    def __post_init__(self) -> None:
        if self.cross_dim is None and (self.cross_only or self.norm_context):
            raise ValueError("TransformerConfig: cross_only and norm_context need cross_dim")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(
                f"TransformerConfig: drop_path must be in [0, 1), got {self.drop_path}"
            )
        if self.width % self.heads:
            raise ValueError(
                f"TransformerConfig: width={self.width} is not divisible by heads={self.heads}"
            )
        if self.layers < 0:
            raise ValueError(f"TransformerConfig: layers must be >= 0, got {self.layers}")
        if self.mlp_dim is not None and self.mlp_dim < 1:
            raise ValueError(f"TransformerConfig: mlp_dim must be positive, got {self.mlp_dim}")
        activation(self.act)  # fail at construction, not at the first forward
        # AttentionConfig refuses a bad attn_impl: at construction, as pool.py's config does.
        AttentionConfig(dim=self.width, heads=self.heads, impl=self.attn_impl)

    @property
    def self_attention(self) -> AttentionConfig:
        return AttentionConfig(
            dim=self.width, heads=self.heads, dropout=self.attn_dropout, impl=self.attn_impl
        )

    @property
    def cross_attention(self) -> AttentionConfig:
        return AttentionConfig(
            dim=self.width,
            heads=self.heads,
            kv_dim=self.cross_dim,
            dropout=self.attn_dropout,
            impl=self.attn_impl,
        )

    @property
    def hidden(self) -> int:
        if self.mlp_dim is not None:
            return self.mlp_dim
        return int(self.width * self.mlp_ratio)


def init_block(cfg: TransformerConfig, key: torch.Tensor, *, dtype=torch.float32) -> Params:
    """Params of one block: ``[norm1, attn,] [norm_cross, [norm_context,] cross,] norm2, mlp``
    and, with ``cfg.query_mlp``, ``norm2_query, mlp_query``."""
    # Residual outputs start small so the sum over layers keeps unit scale (GPT-2's rule).
    out_std = cfg.width**-0.5 * (2 * max(cfg.layers, 1)) ** -0.5
    dev = key.device
    params: Params = {}
    if not cfg.cross_only:
        params["norm1"] = init_layer_norm(cfg.width, device=dev, dtype=dtype)
        params["attn"] = init_attention(
            cfg.self_attention, random.fold_in(key, "attn"), out_std=out_std, dtype=dtype
        )
    if cfg.cross_dim is not None:
        params["norm_cross"] = init_layer_norm(cfg.width, device=dev, dtype=dtype)
        if cfg.norm_context:
            params["norm_context"] = init_layer_norm(cfg.cross_dim, device=dev, dtype=dtype)
        params["cross"] = init_attention(
            cfg.cross_attention, random.fold_in(key, "cross"), out_std=out_std, dtype=dtype
        )
    params["norm2"] = init_layer_norm(cfg.width, device=dev, dtype=dtype)
    params["mlp"] = init_mlp(
        cfg.width, cfg.hidden, random.fold_in(key, "mlp"), out_std=out_std, dtype=dtype
    )
    if cfg.query_mlp:
        params["norm2_query"] = init_layer_norm(cfg.width, device=dev, dtype=dtype)
        params["mlp_query"] = init_mlp(
            cfg.width, cfg.hidden, random.fold_in(key, "mlp_query"), out_std=out_std, dtype=dtype
        )
    return params


def init_transformer(cfg: TransformerConfig, key: torch.Tensor, *, dtype=torch.float32) -> Params:
    """``{"blocks": [block_0, ..., block_{layers-1}]}``; block ``i`` uses ``fold_in(key, i)``."""
    return {
        "blocks": [init_block(cfg, random.fold_in(key, i), dtype=dtype) for i in range(cfg.layers)]
    }


def _residual(x, branch, cfg: TransformerConfig, key, name, train):
    if train and cfg.dropout > 0.0:
        branch = random.dropout(random.fold_in(key, name), branch, cfg.dropout)
    if train and cfg.drop_path > 0.0:
        # Its own key per branch ("attn_out_path", "mlp_out_path", ...): the branches
        # of one example are skipped independently, as in Swin / torchvision.
        branch = random.drop_path(random.fold_in(key, f"{name}_path"), branch, cfg.drop_path)
    return x + branch


def block(
    params: Params,
    x: torch.Tensor,
    *,
    cfg: TransformerConfig,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    context: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    train: bool = False,
    cache: LayerCache | None = None,
    slots: torch.Tensor | None = None,
    donate: bool = False,
    window: Window | None = None,
    pos: torch.Tensor | None = None,
    context_pos: torch.Tensor | None = None,
    queries: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, LayerCache]:
    """One block (pre- or post-norm by ``cfg.norm_first``).
    ``x: [B, S, width]``, ``context: [B, T, cross_dim]`` -> ``[B, S, width]``.

    ``mask``/``context_mask``: bool, broadcastable to ``[B, heads, S, S]`` / ``[B, heads, S, T]``.
    ``key`` is needed only for dropout and drop path (``cfg.drop_path``) in training.

    ``cache``: this layer's KV cache (:mod:`fmm.decoding`'s layout: ``{"k", "v": [B, heads,
    L, head_dim]}`` (none in a ``cfg.cross_only`` block), plus ``"ck", "cv": [B, heads, T,
    head_dim]`` with cross-attention);
    then the block returns ``(y [B, S, width], new_cache)``. The block's keys/values are
    written at ``slots: [B, S]`` and ``mask`` (broadcastable to ``[B, heads, S, L]``) is the
    explicit offset mask over the cache's slots; the context's keys/values are computed
    when ``context`` is given and read from the cache otherwise. ``donate``: write the
    cache in place. See :func:`fmm.nn.attention`.

    ``window``: a Swin block: ``x: [B, T, H, W, width]`` and the self-attention runs within
    (shifted) windows (:func:`fmm.nn.swin.window_attention`; the block's ``attn`` params
    then hold ``rel_bias`` too, or ``tau`` and ``cpb`` for a Swin V2 window, whose block
    is res-post-norm: ``x + norm1(attn(x))``, ``x + norm2(mlp(x))``).

    ``pos: [B, S, width]`` / ``context_pos: [B, T, cross_dim]``: positional encodings added
    to the query and key inputs of each attention, never to its values (DETR's layers):
    ``pos`` to the self-attention's queries and keys and the cross-attention's queries,
    ``context_pos`` to the cross-attention's keys (:func:`fmm.nn.attention`).

    ``queries``: with ``cfg.query_mlp`` (and only then), how many of the ``S`` tokens are
    learned queries (a Python int in ``[0, S]``): after the shared self-attention
    ``x[:, :queries]`` cross-attends (with ``cfg.cross_dim``) and takes ``mlp_query``,
    ``x[:, queries:]`` takes ``mlp`` (BLIP-2's Q-Former; ``mask`` says who sees whom).

    Example: ``y, layer = block(p, x, cfg=cfg, cache=layer, slots=slots, mask=offsets)``.
    """
    if window is not None and (cache is not None or cfg.cross_dim is not None or pos is not None):
        raise ValueError("window=: a Swin block has no KV cache, cross-attention or pos=")
    if cfg.query_mlp != (queries is not None):
        raise ValueError("queries= is for TransformerConfig(query_mlp=True) blocks, which need it")
    stochastic = train and (
        cfg.dropout > 0.0 or cfg.attn_dropout > 0.0 or cfg.drop_path > 0.0
        or (window is not None and window.bias_dropout > 0.0)
    )  # fmt: skip
    if stochastic and key is None:
        raise ValueError("key= is missing: block dropout or drop_path in training needs key=")
    sub = (lambda name: random.fold_in(key, name)) if stochastic else (lambda name: None)
    eps, pre = cfg.norm_eps, cfg.norm_first
    # Swin V2's res-post-norm (a v2 window) normalises each branch's output instead.
    res_post = window is not None and window.v2

    # Pre-norm normalises each branch's input, post-norm each residual sum; the params and
    # dropout key names are the same either way, so one converter layout serves both.
    def norm_in(x, name):
        return layer_norm(params[name], x, eps=eps) if pre and not res_post else x

    def norm_out(y, name):
        return y if pre or res_post else layer_norm(params[name], y, eps=eps)

    def norm_branch(h, name):
        return layer_norm(params[name], h, eps=eps) if res_post else h

    if cfg.cross_only:
        h, kv = None, None
    elif window is not None:
        h, kv = window_attention(
            params["attn"], norm_in(x, "norm1"), cfg=cfg.self_attention, window=window,
            key=sub("attn"), train=train,
        ), None  # fmt: skip
    else:
        h, kv = _attend(
            params["attn"], norm_in(x, "norm1"), cfg=cfg.self_attention,
            cache=_pair(cache, "k", "v"), mask=mask, causal=causal, slots=slots, donate=donate,
            key=sub("attn"), train=train, pos=pos,
        )  # fmt: skip
    if not cfg.cross_only:
        x = norm_out(_residual(x, norm_branch(h, "norm1"), cfg, key, "attn_out", train), "norm1")
    new_cache = None if cache is None else {**cache}
    if kv is not None and new_cache is not None:
        new_cache["k"], new_cache["v"] = kv["k"], kv["v"]
    text = None
    if cfg.query_mlp:
        # BLIP-2's Q-Former: after the shared self-attention only the queries cross-attend,
        # and queries and text each pass through an MLP of their own.
        x, text = x[:, :queries], x[:, queries:]
    if cfg.cross_dim is not None and (text is None or queries):
        if cfg.norm_context and context is not None:
            context = layer_norm(params["norm_context"], context, eps=eps)
        h, ckv = _attend(
            params["cross"], norm_in(x, "norm_cross"), cfg=cfg.cross_attention,
            cache=_pair(cache, "ck", "cv"), context=context, mask=context_mask,
            key=sub("cross"), train=train, pos=pos, context_pos=context_pos,
        )  # fmt: skip
        x = norm_out(_residual(x, h, cfg, key, "cross_out", train), "norm_cross")
        if new_cache is not None:
            new_cache["ck"], new_cache["cv"] = ckv["k"], ckv["v"]

    def feedforward(x, name, norm):
        h = mlp(params[name], norm_in(x, norm), act=cfg.act)
        return norm_out(_residual(x, norm_branch(h, norm), cfg, key, f"{name}_out", train), norm)

    if text is None:
        x = feedforward(x, "mlp", "norm2")
    else:
        streams = [feedforward(x, "mlp_query", "norm2_query")] if queries else []
        if text.shape[1]:
            streams.append(feedforward(text, "mlp", "norm2"))
        x = torch.cat(streams, dim=1)
    return x if cache is None else (x, new_cache)


def _pair(cache: LayerCache | None, k: str, v: str) -> KVCache | None:
    # A layer cache holds self- ("k", "v") and cross-attention ("ck", "cv") entries;
    # attention() sees only its own pair.
    return None if cache is None else {"k": cache[k], "v": cache[v]}


def _attend(params, x, *, cache, **kwargs):
    """:func:`attention` as ``(out, new cache or None)``, with or without a cache."""
    if cache is None:
        return attention(params, x, **kwargs), None
    return attention(params, x, cache=cache, **kwargs)


def transformer(
    params: Params,
    x: torch.Tensor,
    *,
    cfg: TransformerConfig | tuple[TransformerConfig, ...],
    key: torch.Tensor | None = None,
    train: bool = False,
    block_fn: BlockFn | None = None,
    cache: list[LayerCache] | None = None,
    **block_kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, list[LayerCache]]:
    """Apply every block in order. ``x: [B, S, width]`` -> ``[B, S, width]``.

    ``block_kwargs`` (``mask``, ``causal``, ``context``, ``context_mask``, and with a cache
    ``slots``, ``donate``) go to each :func:`block`; block ``i`` draws dropout from
    ``fold_in(key, i)``.

    ``block_fn``: what runs one block, called as ``block_fn(block_params, x, cfg=, key=,
    train=, **block_kwargs)``; default :func:`block`. It is the seam where
    ``fmm.adapter`` routes each block through its own module (FSDP2 sharding, activation
    checkpointing) while the math stays :func:`block`.

    ``cache``: one layer cache per block (``fmm.decoding``'s ``cache["layers"]``); block
    ``i`` gets ``cache=cache[i]`` and the call returns ``(y, new layer caches)``.

    ``cfg``: one config for every block, or a tuple of one per block for a stack whose
    blocks differ (CoCa's text stack: unimodal blocks, then cross-attending ones); blocks
    without cross-attention ignore ``context``.
    """
    run = block if block_fn is None else block_fn
    blocks = params["blocks"]
    if cache is not None and len(cache) != len(blocks):
        raise ValueError(f"cache has {len(cache)} layers but the stack has {len(blocks)} blocks")
    cfgs = cfg if isinstance(cfg, tuple) else (cfg,) * len(blocks)
    if len(cfgs) != len(blocks):
        raise ValueError(f"cfg has {len(cfgs)} block configs but the stack has {len(blocks)}")
    new_cache = []
    for i, (bp, c) in enumerate(zip(blocks, cfgs)):
        k = random.fold_in(key, i) if key is not None else None
        if cache is None:
            x = run(bp, x, cfg=c, key=k, train=train, **block_kwargs)
        else:
            x, layer = run(bp, x, cfg=c, key=k, train=train, cache=cache[i], **block_kwargs)
            new_cache.append(layer)
    return x if cache is None else (x, new_cache)
