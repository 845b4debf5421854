"""A train step as a pure function ``(state, batch) -> (state, metrics)``.

``state`` is a pytree ``{"params", "opt_state", "step", "key"}``: ``step`` is a 0-d int64
tensor (a Python int would recompile a compiled step at every value) and ``key`` the base
dropout key; step ``n`` draws from ``fold_in(key, n)``.

Gradient engines:

- ``"autograd"`` (default): ``torch.autograd.grad`` on detached leaf copies that require
  grad. Works eagerly and under ``torch.compile(fullgraph=True)``, and composes with
  activation checkpointing (``torch.utils.checkpoint``), which large models need.
- ``"func"``: ``torch.func.grad``. Composes with ``torch.func.vmap``, so a whole step can be
  vmapped over stacked params (train an ensemble at once); it cannot run checkpointed blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo

from fmm import random, tree
from train.optim import Optimizer, apply_updates, global_norm

LossFn = Callable[[Any, Any, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
State = dict[str, Any]
ENGINES = ("autograd", "func")


def init_state(params: Any, optimizer: Optimizer, *, key: torch.Tensor) -> State:
    """The train state at step 0. Example: ``state = init_state(params, adamw(1e-3), key=key(0))``."""
    device = tree.leaves(params)[0].device
    return {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": torch.zeros((), dtype=torch.int64, device=device),
        "key": key.to(device),
    }


def _grads_autograd(loss_fn: LossFn, params: Any, batch: Any, key: torch.Tensor):
    leaves, spec = torch.utils._pytree.tree_flatten(params)
    live = [x.detach().requires_grad_(True) for x in leaves]
    with torch.enable_grad():
        loss, metrics = loss_fn(torch.utils._pytree.tree_unflatten(live, spec), batch, key)
        grads = torch.autograd.grad(loss, live, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return torch.utils._pytree.tree_unflatten(grads, spec), loss.detach(), metrics


def _grads_func(loss_fn: LossFn, params: Any, batch: Any, key: torch.Tensor):
    def loss_and_aux(p):
        loss, metrics = loss_fn(p, batch, key)
        return loss, (loss.detach(), metrics)

    grads, (loss, metrics) = torch.func.grad(loss_and_aux, has_aux=True)(params)
    return grads, loss, metrics


def make_train_step(
    loss_fn: LossFn,
    optimizer: Optimizer,
    *,
    compile: bool = False,
    engine: str = "autograd",
) -> Callable[[State, Any], tuple[State, dict[str, torch.Tensor]]]:
    """Build ``step(state, batch) -> (new_state, metrics)``.

    ``loss_fn(params, batch, key) -> (loss [], metrics dict of 0-d tensors)``. Metrics gain
    ``loss`` and ``grad_norm`` (before clipping). The step never mutates its inputs.
    With ``compile=True`` it is ``torch.compile(fullgraph=True)``-ed once; later steps of
    the same shapes reuse the graph.

    Example::

        step = make_train_step(lambda p, b, k: models.clip.loss(p, b, cfg=cfg), adamw(1e-3))
        state, metrics = step(state, batch)
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    grads_of = _grads_autograd if engine == "autograd" else _grads_func

    def step(state: State, batch: Any) -> tuple[State, dict[str, torch.Tensor]]:
        key = random.fold_in(state["key"], state["step"])
        grads, loss, metrics = grads_of(loss_fn, state["params"], batch, key)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new_state = {
            "params": apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "key": state["key"],
        }
        return new_state, {**metrics, "loss": loss, "grad_norm": global_norm(grads)}

    if not compile:
        return step
    compiled = torch.compile(step, fullgraph=True)

    def compiled_step(state: State, batch: Any) -> tuple[State, dict[str, torch.Tensor]]:
        # Dynamo refuses torch.autograd.grad unless told to trace it; scope that to our calls.
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return compiled(state, batch)

    return compiled_step
