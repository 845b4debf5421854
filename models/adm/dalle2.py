"""The DALL-E 2 decoder's conditioning: CLIP image embeddings from fmm's CLIP.

The decoder itself is an ADM U-Net with a condition and a null embedding (the
``dalle2_decoder`` / ``dalle2_tiny`` presets of :mod:`models.adm.unet`); what makes it
DALL-E 2's is what it is conditioned on: the CLIP image embedding of the image it learns to
produce (at sampling time, a prior's embedding of a caption). Guidance is
``fmm.diffusion``'s transform over :func:`models.adm.unet.apply`, with
:func:`models.adm.unet.null_condition` as the unconditional rows.

Example::

    cond = clip_condition(clip_params, images, clip_cfg=clip_tiny(), cfg=dalle2_tiny())
    out = unet.apply(params, x_t, t, cond, cfg=dalle2_tiny())
"""

from __future__ import annotations

from typing import Any

import torch

from fmm import checks
from models import clip
from models.adm.config import ADMConfig


def clip_condition(
    clip_params: Any, images: torch.Tensor, *, clip_cfg: clip.CLIPConfig, cfg: ADMConfig
) -> dict[str, torch.Tensor]:
    """``{cfg.cond_key: [B, embed_dim]}``: the unit-norm CLIP image embeddings of ``images:
    [B, 3, H, W]`` (what ``models.clip.encode_image`` takes), computed without gradients (the
    decoder trains on a frozen CLIP), in the embeddings' dtype.

    Example: ``batch |= clip_condition(clip_params, pixels, clip_cfg=clip_tiny(), cfg=cfg)``.
    """
    checks.check_type("cfg", cfg, ADMConfig)
    checks.check_type("clip_cfg", clip_cfg, clip.CLIPConfig)
    # Named here: clip.encode_image would call them "params".
    checks.check_params(clip_params, init=clip.init, cfg=clip_cfg, only=("image",),
                        name="clip_params")  # fmt: skip
    if cfg.embed_dim != clip_cfg.embed_dim:
        raise ValueError(
            f"clip_cfg: its embed_dim={clip_cfg.embed_dim} is not the decoder's "
            f"embed_dim={cfg.embed_dim}"
        )
    with torch.no_grad():
        embeddings = clip.encode_image(clip_params, images, cfg=clip_cfg)
    return {cfg.cond_key: embeddings}
