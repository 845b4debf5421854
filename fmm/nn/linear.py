"""Affine maps with PyTorch's layout: ``weight [out, in]``, ``bias [out]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmm import random

Params = dict[str, torch.Tensor]


def init_linear(
    in_dim: int,
    out_dim: int,
    key: torch.Tensor,
    *,
    bias: bool = True,
    std: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Params:
    """Params of a linear map ``[..., in_dim] -> [..., out_dim]``.

    ``weight ~ N(0, std**2)`` with ``std = in_dim ** -0.5`` by default; ``bias = 0``.

    Example: ``p = init_linear(5, 3, fmm.random.key(0))`` -> ``{"weight": [3, 5], "bias": [3]}``.
    """
    std = in_dim**-0.5 if std is None else std
    params = {"weight": random.normal(key, (out_dim, in_dim), dtype=dtype) * std}
    if bias:
        params["bias"] = torch.zeros(out_dim, dtype=dtype, device=key.device)
    return params


def linear(params: Params, x: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T + bias``. ``x: [..., in]`` -> ``[..., out]``."""
    w, b = params["weight"], params.get("bias")
    if (
        b is not None
        and isinstance(w, torch.Tensor)  # not fmm.quant's int8 leaf: it dispatches F.linear
        and x.device.type == "cpu"
        and torch.compiler.is_compiling()
    ):
        # Inductor lowers F.linear to addmm, which on CPU first copies the broadcast bias
        # into the whole output and has the GEMM read it back: two passes over the output.
        # A bare matmul lets inductor fuse the bias into the next op that reads the output
        # (GELU, the residual sum and layer norm). Eagerly, addmm is the faster of the two.
        y = torch.matmul(x, w.t())
        return y + b.to(y.dtype)
    return F.linear(x, w, b)
