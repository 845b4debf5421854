"""2-d convolutions, transposed convolutions and residual conv blocks with PyTorch layouts.

``conv2d`` params hold ``weight [out, in, k, k]`` (``nn.Conv2d``'s layout) and
``conv_transpose2d`` params hold ``weight [in, out, k, k]`` (``nn.ConvTranspose2d``'s), so a
flattened tree reads like those modules' state dicts. Images are ``[batch, channels, H, W]``.

Example::

    p = init_conv2d(3, 16, 4, fmm.random.key(0))
    y = conv2d(p, torch.rand(2, 3, 32, 32), stride=2, padding=1)  # [2, 16, 16, 16]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmm import random

Params = dict[str, torch.Tensor]


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def init_kernel(
    shape: tuple[int, ...],
    fan_in: int,
    key: torch.Tensor,
    *,
    out_channels: int,
    bias: bool,
    std: float | None,
    dtype: torch.dtype,
) -> Params:
    """A convolution's params, any rank: ``weight [*shape] ~ N(0, std**2)`` with He init's
    ``std = sqrt(2 / fan_in)`` unless given, and ``bias [out_channels] = 0`` if ``bias``."""
    std = (2.0 / fan_in) ** 0.5 if std is None else std
    params = {"weight": random.normal(key, shape, dtype=dtype) * std}
    if bias:
        params["bias"] = torch.zeros(out_channels, dtype=dtype, device=key.device)
    return params


def init_conv2d(
    in_channels: int,
    out_channels: int,
    kernel: int,
    key: torch.Tensor,
    *,
    bias: bool = True,
    std: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Params:
    """Params of a square-kernel convolution: ``weight [out, in, kernel, kernel]``, ``bias [out]``.

    ``weight ~ N(0, std**2)`` with ``std = sqrt(2 / fan_in)`` by default (He init: the blocks
    around it use ReLU); ``bias = 0``.
    """
    _check_sizes(in_channels=in_channels, out_channels=out_channels, kernel=kernel)
    shape = (out_channels, in_channels, kernel, kernel)
    return init_kernel(
        shape, in_channels * kernel * kernel, key,
        out_channels=out_channels, bias=bias, std=std, dtype=dtype,
    )  # fmt: skip


def conv2d(params: Params, x: torch.Tensor, *, stride: int = 1, padding: int = 0) -> torch.Tensor:
    """Cross-correlate ``x: [B, in, H, W]`` with ``params["weight"]: [out, in, k, k]``.

    Returns ``[B, out, (H + 2*padding - k) // stride + 1, ...]``, as ``nn.Conv2d``.
    """
    weight = params["weight"]
    if x.ndim != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"conv2d: x must be [batch, {weight.shape[1]}, H, W] for weight "
            f"{list(weight.shape)}, got {list(x.shape)}"
        )
    return F.conv2d(x, weight, params.get("bias"), stride=stride, padding=padding)


def init_conv_transpose2d(
    in_channels: int,
    out_channels: int,
    kernel: int,
    key: torch.Tensor,
    *,
    bias: bool = True,
    std: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Params:
    """Params of a transposed convolution: ``weight [in, out, kernel, kernel]``, ``bias [out]``.

    The default ``std`` is He init over the fan-in each output pixel sees,
    ``in * kernel**2 / stride**2``, taken for the usual stride 2.
    """
    _check_sizes(in_channels=in_channels, out_channels=out_channels, kernel=kernel)
    shape = (in_channels, out_channels, kernel, kernel)
    return init_kernel(
        shape, max(1, in_channels * kernel * kernel // 4), key,
        out_channels=out_channels, bias=bias, std=std, dtype=dtype,
    )  # fmt: skip


def conv_transpose2d(
    params: Params, x: torch.Tensor, *, stride: int = 1, padding: int = 0
) -> torch.Tensor:
    """The gradient-of-convolution map ``x: [B, in, H, W] -> [B, out, H', W']`` (upsampling).

    ``H' = (H - 1) * stride - 2 * padding + k``, as ``nn.ConvTranspose2d``; kernel 4, stride 2,
    padding 1 doubles the resolution exactly.
    """
    weight = params["weight"]
    if x.ndim != 4 or x.shape[1] != weight.shape[0]:
        raise ValueError(
            f"conv_transpose2d: x must be [batch, {weight.shape[0]}, H, W] for weight "
            f"{list(weight.shape)}, got {list(x.shape)}"
        )
    return F.conv_transpose2d(x, weight, params.get("bias"), stride=stride, padding=padding)


def init_res_block(
    channels: int,
    hidden: int,
    key: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Params]:
    """Params of :func:`res_block`: ``{"conv1": [hidden, channels, 3, 3], "conv2": [channels, hidden, 1, 1]}``."""
    k1, k2 = random.split(key)
    return {
        "conv1": init_conv2d(channels, hidden, 3, k1, dtype=dtype),
        # The residual branch starts small so a stack of blocks starts near the identity.
        "conv2": init_conv2d(hidden, channels, 1, k2, std=0.1 * hidden**-0.5, dtype=dtype),
    }


def res_block(params: dict[str, Params], x: torch.Tensor) -> torch.Tensor:
    """``x + conv1x1(relu(conv3x3(relu(x))))`` (the VQ-VAE paper's block). ``[B, C, H, W] -> same``."""
    h = conv2d(params["conv1"], F.relu(x), padding=1)
    return x + conv2d(params["conv2"], F.relu(h))
