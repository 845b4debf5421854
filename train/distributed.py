"""Many processes: torchrun process groups, DDP and FSDP2 over ``fmm.adapter``, gathers.

Launch with ``torchrun --nproc_per_node N -m train clip --dist ddp|fsdp [--ac]``: each
process calls :func:`setup` (gloo on CPU, NCCL on CUDA), wraps the model's params in a
:class:`fmm.adapter.ModelAdapter` and :func:`wrap`s it:

- ``"ddp"``: ``DistributedDataParallel``: every rank holds all params; grads are averaged.
- ``"fsdp"``: FSDP2 ``fully_shard`` per transformer block, then at the root; each rank
  holds ``1/N`` of each param (a ``DTensor`` sharded on dim 0), gathered block by block
  in forward and backward; grads are reduce-scattered (averaged). 0-d params (CLIP's
  ``logit_scale``), which ``fully_shard`` refuses, stay replicated and their grads are
  averaged by :func:`make_step`.

The optimizer stays ``fmm.optim``'s pure ``(init, update)`` pair. :func:`make_step` runs
it on each rank's *local* shards (AdamW is elementwise, so shards update independently,
and plain tensors skip DTensor dispatch); only the gradient norm needs every rank:
:func:`sharded_global_norm` all-reduces it, and ``make_step(max_grad_norm=)`` clips with
it exactly as ``fmm.optim.clip_by_global_norm`` does on one process. :func:`shard_like` turns the local optimizer
state back into DTensors for ``torch.distributed.checkpoint``, so it reshards on load.

The contrastive loss sees every rank's embeddings through :func:`all_gather_with_grad`,
which also handles unequal per-rank batch sizes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils import _pytree as pytree

from fmm import random, tree
from fmm.adapter import ModelAdapter
from fmm.optim import Optimizer, global_norm
from fmm.step import clip_grads

MODES = ("ddp", "fsdp")
PRECISIONS = ("fp32", "bf16-mixed")


@dataclass(frozen=True)
class Env:
    """This process's place in the job: ``rank`` of ``world_size``, and its ``device``."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> Env:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``).

    NCCL on CUDA (one GPU per ``LOCAL_RANK``), gloo on CPU. Raises a clear error when not
    launched by torchrun. Example: ``env = setup(); ...; teardown()``.
    """
    missing = [
        v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ
    ]
    if missing:
        raise RuntimeError(
            f"--dist needs a torchrun launch (missing environment {', '.join(missing)}): "
            "run `torchrun --nproc_per_node 2 -m train clip --dist fsdp ...`"
        )
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Env(dist.get_rank(), dist.get_world_size(), dev)


def teardown() -> None:
    """Leave the process group (after a final barrier), if one was joined."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's rows; backward sums each row's gradient over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        top = max(sizes)
        padded = torch.zeros((top, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.rank, ctx.sizes = rank, sizes
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's loss reads these rows; the rows' gradient is the sum over ranks.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def all_gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows ``x: [B_r, ...] -> ([sum_r B_r, ...], offset)``, with gradients.

    Rows are in rank order; ``offset`` is where this rank's rows start (the label offset of
    the contrastive loss). Ranks may hold different ``B_r`` (sizes are exchanged first).
    Without a process group it is the identity ``(x, 0)``. It is a
    ``fmm.losses.contrastive_loss`` ``gather``: ``clip.loss(..., gather=all_gather_with_grad)``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    if x.ndim < 1:
        raise ValueError(f"all_gather_with_grad: x must be [batch, ...], got shape {list(x.shape)}")
    rank, world = dist.get_rank(), dist.get_world_size()
    size = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    return _GatherRows.apply(x, sizes, rank), sum(sizes[:rank])


def local(x: Any) -> Any:
    """This rank's shard of a ``DTensor`` (a plain tensor passes through)."""
    return x.to_local() if isinstance(x, DTensor) else x


def wrap(
    model: ModelAdapter, mode: str, *, precision: str = "fp32", device: torch.device | None = None
) -> torch.nn.Module:
    """Distribute ``model`` in place and return the module to call: ``"ddp"`` or ``"fsdp"``.

    ``precision="bf16-mixed"``: FSDP2 computes in bf16 and reduces grads in fp32
    (``MixedPrecisionPolicy``); DDP relies on :func:`autocast`. Params stay fp32 either way.

    Example::

        adapter = ModelAdapter(params, functools.partial(clip.loss, cfg=cfg,
                                                         gather=all_gather_with_grad))
        model = wrap(adapter, "fsdp")   # adapter's params are now DTensor shards
        loss, metrics = model(my_rows)  # call the returned module, so the hooks run
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(model, ModelAdapter):
        raise TypeError(
            f"wrap: model must be an fmm.adapter.ModelAdapter, got {type(model).__name__}"
        )
    if mode == "ddp":
        ids = [device.index] if device is not None and device.type == "cuda" else None
        # static_graph: params a loss never uses (a VQ-VAE's EMA codebook, ALBEF's ITM head
        # under VQA) are found in the first step, instead of failing the second one.
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, static_graph=True)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if precision == "bf16-mixed":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for b in model.block_modules():
        fully_shard(b, mp_policy=policy)
    scalars = {p for p in model.parameters() if p.ndim == 0}
    fully_shard(model, mp_policy=policy, ignored_params=scalars or None)
    return model


def autocast(mode: str | None, precision: str, device: torch.device):
    """The autocast context for ``bf16-mixed`` outside FSDP (FSDP2 casts params itself)."""
    if precision == "bf16-mixed" and mode != "fsdp":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sharded_global_norm(grads: Any) -> torch.Tensor:
    """The L2 norm of a whole gradient tree whose leaves may be ``DTensor`` shards.

    Each rank sums the squares of its local shards; one all-reduce adds the ranks. Plain
    (replicated) leaves are counted once, not once per rank. Returns a 0-d tensor, equal
    on every rank to ``fmm.optim.global_norm`` of the full gradients.
    """
    leaves = tree.leaves(grads)
    shards = [local(g) for g in leaves if isinstance(g, DTensor)]
    replicated = [g for g in leaves if not isinstance(g, DTensor)]
    sq = global_norm(shards) ** 2 if shards else torch.zeros((), device=_device(leaves))
    if shards and dist.is_initialized():
        dist.all_reduce(sq)
    if replicated:
        sq = sq + global_norm(replicated).to(sq.device) ** 2
    return sq.sqrt()


def _device(leaves: list[torch.Tensor]) -> torch.device:
    return local(leaves[0]).device if leaves else torch.device("cpu")


def shard_like(state: Any, params: Any) -> Any:
    """Re-wrap local optimizer-state shards as ``DTensor``s laid out like ``params``.

    Every subtree of ``state`` with the structure of ``params`` (AdamW's ``mu``, ``nu``)
    becomes DTensors with the matching param's mesh and placements (sharing storage, no
    copy); other leaves (counts) stay plain, i.e. replicated. For checkpoints only.
    """
    spec = pytree.tree_structure(params)
    flat_params = tree.leaves(params)

    def visit(node: Any) -> Any:
        if pytree.tree_structure(node) == spec:
            leaves = [
                DTensor.from_local(s, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                if isinstance(p, DTensor)
                else s
                for s, p in zip(tree.leaves(node), flat_params)
            ]
            return pytree.tree_unflatten(leaves, spec)
        if isinstance(node, dict):
            return {k: visit(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(visit(v) for v in node)
        return node

    return visit(state)


def full_params(model: torch.nn.Module) -> Any:
    """A copy of the whole param tree as plain tensors on every rank (gathers FSDP shards).

    A snapshot: later steps do not change it. Collective under FSDP: every rank calls it.
    """
    adapter = model.module if hasattr(model, "module") else model
    return tree.map(
        lambda p: p.full_tensor().detach() if isinstance(p, DTensor) else p.detach().clone(),
        adapter.tree(),
    )


def local_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds (its shards under FSDP)."""
    return sum(local(p).numel() * p.element_size() for p in model.parameters())


def backward(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    loss_call: Callable[[torch.nn.Module, Any, torch.Tensor], tuple[torch.Tensor, dict]],
    batch: Any,
    key: torch.Tensor,
    *,
    mode: str | None,
    precision: str = "fp32",
    device: torch.device | None = None,
) -> tuple[torch.Tensor, dict, Any, Any]:
    """One forward and backward: ``(loss, metrics, params, grads)``.

    ``loss`` is averaged over ranks (each rank's loss is over its equal share of the
    global batch, so this is the global-batch loss); ``grads`` are the global-batch grads,
    as trees like ``params`` (``DTensor`` shards under FSDP), taken off the params'
    ``.grad`` (which is cleared).
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    with autocast(mode, precision, device or torch.device("cpu")):
        loss, metrics = loss_call(model, batch, key)
    loss.backward()
    params = adapter.tree()
    if mode == "fsdp" and world > 1:
        for p in tree.leaves(params):  # replicated leaves FSDP ignores: average by hand
            if not isinstance(p, DTensor) and p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(world)
    grads = tree.map(lambda p: p.grad if p.grad is not None else torch.zeros_like(p), params)
    for p in tree.leaves(params):
        p.grad = None
    loss = loss.detach()
    if world > 1:
        dist.all_reduce(loss)
        loss = loss / world
    return loss, metrics, params, grads


def make_step(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    optimizer: Optimizer,
    *,
    loss_call: Callable[..., tuple[torch.Tensor, dict]],
    mode: str | None,
    max_grad_norm: float | None = None,
    precision: str = "fp32",
    device: torch.device | None = None,
    update_state: Callable[..., tuple[Any, Any]] | None = None,
) -> Callable[[dict, Any], tuple[dict, dict]]:
    """``step(state, batch) -> (state, metrics)`` for a (possibly distributed) module.

    ``state = {"opt_state", "step", "key"}`` (params live in ``adapter``, updated in place);
    step ``n`` passes ``fold_in(key, n)`` to ``loss_call(model, batch, key) -> (loss, metrics)``,
    which must call ``model`` (so DDP/FSDP hooks run). With more than one rank, rank ``r``
    gets ``fold_in(fold_in(key, n), r)``: its rows draw their own dropout and masks. Metrics:
    ``loss`` averaged over ranks (each rank's loss is over its equal share of the global
    batch) and ``grad_norm`` of the full gradient before clipping. ``max_grad_norm``: scale
    grads by ``min(1, max_norm / (grad_norm + 1e-6))`` first, as ``optim.clip_by_global_norm``.
    ``mode``: ``None`` (one process, or a plain module), ``"ddp"`` or ``"fsdp"``.

    A family's train state (``state["model_state"]``, laid out by :func:`place_state`) goes
    to ``loss_call(model, batch, key, state=...)`` whole (sharded leaves gathered), and
    ``update_state(model_state, params, aux, key) -> (params, model_state)`` runs after the
    optimizer step on that whole state and the whole new params (gathered under FSDP: one
    more all-gather of the params per step, so any update is exact, checks included), with
    ``aux``'s rows gathered from every rank in rank order (every rank's queue then holds the
    global batch) and ``fold_in(fold_in(key, n), "state")``, the same on every rank. Its
    result goes back to the shards: the state stays sharded between steps and in
    checkpoints, params it sets (an EMA codebook) are written into this rank's shards.
    """
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    device = device or torch.device("cpu")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1

    def step(state: dict, batch: Any) -> tuple[dict, dict]:
        step_key = random.fold_in(state["key"], state["step"])
        key = random.fold_in(step_key, rank) if world > 1 else step_key
        call = loss_call
        if update_state is not None:
            gathered = tree.map(whole, state["model_state"])
            call = lambda m, b, k: loss_call(m, b, k, state=gathered)
        loss, metrics, params, grads = backward(
            model, adapter, call, batch, key, mode=mode, precision=precision, device=device
        )
        grad_norm = sharded_global_norm(grads)
        local_grads = tree.map(local, grads)
        local_params = tree.map(lambda p: local(p.detach()), params)  # shares storage
        if max_grad_norm is not None:
            local_grads = clip_grads(local_grads, grad_norm, max_grad_norm)
        updates, opt_state = optimizer.update(local_grads, state["opt_state"], local_params)
        with torch.no_grad():
            for p, u in zip(tree.leaves(local_params), tree.leaves(updates)):
                p.add_(u)
        new_state = {"opt_state": opt_state, "step": state["step"] + 1, "key": state["key"]}
        if update_state is not None:
            aux = tree.map(gather_rows, metrics.pop("aux"))
            with torch.no_grad():
                new_params = tree.map(whole, params)  # the updated params, whole
                changed, model_state = update_state(
                    gathered, new_params, aux, random.fold_in(step_key, "state")
                )  # the same key on every rank, so the state stays the same everywhere
                for p, old, new in zip(*map(tree.leaves, (params, new_params, changed))):
                    if new is not old:  # an update that sets params (an EMA codebook)
                        local(p.detach()).copy_(local(_like(new, p)))
            new_state["model_state"] = tree.map(_like, model_state, state["model_state"])
        return new_state, {**metrics, "loss": loss, "grad_norm": grad_norm}

    return step


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x: [B_r, ...]`` in rank order, ``[sum_r B_r, ...]``, without
    gradients (the identity on one process). For what a train-state update reads."""
    if x.ndim < 1:
        raise ValueError(
            "gather_rows: a train-state update reads per-example rows [batch, ...], got a "
            "0-d tensor; return rows in metrics['aux']"
        )
    return all_gather_with_grad(x.detach())[0].detach()


