"""BLIP-2's training objectives as pure functions: stage one's image-text contrast (ITC),
matching on hard negatives (ITM) and image-grounded text generation (ITG), and stage two's
captioning through a frozen LM; the family's one ``loss`` picks by ``cfg.stage``.

Stage one runs the Q-Former twice: once over ``[queries; text; [DEC] text]`` whose mask
keeps three streams apart (queries see queries and cross-attend to the image, the text
sees only itself, the ``[DEC]`` text sees every query and its own past), which gives ITC's
two unimodal features and ITG's logits in one pass; once over the 3B matching pairs
(positives, a hard negative image per text, a hard negative text per image).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fmm import checks, nn, random
from fmm.nn.transformer import BlockFn
from models.albef.losses import hard_negatives, itm_loss
from models.blip2.config import Blip2Config
from models.blip2.model import (
    _clm_logits,
    _embed,
    _encode_image,
    _features,
    _filled,
    _itm_logits,
    _lm_logits,
    _stack,
    block_mask,
    decoder_ids,
    init,
    temperature,
)
from models.family import Field

Params = dict[str, Any]


def itc_similarities(
    image_feats: torch.Tensor, text_feats: torch.Tensor, temp: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP-2's image-text similarity: the best of an image's query features against a
    text feature, over ``temp``. ``image_feats [B, Q, E]``, ``text_feats [N, E]`` (unit
    norm) -> ``(sim_i2t [B, N], sim_t2i [N, B])``; on one process ``sim_t2i = sim_i2t.T``.

    Example: ``sim_i2t, sim_t2i = itc_similarities(img, txt, 0.07)``.
    """
    checks.check_float("image_feats", image_feats, ("batch", "queries", "embed"))
    embed = image_feats.shape[2]
    checks.check_float("text_feats", text_feats, ("texts", embed), hint="image_feats' embed")
    sim_i2t = torch.einsum("bqe,ne->bnq", image_feats, text_feats).amax(-1) / temp
    return sim_i2t, sim_i2t.T


