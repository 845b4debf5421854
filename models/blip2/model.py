"""BLIP-2 as pure functions: the frozen image encoder, the Q-Former and its heads, and the
stage-two bridge into a frozen decoder LM.

Param tree (PyTorch layouts, so converters are key maps)::

    image.*                     the frozen ViT tower (fmm.nn.towers.vit)
    ln_vision                   layer norm over the image tokens (trained)
    query_tokens                [queries, width]   the learned queries
    qformer.token.weight        [vocab, width]     word embeddings
    qformer.pos                 [max_positions, width]
    qformer.norm_embed          layer norm over queries and word + position embeddings
    qformer.transformer.blocks.N   post-norm blocks with a query MLP (``query_mlp``); the
                                ``cfg.has_cross`` ones cross-attend to the image tokens
    clm_head.{dense, norm, out} the generation head: dense, GELU, norm, vocab logits
    vision_proj / text_proj     {weight [embed, width], bias}: contrastive features
    itm_head                    {weight [2, width], bias}: matched / not matched, per query
    log_temp                    []  log of the contrastive temperature
    lm_proj                     {weight [lm width, width], bias}   (with cfg.lm)
    lm.*                        the frozen GPT (models.gpt)        (with cfg.lm)

Three attention masks over one Q-Former (BLIP-2's stage one): queries and text unimodal
(ITC), bidirectional (ITM), and multimodal causal: queries see queries, text sees every
query and the text before it (ITG). Text positions start at 0 whatever precedes them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from fmm import checks, nn, random
from fmm.nn import towers
from fmm.nn.transformer import BlockFn, transformer
from models import gpt
from models.blip2.config import _INIT_STD, Blip2Config

Params = dict[str, Any]

# The parts that stay as loaded: no gradient reaches them (see loss).
FROZEN_PARTS = ("image", "lm")


def init(cfg: Blip2Config, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params for ``cfg``, a pure function of ``(cfg, key)``; a ``meta`` key gives
    shapes only. Example: ``params = init(blip2_tiny(), fmm.random.key(0))``."""
    checks.check_type("cfg", cfg, Blip2Config)
    dev, w = key.device, cfg.width
    k = lambda name: random.fold_in(key, name)
    kq = k("qformer")
    params: Params = {
        "image": towers.init_vit(cfg.image_tower, k("image"), dtype=dtype),
        "ln_vision": nn.init_layer_norm(cfg.image_width, device=dev, dtype=dtype),
        "query_tokens": random.normal(k("query_tokens"), (cfg.queries, w), dtype=dtype) * _INIT_STD,
        "qformer": {
            "token": nn.init_embedding(cfg.vocab_size, w, random.fold_in(kq, "token"), dtype=dtype),
            "pos": nn.init_learned_positions(
                cfg.max_positions, w, random.fold_in(kq, "pos"), std=_INIT_STD, dtype=dtype
            ),
            "norm_embed": nn.init_layer_norm(w, device=dev, dtype=dtype),
            "transformer": {
                "blocks": [
                    nn.init_block(c, random.fold_in(kq, i), dtype=dtype)
                    for i, c in enumerate(cfg.blocks)
                ]
            },
        },
        "clm_head": {
            "dense": nn.init_linear(w, w, k("clm_dense"), std=_INIT_STD, dtype=dtype),
            "norm": nn.init_layer_norm(w, device=dev, dtype=dtype),
            "out": nn.init_linear(w, cfg.vocab_size, k("clm_out"), std=_INIT_STD, dtype=dtype),
        },
        "vision_proj": nn.init_linear(w, cfg.embed_dim, k("vision_proj"), dtype=dtype),
        "text_proj": nn.init_linear(w, cfg.embed_dim, k("text_proj"), dtype=dtype),
        "itm_head": nn.init_linear(w, 2, k("itm_head"), std=_INIT_STD, dtype=dtype),
        "log_temp": torch.full((), math.log(cfg.temp), dtype=dtype, device=dev),
    }
    if cfg.lm is not None:
        params["lm_proj"] = nn.init_linear(w, cfg.lm.width, k("lm_proj"), dtype=dtype)
        params["lm"] = gpt.init(cfg.lm, k("lm"), dtype=dtype)
    return params


# -- checks at the public boundary -------------------------------------------------------


def _check_images(params: Params, images, cfg: Blip2Config) -> None:
    want = ("batch", cfg.in_channels, cfg.image_size, cfg.image_size)
    checks.check_float("images", images, want, like=params["image"]["patch"]["weight"])


def _check_image_embeds(params: Params, image_embeds, cfg: Blip2Config) -> None:
    checks.check_float(
        "image_embeds", image_embeds, ("batch", "tokens", cfg.image_width),
        like=params["query_tokens"],
    )  # fmt: skip


