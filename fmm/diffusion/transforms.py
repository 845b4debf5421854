"""Transforms of a denoiser (or of a sampler step): guidance, super-resolution, inpainting.

Each takes a function and returns one with the same signature, so they stack and a sampler
never knows: ``denoise(params, x_t, t, cond) -> out`` (see :mod:`fmm.diffusion`) or
``step(params, x, i, key, cond) -> x_prev`` (see :mod:`fmm.diffusion.samplers`).

- :func:`classifier_free_guidance`: conditional and unconditional rows in one batch,
  ``out = cond + (scale - 1) · (cond - uncond)`` (scale 1 is the conditional model, 0 the
  unconditional one); :func:`drop_condition` is its training half.
- :func:`super_resolution`: ``cond["low_res"]`` upsampled to ``x_t``'s size and
  concatenated as channels; :func:`low_resolution` makes training inputs.
- :func:`inpaint_conditioning`: for a network trained to inpaint, ``[x_t, image · known,
  known]`` as channels (Palette / GLIDE).
- :func:`inpaint`: any denoiser inpaints by replacement: before each step the known region
  of ``x`` is re-noised from the given image to that step's level, and the last step
  returns the image there. It must change the sampler's own ``x``, so it wraps a step.

Example::

    guided = classifier_free_guidance(denoise, 3.0, null={"text": null_text})   # [1, D]
    step = inpaint(functools.partial(ddpm_step, guided, schedule=s), s)
    x = sample(step, params, noise, key, {"text": text, "image": img, "known": known},
               steps=s.steps)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from fmm import checks, random
from fmm.diffusion.interface import Cond, Denoise, Step
from fmm.diffusion.schedule import Schedule, noised

__all__ = [
    "classifier_free_guidance",
    "drop_condition",
    "inpaint",
    "inpaint_conditioning",
    "low_resolution",
    "super_resolution",
]

Null = Mapping[str, torch.Tensor] | Callable[[Any], Mapping[str, torch.Tensor]]


def _without(cond: Cond, names: tuple[str, ...]) -> Cond:
    """``cond`` less ``names``; ``None`` if nothing is left (the unconditional call)."""
    rest = {k: v for k, v in (cond or {}).items() if k not in names}
    return rest or None


def _null_of(null: Null, params: Any) -> Mapping[str, torch.Tensor]:
    # A learned null embedding lives in the params, so it may be a function of them.
    return null(params) if callable(null) else null


def classifier_free_guidance(
    denoise: Denoise,
    scale: float | torch.Tensor,
    *,
    null: Null,
    learned_variance: bool = False,
) -> Denoise:
    """``denoise`` guided by ``scale`` (Ho & Salimans): one call on ``2B`` rows, the first
    ``B`` conditioned on ``cond``, the last ``B`` on ``null``.

    ``null``: the unconditional value of each guided key (``{"text": [1, D]}``, broadcast to
    the rows), or a function of the params returning it (a learned null embedding). Keys of
    ``cond`` not in ``null`` go to both halves unchanged. With ``learned_variance`` only the
    prediction channels are guided; the variance channels are the conditional rows'.
    A ``scale`` tensor (0-d) lets one compiled step serve every scale.
    TorchMultimodal's ``CFGuidance(guidance=w)`` is ``scale = 1 + w``.
    """

    def guided(params: Any, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        if not cond:
            return denoise(params, x, t, cond)
        uncond = _null_of(null, params)
        both = {
            k: torch.cat([v, uncond[k].expand_as(v) if k in uncond else v]) for k, v in cond.items()
        }
        out = denoise(params, torch.cat([x, x]), torch.cat([t, t]), both)
        c, u = out.chunk(2)
        if not learned_variance:
            return c + (scale - 1) * (c - u)
        (c, variance), u = c.chunk(2, dim=1), u.chunk(2, dim=1)[0]
        return torch.cat([c + (scale - 1) * (c - u), variance], dim=1)

    return guided


def drop_condition(
    key: torch.Tensor, cond: Mapping[str, torch.Tensor], null: Mapping[str, torch.Tensor], p: float
) -> dict[str, torch.Tensor]:
    """Classifier-free guidance's training: each row's guided keys (those in ``null``)
    replaced by the null value with probability ``p``, one draw per row shared by all keys.

    Example: ``cond = drop_condition(fold_in(key, "cfg"), {"text": e}, {"text": null}, 0.1)``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    rows = next(iter(cond.values())).shape[0]
    drop = random.bernoulli(key, p, (rows,))
    out = dict(cond)
    for k, v in null.items():
        checks.check_keys(cond, (k,), name="cond")
        mask = drop.to(cond[k].device).reshape(-1, *(1,) * (cond[k].ndim - 1))
        out[k] = torch.where(mask, v.to(cond[k].dtype).expand_as(cond[k]), cond[k])
    return out


