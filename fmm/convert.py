"""State-dict converters as key maps: one rule list serves both directions.

A converter between our param tree and a foreign ``state_dict`` is a list of :class:`Rule`:
each names one of our dotted keys, the foreign keys it is made from, and the two pure
tensor transforms between them (identity for most, a transpose or a q/k/v concatenation
for some). From the rules and the expected tree (``init`` on the meta device, so nothing is
allocated) we get, before converting a single tensor, every missing, unexpected and
mis-shaped foreign key, reported together in one :class:`ConversionError`. Nothing is
returned half-converted.

Example::

    rules = [Rule("proj.weight", ("proj",), to_ours=transpose, to_theirs=transpose)]
    params = import_state_dict(sd, rules, like=init(cfg, key("meta")), source="open_clip")
    sd2 = export_state_dict(params, rules)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fmm import tree

__all__ = [
    "ConversionError",
    "Rule",
    "affine",
    "concat",
    "export_state_dict",
    "fused",
    "identity",
    "import_state_dict",
    "mismatch_report",
    "same",
    "strip_prefix",
    "transpose",
    "unbatched",
]


class ConversionError(ValueError):
    """A state dict does not fit the expected params: the message lists every problem."""


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def transpose(x: torch.Tensor) -> torch.Tensor:
    """``[a, b] -> [b, a]`` (a projection stored as ``x @ P`` versus our ``linear``)."""
    return x.t()


@dataclass(frozen=True)
class Rule:
    """Our key ``ours`` is ``to_ours(*[sd[k] for k in theirs])``; ``to_theirs`` inverts it
    and returns one tensor per foreign key, in order."""

    ours: str
    theirs: tuple[str, ...]
    to_ours: Callable[..., torch.Tensor] = identity
    to_theirs: Callable[[torch.Tensor], Any] = field(default=identity)

    def split(self, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.to_theirs(value)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def same(ours: str, theirs: str) -> Rule:
    """A tensor stored identically on both sides under different names."""
    return Rule(ours, (theirs,))


def affine(ours: str, theirs: str, leaves: Sequence[str] = ("weight", "bias")) -> list[Rule]:
    """A layer's ``weight`` and ``bias`` (or other ``leaves``: a batch norm's running
    statistics) stored identically under two prefixes (a linear map or a norm):
    ``affine("text.norm", "text.ln_final")``."""
    return [same(f"{ours}.{leaf}", f"{theirs}.{leaf}") for leaf in leaves]


def concat(ours: str, theirs: Sequence[str]) -> Rule:
    """Our fused tensor is the foreign tensors stacked along dim 0 (e.g. q, k, v -> qkv)."""
    n = len(theirs)
    return Rule(
        ours,
        tuple(theirs),
        to_ours=lambda *xs: torch.cat(xs, dim=0),
        to_theirs=lambda x: tuple(x.chunk(n, dim=0)),
    )


def fused(ours: str, theirs: str, parts: Sequence[str]) -> list[Rule]:
    """Our fused layer's ``weight`` and ``bias`` are the foreign layers ``theirs.<part>``
    stacked along dim 0: ``fused("attn.qkv", "attention", ("query", "key", "value"))``
    (``[3*D, D]`` from three ``[D, D]``)."""
    return [
        concat(f"{ours}.{leaf}", [f"{theirs}.{p}.{leaf}" for p in parts])
        for leaf in ("weight", "bias")
    ]


def unbatched(ours: str, theirs: str, lead: int) -> Rule:
    """Theirs is ours with ``lead`` leading singleton axes, as modules keep a class token
    ``[1, 1, D]`` (``lead=2``) or positions ``[1, N, D]`` (``lead=1``) that we keep as
    ``[D]`` / ``[N, D]``."""
    return Rule(
        ours,
        (theirs,),
        to_ours=lambda x: x.reshape(x.shape[lead:]),
        to_theirs=lambda x: x.reshape((1,) * lead + tuple(x.shape)),
    )


def mismatch_report(
    got: Mapping[str, Any],
    want: Mapping[str, Any],
    *,
    ignore: Iterable[str] = (),
) -> list[str]:
    """Lines naming every missing, unexpected and mis-described key of ``got`` against
    ``want``; keys in ``ignore`` may be present or absent. A key's description is a shape
    (a tuple of ints, shown as a list) or any comparable value, e.g. ``(shape, dtype)``.

    The one report of every checker: converters, run directories, sharded checkpoints.

    Example: ``mismatch_report({"w": (2, 3)}, {"w": (3, 2), "b": (3,)})`` ->
    ``["  missing: b", "  mismatched w: expected [3, 2], got [2, 3]"]``.
    """
    ignore = set(ignore)
    missing = sorted(want.keys() - got.keys())
    unexpected = sorted(got.keys() - want.keys() - ignore)
    mismatched = sorted(
        f"{k}: expected {_show(want[k])}, got {_show(got[k])}"
        for k in want.keys() & got.keys()
        if want[k] != got[k]
    )
    return (
        [f"  missing: {k}" for k in missing]
        + [f"  unexpected: {k}" for k in unexpected]
        + [f"  mismatched {m}" for m in mismatched]
    )


def _show(description: Any) -> str:
    if isinstance(description, tuple) and all(isinstance(d, int) for d in description):
        return str(list(description))
    if isinstance(description, tuple):
        return " ".join(_show(part) for part in description)
    return str(description)


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``state_dict`` with ``prefix`` removed where *every* key has it (e.g. DDP's
    ``module.``); otherwise unchanged."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _expected_shapes(rules: Sequence[Rule], like: Any) -> dict[str, tuple[int, ...]]:
    flat_like = tree.flatten(like)
    ours = [r.ours for r in rules]
    if set(ours) != flat_like.keys() or len(ours) != len(set(ours)):
        # A bug in a converter's rule list, not in the user's checkpoint.
        raise AssertionError(
            f"converter rules do not cover the params exactly: "
            f"unmapped {sorted(flat_like.keys() - set(ours))}, "
            f"unknown {sorted(set(ours) - flat_like.keys())}"
        )
    shapes = {}
    for rule in rules:
        meta = torch.empty(flat_like[rule.ours].shape, device="meta")
        for name, part in zip(rule.theirs, rule.split(meta)):
            shapes[name] = tuple(part.shape)
    return shapes


def import_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    rules: Sequence[Rule],
    *,
    like: Any,
    source: str,
    ignore: Iterable[str] = (),
    dtype: torch.dtype | None = torch.float32,
) -> Any:
    """Our param tree from a foreign ``state_dict``, checked key by key first.

    ``like``: the expected tree (shapes only are read: build it on the meta device).
    ``ignore``: foreign keys that are known non-parameters (buffers such as position ids).
    ``dtype``: cast every tensor (``None`` keeps the checkpoint's dtypes).
    Raises :class:`ConversionError` listing every missing, unexpected and mis-shaped key.
    """
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{source}: these entries are not tensors: {sorted(bad)}")
    want = _expected_shapes(rules, like)
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    problems = mismatch_report(got, want, ignore=ignore)
    if problems:
        raise ConversionError(
            f"{source} state dict does not match the expected model "
            f"({len(problems)} problem(s)):\n" + "\n".join(problems)
        )
    flat = {}
    for rule in rules:
        value = rule.to_ours(*(state_dict[k] for k in rule.theirs))
        value = value.detach().clone() if dtype is None else value.detach().to(dtype).clone()
        flat[rule.ours] = value.contiguous()
    return tree.unflatten(flat)


def export_state_dict(params: Any, rules: Sequence[Rule]) -> dict[str, torch.Tensor]:
    """The foreign ``state_dict`` of our ``params``: the inverse of :func:`import_state_dict`."""
    flat = tree.flatten(params)
    missing = sorted(r.ours for r in rules if r.ours not in flat)
    if missing:
        raise ConversionError(f"params lack keys the export needs: {missing}")
    out = {}
    for rule in rules:
        for name, part in zip(rule.theirs, rule.split(flat[rule.ours].detach())):
            out[name] = part.contiguous().clone()
    return out