def _check_text(input_ids, attention_mask, cfg: Blip2Config, batch_of=None) -> None:
    seq = ("batch", range(1, cfg.max_positions + 1))
    hint = f"max_positions={cfg.max_positions}"
    checks.check_ids("input_ids", input_ids, seq, high=cfg.vocab_size, hint=hint)
    if batch_of is not None:
        checks.check_same_batch(batch_of, ("input_ids", input_ids))
    if attention_mask is not None:
        checks.check_mask("attention_mask", attention_mask, input_ids.shape, of="input_ids")


# -- the image encoder --------------------------------------------------------------------


def _encode_image(params: Params, images, cfg: Blip2Config, block_fn=None) -> torch.Tensor:
    # Frozen: no graph is kept through the encoder, so no gradient can reach it.
    with torch.no_grad():
        tokens = towers.vit(params["image"], images, cfg=cfg.image_tower, block_fn=block_fn)
    return nn.layer_norm(params["ln_vision"], tokens.sequence, eps=cfg.vision_norm_eps)


def encode_image(
    params: Params, images: torch.Tensor, *, cfg: Blip2Config, block_fn: BlockFn | None = None
) -> torch.Tensor:
    """The frozen ViT's tokens through ``ln_vision``: what the Q-Former cross-attends to.
    ``images [B, C, H, W] -> [B, 1 + patches, image_width]``."""
    checks.check_params(params, init=init, cfg=cfg, only=("image", "ln_vision"))
    _check_images(params, images, cfg)
    return _encode_image(params, images, cfg, block_fn)


# -- the Q-Former ---------------------------------------------------------------------------


def _embed(params: Params, batch: int, texts, cfg: Blip2Config, queries: bool, key, train):
    """The queries (if ``queries``), then word + position embeddings of each of ``texts``,
    normalised together: ``[B, (Q +) sum of S, width]``."""
    q = params["qformer"]
    parts = [params["query_tokens"].expand(batch, -1, -1)] if queries else []
    for ids in texts:
        parts.append(nn.embed(q["token"], ids) + q["pos"][: ids.shape[1]])
    x = nn.layer_norm(q["norm_embed"], torch.cat(parts, dim=1), eps=cfg.norm_eps)
    if train and cfg.dropout > 0.0:
        x = random.dropout(random.fold_in(key, "embed"), x, cfg.dropout)
    return x


def _stack(params: Params, x, cfg: Blip2Config, *, queries: int, mask, image_embeds, key, train,
           block_fn) -> torch.Tensor:  # fmt: skip
    # One config per block: cross-attention only in the cfg.has_cross layers.
    return transformer(
        params["qformer"]["transformer"], x, cfg=cfg.blocks, key=key, train=train,
        block_fn=block_fn, mask=mask, context=image_embeds, queries=queries,
    )  # fmt: skip


def block_mask(rows, cols: torch.Tensor) -> torch.Tensor:
    """A mask from blocks: ``rows``, a tuple of rows, each a tuple of bool blocks ``[r, c]``
    (the rows' heights and the columns' widths agreeing), and ``cols: [B, L]``, which
    columns are real tokens. Returns ``[B, 1, L, L]`` (True = may attend)."""
    full = torch.cat([torch.cat(row, dim=1) for row in rows])
    return (full[None] & cols[:, None, :])[:, None]


def _filled(value: bool, device):
    return lambda r, c: torch.full((r, c), value, dtype=torch.bool, device=device)


def multimodal_causal_mask(queries: int, valid: torch.Tensor) -> torch.Tensor:
    """ITG's mask over ``[queries; text]``: queries see every query, text token ``i`` sees
    every query and the real text tokens ``<= i``. ``valid: [B, S]`` bool -> ``[B, 1, Q+S,
    Q+S]``."""
    (b, s), dev, q = valid.shape, valid.device, queries
    one, zero = _filled(True, dev), _filled(False, dev)
    rows = ((one(q, q), zero(q, s)), (one(s, q), nn.causal_mask(s, s, device=dev)))
    return block_mask(rows, torch.cat([one(b, q), valid], dim=1))


