"""Optax-style optimizers: pure ``(init, update)`` pairs over parameter pytrees.

An :class:`Optimizer` never touches parameters. ``update(grads, state, params)`` returns
``(updates, new_state)``; :func:`apply_updates` adds the updates to the params. Pytrees are
nested dicts/lists/tuples of tensors (``torch.utils._pytree``). State is a pytree of tensors
too, so it stacks for ensembles and checkpoints like params.

Every function is traceable three ways: eagerly, inside ``torch.compile(fullgraph=True)``
(no ``.item()``, no Python branch on a tensor value, the step count is a 0-d int64 tensor in
the state so a compiled step never recompiles from step to step) and under
``torch.func.vmap`` over a leading ensemble axis. Because of vmap we use plain per-leaf
torch ops rather than ``torch._foreach_*`` kernels: the foreach ops have no vmap batching
rule, and inductor fuses the per-leaf ops into a few kernels anyway.

Step convention (as ``torch.optim``): ``count`` starts at 0 in ``init``; a schedule is
evaluated at the count *before* the increment (the first step uses ``schedule(0)``), and
Adam's bias correction uses the count *after* it (the first step uses step 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import reduce
from typing import Any, NamedTuple

import torch
from torch.utils import _pytree as pytree

from fmm import tree

Params = Any
Grads = Any
Updates = Any
State = Any
Schedule = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["Optimizer", "Schedule", "adamw", "apply_updates", "chain", "clip_by_global_norm"]
__all__ += ["constant_schedule", "cosine_schedule", "ema_update", "global_norm", "sgd"]


class Optimizer(NamedTuple):
    """A pure gradient transformation.

    ``init(params) -> state`` and ``update(grads, state, params) -> (updates, new_state)``.
    ``update`` never mutates its inputs; updates are *added* to params (see
    :func:`apply_updates`) and have the structure of ``grads``.
    """

    init: Callable[[Params], State]
    update: Callable[[Grads, State, Params], tuple[Updates, State]]


def _init_count(params: Params) -> torch.Tensor:
    # On the params' device so a compiled step does not mix in host scalars.
    leaves = pytree.tree_leaves(params)
    device = leaves[0].device if leaves else None
    return torch.zeros((), dtype=torch.int64, device=device)


def _lr_at(lr: float | Schedule, count: torch.Tensor) -> float | torch.Tensor:
    return lr(count) if callable(lr) else lr


def _check_lr(lr: float | Schedule) -> None:
    if not callable(lr) and not lr > 0:
        raise ValueError(f"lr must be > 0 or a schedule, got {lr}")


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _check_nonneg(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def global_norm(grads: Any) -> torch.Tensor:
    """The L2 norm of all leaves of ``grads`` (any tree) taken together, as a 0-d tensor.

    Accumulates in at least float32 (so bf16 grads do not overflow the sum of squares).
    An empty tree has norm 0.
    """
    leaves = pytree.tree_leaves(grads)
    if not leaves:
        return torch.zeros(())
    dtype = reduce(torch.promote_types, (x.dtype for x in leaves), torch.float32)
    norms = [torch.linalg.vector_norm(x, dtype=dtype) for x in leaves]
    return torch.linalg.vector_norm(torch.stack(norms))


def apply_updates(params: Params, updates: Updates) -> Params:
    """``params + updates`` leafwise, as new tensors in each param's dtype."""
    return pytree.tree_map(lambda p, u: (p + u).to(p.dtype), params, updates)


def constant_schedule(value: float) -> Schedule:
    """A schedule that returns ``value`` at every step (a 0-d float32 tensor)."""
    _check_nonneg("value", value)
    return lambda count: torch.full((), value, dtype=torch.float32, device=count.device)


