"""The family contract: one record per model family that says everything the machinery needs.

A family package (``models/<name>/``) exports ``FAMILY = Family(...)``; ``models.REGISTRY``
and ``models.family_of`` are built by iterating over the families, and the training loop,
the adapter (FSDP2, activation checkpointing), the memory planner, the server and the
contract tests read nothing else. Adding a family is one package plus one line in
``models/__init__.py`` (see ``docs/adding_a_family.md``).

What a family must give:

- ``presets``: zero-argument config builders by name (``{"clip_tiny": clip_tiny, ...}``).
- ``init(cfg, key, *, dtype=torch.float32) -> params``: pure in ``(cfg, key)``; a key on the
  ``meta`` device gives shapes only.
- ``loss(params, batch, *, cfg, key, train, block_fn=None, **extras) -> (loss [], metrics)``:
  the training objective. ``metrics`` is a dict of detached 0-d tensors. Every transformer
  stack the loss runs goes through ``block_fn`` (``fmm.nn.transformer``'s seam), so
  ``fmm.adapter.ModelAdapter`` can shard and checkpoint each block. ``extras`` are only
  those the family names in ``loss_extras``: ``gather`` (a cross-rank gather with
  gradients, for contrastive terms; ``fmm.losses.local_gather`` on one process) and
  ``state`` (the family's train state, see below).
- ``batch(cfg, **options) -> {field: Field}``: the batch fields ``loss`` reads, with dtypes and
  shapes, so a data source is checked against them before step 1 (:func:`check_batch`).

What a family may give:

- ``init_state(cfg, params, key) -> state`` and ``update_state(state, params, aux, *, cfg,
  key) -> (params, state)``: train state that is not trained by gradients (ALBEF's momentum
  encoders and queues, a VQ-VAE's EMA codebook). The loop passes ``state=`` to ``loss``,
  takes ``metrics.pop("aux")`` (what the loss computed for the update, e.g. momentum
  features), and after the optimizer step calls ``update_state`` with the new params. Both
  are pure: they return new trees.
- ``decoder_spec(cfg) -> fmm.decoding.DecoderSpec``: cached decoding (prefill/decode_step).
- ``converters``: ``{"torchmultimodal": Converter(from_=..., to=...), "hf": ..., ...}``, one
  name per reference layout everywhere (``from_torchmultimodal``/``to_torchmultimodal`` ...).
- ``plan(cfg, *, seq, train) -> Layout``: what ``train.plan`` needs for memory planning.
- ``serving``: :class:`Serving`, the functions a server exposes (embeddings, zero-shot scale).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from fmm.nn import TransformerConfig

__all__ = [
    "ACT_SAVED",
    "Converter",
    "Family",
    "Field",
    "Layout",
    "Serving",
    "Stack",
    "check_batch",
    "plan_seq",
    "without_dropout",
]

DTYPES = ("float", "int", "bool")


@dataclass(frozen=True)
class Field:
    """One batch field: ``dtype`` is ``"float"``, ``"int"`` (int64 ids or labels) or
    ``"bool"``; ``shape`` entries are ints or names (``"batch"`` is shared by every field,
    other names must agree between fields, e.g. ``"seq"``); ``limits``: the largest size a
    name may take (``{"seq": 77}``); ``high``: ids lie in ``[low, high)`` when given;
    ``optional``: the loss has a default when it is absent.

    Example: ``Field("int", ("batch", "seq"), limits={"seq": 77}, high=64, doc="token ids")``.
    """

    dtype: str
    shape: tuple[int | str, ...]
    doc: str = ""
    high: int | None = None
    low: int = 0
    optional: bool = False
    limits: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"Field: dtype must be one of {DTYPES}, got {self.dtype!r}")

    def describe(self) -> str:
        """``int64 [batch, seq] in [0, 64)``, as error messages and ``--help`` show it."""
        kind = {"float": "float", "int": "int64", "bool": "bool"}[self.dtype]
        dims = [f"{d} <= {self.limits[d]}" if d in self.limits else str(d) for d in self.shape]
        text = f"{kind} [{', '.join(dims)}]"
        return text + (f" in [{self.low}, {self.high})" if self.high is not None else "")


@dataclass(frozen=True)
class Converter:
    """A pair of pure state-dict converters: ``from_(state_dict, cfg) -> params`` and
    ``to(params, cfg) -> state_dict`` (the reference implementation's names and layouts)."""

    from_: Callable[..., Any]
    to: Callable[..., Any] | None = None


@dataclass(frozen=True)
class Stack:
    """One transformer stack as the memory planner sees it: ``seq`` tokens per example
    through ``cfg.layers`` blocks; ``context`` tokens per example cross-attended (0: none)."""

    name: str
    cfg: TransformerConfig
    seq: int
    context: int = 0


@dataclass(frozen=True)
class Layout:
    """What the memory planner needs of a model: its param tree (on ``meta``), its stacks,
    and the activation values per example outside the blocks as ``(count, bytes each)``
    pairs (``bytes`` None: the compute dtype)."""

    name: str
    params: Any
    stacks: tuple[Stack, ...]
    edges: tuple[tuple[int, int | None], ...] = ()
    note: str = ""


def plan_seq(seq: int | None, limit: int, what: str) -> int:
    """The tokens per example a ``plan`` lays out: ``seq`` (the ``--seq`` flag) checked
    against the model's ``limit``, or ``limit`` itself when ``seq`` is None; ``what`` says
    what the tokens are in the error.

    Example: ``plan_seq(None, cfg.context_length, "text tokens") == cfg.context_length``.
    """
    if seq is None:
        return limit
    if not 1 <= seq <= limit:
        raise ValueError(f"--seq must be in [1, {limit}] ({what}), got {seq}")
    return seq


# Values each activation keeps for backward besides its input (a plan's head edges count
# them): quick_gelu keeps its sigmoid too; relu keeps only its output, which the next
# layer saves anyway.
ACT_SAVED = {"gelu": 2, "gelu_tanh": 2, "silu": 2, "quick_gelu": 3, "relu": 1}


def without_dropout(cfg: TransformerConfig) -> TransformerConfig:
    """``cfg`` with both dropouts off: the stack a ``plan(..., train=False)`` lays out, since
    an evaluation step keeps no dropout masks."""
    return replace(cfg, dropout=0.0, attn_dropout=0.0)


@dataclass(frozen=True)
class Serving:
    """What a server can expose of a trained model of this family.

    ``embed_text(params, tokens [B, T], *, cfg) -> [B, E]`` and ``embed_image(params, images
    [B, C, H, W], *, cfg) -> [B, E]``: unit-norm embeddings; ``logit_scale(params) -> []``:
    zero-shot logits are ``scale * image @ text.T``; ``image_shape(cfg) -> (C, H, W)``.
    """

    embed_text: Callable[..., torch.Tensor] | None = None
    embed_image: Callable[..., torch.Tensor] | None = None
    logit_scale: Callable[[Any], torch.Tensor] | None = None
    image_shape: Callable[[Any], tuple[int, int, int]] | None = None


LOSS_EXTRAS = ("gather", "state")


@dataclass(frozen=True, kw_only=True)
class Family:
    """A model family's contract (see the module docstring for each field's meaning).

    Example::

        FAMILY = Family(name="gpt", config=GPTConfig, presets=PRESETS, init=init,
                        loss=loss, batch=batch_fields, decoder_spec=decoder_spec)
    """

    name: str
    config: type
    presets: Mapping[str, Callable[[], Any]]
    init: Callable[..., Any]
    loss: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    batch: Callable[..., Mapping[str, Field]]
    loss_extras: tuple[str, ...] = ()
    init_state: Callable[..., Any] | None = None
    update_state: Callable[..., Any] | None = None
    decoder_spec: Callable[[Any], Any] | None = None
    converters: Mapping[str, Converter] = field(default_factory=dict)
    plan: Callable[..., Layout] | None = None
    serving: Serving | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.loss_extras) - set(LOSS_EXTRAS))
        if unknown:
            raise ValueError(f"Family {self.name!r}: unknown loss_extras {unknown}")
        if ("state" in self.loss_extras) != (self.init_state is not None):
            raise ValueError(
                f"Family {self.name!r}: a loss that takes state= needs init_state, and "
                "init_state needs 'state' in loss_extras"
            )
        if (self.init_state is None) != (self.update_state is None):
            raise ValueError(f"Family {self.name!r}: init_state and update_state go together")
        for name, build in self.presets.items():
            if not callable(build):
                raise TypeError(f"Family {self.name!r}: preset {name!r} is not callable")


