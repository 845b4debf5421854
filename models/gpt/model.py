"""GPT as pure functions: ``init``, ``apply`` (full causal forward), ``loss``, and the
:class:`fmm.decoding.DecoderSpec` for cached generation.

Param tree (PyTorch layouts)::

    token.weight            [vocab, width]   input embedding, reused (tied) as the output layer
    pos                     [context, width] learned positions
    transformer.blocks.N    pre-norm blocks (fmm.nn.transformer)
    norm_final              layer norm before the output layer
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from fmm import checks, decoding, nn, random
from models.gpt.config import GPTConfig

Params = dict[str, Any]


def init(cfg: GPTConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params for ``cfg``, a pure function of ``(cfg, key)`` (leaf keys folded from
    paths). Pass a key on the ``meta`` device to get shapes only.

    Example: ``params = init(gpt_tiny(), fmm.random.key(0))``.
    """
    checks.check_type("cfg", cfg, GPTConfig)
    return {
        "token": nn.init_embedding(
            cfg.vocab_size, cfg.width, random.fold_in(key, "token"), std=0.02, dtype=dtype
        ),
        "pos": nn.init_learned_positions(
            cfg.context_length, cfg.width, random.fold_in(key, "pos"), std=0.01, dtype=dtype
        ),
        "transformer": nn.init_transformer(
            cfg.transformer, random.fold_in(key, "transformer"), dtype=dtype
        ),
        "norm_final": nn.init_layer_norm(cfg.width, device=key.device, dtype=dtype),
    }


def embed(params: Params, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Token plus position embeddings: ``tokens, positions: [B, S]`` -> ``[B, S, width]``."""
    return nn.embed(params["token"], tokens) + F.embedding(positions, params["pos"])


def head(params: Params, h: torch.Tensor, *, eps: float = 1e-5) -> torch.Tensor:
    """Final norm and the tied output layer: ``h: [B, S, width]`` -> logits ``[B, S, vocab]``."""
    return F.linear(nn.layer_norm(params["norm_final"], h, eps=eps), params["token"]["weight"])


def _check_tokens(name: str, tokens: torch.Tensor, cfg: GPTConfig, extra: int = 0) -> None:
    # ``extra``: positions beyond the context a caller drops before the forward (loss feeds
    # tokens[:, :-1], so it takes context_length + 1 tokens).
    longest = cfg.context_length + extra
    checks.check_ids(
        name, tokens, ("batch", range(1 + extra, longest + 1)), high=cfg.vocab_size,
        hint=f"context_length={cfg.context_length}",
    )  # fmt: skip


def apply(
    params: Params,
    tokens: torch.Tensor,
    *,
    cfg: GPTConfig,
    key: torch.Tensor | None = None,
    train: bool = False,
) -> torch.Tensor:
    """Full causal forward: ``tokens: [B, S]`` (int64) -> logits ``[B, S, vocab]``.

    ``key`` is needed only for dropout in training.

    Example: ``logits = apply(params, torch.randint(0, 64, (2, 10)), cfg=gpt_tiny())``.
    """
    checks.check_params(params, init=init, cfg=cfg)
    _check_tokens("tokens", tokens, cfg)
    return _apply(params, tokens, cfg, key, train)


def _apply(params: Params, tokens, cfg: GPTConfig, key, train: bool) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    x = nn.embed(params["token"], tokens) + params["pos"][positions]
    if train and cfg.dropout > 0.0:
        if key is None:
            raise ValueError("key= is missing: dropout in training needs key=")
        x = random.dropout(random.fold_in(key, "embed"), x, cfg.dropout)
    k = random.fold_in(key, "transformer") if key is not None else None
    x = nn.transformer(
        params["transformer"], x, cfg=cfg.transformer, causal=True, key=k, train=train
    )
    return head(params, x, eps=cfg.norm_eps)


def loss(
    params: Params,
    tokens: torch.Tensor,
    *,
    cfg: GPTConfig,
    mask: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    train: bool = False,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``tokens: [B, S]``: position ``i`` predicts ``i+1``.

    ``mask: [B, S]`` (bool, True = a real token): only real targets count.
    """
    checks.check_params(params, init=init, cfg=cfg)
    _check_tokens("tokens", tokens, cfg, extra=1)
    if mask is not None:
        checks.check_mask("mask", mask, tokens.shape, of="tokens")
    logits = _apply(params, tokens[:, :-1], cfg, key, train)
    targets = tokens[:, 1:]
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    if mask is None:
        return per_token.mean()
    weight = mask[:, 1:].flatten().to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp(min=1.0)


@functools.cache
def decoder_spec(cfg: GPTConfig) -> decoding.DecoderSpec:
    """How :mod:`fmm.decoding` runs this GPT (cached per config, so compile guards hold)."""
    return decoding.DecoderSpec(
        transformer=cfg.transformer,
        embed=embed,
        head=functools.partial(head, eps=cfg.norm_eps),
        max_positions=cfg.context_length,
        vocab_size=cfg.vocab_size,
        init=init,
        config=cfg,
    )
