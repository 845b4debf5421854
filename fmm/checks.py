"""Checks at a model's public boundary: one-line errors naming the argument, the expected and
the received.

Every family calls these first in its public functions, so a careless call fails there with
``ValueError`` (bad values, shapes) or ``TypeError`` (wrong types, dtypes) whose message
starts with the argument's name, instead of deep inside torch or, worse, not at all.

Two kinds of check, and why each stays cheap and transform-safe:

- **static** (dtype, rank, sizes, the param tree's shapes): they read only metadata, so under
  ``torch.compile`` they run once at trace time and add no op to the graph (the shapes they
  read are guarded by dynamo anyway); under ``vmap`` they see the per-example shapes.
- **value** (ids in ``[0, vocab)``, 0/1 masks): they need the data, one host sync. They are
  skipped while compiling (a sync would break the graph) and on the ``meta`` device (no data);
  under ``vmap``/``grad`` they look through functorch's wrappers at the whole underlying
  tensor, so an out-of-range id in any example is still reported.

A shape is given as a sequence of dims: an ``int`` is an exact size, a ``str`` names a free
size that must be at least 1 (``"batch"``), a ``range`` bounds it (``range(1, 17)``, shown as
``1..16``).

Example::

    checks.check_float("images", images, ("batch", 3, 224, 224), like=patch_weight)
    checks.check_ids("tokens", tokens, ("batch", range(1, 78)), high=49408)
    checks.check_params(params, init=clip.init, cfg=cfg)
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from fmm import random, tree

__all__ = [
    "check_float",
    "check_ids",
    "check_int",
    "check_keys",
    "check_mask",
    "check_params",
    "check_same_batch",
    "check_shape",
    "check_type",
    "param_shapes",
]

Dim = int | str | range
_MISSING = object()
_INT_DTYPES = (torch.int64, torch.int32)
_MAX_LISTED = 3  # mismatched param names shown in one message


def _dims_text(dims: Sequence[Dim]) -> str:
    parts = []
    for d in dims:
        if isinstance(d, range):
            parts.append(f"{d.start}..{d.stop - 1}")
        else:
            parts.append(str(d))
    return "[" + ", ".join(parts) + "]"


def _fits(size: int, dim: Dim) -> bool:
    if isinstance(dim, str):
        return size >= 1
    if isinstance(dim, range):
        return dim.start <= size < dim.stop
    return size == dim


def check_type(name: str, value: Any, types: type | tuple[type, ...]) -> None:
    """``TypeError`` unless ``isinstance(value, types)``: ``cfg must be a CLIPConfig, got ...``."""
    if not isinstance(value, types):
        want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise TypeError(f"{name} must be a {want}, got {type(value).__name__}")


def _check_tensor(name: str, x: Any, what: str, dims: Sequence[Dim]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be {what} {_dims_text(dims)}, got {type(x).__name__}")


def check_shape(
    name: str, x: torch.Tensor, dims: Sequence[Dim], *, hint: str = "", of: str = ""
) -> None:
    """``ValueError`` unless ``x``'s shape fits ``dims`` (rank and every size).

    ``hint`` (e.g. ``"context_length=16"``) is added to the message in parentheses; ``of``
    names the argument whose shape ``dims`` is (``"input_ids"``).
    Example: ``check_shape("codes", codes, ("batch", 8, 8))``.
    """
    if x.ndim != len(dims) or not all(_fits(s, d) for s, d in zip(x.shape, dims)):
        note = f" ({hint})" if hint else ""
        whose = f"the shape of {of} " if of else "shape "
        empty = " (empty)" if x.ndim == len(dims) and 0 in x.shape else ""
        raise ValueError(
            f"{name} must have {whose}{_dims_text(dims)}{note}, got {list(x.shape)}{empty}"
        )


def check_float(
    name: str,
    x: Any,
    dims: Sequence[Dim],
    *,
    like: Any = None,
    hint: str = "",
) -> None:
    """A floating-point tensor of shape ``dims``; with ``like`` (a param leaf), of its dtype.

    The dtype must match because torch's kernels refuse mixed inputs deep inside a layer;
    under ``torch.autocast`` it need not (autocast casts both sides).
    Example: ``check_float("images", images, ("batch", 3, 32, 32), like=patch["weight"])``.
    """
    _check_tensor(name, x, "a floating-point tensor", dims)
    check_shape(name, x, dims, hint=hint)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor {_dims_text(dims)}, got {x.dtype}")
    want = getattr(like, "dtype", None)
    if want is not None and x.dtype != want and not _autocasting(x):
        raise TypeError(
            f"{name} has dtype {x.dtype} but the params are {want}: pass {name}.to({want})"
        )


def _autocasting(x: torch.Tensor) -> bool:
    return not x.is_meta and torch.is_autocast_enabled(x.device.type)


def check_int(name: str, x: Any, dims: Sequence[Dim], *, hint: str = "", of: str = "") -> None:
    """An int64 (or int32) tensor of shape ``dims`` (what ``F.embedding`` accepts)."""
    _check_tensor(name, x, "an integer tensor (int64 or int32)", dims)
    check_shape(name, x, dims, hint=hint, of=of)
    if x.dtype not in _INT_DTYPES:
        raise TypeError(
            f"{name} must be an integer tensor (int64 or int32) {_dims_text(dims)}, got {x.dtype}"
        )


def _has_values(x: torch.Tensor) -> bool:
    """Whether a value check can read ``x`` here: not while compiling, not on ``meta``."""
    if torch.compiler.is_compiling() or x.numel() == 0:
        return False
    return not x.is_meta and not isinstance(x, torch._subclasses.FakeTensor)


def _unwrapped(x: torch.Tensor) -> torch.Tensor:
    # Under vmap a tensor is a BatchedTensor (``.item()`` is refused) and under grad a
    # wrapper; the plain tensor beneath holds every example's values, so checking it
    # reports a bad value in any example rather than skipping the check.
    while torch._C._functorch.is_functorch_wrapped_tensor(x):
        x = torch._C._functorch.get_unwrapped(x)
    return x


def _value_range(x: torch.Tensor) -> tuple[int, int] | None:
    if not _has_values(x):
        return None
    x = _unwrapped(x)
    lo, hi = torch.aminmax(x)
    if x.is_cpu:  # two reads cost nothing on the host; elsewhere one transfer, one sync
        return lo.item(), hi.item()
    lo, hi = torch.stack((lo, hi)).tolist()
    return lo, hi


def check_ids(
    name: str,
    x: Any,
    dims: Sequence[Dim],
    *,
    high: int,
    hint: str = "",
    of: str = "",
    low: int = 0,
) -> None:
    """Integer ids of shape ``dims`` with every value in ``[low, high)`` (the range check is
    eager only; see the module docstring).

    Example: ``check_ids("input_ids", ids, ("batch", range(1, 513)), high=cfg.vocab_size)``.
    """
    check_int(name, x, dims, hint=hint, of=of)
    found = _value_range(x)
    if found is not None and (found[0] < low or found[1] >= high):
        raise ValueError(
            f"{name} must lie in [{low}, {high}), got values in [{found[0]}, {found[1]}]"
        )


def check_mask(name: str, x: Any, shape: Sequence[Dim], *, of: str = "") -> None:
    """A boolean mask (True = keep) of ``shape`` (``of``: the argument it must match); an
    integer mask of 0/1 is accepted too (what tokenizers return). A float mask is refused: it
    is usually an additive ``0 / -inf`` mask, which would read as all True."""
    _check_tensor(name, x, "a bool tensor", shape)
    check_shape(name, x, shape, of=of)
    if x.dtype == torch.bool:
        return
    if x.is_floating_point() or x.is_complex():
        raise TypeError(
            f"{name} must be a bool (or 0/1 integer) tensor {_dims_text(shape)}, got {x.dtype}"
        )
    found = _value_range(x)
    if found is not None and (found[0] < 0 or found[1] > 1):
        raise ValueError(
            f"{name} must hold only 0 and 1 (or be bool), got values in [{found[0]}, {found[1]}]"
        )


def check_keys(mapping: Any, keys: Sequence[str], *, name: str = "batch") -> None:
    """``mapping`` (argument ``name``) is a dict holding every one of ``keys``, e.g. the
    fields a loss reads from its batch.

    Example: ``check_keys(batch, ("images", "tokens"))``.
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{name} must be a dict with {list(keys)}, got {type(mapping).__name__}")
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ValueError(
            f"{name} lacks {missing}: it must hold {list(keys)}, got {sorted(mapping)}"
        )


