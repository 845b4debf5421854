"""VQ-VAE as pure functions: ``init``, ``encode``, ``decode``, ``apply``, ``loss``,
``update_codebook``.

Images are pixels ``[B, C, H, W]`` in ``[0, 1]``; codes are int64 ``[B, grid, grid]``.
Param tree (PyTorch layouts)::

    encoder.down.N.weight     [channels[N], prev, 4, 4]     stride-2 convolutions
    encoder.res.N.conv1/conv2 residual blocks at the code resolution
    encoder.out.weight        [code_dim, channels[-1], 1, 1]
    codebook.weight           [codebook_size, code_dim]     set by update_codebook, never by grads
    decoder.inp.weight        [channels[-1], code_dim, 3, 3]
    decoder.res.N.conv1/conv2
    decoder.up.N.weight       [prev, next, 4, 4]            stride-2 transposed convolutions

The codebook's EMA statistics are not params: they are the state returned by
:func:`init_codebook_state` and threaded through :func:`update_codebook`.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from fmm import checks, random
from fmm.losses.vq import commitment_loss, reconstruction_loss
from fmm.nn import codebook as vq
from fmm.nn import conv
from fmm.nn.transformer import BlockFn
from models.family import Field
from models.vqvae.config import VQVAEConfig

Params = dict[str, Any]
State = dict[str, torch.Tensor]

# Centre pixels so the first convolution sees zero-mean inputs; decode adds it back.
_PIXEL_SHIFT = 0.5


def init(cfg: VQVAEConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params for ``cfg``, each subtree keyed by its path.

    Example: ``params = init(vqvae_shapes(), fmm.random.key(0))``.
    """
    checks.check_type("cfg", cfg, VQVAEConfig)
    ke, kd = random.fold_in(key, "encoder"), random.fold_in(key, "decoder")
    top = cfg.channels[-1]
    widths = (cfg.in_channels, *cfg.channels)
    encoder = {
        "down": [
            conv.init_conv2d(c_in, c_out, 4, random.fold_in(ke, f"down.{i}"), dtype=dtype)
            for i, (c_in, c_out) in enumerate(pairwise(widths))
        ],
        "res": [
            conv.init_res_block(top, cfg.res_hidden, random.fold_in(ke, f"res.{i}"), dtype=dtype)
            for i in range(cfg.res_blocks)
        ],
        "out": conv.init_conv2d(top, cfg.code_dim, 1, random.fold_in(ke, "out"), dtype=dtype),
    }
    rev = widths[::-1]
    decoder = {
        "inp": conv.init_conv2d(cfg.code_dim, top, 3, random.fold_in(kd, "inp"), dtype=dtype),
        "res": [
            conv.init_res_block(top, cfg.res_hidden, random.fold_in(kd, f"res.{i}"), dtype=dtype)
            for i in range(cfg.res_blocks)
        ],
        "up": [
            conv.init_conv_transpose2d(c_in, c_out, 4, random.fold_in(kd, f"up.{i}"), dtype=dtype)
            for i, (c_in, c_out) in enumerate(pairwise(rev))
        ],
    }
    book = vq.init_codebook(
        cfg.codebook_size, cfg.code_dim, random.fold_in(key, "codebook"), dtype=dtype
    )
    return {"encoder": encoder, "codebook": book, "decoder": decoder}


def init_codebook_state(params: Params) -> State:
    """The codebook's EMA statistics ``{"cluster_size": [K], "embed_sum": [K, code_dim]}``."""
    checks.check_keys(params, ("codebook",), name="params")
    return vq.init_ema_state(params["codebook"])


def _check_images(params: Params, images: torch.Tensor, cfg: VQVAEConfig, name: str) -> None:
    want = ("batch", cfg.in_channels, cfg.image_size, cfg.image_size)
    checks.check_float(name, images, want, like=params["encoder"]["down"][0]["weight"])


