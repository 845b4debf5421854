"""The types of the two functions every part of :mod:`fmm.diffusion` passes around.

``Denoise``: ``denoise(params, x_t [B, C, H, W], t [B] int64, cond) -> [B, C', H, W]`` (the
contract is in :mod:`fmm.diffusion`'s docstring). ``Step``: a sampler step, ``step(params,
x, i, key, cond) -> x_prev`` (see :mod:`fmm.diffusion.samplers`). ``Cond``: conditioning.
"""

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["Cond", "Denoise", "Step"]

Cond = Mapping[str, torch.Tensor] | None
Denoise = Callable[[Any, torch.Tensor, torch.Tensor, Cond], torch.Tensor]
Step = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor, Cond], torch.Tensor]