def check_batch(fields: Mapping[str, Field], batch: Mapping[str, Any], *, where: str) -> None:
    """Check ``batch`` against a family's ``fields`` (keys, dtypes, ranks, named sizes
    agreeing between fields, id ranges); one ``ValueError``/``TypeError`` naming the first
    bad field, the expected and the received. ``where`` names the data source.

    Example: ``check_batch(FAMILY.batch(cfg), next(iter(source)), where="--data shapes")``.
    """
    missing = [k for k, f in fields.items() if not f.optional and k not in batch]
    if missing:
        raise ValueError(
            f"{where}: batch lacks {missing}; the loss reads "
            + ", ".join(f"{k}: {f.describe()}" for k, f in fields.items())
        )
    sizes: dict[str, tuple[int, str]] = {}
    for name, spec in fields.items():
        if name not in batch:
            continue
        value = batch[name]
        label = f"{where}: batch[{name!r}]"
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{label} must be a tensor {spec.describe()}, got {type(value).__name__}"
            )
        ok = {
            "float": value.is_floating_point(),
            "int": value.dtype in (torch.int64, torch.int32),
            "bool": value.dtype == torch.bool,
        }[spec.dtype]
        if not ok:
            raise TypeError(f"{label} must be {spec.describe()}, got dtype {value.dtype}")
        if value.ndim != len(spec.shape):
            raise ValueError(f"{label} must be {spec.describe()}, got shape {list(value.shape)}")
        for dim, (want, got) in enumerate(zip(spec.shape, value.shape)):
            if isinstance(want, int):
                if want != got:
                    raise ValueError(
                        f"{label} must be {spec.describe()}, got shape {list(value.shape)} "
                        f"(dim {dim} is {got}, expected {want})"
                    )
            elif want in spec.limits and got > spec.limits[want]:
                raise ValueError(
                    f"{label} must be {spec.describe()}, got shape {list(value.shape)} "
                    f"({want}={got} is over {spec.limits[want]})"
                )
            elif want in sizes and sizes[want][0] != got:
                seen, other = sizes[want]
                raise ValueError(
                    f"{label} has {want}={got} but {other} has {want}={seen}: "
                    f"got shape {list(value.shape)}"
                )
            else:
                sizes.setdefault(want, (got, f"batch[{name!r}]"))
        if spec.high is not None and value.numel() and value.device.type != "meta":
            low, high = int(value.min()), int(value.max())
            if low < spec.low or high >= spec.high:
                raise ValueError(
                    f"{label} must lie in [{spec.low}, {spec.high}), got values in [{low}, {high}]"
                )


