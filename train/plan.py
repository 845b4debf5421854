"""Memory planning for training sizes this machine cannot hold.

:func:`plan` builds a model's params with its family's real ``init`` on the ``meta`` device
(shapes only, no memory), then estimates per-rank memory for params, gradients and AdamW
state under DDP (replicated) and FSDP (sharded over ``world_size`` ranks), and activation
memory with and without per-block activation checkpointing.

Example::

    from train import plan
    p = plan.plan("clip_vit_l14", world_sizes=(1, 8), batch=32, precision="bf16-mixed")
    print(plan.format_plan(p))

The memory model (every figure is bytes per rank; ``P`` params, ``N`` ranks):

- **Precision** ``fp32``: params, grads and compute in float32 (4 + 4 bytes per param).
  ``bf16-mixed``: float32 master params, a bfloat16 compute copy of the params, float32
  grads (FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``; no
  autocast), so activations are bfloat16 (2 bytes) except LayerNorm statistics, attention
  log-sum-exp and the cross-entropy log-probabilities of GPT, which stay float32.
- **AdamW** keeps two float32 moments per param: 8 bytes per param.
- **DDP**: every rank holds everything; gradients are the bucket views
  (``gradient_as_bucket_view=True``), so no second gradient copy.
- **FSDP** (one unit per transformer block plus a root unit for everything else): master
  params, grads and AdamW state are sharded, ``/N`` each. On top, per rank: the root unit's
  params unsharded for the whole step (FSDP2 keeps the root gathered from forward to
  backward), two block units unsharded at a time (the running one and the prefetched next,
  in the compute dtype), and the unsharded gradient of one block before its reduce-scatter.
- **Activations**: the tensors autograd saves for backward, per rank for ``batch`` examples
  per rank. Per pre- or post-norm block of width ``D``, MLP width ``F``, ``H`` heads over
  ``S`` tokens: ``8 S D`` (block input, normed inputs, q/k/v, attention output, mid
  residual) plus ``a S F`` (``a`` = 2 for gelu/silu, 3 for quick_gelu, 1 for relu) values in
  the compute dtype, plus ``S (4 + H)`` float32 norm statistics and log-sum-exps, assuming a
  fused SDPA kernel that keeps no ``[S, S]`` scores. ``attn_impl="math"`` or attention
  dropout keeps ``H S^2`` attention weights (plus a bool mask and a second copy with
  dropout); residual dropout keeps a bool mask per dropped tensor. Cross-attention blocks
  add their own norm, query, output and the context's keys/values. Outside the blocks:
  embedding and final-norm inputs, pixels, token ids and the output logits.
  **With checkpointing** only each block's input is kept, and the peak adds one block's
  activations recomputed during its backward.
- **Not counted**: transient buffers (attention and matmul workspaces, the gradients of
  activations flowing through backward, communication buckets), the CUDA context and
  allocator fragmentation. Leave 10-20 % headroom.

:func:`saved_activation_bytes` measures what the estimate models (the bytes of the distinct
tensors autograd saves during a forward); the tests hold the estimate to it on small
configs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

import models
from fmm import tree
from models.family import ACT_SAVED, Layout, Stack

__all__ = [
    "PRECISIONS", "STRATEGIES", "Layout", "Plan", "Precision", "Row", "Stack",
    "activation_bytes", "block_activation_bytes", "block_counts", "format_plan", "layout",
    "model_names", "plan", "saved_activation_bytes", "state_bytes",
]  # fmt: skip

GiB = 1024**3


def model_names() -> list[str]:
    """Every preset :func:`layout` accepts: those whose family declares a ``plan``."""
    return sorted(name for name, build in models.REGISTRY.items() if models.family_of(build()).plan)


def layout(name: str, *, seq: int | None = None, train: bool = True) -> Layout:
    """The :class:`~models.family.Layout` of preset ``name``, from its family's ``plan``
    (params built by the family's ``init`` on the meta device).

    ``seq``: tokens per example (the text tokens for CLIP/FLAVA), default the model's
    context. ``train``: count dropout masks (the activations of a training step).

    Example: ``layout("gpt2_small", seq=512).stacks[0].seq == 512``.
    """
    if name not in models.REGISTRY:
        raise ValueError(f"--model: unknown model {name!r}; choose one of {model_names()}")
    cfg = models.get_config(name)
    family = models.family_of(cfg)
    if family.plan is None:
        raise ValueError(
            f"--model: {name!r} is of the {family.name} family, for which the planner has no layout; "
            f"choose one of {model_names()}"
        )
    return replace(family.plan(cfg, seq=seq, train=train), name=name)


STRATEGIES = ("DDP", "FSDP")
_BLOCK_RE = re.compile(r"^(.*\bblocks\.\d+)\.")


@dataclass(frozen=True)
class Precision:
    """Bytes per param of each copy, and per activation value in the compute dtype."""

    name: str
    compute: int  # a param's compute copy and an activation value
    master: int  # the optimizer's copy of a param (0: the compute copy is the master)
    grad: int
    optimizer: int = 8  # AdamW: two float32 moments


PRECISIONS = {
    "fp32": Precision("fp32", compute=4, master=0, grad=4),
    "bf16-mixed": Precision("bf16-mixed", compute=2, master=4, grad=4),
}


def block_activation_bytes(stack: Stack, precision: Precision) -> int:
    """Bytes one block of ``stack`` saves for backward, per example (see the module
    docstring for the model). ``stack.cfg``'s dropout rates count as a training step."""
    c, cfg, s = precision.compute, stack.cfg, stack.seq
    d, h, f = cfg.width, cfg.heads, cfg.hidden
    total = c * s * (8 * d + ACT_SAVED[cfg.act] * f) + 4 * s * (4 + h)
    if cfg.dropout > 0:
        total += 2 * s * d  # bool masks of the two residual dropouts
    t = stack.context
    if cfg.cross_dim is not None:
        total += c * (4 * s * d + 2 * t * d) + 4 * s * (2 + h)
        if cfg.dropout > 0:
            total += s * d
    if cfg.attn_impl == "math" or cfg.attn_dropout > 0:
        per_score = c + (c + 1 if cfg.attn_dropout > 0 else 0)
        pairs = s * s + (s * t if cfg.cross_dim is not None else 0)
        heads_with_lse = 2 if cfg.cross_dim is not None else 1
        total += h * (per_score * pairs - 4 * s * heads_with_lse)
    return total


def activation_bytes(
    lay: Layout, *, batch: int, precision: Precision, checkpoint: bool = False
) -> int:
    """Activation bytes of ``batch`` examples: every block's saved tensors plus the edges, or
    with ``checkpoint`` each block's input plus one block recomputed plus the edges."""
    edges = sum(n * (precision.compute if b is None else b) for n, b in lay.edges)
    if not checkpoint:
        blocks = sum(s.cfg.layers * block_activation_bytes(s, precision) for s in lay.stacks)
    else:
        inputs = sum(s.cfg.layers * s.seq * s.cfg.width * precision.compute for s in lay.stacks)
        recompute = max(
            (block_activation_bytes(s, precision) for s in lay.stacks if s.cfg.layers), default=0
        )
        blocks = inputs + recompute
    return batch * (blocks + edges)


def block_counts(params: Any) -> tuple[int, int]:
    """``(largest block's param count, params outside every block)`` of a param tree, a block
    being a subtree named ``...blocks.<i>`` (one FSDP unit each)."""
    per_block: dict[str, int] = {}
    outside = 0
    for name, leaf in tree.flatten(params).items():
        m = _BLOCK_RE.match(name)
        if m:
            per_block[m.group(1)] = per_block.get(m.group(1), 0) + leaf.numel()
        else:
            outside += leaf.numel()
    return max(per_block.values(), default=0), outside


@dataclass(frozen=True)
class Row:
    """Per-rank bytes of one ``(strategy, world_size)``."""

    strategy: str
    world_size: int
    params: int
    grads: int
    optimizer: int
    activations: int
    activations_ckpt: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    @property
    def total_ckpt(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations_ckpt


@dataclass(frozen=True)
class Plan:
    """A model's counts and one :class:`Row` per strategy and world size."""

    model: str
    num_params: int
    largest_block: int
    outside_blocks: int
    precision: Precision
    batch: int
    stacks: tuple[Stack, ...]
    rows: tuple[Row, ...] = field(default_factory=tuple)
    note: str = ""


def state_bytes(
    num_params: int, largest_block: int, outside: int, *, strategy: str, world_size: int,
    precision: Precision,
) -> tuple[int, int, int]:  # fmt: skip
    """``(params, grads, optimizer)`` bytes per rank under ``strategy`` ("DDP" or "FSDP")."""
    p, n = num_params, world_size
    if strategy == "DDP":
        return (
            p * (precision.compute + precision.master),
            p * precision.grad,
            p * precision.optimizer,
        )
    if strategy != "FSDP":
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    shard = math.ceil(p / n)
    # A sharded fp32 run has no separate master: the shard is the master, in 4 bytes.
    master = precision.master or precision.compute
    gathered = (outside + 2 * largest_block) * precision.compute
    # Counted on every world size: one-rank FSDP is a degenerate case nobody should run.
    params = shard * master + gathered
    grads = shard * precision.grad + largest_block * precision.compute
    return params, grads, shard * precision.optimizer


def plan(
    name: str,
    *,
    world_sizes: Sequence[int] = (1, 8),
    batch: int = 8,
    seq: int | None = None,
    precision: str = "bf16-mixed",
) -> Plan:
    """Per-rank memory of training ``name`` on each world size, DDP and FSDP.

    ``batch``: examples per rank; ``seq``: tokens per example (default: the model's
    context); ``precision``: ``"fp32"`` or ``"bf16-mixed"``.

    Example: ``plan("gpt2_medium", world_sizes=(8,), batch=4).rows[1].total / 2**30``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    sizes = list(world_sizes)
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"--world-size must be integers >= 1, got {sizes}")
    prec = PRECISIONS[precision]
    lay = layout(name, seq=seq)
    count = tree.count(lay.params)
    largest, outside = block_counts(lay.params)
    act = activation_bytes(lay, batch=batch, precision=prec)
    act_ckpt = activation_bytes(lay, batch=batch, precision=prec, checkpoint=True)
    rows = []
    for n in sizes:
        for strategy in STRATEGIES:
            state = state_bytes(
                count, largest, outside, strategy=strategy, world_size=n, precision=prec
            )
            rows.append(Row(strategy, n, *state, act, act_ckpt))
    return Plan(name, count, largest, outside, prec, batch, lay.stacks, tuple(rows), lay.note)


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def format_plan(p: Plan) -> str:
    """A readable table of ``p`` in GiB per rank, with the assumptions as a footer."""
    stacks = ", ".join(
        f"{s.name} {s.cfg.layers} x {s.cfg.width} wide over {s.seq} tokens" for s in p.stacks
    )
    head = [
        f"{p.model}: {_human(p.num_params)} params ({p.num_params:,}); largest block "
        f"{_human(p.largest_block)}, outside blocks {_human(p.outside_blocks)}",
        f"stacks: {stacks}",
        f"precision {p.precision.name}, AdamW, batch {p.batch} per rank; GiB per rank",
        "",
    ]
    cols = ("strategy", "ranks", "params", "grads", "adamw", "activ", "activ ckpt", "total",
            "total ckpt")  # fmt: skip
    lines = ["  ".join(f"{c:>10}" for c in cols)]
    for r in p.rows:
        vals = (r.params, r.grads, r.optimizer, r.activations, r.activations_ckpt, r.total,
                r.total_ckpt)  # fmt: skip
        lines.append(
            f"{r.strategy:>10}  {r.world_size:>10}  " + "  ".join(f"{v / GiB:>10.2f}" for v in vals)
        )
    foot = [
        "",
        f"assumptions: {p.precision.name} = "
        + (
            "fp32 params, grads, activations"
            if p.precision.name == "fp32"
            else "fp32 master params + bf16 compute copy, fp32 grads, bf16 activations"
        )
        + "; AdamW 2 x fp32 moments;",
        "  DDP replicates all (grads as bucket views); FSDP shards params/grads/AdamW by ranks, "
        "plus the root unit and 2 blocks gathered, and 1 block's unsharded grads;",
        "  activations = tensors saved for backward, fused SDPA (no [S, S] scores); ckpt = "
        "per-block checkpointing: block inputs + 1 block recomputed;",
        "  not counted: workspaces, activation grads in flight, comm buckets, CUDA context, "
        "fragmentation (leave 10-20% headroom).",
    ]
    if p.note:
        foot.append("  " + p.note)
    return "\n".join(head + lines + foot)


def saved_activation_bytes(fn: Callable[[Any], Any], params: Any) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn(params)`` runs,
    params themselves excluded (a tensor sharing a param's storage is a param).

    Storage is counted once however many ops save it, and whole: a saved view keeps its
    whole base alive. This is what :func:`activation_bytes` estimates.

    Example: ``saved_activation_bytes(lambda p: gpt.loss(p, tokens, cfg=cfg), params)``.
    """
    params = tree.map(lambda t: t.detach().requires_grad_(t.is_floating_point()), params)
    own = {t.untyped_storage().data_ptr() for t in tree.leaves(params)}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in own:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(params)
    return sum(seen.values())
