"""data2vec's objective: the batch it reads and the loss, student against EMA teacher.

Example::

    cfg = data2vec_image_tiny()
    params = init(cfg, fmm.random.key(0))
    state = init_state(cfg, params, fmm.random.key(1))
    value, metrics = loss(params, {"images": torch.rand(2, 3, 32, 32)}, cfg=cfg,
                          key=fmm.random.key(2), state=state)
"""

from __future__ import annotations

import torch

from fmm import checks, random
from fmm.losses.masked import IGNORE, mask_tokens
from fmm.nn import linear
from fmm.nn.transformer import BlockFn
from models.data2vec.config import Data2VecConfig
from models.data2vec.masking import patch_mask
from models.data2vec.model import Params, _check_input, _targets, _tower, init, regression_loss
from models.data2vec.state import check_state
from models.family import Field

INPUTS = {"image": "images", "audio": "spectrograms", "text": "tokens"}


def batch_fields(cfg: Data2VecConfig) -> dict[str, Field]:
    """The batch :func:`loss` reads: ``images [batch, C, H, W]``, ``spectrograms [batch, 1,
    frames, mels]``, or ``tokens [batch, seq]`` with an optional ``valid [batch, seq]``
    (True = a real token; padding is never masked nor scored)."""
    if cfg.modality == "text":
        seq = {"seq": cfg.context_length}
        return {
            "tokens": Field("int", ("batch", "seq"), high=cfg.vocab_size, limits=seq, doc="ids"),
            "valid": Field("bool", ("batch", "seq"), optional=True, limits=seq, doc="not padding"),
        }
    doc = {"image": "pixels", "audio": "log-mel spectrograms, frames by mels"}[cfg.modality]
    return {INPUTS[cfg.modality]: Field("float", ("batch", *cfg.input_shape), doc=doc)}


def loss(
    params: Params,
    batch: dict[str, torch.Tensor],
    *,
    cfg: Data2VecConfig,
    key: torch.Tensor | None = None,
    train: bool = True,
    block_fn: BlockFn | None = None,
    state: Params | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """data2vec's objective on ``batch`` (:func:`batch_fields`): the student on the masked
    input predicts, through ``head``, the teacher's :func:`targets` at the masked positions.

    ``key`` (required) draws the mask, which is the objective itself, so evaluation
    (``train=False``) masks too; ``train`` turns on the student's dropout. ``state``: the
    train state (:func:`models.data2vec.init_state`) holding the teacher, which gets no
    gradient. Returns ``(loss [], {"regression", "target_var", "pred_var", "aux": {}})``:
    the variances across masked positions watch for collapse; the EMA update needs no aux.

    Example: ``value, metrics = loss(params, {"images": x}, cfg=cfg, key=k, state=state)``.
    """
    name = INPUTS[cfg.modality]
    checks.check_keys(batch, (name,))
    x, valid = batch[name], batch.get("valid")
    checks.check_params(params, init=init, cfg=cfg)
    _check_input(params, x, cfg, f"batch[{name!r}]", valid)
    check_state(state, cfg)
    if key is None:
        raise ValueError("key= is missing: the data2vec loss draws its mask from key=")
    km = random.fold_in(key, "mask")
    if cfg.modality == "text":
        allowed = None if valid is None else valid.bool()
        student_in, labels = mask_tokens(
            km, x, rate=cfg.mask_ratio, mask_id=cfg.mask_id, allowed=allowed
        )
        mask, patches = labels != IGNORE, None
    else:
        mask = patch_mask(km, x.shape[0], cfg.grid, cfg.mask_ratio, block=cfg.mask_block)
        student_in, patches = x, mask
    ks = random.fold_in(key, "student") if train else None
    out = _tower(params, student_in, cfg, patches, valid, ks, train, block_fn).sequence
    pred = linear(params["head"], out if cfg.modality == "text" else out[:, 1:])
    with torch.no_grad():
        target = _targets(state["teacher"], x, cfg, valid, block_fn)
    value = regression_loss(pred, target, mask, beta=cfg.loss_beta)
    picked = mask[..., None].float()
    count = picked.sum().clamp_min(2.0)

    def spread(y):  # variance over masked positions, averaged over channels
        y = y.detach().float()
        mean = (y * picked).sum((0, 1)) / count
        return (((y - mean) ** 2 * picked).sum((0, 1)) / (count - 1)).mean()

    metrics = {"regression": value.detach(), "target_var": spread(target), "pred_var": spread(pred)}
    return value, {**metrics, "aux": {}}
