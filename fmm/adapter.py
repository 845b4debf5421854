"""Param pytrees as ``nn.Module``s, for the PyTorch machinery that wants modules.

fmm's models are pure functions over param trees. FSDP2 (``fully_shard``),
``torch.utils.checkpoint``, DDP and ``torch.distributed.checkpoint`` work on modules, so this
file (the only ``nn.Module`` code in fmm) wraps a tree without re-implementing any layer:

- :class:`ParamTree` registers a tree's tensors as parameters under the same dotted names:
  ``ParamTree(params).state_dict().keys() == fmm.tree.flatten(params).keys()``. Dicts and
  lists become nested child modules (a module name cannot contain a dot), and
  :meth:`ParamTree.tree` rebuilds the pytree from the current parameters.
- :class:`ModelAdapter` is a :class:`ParamTree` whose ``forward`` calls a pure function
  ``fn(params, *args, block_fn=..., **kwargs)``. Every list named ``blocks`` (a
  ``fmm.nn.transformer`` stack) becomes one :class:`Block` child module per block, and the
  ``block_fn`` it hands to ``fn`` routes block ``i`` through that child's ``__call__``. So
  ``fully_shard`` can shard each block then the root (FSDP2 unshards a block's params in
  its pre-forward hook), and ``checkpoint=True`` recomputes each block in backward. The
  block's math stays :func:`fmm.nn.block`. :meth:`ModelAdapter.prefill` and
  :meth:`ModelAdapter.decode_step` are cached-decoding entry points over
  :mod:`fmm.decoding`, with the cache an explicit pytree the caller owns.

Example::

    cfg = models.clip.clip_tiny()
    params = models.clip.init(cfg, fmm.random.key(0))
    model = ModelAdapter(params, functools.partial(models.clip.apply, cfg=cfg), checkpoint=True)
    img, txt, scale = model(images, tokens)          # == models.clip.apply(params, ...)
    model.state_dict().keys() == fmm.tree.flatten(params).keys()  # True

Activation checkpointing uses ``torch.utils.checkpoint(use_reentrant=False)``, which works
with ``loss.backward()`` and ``torch.autograd.grad`` (``fmm.step``'s default engine) but
not inside ``torch.func.grad`` or ``vmap``: its saved-tensor hooks are refused under
functorch transforms. A compiled train step with checkpointed blocks needs
``attn_impl="math"`` (inductor counts the SDPA kernel as an RNG op in a recompute region). With explicit dropout keys the
recompute draws the very same masks (``fmm.random`` is counter-based), so checkpointed
gradients equal plain ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn as tnn
from torch.utils.checkpoint import checkpoint as _checkpoint

from fmm.nn.transformer import block as _block

__all__ = ["Block", "ModelAdapter", "ParamTree", "checkpointed_block"]

Tree = Any


def checkpointed_block(block_params: Tree, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """:func:`fmm.nn.block` under activation checkpointing, as a pure ``block_fn``.

    Pass it to any ``block_fn=`` (``fmm.nn.transformer``, ``models.clip.loss``, ...) to keep
    only each block's input ``x: [B, S, width]`` for backward and recompute the rest.
    Needs ``loss.backward()`` or ``torch.autograd.grad`` (not ``torch.func.grad``/``vmap``).

    Example: ``nn.transformer(p, x, cfg=cfg, key=k, train=True, block_fn=checkpointed_block)``.
    """
    if not torch.is_grad_enabled():
        return _block(block_params, x, **kwargs)
    return _checkpoint(_block, block_params, x, use_reentrant=False, **kwargs)


class ParamTree(tnn.Module):
    """A param pytree (nested dicts/lists of tensors) registered as nested modules.

    ``params``: the tree; its tensors become ``nn.Parameter``s that share their storage
    (floating-point leaves require grad, integer leaves do not). The module's
    ``state_dict()`` keys are ``fmm.tree.flatten(params)``'s dotted names (as a set: a
    module lists its own parameters before its children's).

    Example::

        pt = ParamTree({"w": torch.ones(2, 3), "blocks": [{"b": torch.zeros(3)}]})
        sorted(pt.state_dict())  # ["blocks.0.b", "w"]
        pt.tree()              # {"w": Parameter[2, 3], "blocks": [{"b": Parameter[3]}]}
    """

    def __init__(self, params: Tree, *, _blocks_as_modules: bool = False, _path: str = "") -> None:
        super().__init__()
        if isinstance(params, Mapping):
            items = list(params.items())
            self._is_list = False
        elif isinstance(params, (list, tuple)):
            items = [(str(i), v) for i, v in enumerate(params)]
            self._is_list = True
        else:
            raise TypeError(
                f"ParamTree: expected a dict or list subtree at {_path or '<root>'!r}, "
                f"got {type(params).__name__}"
            )
        self._keys: list[str] = []
        for name, value in items:
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(
                    f"ParamTree: keys must be non-empty strings without '.', got {name!r} "
                    f"at {_path or '<root>'!r}"
                )
            where = f"{_path}.{name}" if _path else name
            if hasattr(self, name):
                raise ValueError(
                    f"ParamTree: key {where!r} clashes with an nn.Module attribute of the same "
                    "name; rename it in the param tree"
                )
            if isinstance(value, torch.Tensor):
                trainable = value.is_floating_point() or value.is_complex()
                self.register_parameter(name, tnn.Parameter(value.detach(), trainable))
            else:
                self.add_module(name, self._child(name, value, _blocks_as_modules, where))
            self._keys.append(name)

    def _child(self, name: str, value: Tree, blocks_as_modules: bool, where: str) -> ParamTree:
        stack = (
            blocks_as_modules
            and name == "blocks"
            and isinstance(value, (list, tuple))
            and all(isinstance(b, Mapping) for b in value)
        )
        if stack:
            holder = ParamTree([], _path=where)
            for i, b in enumerate(value):
                holder.add_module(str(i), Block(b, _path=f"{where}.{i}"))
                holder._keys.append(str(i))
            return holder
        return ParamTree(value, _blocks_as_modules=blocks_as_modules, _path=where)

    def tree(self) -> Tree:
        """The pytree of the current parameters (no copies), as it was registered."""
        return self._rebuild(lambda child: child.tree())

    def _rebuild(self, subtree: Callable[[ParamTree], Tree]) -> Tree:
        values = []
        for name in self._keys:
            value = getattr(self, name)
            values.append(subtree(value) if isinstance(value, ParamTree) else value)
        return values if self._is_list else dict(zip(self._keys, values))


class _BlockParams(dict):
    """A block's params as seen by the pure function, tagged with the module that runs them."""

    module: Block


