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

Frozen leaves (``Training.trainable``, see :class:`Frozen`): the pure step differentiates,
clips and updates the trainable part of the tree only (the frozen part is a constant of the
loss, so autograd records nothing for a wholly frozen tower: a locked image tower runs
without grad); the module path sets ``requires_grad_(False)`` on the frozen parameters and
steps AdamW over the trainable ones. Either way frozen leaves keep every bit, get no
weight decay, and AdamW's moments cover only the trainable leaves (named as in the tree).
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

    def frozen(self) -> Frozen | None:
        """The split of ``params`` by ``trainable`` (``None``: every leaf trains)."""
        return None if self.trainable is None else Frozen(self.params, self.trainable)

    def update_fn(self) -> Callable | None:
        """The family's ``update_state`` with ``cfg`` bound, as the steps take it."""
        update, cfg = self.family.update_state, self.cfg
        if update is None:
            return None
        return lambda state, params, aux, key: update(state, params, aux, cfg=cfg, key=key)


_NOTHING = object()  # a subtree with no leaf of the part asked for
# Adding -0.0 leaves every float bitwise as it is (+0.0 + -0.0 is +0.0; adding +0.0 would
# turn -0.0 into +0.0): the "update" of a frozen leaf on the module path, one shared scalar.
_NO_UPDATE = torch.tensor(-0.0)


class Frozen:
    """Which leaves of a param tree train: ``trainable(dotted_path) -> bool`` per leaf.

    :meth:`part` cuts a tree of that structure (params, grads) into its trainable or frozen
    part; both keep the tree's nesting and dotted names (a dict drops the other part's keys,
    a list keeps every position, ``{}`` where an entry is wholly in the other part), so an
    optimizer's decay mask and a checkpoint see the usual names. :meth:`join` puts two parts
    back together. Refuses a tree with no trainable leaf.

    Example::

        split = Frozen(params, lambda name: not name.startswith("image."))
        train, frozen = split.part(params, True), split.part(params, False)
        split.join(train, frozen)  # params again (the same tensors)
    """

    def __init__(self, params: Any, trainable: Callable[[str], bool]):
        self.flags = tree.map_with_path(lambda name, _: bool(trainable(name)), params)
        self.trains = tree.flatten(self.flags)
        if not any(self.trains.values()):
            raise ValueError("every parameter is frozen: there is nothing to train")

    def part(self, values: Any, trainable: bool) -> Any:
        """The trainable (``True``) or frozen (``False``) leaves of ``values``."""
        got = _part(self.flags, values, trainable)
        return {} if got is _NOTHING else got

    def join(self, train: Any, frozen: Any) -> Any:
        """The whole tree from its trainable and frozen parts."""
        return _join(self.flags, train, frozen)

    def only(self, optimizer: optim.Optimizer) -> optim.Optimizer:
        """``optimizer`` over the trainable leaves of whole trees (the module path): state
        for those leaves only; the updates of frozen leaves add nothing, to the bit."""

        def init(params):
            return optimizer.init(self.part(params, True))

        def update(grads, state, params):
            updates, state = optimizer.update(
                self.part(grads, True), state, self.part(params, True)
            )
            still = tree.map(lambda _: _NO_UPDATE, self.part(params, False))
            return self.join(updates, still), state

        return optim.Optimizer(init, update)


def _part(flags: Any, node: Any, keep: bool) -> Any:
    if isinstance(flags, bool):
        return node if flags == keep else _NOTHING
    if isinstance(flags, dict):
        picked = {k: _part(f, node[k], keep) for k, f in flags.items()}
        picked = {k: v for k, v in picked.items() if v is not _NOTHING}
        return picked or _NOTHING
    picked = [_part(f, n, keep) for f, n in zip(flags, node)]
    if all(v is _NOTHING for v in picked):
        return _NOTHING
    return type(flags)({} if v is _NOTHING else v for v in picked)


def _join(flags: Any, train: Any, frozen: Any) -> Any:
    if isinstance(flags, bool):
        return train if flags else frozen
    if isinstance(flags, dict):
        return {k: _join(f, _at(train, k), _at(frozen, k)) for k, f in flags.items()}
    return type(flags)(_join(f, _at(train, i), _at(frozen, i)) for i, f in enumerate(flags))


def _at(part: Any, key: Any) -> Any:
    if isinstance(part, dict):
        return part.get(key)
    return part[key] if isinstance(part, (list, tuple)) else None


class PureTrainer:
    """The pure train step on one process (``compile``: ``torch.compile(fullgraph=True)``)."""

    def __init__(self, t: Training, *, compile: bool):
        split = self._split = t.frozen()
        # The step's params are the trainable part; the frozen part is a constant of the loss.
        self._fixed = None if split is None else split.part(t.params, False)
        whole = self._whole

        def loss_fn(p, batch, k, **state):
            return t.family.loss(whole(p), batch, cfg=t.cfg, key=k, train=True, **state)

        update = t.update_fn()
        if update is not None and split is not None:
            inner = update

            def update(state, p, aux, key):  # a frozen leaf stays as is, whatever it sets
                new, state = inner(state, whole(p), aux, key)
                return split.part(new, True), state

        start = t.params if split is None else split.part(t.params, True)
        self.state = init_state(start, t.optimizer, key=t.key, model_state=t.model_state)
        self._step = make_train_step(
            loss_fn,
            t.optimizer,
            max_grad_norm=MAX_GRAD_NORM,
            update_state=update,
            compile=compile,
        )

    def _whole(self, trained: Any) -> Any:
        return trained if self._split is None else self._split.join(trained, self._fixed)

    def step(self, batch: dict) -> dict:
        self.state, metrics = self._step(self.state, batch)
        return metrics

    def checkpoint_tree(self) -> dict:
        """The train state with the whole params; a checkpoint loads into these very tensors."""
        return {**self.state, "params": self.params()}

    def params(self) -> Any:
        return self._whole(self.state["params"])

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
        split = self._split = t.frozen()
        optimizer = t.optimizer if split is None else split.only(t.optimizer)
        if split is not None:  # before wrapping: DDP and FSDP2 read requires_grad
            for name, p in self.adapter.named_parameters():
                p.requires_grad_(split.trains[name])
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
            optimizer,
            loss_call=loss_call,
            mode=mode,
            max_grad_norm=MAX_GRAD_NORM,
            precision=precision,
            device=env.device,
            update_state=t.update_fn(),
        )
        live = self.adapter.tree()
        self.state = {
            "opt_state": optimizer.init(tree.map(lambda p: dist_.local(p.detach()), live)),
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
        trained = live if self._split is None else self._split.part(live, True)
        out["opt_state"] = dist_.shard_like(self.state["opt_state"], trained)
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
