"""Two-layer perceptron and the activations transformers use."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fmm import random
from fmm.nn.linear import init_linear, linear

Params = dict[str, dict[str, torch.Tensor]]


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU: ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function called ``name`` (one of :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None


def init_mlp(
    dim: int,
    hidden: int,
    key: torch.Tensor,
    *,
    out_dim: int | None = None,
    out_std: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Params:
    """Params ``{"fc1": [hidden, dim], "fc2": [out_dim, hidden]}`` (``out_dim`` defaults to ``dim``).

    ``out_std`` scales the second layer's init (residual branches use a smaller one).
    """
    k1, k2 = random.split(key)
    return {
        "fc1": init_linear(dim, hidden, k1, dtype=dtype),
        "fc2": init_linear(hidden, out_dim or dim, k2, std=out_std, dtype=dtype),
    }


def mlp(
    params: Params,
    x: torch.Tensor,
    *,
    act: str = "gelu",
    dropout: float = 0.0,
    key: torch.Tensor | None = None,
    train: bool = False,
) -> torch.Tensor:
    """``fc2(dropout(act(fc1(x))))``. ``x: [..., dim]`` -> ``[..., out_dim]``.

    Dropout needs ``key`` when ``train`` and ``dropout > 0``.
    """
    h = activation(act)(linear(params["fc1"], x))
    if train and dropout > 0.0:
        if key is None:
            raise ValueError("key= is missing: mlp dropout in training needs key=")
        h = random.dropout(key, h, dropout)
    return linear(params["fc2"], h)
