"""MDETR as pure functions: ``init``, ``apply`` (boxes, token logits and the alignment
embeddings of every object query), the Hungarian-matched ``loss``, ``batch_fields``.

A ResNet's last features (projected to ``width``, with DETR's sine positions) and the
RoBERTa text tokens (projected to ``width``) are one sequence through a post-norm encoder;
the decoder's learned queries cross-attend to it; each query's final state predicts a box
(a 3-layer MLP, sigmoid ``cxcywh``), logits over the text's token positions plus "no
object", and, projected and unit-normalised, an embedding aligned with the encoded tokens'.

Param tree (PyTorch layouts)::

    backbone                 fmm.nn.resnet's tree
    image_proj               {weight [width, channels, 1, 1], bias}
    text                     the BERT/RoBERTa text tower (models.bert)
    text_proj                {fc: [width, text.width], norm: LayerNorm eps 1e-12}
    encoder.blocks.N         post-norm blocks (fmm.nn.transformer)
    decoder.blocks.N, decoder.norm   post-norm blocks with cross-attention, the final norm
    query                    [queries, width]
    class_head               [classes + 1, width]
    box_head                 {fc1, fc2, fc3}: width -> width -> width -> 4
    align_image, align_text  [contrastive_dim, width] (if cfg.contrastive_dim)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from fmm import boxes, checks, matching, nn, random
from fmm.nn import towers
from fmm.nn.attention import padding_mask
from fmm.nn.conv import conv2d, init_conv2d
from fmm.nn.resnet import init_resnet, resnet
from fmm.nn.transformer import BlockFn, init_transformer, transformer
from models.family import Field
from models.mdetr.config import MDETRConfig

Params = dict[str, Any]


def init(cfg: MDETRConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params for ``cfg``, pure in ``(cfg, key)``; a ``meta`` key gives shapes only.

    Example: ``params = init(mdetr_tiny(), fmm.random.key(0))``.
    """
    checks.check_type("cfg", cfg, MDETRConfig)
    k = lambda name: random.fold_in(key, name)
    w, dev = cfg.width, key.device
    params: Params = {
        "backbone": init_resnet(cfg.backbone, k("backbone"), dtype=dtype),
        "image_proj": init_conv2d(cfg.backbone.channels, w, 1, k("image_proj"), dtype=dtype),
        "text": towers.init_text(cfg.text.tower, k("text"), dtype=dtype),
        "text_proj": {
            "fc": nn.init_linear(cfg.text.width, w, k("text_proj"), dtype=dtype),
            "norm": nn.init_layer_norm(w, device=dev, dtype=dtype),
        },
        "encoder": init_transformer(cfg.encoder, k("encoder"), dtype=dtype),
        "decoder": {
            **init_transformer(cfg.decoder, k("decoder"), dtype=dtype),
            "norm": nn.init_layer_norm(w, device=dev, dtype=dtype),
        },
        "query": random.normal(k("query"), (cfg.queries, w), dtype=dtype),
        "class_head": nn.init_linear(w, cfg.classes + 1, k("class_head"), dtype=dtype),
        "box_head": {
            f"fc{i}": nn.init_linear(
                w, 4 if i == 3 else w, random.fold_in(k("box_head"), i), dtype=dtype
            )
            for i in (1, 2, 3)
        },
    }
    if cfg.contrastive_dim is not None:
        for name in ("align_image", "align_text"):
            params[name] = nn.init_linear(w, cfg.contrastive_dim, k(name), dtype=dtype)
    return params


def sine_positions(
    valid: torch.Tensor, dim: int, *, temperature: float, scale: float
) -> torch.Tensor:
    """DETR's 2-d sine position encoding of a feature map's real cells.

    ``valid: [B, H, W]`` bool -> ``[B, H * W, dim]`` (row-major cells): the first half
    encodes the row, the second the column, each the cumulative count of real cells
    normalised to ``(0, scale]``, as interleaved ``sin, cos`` at ``dim / 2`` frequencies
    ``temperature ** (2 * (i // 2) / (dim / 2))``.
    """
    half = dim // 2
    rows = valid.cumsum(1, dtype=torch.float32)
    cols = valid.cumsum(2, dtype=torch.float32)
    rows = rows / (rows[:, -1:, :] + 1e-6) * scale
    cols = cols / (cols[:, :, -1:] + 1e-6) * scale
    i = torch.arange(half, dtype=torch.float32, device=valid.device)
    freq = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / half)

    def encode(x: torch.Tensor) -> torch.Tensor:
        t = x[..., None] / freq
        return torch.stack((t[..., 0::2].sin(), t[..., 1::2].cos()), dim=-1).flatten(-2)

    return rearrange(torch.cat((encode(rows), encode(cols)), dim=-1), "b h w d -> b (h w) d")