def _qformer(params, cfg: Blip2Config, input_ids, valid, image_embeds, queries: bool, causal,
             key=None, train=False, block_fn=None) -> torch.Tensor:  # fmt: skip
    batch = (image_embeds if input_ids is None else input_ids).shape[0]
    texts = () if input_ids is None else (input_ids,)
    x = _embed(params, batch, texts, cfg, queries, key, train)
    nq = cfg.queries if queries else 0
    mask = None
    if input_ids is not None:
        if valid is None:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        valid = valid.bool()
        if causal and queries:
            mask = multimodal_causal_mask(nq, valid)
        else:
            full = torch.cat([torch.ones(batch, nq, dtype=torch.bool, device=x.device), valid], 1)
            mask = nn.padding_mask(full)
            if causal:
                mask = mask & nn.causal_mask(x.shape[1], x.shape[1], device=x.device)
    k = random.fold_in(key, "qformer") if key is not None else None
    return _stack(params, x, cfg, queries=nq, mask=mask, image_embeds=image_embeds, key=k,
                  train=train, block_fn=block_fn)  # fmt: skip


def qformer(
    params: Params,
    *,
    cfg: Blip2Config,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    image_embeds: torch.Tensor | None = None,
    queries: bool = True,
    causal: bool = False,
    key: torch.Tensor | None = None,
    train: bool = False,
    block_fn: BlockFn | None = None,
) -> torch.Tensor:
    """The Q-Former's last hidden states over ``[queries (if queries); text (if input_ids)]``:
    ``[B, Q + S, width]`` (``Q = cfg.queries``).

    ``input_ids [B, S]``, ``attention_mask [B, S]`` (True/1 = a real token);
    ``image_embeds [B, T, image_width]`` (:func:`encode_image`) is what the queries
    cross-attend to (needed with ``queries``). Without ``causal`` every token sees every
    real token (ITM; a text-only or query-only call is ITC's unimodal pass); with it, the
    multimodal causal mask (:func:`multimodal_causal_mask`; ITG).

    Example::

        img = encode_image(params, images, cfg=cfg)
        q = qformer(params, cfg=cfg, image_embeds=img)               # [B, Q, W]
        t = qformer(params, cfg=cfg, input_ids=ids, queries=False)   # [B, S, W]
    """
    checks.check_params(params, init=init, cfg=cfg, only=("query_tokens", "qformer"))
    if input_ids is None and not queries:
        raise ValueError("input_ids= is missing: a Q-Former call without queries needs text")
    if queries:
        if image_embeds is None:
            raise ValueError("image_embeds= is missing: the queries cross-attend to the image")
        _check_image_embeds(params, image_embeds, cfg)
    if input_ids is not None:
        of = ("image_embeds", image_embeds) if queries else None
        _check_text(input_ids, attention_mask, cfg, batch_of=of)
    return _qformer(params, cfg, input_ids, attention_mask, image_embeds, queries, causal, key,
                    train, block_fn)  # fmt: skip


# -- heads ------------------------------------------------------------------------------------


def _features(params: Params, part: str, h: torch.Tensor) -> torch.Tensor:
    return F.normalize(nn.linear(params[part], h), dim=-1)


def _clm_logits(params: Params, h: torch.Tensor, cfg: Blip2Config) -> torch.Tensor:
    head = params["clm_head"]
    x = nn.layer_norm(head["norm"], F.gelu(nn.linear(head["dense"], h)), eps=cfg.norm_eps)
    return nn.linear(head["out"], x)


def decoder_ids(input_ids: torch.Tensor, cfg: Blip2Config) -> torch.Tensor:
    """The text ITG reads: ``input_ids [B, S]`` with the first token replaced by
    ``cfg.bos_id`` (BLIP-2's ``[DEC]`` in place of ``[CLS]``)."""
    return torch.cat([torch.full_like(input_ids[:, :1], cfg.bos_id), input_ids[:, 1:]], dim=1)


