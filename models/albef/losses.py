"""ALBEF's losses as pure functions: contrastive with momentum distillation (ITC), image-text
matching on hard negatives (ITM), masked language modelling (MLM), and the VQA loss.

The generic pieces come from ``fmm.losses`` (masked cross-entropy, token masking, the
matching loss); what is ALBEF's own lives here: the queue-aware contrastive targets, the
distillation, and hard negatives mined from the similarity matrix.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fmm import checks, random
from fmm.losses import mask_tokens, masked_cross_entropy, matching_accuracy, matching_loss
from models.albef import model as M
from models.albef.config import ALBEFConfig
from models.bert.model import _check_inputs as _check_text_inputs

Params = dict[str, Any]
# Integer key streams: folding in a string hashes it on the host, which a compiled step
# cannot trace.
_STREAMS = {
    name: i
    for i, name in enumerate(("text", "fuse_pos", "neg", "fuse_neg", "mlm", "text_mlm", "fuse_mlm"))
}


def itc_similarities(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    temp: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image_feat @ text_all.T / temp, text_feat @ image_all.T / temp)``: ``[B, N]`` each,
    for unit features ``[B, E]`` against the momentum batch + queue ``[N, E]``."""
    if image_feat.shape != text_feat.shape or image_all.shape != text_all.shape:
        raise ValueError(
            f"itc_similarities: image_feat {list(image_feat.shape)} / text_feat "
            f"{list(text_feat.shape)} and image_all {list(image_all.shape)} / text_all "
            f"{list(text_all.shape)} must pair up"
        )
    if image_feat.shape[-1] != image_all.shape[-1]:
        raise ValueError(
            f"itc_similarities: features are {image_feat.shape[-1]}-d but the candidates are "
            f"{image_all.shape[-1]}-d"
        )
    return image_feat @ text_all.T / temp, text_feat @ image_all.T / temp


