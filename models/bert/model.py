"""BERT as pure functions: ``init``, ``apply`` (hidden states), ``pooler`` and
sentence-transformers style ``sentence_embedding``.

Param tree (PyTorch layouts)::

    token.weight            [vocab, width]           word embeddings
    pos                     [max_positions, width]   learned absolute positions
    token_type.weight       [type_vocab, width]      segment (sentence A/B) embeddings
    norm_embed              layer norm over the summed embeddings
    transformer.blocks.N    post-norm blocks (fmm.nn.transformer, ``norm_first=False``)
    pooler                  {weight [width, width], bias}: tanh dense on [CLS] (if cfg.pooler)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fmm import checks, nn, random
from models.bert.config import BertConfig

Params = dict[str, Any]

_INIT_STD = 0.02  # BERT's initializer_range, for embeddings and the pooler


def init(cfg: BertConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params for ``cfg``, a pure function of ``(cfg, key)`` (leaf keys folded from
    paths). Pass a key on the ``meta`` device to get shapes only.

    Example: ``params = init(bert_tiny(), fmm.random.key(0))``.
    """
    checks.check_type("cfg", cfg, BertConfig)
    params: Params = {
        "token": nn.init_embedding(
            cfg.vocab_size, cfg.width, random.fold_in(key, "token"), std=_INIT_STD, dtype=dtype
        ),
        "pos": nn.init_learned_positions(
            cfg.max_positions, cfg.width, random.fold_in(key, "pos"), std=_INIT_STD, dtype=dtype
        ),
        "token_type": nn.init_embedding(
            cfg.type_vocab_size,
            cfg.width,
            random.fold_in(key, "token_type"),
            std=_INIT_STD,
            dtype=dtype,
        ),
        "norm_embed": nn.init_layer_norm(cfg.width, device=key.device, dtype=dtype),
        "transformer": nn.init_transformer(
            cfg.transformer, random.fold_in(key, "transformer"), dtype=dtype
        ),
    }
    if cfg.pooler:
        params["pooler"] = nn.init_linear(
            cfg.width, cfg.width, random.fold_in(key, "pooler"), std=_INIT_STD, dtype=dtype
        )
    return params


def _check_inputs(
    input_ids,
    attention_mask,
    token_type_ids,
    cfg: BertConfig,
    *,
    in_batch: bool = False,
    batch_of: tuple[str, torch.Tensor] | None = None,
) -> None:
    # Shared with the families that embed text the BERT way (FLAVA, ALBEF); ``in_batch``
    # names the arguments as fields of a loss's batch (``batch['input_ids']``); ``batch_of``
    # is another (name, tensor) whose batch size the ids must share (checked before the
    # mask, so the message blames the ids rather than the mask that matches them).
    name = (lambda n: f"batch[{n!r}]") if in_batch else (lambda n: n)
    ids = name("input_ids")
    seq = ("batch", range(1, cfg.max_positions + 1))
    hint = f"max_positions={cfg.max_positions}"
    checks.check_ids(ids, input_ids, seq, high=cfg.vocab_size, hint=hint)
    if batch_of is not None:
        checks.check_same_batch(batch_of, (ids, input_ids))
    if token_type_ids is not None:
        checks.check_ids(
            name("token_type_ids"), token_type_ids, input_ids.shape, high=cfg.type_vocab_size,
            of=ids,
        )  # fmt: skip
    if attention_mask is not None:
        checks.check_mask(name("attention_mask"), attention_mask, input_ids.shape, of=ids)