def _encode_latents(params: Params, images: torch.Tensor) -> torch.Tensor:
    p = params["encoder"]
    h = images - _PIXEL_SHIFT
    for i, layer in enumerate(p["down"]):
        h = conv.conv2d(layer, h, stride=2, padding=1)
        if i < len(p["down"]) - 1:
            h = F.relu(h)
    for block in p["res"]:
        h = conv.res_block(block, h)
    h = conv.conv2d(p["out"], F.relu(h))
    return rearrange(h, "b d h w -> b h w d")


def _decode_latents(params: Params, z_q: torch.Tensor) -> torch.Tensor:
    p = params["decoder"]
    h = conv.conv2d(p["inp"], rearrange(z_q, "b h w d -> b d h w"), padding=1)
    for block in p["res"]:
        h = conv.res_block(block, h)
    for layer in p["up"]:
        h = conv.conv_transpose2d(layer, F.relu(h), stride=2, padding=1)
    return h + _PIXEL_SHIFT


def encode_latents(params: Params, images: torch.Tensor, *, cfg: VQVAEConfig) -> torch.Tensor:
    """Continuous encoder outputs, channels last: ``[B, C, H, W] -> [B, grid, grid, code_dim]``."""
    checks.check_params(params, init=init, cfg=cfg, only=("encoder",))
    _check_images(params, images, cfg, "images")
    return _encode_latents(params, images)


def decode_latents(params: Params, z_q: torch.Tensor, *, cfg: VQVAEConfig) -> torch.Tensor:
    """Pixels from code vectors: ``[B, grid, grid, code_dim] -> [B, C, H, W]`` (not clamped)."""
    checks.check_params(params, init=init, cfg=cfg, only=("decoder",))
    checks.check_float(
        "z_q", z_q, ("batch", cfg.grid, cfg.grid, cfg.code_dim),
        like=params["decoder"]["inp"]["weight"],
    )  # fmt: skip
    return _decode_latents(params, z_q)


def encode(params: Params, images: torch.Tensor, *, cfg: VQVAEConfig) -> torch.Tensor:
    """Discrete codes of ``images: [B, C, H, W]`` in ``[0, 1]``: int64 ``[B, grid, grid]``.

    Example: ``codes = encode(params, torch.rand(2, 3, 32, 32), cfg=vqvae_shapes())  # [2, 8, 8]``.
    """
    checks.check_params(params, init=init, cfg=cfg, only=("encoder", "codebook"))
    _check_images(params, images, cfg, "images")
    return vq.nearest_codes(params["codebook"], _encode_latents(params, images))


def decode(params: Params, codes: torch.Tensor, *, cfg: VQVAEConfig) -> torch.Tensor:
    """Pixels of ``codes``: int64 ``[B, grid, grid]`` -> ``[B, C, H, W]`` (about ``[0, 1]``)."""
    checks.check_params(params, init=init, cfg=cfg, only=("codebook", "decoder"))
    checks.check_int("codes", codes, ("batch", cfg.grid, cfg.grid))
    return _decode_latents(params, vq.lookup(params["codebook"], codes))


def _apply(params: Params, images: torch.Tensor) -> dict[str, torch.Tensor]:
    z = _encode_latents(params, images)
    z_st, codes, z_q = vq.quantize(params["codebook"], z)
    return {"reconstruction": _decode_latents(params, z_st), "codes": codes, "z": z, "z_q": z_q}


def apply(params: Params, images: torch.Tensor, *, cfg: VQVAEConfig) -> dict[str, torch.Tensor]:
    """Encode, quantise (straight-through) and decode ``images: [B, C, H, W]``.

    Returns ``{"reconstruction": [B, C, H, W], "codes": [B, g, g], "z": [B, g, g, D],
    "z_q": [B, g, g, D]}``.
    """
    checks.check_params(params, init=init, cfg=cfg)
    _check_images(params, images, cfg, "images")
    return _apply(params, images)


def batch_fields(cfg: VQVAEConfig) -> dict[str, Field]:
    """The batch :func:`loss` reads: ``images [batch, C, H, W]`` float pixels in ``[0, 1]``."""
    c, s = cfg.in_channels, cfg.image_size
    return {"images": Field("float", ("batch", c, s, s), doc="pixels in [0, 1]")}