def itc_loss(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, *, label_smoothing: float = 0.1
) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies, pair ``i`` matching ``i``,
    with label smoothing. ``sim_*: [B, B]``; returns a 0-d loss."""
    targets = torch.arange(sim_i2t.shape[0], device=sim_i2t.device)
    return 0.5 * (
        F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
        + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)
    )


def itg_loss(logits: torch.Tensor, input_ids: torch.Tensor, *, cfg: Blip2Config) -> torch.Tensor:
    """Next-token cross-entropy of the ITG logits ``[B, S, vocab]`` against ``input_ids
    [B, S]``: position ``i`` predicts token ``i + 1``; ``cfg.pad_id`` tokens are no targets;
    label smoothing ``cfg.label_smoothing``. Returns a 0-d loss."""
    targets = input_ids[:, 1:].masked_fill(input_ids[:, 1:] == cfg.pad_id, -100)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
        label_smoothing=cfg.label_smoothing,
    )  # fmt: skip


def stage_one_mask(queries: int, valid: torch.Tensor) -> torch.Tensor:
    """The mask over ``[queries; text; [DEC] text]`` of stage one's first pass: queries see
    the queries, text sees the real text, ``[DEC]`` text token ``i`` sees every query and
    the real ``[DEC]`` tokens ``<= i``. ``valid: [B, S]`` bool -> ``[B, 1, Q+2S, Q+2S]``."""
    (b, s), dev, q = valid.shape, valid.device, queries
    one, zero = _filled(True, dev), _filled(False, dev)
    rows = (
        (one(q, q), zero(q, s), zero(q, s)),
        (zero(s, q), one(s, s), zero(s, s)),
        (one(s, q), zero(s, s), nn.causal_mask(s, s, device=dev)),
    )
    return block_mask(rows, torch.cat([one(b, q), valid, valid], dim=1))


def stage_one_losses(
    params: Params,
    batch: dict[str, torch.Tensor],
    *,
    cfg: Blip2Config,
    key: torch.Tensor,
    train: bool = True,
    block_fn: BlockFn | None = None,
    negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """ITC, ITM and ITG on ``batch`` (:func:`batch_fields`, stage one), each a 0-d loss
    with gradients, plus ``itm_acc``. ``key`` draws the hard negatives and, with
    ``train``, dropout. ``negatives``: ``(negative text per image, negative image per
    text)``, ``[B]`` each, instead of drawing them (a parity test's identical negatives).
    """
    images, ids = batch["images"], batch["tokens"]
    valid = batch.get("attention_mask")
    valid = ids != cfg.pad_id if valid is None else valid.bool()
    b, s, q = ids.shape[0], ids.shape[1], cfg.queries
    img = _encode_image(params, images, cfg, block_fn)
    k = (lambda name: random.fold_in(key, name)) if train else (lambda name: None)
    x = _embed(params, b, (ids, decoder_ids(ids, cfg)), cfg, True, k("embed"), train)
    h = _stack(params, x, cfg, queries=q, mask=stage_one_mask(q, valid), image_embeds=img,
               key=k("qformer"), train=train, block_fn=block_fn)  # fmt: skip
    image_feats = _features(params, "vision_proj", h[:, :q])
    text_feats = _features(params, "text_proj", h[:, q])
    sim_i2t, sim_t2i = itc_similarities(image_feats, text_feats, temperature(params))
    if negatives is None:
        same = batch.get("ids", torch.arange(b, device=ids.device))
        negatives = hard_negatives(sim_i2t, sim_t2i, same, random.fold_in(key, "negatives"))
    neg_text, neg_image = negatives
    pair_ids = torch.cat([ids, ids, ids[neg_text]])
    pair_valid = torch.cat([valid, valid, valid[neg_text]])
    pair_img = torch.cat([img, img[neg_image], img])
    logits = _itm_logits(params, pair_img, pair_ids, pair_valid, cfg, k("itm"), train, block_fn)
    itm, itm_acc = itm_loss(logits[:b], logits[b:])
    return {
        "itc": itc_loss(sim_i2t, sim_t2i, label_smoothing=cfg.label_smoothing),
        "itm": itm,
        "itg": itg_loss(_clm_logits(params, h[:, q + s :], cfg), ids, cfg=cfg),
        "itm_acc": itm_acc,
    }


def batch_fields(cfg: Blip2Config) -> dict[str, Field]:
    """The batch :func:`loss` reads. Both stages: ``images [batch, C, H, W]``. Stage one:
    ``tokens [batch, seq]`` (Q-Former ids, ``seq <= max_positions``, token 0 the [CLS]),
    optionally ``attention_mask`` (default: every id but ``pad_id``) and ``ids [batch]``
    (pairs sharing an id are never each other's negatives). Stage two: ``tokens [batch,
    seq]`` (LM ids; the LM reads all but the last after the queries, predicts all but the
    first) and optionally ``mask`` (True at real tokens)."""
    image = Field("float", ("batch", cfg.in_channels, cfg.image_size, cfg.image_size),
                  doc="images")  # fmt: skip
    if cfg.stage == 2:
        seq = {"seq": cfg.lm.context_length - cfg.queries + 1}
        return {
            "images": image,
            "tokens": Field(
                "int",
                ("batch", "seq"),
                high=cfg.lm.vocab_size,
                limits=seq,
                doc="caption ids of the LM",
            ),
            "mask": Field(
                "bool", ("batch", "seq"), optional=True, limits=seq, doc="True at real tokens"
            ),
        }
    seq = {"seq": cfg.max_positions}
    return {
        "images": image,
        "tokens": Field(
            "int", ("batch", "seq"), high=cfg.vocab_size, limits=seq, doc="caption ids, [CLS] first"
        ),
        "attention_mask": Field(
            "bool", ("batch", "seq"), optional=True, limits=seq, doc="True = a real token"
        ),
        "ids": Field("int", ("batch",), optional=True, doc="image ids: same id, no negative"),
    }


def _check_batch(params: Params, batch, cfg: Blip2Config) -> None:
    checks.check_keys(batch, ("images", "tokens"))
    checks.check_params(params, init=init, cfg=cfg)
    images, tokens = batch["images"], batch["tokens"]
    want = ("batch", cfg.in_channels, cfg.image_size, cfg.image_size)
    checks.check_float("batch['images']", images, want, like=params["query_tokens"])
    if cfg.stage == 2:
        longest, high, extra = cfg.lm.context_length - cfg.queries + 1, cfg.lm.vocab_size, 1
        hint = f"{cfg.queries} queries + text <= lm.context_length={cfg.lm.context_length}"
        mask_name = "mask"
    else:
        longest, high, extra, hint = cfg.max_positions, cfg.vocab_size, 0, ""
        mask_name = "attention_mask"
    dims = ("batch", range(1 + extra, longest + 1))
    checks.check_ids("batch['tokens']", tokens, dims, high=high, hint=hint)
    checks.check_same_batch(("batch['images']", images), ("batch['tokens']", tokens))
    if batch.get(mask_name) is not None:
        checks.check_mask(f"batch[{mask_name!r}]", batch[mask_name], tokens.shape,
                          of="batch['tokens']")  # fmt: skip
    if cfg.stage == 1 and batch.get("ids") is not None:
        checks.check_int("batch['ids']", batch["ids"], (tokens.shape[0],), of="batch['tokens']")
    if cfg.stage == 1 and tokens.shape[0] < 2:
        raise ValueError("batch['tokens']: stage one needs a batch of >= 2 pairs (negatives)")


def stage_two_loss(
    params: Params,
    batch: dict[str, torch.Tensor],
    *,
    cfg: Blip2Config,
    key: torch.Tensor | None = None,
    train: bool = True,
    block_fn: BlockFn | None = None,
) -> torch.Tensor:
    """Stage two's captioning loss: the frozen LM's next-token cross-entropy of
    ``batch["tokens"] [B, S+1]`` after the image's projected queries, only real targets
    of ``batch["mask"]`` counted. Gradients reach the Q-Former, the queries,
    ``ln_vision`` and ``lm_proj``, never the image encoder nor the LM. 0-d."""
    tokens, mask = batch["tokens"], batch.get("mask")
    kd = key if train else None
    logits = _lm_logits(params, batch["images"], tokens[:, :-1], cfg, kd, train, block_fn)
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(),
                                reduction="none")  # fmt: skip
    if mask is None:
        return per_token.mean()
    weight = mask[:, 1:].flatten().to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp(min=1.0)


def loss(
    params: Params,
    batch: dict[str, torch.Tensor],
    *,
    cfg: Blip2Config,
    key: torch.Tensor | None = None,
    train: bool = True,
    block_fn: BlockFn | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The family's loss on ``batch`` (:func:`batch_fields`). Stage one: ``itc + itm +
    itg`` (``key`` required: it draws the hard negatives), metrics ``itc, itm, itg,
    itm_acc``; stage two: the captioning loss, metric ``perplexity``. Returns ``(loss [],
    detached metrics)``.

    Example: ``value, metrics = loss(params, {"images": x, "tokens": ids}, cfg=cfg, key=k)``.
    """
    _check_batch(params, batch, cfg)
    if train and key is None and (cfg.dropout > 0 or cfg.attn_dropout > 0):
        raise ValueError("key= is missing: dropout in training needs key=")
    if cfg.stage == 2:
        value = stage_two_loss(params, batch, cfg=cfg, key=key, train=train, block_fn=block_fn)
        return value, {"perplexity": value.detach().exp()}
    if key is None:
        raise ValueError("key= is missing: stage one draws its hard negatives from key=")
    terms = stage_one_losses(params, batch, cfg=cfg, key=key, train=train, block_fn=block_fn)
    value = terms["itc"] + terms["itm"] + terms["itg"]
    return value, {name: v.detach() for name, v in terms.items()}
