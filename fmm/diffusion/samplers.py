"""DDPM and DDIM samplers: a pure step, compiled once, under a plain Python loop.

A step has one signature, ``step(params, x, i, key, cond) -> x_prev``:

- ``x: [B, C, H, W]`` at schedule index ``i`` (an ``int64`` 0-d tensor, so a compiled step
  never recompiles across steps); the denoiser sees ``schedule.timesteps[i]``;
- ``key``: the run's key; the step folds ``i`` in, so each step draws its own noise;
  the key, ``i`` and the schedule (:meth:`Schedule.to`) live on ``x``'s device;
- the result is ``x`` at index ``i - 1`` (the data itself after ``i = 0``).

:func:`ddpm_step` samples the model's ``p(x_{i-1} | x_i)`` (fixed or learned variance);
:func:`ddim_step` is Song et al.'s eq. 12 with ``eta`` (0: deterministic; 1 with every step:
DDPM's fixed-small process). Both run on a :func:`~fmm.diffusion.schedule.spaced` schedule
to take fewer steps. :func:`compile_step` compiles a step with ``fullgraph=True``;
:func:`sample` runs one from pure noise.

Example::

    s = spaced(gaussian_schedule(cosine_betas(1000)), 50)
    step = compile_step(functools.partial(ddim_step, denoise, schedule=s, eta=0.0))
    x0 = sample(step, params, fmm.random.normal(k0, (16, 3, 64, 64)), k1, cond, steps=s.steps)
"""

from __future__ import annotations

import types
from typing import Any

import torch

from fmm import checks, random
from fmm.diffusion.interface import Cond, Denoise, Step
from fmm.diffusion.predict import predict_noise, predict_x0, reverse_step_moments
from fmm.diffusion.schedule import Schedule, at

__all__ = ["compile_step", "ddim_moments", "ddim_step", "ddpm_moments", "ddpm_step", "sample"]


