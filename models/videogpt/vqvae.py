"""VideoGPT's video VQ-VAE as pure functions: ``init``, ``encode``, ``decode``, ``apply``,
``loss`` and the train state (EMA codebook, batch-norm running statistics).

Videos are ``[B, C, T, H, W]`` floats (the recipe centres pixels on 0); codes are int64
``[B, t, h, w]``. Param tree (TorchMultimodal's layouts)::

    encoder.convs.N           SAME-padded 3-d convs, ReLU between
    encoder.res.N             norm1, conv1 [h/2, h, 3,3,3], norm2, conv2 [h, h/2, 1,1,1],
                              norm3, attn (axial over T, H, W)   x + block(x)
    encoder.norm, encoder.out batch norm, ReLU, 1x1x1 conv to code_dim
    codebook.weight           [codebook_size, code_dim]  set from EMA statistics, never by grads
    decoder.inp, decoder.res.N, decoder.norm, decoder.up.N   (transposed convs, ReLU between)

Batch norms use the batch's statistics when ``train`` and their running statistics
otherwise; the running statistics, like the codebook, move only in :func:`update_state`.
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
from fmm.nn import norm
from fmm.nn.axial import axial_attention, init_axial_attention
from fmm.nn.conv3d import conv3d, conv_transpose3d, init_conv3d, init_conv_transpose3d
from fmm.nn.transformer import BlockFn
from models.family import Field
from models.videogpt.config import VideoVQVAEConfig

Params = dict[str, Any]
State = dict[str, torch.Tensor]
# Batch statistics collected by a forward, one (mean, var) per batch norm, in call order.
Stats = list[tuple[torch.Tensor, torch.Tensor]]


def _init_res(h: int, key: torch.Tensor, dtype) -> Params:
    dev = key.device
    return {
        "norm1": norm.init_batch_norm(h, device=dev, dtype=dtype),
        "conv1": init_conv3d(h, h // 2, 3, random.fold_in(key, "conv1"), bias=False, dtype=dtype),
        "norm2": norm.init_batch_norm(h // 2, device=dev, dtype=dtype),
        "conv2": init_conv3d(h // 2, h, 1, random.fold_in(key, "conv2"), bias=False, dtype=dtype),
        "norm3": norm.init_batch_norm(h, device=dev, dtype=dtype),
        "attn": init_axial_attention(h, 3, random.fold_in(key, "attn"), dtype=dtype),
    }


def init(cfg: VideoVQVAEConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params for ``cfg``, each subtree keyed by its path.

    Example: ``params = init(video_vqvae_shapes(), fmm.random.key(0))``.
    """
    checks.check_type("cfg", cfg, VideoVQVAEConfig)
    ke, kd, h = random.fold_in(key, "encoder"), random.fold_in(key, "decoder"), cfg.attn_hidden
    n_down = len(cfg.down_kernels)
    widths = (cfg.in_channels, *(cfg.encoder_hidden,) * n_down, h)
    kernels = (*cfg.down_kernels, cfg.encoder_kernel)
    res = lambda k: [
        _init_res(h, random.fold_in(k, f"res.{i}"), dtype) for i in range(cfg.res_layers)
    ]
    encoder = {
        "convs": [
            init_conv3d(a, b, kernels[i], random.fold_in(ke, f"convs.{i}"), dtype=dtype)
            for i, (a, b) in enumerate(pairwise(widths))
        ],
        "res": res(ke),
        "norm": norm.init_batch_norm(h, device=key.device, dtype=dtype),
        "out": init_conv3d(h, cfg.code_dim, 1, random.fold_in(ke, "out"), dtype=dtype),
    }
    up = (h, *(cfg.decoder_hidden,) * (n_down - 1), cfg.in_channels)
    decoder = {
        "inp": init_conv3d(cfg.code_dim, h, 1, random.fold_in(kd, "inp"), dtype=dtype),
        "res": res(kd),
        "norm": norm.init_batch_norm(h, device=key.device, dtype=dtype),
        "up": [
            init_conv_transpose3d(
                a, b, cfg.down_kernels[i], random.fold_in(kd, f"up.{i}"), dtype=dtype
            )
            for i, (a, b) in enumerate(pairwise(up))
        ],
    }
    book = vq.init_codebook(
        cfg.codebook_size, cfg.code_dim, random.fold_in(key, "codebook"), dtype=dtype
    )
    return {"encoder": encoder, "codebook": book, "decoder": decoder}


