"""BERT as pure functions: ``init``, ``apply`` (hidden states, through the shared text tower),
``pooler``, sentence-transformers style ``sentence_embedding``, and the masked-LM ``loss``.

Param tree (PyTorch layouts; the text tower's names, :mod:`fmm.nn.towers`)::

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
from fmm.losses import mask_tokens, masked_accuracy, masked_cross_entropy
from fmm.nn import towers
from fmm.nn.transformer import BlockFn
from models.bert.config import _INIT_STD, BertConfig
from models.family import Field

Params = dict[str, Any]


def init(cfg: BertConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params for ``cfg``, a pure function of ``(cfg, key)`` (leaf keys folded from
    paths). Pass a key on the ``meta`` device to get shapes only.

    Example: ``params = init(bert_tiny(), fmm.random.key(0))``.
    """
    checks.check_type("cfg", cfg, BertConfig)
    params = towers.init_text(cfg.tower, key, dtype=dtype)
    if cfg.pooler:
        params["pooler"] = nn.init_linear(
            cfg.width, cfg.width, random.fold_in(key, "pooler"), std=_INIT_STD, dtype=dtype
        )
    return params


def check_inputs(
    input_ids: torch.Tensor,
    *,
    cfg: BertConfig,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    names: tuple[str, str, str] = ("input_ids", "attention_mask", "token_type_ids"),
    batch_of: tuple[str, torch.Tensor] | None = None,
) -> None:
    """Check BERT-style text inputs against ``cfg``: ``input_ids [B, S]`` in
    ``[0, vocab_size)`` with ``S <= max_positions``, ``attention_mask`` and
    ``token_type_ids`` of the same shape. ``names``: how the three arguments appear in the
    errors (e.g. ``batch['tokens']``); ``batch_of``: another ``(name, tensor)`` whose batch
    size the ids must share (checked before the mask, so the error blames the ids).

    Example: ``check_inputs(ids, cfg=cfg, attention_mask=ids != cfg.pad_id)``.
    """
    ids, mask, types = names
    seq = ("batch", range(1, cfg.max_positions + 1))
    hint = f"max_positions={cfg.max_positions}"
    checks.check_ids(ids, input_ids, seq, high=cfg.vocab_size, hint=hint)
    if batch_of is not None:
        checks.check_same_batch(batch_of, (ids, input_ids))
    if token_type_ids is not None:
        checks.check_ids(types, token_type_ids, input_ids.shape, high=cfg.type_vocab_size, of=ids)
    if attention_mask is not None:
        checks.check_mask(mask, attention_mask, input_ids.shape, of=ids)


def apply(
    params: Params,
    input_ids: torch.Tensor,
    *,
    cfg: BertConfig,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    train: bool = False,
    block_fn: BlockFn | None = None,
) -> torch.Tensor:
    """Encode ``input_ids: [B, S]`` (int64) into hidden states ``[B, S, width]``.

    ``attention_mask: [B, S]`` (1/True = a real token, 0/False = padding): no token attends
    to padding; the hidden states at padded positions are computed but meaningless.
    ``token_type_ids: [B, S]`` in ``[0, type_vocab_size)`` (default all 0).
    ``key`` is needed only for dropout in training; ``block_fn`` runs each block (the
    adapter's seam).

    Example::

        cfg = bert_tiny()
        h = apply(init(cfg, fmm.random.key(0)), torch.tensor([[2, 5, 7, 3]]), cfg=cfg)
    """
    check_inputs(input_ids, cfg=cfg, attention_mask=attention_mask, token_type_ids=token_type_ids)
    checks.check_params(params, init=init, cfg=cfg)
    return _encode(params, input_ids, cfg, attention_mask, token_type_ids, key, train, block_fn)


def _encode(params, input_ids, cfg: BertConfig, valid, token_type_ids, key, train, block_fn):
    return towers.text(
        params, input_ids, cfg=cfg.tower, valid=valid, token_type_ids=token_type_ids, key=key,
        train=train, block_fn=block_fn,
    ).sequence  # fmt: skip


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
        params, input_ids, cfg=cfg, attention_mask=attention_mask, token_type_ids=token_type_ids
    )
    pooled = _mean_pool(hidden, attention_mask)
    return F.normalize(pooled, dim=-1) if normalize else pooled


def batch_fields(cfg: BertConfig) -> dict[str, Field]:
    """The batch :func:`loss` reads: ``tokens [batch, seq]`` (``seq <= max_positions``),
    optionally ``attention_mask [batch, seq]`` (default: every id but ``pad_id`` is real)
    and ``token_type_ids [batch, seq]`` (default all 0)."""
    seq = {"seq": cfg.max_positions}
    return {
        "tokens": Field("int", ("batch", "seq"), high=cfg.vocab_size, limits=seq, doc="text ids"),
        "attention_mask": Field("bool", ("batch", "seq"), optional=True, doc="True = a real token"),
        "token_type_ids": Field(
            "int", ("batch", "seq"), high=cfg.type_vocab_size, optional=True, doc="segments"
        ),
    }


_BATCH_NAMES = ("batch['tokens']", "batch['attention_mask']", "batch['token_type_ids']")


def _check_objective(cfg: BertConfig, key) -> None:
    if key is None:
        raise ValueError("key= is missing: the masked LM draws which tokens to hide from key=")
    for name, ids in (("mask_id", (cfg.mask_id,)), ("special_ids", cfg.special_ids)):
        if any(i >= cfg.vocab_size for i in ids):
            raise ValueError(
                f"cfg.{name}={getattr(cfg, name)} lies outside the vocabulary "
                f"[0, {cfg.vocab_size}): set BertConfig({name}=...)"
            )


def loss(
    params: Params,
    batch: dict[str, torch.Tensor],
    *,
    cfg: BertConfig,
    key: torch.Tensor | None = None,
    train: bool = True,
    block_fn: BlockFn | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked language modelling on ``batch`` (:func:`batch_fields`): hide
    ``cfg.mask_rate`` of the real, non-special tokens behind ``cfg.mask_id`` and predict
    them, the tied word embeddings serving as the output layer (no params beyond
    :func:`init`'s). ``key`` (required) draws the hidden tokens and, with ``train``,
    dropout. Returns ``(loss [], {"mlm": [], "mlm_acc": []})`` (detached metrics).

    Example: ``value, metrics = loss(params, {"tokens": ids}, cfg=cfg, key=fmm.random.key(1))``.
    """
    checks.check_keys(batch, ("tokens",))
    tokens = batch["tokens"]
    mask, types = batch.get("attention_mask"), batch.get("token_type_ids")
    check_inputs(tokens, cfg=cfg, attention_mask=mask, token_type_ids=types, names=_BATCH_NAMES)
    checks.check_params(params, init=init, cfg=cfg)
    _check_objective(cfg, key)
    valid = tokens != cfg.pad_id if mask is None else mask.bool()
    allowed = valid
    for special in cfg.special_ids:
        allowed = allowed & (tokens != special)
    hidden_ids, labels = mask_tokens(
        random.fold_in(key, "mask"), tokens, rate=cfg.mask_rate, mask_id=cfg.mask_id,
        allowed=allowed,
    )  # fmt: skip
    k = random.fold_in(key, "dropout") if train else None
    hidden = _encode(params, hidden_ids, cfg, valid, types, k, train, block_fn)
    logits = F.linear(hidden, params["token"]["weight"])  # tied: the embedding is the head
    value = masked_cross_entropy(logits, labels)
    return value, {"mlm": value.detach(), "mlm_acc": masked_accuracy(logits.detach(), labels)}
