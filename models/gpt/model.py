"""GPT as pure functions: ``init``, ``apply`` (full causal forward), ``loss``, and the
:class:`fmm.decoding.DecoderSpec` for cached generation.

The decoder is :mod:`fmm.nn.towers`' text tower (``cfg.tower``: causal, final norm) with
the token table reused as the output layer. Param tree (PyTorch layouts)::

    token.weight            [vocab, width]   input embedding, reused (tied) as the output layer
    pos                     [context, width] learned positions
    transformer.blocks.N    pre-norm blocks (fmm.nn.transformer)
    norm                    final layer norm, before the output layer
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from fmm import checks, decoding, nn
from fmm.nn import towers
from fmm.nn.transformer import BlockFn
from models.family import Field
from models.gpt.config import GPTConfig

Params = dict[str, Any]


def init(cfg: GPTConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params for ``cfg``, a pure function of ``(cfg, key)`` (leaf keys folded from
    paths). Pass a key on the ``meta`` device to get shapes only.

    Example: ``params = init(gpt_tiny(), fmm.random.key(0))``.
    """
    checks.check_type("cfg", cfg, GPTConfig)
    return towers.init_text(cfg.tower, key, dtype=dtype)


def embed(params: Params, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Token plus position embeddings: ``tokens, positions: [B, S]`` -> ``[B, S, width]``."""
    return nn.embed(params["token"], tokens) + F.embedding(positions, params["pos"])


def head(params: Params, h: torch.Tensor, *, eps: float = 1e-5) -> torch.Tensor:
    """Final norm and the tied output layer: ``h: [B, S, width]`` -> logits ``[B, S, vocab]``."""
    return _logits(params, nn.layer_norm(params["norm"], h, eps=eps))


def _logits(params: Params, normed: torch.Tensor) -> torch.Tensor:
    return F.linear(normed, params["token"]["weight"])


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
    block_fn: BlockFn | None = None,
) -> torch.Tensor:
    """Full causal forward: ``tokens: [B, S]`` (int64) -> logits ``[B, S, vocab]``.

    ``key`` is needed only for dropout in training; ``block_fn`` runs each block (see
    :func:`fmm.nn.transformer`; ``fmm.adapter`` passes one to shard or checkpoint blocks).

    Example: ``logits = apply(params, torch.randint(0, 64, (2, 10)), cfg=gpt_tiny())``.
    """
    checks.check_params(params, init=init, cfg=cfg)
    _check_tokens("tokens", tokens, cfg)
    return _apply(params, tokens, cfg, key, train, block_fn)


def _apply(params: Params, tokens, cfg: GPTConfig, key, train: bool, block_fn) -> torch.Tensor:
    out = towers.text(params, tokens, cfg=cfg.tower, key=key, train=train, block_fn=block_fn)
    return _logits(params, out.sequence)


def batch_fields(cfg: GPTConfig) -> dict[str, Field]:
    """The batch :func:`loss` reads: ``tokens [batch, seq]`` int64 (``2 <= seq <=
    context_length + 1``: the model reads all but the last, predicts all but the first) and
    an optional ``mask [batch, seq]`` bool (True = a real token)."""
    seq = {"seq": cfg.context_length + 1}
    return {
        "tokens": Field("int", ("batch", "seq"), high=cfg.vocab_size, limits=seq, doc="token ids"),
        "mask": Field(
            "bool", ("batch", "seq"), optional=True, limits=seq, doc="True at real tokens"
        ),
    }


def loss(
    params: Params,
    batch: dict[str, torch.Tensor],
    *,
    cfg: GPTConfig,
    key: torch.Tensor | None = None,
    train: bool = True,
    block_fn: BlockFn | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy of ``batch = {"tokens": [B, S+1], "mask": [B, S+1]
    (optional)}``: position ``i`` predicts token ``i + 1``, and with a mask only real targets
    count. Returns ``(loss [], {"perplexity": []})``; ``key`` is needed for dropout in
    training.

    Example: ``value, metrics = loss(params, {"tokens": ids}, cfg=gpt_tiny(), train=False)``.
    """
    checks.check_keys(batch, ("tokens",))
    checks.check_params(params, init=init, cfg=cfg)
    tokens, mask = batch["tokens"], batch.get("mask")
    _check_tokens("batch['tokens']", tokens, cfg, extra=1)
    if mask is not None:
        checks.check_mask("batch['mask']", mask, tokens.shape, of="batch['tokens']")
    logits = _apply(params, tokens[:, :-1], cfg, key, train, block_fn)
    targets = tokens[:, 1:]
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    if mask is None:
        value = per_token.mean()
    else:
        weight = mask[:, 1:].flatten().to(per_token.dtype)
        value = (per_token * weight).sum() / weight.sum().clamp(min=1.0)
    return value, {"perplexity": value.detach().exp()}


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
