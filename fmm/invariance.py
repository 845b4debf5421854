"""Linear layers whose every row rounds the same whatever the number of rows.

A BLAS picks its kernel, and with it the order in which a dot product is summed, from the
shape of the whole product. On this project's CPUs (MKL), ``F.linear(x, w)`` over
``n`` rows sums a row one way for ``n = 1`` and otherwise in two more groups (``2-15`` and
``16+`` on an Intel CPU with AVX2, ``2-3`` and ``4+`` on an AMD EPYC with AVX-512:
``benchmarks/batch_invariance.py``), so a decode step over 2 rows and one over 32 give a
row logits that differ in the last bits, and a sampled token can differ with them.
Computed the other way round, as ``(w @ x.T).T``, the rows become the columns of the
product and the kernel's blocking runs along them: a row rounds alike over many row
counts (on the Intel CPU 1 to over 40; on the AMD one 1-8, then 9-40), the columns padded
to a multiple of 4 so that no row falls in the kernel's tail. oneDNN over weights packed
once (:class:`PackedLinears`) sums a row alike from 1 to 40 rows on both.

:class:`ColumnLinears` is a ``TorchFunctionMode`` that computes every product of a batch of
rows with one matrix that way: ``F.linear`` and ``matmul(x, m)`` with ``m`` 2-D (what
``fmm.nn.linear`` and the tied output heads call); products of two batches (attention's
``q @ k.T``) are left alone. It changes no result beyond float rounding (~1e-6 relative),
runs as one opaque op (``torch.ops.fmm.columns_mm``, with its gradient), traces under
``torch.compile(fullgraph=True)`` when entered inside the compiled function,
and is what the serving pool's decode step and prefills run under
(:class:`train.serve.slot_pool.SlotPool`), whose start-up probe still measures which row
counts are exact rather than trusting this. Example::

    with ColumnLinears():
        logits = gpt.apply(params, ids, cfg=cfg)   # each row as it would be in any batch
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = [
    "LINEARS",
    "ColumnLinears",
    "PackedLinears",
    "column_linears",
    "columns_matmul",
    "linears_mode",
    "mkl_reproducible",
    "packed_available",
]

_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


def columns_matmul(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x @ m`` computed as ``(m.T @ x.T).T``: ``x: [..., k]``, ``m: [k, out]`` ->
    ``[..., out]``, contiguous; the rows padded to a multiple of 4 columns. Example:
    ``torch.allclose(columns_matmul(x, w.T), x @ w.T, atol=1e-5)``."""
    rows = x.reshape(-1, x.shape[-1])
    return torch.ops.fmm.columns_mm(rows, m).reshape(*x.shape[:-1], m.shape[1])


_COLUMN_BLOCK = 4  # the column product's padding (see _columns_mm)


# One opaque op, not a product and a transpose: compiled, inductor would fuse the transpose
# into the ops that read the product and loop over them in its [out, rows] layout, and for
# a few rows a layer norm's reduction then runs split across threads: it rounds otherwise.
@torch.library.custom_op("fmm::columns_mm", mutates_args=())
def _columns_mm(rows: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n = rows.shape[0]
    # Columns padded to a multiple of 4: MKL with AVX-512 computes the last n % 4 columns
    # by another kernel (seen on an AMD EPYC: a row then rounded by its place at 5-7 and
    # 9-11 rows), and a lone row would be a matrix-vector product.
    pad = -n % _COLUMN_BLOCK
    if pad:
        rows = torch.cat([rows, rows[:1].expand(pad, -1)])
    # torch.mm, not @: an enclosing ColumnLinears must not turn this product back.
    return torch.mm(m.t(), rows.t()).t()[:n].contiguous()


@_columns_mm.register_fake
def _(rows: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], m.shape[1])


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, m = ctx.saved_tensors
    return grad @ m.t(), rows.t() @ grad


def _save(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


_columns_mm.register_autograd(_backward, setup_context=_save)


def _tensor(t: Any) -> bool:
    # fmm.quant's int8 weights are tensor-like leaves with a kernel of their own: not ours.
    return type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter)


