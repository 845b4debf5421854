"""ALBEF's training objective as the family contract's one ``loss``: pretraining (ITC with
momentum distillation + ITM on hard negatives + MLM) on image-caption batches, or VQA when
the batch has ``answers``; and the batch fields of each task.

Pretraining reads the train state (:func:`models.albef.state.init_state`): the momentum
encoders give the distillation targets and the features that enter the queues. The loss
returns those features in ``metrics["aux"]``; after the optimizer step the loop calls
:func:`models.albef.state.update_state`, which moves the momentum encoders toward the new
params and enqueues them. With the momentum encoders starting as a copy of the params,
this is the same sequence as moving the momentum first and then taking the step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fmm import checks, random
from fmm.losses import mask_tokens, masked_cross_entropy
from fmm.nn.transformer import BlockFn
from models import bert
from models.albef import model as M
from models.albef.config import ALBEFConfig
from models.albef.losses import (
    hard_negatives,
    itc_loss,
    itc_similarities,
    itm_loss,
    positive_targets,
)
from models.albef.state import check_state
from models.family import Field

Params = dict[str, Any]
TASKS = ("pretrain", "vqa")
# Integer key streams (as the loss has always drawn them, so runs stay reproducible).
_STREAMS = {
    name: i
    for i, name in enumerate(("text", "fuse_pos", "neg", "fuse_neg", "mlm", "text_mlm", "fuse_mlm"))
}


def batch_fields(cfg: ALBEFConfig, *, task: str = "pretrain") -> dict[str, Field]:
    """The batch :func:`loss` reads for ``task``: ``images [batch, C, H, W]``, ``tokens
    [batch, seq]`` (token 0 is [CLS]; ``seq <= max_positions``), optionally
    ``attention_mask [batch, seq]`` (default: every id but ``pad_id`` is real), and
    ``idx [batch]`` (``"pretrain"``: example ids, equal ids are positives) or ``answers
    [batch]`` (``"vqa"``: answer classes in ``[0, num_answers)``)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    c, s, t = cfg.in_channels, cfg.image_size, cfg.text
    fields = {
        "images": Field("float", ("batch", c, s, s), doc="pixels, normalised as in training"),
        "tokens": Field(
            "int", ("batch", "seq"), high=t.vocab_size, limits={"seq": t.max_positions},
            doc="caption or question ids, [CLS] first",
        ),
        "attention_mask": Field(
            "bool", ("batch", "seq"), optional=True, doc="True = a real token"
        ),
    }  # fmt: skip
    if task == "vqa":
        if not cfg.num_answers:
            raise ValueError("task='vqa' needs a config with num_answers > 0 (with_answers)")
        fields["answers"] = Field("int", ("batch",), high=cfg.num_answers, doc="answer class")
    else:
        fields["idx"] = Field("int", ("batch",), doc="example ids: equal ids are positives")
    return fields


def _check_batch(params: Params, batch, cfg: ALBEFConfig, last: str) -> torch.Tensor:
    checks.check_keys(batch, ("images", "tokens", last))
    images, tokens = batch["images"], batch["tokens"]
    M._check_images(params, images, cfg, "batch['images']")
    names = ("batch['tokens']", "batch['attention_mask']", "")
    bert.check_inputs(
        tokens, cfg=cfg.text, attention_mask=batch.get("attention_mask"), names=names,
        batch_of=("batch['images']", images),
    )  # fmt: skip
    if "attention_mask" in batch:
        return batch["attention_mask"].bool()
    return tokens != cfg.text.pad_id


def _distillation_weight(cfg: ALBEFConfig, step: torch.Tensor) -> float | torch.Tensor:
    if cfg.alpha_ramp_steps == 0:
        return cfg.alpha
    return cfg.alpha * (step.to(torch.float32) / cfg.alpha_ramp_steps).clamp(max=1.0)