def example_batch(
    fields: Mapping[str, Field], key: torch.Tensor, *, batch_size: int = 3, size: int = 5
) -> dict[str, torch.Tensor]:
    """A random batch that :func:`check_batch` accepts: floats uniform in ``[0, 1)``, ids
    uniform in ``[low, high)`` (``arange`` where unbounded: distinct example ids), bools
    True; a named size is ``min(size, its limit)``. Pure in ``key`` (``fmm.random``).

    For smoke tests and the contract tests; a loss may still need more than the shapes say
    (e.g. a text model's end-of-text token), which a family's own tests cover.

    Example: ``batch = example_batch(FAMILY.batch(cfg), fmm.random.key(0))``.
    """
    from fmm import random

    def dims(spec: Field) -> tuple[int, ...]:
        out = []
        for d in spec.shape:
            if isinstance(d, int):
                out.append(d)
            elif d == "batch":
                out.append(batch_size)
            else:
                out.append(min(size, spec.limits.get(d, size)))
        return tuple(out)

    batch = {}
    for name, spec in fields.items():
        if spec.optional:
            continue
        k, shape = random.fold_in(key, name), dims(spec)
        if spec.dtype == "float":
            batch[name] = random.uniform(k, shape)
        elif spec.dtype == "bool":
            batch[name] = torch.ones(shape, dtype=torch.bool)
        elif spec.high is None:
            n = max(1, torch.Size(shape).numel())
            batch[name] = (torch.arange(n, dtype=torch.int64) + spec.low).reshape(shape)
        else:
            u = random.uniform(k, shape, dtype=torch.float64)
            batch[name] = (spec.low + (u * (spec.high - spec.low)).floor()).to(torch.int64)
    return batch