def check_same_batch(*named: tuple[str, torch.Tensor]) -> None:
    """``ValueError`` unless every ``(name, tensor)`` has the first one's leading size.

    Example: ``check_same_batch(("images", images), ("tokens", tokens))``.
    """
    first_name, first = named[0]
    for name, x in named[1:]:
        if x.shape[0] != first.shape[0]:
            raise ValueError(
                f"{name} and {first_name} must have the same batch size, got {first_name} "
                f"{list(first.shape)} and {name} {list(x.shape)}"
            )


# ----------------------------------------------------------------------------- params


def _layout(node: Any) -> tuple:
    # The tree's names and shapes as nested tuples: ("dict", ((key, sub), ...)),
    # ("list", (sub, ...)) or ("leaf", shape). Tuples, not dicts: dynamo keeps a tuple
    # returned at trace time as a plain constant, while a dict would want guards of its own.
    if isinstance(node, Mapping):
        return ("dict", tuple((k, _layout(v)) for k, v in node.items()))
    if isinstance(node, (list, tuple)):
        return ("list", tuple(_layout(v) for v in node))
    return ("leaf", tuple(node.shape))


@functools.lru_cache(maxsize=256)  # bounded: a sweep over many configs stays small
def _expected(init: Callable[..., Any], cfg: Hashable) -> tuple[Any, dict[str, tuple[int, ...]]]:
    # The first check of a config may run inside grad/vmap or under a dispatch mode (a FLOP
    # counter, a fake mode): build the expected shapes outside all of them.
    with torch._C._DisableFuncTorch(), _disable_current_modes(), torch.no_grad():
        params = init(cfg, random.key(0).to("meta"))
    return _layout(params), {k: tuple(v.shape) for k, v in tree.flatten(params).items()}