def embed(
    params: Params,
    input_ids: torch.Tensor,
    *,
    cfg: BertConfig,
    token_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalised word + position + token-type embeddings (before dropout).
    ``input_ids, token_type_ids: [B, S]`` -> ``[B, S, width]``."""
    _check_inputs(input_ids, None, token_type_ids, cfg)
    checks.check_params(
        params, init=init, cfg=cfg, only=("token", "pos", "token_type", "norm_embed")
    )
    return _embed(params, input_ids, cfg, token_type_ids)


def _embed(params: Params, input_ids, cfg: BertConfig, token_type_ids) -> torch.Tensor:
    x = nn.embed(params["token"], input_ids) + params["pos"][: input_ids.shape[1]]
    if token_type_ids is None:
        x = x + params["token_type"]["weight"][0]  # HF's default: every token in segment 0
    else:
        x = x + nn.embed(params["token_type"], token_type_ids)
    return nn.layer_norm(params["norm_embed"], x, eps=cfg.norm_eps)


def apply(
    params: Params,
    input_ids: torch.Tensor,
    *,
    cfg: BertConfig,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    train: bool = False,
) -> torch.Tensor:
    """Encode ``input_ids: [B, S]`` (int64) into hidden states ``[B, S, width]``.

    ``attention_mask: [B, S]`` (1/True = a real token, 0/False = padding): no token attends
    to padding; the hidden states at padded positions are computed but meaningless.
    ``token_type_ids: [B, S]`` in ``[0, type_vocab_size)`` (default all 0).
    ``key`` is needed only for dropout in training.

    Example::

        cfg = bert_tiny()
        h = apply(init(cfg, fmm.random.key(0)), torch.tensor([[2, 5, 7, 3]]), cfg=cfg)
    """
    _check_inputs(input_ids, attention_mask, token_type_ids, cfg)
    checks.check_params(params, init=init, cfg=cfg)
    return _encode(params, input_ids, cfg, attention_mask, token_type_ids, key, train)


def _encode(params, input_ids, cfg: BertConfig, attention_mask, token_type_ids, key, train):
    # apply without its checks: for callers that checked their inputs against their own
    # config (ALBEF's text encoder is a BERT inside a bigger tree).
    x = _embed(params, input_ids, cfg, token_type_ids)
    if train and cfg.dropout > 0.0:
        if key is None:
            raise ValueError("key= is missing: dropout in training needs key=")
        x = random.dropout(random.fold_in(key, "embed"), x, cfg.dropout)
    mask = None if attention_mask is None else nn.padding_mask(attention_mask)
    k = random.fold_in(key, "transformer") if key is not None else None
    return nn.transformer(
        params["transformer"], x, cfg=cfg.transformer, mask=mask, key=k, train=train
    )


def pooler(params: Params, hidden: torch.Tensor) -> torch.Tensor:
    """BERT's pooled output: ``tanh(dense(hidden[:, 0]))`` on the [CLS] token.
    ``hidden: [B, S, width]`` -> ``[B, width]``."""
    if not isinstance(params, dict) or "pooler" not in params:
        raise ValueError("params have no 'pooler' (built with cfg.pooler=False)")
    width = params["pooler"]["weight"].shape[1]
    checks.check_float("hidden", hidden, ("batch", "seq", width), like=params["pooler"]["weight"])
    return torch.tanh(nn.linear(params["pooler"], nn.pool_cls(hidden)))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``hidden: [B, S, width]`` over the real tokens of ``attention_mask: [B, S]``
    (all tokens if ``None``). Returns ``[B, width]``."""
    checks.check_float("hidden", hidden, ("batch", "seq", "width"))
    if attention_mask is not None:
        checks.check_mask("attention_mask", attention_mask, hidden.shape[:2])
    return _mean_pool(hidden, attention_mask)


def _mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    return nn.pool_mean(hidden, None if attention_mask is None else attention_mask.bool())


def sentence_embedding(
    params: Params,
    input_ids: torch.Tensor,
    *,
    cfg: BertConfig,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Sentence vectors as sentence-transformers computes them: masked mean of the hidden
    states, then (``normalize``) unit L2 norm. ``input_ids: [B, S]`` -> ``[B, width]``.

    Example: ``e = sentence_embedding(params, **tokenizer(texts), cfg=minilm_l6())``;
    ``e @ e.T`` are cosine similarities.
    """
    hidden = apply(
        params,
        input_ids,
        cfg=cfg,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
    )
    pooled = _mean_pool(hidden, attention_mask)
    return F.normalize(pooled, dim=-1) if normalize else pooled
