"""Every public model function refuses a spoiled argument at its boundary, naming it.

One table (``ENTRIES``) lists each public function of every family (and ``fmm.decoding``'s
entry points) with good arguments on a tiny preset and the arguments a careless user can
get wrong. Hypothesis spoils one argument at a time (wrong dtype, rank or size, ids out of
range or negative, an empty sequence or batch, params of another preset) and the call must
raise ``ValueError`` / ``TypeError`` whose message starts with that argument's name. Each
entry's good arguments must run, so a spoil, not the table, is what makes a call fail.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.models.bad_input_table import ENTRIES, Arg

KINDS = {
    "image": ("int dtype", "float64 dtype", "rank", "size", "empty batch"),
    "float": ("int dtype", "rank", "size"),
    "ids": ("float dtype", "rank", "too long", "id too high", "negative id", "empty seq"),
    "mask": ("float dtype", "size"),
    "params": ("other preset",),
    "cfg": ("wrong type",),
}
CASES = [
    pytest.param(e, shown, kind, id=f"{e.name}-{shown}-{kind}")
    for e in ENTRIES
    for shown, arg in e.args.items()
    for kind in KINDS[arg.kind] + (("batch",) if arg.batch_of else ())
    if not (kind == "too long" and arg.max_len is None)
    if not (kind == "size" and not arg.sized)
]
BY_NAME = {e.name: e for e in ENTRIES}


def _other_size(data: st.DataObject, size: int) -> int:
    return data.draw(st.integers(1, 2 * size + 1).filter(lambda n: n != size), label="size")


def spoil(arg: Arg, kind: str, x: Any, data: st.DataObject) -> tuple[Any, type[Exception]]:
    """``x`` spoiled one way, and the error that must follow."""
    if kind in ("other preset", "wrong type"):
        return arg.other(), (TypeError if kind == "wrong type" else ValueError)
    if kind.endswith("dtype"):
        dtype = {"int": torch.int64, "float": torch.float32, "float64": torch.float64}
        return x.to(dtype[kind.split()[0]]), TypeError
    if kind == "rank":
        more = data.draw(st.booleans(), label="add an axis")
        return (x[None] if more or x.ndim == 0 else x[..., 0]), ValueError
    if kind == "size":  # the last axis (an image's width, a feature's width, a mask's length)
        axis = data.draw(st.integers(1, 3), label="axis") if arg.kind == "image" else -1
        n = _other_size(data, x.shape[axis])
        shape = list(x.shape)
        shape[axis] = n
        return torch.zeros(shape, dtype=x.dtype), ValueError
    if kind == "batch":
        n = _other_size(data, x.shape[0])
        return x[torch.arange(n) % x.shape[0]], ValueError
    if kind == "empty batch":
        return x[:0], ValueError
    if kind == "empty seq":
        return x[..., :0], ValueError
    if kind == "too long":
        extra = data.draw(st.integers(1, 3), label="extra positions")
        length = arg.max_len + extra
        return x[:, torch.arange(length) % x.shape[1]], ValueError
    flat = x.clone().reshape(-1)
    at = data.draw(st.integers(0, flat.numel() - 1), label="position")
    by = data.draw(st.integers(0, 5), label="by")
    flat[at] = arg.high + by if kind == "id too high" else -1 - by
    return flat.reshape(x.shape), ValueError


@pytest.mark.parametrize("name", list(BY_NAME))
def test_the_good_arguments_run(name):
    # Without this, a call that fails whatever its arguments would pass every spoil below.
    e = BY_NAME[name]
    with torch.no_grad():
        e.call(e.good())


# A few examples per case: the cases (a few hundred) already enumerate every spoil; the
# examples vary where and by how much.
@pytest.mark.parametrize(("entry", "shown", "kind"), CASES)
@settings(max_examples=max(1, settings().max_examples // 5))
@given(data=st.data())
def test_a_spoiled_argument_is_refused_naming_it(entry, shown, kind, data):
    args = entry.good()
    args[shown], error = spoil(entry.args[shown], kind, args[shown], data)
    with pytest.raises((ValueError, TypeError)) as info:
        entry.call(args)
    assert info.type is error or issubclass(info.type, error), (info.type, str(info.value))
    # The name whole: "x" is not named by a message about "x_t".
    assert re.match(rf"{re.escape(shown)}(?![A-Za-z0-9_])", str(info.value)), str(info.value)