def positive_targets(idx: torch.Tensor, idx_all: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` rows summing to 1: uniform over the candidates whose id equals the row's
    (``idx [B]`` against ``idx_all [N]``; a row always finds itself in ``idx_all[:B]``)."""
    pos = (idx[:, None] == idx_all[None, :]).to(torch.float32)
    return pos / pos.sum(1, keepdim=True)


def itc_loss(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    targets: torch.Tensor,
    *,
    sim_i2t_m: torch.Tensor | None = None,
    sim_t2i_m: torch.Tensor | None = None,
    alpha: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies against soft targets
    ``(1 - alpha) * targets + alpha * softmax(sim_m)`` (momentum distillation; ``alpha`` a
    float or a 0-d tensor, e.g. ramped up over the first steps). All ``[B, N]``;
    returns a 0-d loss, symmetric under swapping the two directions.

    Example: ``itc_loss(s_i2t, s_t2i, torch.eye(B))`` is CLIP's loss at ``alpha=0``.
    """
    if sim_i2t.shape != sim_t2i.shape or targets.shape != sim_i2t.shape:
        raise ValueError(
            f"itc_loss: sim_i2t {list(sim_i2t.shape)}, sim_t2i {list(sim_t2i.shape)} and "
            f"targets {list(targets.shape)} must have one shape"
        )
    t_i2t = t_t2i = targets
    # A tensor alpha (ramped by the caller) always mixes, so no branch reads its value.
    if isinstance(alpha, torch.Tensor) or alpha != 0.0:
        if sim_i2t_m is None or sim_t2i_m is None:
            raise ValueError("sim_i2t_m= and sim_t2i_m= are missing: alpha > 0 needs both")
        t_i2t = alpha * sim_i2t_m.detach().softmax(1) + (1 - alpha) * targets
        t_t2i = alpha * sim_t2i_m.detach().softmax(1) + (1 - alpha) * targets
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * t_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * t_t2i).sum(1).mean()
    return 0.5 * (loss_i2t + loss_t2i)


def sample_categorical(key: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """One index per row of ``logits [B, N]`` drawn with probability ``softmax(logits)``
    (``-inf`` = never), by the Gumbel-max trick: on device, no host sync, reproducible from
    ``key`` (``torch.multinomial`` would draw from the global generator). Returns ``[B]``."""
    u = random.uniform(key, logits.shape, dtype=torch.float32).clamp(1e-12, 1.0 - 1e-7)
    return (logits.float() - torch.log(-torch.log(u))).argmax(dim=1)


def hard_negatives(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, idx: torch.Tensor, key: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF's hard-negative mining within the batch: for each image a text drawn with
    probability ``softmax(sim_i2t)`` and for each text an image by ``softmax(sim_t2i)``, never
    one with the same id. ``sim_*: [B, B]`` (batch columns only), ``idx: [B]``.

    Returns ``(negative text index per image, negative image index per text)``, ``[B]`` each.
    A row with no other id in the batch falls back to a uniform pick among the other rows.
    """
    b = idx.shape[0]
    if b < 2 or sim_i2t.shape != (b, b) or sim_t2i.shape != (b, b):
        raise ValueError(
            f"hard_negatives: need a batch >= 2 and sims [{b}, {b}], got sim_i2t "
            f"{list(sim_i2t.shape)} and sim_t2i {list(sim_t2i.shape)}"
        )
    same = idx[:, None] == idx[None, :]
    eye = torch.eye(b, dtype=torch.bool, device=idx.device)
    fallback = torch.zeros(b, b, device=idx.device).masked_fill(eye, float("-inf"))
    picks = []
    for stream, sim in enumerate((sim_i2t, sim_t2i)):
        logits = sim.detach().float().masked_fill(same, float("-inf"))
        logits = torch.where(same.all(1, keepdim=True), fallback, logits)
        picks.append(sample_categorical(random.fold_in(key, stream), logits))
    return picks[0], picks[1]


def itm_loss(
    pos_logits: torch.Tensor, neg_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matching loss of matched pairs ``pos_logits [B, 2]`` (label 1) and mismatched pairs
    ``neg_logits [N, 2]`` (label 0), averaged over all pairs. Returns ``(loss, accuracy)``."""
    if pos_logits.ndim != 2 or pos_logits.shape[1] != 2 or neg_logits.shape[1:] != (2,):
        raise ValueError(
            f"itm_loss: logits must be [pairs, 2], got pos {list(pos_logits.shape)} and "
            f"neg {list(neg_logits.shape)}"
        )
    logits = torch.cat([pos_logits, neg_logits])
    labels = torch.cat(
        [
            torch.ones(pos_logits.shape[0], dtype=torch.int64, device=logits.device),
            torch.zeros(neg_logits.shape[0], dtype=torch.int64, device=logits.device),
        ]
    )
    return matching_loss(logits, labels), matching_accuracy(logits, labels).detach()


def _check_pairs_in(params: Params, batch: dict[str, Any], cfg: ALBEFConfig) -> None:
    M._check_images(params, batch["images"], cfg, "batch['images']")
    _check_text_inputs(
        batch["input_ids"], batch["attention_mask"], None, cfg.text, in_batch=True,
        batch_of=("batch['images']", batch["images"]),
    )  # fmt: skip


def _check_pretrain_batch(params: Params, batch: dict[str, Any], cfg: ALBEFConfig, mask_id):
    fields = ("images", "input_ids", "attention_mask", "idx", "image_feat_m", "text_feat_m")
    checks.check_keys(batch, (*fields, "queue"))
    checks.check_params(params, init=M.init, cfg=cfg)
    _check_pairs_in(params, batch, cfg)
    if isinstance(mask_id, bool) or not isinstance(mask_id, int):
        raise TypeError(f"mask_id must be an int token id, got {type(mask_id).__name__}")
    if not 0 <= mask_id < cfg.text.vocab_size:
        raise ValueError(f"mask_id must lie in [0, {cfg.text.vocab_size}), got {mask_id}")
    b, e = batch["images"].shape[0], cfg.embed_dim
    checks.check_int("batch['idx']", batch["idx"], (b,))
    for name in ("image_feat_m", "text_feat_m"):
        checks.check_float(f"batch[{name!r}]", batch[name], (b, e))
    queue = batch["queue"]
    checks.check_keys(queue, ("image", "text", "idx", "ptr"), name="batch['queue']")
    for name in ("image", "text"):
        checks.check_float(f"batch['queue'][{name!r}]", queue[name], (cfg.queue_size, e))
    checks.check_int("batch['queue']['idx']", queue["idx"], (cfg.queue_size,))


def pretrain_loss(
    params: Params,
    batch: dict[str, Any],
    key: torch.Tensor,
    *,
    cfg: ALBEFConfig,
    mask_id: int,
    train: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ALBEF's pretraining objective ITC + ITM + MLM on a batch of matched pairs.

    ``batch``: ``images [B, C, H, W]``, ``input_ids [B, S]`` (token 0 is [CLS]),
    ``attention_mask [B, S]``, ``idx [B]`` (example ids >= 0; equal ids count as positives),
    the momentum features ``image_feat_m, text_feat_m [B, E]`` (:func:`momentum_features`)
    and ``queue`` (:func:`models.albef.state.init_queue`); optionally ``alpha`` (0-d tensor,
    default ``cfg.alpha``), the distillation weight. ``key`` draws the ITM negatives,
    the MLM corruption and dropout. Returns ``(loss [], metrics)`` for
    ``train.step.make_train_step``.
    """
    _check_pretrain_batch(params, batch, cfg, mask_id)
    ids, mask, idx = batch["input_ids"], batch["attention_mask"], batch["idx"]
    queue, temp = batch["queue"], M.temperature(params)
    kd = lambda name: random.fold_in(key, name) if train else None
    image = M._encode_image(params, batch["images"], cfg)
    text = M._encode_text(params, ids, cfg, mask, kd(_STREAMS["text"]), train)

    # ITC against the momentum batch + queue, targets softened by the momentum model.
    image_all = torch.cat([batch["image_feat_m"], queue["image"]])
    text_all = torch.cat([batch["text_feat_m"], queue["text"]])
    targets = positive_targets(idx, torch.cat([idx, queue["idx"]]))
    sim_i2t, sim_t2i = itc_similarities(
        M._projected(params, "vision_proj", image),
        M._projected(params, "text_proj", text),
        image_all,
        text_all,
        temp,
    )
    with torch.no_grad():
        sim_i2t_m, sim_t2i_m = itc_similarities(
            batch["image_feat_m"], batch["text_feat_m"], image_all, text_all, temp
        )
    alpha = batch.get("alpha", cfg.alpha)
    itc = itc_loss(sim_i2t, sim_t2i, targets, sim_i2t_m=sim_i2t_m, sim_t2i_m=sim_t2i_m, alpha=alpha)

    # ITM: matched pairs against the hardest-looking mismatches of the same batch.
    b = ids.shape[0]
    fuse = lambda t, i, m, name: M._fuse(params, t, i, cfg, m, kd(name), train)
    fused = fuse(text, image, mask, _STREAMS["fuse_pos"])
    neg_text, neg_image = hard_negatives(
        sim_i2t[:, :b], sim_t2i[:, :b], idx, random.fold_in(key, _STREAMS["neg"])
    )
    fused_neg = fuse(
        torch.cat([text, text[neg_text]]),
        torch.cat([image[neg_image], image]),
        torch.cat([mask, mask[neg_text]]),
        _STREAMS["fuse_neg"],
    )
    itm, itm_acc = itm_loss(M._itm_logits(params, fused), M._itm_logits(params, fused_neg))

    # MLM: predict corrupted tokens from the rest of the text and the image.
    position = torch.arange(ids.shape[1], device=ids.device)
    maskable = mask.bool() & (position > 0) & (ids != cfg.text.pad_id)
    corrupt, labels = mask_tokens(
        random.fold_in(key, _STREAMS["mlm"]), ids, rate=0.15, mask_id=mask_id, allowed=maskable
    )
    text_mlm = M._encode_text(params, corrupt, cfg, mask, kd(_STREAMS["text_mlm"]), train)
    fused_mlm = fuse(text_mlm, image, mask, _STREAMS["fuse_mlm"])
    mlm = masked_cross_entropy(M._mlm_logits(params, fused_mlm, cfg), labels)

    metrics = {"itc": itc.detach(), "itm": itm.detach(), "mlm": mlm.detach()}
    return itc + itm + mlm, {**metrics, "itm_accuracy": itm_acc, "temp": temp.detach()}


def vqa_loss(
    params: Params,
    batch: dict[str, Any],
    key: torch.Tensor | None = None,
    *,
    cfg: ALBEFConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of answer classes. ``batch``: ``images [B, C, H, W]``, ``input_ids
    [B, S]`` (questions), ``attention_mask [B, S]``, ``answers [B]`` int64 in
    ``[0, cfg.num_answers)``. Returns ``(loss [], {"accuracy": []})``."""
    checks.check_keys(batch, ("images", "input_ids", "attention_mask", "answers"))
    M._check_vqa(params, cfg)
    _check_pairs_in(params, batch, cfg)
    answers = batch["answers"]
    checks.check_ids("batch['answers']", answers, (batch["images"].shape[0],), high=cfg.num_answers)
    logits = M._vqa(params, batch["images"], batch["input_ids"], cfg, batch["attention_mask"])
    accuracy = (logits.argmax(1) == answers).float().mean().detach()
    return F.cross_entropy(logits, answers), {"accuracy": accuracy}