def loss(
    params: Params,
    batch: dict[str, torch.Tensor],
    *,
    cfg: VQVAEConfig,
    key: torch.Tensor | None = None,
    train: bool = True,
    block_fn: BlockFn | None = None,
    state: State | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``reconstruction MSE + commitment * commitment loss`` of ``batch = {"images": [B, C, H, W]}``.

    Returns ``(loss [], metrics)`` with ``recon_mse``, ``commitment`` and the batch's code
    ``perplexity`` (0-d), plus ``aux = {"images": [B, C, H, W]}``, what :func:`update_state`
    needs after the optimizer step. The codebook gets no gradient: :func:`update_codebook`
    moves it. ``key``, ``train``, ``block_fn`` and ``state`` are the contract's: nothing
    here is stochastic, there is no transformer stack, and the loss reads no EMA statistics.

    Example: ``value, metrics = loss(params, {"images": x}, cfg=vqvae_shapes())``.
    """
    del key, train, block_fn, state  # see the docstring
    checks.check_keys(batch, ("images",))
    checks.check_params(params, init=init, cfg=cfg)
    _check_images(params, batch["images"], cfg, "batch['images']")
    out = _apply(params, batch["images"])
    recon = reconstruction_loss(out["reconstruction"], batch["images"])
    commit = commitment_loss(out["z"], out["z_q"])
    usage = vq.code_usage(out["codes"], cfg.codebook_size)
    metrics = {
        "recon_mse": recon.detach(),
        "commitment": commit.detach(),
        "perplexity": usage["perplexity"],
        "aux": {"images": batch["images"].detach()},
    }
    return recon + cfg.commitment * commit, metrics


def update_codebook(
    params: Params,
    state: State,
    images: torch.Tensor,
    *,
    cfg: VQVAEConfig,
    key: torch.Tensor,
) -> tuple[Params, State, dict[str, torch.Tensor]]:
    """One EMA step of the codebook on ``images: [B, C, H, W]``, then dead-code restarts.

    Pure: returns ``(new_params, new_state, {"restarted": [] int64})``; ``params`` and
    ``state`` are left untouched. Call it after each optimizer step.

    Example::

        state, metrics = step(state, batch)
        params, ema, _ = update_codebook(state["params"], ema, batch["images"], cfg=cfg, key=k)
    """
    checks.check_params(params, init=init, cfg=cfg)
    _check_images(params, images, cfg, "images")
    checks.check_keys(state, ("cluster_size", "embed_sum"), name="state")
    with torch.no_grad():
        z = _encode_latents(params, images)
        codes = vq.nearest_codes(params["codebook"], z)
        state = vq.ema_update(state, z, codes, decay=cfg.decay)
        state, dead = vq.restart_dead_codes(state, z, key, threshold=cfg.dead_threshold)
        weight = vq.codebook_from_ema(state, eps=cfg.eps)
    new_params = {**params, "codebook": {"weight": weight}}
    return new_params, state, {"restarted": dead.sum()}


def init_state(cfg: VQVAEConfig, params: Params, key: torch.Tensor) -> State:
    """The family's train state: the codebook's EMA statistics (:func:`init_codebook_state`).
    ``cfg`` and ``key`` are the contract's; the statistics start from the codebook alone."""
    del cfg, key  # see the docstring
    return init_codebook_state(params)


def update_state(
    state: State,
    params: Params,
    aux: dict[str, torch.Tensor],
    *,
    cfg: VQVAEConfig,
    key: torch.Tensor,
) -> tuple[Params, State]:
    """After the optimizer step: :func:`update_codebook` on the step's images (``aux`` from
    :func:`loss`), encoded by the *new* ``params``. Returns ``(params, state)`` with the
    codebook set from the updated EMA and dead codes restarted (``key`` draws the restarts).

    Example::

        state, metrics = step(state, batch)
        params, ema = update_state(ema, state["params"], metrics.pop("aux"), cfg=cfg, key=k)
    """
    checks.check_keys(aux, ("images",), name="aux")
    new_params, new_state, _ = update_codebook(params, state, aux["images"], cfg=cfg, key=key)
    return new_params, new_state
