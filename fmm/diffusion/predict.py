"""What a denoiser predicts, and the conversions between noise, v and x0.

A denoiser is trained to predict one of three quantities of ``x_t = sqrt(ᾱ) x0 + sqrt(1-ᾱ) ε``:

- ``"noise"``: ``ε`` (Ho et al.),
- ``"x0"``: the clean data,
- ``"v"``: ``sqrt(ᾱ) ε - sqrt(1-ᾱ) x0`` (Salimans & Ho), whose scale stays even as the
  signal-to-noise ratio falls.

Given ``x_t`` any one determines the others; :func:`predict_x0` and :func:`predict_noise`
recover them, :func:`target` builds a training target, :func:`convert` maps one to another
(round trips are the identity up to rounding). :func:`split_output` reads ADM's learned
variance channels; :func:`reverse_step_moments` turns a denoiser's output into the mean and
log-variance of ``p(x_{t-1} | x_t)``.

Example::

    x0_hat = predict_x0(s, "v", out, x_t, t, clip=True)      # [B, C, H, W]
    v = convert(s, eps, x_t, t, source="noise", to="v")
"""

from __future__ import annotations

import torch

from fmm.diffusion.schedule import Schedule, at, q_posterior

__all__ = [
    "PREDICTIONS",
    "convert",
    "predict_noise",
    "predict_x0",
    "reverse_step_moments",
    "split_output",
    "target",
]

PREDICTIONS = ("noise", "v", "x0")


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {list(PREDICTIONS)}, got {prediction!r}")


def target(
    schedule: Schedule, prediction: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """The quantity a ``prediction`` model is trained to output for ``x_t`` noised from
    ``x0`` with ``noise`` (all ``[B, C, H, W]``, ``t: [B]``)."""
    _check_prediction(prediction)
    if prediction == "noise":
        return noise
    if prediction == "x0":
        return x0
    v = (
        at(schedule.sqrt_alphas_cumprod, t, x0) * noise
        - at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0
    )
    return v.to(x0.dtype)


def predict_x0(
    schedule: Schedule,
    prediction: str,
    out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    clip: bool = False,
) -> torch.Tensor:
    """``x0`` implied by the model output ``out`` (a ``prediction``) at ``x_t``; with
    ``clip``, clamped to the data range ``[-1, 1]``. Shapes ``[B, C, H, W]``, ``t: [B]``."""
    _check_prediction(prediction)
    if prediction == "noise":
        x0 = (
            at(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - at(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * out
        )
    elif prediction == "v":
        x0 = (
            at(schedule.sqrt_alphas_cumprod, t, x_t) * x_t
            - at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * out
        )
    else:
        x0 = out
    return (x0.clamp(-1.0, 1.0) if clip else x0).to(x_t.dtype)


def predict_noise(
    schedule: Schedule,
    prediction: str,
    out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    clip: bool = False,
) -> torch.Tensor:
    """``ε`` implied by ``out`` at ``x_t``. With ``clip``, a ``v`` or ``x0`` model's noise
    is the one consistent with the clamped ``x0``; a noise model's own prediction is kept
    (both as TorchMultimodal's predictors do)."""
    _check_prediction(prediction)
    if prediction == "noise":
        return out
    if prediction == "v" and not clip:
        # Direct, better conditioned than dividing by sqrt(1/ᾱ - 1) near t = 0.
        noise = (
            at(schedule.sqrt_alphas_cumprod, t, x_t) * out
            + at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
        )
        return noise.to(x_t.dtype)
    x0 = predict_x0(schedule, prediction, out, x_t, t, clip=clip)
    noise = (at(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / at(
        schedule.sqrt_recipm1_alphas_cumprod, t, x_t
    )
    return noise.to(x_t.dtype)


def convert(
    schedule: Schedule,
    out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    source: str,
    to: str,
) -> torch.Tensor:
    """``out``, a ``source`` prediction at ``x_t``, as the ``to`` prediction.

    Example: ``convert(s, v, x_t, t, source="v", to="noise")``.
    """
    _check_prediction(to)
    x0 = predict_x0(schedule, source, out, x_t, t)
    noise = predict_noise(schedule, source, out, x_t, t)
    return target(schedule, to, x0, noise, t)


def split_output(
    out: torch.Tensor, *, learned_variance: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A denoiser's ``out: [B, C', H, W]`` as ``(prediction [B, C, H, W], variance_value)``.

    With ``learned_variance`` (ADM's learned range), ``C' = 2C`` and the second half, read
    as values in ``[-1, 1]``, becomes ``variance_value = (v + 1) / 2`` in ``[0, 1]``: the
    interpolation weight between the lower and upper log-variance bounds. Otherwise
    ``(out, None)``.
    """
    if not learned_variance:
        return out, None
    if out.shape[1] % 2:
        raise ValueError(
            f"out must have an even channel count with learned_variance, got {list(out.shape)}"
        )
    prediction, value = out.chunk(2, dim=1)
    return prediction, (value + 1.0) / 2.0


def reverse_step_moments(
    schedule: Schedule,
    out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    prediction: str = "noise",
    learned_variance: bool = False,
    clip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean, log_variance, x0)`` of the model's ``p(x_{t-1} | x_t)``: the posterior
    ``q(x_{t-1} | x_t, x0)`` at the predicted ``x0``, with the learned or the schedule's
    fixed variance. ``out`` is the raw denoiser output; all ``[B, C, H, W]``."""
    pred, value = split_output(out, learned_variance=learned_variance)
    x0 = predict_x0(schedule, prediction, pred, x_t, t, clip=clip)
    mean, log_variance = q_posterior(schedule, x0, x_t, t, value)
    return mean, log_variance, x0