def _pretrain(params: Params, batch, key, cfg: ALBEFConfig, train, block_fn, state):
    valid = _check_batch(params, batch, cfg, "idx")
    b = batch["images"].shape[0]
    checks.check_int("batch['idx']", batch["idx"], (b,))
    check_state(state, cfg)
    if key is None:
        raise ValueError(
            "key= is missing: ALBEF's pretraining draws its hard negatives and MLM masks from key="
        )
    if not 0 <= cfg.text.mask_id < cfg.text.vocab_size:
        raise ValueError(
            f"cfg.text.mask_id={cfg.text.mask_id} lies outside the vocabulary "
            f"[0, {cfg.text.vocab_size}): set the text config's mask_id"
        )
    images, ids, idx = batch["images"], batch["tokens"], batch["idx"]
    momentum, queue, temp = state["momentum"], state["queue"], M.temperature(params)
    kd = lambda name: random.fold_in(key, name) if train else None
    image = M._encode_image(params, images, cfg, block_fn)
    text = M._encode_text(params, ids, cfg, valid, kd(_STREAMS["text"]), train, block_fn)
    with torch.no_grad():  # the momentum encoders: targets, never trained by gradients
        image_m = M._encode_image(momentum, images, cfg, block_fn)
        text_m = M._encode_text(momentum, ids, cfg, valid, None, False, block_fn)
        feat_i = M._projected(momentum, "vision_proj", image_m)
        feat_t = M._projected(momentum, "text_proj", text_m)

    # ITC against the momentum batch + queue, targets softened by the momentum model.
    image_all, text_all = torch.cat([feat_i, queue["image"]]), torch.cat([feat_t, queue["text"]])
    targets = positive_targets(idx, torch.cat([idx, queue["idx"]]))
    sim_i2t, sim_t2i = itc_similarities(
        M._projected(params, "vision_proj", image), M._projected(params, "text_proj", text),
        image_all, text_all, temp,
    )  # fmt: skip
    with torch.no_grad():
        sim_i2t_m, sim_t2i_m = itc_similarities(feat_i, feat_t, image_all, text_all, temp)
    alpha = _distillation_weight(cfg, state["step"])
    itc = itc_loss(sim_i2t, sim_t2i, targets, sim_i2t_m=sim_i2t_m, sim_t2i_m=sim_t2i_m, alpha=alpha)

    # ITM: matched pairs against the hardest-looking mismatches of the same batch.
    fuse = lambda t, i, m, name: M._fuse(params, t, i, cfg, m, kd(name), train, block_fn)
    fused = fuse(text, image, valid, _STREAMS["fuse_pos"])
    neg_text, neg_image = hard_negatives(
        sim_i2t[:, :b], sim_t2i[:, :b], idx, random.fold_in(key, _STREAMS["neg"])
    )
    fused_neg = fuse(
        torch.cat([text, text[neg_text]]),
        torch.cat([image[neg_image], image]),
        torch.cat([valid, valid[neg_text]]),
        _STREAMS["fuse_neg"],
    )
    itm, itm_acc = itm_loss(M._itm_logits(params, fused), M._itm_logits(params, fused_neg))

    # MLM: predict corrupted tokens from the rest of the text and the image.
    position = torch.arange(ids.shape[1], device=ids.device)
    maskable = valid & (position > 0) & (ids != cfg.text.pad_id)
    corrupt, labels = mask_tokens(
        random.fold_in(key, _STREAMS["mlm"]), ids, rate=0.15, mask_id=cfg.text.mask_id,
        allowed=maskable,
    )  # fmt: skip
    text_mlm = M._encode_text(
        params, corrupt, cfg, valid, kd(_STREAMS["text_mlm"]), train, block_fn
    )
    fused_mlm = fuse(text_mlm, image, valid, _STREAMS["fuse_mlm"])
    mlm = masked_cross_entropy(M._mlm_logits(params, fused_mlm, cfg), labels)

    metrics = {"itc": itc.detach(), "itm": itm.detach(), "mlm": mlm.detach()}
    aux = {"image_feat_m": feat_i, "text_feat_m": feat_t, "idx": idx}
    return itc + itm + mlm, {**metrics, "itm_accuracy": itm_acc, "temp": temp.detach(), "aux": aux}


def _vqa(params: Params, batch, key, cfg: ALBEFConfig, train, block_fn):
    M._check_vqa(params, cfg)
    valid = _check_batch(params, batch, cfg, "answers")
    answers = batch["answers"]
    checks.check_ids("batch['answers']", answers, (batch["images"].shape[0],), high=cfg.num_answers)
    kd = lambda name: random.fold_in(key, name) if train and key is not None else None
    image = M._encode_image(params, batch["images"], cfg, block_fn)
    text = M._encode_text(
        params, batch["tokens"], cfg, valid, kd(_STREAMS["text"]), train, block_fn
    )
    fused = M._fuse(params, text, image, cfg, valid, kd(_STREAMS["fuse_pos"]), train, block_fn)
    logits = M._vqa_logits(params, fused)
    value = F.cross_entropy(logits, answers)
    accuracy = (logits.argmax(1) == answers).float().mean().detach()
    return value, {"vqa": value.detach(), "vqa_accuracy": accuracy, "aux": {}}


def loss(
    params: Params,
    batch: dict[str, torch.Tensor],
    *,
    cfg: ALBEFConfig,
    key: torch.Tensor | None = None,
    train: bool = True,
    block_fn: BlockFn | None = None,
    state: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """ALBEF's objective on ``batch`` (:func:`batch_fields`): VQA (answer cross-entropy)
    when it has ``answers``, else pretraining ITC + ITM + MLM on matched pairs.

    Pretraining needs ``state`` (:func:`models.albef.state.init_state`: momentum encoders,
    queues, step) and ``key`` (hard negatives, MLM corruption, dropout). ``block_fn`` runs
    every block, the momentum encoders' included. Returns ``(loss [], metrics)``: detached
    ``itc, itm, mlm, itm_accuracy, temp`` (pretraining) or ``vqa, vqa_accuracy``, and
    ``aux``, what :func:`models.albef.state.update_state` needs (the momentum features and
    ids; empty for VQA).

    Example::

        state = init_state(cfg, params, fmm.random.key(1))
        value, metrics = loss(params, batch, cfg=cfg, key=fmm.random.key(2), state=state)
        params = ...  # the optimizer step
        params, state = update_state(state, params, metrics.pop("aux"), cfg=cfg, key=None)
    """
    checks.check_params(params, init=M.init, cfg=cfg)
    checks.check_type("batch", batch, dict)
    if "answers" in batch:
        return _vqa(params, batch, key, cfg, train, block_fn)
    return _pretrain(params, batch, key, cfg, train, block_fn, state)