def _linear_args(args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    # F.linear's (input, weight, bias), however the caller passed them.
    w = args[1] if len(args) > 1 else kwargs["weight"]
    return args[0], w, args[2] if len(args) > 2 else kwargs.get("bias")


class ColumnLinears(TorchFunctionMode):
    """While active (thread-local, as every torch mode), ``F.linear(x, w, b)`` and
    ``matmul(x, m)`` for a 2-D ``m`` are computed by :func:`columns_matmul`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w, b = _linear_args(args, kwargs)
            if _tensor(x) and _tensor(w) and x.dim() >= 1:
                y = columns_matmul(x, w.t())
                return y if b is None else y + b.to(y.dtype)
        elif func in _MATMULS and len(args) == 2 and not kwargs:
            x, m = args
            if _tensor(x) and _tensor(m) and x.dim() >= 2 and m.dim() == 2:
                return columns_matmul(x, m)
        return func(*args, **kwargs)


def _root(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


_PACKED: dict[int, tuple[Any, int | None, torch.Tensor]] = {}  # id: (ref, version, packed)


def _packed(w: torch.Tensor) -> torch.Tensor:
    # One oneDNN copy per weight, packed for no particular row count: kept while the
    # weight lives (a server's weights live as long as it), rebuilt if it is written.
    # Keyed by identity (a weak reference checks it is still that tensor).
    # An inference tensor keeps no version counter: a write to it in place goes unseen.
    key, version = id(w), None if w.is_inference() else w._version
    got = _PACKED.get(key)
    if got is None or got[0]() is not w or got[1] != version:
        ref = weakref.ref(w, functools.partial(_forget, key))
        got = _PACKED[key] = (ref, version, torch.ops.mkldnn._reorder_linear_weight(w, None))
    return got[2]


def _forget(key: int, _ref: Any) -> None:
    _PACKED.pop(key, None)


@torch.library.custom_op("fmm::packed_linear", mutates_args=())
def _packed_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    n = rows.shape[0]
    if n == 1:  # oneDNN sums a lone row of a long one (GPT-2's 3072 -> 768) otherwise
        rows = torch.cat([rows, rows])
    root = _root(w)  # the weight itself, where w is a view of it (x @ w.t(), compiled)
    weight = root if root.shape == w.shape and root.stride() == w.stride() else w
    out = torch.ops.mkldnn._linear_pointwise(rows, _packed(weight), b, "none", [], "")
    return out[:n].reshape(*x.shape[:-1], w.shape[0])


@_packed_linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], w.shape[0])


def packed_available() -> bool:
    """Whether this torch has oneDNN (``torch.backends.mkldnn``) for :class:`PackedLinears`."""
    return torch.backends.mkldnn.is_available()


class PackedLinears(TorchFunctionMode):
    """While active, float32 CPU ``F.linear(x, w, b)`` (and ``fmm.nn.linear``'s compiled
    ``x @ w.t()``) run through oneDNN over ``w`` packed once for any row count
    (``torch.ops.fmm.packed_linear``, an opaque op): a row rounds alike at every row count
    (measured from 1 to 40 at GPT-2 small's widths on an Intel and an AMD CPU; a lone row is
    computed as two, since oneDNN sums one row of a 3072-long product otherwise on the
    Intel one), and small batches read the weights
    about as fast as a matrix-vector product. Inference only (no gradient); other
    products pass through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w, b = _linear_args(args, kwargs)
            if _eligible(x, w) and (b is None or _tensor(b)):
                return torch.ops.fmm.packed_linear(x, w, b)
        elif func in _MATMULS and len(args) == 2 and not kwargs:
            x, m = args
            if _tensor(m) and m.dim() == 2 and _eligible(x, m.t()):
                return torch.ops.fmm.packed_linear(x, m.t(), None)
        return func(*args, **kwargs)


def _eligible(x: Any, w: Any) -> bool:
    return (
        _tensor(x) and _tensor(w) and x.dim() >= 1 and w.dim() == 2
        and x.device.type == w.device.type == "cpu"
        and x.dtype == w.dtype == torch.float32
    )  # fmt: skip


def mkl_reproducible() -> bool | None:
    """Whether MKL's conditional numerical reproducibility is on in this process (``None``:
    this torch has no MKL to ask). Off, MKL may sum a product differently by the memory
    alignment of its operands, so equal rows of one batch can round differently (torch's CPU
    flash attention calls MKL on each thread's own buffers). ``import fmm`` turns it on
    (``MKL_CBWR=AUTO``) unless MKL has computed already: import fmm before anything computes,
    or set ``MKL_CBWR`` in the environment."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        branch = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    return branch(_MKL_CBWR_BRANCH) != _MKL_CBWR_BRANCH_OFF


# mkl_service.h: mkl_cbwr_get(MKL_CBWR_BRANCH) answers MKL_CBWR_BRANCH_OFF when it is off.
_MKL_CBWR_BRANCH = _MKL_CBWR_BRANCH_OFF = 1


LINEARS = ("packed", "columns", "rows")


def linears_mode(linears: str) -> Callable[[], Any]:
    """The mode a pool's step and prefills run under for ``linears`` (``"packed"``:
    :class:`PackedLinears`, ``"columns"``: :class:`ColumnLinears`, ``"rows"``: none)."""
    if linears not in LINEARS:
        raise ValueError(f"linears must be one of {LINEARS}, got {linears!r}")
    return {"packed": PackedLinears, "columns": ColumnLinears}.get(linears, contextlib.nullcontext)


def column_linears(fn: Callable) -> Callable:
    """``fn`` run under :class:`ColumnLinears` (inside it, so a compiled ``fn`` traces the
    mode into its graph). Example: ``step = torch.compile(column_linears(decode))``."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with ColumnLinears():
            return fn(*args, **kwargs)

    return run