def _timesteps(schedule: Schedule, x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """The denoiser's ``t: [B]`` for the 0-d index ``i``."""
    return schedule.timesteps[i].expand(x.shape[0])


def _indices(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    return i.expand(x.shape[0])


def _check_step(schedule: Schedule, x: torch.Tensor, i: torch.Tensor) -> None:
    # Named here: past this point a bad index fails inside torch's indexing (IndexError)
    # and a bad x inside the denoiser, under the denoiser's own argument names. Under
    # compile_step only the static part runs (the range check needs the value).
    checks.check_float("x", x, ("batch", "channels", "height", "width"))
    checks.check_ids("i", i, (), high=schedule.steps, hint="the schedule index, a 0-d tensor")


def _step_noise(key: torch.Tensor, i: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return random.normal(random.fold_in(key, i), x.shape, dtype=x.dtype)


def ddpm_moments(
    denoise: Denoise,
    params: Any,
    x: torch.Tensor,
    i: torch.Tensor,
    cond: Cond = None,
    *,
    schedule: Schedule,
    prediction: str = "noise",
    learned_variance: bool = False,
    clip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation ``[B, C, H, W]`` of DDPM's step from index ``i`` (std 0
    at ``i = 0``: the last step returns the mean)."""
    _check_step(schedule, x, i)
    idx = _indices(x, i)
    out = denoise(params, x, _timesteps(schedule, x, i), cond)
    mean, log_variance, _ = reverse_step_moments(
        schedule, out, x, idx, prediction=prediction, learned_variance=learned_variance, clip=clip
    )
    last = (idx == 0).reshape(-1, *(1,) * (x.ndim - 1))
    std = torch.where(last, torch.zeros_like(log_variance), (0.5 * log_variance).exp())
    return mean, std


def ddpm_step(
    denoise: Denoise,
    params: Any,
    x: torch.Tensor,
    i: torch.Tensor,
    key: torch.Tensor,
    cond: Cond = None,
    *,
    schedule: Schedule,
    prediction: str = "noise",
    learned_variance: bool = False,
    clip: bool = False,
) -> torch.Tensor:
    """One ancestral step: ``mean + std * noise`` (:func:`ddpm_moments`), the noise drawn
    from ``fold_in(key, i)``. ``x: [B, C, H, W]`` -> the same shape."""
    mean, std = ddpm_moments(
        denoise,
        params,
        x,
        i,
        cond,
        schedule=schedule,
        prediction=prediction,
        learned_variance=learned_variance,
        clip=clip,
    )
    return mean + std * _step_noise(key, i, x)


def ddim_moments(
    denoise: Denoise,
    params: Any,
    x: torch.Tensor,
    i: torch.Tensor,
    cond: Cond = None,
    *,
    schedule: Schedule,
    prediction: str = "noise",
    eta: float = 0.0,
    clip: bool = False,
    learned_variance: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of DDIM's step from index ``i`` to ``i - 1`` (Song et
    al.'s eq. 12): ``sqrt(ᾱ') x0 + sqrt(1 - ᾱ' - σ²) ε``, ``σ = eta · sqrt((1 - ᾱ/ᾱ')(1 -
    ᾱ')/(1 - ᾱ))`` with ``ᾱ' = 1`` past the first step. A learned variance's channels are
    ignored (DDIM sets its own)."""
    _check_step(schedule, x, i)
    idx = _indices(x, i)
    out = denoise(params, x, _timesteps(schedule, x, i), cond)
    if learned_variance:
        out = out.chunk(2, dim=1)[0]
    x0 = predict_x0(schedule, prediction, out, x, idx, clip=clip)
    eps = predict_noise(schedule, prediction, out, x, idx, clip=clip)
    a = at(schedule.alphas_cumprod, idx, x)
    a_prev = at(schedule.alphas_cumprod_prev, idx, x)
    sigma = eta * ((1 - a / a_prev) * (1 - a_prev) / (1 - a)).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    return mean.to(x.dtype), sigma.expand_as(x).to(x.dtype)


def ddim_step(
    denoise: Denoise,
    params: Any,
    x: torch.Tensor,
    i: torch.Tensor,
    key: torch.Tensor,
    cond: Cond = None,
    *,
    schedule: Schedule,
    prediction: str = "noise",
    eta: float = 0.0,
    clip: bool = False,
    learned_variance: bool = False,
) -> torch.Tensor:
    """One DDIM step, ``mean + σ * noise`` (:func:`ddim_moments`); with ``eta = 0`` it draws
    nothing and is deterministic. ``x: [B, C, H, W]`` -> the same shape."""
    mean, std = ddim_moments(
        denoise,
        params,
        x,
        i,
        cond,
        schedule=schedule,
        prediction=prediction,
        eta=eta,
        clip=clip,
        learned_variance=learned_variance,
    )
    if eta == 0.0:
        return mean
    return mean + std * _step_noise(key, i, x)


def _run(step, params, x, i, key, cond):
    return step(params, x, i, key, cond)


def compile_step(step: Step, backend: Any = "inductor") -> Step:
    """``step`` compiled whole (``fullgraph=True``, static shapes): it compiles at the first
    call and, ``i`` being a tensor, never again for the same shapes.

    Each call compiles over a fresh copy of a small runner's code: dynamo counts graphs
    against its recompile limit per code object, so samplers built in one process (different
    denoisers, schedules, tests) never use up the limit for one another.
    """
    own = types.FunctionType(_run.__code__.replace(), _run.__globals__, "diffusion_step")
    compiled = torch.compile(own, fullgraph=True, dynamic=False, backend=backend)

    def run(params, x, i, key, cond=None):
        return compiled(step, params, x, i, key, cond)

    return run


def sample(
    step: Step,
    params: Any,
    x: torch.Tensor,
    key: torch.Tensor,
    cond: Cond = None,
    *,
    steps: int,
) -> torch.Tensor:
    """Run ``step`` from index ``steps - 1`` down to 0, starting at ``x: [B, C, H, W]``
    (pure noise ``fmm.random.normal(k, shape)`` for generation); returns the last ``x``."""
    checks.check_float("x", x, ("batch", "channels", "height", "width"))
    for i in reversed(range(steps)):
        x = step(params, x, torch.tensor(i, dtype=torch.int64, device=x.device), key, cond)
    return x
