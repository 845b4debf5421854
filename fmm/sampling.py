"""Token samplers over logits: greedy, temperature, top-k and top-p (nucleus), all drawing
from explicit keys so the same key picks the same tokens, eager or compiled.

Example::

    tok = sample(logits, fmm.random.key(0), temperature=0.8, top_k=40, top_p=0.9)  # [B]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fmm import random

__all__ = ["Sampling", "greedy", "sample", "top_k_mask", "top_p_mask"]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token: ``logits [..., vocab] -> int64 [...]``."""
    return logits.argmax(dim=-1)


def top_k_mask(logits: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Bool ``[..., vocab]``: True for the ``k`` largest logits (and any tied with the k-th).

    ``k`` may be an int64 tensor ``[...]``, one k per row, each >= 1 (eager only: the
    largest k sizes the ``topk``); a row's mask is what its own int k gives.
    """
    if isinstance(k, torch.Tensor):
        vocab = logits.shape[-1]
        values = logits.topk(min(int(k.max()), vocab), dim=-1).values
        kth = values.gather(-1, (k.clamp(max=vocab) - 1)[..., None])
        return logits >= kth
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    k = min(k, logits.shape[-1])
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits >= kth


def top_p_mask(logits: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Bool ``[..., vocab]``: the smallest set of most likely tokens whose probability sums to
    at least ``p`` (nucleus sampling); the most likely token is always in it.

    ``p`` may be a float tensor ``[...]``, one p per row (the caller checks its range).
    """
    if isinstance(p, torch.Tensor):
        p = p[..., None]
    elif not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    keep_sorted = mass_before < p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def sample(
    logits: torch.Tensor,
    key: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Draw one token per row of ``logits: [..., vocab]`` -> int64 ``[...]``.

    ``temperature == 0`` is greedy. Otherwise the logits are divided by ``temperature``,
    restricted to :func:`top_k_mask` then :func:`top_p_mask`, and sampled with the Gumbel-max
    trick from ``key`` (the same key always draws the same tokens, eager or compiled).

    Example: ``tok = sample(logits, fmm.random.key(0), temperature=0.8, top_p=0.9)``.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return greedy(logits)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = logits.masked_fill(~top_k_mask(logits, top_k), float("-inf"))
    if top_p is not None:
        logits = logits.masked_fill(~top_p_mask(logits, top_p), float("-inf"))
    u = random.uniform(key, logits.shape).clamp(min=1e-12)
    return (logits - torch.log(-torch.log(u))).argmax(dim=-1)


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """A sampler's static settings (see :func:`sample`); ``temperature=0`` is greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"Sampling: temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"Sampling: top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"Sampling: top_p must be in (0, 1], got {self.top_p}")

    def __call__(self, logits: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return sample(logits, key, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
