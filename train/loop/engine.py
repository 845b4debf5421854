"""The two ways the loop steps a family's loss, behind one interface.

- :class:`PureTrainer`: ``fmm.step.make_train_step``, the pure step over a state pytree,
  ``torch.compile``-able, on one process.
- :class:`ModuleTrainer`: the params in a ``fmm.adapter.ModelAdapter`` (one module per
  transformer block), wrapped by ``train.distributed`` for DDP or FSDP2, with activation
  checkpointing per block and bf16-mixed, on one process or under ``torchrun``.

Both hold ``{"opt_state", "step", "key"}`` and, for a family with train state,
``"model_state"``, and expose one :meth:`checkpoint_tree` with the same names, so a
checkpoint of one path resumes on the other, at any world size. Both clip the gradient
norm to 1 before AdamW.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fmm import optim, random, tree
from fmm.adapter import ModelAdapter
from fmm.step import init_state, make_train_step
from models.family import Family
from train import distributed as dist_

MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class Training:
    """What both trainers train: a family's ``cfg``, its initial ``params`` and train state
    (``model_state``, ``None`` if it has none), the ``optimizer`` and the base ``key`` (step
    ``n`` draws from ``fold_in(key, n)``)."""

    family: Family
    cfg: Any
    params: Any
    model_state: Any
    optimizer: optim.Optimizer
    key: torch.Tensor
    trainable: Callable[[str], bool] | None = None

    def update_fn(self) -> Callable | None:
        """The family's ``update_state`` with ``cfg`` bound, as the steps take it."""
        update, cfg = self.family.update_state, self.cfg
        if update is None:
            return None
        return lambda state, params, aux, key: update(state, params, aux, cfg=cfg, key=key)


class PureTrainer:
    """The pure train step on one process (``compile``: ``torch.compile(fullgraph=True)``)."""

    def __init__(self, t: Training, *, compile: bool):
        def loss_fn(p, batch, k, **state):
            return t.family.loss(p, batch, cfg=t.cfg, key=k, train=True, **state)

        self.state = init_state(t.params, t.optimizer, key=t.key, model_state=t.model_state)
        self._step = make_train_step(
            loss_fn,
            t.optimizer,
            max_grad_norm=MAX_GRAD_NORM,
            update_state=t.update_fn(),
            compile=compile,
        )

    def step(self, batch: dict) -> dict:
        self.state, metrics = self._step(self.state, batch)
        return metrics

    def checkpoint_tree(self) -> dict:
        """The train state; a checkpoint loads into these very tensors."""
        return dict(self.state)

    def params(self) -> Any:
        return self.state["params"]

    def model_state(self) -> Any:
        return self.state.get("model_state")


class ModuleTrainer:
    """The module path: ``fmm.adapter`` + ``train.distributed`` (``mode`` ddp, fsdp or None)."""

    def __init__(self, t: Training, *, env: dist_.Env, mode: str | None, ac: bool, precision: str):
        extras = {}
        if "gather" in t.family.loss_extras and env.world_size > 1:
            extras["gather"] = dist_.all_gather_with_grad
        self.adapter = ModelAdapter(
            t.params, functools.partial(t.family.loss, cfg=t.cfg, **extras), checkpoint=ac
        )
        self.model = (
            dist_.wrap(self.adapter, mode, precision=precision, device=env.device)
            if mode
            else self.adapter
        )

        def loss_call(model, batch, k, **state):
            return model(batch, key=k, train=True, **state)

        self._step = dist_.make_step(
            self.model,
            self.adapter,
            t.optimizer,
            loss_call=loss_call,
            mode=mode,
            max_grad_norm=MAX_GRAD_NORM,
            precision=precision,
            device=env.device,
            update_state=t.update_fn(),
        )
        live = self.adapter.tree()
        self.state = {
            "opt_state": t.optimizer.init(tree.map(lambda p: dist_.local(p.detach()), live)),
            "step": torch.zeros((), dtype=torch.int64, device=env.device),
            "key": t.key.to(env.device),
        }
        if t.model_state is not None:
            self.state["model_state"] = dist_.place_state(t.model_state, live)

    def step(self, batch: dict) -> dict:
        self.state, metrics = self._step(self.state, batch)
        return metrics

    def checkpoint_tree(self) -> dict:
        """Params (the adapter's, FSDP shards included), optimizer state as ``DTensor``s laid
        out like them, step, key and model state: what ``torch.distributed.checkpoint``
        saves and reshards; a load writes into the live tensors."""
        live = tree.map(lambda p: p.detach(), self.adapter.tree())
        out = {**self.state, "params": live}
        out["opt_state"] = dist_.shard_like(self.state["opt_state"], live)
        return out

    def params(self) -> Any:
        """The whole params as plain tensors (a collective under FSDP: every rank calls it)."""
        return dist_.full_params(self.model)

    def model_state(self) -> Any:
        state = self.state.get("model_state")
        return None if state is None else tree.map(dist_.whole, state)


def optimizer_for(
    *, lr: float, steps: int, warmup: int, weight_decay: float, decay_mask=None
) -> optim.Optimizer:
    """AdamW on a linear-warmup cosine schedule, as every recipe trains (clipping is the
    trainers' own, before it)."""
    schedule = optim.cosine_schedule(lr, total_steps=steps, warmup_steps=min(warmup, steps))
    return optim.adamw(schedule, weight_decay=weight_decay, decay_mask=decay_mask)


def base_keys(seed: int) -> dict[str, torch.Tensor]:
    """The keys of a run from its ``--seed``: ``init`` (params), ``state`` (the family's
    train state) and ``step`` (each step folds its number in)."""
    key = random.key(seed)
    return {name: random.fold_in(key, name) for name in ("init", "state", "step")}