class Block(ParamTree):
    """One transformer block's params; ``forward`` is :func:`fmm.nn.block` on them.

    ``checkpoint``: recompute the block in backward instead of keeping its activations.
    ``forward(x [B, S, width], *, cfg, key=None, train=False, **block_kwargs) -> [B, S, width]``.
    """

    checkpoint: bool = False

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        # Read params here, not at the root: FSDP2 unshards them in this module's pre-forward.
        params = self.tree()
        if self.checkpoint:
            return checkpointed_block(params, x, **kwargs)
        return _block(params, x, **kwargs)


def _run_block(block_params: Tree, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    if isinstance(block_params, _BlockParams):
        return block_params.module(x, **kwargs)
    return _block(block_params, x, **kwargs)


@contextlib.contextmanager
def _unsharded(model: tnn.Module):
    # Decoding reads every block's params from the root, outside the blocks' forward hooks,
    # so FSDP2 modules (they have unshard/reshard) are gathered explicitly for the call.
    sharded = [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()


class ModelAdapter(ParamTree):
    """A model as a module: the params registered as in :class:`ParamTree`, ``forward``
    calling the pure ``fn(params, *args, block_fn=..., **kwargs)``.

    ``fn``: a pure function taking the param tree first and ``block_fn=`` (every model whose
    stacks go through ``fmm.nn.transformer`` can pass it down; e.g.
    ``functools.partial(models.clip.loss, cfg=cfg)``). ``checkpoint``: activation
    checkpointing per block. Each ``blocks`` list becomes one :class:`Block` module per
    block; :meth:`block_modules` lists them (for ``fully_shard``).

    Example::

        model = ModelAdapter(params, functools.partial(models.clip.loss, cfg=cfg))
        loss, metrics = model(batch)
        loss.backward()           # grads land in model's parameters (.grad)
    """

    def __init__(self, params: Tree, fn: Callable[..., Any], *, checkpoint: bool = False):
        super().__init__(params, _blocks_as_modules=True)
        if not callable(fn):
            raise TypeError(f"ModelAdapter: fn must be callable, got {type(fn).__name__}")
        self._fn = fn
        self.set_checkpoint(checkpoint)

    def set_checkpoint(self, enabled: bool) -> None:
        """Turn per-block activation checkpointing on or off."""
        for b in self.block_modules():
            b.checkpoint = bool(enabled)

    def block_modules(self) -> list[Block]:
        """Every :class:`Block` child, in registration (= execution) order."""
        return [m for m in self.modules() if isinstance(m, Block)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(self._forward_tree(self), *args, block_fn=_run_block, **kwargs)

    def prefill(self, tokens: torch.Tensor, cache: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """:func:`fmm.decoding.prefill` on this module's params: ``tokens: [B, S]`` ->
        ``(logits, new_cache)``. The cache is the caller's explicit pytree; pass ``cfg=`` (a
        :class:`fmm.decoding.DecoderSpec` or a config with one) and the other keywords of
        ``prefill``. Runs without grad; under FSDP2 the params are gathered for the call.

        Example: ``logits, cache = model.prefill(prompt, init_cache(...), cfg=spec)``.
        """
        from fmm import decoding

        with torch.no_grad(), _unsharded(self):
            return decoding.prefill(self.tree(), tokens, cache, **kwargs)

    def decode_step(
        self, token: torch.Tensor, cache: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, Any]:
        """:func:`fmm.decoding.decode_step` on this module's params: ``token: [B]`` ->
        ``(logits [B, vocab], new_cache)``. Same conventions as :meth:`prefill`."""
        from fmm import decoding

        with torch.no_grad(), _unsharded(self):
            return decoding.decode_step(self.tree(), token, cache, **kwargs)

    @staticmethod
    def _forward_tree(node: ParamTree) -> Tree:
        if isinstance(node, Block):
            view = _BlockParams(node.tree())
            view.module = node
            return view
        return node._rebuild(ModelAdapter._forward_tree)
