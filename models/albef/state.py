"""ALBEF's train-time state as explicit pytrees, updated by pure functions.

The family's train state (:func:`init_state`, :func:`update_state`) is
``{"momentum": ..., "queue": ..., "step": [] int64}``. ``momentum``: an exponential moving
average of the encoders and projections (:data:`models.albef.model.MOMENTUM_PARTS`); it
provides soft contrastive targets and the features that enter the queues. ``queue``: the
last ``cfg.queue_size`` momentum features of each modality, with the ids of the examples
they came from (so an example seen again is not counted as its own negative)::

    {"image": [Q, embed], "text": [Q, embed], "idx": [Q] int64 (-1 = empty), "ptr": [] int64}

``step`` counts updates (the distillation weight ramps over ``cfg.alpha_ramp_steps``).

Every update returns new tensors and leaves its inputs untouched, so a train step that
carries this state is a pure function and compiles without graph breaks or host syncs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fmm import checks, random, tree
from models.albef import model as M
from models.albef.config import ALBEFConfig
from models.albef.model import MOMENTUM_PARTS

Tree = Any
EMPTY_ID = -1


def init_momentum(params: Tree) -> Tree:
    """The momentum encoders at step 0: copies of ``params``' encoders and projections."""
    missing = [p for p in MOMENTUM_PARTS if p not in params]
    if missing:
        raise ValueError(f"params lack {missing} (init_momentum copies them); got {sorted(params)}")
    return tree.map(lambda x: x.detach().clone(), {p: params[p] for p in MOMENTUM_PARTS})


def momentum_update(momentum: Tree, params: Tree, *, m: float) -> Tree:
    """``m * momentum + (1 - m) * params`` leafwise, as new tensors (inputs untouched).

    Example: ``momentum = momentum_update(momentum, state["params"], m=cfg.momentum)``.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"m must lie in [0, 1], got {m}")
    current = {p: params[p] for p in momentum}
    return tree.map(lambda a, b: a.detach() * m + b.detach() * (1.0 - m), momentum, current)


def init_queue(cfg: ALBEFConfig, key: torch.Tensor, *, dtype=torch.float32) -> Tree:
    """Queues of random unit features (as ALBEF starts them) with empty ids; ``ptr`` 0."""
    checks.check_type("cfg", cfg, ALBEFConfig)
    q, e, dev = cfg.queue_size, cfg.embed_dim, key.device
    return {
        "image": F.normalize(
            random.normal(random.fold_in(key, "image"), (q, e), dtype=dtype), dim=-1
        ),
        "text": F.normalize(
            random.normal(random.fold_in(key, "text"), (q, e), dtype=dtype), dim=-1
        ),
        "idx": torch.full((q,), EMPTY_ID, dtype=torch.int64, device=dev),
        "ptr": torch.zeros((), dtype=torch.int64, device=dev),
    }


def enqueue(
    queue: Tree, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor
) -> Tree:
    """Write a batch of momentum features ``[B, embed]`` and ids ``[B]`` at ``ptr``
    (wrapping around) and advance ``ptr`` by ``B``: a new queue, the old one untouched.

    The slots are ``(ptr + arange(B)) % Q`` computed on device, so no host sync and no
    requirement that ``Q`` be a multiple of ``B``.
    """
    q = queue["image"].shape[0]
    if image_feat.shape != text_feat.shape or image_feat.shape[1:] != queue["image"].shape[1:]:
        raise ValueError(
            f"enqueue: image_feat {list(image_feat.shape)} and text_feat "
            f"{list(text_feat.shape)} must both be [batch, {queue['image'].shape[1]}]"
        )
    if idx.shape != image_feat.shape[:1]:
        raise ValueError(f"idx must have shape [{image_feat.shape[0]}], got {list(idx.shape)}")
    if image_feat.shape[0] > q:
        raise ValueError(
            f"image_feat has a batch of {image_feat.shape[0]}, more than the queue size {q}"
        )
    slots = (queue["ptr"] + torch.arange(image_feat.shape[0], device=idx.device)) % q
    return {
        "image": queue["image"].index_copy(0, slots, image_feat.detach().to(queue["image"].dtype)),
        "text": queue["text"].index_copy(0, slots, text_feat.detach().to(queue["text"].dtype)),
        "idx": queue["idx"].index_copy(0, slots, idx.to(torch.int64)),
        "ptr": (queue["ptr"] + image_feat.shape[0]) % q,
    }


@torch.no_grad()
def momentum_features(
    momentum: Tree,
    images: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    cfg: ALBEFConfig,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm image and text embeddings ``([B, embed], [B, embed])`` of the momentum
    encoders: the distillation targets and the features that enter the queues."""
    parts = ("image", "text", "vision_proj", "text_proj")
    checks.check_params(momentum, init=M.init, cfg=cfg, only=parts, name="momentum")
    M._check_pairs(momentum, images, input_ids, attention_mask, cfg)
    image = M._encode_image(momentum, images, cfg)
    text = M._encode_text(momentum, input_ids, cfg, attention_mask, None, False)
    return M._projected(momentum, "vision_proj", image), M._projected(momentum, "text_proj", text)