@torch.compiler.assume_constant_result
def _expected_tree(init: Callable[..., Any], cfg: Hashable) -> Any:
    # Dynamo calls this at trace time and keeps the result as a constant; it would trace
    # through an lru_cache (running init on meta tensors inside the graph) otherwise.
    return _expected(init, cfg)[0]


def param_shapes(init: Callable[..., Any], cfg: Hashable) -> dict[str, tuple[int, ...]]:
    """``{dotted name: shape}`` of ``init(cfg, key)``, built once per config on the ``meta``
    device (configs are frozen, hashable dataclasses).

    Example: ``param_shapes(models.clip.init, clip_tiny())["text.token.weight"] == (64, 128)``.
    """
    return dict(_expected(init, cfg)[1])


def _fits_tree(got: Any, want: tuple) -> bool:
    # Explicit loops and a tensor fast path: this runs on every eager call of a model.
    kind, body = want
    if kind == "leaf":
        if isinstance(got, torch.Tensor):
            return got.shape == body
        if isinstance(got, (Mapping, list, tuple)):
            return False
        shape = getattr(got, "shape", None)  # tensor-like leaves (fmm.quant.QuantizedWeight)
        return shape is not None and tuple(shape) == body
    if kind == "dict":
        if not (type(got) is dict or isinstance(got, Mapping)) or len(got) != len(body):
            return False
        for k, sub in body:
            child = got.get(k, _MISSING)
            if child is _MISSING or not _fits_tree(child, sub):
                return False
        return True
    if not isinstance(got, (list, tuple)) or len(got) != len(body):
        return False
    for g, sub in zip(got, body):  # noqa: SIM110
        if not _fits_tree(g, sub):
            return False
    return True


def _fits_parts(params: Mapping, parts: dict[str, tuple], only: Sequence[str]) -> bool:
    for k in only:  # noqa: SIM110
        if k not in params or not _fits_tree(params[k], parts[k]):
            return False
    return True


