"""The latent-diffusion VAE as pure functions: ``init``, ``encode`` (a diagonal Gaussian
posterior), ``sample_posterior``, ``decode``, ``apply``, ``loss``.

Images are ``[B, C, H, W]`` in ``[-1, 1]``; latents ``[B, embedding_channels, H/f, W/f]``
with ``f = cfg.downsample``. Param tree (PyTorch layouts)::

    encoder.inp                     [widths[0], in_channels, 3, 3]
    encoder.levels.N.stages.M       residual blocks (no conditioning)
    encoder.levels.N.down.conv      a stride-2 convolution (all levels but the last)
    encoder.mid.res1 / attn / res2  attention over the pixels at the lowest resolution
    encoder.norm / encoder.out      [2 * z_channels, widths[-1], 3, 3]
    encoder.moments                 [2 * embedding_channels, 2 * z_channels, 1, 1]
    decoder.latent                  [z_channels, embedding_channels, 1, 1]
    decoder.inp / decoder.mid
    decoder.levels.N.stages.M       res_blocks + 1 residual blocks per level
    decoder.levels.N.up.conv        nearest 2x, then a convolution (all levels but the last)
    decoder.norm / decoder.out      [out_channels, widths[1], 3, 3] (and decoder.alpha [1, ...])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fmm import checks, random
from fmm.nn import conv
from fmm.nn.norm import group_norm, init_group_norm
from fmm.nn.transformer import BlockFn
from models.adm import layers
from models.adm.config import VAEConfig
from models.family import Field

Params = dict[str, Any]


def _mid(width: int, key: torch.Tensor, dtype: torch.dtype) -> Params:
    k = lambda name: random.fold_in(key, name)
    return {
        "res1": layers.init_res_block(width, width, k("res1"), dtype=dtype),
        "attn": layers.init_attention_block(width, k("attn"), dtype=dtype),
        "res2": layers.init_res_block(width, width, k("res2"), dtype=dtype),
    }


def _decoder_widths(cfg: VAEConfig) -> tuple[int, ...]:
    """The decoder's widths: its input convolution's, then each level's output."""
    m = cfg.multipliers
    return tuple(cfg.channels * x for x in (m[-1], *reversed(m)))