def init_state(cfg: ALBEFConfig, params: Tree, key: torch.Tensor) -> Tree:
    """The train state at step 0: momentum encoders copied from ``params``, queues of random
    unit features drawn from ``key`` (on ``params``' device), ``step`` 0.

    Example: ``state = init_state(cfg, params, fmm.random.key(1))``.
    """
    device = params["log_temp"].device if "log_temp" in params else key.device
    return {
        "momentum": init_momentum(params),
        "queue": init_queue(cfg, key.to(device)),
        "step": torch.zeros((), dtype=torch.int64, device=device),
    }


def update_state(
    state: Tree, params: Tree, aux: dict[str, torch.Tensor], *, cfg: ALBEFConfig, key=None
) -> tuple[Tree, Tree]:
    """After an optimizer step: move the momentum encoders toward the *new* ``params``, then
    enqueue the momentum features the loss computed (``aux``, its ``metrics["aux"]``).
    Returns ``(params, new_state)`` (``params`` unchanged; nothing is modified in place).
    An empty ``aux`` (a VQA step) only counts the step. ``key``: unused (the contract's).
    """
    del key  # nothing random in the update
    check_state(state, cfg)
    step = state["step"] + 1
    if not aux:
        return params, {**state, "step": step}
    checks.check_keys(aux, ("image_feat_m", "text_feat_m", "idx"), name="aux")
    momentum = momentum_update(state["momentum"], params, m=cfg.momentum)
    queue = enqueue(state["queue"], aux["image_feat_m"], aux["text_feat_m"], aux["idx"])
    return params, {"momentum": momentum, "queue": queue, "step": step}


def check_state(state: Any, cfg: ALBEFConfig) -> None:
    """``state`` is :func:`init_state`'s tree for ``cfg`` (keys, momentum shapes, queues)."""
    if state is None:
        raise ValueError(
            "state= is missing: ALBEF's pretraining reads its momentum encoders and queues "
            "(models.albef.init_state)"
        )
    checks.check_keys(state, ("momentum", "queue", "step"), name="state")
    checks.check_params(
        state["momentum"], init=M.init, cfg=cfg, only=MOMENTUM_PARTS, name="state['momentum']"
    )
    queue, e = state["queue"], cfg.embed_dim
    checks.check_keys(queue, ("image", "text", "idx", "ptr"), name="state['queue']")
    for name in ("image", "text"):
        checks.check_float(f"state['queue'][{name!r}]", queue[name], (cfg.queue_size, e))
    checks.check_int("state['queue']['idx']", queue["idx"], (cfg.queue_size,))
    checks.check_int("state['step']", state["step"], ())