def _bn(p: Params, x: torch.Tensor, train: bool, stats: Stats | None) -> torch.Tensor:
    if stats is not None:
        stats.append(norm.batch_statistics(x.detach()))
    return F.relu(norm.batch_norm(p, x, train=train))


def _res_stack(p: Params, h: torch.Tensor, cfg: VideoVQVAEConfig, train, stats) -> torch.Tensor:
    for block in p["res"]:
        y = conv3d(block["conv1"], _bn(block["norm1"], h, train, stats))
        y = conv3d(block["conv2"], _bn(block["norm2"], y, train, stats))
        y = rearrange(_bn(block["norm3"], y, train, stats), "b c t h w -> b t h w c")
        y = axial_attention(block["attn"], y, heads=cfg.heads)
        h = h + rearrange(y, "b t h w c -> b c t h w")
    return _bn(p["norm"], h, train, stats)


def _encode_latents(params, videos, cfg: VideoVQVAEConfig, train=False, stats=None):
    p = params["encoder"]
    h = videos
    for i, (layer, stride) in enumerate(zip(p["convs"], cfg.strides)):
        h = conv3d(layer, h, stride=stride)
        if i < len(p["convs"]) - 1:
            h = F.relu(h)
    h = conv3d(p["out"], _res_stack(p, h, cfg, train, stats))
    return rearrange(h, "b d t h w -> b t h w d")


def _decode_latents(params, z_q, cfg: VideoVQVAEConfig, train=False, stats=None):
    p = params["decoder"]
    h = conv3d(p["inp"], rearrange(z_q, "b t h w d -> b d t h w"))
    h = _res_stack(p, h, cfg, train, stats)
    for i, (layer, stride) in enumerate(zip(p["up"], cfg.down_strides)):
        h = conv_transpose3d(layer, h, stride=stride)
        if i < len(p["up"]) - 1:
            h = F.relu(h)
    return h


def _check_videos(params: Params, videos, cfg: VideoVQVAEConfig, name: str) -> None:
    want = ("batch", cfg.in_channels, cfg.frames, cfg.image_size, cfg.image_size)
    checks.check_float(name, videos, want, like=params["encoder"]["convs"][0]["weight"])


def encode(params: Params, videos: torch.Tensor, *, cfg: VideoVQVAEConfig) -> torch.Tensor:
    """Codes of ``videos: [B, C, T, H, W]``: int64 ``[B, t, h, w]`` (``cfg.latent_shape``).

    Example: ``codes = encode(params, torch.rand(2, 3, 8, 32, 32) - 0.5, cfg=cfg)  # [2, 4, 8, 8]``.
    """
    checks.check_params(params, init=init, cfg=cfg, only=("encoder", "codebook"))
    _check_videos(params, videos, cfg, "videos")
    return vq.nearest_codes(params["codebook"], _encode_latents(params, videos, cfg))


def decode(params: Params, codes: torch.Tensor, *, cfg: VideoVQVAEConfig) -> torch.Tensor:
    """Videos of ``codes``: int64 ``[B, t, h, w]`` (or ``[B, t*h*w]``) -> ``[B, C, T, H, W]``."""
    checks.check_params(params, init=init, cfg=cfg, only=("codebook", "decoder"))
    if isinstance(codes, torch.Tensor) and codes.ndim == 2:
        checks.check_int("codes", codes, ("batch", cfg.latent_len))
        codes = codes.reshape(codes.shape[0], *cfg.latent_shape)
    checks.check_int("codes", codes, ("batch", *cfg.latent_shape))
    return _decode_latents(params, vq.lookup(params["codebook"], codes), cfg)


def _apply(params, videos, cfg, train=False, stats=None) -> dict[str, torch.Tensor]:
    z = _encode_latents(params, videos, cfg, train, stats)
    z_st, codes, z_q = vq.quantize(params["codebook"], z)
    recon = _decode_latents(params, z_st, cfg, train, stats)
    return {"reconstruction": recon, "codes": codes, "z": z, "z_q": z_q}


def apply(
    params: Params, videos: torch.Tensor, *, cfg: VideoVQVAEConfig, train: bool = False
) -> dict[str, torch.Tensor]:
    """Encode, quantise (straight-through) and decode ``videos: [B, C, T, H, W]``.

    Returns ``{"reconstruction": [B, C, T, H, W], "codes": [B, t, h, w], "z", "z_q": [B, t,
    h, w, code_dim]}``. ``train``: batch norms use this batch's statistics.
    """
    checks.check_params(params, init=init, cfg=cfg)
    _check_videos(params, videos, cfg, "videos")
    return _apply(params, videos, cfg, train)


