"""Discrete Gaussian schedules and the forward (noising) process.

A :class:`Schedule` is a frozen record of float64 tensors ``[T]``, every quantity of the
forward process and its posterior precomputed from the betas (the names of Ho et al. 2020
and Nichol & Dhariwal 2021). It is passed explicitly, so a compiled sampler step reads it as
constants; a step index ``t`` is always a tensor, so indexing it never recompiles.

Example::

    s = gaussian_schedule(cosine_betas(1000))
    t = sample_timesteps(s, fmm.random.fold_in(key, "t"), batch=8)        # [8] int64
    x_t, noise = q_sample(s, x0, t, fmm.random.fold_in(key, "noise"))      # [8, C, H, W]
    fast = spaced(s, 50)              # 50 of the 1000 steps, for DDIM or strided DDPM
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from fmm import checks, random

__all__ = [
    "Schedule",
    "at",
    "cosine_betas",
    "gaussian_schedule",
    "linear_betas",
    "noised",
    "q_posterior",
    "q_sample",
    "quadratic_betas",
    "sample_timesteps",
    "sigmoid_betas",
    "snr",
    "spaced",
]


@dataclass(frozen=True, eq=False)
class Schedule:
    """Every per-step quantity of a discrete Gaussian diffusion, each ``float64 [T]``.

    ``timesteps: int64 [T]`` is the training-schedule step each index stands for (``arange``
    for a full schedule; the kept steps for :func:`spaced`): a sampler at index ``i`` hands
    ``timesteps[i]`` to the denoiser. ``variance_range`` (0 to 1) places a fixed reverse
    variance between the posterior's lower bound (0, "fixed small") and ``beta`` (1, "fixed
    large"); a learned variance overrides it per element.
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    # Log-variance bounds of the reverse step: the true posterior's (its first entry, 0 at
    # t = 0, is replaced by the second so the log is finite) and log(beta).
    posterior_log_variance_lower: torch.Tensor
    posterior_log_variance_upper: torch.Tensor
    posterior_mean_x0_coef: torch.Tensor
    posterior_mean_xt_coef: torch.Tensor
    timesteps: torch.Tensor
    variance_range: float = 0.0

    @property
    def steps(self) -> int:
        """``T``, the number of steps."""
        return self.betas.shape[0]

    def to(self, device: torch.device | str) -> Schedule:
        """The same schedule with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Schedule(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in moved.items()})


def linear_betas(steps: int, start: float | None = None, end: float | None = None) -> torch.Tensor:
    """Betas rising linearly (Ho et al.), ``float64 [steps]``; the defaults 1e-4 to 0.02 are
    for 1000 steps and scale by ``1000 / steps``."""
    scale = 1000 / steps
    start = scale * 1e-4 if start is None else start
    end = scale * 0.02 if end is None else end
    return torch.linspace(start, end, steps, dtype=torch.float64)


def quadratic_betas(
    steps: int, start: float | None = None, end: float | None = None
) -> torch.Tensor:
    """Betas whose square roots rise linearly between those of :func:`linear_betas`'s ends."""
    scale = 1000 / steps
    start = scale * 1e-4 if start is None else start
    end = scale * 0.02 if end is None else end
    return torch.linspace(math.sqrt(start), math.sqrt(end), steps, dtype=torch.float64) ** 2


def sigmoid_betas(steps: int, start: float | None = None, end: float | None = None) -> torch.Tensor:
    """Betas along a sigmoid over ``[-6, 6]``, between :func:`linear_betas`'s ends."""
    scale = 1000 / steps
    start = scale * 1e-4 if start is None else start
    end = scale * 0.02 if end is None else end
    return torch.linspace(-6, 6, steps, dtype=torch.float64).sigmoid() * (end - start) + start