def clm_logits(
    params: Params,
    image_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    cfg: Blip2Config,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image-grounded next-token logits: the text (first token made ``[DEC]``) after the
    queries under the multimodal causal mask, through the generation head.
    ``image_embeds [B, T, image_width]``, ``input_ids [B, S]`` -> ``[B, S, vocab]``
    (position ``i`` predicts token ``i + 1``)."""
    checks.check_params(params, init=init, cfg=cfg, only=("query_tokens", "qformer", "clm_head"))
    _check_image_embeds(params, image_embeds, cfg)
    _check_text(input_ids, attention_mask, cfg, batch_of=("image_embeds", image_embeds))
    h = _qformer(params, cfg, decoder_ids(input_ids, cfg), attention_mask, image_embeds, True,
                 True)  # fmt: skip
    return _clm_logits(params, h[:, cfg.queries :], cfg)


def _itm_logits(params, image_embeds, input_ids, valid, cfg: Blip2Config, key=None, train=False,
                block_fn=None) -> torch.Tensor:  # fmt: skip
    h = _qformer(params, cfg, input_ids, valid, image_embeds, True, False, key, train, block_fn)
    return nn.linear(params["itm_head"], h[:, : cfg.queries]).mean(dim=1)


def itm_logits(
    params: Params,
    image_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    cfg: Blip2Config,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Matching logits of image-text pairs: queries and text attend to each other, the
    queries to the image; the 2-way head's logits averaged over the queries.
    ``image_embeds [B, T, image_width]``, ``input_ids [B, S]`` -> ``[B, 2]`` (1 = match)."""
    checks.check_params(params, init=init, cfg=cfg, only=("query_tokens", "qformer", "itm_head"))
    _check_image_embeds(params, image_embeds, cfg)
    _check_text(input_ids, attention_mask, cfg, batch_of=("image_embeds", image_embeds))
    return _itm_logits(params, image_embeds, input_ids, attention_mask, cfg)


def embed_image(params: Params, images: torch.Tensor, *, cfg: Blip2Config) -> torch.Tensor:
    """Unit-norm query features for retrieval: ``images [B, C, H, W] -> [B, queries, embed]``
    (an image-text score is the best query's cosine with the text feature)."""
    checks.check_params(params, init=init, cfg=cfg)
    _check_images(params, images, cfg)
    img = _encode_image(params, images, cfg)
    return _features(params, "vision_proj", _qformer(params, cfg, None, None, img, True, False))


def embed_text(
    params: Params,
    input_ids: torch.Tensor,
    *,
    cfg: Blip2Config,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unit-norm text features (the [CLS] token, text alone): ``[B, S] -> [B, embed]``."""
    checks.check_params(params, init=init, cfg=cfg, only=("query_tokens", "qformer", "text_proj"))
    _check_text(input_ids, attention_mask, cfg)
    h = _qformer(params, cfg, input_ids, attention_mask, None, False, False)
    return _features(params, "text_proj", h[:, 0])


def temperature(params: Params) -> torch.Tensor:
    """The learned temperature projected into [0.001, 0.5] (BLIP-2's clamp, no edit of params)."""
    checks.check_keys(params, ("log_temp",), name="params")
    return params["log_temp"].exp().clamp(0.001, 0.5)


# -- stage two: the queries as a frozen LM's prefix --------------------------------------------


def _frozen(part: Any) -> Any:
    # Plain dicts and lists of detached leaves: under fmm.adapter a block's params arrive
    # as a dict subclass bound to its module, which a frozen block must not run through.
    if isinstance(part, torch.Tensor):
        return part.detach()
    if isinstance(part, dict):
        return {k: _frozen(v) for k, v in part.items()}
    return [_frozen(v) for v in part]


def _lm_logits(params, images, tokens, cfg: Blip2Config, key=None, train=False, block_fn=None):
    img = _encode_image(params, images, cfg, block_fn)
    kq = random.fold_in(key, "qformer_pass") if key is not None else None
    queries = _qformer(params, cfg, None, None, img, True, False, kq, train, block_fn)
    prefix = nn.linear(params["lm_proj"], queries)  # [B, Q, lm width]
    # The LM is frozen: its weights enter detached, while the gradient still flows through
    # its activations back to the prefix, the projection and the Q-Former.
    lm, q = _frozen(params["lm"]), cfg.queries
    # The LM adds its positions to the prefix too: text positions start after the queries.
    positions = torch.arange(q, q + tokens.shape[1], device=tokens.device)[None]
    x = torch.cat([prefix + lm["pos"][:q], gpt.embed(lm, tokens, positions)], dim=1)
    kl = random.fold_in(key, "lm") if key is not None else None
    out = towers.encode_embeddings(lm, x, cfg=cfg.lm.tower, causal=True, key=kl, train=train,
                                   block_fn=block_fn)  # fmt: skip
    return F.linear(out.sequence[:, q:], lm["token"]["weight"])


def caption_logits(
    params: Params, images: torch.Tensor, tokens: torch.Tensor, *, cfg: Blip2Config
) -> torch.Tensor:
    """Stage two: the frozen LM's next-token logits for ``tokens [B, S]`` (LM ids) after
    the image's queries projected into it as a prefix -> ``[B, S, lm vocab]`` (position
    ``i`` predicts token ``i + 1``; ``cfg.queries + S <= lm.context_length``)."""
    if cfg.lm is None:
        raise ValueError("cfg has no lm: caption_logits needs a stage-two config (lm=...)")
    checks.check_params(params, init=init, cfg=cfg)
    _check_images(params, images, cfg)
    longest = cfg.lm.context_length - cfg.queries
    checks.check_ids(
        "tokens", tokens, ("batch", range(1, longest + 1)), high=cfg.lm.vocab_size,
        hint=f"{cfg.queries} queries + text <= lm.context_length={cfg.lm.context_length}",
    )  # fmt: skip
    checks.check_same_batch(("images", images), ("tokens", tokens))
    return _lm_logits(params, images, tokens, cfg)
