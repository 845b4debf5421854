"""A train step as a pure function ``(state, batch) -> (state, metrics)``.

``state`` is a pytree ``{"params", "opt_state", "step", "key"}``: ``step`` is a 0-d int64
tensor (a Python int would recompile a compiled step at every value) and ``key`` the base
dropout key; step ``n`` draws from ``fold_in(key, n)``. A family with train state that
gradients do not move (ALBEF's momentum encoders and queues, a VQ-VAE's EMA codebook:
``models.family.Family.update_state``) keeps it under ``"model_state"``: the loss reads it,
returns what its update needs as ``metrics["aux"]``, and the update runs after the
optimizer step on the new params.

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
from fmm.optim import Optimizer, apply_updates, global_norm

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
UpdateFn = Callable[[Any, Any, Any, torch.Tensor], tuple[Any, Any]]
State = dict[str, Any]
ENGINES = ("autograd", "func")


def init_state(
    params: Any, optimizer: Optimizer, *, key: torch.Tensor, model_state: Any = None
) -> State:
    """The train state at step 0; ``model_state``: a family's own train state, if it has one.

    Example: ``state = init_state(params, adamw(1e-3), key=key(0))``.
    """
    device = tree.leaves(params)[0].device
    state = {
        "params": params,
        "opt_state": optimizer.init(params),
        "step": torch.zeros((), dtype=torch.int64, device=device),
        "key": key.to(device),
    }
    if model_state is not None:
        state["model_state"] = model_state
    return state


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


def clip_grads(grads: Any, grad_norm: torch.Tensor, max_norm: float) -> Any:
    """``grads`` scaled by ``min(1, max_norm / (grad_norm + 1e-6))``, the scale of
    ``fmm.optim.clip_by_global_norm``, given the norm (which may be the norm of every
    rank's shards: ``train.distributed.sharded_global_norm``)."""
    scale = torch.clamp(max_norm / (grad_norm + 1e-6), max=1.0)
    return tree.map(lambda g: g * scale.to(g.dtype), grads)


def make_train_step(
    loss_fn: LossFn,
    optimizer: Optimizer,
    *,
    max_grad_norm: float | None = None,
    update_state: UpdateFn | None = None,
    compile: bool = False,
    engine: str = "autograd",
) -> Callable[[State, Any], tuple[State, dict[str, torch.Tensor]]]:
    """Build ``step(state, batch) -> (new_state, metrics)``.

    ``loss_fn(params, batch, key) -> (loss [], metrics dict of 0-d tensors)``. Metrics gain
    ``loss`` and ``grad_norm`` (before clipping). The step never mutates its inputs.
    With ``compile=True`` it is ``torch.compile(fullgraph=True)``-ed once; later steps of
    the same shapes reuse the graph.

    ``max_grad_norm``: clip as ``optim.clip_by_global_norm`` does, before ``optimizer`` (the
    state then holds only ``optimizer``'s, as ``train.distributed.make_step``'s does).

    ``update_state(model_state, params, aux, key) -> (params, model_state)``: for a state
    holding ``"model_state"``, ``loss_fn`` is called with ``state=`` that state and returns
    ``metrics["aux"]``; after the optimizer step the update gets the new params and
    ``fold_in(key, "state")`` (a family's ``update_state`` with ``cfg`` bound).

    Example::

        step = make_train_step(lambda p, b, k: models.clip.loss(p, b, cfg=cfg), adamw(1e-3))
        state, metrics = step(state, batch)
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    grads_of = _grads_autograd if engine == "autograd" else _grads_func
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")

    def step(state: State, batch: Any) -> tuple[State, dict[str, torch.Tensor]]:
        key = random.fold_in(state["key"], state["step"])
        fn = loss_fn
        if update_state is not None:
            fn = lambda p, b, k: loss_fn(p, b, k, state=state["model_state"])
        grads, loss, metrics = grads_of(fn, state["params"], batch, key)
        grad_norm = global_norm(grads)
        if max_grad_norm is not None:
            grads = clip_grads(grads, grad_norm, max_grad_norm)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new_state = {
            "params": apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "key": state["key"],
        }
        if update_state is not None:
            aux = tree.map(torch.Tensor.detach, metrics.pop("aux"))
            new_state["params"], new_state["model_state"] = update_state(
                state["model_state"], new_state["params"], aux, random.fold_in(key, "state")
            )
        return new_state, {**metrics, "loss": loss, "grad_norm": grad_norm}

    if not compile:
        return step
    compiled = torch.compile(step, fullgraph=True)

    def compiled_step(state: State, batch: Any) -> tuple[State, dict[str, torch.Tensor]]:
        # Dynamo refuses torch.autograd.grad unless told to trace it; scope that to our calls.
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return compiled(state, batch)

    return compiled_step