def cosine_schedule(
    peak: float, *, total_steps: int, warmup_steps: int = 0, final: float = 0.0
) -> Schedule:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then cosine decay to ``final``.

    ``schedule(count)``: 0 at count 0 (when ``warmup_steps > 0``), ``peak`` at
    ``warmup_steps``, ``final`` at ``total_steps`` and every count after it. Computed with
    torch ops from the 0-d int64 count, so it traces without recompiling per step.
    """
    if not peak > 0:
        raise ValueError(f"peak must be > 0, got {peak}")
    _check_nonneg("final", final)
    _check_nonneg("warmup_steps", warmup_steps)
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps must be <= total_steps, got warmup_steps={warmup_steps} "
            f"> total_steps={total_steps}"
        )

    def schedule(count: torch.Tensor) -> torch.Tensor:
        t = count.to(torch.float32)
        warm = peak * t / max(warmup_steps, 1)
        progress = torch.clamp((t - warmup_steps) / max(total_steps - warmup_steps, 1), 0, 1)
        cos = final + (peak - final) * 0.5 * (1 + torch.cos(math.pi * progress))
        # `final` wins at total_steps even when warmup_steps == total_steps.
        lr = torch.where(t < warmup_steps, warm, cos)
        return torch.where(t >= total_steps, torch.full_like(t, final), lr)

    return schedule


def clip_by_global_norm(max_norm: float) -> Optimizer:
    """Scale grads by ``min(1, max_norm / (global_norm + 1e-6))``, as ``clip_grad_norm_``.

    Grads whose global norm is below ``max_norm`` pass unchanged; the scale is a tensor
    (``torch.clamp``), so there is no host sync. State is ``()``.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")

    def init(params: Params) -> State:
        return ()

    def update(grads: Grads, state: State, params: Params = None) -> tuple[Updates, State]:
        scale = torch.clamp(max_norm / (global_norm(grads) + 1e-6), max=1.0)
        return pytree.tree_map(lambda g: g * scale.to(g.dtype), grads), state

    return Optimizer(init, update)


def sgd(
    lr: float | Schedule,
    *,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> Optimizer:
    """Stochastic gradient descent with the semantics of ``torch.optim.SGD`` (dampening 0).

    Weight decay is coupled L2 (``g + weight_decay * p``). State is
    ``{"count": int64 [], "momentum": tree like params}`` (no ``"momentum"`` when
    ``momentum == 0``). The momentum buffer starts at zeros, which equals torch's
    "first buffer is the gradient" since dampening is 0.
    """
    _check_lr(lr)
    _check_nonneg("momentum", momentum)
    _check_nonneg("weight_decay", weight_decay)
    if nesterov and momentum == 0:
        raise ValueError("nesterov=True requires momentum > 0")

    def init(params: Params) -> State:
        state = {"count": _init_count(params)}
        if momentum:
            state["momentum"] = pytree.tree_map(torch.zeros_like, params)
        return state

    def update(grads: Grads, state: State, params: Params) -> tuple[Updates, State]:
        step_lr = _lr_at(lr, state["count"])
        if weight_decay:
            grads = pytree.tree_map(lambda g, p: g + weight_decay * p, grads, params)
        new_state = {"count": state["count"] + 1}
        if momentum:
            buf = pytree.tree_map(lambda b, g: momentum * b + g, state["momentum"], grads)
            new_state["momentum"] = buf
            nest = lambda g, b: g + momentum * b
            grads = pytree.tree_map(nest, grads, buf) if nesterov else buf
        return pytree.tree_map(lambda g: -step_lr * g, grads), new_state

    return Optimizer(init, update)


def adamw(
    lr: float | Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    decay_mask: Callable[[str], bool] | None = None,
) -> Optimizer:
    """Adam with decoupled weight decay, with the semantics of ``torch.optim.AdamW``.

    Args:
        lr: learning rate, or a schedule of the step count.
        b1, b2: moment decay rates, each in ``[0, 1)``.
        eps: added to the bias-corrected ``sqrt(nu)``.
        weight_decay: decoupled decay: ``p <- p - lr * weight_decay * p``.
        decay_mask: ``mask(dotted_path) -> bool``, whether to decay the leaf at
            ``"blocks.0.attn.qkv.weight"``. Default: decay leaves with ``ndim >= 2`` (not
            biases, norms or scalars such as a log-temperature); under vmap ``ndim`` is the
            per-model one.

    State is ``{"count": int64 [], "mu": tree, "nu": tree}``, moments in each param's dtype.

    Example::

        opt = adamw(cosine_schedule(1e-3, total_steps=1000, warmup_steps=100))
        state = opt.init(params)
        updates, state = opt.update(grads, state, params)
        params = apply_updates(params, updates)
    """
    _check_lr(lr)
    _check_unit("b1", b1)
    _check_unit("b2", b2)
    _check_nonneg("eps", eps)
    _check_nonneg("weight_decay", weight_decay)
    # log(0) = -inf makes expm1(count * log b) = -1, i.e. b ** count = 0 for count >= 1.
    log_b1 = math.log(b1) if b1 > 0 else -math.inf
    log_b2 = math.log(b2) if b2 > 0 else -math.inf

    def decays(path: tuple, p: torch.Tensor) -> bool:
        return decay_mask(tree.path_str(path)) if decay_mask is not None else p.ndim >= 2

    def init(params: Params) -> State:
        return {
            "count": _init_count(params),
            "mu": pytree.tree_map(torch.zeros_like, params),
            "nu": pytree.tree_map(torch.zeros_like, params),
        }

    def update(grads: Grads, state: State, params: Params) -> tuple[Updates, State]:
        step_lr = _lr_at(lr, state["count"])
        count = state["count"] + 1
        # 1 - b ** t via expm1: exact to float32 eps even when 1 - b2 ** t is ~1e-3.
        bc1 = -torch.expm1(count * log_b1)
        bc2_sqrt = torch.sqrt(-torch.expm1(count * log_b2))
        step_size = step_lr / bc1
        mu = pytree.tree_map(lambda m, g: torch.lerp(m, g, 1 - b1), state["mu"], grads)
        nu = pytree.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state["nu"], grads)

        def leaf(path: tuple, m: torch.Tensor, v: torch.Tensor, p: torch.Tensor):
            u = -step_size * m / (torch.sqrt(v) / bc2_sqrt + eps)
            if weight_decay and decays(path, p):
                u = u - step_lr * weight_decay * p
            return u.to(p.dtype)

        updates = pytree.tree_map_with_path(leaf, mu, nu, params)
        return updates, {"count": count, "mu": mu, "nu": nu}

    return Optimizer(init, update)


