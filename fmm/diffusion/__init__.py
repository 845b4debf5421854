"""Gaussian diffusion as pure functions: schedules, noising, predictors, losses, samplers.

Nothing here is a network. A network enters through one interface, the **denoiser**::

    denoise(params, x_t, t, cond) -> out

- ``params``: the network's param pytree (whatever its ``init`` returned).
- ``x_t: [B, C, H, W]`` float: the noised input at step ``t`` (for latent diffusion, the
  latents; for super-resolution and conditioned inpainting, the transforms below hand the
  network its extra channels, so ``C`` is what the network was built for).
- ``t: [B]`` int64: the training-schedule timestep of each row, in ``[0, T)`` (a sampler on
  a spaced schedule passes the original timesteps, ``schedule.timesteps[i]``).
- ``cond: dict[str, Tensor] | None``: conditioning, every value with ``B`` rows first
  (``{"text": [B, D]}``, ``{"image_embed": [B, D]}``, ...). A denoiser ignores keys it does
  not know; ``None`` (or an unconditional row, see :func:`classifier_free_guidance`) means
  unconditional.
- ``out: [B, C', H, W]``: the prediction of ``x_t``'s noise, ``v`` or ``x0`` (which one is
  the caller's ``prediction=`` choice, see :mod:`fmm.diffusion.predict`), ``C' = C``; with a
  learned variance (ADM's "learned range"), ``C' = 2 C``: the prediction, then per channel
  a value in ``[-1, 1]`` interpolating the log-variance between the posterior's lower and
  upper bounds.

It is a pure function: no RNG (samplers draw noise from explicit keys), no state, so a
sampler step that calls it compiles once with ``fullgraph=True``. A family adapts its
``apply`` to it with ``functools.partial`` or a two-line function.

Transforms take a denoiser and return one with the same signature (classifier-free
guidance, super-resolution conditioning, mask-conditioned inpainting); replacement
inpainting must also change the sampler's ``x_t``, so it transforms a sampler step.

Modules: ``schedule`` (betas, :class:`Schedule`, ``spaced``, ``q_sample``, ``q_posterior``),
``predict`` (noise / v / x0 and the learned variance), ``losses`` (simple, hybrid),
``samplers`` (DDPM, DDIM, ``compile_step``, ``sample``), ``transforms`` (guidance,
super-resolution, inpainting), ``interface`` (the ``Denoise`` / ``Step`` types). The tour
is ``docs/diffusion.md``.
"""

from fmm.diffusion.losses import (
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    min_snr_weights,
    normal_kl,
    simple_loss,
    vlb_terms,
)
from fmm.diffusion.predict import (
    PREDICTIONS,
    convert,
    predict_noise,
    predict_x0,
    reverse_step_moments,
    split_output,
    target,
)
from fmm.diffusion.samplers import (
    compile_step,
    ddim_moments,
    ddim_step,
    ddpm_moments,
    ddpm_step,
    sample,
)
from fmm.diffusion.schedule import (
    Schedule,
    cosine_betas,
    gaussian_schedule,
    linear_betas,
    noised,
    q_posterior,
    q_sample,
    quadratic_betas,
    sample_timesteps,
    sigmoid_betas,
    snr,
    spaced,
)
from fmm.diffusion.transforms import (
    classifier_free_guidance,
    drop_condition,
    inpaint,
    inpaint_conditioning,
    low_resolution,
    super_resolution,
)

__all__ = ["Schedule", "cosine_betas", "gaussian_schedule", "linear_betas", "noised"]
__all__ += ["q_posterior", "q_sample", "quadratic_betas", "sample_timesteps", "sigmoid_betas"]
__all__ += ["PREDICTIONS", "convert", "predict_noise", "predict_x0", "spaced"]
__all__ += ["reverse_step_moments", "split_output", "target"]
__all__ += ["diffusion_loss", "discretized_gaussian_log_likelihood", "hybrid_loss"]
__all__ += ["min_snr_weights", "snr"]
__all__ += ["normal_kl", "simple_loss", "vlb_terms"]
__all__ += ["compile_step", "ddim_moments", "ddim_step", "ddpm_moments", "ddpm_step", "sample"]
__all__ += ["classifier_free_guidance", "drop_condition", "inpaint", "inpaint_conditioning"]
__all__ += ["low_resolution", "super_resolution"]
