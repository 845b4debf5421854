"""3-d convolutions and transposed convolutions over videos, with VideoGPT's ``same`` padding.

Videos are ``[batch, channels, T, H, W]``. ``conv3d`` params hold ``weight [out, in, kt, kh,
kw]`` (``nn.Conv3d``'s layout) and ``conv_transpose3d`` params ``weight [in, out, kt, kh, kw]``
(``nn.ConvTranspose3d``'s). ``padding="same"`` is TensorFlow's SAME rule, which VideoGPT uses:
a stride-1 layer keeps every size, a stride-``s`` convolution gives ``ceil(size / s)`` and a
stride-``s`` transposed convolution ``size * s``, for any kernel, odd or even (the extra
padding of an even kernel goes first).

Example::

    p = init_conv3d(3, 16, 4, fmm.random.key(0))
    y = conv3d(p, torch.rand(2, 3, 8, 32, 32), stride=2)               # [2, 16, 4, 16, 16]
    q = init_conv_transpose3d(16, 3, 4, fmm.random.key(1))
    x = conv_transpose3d(q, y, stride=2)                               # [2, 3, 8, 32, 32]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fmm.nn.conv import init_kernel

Params = dict[str, torch.Tensor]
Size3 = int | tuple[int, int, int]


def triple(value: Size3, name: str) -> tuple[int, int, int]:
    """``value`` as a (T, H, W) triple; ``ValueError`` naming ``name`` unless positive ints."""
    out = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(out) != 3 or not all(isinstance(v, int) and v >= 1 for v in out):
        raise ValueError(f"{name} must be a positive int or three positive ints, got {value!r}")
    return out  # type: ignore[return-value]


def same_padding(kernel: Size3, stride: Size3, size: tuple[int, ...]) -> tuple[int, ...]:
    """``F.pad`` amounts (last axis first) for SAME padding of a ``size = (T, H, W)`` input.

    Each axis is padded by ``max(k - s, 0)`` when ``s`` divides its size, else by
    ``max(k - size % s, 0)``, the odd pixel going before the input.

    Example: ``same_padding(4, 2, (8, 32, 32)) == (1, 1, 1, 1, 1, 1)``.
    """
    kernel, stride = triple(kernel, "kernel"), triple(stride, "stride")
    pads: list[int] = []
    for k, s, d in reversed(list(zip(kernel, stride, size, strict=True))):
        total = max(k - (s if d % s == 0 else d % s), 0)
        pads += [total - total // 2, total // 2]
    return tuple(pads)


def _transpose_padding(kernel, stride, size, pads) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``padding`` and ``output_padding`` making a transposed conv of the SAME-padded input
    come out at exactly ``size * stride``."""
    totals = [pads[2 * i] + pads[2 * i + 1] for i in range(3)][::-1]  # back to (T, H, W)
    trim, extra = [], []
    for k, s, d, p in zip(kernel, stride, size, totals):
        full = k + (d + p - 1) * s
        cut = max((full - d * s + 1) // 2, 0)
        trim.append(cut)
        extra.append(d * s - (full - 2 * cut))
    return tuple(trim), tuple(extra)


def init_conv3d(
    in_channels: int,
    out_channels: int,
    kernel: Size3,
    key: torch.Tensor,
    *,
    bias: bool = True,
    std: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Params:
    """``{"weight": [out, in, kt, kh, kw], "bias": [out]}``; He init ``std = sqrt(2 / fan_in)``
    by default, ``bias = 0``."""
    k = triple(kernel, "kernel")
    triple((in_channels, out_channels, 1), "in_channels / out_channels")
    fan_in = in_channels * math.prod(k)
    return init_kernel(
        (out_channels, in_channels, *k), fan_in, key,
        out_channels=out_channels, bias=bias, std=std, dtype=dtype,
    )  # fmt: skip


def init_conv_transpose3d(
    in_channels: int,
    out_channels: int,
    kernel: Size3,
    key: torch.Tensor,
    *,
    bias: bool = True,
    std: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Params:
    """``{"weight": [in, out, kt, kh, kw], "bias": [out]}``; He init over the fan-in an output
    voxel sees at stride 2 (``in * prod(kernel) / 8``) by default."""
    k = triple(kernel, "kernel")
    triple((in_channels, out_channels, 1), "in_channels / out_channels")
    fan_in = max(1, in_channels * math.prod(k) // 8)
    return init_kernel(
        (in_channels, out_channels, *k), fan_in, key,
        out_channels=out_channels, bias=bias, std=std, dtype=dtype,
    )  # fmt: skip


def _check_video(name: str, x: torch.Tensor, channels: int, weight: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[1] != channels:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"{name}: x must be [batch, {channels}, T, H, W] for weight {list(weight.shape)}, "
            f"got {got}"
        )


def conv3d(
    params: Params, x: torch.Tensor, *, stride: Size3 = 1, padding: str | Size3 = "same"
) -> torch.Tensor:
    """Cross-correlate ``x: [B, in, T, H, W]`` with ``weight [out, in, kt, kh, kw]``.

    ``padding="same"``: output ``[B, out, ceil(T / st), ceil(H / sh), ceil(W / sw)]``;
    an int or triple pads symmetrically, as ``nn.Conv3d``.
    """
    weight = params["weight"]
    _check_video("conv3d", x, weight.shape[1], weight)
    stride = triple(stride, "stride")
    if padding == "same":
        x = F.pad(x, same_padding(weight.shape[2:], stride, x.shape[2:]))
        padding = 0
    elif isinstance(padding, str):
        raise ValueError(f"padding must be 'same', an int or three ints, got {padding!r}")
    return F.conv3d(x, weight, params.get("bias"), stride=stride, padding=padding)


def conv_transpose3d(
    params: Params, x: torch.Tensor, *, stride: Size3 = 1, padding: str | Size3 = "same"
) -> torch.Tensor:
    """The transposed (upsampling) map ``x: [B, in, T, H, W] -> [B, out, T', H', W']``.

    ``padding="same"``: VideoGPT's rule, ``T' = T * st`` (and so on), by SAME-padding the
    input and trimming the output; an int or triple is ``nn.ConvTranspose3d``'s padding.
    """
    weight = params["weight"]
    _check_video("conv_transpose3d", x, weight.shape[0], weight)
    stride = triple(stride, "stride")
    extra: tuple[int, ...] | int = 0
    if padding == "same":
        kernel, size = tuple(weight.shape[2:]), tuple(x.shape[2:])
        pads = same_padding(kernel, stride, size)
        padding, extra = _transpose_padding(kernel, stride, size, pads)
        x = F.pad(x, pads)
    elif isinstance(padding, str):
        raise ValueError(f"padding must be 'same', an int or three ints, got {padding!r}")
    return F.conv_transpose3d(
        x, weight, params.get("bias"), stride=stride, padding=padding, output_padding=extra
    )
