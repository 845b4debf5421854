"""data2vec's teacher as explicit train state, updated by a pure function.

The family's train state (:func:`init_state`, :func:`update_state`) is
``{"teacher": ..., "step": [] int64}``: ``teacher`` is the student's param tree less its
regression head, an exponential moving average of the student's, and ``step`` counts the
updates, which set the decay (:func:`ema_decay`). The loop carries it as it carries
ALBEF's momentum encoders: ``loss(..., state=)`` reads the teacher without gradient and
``update_state`` runs after each optimizer step with the new params.
"""

from __future__ import annotations

from typing import Any

import torch

from fmm import checks, tree
from fmm.optim import ema_update
from models.data2vec import model as M
from models.data2vec.config import Data2VecConfig

Tree = Any


def ema_decay(cfg: Data2VecConfig, step: torch.Tensor) -> torch.Tensor:
    """The teacher's decay after ``step`` updates: ``tau_start`` rising linearly to
    ``tau_end`` over ``cfg.tau_steps`` updates, then ``tau_end``. A float32 0-d tensor on
    ``step``'s device (no host sync).

    Example: ``ema_decay(cfg, torch.tensor(0)) == cfg.tau_start``.
    """
    done = (step.float() / max(cfg.tau_steps, 1)).clamp(0.0, 1.0)
    if cfg.tau_steps == 0:
        done = torch.ones_like(done)
    return cfg.tau_start + (cfg.tau_end - cfg.tau_start) * done


def init_state(cfg: Data2VecConfig, params: Tree, key: torch.Tensor | None = None) -> Tree:
    """The train state at step 0: the teacher a copy of ``params`` less the head, ``step``
    0 on the params' device. ``key``: unused (the contract's; nothing is drawn).

    Example: ``state = init_state(cfg, params, fmm.random.key(1))``.
    """
    del key
    checks.check_params(params, init=M.init, cfg=cfg)
    teacher = {k: v for k, v in params.items() if k != "head"}
    return {
        "teacher": tree.map(lambda x: x.detach().clone(), teacher),
        "step": torch.zeros((), dtype=torch.int64, device=params["head"]["weight"].device),
    }


def update_state(
    state: Tree, params: Tree, aux: dict | None = None, *, cfg: Data2VecConfig, key=None
) -> tuple[Tree, Tree]:
    """After an optimizer step: move the teacher toward the *new* ``params`` with the decay
    of ``state["step"]`` (:func:`ema_decay`) and count the step. Returns ``(params,
    new_state)``, ``params`` unchanged; nothing is modified in place. ``aux`` (the loss's
    ``metrics["aux"]``, empty) and ``key``: unused, the contract's.

    Example: ``params, state = update_state(state, params, {}, cfg=cfg)``.
    """
    del aux, key
    check_state(state, cfg)
    checks.check_params(params, init=M.init, cfg=cfg)
    teacher = ema_update(state["teacher"], params, ema_decay(cfg, state["step"]))
    return params, {"teacher": teacher, "step": state["step"] + 1}


def check_state(state: Any, cfg: Data2VecConfig) -> None:
    """``state`` is :func:`init_state`'s tree for ``cfg``: a teacher of the student's
    shapes (less the head) and an int64 ``step``."""
    if state is None:
        raise ValueError(
            "state= is missing: data2vec's loss reads its EMA teacher (models.data2vec.init_state)"
        )
    checks.check_keys(state, ("teacher", "step"), name="state")
    checks.check_params(
        state["teacher"], init=M.init, cfg=cfg, only=M._parts(cfg), name="state['teacher']"
    )
    extra = sorted(set(state["teacher"]) - set(M._parts(cfg)))
    if extra:
        raise ValueError(f"state['teacher'] holds {extra}, which the teacher does not have")
    checks.check_int("state['step']", state["step"], ())