def super_resolution(
    denoise: Denoise,
    *,
    mode: str = "bicubic",
    antialias: bool = True,
    align_corners: bool = False,
    clamp: tuple[float, float] | None = None,
) -> Denoise:
    """A super-resolution denoiser: ``cond["low_res"]: [B, C, h, w]`` is resized to ``x_t``'s
    size (``F.interpolate`` with ``mode``, ``antialias``, ``align_corners``), clamped to
    ``clamp`` if given, and concatenated after ``x_t``'s channels; the wrapped network sees
    ``[B, 2C, H, W]`` and the rest of ``cond``. A missing ``low_res`` reads as zeros (an
    unconditional row)."""

    def upscaled(params: Any, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        low = (cond or {}).get("low_res")
        if low is None:
            low = torch.zeros_like(x)
        checks.check_float("low_res", low, (x.shape[0], x.shape[1], "height", "width"))
        if low.shape[-2:] != x.shape[-2:]:
            low = F.interpolate(
                low, size=x.shape[-2:], mode=mode, antialias=antialias, align_corners=align_corners
            )
            if clamp is not None:
                low = low.clamp(*clamp)
        return denoise(params, torch.cat([x, low], dim=1), t, _without(cond, ("low_res",)))

    return upscaled


def low_resolution(
    x: torch.Tensor, size: int | tuple[int, int], *, mode: str = "bicubic", antialias: bool = True
) -> torch.Tensor:
    """``x: [B, C, H, W]`` downsampled to ``size``: the ``low_res`` a super-resolution model
    trains on. Example: ``{"low_res": low_resolution(images, 16)}``."""
    checks.check_float("x", x, ("batch", "channels", "height", "width"))
    return F.interpolate(x, size=size, mode=mode, antialias=antialias)


def _image_and_known(cond: Cond, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    checks.check_keys(cond, ("image", "known"), name="cond")
    image, known = cond["image"], cond["known"]
    checks.check_float("image", image, tuple(x.shape))
    checks.check_shape("known", known, (x.shape[0], 1, x.shape[2], x.shape[3]))
    return image, known


def inpaint_conditioning(denoise: Denoise) -> Denoise:
    """A network trained to inpaint sees ``[x_t, image · known, known]`` (``2C + 1``
    channels; ``cond["image"]: [B, C, H, W]``, ``cond["known"]: [B, 1, H, W]``, 1 where the
    pixel is given). Without them it sees zeros there (nothing given)."""

    def conditioned(params: Any, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        if cond and "image" in cond and "known" in cond:
            image, known = _image_and_known(cond, x)
            known = known.to(x.dtype)
            given = image * known
        else:
            known, given = torch.zeros_like(x[:, :1]), torch.zeros_like(x)
        extra = torch.cat([x, given, known], dim=1)
        return denoise(params, extra, t, _without(cond, ("image", "known")))

    return conditioned


def inpaint(step: Step, schedule: Schedule) -> Step:
    """A sampler step that keeps ``cond["image"]`` where ``cond["known"]`` is set.

    Before the step at index ``i`` the known region of ``x`` becomes ``q_sample(image, i)``
    (noise from ``fold_in(fold_in(key, "inpaint"), i)``, apart from the step's own), so
    the network sees the image at the noise level it expects; after the last step it is
    the image itself. ``schedule`` is the step's own (spaced) schedule. The wrapped step
    gets ``cond`` without ``image`` and ``known``.
    """

    def painted(
        params: Any, x: torch.Tensor, i: torch.Tensor, key: torch.Tensor, cond: Cond = None
    ) -> torch.Tensor:
        image, known = _image_and_known(cond, x)
        known = known.to(torch.bool)
        noise = random.normal(random.fold_in(random.fold_in(key, "inpaint"), i), x.shape)
        level = noised(schedule, image, i.expand(x.shape[0]), noise.to(x.dtype))
        out = step(params, torch.where(known, level, x), i, key, _without(cond, ("image", "known")))
        return torch.where(known & (i == 0), image, out)

    return painted