def _shapes_of(params: Any, prefix: str) -> dict[str, tuple[int, ...]] | str:
    try:
        flat = tree.flatten(params)
    except (ValueError, TypeError) as e:
        return str(e)
    out = {}
    for name, leaf in flat.items():
        shape = getattr(leaf, "shape", None)
        key = f"{prefix}.{name}" if prefix else name
        if shape is None:
            return f"{key} is a {type(leaf).__name__}, not a tensor"
        out[key] = tuple(shape)
    return out


def _preset_name(cfg: Any) -> str | None:
    # A preset is a function of the config's own module that builds an equal config with no
    # arguments (``clip_tiny``); only looked up to word an error, never on the happy path.
    module = sys.modules.get(type(cfg).__module__)
    for attr, fn in sorted(vars(module).items()) if module else ():
        if attr.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != module.__name__:
            continue
        sig = inspect.signature(fn)
        if any(p.default is p.empty for p in sig.parameters.values()):
            continue
        try:
            if fn() == cfg:
                return attr
        except Exception:  # a function that is not a builder: not this config's preset
            continue
    return None


def _config_text(cfg: Any) -> str:
    preset = _preset_name(cfg)
    kind = type(cfg).__name__
    return f"{preset} ({kind})" if preset else f"the given {kind} (no preset: {cfg!r})"


def _mismatch_text(got: Mapping, want: Mapping) -> tuple[str, int]:
    # Shape mismatches first: with another preset's params they are the whole story.
    problems = [
        f"{k} is {list(got[k])}, expected {list(want[k])}"
        for k in want
        if k in got and got[k] != want[k]
    ]
    problems += [f"{k} is missing" for k in want if k not in got]
    problems += [f"{k} is unexpected" for k in got if k not in want]
    shown = "; ".join(problems[:_MAX_LISTED])
    more = len(problems) - _MAX_LISTED
    return (shown + (f"; and {more} more" if more > 0 else "")), len(problems)


def check_params(
    params: Any,
    *,
    init: Callable[..., Any],
    cfg: Hashable,
    only: Sequence[str] | None = None,
    at: str | None = None,
    name: str = "params",
) -> None:
    """``ValueError`` unless ``params`` has the names and shapes of ``init(cfg, key)`` (dtypes
    and tensor kinds are free: cast, quantized, sharded and meta params all pass).

    ``only``: the top-level parts a function reads; the others are not looked at (so a
    momentum tree holding just the encoders passes an encoder's check). ``at``: ``params``
    is the subtree at this top-level key (FLAVA's encoders take ``params["image"]``). The
    message lists the first few mismatched full dotted names with both shapes and says which
    preset (or config) was expected.

    Example: ``check_params(params, init=models.clip.init, cfg=clip_tiny(), only=("text",))``.
    """
    layout = _expected_tree(init, cfg)
    parts = dict(layout[1])
    if at is not None:
        if _fits_tree(params, parts[at]):
            return
    elif only is not None:
        if isinstance(params, Mapping) and _fits_parts(params, parts, only):
            return
    elif _fits_tree(params, layout):
        return
    _raise_mismatch(params, init, cfg, only, at, name)


def _raise_mismatch(params, init, cfg, only, at, name) -> None:
    if not isinstance(params, Mapping):
        raise TypeError(f"{name} must be a param tree (a dict, as init returns), got "
                        f"{type(params).__name__}")  # fmt: skip
    expected = _config_text(cfg)
    want = param_shapes(init, cfg)
    if at is not None:
        expected = f"the {at!r} part of {expected}"
        got = _shapes_of(params, at)
        want = {k: v for k, v in want.items() if k.split(".", 1)[0] == at}
    elif only is not None:
        if any(k not in params for k in only):
            raise ValueError(f"{name} must hold {list(only)} of {expected}, got {sorted(params)}")
        got = _shapes_of({k: params[k] for k in only}, "")
        want = {k: v for k, v in want.items() if k.split(".", 1)[0] in only}
    else:
        got = _shapes_of(params, "")
    if isinstance(got, str):
        raise ValueError(f"{name} do not fit {expected}: {got}")
    text, count = _mismatch_text(got, want)
    raise ValueError(
        f"{name} do not fit {expected}: {count} differences over {len(want)} expected names: {text}"
    )