def _roberta_positions(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    # RoBERTa counts positions over real tokens only, from pad_id + 1; padding sits at pad_id.
    real = (tokens != pad_id).long()
    return real.cumsum(1) * real + pad_id


def _encode_text(params, tokens, cfg: MDETRConfig, key, train, block_fn):
    t = cfg.text
    valid = tokens != t.pad_id
    k = random.fold_in(key, "text") if train and key is not None else None
    hidden = towers.text(
        params["text"], tokens, cfg=t.tower, valid=valid, positions=_roberta_positions(tokens, t.pad_id),
        key=k, train=train, block_fn=block_fn,
    ).sequence  # fmt: skip
    h = nn.layer_norm(
        params["text_proj"]["norm"], nn.linear(params["text_proj"]["fc"], hidden), eps=1e-12
    )
    if train and cfg.dropout > 0:
        h = random.dropout(random.fold_in(key, "text_proj"), h, cfg.dropout)
    return h, valid


def _forward(params, images, tokens, image_mask, cfg: MDETRConfig, key, train, block_fn):
    """The unchecked forward: the heads' outputs of each decoder layer, last one last
    (:func:`apply` returns that one)."""
    features = conv2d(params["image_proj"], resnet(params["backbone"], images, cfg=cfg.backbone))
    if image_mask is None:
        image_mask = torch.ones(
            images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device
        )
    # Nearest-neighbour resizing of the pixel mask to the feature map, as MDETR's.
    cells = F.interpolate(image_mask[None].float(), size=features.shape[-2:])[0] > 0.5
    text, text_valid = _encode_text(params, tokens, cfg, key, train, block_fn)
    image = rearrange(features, "b d h w -> b (h w) d")
    pos = sine_positions(cells, cfg.width, temperature=cfg.pos_temperature, scale=cfg.pos_scale)
    pos = torch.cat((pos.to(image.dtype), torch.zeros_like(text)), dim=1)
    mask = padding_mask(torch.cat((cells.flatten(1), text_valid), dim=1))
    stochastic = train and key is not None
    k = (lambda name: random.fold_in(key, name)) if stochastic else (lambda name: None)
    memory = transformer(
        params["encoder"], torch.cat((image, text), dim=1), cfg=cfg.encoder, key=k("encoder"),
        train=train, block_fn=block_fn, mask=mask, pos=pos,
    )  # fmt: skip
    token_embed = None
    if cfg.contrastive_dim is not None:
        text_memory = memory[:, image.shape[1] :]
        token_embed = F.normalize(nn.linear(params["align_text"], text_memory), dim=-1)
    query = params["query"].to(memory.dtype).expand(images.shape[0], -1, -1)
    hidden, outs = torch.zeros_like(query), []
    # One block per call, so every layer's output is at hand (MDETR's auxiliary losses).
    for i, layer in enumerate(params["decoder"]["blocks"]):
        hidden = transformer(
            {"blocks": [layer]}, hidden, cfg=cfg.decoder, key=k(f"decoder{i}"), train=train,
            block_fn=block_fn, context=memory, context_mask=mask, pos=query, context_pos=pos,
        )  # fmt: skip
        outs.append(_heads(params, nn.layer_norm(params["decoder"]["norm"], hidden), token_embed))
    return outs


def _heads(params, hidden, token_embed):
    """Each query's predictions from its normalised decoder state ``hidden [B, Q, width]``."""
    box = params["box_head"]
    h = F.relu(nn.linear(box["fc2"], F.relu(nn.linear(box["fc1"], hidden))))
    out = {
        "logits": nn.linear(params["class_head"], hidden),
        "boxes": nn.linear(box["fc3"], h).sigmoid(),
    }
    if token_embed is not None:
        out["query_embed"] = F.normalize(nn.linear(params["align_image"], hidden), dim=-1)
        out["token_embed"] = token_embed
    return out


def _check_inputs(
    params, images, tokens, image_mask, cfg: MDETRConfig, names=("images", "tokens", "image_mask")
):
    n_img, n_tok, n_mask = names
    side = range(1, cfg.image_size + 1)
    checks.check_float(n_img, images, ("batch", 3, side, side), like=params["query"])
    checks.check_ids(
        n_tok, tokens, ("batch", range(1, cfg.max_tokens + 1)), high=cfg.text.vocab_size
    )
    checks.check_same_batch((n_img, images), (n_tok, tokens))
    if image_mask is not None:
        checks.check_mask(n_mask, image_mask, (images.shape[0], *images.shape[2:]), of=n_img)


def _check_key(cfg: MDETRConfig, key, train: bool) -> None:
    if train and key is None and max(cfg.dropout, cfg.text.dropout, cfg.text.attn_dropout) > 0:
        raise ValueError("key= is missing: MDETR's dropout in training needs key=")


def apply(
    params: Params,
    images: torch.Tensor,
    tokens: torch.Tensor,
    *,
    cfg: MDETRConfig,
    image_mask: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    train: bool = False,
    block_fn: BlockFn | None = None,
) -> dict[str, torch.Tensor]:
    """Predict for every object query, given ``images: [B, 3, H, W]`` (``H, W <=
    image_size``; ``image_mask: [B, H, W]`` True on real pixels, default all) and
    ``tokens: [B, S]`` (RoBERTa ids, ``pad_id`` padding, ``S <= max_tokens``).

    Returns ``{"logits": [B, queries, classes + 1]`` (token positions, then no object),
    ``"boxes": [B, queries, 4]`` (``cxcywh`` in ``[0, 1]``), and with an alignment head
    ``"query_embed": [B, queries, contrastive_dim]``, ``"token_embed": [B, S,
    contrastive_dim]`` (unit norm)``}``.

    Example: ``out = apply(params, images, tokens, cfg=mdetr_tiny())``.
    """
    checks.check_params(params, init=init, cfg=cfg)
    _check_inputs(params, images, tokens, image_mask, cfg)
    _check_key(cfg, key, train)
    return _forward(params, images, tokens, image_mask, cfg, key, train, block_fn)[-1]


def ground(
    out: dict[str, torch.Tensor], phrase_map: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The box of each phrase (MDETR's phrase-grounding read-out): the query whose token
    distribution puts the most mass on the phrase's tokens.

    ``out``: :func:`apply`'s outputs; ``phrase_map: [B, P, S]`` bool, True where token ``s``
    belongs to phrase ``p``. Returns ``(boxes [B, P, 4] cxcywh, scores [B, P])``, the score
    being that query's probability mass on the phrase.

    Example: ``boxes, scores = ground(apply(params, images, tokens, cfg=cfg), phrase_map)``.
    """
    logits = out["logits"]
    dims = (logits.shape[0], "phrases", range(1, logits.shape[-1]))
    checks.check_mask("phrase_map", phrase_map, dims)
    prob = logits.float().softmax(-1)[..., : phrase_map.shape[-1]]  # [B, Q, S]
    mass = phrase_map.float() @ prob.transpose(1, 2)  # [B, P, Q]
    scores, best = mass.max(-1)
    index = best[..., None].expand(-1, -1, 4)
    return out["boxes"].gather(1, index), scores


def match_cost(
    out: dict[str, torch.Tensor],
    targets: torch.Tensor,
    target_boxes: torch.Tensor,
    *,
    cfg: MDETRConfig,
) -> torch.Tensor:
    """MDETR's matching cost ``[B, queries, T]`` of query ``q`` taking target ``t``:
    ``-cost_class * p_q . targets_t + cost_bbox * |box_q - box_t|_1 - cost_giou *
    GIoU(box_q, box_t)``. ``targets: [B, T, classes + 1]`` (:func:`fmm.boxes.token_targets`),
    ``target_boxes: [B, T, 4]`` ``cxcywh``."""
    checks.check_keys(out, ("logits", "boxes"), name="out")
    logits = out["logits"]
    checks.check_float("targets", targets, (logits.shape[0], "targets", logits.shape[-1]))
    checks.check_float("target_boxes", target_boxes, (*targets.shape[:2], 4), hint="cxcywh")
    # In float32 whatever the compute dtype: rounding must not decide the matching.
    prob, pred = logits.float().softmax(-1), out["boxes"].float()
    targets, target_boxes = targets.float(), target_boxes.float()
    l1 = (pred[:, :, None] - target_boxes[:, None]).abs().sum(-1)
    giou = boxes.generalized_iou(
        boxes.cxcywh_to_xyxy(pred[:, :, None]), boxes.cxcywh_to_xyxy(target_boxes[:, None])
    )
    return (
        -cfg.cost_class * prob @ targets.transpose(1, 2) + cfg.cost_bbox * l1 - cfg.cost_giou * giou
    )


def batch_fields(cfg: MDETRConfig) -> dict[str, Field]:
    """The batch :func:`loss` reads: ``images [batch, 3, height, width]`` (sides up to
    ``image_size``) and optionally ``image_mask [batch, height, width]``; ``tokens [batch,
    seq]``; per image up to ``max_boxes`` targets: ``boxes [batch, boxes, 4]`` (``cxcywh`` in ``[0, 1]``),
    ``token_map [batch, boxes, seq]`` (True where a token names the box) and optionally
    ``box_valid [batch, boxes]`` (False = padding; default all real)."""
    size = {"height": cfg.image_size, "width": cfg.image_size}
    targets = {"boxes": cfg.max_boxes, "seq": cfg.max_tokens}
    return {
        "images": Field("float", ("batch", 3, "height", "width"), limits=size, doc="padded images"),
        "image_mask": Field(
            "bool",
            ("batch", "height", "width"),
            optional=True,
            limits=size,
            doc="True = real pixel",
        ),
        "tokens": Field(
            "int",
            ("batch", "seq"),
            high=cfg.text.vocab_size,
            limits={"seq": cfg.max_tokens},
            doc="text ids",
        ),
        "boxes": Field("float", ("batch", "boxes", 4), limits=targets, doc="cxcywh targets"),
        "token_map": Field(
            "bool", ("batch", "boxes", "seq"), limits=targets, doc="tokens naming each box"
        ),
        "box_valid": Field(
            "bool", ("batch", "boxes"), optional=True, limits=targets, doc="False = padding target"
        ),
    }


def loss(
    params: Params,
    batch: dict[str, torch.Tensor],
    *,
    cfg: MDETRConfig,
    key: torch.Tensor | None = None,
    train: bool = True,
    block_fn: BlockFn | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MDETR's grounding loss on ``batch`` (:func:`batch_fields`): queries are matched to
    targets by the Hungarian step (:func:`fmm.matching.match` on :func:`match_cost`, on the
    host), then ``loss_class * soft-token CE + loss_bbox * L1 + loss_giou * (1 - GIoU) +
    loss_align * contrastive alignment``, each normalised by the number of real targets;
    with ``cfg.aux_loss`` the same for every earlier decoder layer (each matched on its own)
    is added. ``key`` draws dropout when ``train``. Returns ``(loss [], {"class", "bbox",
    "giou", "align": []})``: the last layer's terms, detached.
    """
    checks.check_keys(batch, ("images", "tokens", "boxes", "token_map"))
    images, tokens, image_mask = batch["images"], batch["tokens"], batch.get("image_mask")
    names = ("batch['images']", "batch['tokens']", "batch['image_mask']")
    checks.check_params(params, init=init, cfg=cfg)
    _check_inputs(params, images, tokens, image_mask, cfg, names)
    target_boxes, token_map = batch["boxes"], batch["token_map"]
    checks.check_float(
        "batch['boxes']", target_boxes, (images.shape[0], range(1, cfg.max_boxes + 1), 4)
    )
    checks.check_mask("batch['token_map']", token_map, (*target_boxes.shape[:2], tokens.shape[1]))
    valid = batch.get("box_valid")
    if valid is None:
        valid = torch.ones(target_boxes.shape[:2], dtype=torch.bool, device=images.device)
    checks.check_mask("batch['box_valid']", valid, target_boxes.shape[:2])
    _check_key(cfg, key, train)

    outs = _forward(params, images, tokens, image_mask, cfg, key, train, block_fn)
    targets = boxes.token_targets(token_map, cfg.classes + 1)
    num_boxes = valid.sum().clamp(min=1)
    total, terms = _matched_loss(outs[-1], targets, target_boxes, token_map, valid, num_boxes, cfg)
    metrics = {name: value.detach() for name, value in terms.items()}
    if cfg.aux_loss:
        for out in outs[:-1]:
            total = (
                total
                + _matched_loss(out, targets, target_boxes, token_map, valid, num_boxes, cfg)[0]
            )
    return total, metrics


def _matched_loss(out, targets, target_boxes, token_map, valid, num_boxes, cfg: MDETRConfig):
    """One decoder layer's weighted loss and its terms, under its own matching."""
    query_of = matching.match(match_cost(out, targets, target_boxes, cfg=cfg), valid.bool())
    ce = boxes.soft_token_loss(
        out["logits"].float(), targets, query_of, num_boxes, no_object_weight=cfg.no_object_weight
    )
    l1, giou = boxes.box_losses(out["boxes"].float(), target_boxes.float(), query_of, num_boxes)
    terms = {"class": ce, "bbox": l1, "giou": giou}
    total = cfg.loss_class * ce + cfg.loss_bbox * l1 + cfg.loss_giou * giou
    if cfg.contrastive_dim is not None:
        align = boxes.contrastive_alignment_loss(
            out["query_embed"].float(), out["token_embed"].float(), token_map, query_of, num_boxes,
            temperature=cfg.temperature,
        )  # fmt: skip
        terms["align"] = align
        total = total + cfg.loss_align * align
    return total, terms