def batch_fields(cfg: VideoVQVAEConfig) -> dict[str, Field]:
    """The batch :func:`loss` reads: ``videos [batch, C, T, H, W]`` float pixels."""
    shape = ("batch", cfg.in_channels, cfg.frames, cfg.image_size, cfg.image_size)
    return {"videos": Field("float", shape, doc="pixels, centred on 0")}


def loss(
    params: Params,
    batch: dict[str, torch.Tensor],
    *,
    cfg: VideoVQVAEConfig,
    key: torch.Tensor | None = None,
    train: bool = True,
    block_fn: BlockFn | None = None,
    state: State | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``reconstruction MSE + commitment * commitment loss`` of ``batch = {"videos": ...}``.

    Returns ``(loss [], metrics)``: ``recon_mse``, ``commitment``, code ``perplexity`` and
    ``aux = {"videos"}`` for :func:`update_state`. ``key``, ``block_fn`` and ``state`` are
    the contract's: nothing is stochastic, there is no transformer stack, no EMA is read.
    """
    del key, block_fn, state  # see the docstring
    checks.check_keys(batch, ("videos",))
    checks.check_params(params, init=init, cfg=cfg)
    _check_videos(params, batch["videos"], cfg, "batch['videos']")
    out = _apply(params, batch["videos"], cfg, train)
    recon = reconstruction_loss(out["reconstruction"], batch["videos"])
    commit = commitment_loss(out["z"], out["z_q"])
    metrics = {
        "recon_mse": recon.detach(),
        "commitment": commit.detach(),
        "perplexity": vq.code_usage(out["codes"], cfg.codebook_size)["perplexity"],
        "aux": {"videos": batch["videos"].detach()},
    }
    return recon + cfg.commitment * commit, metrics


def init_state(cfg: VideoVQVAEConfig, params: Params, key: torch.Tensor) -> State:
    """The codebook's EMA statistics ``{"cluster_size": [K], "embed_sum": [K, code_dim]}``;
    ``cfg`` and ``key`` are the contract's."""
    del cfg, key  # see the docstring
    checks.check_keys(params, ("codebook",), name="params")
    return vq.init_ema_state(params["codebook"])


def _norm_paths(params: Params) -> list[tuple[str, ...]]:
    """Where each batch norm lives, in the order a forward calls them."""
    paths = []
    for side in ("encoder", "decoder"):
        for i, _ in enumerate(params[side]["res"]):
            paths += [(side, "res", i, f"norm{j}") for j in (1, 2, 3)]
        paths.append((side, "norm"))
    return paths


def _set(tree: Params, path: tuple, value: Any) -> Params:
    head, *rest = path
    copy = list(tree) if isinstance(tree, list) else dict(tree)
    copy[head] = _set(tree[head], tuple(rest), value) if rest else value
    return copy  # type: ignore[return-value]


def _get(tree: Params, path: tuple) -> Any:
    for step in path:
        tree = tree[step]
    return tree


def update_state(
    state: State, params: Params, aux: dict[str, torch.Tensor], *, cfg: VideoVQVAEConfig,
    key: torch.Tensor,
) -> tuple[Params, State]:  # fmt: skip
    """After the optimizer step, on the step's videos (``aux`` from :func:`loss`) encoded by
    the new ``params``: one EMA step of the codebook with dead-code restarts (``key`` draws
    them), and every batch norm's running statistics moved toward this batch's.

    Pure: returns ``(params, state)``; the inputs are left untouched.
    """
    checks.check_keys(aux, ("videos",), name="aux")
    checks.check_keys(state, ("cluster_size", "embed_sum"), name="state")
    checks.check_params(params, init=init, cfg=cfg)
    with torch.no_grad():
        stats: Stats = []
        out = _apply(params, aux["videos"], cfg, True, stats)
        state = vq.ema_update(state, out["z"], out["codes"], decay=cfg.decay)
        state, _ = vq.restart_dead_codes(state, out["z"], key, threshold=cfg.dead_threshold)
        new = {**params, "codebook": {"weight": vq.codebook_from_ema(state, eps=cfg.eps)}}
        # A forward visits the encoder's norms then the decoder's, in _norm_paths' order.
        for path, (mean, var) in zip(_norm_paths(params), stats, strict=True):
            bn = norm.update_running_stats(_get(new, path), mean, var, momentum=cfg.bn_momentum)
            new = _set(new, path, bn)
    return new, state