def whole(x: Any) -> Any:
    """A ``DTensor`` gathered whole (a collective: every rank calls it); a plain tensor as is."""
    return x.full_tensor() if isinstance(x, DTensor) else x


def _like(value: torch.Tensor, template: Any) -> Any:
    """``value`` (whole, the same on every rank) laid out like ``template``: this rank's
    shard of it if ``template`` is a ``DTensor`` (sliced locally, no communication)."""
    if not isinstance(template, DTensor):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, template.device_mesh, template.placements, src_data_rank=None)


def place_state(model_state: Any, params: Any) -> Any:
    """A family's train state laid out for the step: each leaf shaped like a param it
    mirrors (ALBEF's momentum ``momentum.image.patch.weight`` mirrors ``image.patch.weight``:
    the longest dotted suffix naming a param of the same shape) is sharded like that param
    when the param is a ``DTensor`` (FSDP); every other leaf (queues, counters) stays whole,
    the same on every rank.

    Example: ``state["model_state"] = place_state(family.init_state(cfg, p, key), adapter.tree())``.
    """
    by_name = tree.flatten(params)

    def place(name: str, leaf: torch.Tensor) -> Any:
        parts = name.split(".")
        suffixes = (".".join(parts[i:]) for i in range(1, len(parts)))
        mirror = next(
            (by_name[s] for s in suffixes if s in by_name and by_name[s].shape == leaf.shape),
            None,
        )
        return _like(leaf.detach(), mirror)

    return tree.map_with_path(place, model_state)