def chain(*optimizers: Optimizer) -> Optimizer:
    """Apply ``optimizers`` in order, each one's updates being the next one's grads.

    State is a tuple with one state per optimizer.

    Example::

        opt = chain(clip_by_global_norm(1.0), adamw(3e-4, weight_decay=0.1))
        state = opt.init(params)
        updates, state = opt.update(grads, state, params)
    """

    def init(params: Params) -> State:
        return tuple(opt.init(params) for opt in optimizers)

    def update(grads: Grads, state: State, params: Params) -> tuple[Updates, State]:
        new_state = []
        for opt, s in zip(optimizers, state, strict=True):
            grads, s = opt.update(grads, s, params)
            new_state.append(s)
        return grads, tuple(new_state)

    return Optimizer(init, update)


def ema_update(average: Params, params: Params, decay: torch.Tensor | float) -> Params:
    """An exponential moving average of weights, one step: ``decay * average + (1 - decay)
    * params`` leafwise over ``average``'s parts (``params`` may hold more: a student's
    head that its teacher lacks), as new detached tensors in ``average``'s dtypes, computed
    in at least float32 (inputs untouched). ``decay``: a float or a 0-d tensor (a compiled
    step's changing decay, no recompile). Keep the average in float32: a bfloat16 one
    cannot resolve steps of ``1 - decay``. What data2vec's teacher and a diffusion
    recipe's sampling weights are.

    Example: ``ema = ema_update(state["ema"], params, 0.999)``.
    """
    current = {k: params[k] for k in average}

    def mix(t, s):
        wide = torch.promote_types(t.dtype, torch.float32)
        d = torch.as_tensor(decay, device=t.device).to(wide)
        return (t.detach().to(wide) * d + s.detach().to(wide) * (1.0 - d)).to(t.dtype)

    return tree.map(mix, average, current)