def init(cfg: VAEConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params for ``cfg``, each subtree keyed by its path.

    Example: ``params = init(vae_tiny(), fmm.random.key(0))``.
    """
    checks.check_type("cfg", cfg, VAEConfig)
    k = lambda path: random.fold_in(key, path)
    last = len(cfg.multipliers) - 1

    def levels(part: str, widths: tuple[int, ...], blocks: int, resample: str) -> list[Params]:
        out = []
        for i in range(len(cfg.multipliers)):
            c_in, c_out = widths[i], widths[i + 1]
            p = f"{part}.levels.{i}"
            level: Params = {"stages": [
                layers.init_res_block(c_in if j == 0 else c_out, c_out, k(f"{p}.stages.{j}"), dtype=dtype)
                for j in range(blocks)
            ]}  # fmt: skip
            if i < last:
                level[resample] = layers.init_resample_conv(
                    c_out, k(f"{p}.{resample}"), dtype=dtype
                )
            out.append(level)
        return out

    enc, dec = cfg.widths, _decoder_widths(cfg)
    z, e = cfg.z_channels, cfg.embedding_channels
    encoder = {
        "inp": conv.init_conv2d(cfg.in_channels, enc[0], 3, k("encoder.inp"), dtype=dtype),
        "levels": levels("encoder", enc, cfg.res_blocks, "down"),
        "mid": _mid(enc[-1], k("encoder.mid"), dtype),
        "norm": init_group_norm(enc[-1], device=key.device, dtype=dtype),
        "out": conv.init_conv2d(enc[-1], 2 * z, 3, k("encoder.out"), dtype=dtype),
        "moments": conv.init_conv2d(2 * z, 2 * e, 1, k("encoder.moments"), dtype=dtype),
    }
    decoder = {
        "latent": conv.init_conv2d(e, z, 1, k("decoder.latent"), dtype=dtype),
        "inp": conv.init_conv2d(z, dec[0], 3, k("decoder.inp"), dtype=dtype),
        "mid": _mid(dec[0], k("decoder.mid"), dtype),
        "levels": levels("decoder", dec, cfg.res_blocks + 1, "up"),
        "norm": init_group_norm(dec[-1], device=key.device, dtype=dtype),
        "out": conv.init_conv2d(dec[-1], cfg.out_channels, 3, k("decoder.out"), dtype=dtype),
    }
    if cfg.alpha_channel:
        decoder["alpha"] = conv.init_conv2d(dec[-1], 1, 3, k("decoder.alpha"), dtype=dtype)
    return {"encoder": encoder, "decoder": decoder}


def _blocks(p: Params, h: torch.Tensor, cfg: VAEConfig, key, train) -> torch.Tensor:
    for j, block in enumerate(p):
        k = None if key is None else random.fold_in(key, j)
        h = layers.res_block(
            block, h, groups=cfg.groups, eps=cfg.eps, dropout=cfg.dropout, key=k, train=train
        )
    return h


def _mid_apply(p: Params, h: torch.Tensor, cfg: VAEConfig, key, train) -> torch.Tensor:
    k = (None, None) if key is None else (random.fold_in(key, 1), random.fold_in(key, 2))
    h = _blocks([p["res1"]], h, cfg, k[0], train)
    h = layers.attention_block(p["attn"], h, heads=1, groups=cfg.groups, eps=cfg.eps)
    return _blocks([p["res2"]], h, cfg, k[1], train)


def _encode(params: Params, images, cfg: VAEConfig, key=None, train=False):
    p = params["encoder"]
    kk = lambda name: None if key is None else random.fold_in(key, name)
    h = conv.conv2d(p["inp"], images, padding=1)
    for i, level in enumerate(p["levels"]):
        h = _blocks(level["stages"], h, cfg, kk(i), train)
        if "down" in level:
            h = layers.downsample(level["down"], h)
    h = _mid_apply(p["mid"], h, cfg, kk("mid"), train)
    h = conv.conv2d(
        p["out"], F.silu(group_norm(p["norm"], h, groups=cfg.groups, eps=cfg.eps)), padding=1
    )
    mean, log_variance = conv.conv2d(p["moments"], h).chunk(2, dim=1)
    # The clamp keeps exp(log_variance / 2) finite (latent diffusion's bounds).
    return mean, log_variance.clamp(-30.0, 20.0)


def _decode(params: Params, z, cfg: VAEConfig, key=None, train=False):
    p = params["decoder"]
    kk = lambda name: None if key is None else random.fold_in(key, name)
    h = conv.conv2d(p["inp"], conv.conv2d(p["latent"], z), padding=1)
    h = _mid_apply(p["mid"], h, cfg, kk("mid"), train)
    for i, level in enumerate(p["levels"]):
        h = _blocks(level["stages"], h, cfg, kk(i), train)
        if "up" in level:
            h = layers.upsample(level["up"], h)
    h = F.silu(group_norm(p["norm"], h, groups=cfg.groups, eps=cfg.eps))
    out = conv.conv2d(p["out"], h, padding=1)
    if "alpha" in p:
        out = torch.cat([out, conv.conv2d(p["alpha"], h, padding=1)], dim=1)
    return out


def _check_images(params: Params, images, cfg: VAEConfig, name: str) -> None:
    like = params["encoder"]["inp"]["weight"]
    checks.check_float(name, images, ("batch", cfg.in_channels, "height", "width"), like=like)
    if images.shape[-1] % cfg.downsample or images.shape[-2] % cfg.downsample:
        raise ValueError(
            f"{name} must have height and width divisible by {cfg.downsample}, "
            f"got {list(images.shape)}"
        )


def encode(
    params: Params, images: torch.Tensor, *, cfg: VAEConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior of ``images: [B, C, H, W]``: ``(mean, log_variance)``, each
    ``[B, embedding_channels, H/f, W/f]`` (the log-variance clamped to ``[-30, 20]``).

    Example: ``mean, log_var = encode(params, torch.rand(2, 3, 16, 16) * 2 - 1, cfg=vae_tiny())``.
    """
    checks.check_params(params, init=init, cfg=cfg, only=("encoder",))
    _check_images(params, images, cfg, "images")
    return _encode(params, images, cfg)


def sample_posterior(
    mean: torch.Tensor, log_variance: torch.Tensor, key: torch.Tensor
) -> torch.Tensor:
    """A reparameterised draw ``mean + exp(log_variance / 2) * noise`` (noise from ``key``);
    differentiable in both moments. ``mean``, ``log_variance``: ``[B, ...]`` of one shape
    (:func:`encode`'s ``[B, C, h, w]``, or any) -> that shape."""
    checks.check_float("mean", mean, ("batch", *("size",) * (getattr(mean, "ndim", 1) - 1)))
    checks.check_float("log_variance", log_variance, tuple(mean.shape), hint="mean's shape")
    noise = random.normal(key, mean.shape, dtype=mean.dtype)
    return mean + (0.5 * log_variance).exp() * noise


def decode(params: Params, z: torch.Tensor, *, cfg: VAEConfig) -> torch.Tensor:
    """Images from latents ``z: [B, embedding_channels, h, w] -> [B, out_channels (+1 alpha),
    h * f, w * f]`` (not clamped)."""
    checks.check_params(params, init=init, cfg=cfg, only=("decoder",))
    like = params["decoder"]["latent"]["weight"]
    checks.check_float("z", z, ("batch", cfg.embedding_channels, "height", "width"), like=like)
    return _decode(params, z, cfg)


def apply(
    params: Params,
    images: torch.Tensor,
    *,
    cfg: VAEConfig,
    key: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Encode, draw from the posterior (with ``key``; its mean without) and decode.

    Returns ``{"reconstruction": [B, C, H, W], "z", "mean", "log_variance"}`` (latent-shaped).
    """
    checks.check_params(params, init=init, cfg=cfg)
    _check_images(params, images, cfg, "images")
    mean, log_variance = _encode(params, images, cfg)
    z = mean if key is None else sample_posterior(mean, log_variance, key)
    return {"reconstruction": _decode(params, z, cfg), "z": z, "mean": mean,
            "log_variance": log_variance}  # fmt: skip


def kl_to_standard_normal(mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, exp(log_variance)) || N(0, 1))`` summed over every latent of an example,
    ``[B, ...] -> [B]``."""
    kl = 0.5 * (mean.pow(2) + log_variance.exp() - 1.0 - log_variance)
    return kl.flatten(1).sum(1)


def batch_fields(cfg: VAEConfig) -> dict[str, Field]:
    """The batch :func:`loss` reads: ``images [batch, C, H, W]`` in ``[-1, 1]``."""
    c, s = cfg.in_channels, cfg.image_size
    return {"images": Field("float", ("batch", c, s, s), doc="pixels in [-1, 1]")}


def loss(
    params: Params,
    batch: dict[str, torch.Tensor],
    *,
    cfg: VAEConfig,
    key: torch.Tensor | None = None,
    train: bool = True,
    block_fn: BlockFn | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``reconstruction MSE + kl_weight * KL`` of ``batch = {"images": [B, C, H, W]}``, the
    reconstruction decoded from a posterior draw (``key``; the mean when ``key`` is None or
    not ``train``). The KL is per example, averaged over the batch. Returns ``(loss [],
    {"recon_mse", "kl"})``. ``block_fn`` is the contract's: there is no transformer stack.

    (Latent diffusion trains its autoencoder with a perceptual and an adversarial term
    besides; this is the part that needs no second network.)
    """
    del block_fn  # see the docstring
    checks.check_keys(batch, ("images",))
    checks.check_params(params, init=init, cfg=cfg)
    images = batch["images"]
    _check_images(params, images, cfg, "batch['images']")
    if train and cfg.dropout > 0.0 and key is None:
        raise ValueError("key= is missing: VAE dropout in training needs key=")
    k = (
        (None, None)
        if key is None
        else (random.fold_in(key, "encoder"), random.fold_in(key, "decoder"))
    )
    mean, log_variance = _encode(params, images, cfg, k[0], train)
    z = (
        mean
        if key is None or not train
        else sample_posterior(mean, log_variance, random.fold_in(key, "posterior"))
    )
    out = _decode(params, z, cfg, k[1], train)
    # In at least float32: a bf16 run's sums over every pixel and latent would round.
    work = torch.promote_types(out.dtype, torch.float32)
    recon = F.mse_loss(out[:, : images.shape[1]].to(work), images.to(work))
    kl = kl_to_standard_normal(mean.to(work), log_variance.to(work)).mean()
    return recon + cfg.kl_weight * kl, {"recon_mse": recon.detach(), "kl": kl.detach()}
