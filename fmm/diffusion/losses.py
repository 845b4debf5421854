"""Training losses of a denoiser: the simple MSE and the hybrid loss with a learned variance.

:func:`simple_loss` is Ho et al.'s MSE on the predicted quantity. :func:`hybrid_loss` adds
Nichol & Dhariwal's variational bound (eq. 16): the KL between the true posterior and the
model's reverse step (the discretised decoder likelihood at ``t = 0``), in bits per
dimension, weighted by ``vlb_weight``; it trains only the learned variance (the mean's
gradient is stopped in it). :func:`min_snr_weights` is Hang et al.'s Min-SNR-γ weighting
("Efficient Diffusion Training via Min-SNR Weighting Strategy"), which both losses take as
``snr_gamma``. :func:`diffusion_loss` runs the whole training draw as one pure function of
a key.

Example::

    loss, metrics = diffusion_loss(denoise, params, x0, key, cond, schedule=s,
                                   prediction="noise", learned_variance=True)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fmm import checks, random
from fmm.diffusion.interface import Cond, Denoise
from fmm.diffusion.predict import _check_prediction, reverse_step_moments, split_output, target
from fmm.diffusion.schedule import Schedule, q_posterior, q_sample, sample_timesteps, snr

__all__ = [
    "diffusion_loss",
    "discretized_gaussian_log_likelihood",
    "hybrid_loss",
    "min_snr_weights",
    "normal_kl",
    "simple_loss",
    "vlb_terms",
]


def normal_kl(
    mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor
) -> torch.Tensor:
    """Elementwise ``KL(N(mean1, e^log_var1) || N(mean2, e^log_var2))`` in nats."""
    return 0.5 * (
        -1.0
        + log_var2
        - log_var1
        + (log_var1 - log_var2).exp()
        + (mean1 - mean2) ** 2 * (-log_var2).exp()
    )


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation of Phi that the ADM/improved-diffusion likelihoods use.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, *, eps: float = 1e-12
) -> torch.Tensor:
    """Elementwise log-likelihood (nats) of data ``x`` in ``[-1, 1]``, quantised to 256
    levels, under ``N(mean, e^(2 log_scale))``; the end bins take the tails."""
    centred = x - mean
    inv_std = (-log_scale).exp()
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=eps).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=eps).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=eps).log()
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


def vlb_terms(
    schedule: Schedule,
    mean: torch.Tensor,
    log_variance: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """``[B]`` terms of the variational bound in bits per dimension: the KL from the true
    posterior to the model's step ``N(mean, e^log_variance)`` where ``t > 0``, the decoder's
    negative log-likelihood of ``x0`` where ``t = 0``."""
    true_mean, true_log_variance = q_posterior(schedule, x0, x_t, t)
    dims = tuple(range(1, x0.ndim))
    kl = normal_kl(true_mean, true_log_variance, mean, log_variance).mean(dims)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance).mean(dims)
    return torch.where(t == 0, nll, kl) / math.log(2.0)


def min_snr_weights(
    schedule: Schedule, prediction: str, t: torch.Tensor, gamma: float
) -> torch.Tensor:
    """``float64 [B]``: Min-SNR-γ loss weights of rows at steps ``t: [B]`` for a
    ``prediction`` model's squared error.

    Every prediction's squared error is that of ``x0`` times a weight of the step: ``SNR``
    for noise, 1 for ``x0``, ``SNR + 1`` for ``v``. Min-SNR-γ makes that effective weight
    ``min(SNR, γ)``, so the nearly clean steps (``SNR`` up to ~1e4), easy but loud, no longer
    outweigh the noisy ones where the layout of the image is decided; the weights here
    divide each prediction's own factor out. Hang et al. use ``γ = 5``.
    Example: ``min_snr_weights(s, "noise", torch.tensor([0, 500, 999]), 5.0)``.
    """
    if not gamma > 0:
        raise ValueError(f"snr_gamma must be > 0, got {gamma}")
    _check_prediction(prediction)
    ratio = snr(schedule, t)
    own = {"noise": ratio, "x0": torch.ones_like(ratio), "v": ratio + 1.0}[prediction]
    return ratio.clamp(max=gamma) / own


def simple_loss(
    schedule: Schedule,
    out: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    *,
    prediction: str = "noise",
    learned_variance: bool = False,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """Mean squared error between the prediction channels of ``out`` and the ``prediction``
    target built from ``x0`` and ``noise`` (all ``[B, C, H, W]``): a scalar. ``snr_gamma``:
    each row's error weighted by :func:`min_snr_weights` (None: unweighted)."""
    pred, _ = split_output(out, learned_variance=learned_variance)
    error = (pred - target(schedule, prediction, x0, noise, t)) ** 2
    if snr_gamma is None:
        return error.mean()
    weights = min_snr_weights(schedule, prediction, t, snr_gamma).to(error.dtype)
    return (error.flatten(1).mean(1) * weights).mean()


def hybrid_loss(
    schedule: Schedule,
    out: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    *,
    prediction: str = "noise",
    vlb_weight: float = 1e-3,
    clip: bool = False,
    snr_gamma: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``simple + vlb_weight * mean(vlb)`` for a learned-variance output ``out: [B, 2C, H, W]``.

    The bound sees the prediction through a stop-gradient, so only the variance channels
    learn from it (the MSE, weighted by ``snr_gamma`` as in :func:`simple_loss`, trains the
    mean). Returns ``(loss, {"mse", "vlb"})``.
    """
    pred, value = out.chunk(2, dim=1)
    mse = simple_loss(schedule, pred, x0, noise, t, prediction=prediction, snr_gamma=snr_gamma)
    frozen = torch.cat([pred.detach(), value], dim=1)
    mean, log_variance, _ = reverse_step_moments(
        schedule, frozen, x_t, t, prediction=prediction, learned_variance=True, clip=clip
    )
    vlb = vlb_terms(schedule, mean, log_variance, x0, x_t, t).mean()
    return mse + vlb_weight * vlb, {"mse": mse.detach(), "vlb": vlb.detach()}


def diffusion_loss(
    denoise: Denoise,
    params: Any,
    x0: torch.Tensor,
    key: torch.Tensor,
    cond: Cond = None,
    *,
    schedule: Schedule,
    prediction: str = "noise",
    learned_variance: bool = False,
    vlb_weight: float = 1e-3,
    snr_gamma: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training draw: steps and noise from ``key``, ``x_t``, the denoiser, the loss.

    ``x0: [B, C, H, W]`` in ``[-1, 1]``. The loss is :func:`hybrid_loss` with a learned
    variance, :func:`simple_loss` otherwise; ``snr_gamma`` weights its MSE by
    :func:`min_snr_weights`. Returns ``(loss, {"mse", ...})``.
    """
    checks.check_float("x0", x0, ("batch", "channels", "height", "width"))
    k_t, k_noise = random.split(key)
    t = sample_timesteps(schedule, k_t, x0.shape[0])
    x_t, noise = q_sample(schedule, x0, t, k_noise)
    out = denoise(params, x_t, t, cond)
    if learned_variance:
        return hybrid_loss(
            schedule, out, x0, x_t, noise, t, prediction=prediction, vlb_weight=vlb_weight,
            snr_gamma=snr_gamma,
        )  # fmt: skip
    mse = simple_loss(schedule, out, x0, noise, t, prediction=prediction, snr_gamma=snr_gamma)
    return mse, {"mse": mse.detach()}