def cosine_betas(steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule: ``alpha_bar(t) = cos²((t/T + s)/(1 + s) · π/2)``
    normalised to 1 at ``t = 0``, betas clipped to ``max_beta`` (the last would be 1)."""
    x = torch.linspace(0, steps, steps + 1, dtype=torch.float64)
    alphas_cumprod = torch.cos((x / steps + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clip(0, max_beta)


def gaussian_schedule(
    betas: torch.Tensor, *, variance_range: float = 0.0, timesteps: torch.Tensor | None = None
) -> Schedule:
    """The :class:`Schedule` of ``betas: [T]`` (computed in float64).

    ``timesteps`` (default ``arange(T)``) is what :func:`spaced` sets.
    Example: ``gaussian_schedule(linear_betas(1000), variance_range=1.0)``.
    """
    checks.check_float("betas", betas, ("steps",))
    if not 0.0 <= variance_range <= 1.0:
        raise ValueError(f"variance_range must lie in [0, 1], got {variance_range}")
    b = betas.to(torch.float64)
    if not torch.compiler.is_compiling() and not bool(((b > 0) & (b <= 1)).all()):
        raise ValueError("betas must lie in (0, 1]")
    a = 1.0 - b
    ac = a.cumprod(0)
    ac_prev = F.pad(ac[:-1], (1, 0), value=1.0)
    posterior_variance = b * (1.0 - ac_prev) / (1.0 - ac)
    lower = torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log()
    steps = torch.arange(b.shape[0], device=b.device) if timesteps is None else timesteps
    return Schedule(
        betas=b,
        alphas=a,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=ac.sqrt(),
        sqrt_one_minus_alphas_cumprod=(1.0 - ac).sqrt(),
        sqrt_recip_alphas_cumprod=(1.0 / ac).sqrt(),
        sqrt_recipm1_alphas_cumprod=(1.0 / ac - 1.0).sqrt(),
        posterior_log_variance_lower=lower,
        posterior_log_variance_upper=b.log(),
        posterior_mean_x0_coef=b * ac_prev.sqrt() / (1.0 - ac),
        posterior_mean_xt_coef=(1.0 - ac_prev) * a.sqrt() / (1.0 - ac),
        timesteps=steps.to(torch.int64),
        variance_range=variance_range,
    )


def spaced(schedule: Schedule, steps: int | Sequence[int] | torch.Tensor) -> Schedule:
    """The schedule over a subset of ``schedule``'s steps (Nichol & Dhariwal's eq. 19).

    ``steps``: a count (that many, evenly spaced from the last step to the first) or the
    steps themselves (any order; sorted). The kept steps keep their ``alphas_cumprod``; the
    betas are recomputed from them, so a strided DDPM or a DDIM walks the same marginals.
    Example: ``spaced(s, 50).timesteps`` -> ``[0, 20, 41, ..., 999]``.
    """
    full = schedule.steps
    if isinstance(steps, int):
        if not 1 <= steps <= full:
            raise ValueError(f"steps must lie in [1, {full}], got {steps}")
        # From the last step down, so a single step is the last one (pure noise -> data).
        kept = torch.linspace(full - 1, 0, steps, dtype=torch.float64).round().long()
    else:
        kept = torch.as_tensor(steps, dtype=torch.int64).sort().values
        if kept.ndim != 1 or kept.numel() == 0 or int(kept[0]) < 0 or int(kept[-1]) >= full:
            raise ValueError(f"steps must be a non-empty list of steps in [0, {full})")
    kept = kept.unique().to(schedule.betas.device)
    ac = schedule.alphas_cumprod[kept]
    betas = 1.0 - ac / F.pad(ac[:-1], (1, 0), value=1.0)
    return gaussian_schedule(
        betas, variance_range=schedule.variance_range, timesteps=schedule.timesteps[kept]
    )


def at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` as ``[B, 1, ..., 1]``, to broadcast against ``like: [B, ...]``.

    It stays float64: each function here forms its products in float64 and casts its result
    to the data's dtype (where TorchMultimodal casts too). At large ``t``, ``x0 = sqrt(1/ᾱ)
    x_t - sqrt(1/ᾱ - 1) ε`` cancels two terms ~300 times the result, so float32
    coefficients would lose ~1e-5 per step, which a sampler's loop compounds.
    """
    return values[t].reshape(-1, *(1,) * (like.ndim - 1))


def snr(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """``float64 [B]``: the signal-to-noise ratio ``ᾱ_t / (1 - ᾱ_t)`` of ``x_t`` at steps
    ``t: [B]`` (it falls from ~1e4 at ``t = 0`` to ~0 at the last step of a cosine schedule)."""
    ac = schedule.alphas_cumprod[t]
    return ac / (1.0 - ac)


def sample_timesteps(schedule: Schedule, key: torch.Tensor, batch: int) -> torch.Tensor:
    """``int64 [batch]`` steps drawn uniformly from ``[0, T)`` on ``key``'s device."""
    u = random.uniform(key, (batch,), dtype=torch.float64)
    return (u * schedule.steps).long().clamp(max=schedule.steps - 1)


def _check_step(schedule: Schedule, x: torch.Tensor, t: torch.Tensor, name: str = "x0") -> None:
    checks.check_float(name, x, ("batch", "channels", "height", "width"))
    checks.check_ids("t", t, (x.shape[0],), high=schedule.steps, hint=f"one step per row of {name}")


def q_sample(
    schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, key: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``x_t ~ q(x_t | x0) = N(sqrt(ᾱ_t) x0, (1 - ᾱ_t) I)``; returns ``(x_t, noise)``.

    ``x0: [B, C, H, W]``, ``t: [B]`` int64; ``noise`` is ``fmm.random.normal(key,
    x0.shape)`` (what a noise-predicting model is trained to recover).
    """
    _check_step(schedule, x0, t)
    noise = random.normal(key, x0.shape, dtype=x0.dtype)
    return noised(schedule, x0, t, noise), noise


def noised(
    schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """``sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise``, the deterministic half of :func:`q_sample`."""
    return (
        at(schedule.sqrt_alphas_cumprod, t, x0) * x0
        + at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    ).to(x0.dtype)


def q_posterior(
    schedule: Schedule,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    variance_value: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and log-variance of ``q(x_{t-1} | x_t, x0)``, each ``[B, C, H, W]``.

    The log-variance interpolates between the lower and upper bounds by ``variance_value``
    (``[B, C, H, W]`` in ``[0, 1]``, a learned variance) or, if None, by
    ``schedule.variance_range``.
    """
    lower = at(schedule.posterior_log_variance_lower, t, x_t)
    upper = at(schedule.posterior_log_variance_upper, t, x_t)
    frac = schedule.variance_range if variance_value is None else variance_value
    log_variance = frac * upper + (1 - frac) * lower
    mean = (
        at(schedule.posterior_mean_x0_coef, t, x_t) * x0
        + at(schedule.posterior_mean_xt_coef, t, x_t) * x_t
    )
    return mean.to(x_t.dtype), log_variance.expand_as(x_t).to(x_t.dtype)
