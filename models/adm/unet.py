"""The ADM U-Net as pure functions: ``init``, ``apply`` (a denoiser in
``fmm.diffusion``'s sense), ``split_output``, ``null_condition``, ``loss``.

Param tree (PyTorch layouts)::

    time.fc1 / time.fc2            timestep MLP: [cond_dim, time_embed_dim], [cond_dim, cond_dim]
    cond.res / cond.attn           (embed_dim) the condition -> cond_dim, and -> cond_tokens tokens
    null                           (null_embedding) [embed_dim], the dropped condition
    inp                            [channels[0], in_channels, 3, 3]
    down.N.stages.M.res / .attn    encoder level N: residual blocks, attention if attention[N]
    down.N.down                    a downsampling residual block (N < num_resize)
    mid.res1 / mid.attn / mid.res2
    up.N.stages.M.res / .attn      decoder level N (deepest first): res_blocks + 1 blocks,
                                   each reading one skip from the encoder
    up.N.up                        an upsampling residual block (N < num_resize)
    out.norm / out.conv            [out_channels, channels[0], 3, 3]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from fmm import checks, random
from fmm.diffusion import schedule as sched
from fmm.diffusion.losses import diffusion_loss
from fmm.diffusion.transforms import drop_condition
from fmm.nn import conv
from fmm.nn.linear import init_linear, linear
from fmm.nn.norm import group_norm, init_group_norm
from fmm.nn.transformer import BlockFn
from models.adm import layers
from models.adm.config import ADMConfig
from models.family import Field

Params = dict[str, Any]


def _skip_widths(cfg: ADMConfig) -> list[int]:
    """Widths of the encoder outputs the decoder reads, in the order they are made: one per
    decoder block (``1 + L * res_blocks + (L - 1)`` for ``L`` levels)."""
    widths = [cfg.channels[0]]
    for level, width in enumerate(cfg.channels):
        widths += [width] * cfg.res_blocks + ([width] if level < cfg.num_resize else [])
    return widths


def init(cfg: ADMConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params for ``cfg``, each subtree keyed by its path.

    Example: ``params = init(adm_tiny(), fmm.random.key(0))``.
    """
    checks.check_type("cfg", cfg, ADMConfig)
    k = lambda path: random.fold_in(key, path)
    attn_cond = cfg.cond_dim if cfg.embed_dim is not None else None
    res = lambda c_in, c_out, path: layers.init_res_block(
        c_in, c_out, k(path), cond_dim=cfg.cond_dim, dtype=dtype
    )
    attn = lambda c, path: layers.init_attention_block(
        c, k(path), heads=cfg.heads, cond_dim=attn_cond, dtype=dtype
    )

    def block(c_in: int, level: int, path: str) -> Params:
        c_out = cfg.channels[level]
        out = {"res": res(c_in, c_out, f"{path}.res")}
        if cfg.attention[level]:
            out["attn"] = attn(c_out, f"{path}.attn")
        return out

    params: Params = {
        "time": {
            "fc1": init_linear(cfg.time_embed_dim, cfg.cond_dim, k("time.fc1"), dtype=dtype),
            "fc2": init_linear(cfg.cond_dim, cfg.cond_dim, k("time.fc2"), dtype=dtype),
        },
    }
    if cfg.embed_dim is not None:
        params["cond"] = {
            "res": init_linear(cfg.embed_dim, cfg.cond_dim, k("cond.res"), dtype=dtype),
            "attn": init_linear(
                cfg.embed_dim, cfg.cond_tokens * cfg.cond_dim, k("cond.attn"), dtype=dtype
            ),
        }
    if cfg.null_embedding:
        # TorchMultimodal's CFGuidance starts it uniform in [0, 1) and learns it.
        params["null"] = random.uniform(k("null"), (cfg.embed_dim,), dtype=dtype)
    params["inp"] = conv.init_conv2d(cfg.in_channels, cfg.channels[0], 3, k("inp"), dtype=dtype)
    down, width = [], cfg.channels[0]
    for level, c in enumerate(cfg.channels):
        p = f"down.{level}"
        blocks = [
            block(width if j == 0 else c, level, f"{p}.stages.{j}") for j in range(cfg.res_blocks)
        ]
        down.append({"stages": blocks})
        if level < cfg.num_resize:
            down[-1]["down"] = res(c, c, f"{p}.down")
        width = c
    top = cfg.channels[-1]
    params["down"] = down
    params["mid"] = {"res1": res(top, top, "mid.res1"), "attn": attn(top, "mid.attn"),
                     "res2": res(top, top, "mid.res2")}  # fmt: skip
    skips, up, width = _skip_widths(cfg), [], top
    for i, level in enumerate(reversed(range(len(cfg.channels)))):
        p, blocks = f"up.{i}", []
        for j in range(cfg.res_blocks + 1):
            blocks.append(block(width + skips.pop(), level, f"{p}.stages.{j}"))
            width = cfg.channels[level]
        up.append({"stages": blocks})
        if i < cfg.num_resize:
            up[-1]["up"] = res(width, width, f"{p}.up")
    params["up"] = up
    params["out"] = {
        "norm": init_group_norm(width, device=key.device, dtype=dtype),
        "conv": conv.init_conv2d(width, cfg.out_channels, 3, k("out.conv"), dtype=dtype),
    }
    return params


def _condition(params: Params, cond: dict | None, batch: int, cfg: ADMConfig):
    """The condition embedding ``[B, embed_dim]`` a call runs on, or None: ``cond[cond_key]``
    when given, else the null embedding (a missing condition is the unconditional model,
    as in TorchMultimodal's CFGuidance)."""
    if cfg.embed_dim is None:
        return None
    c = None if cond is None else cond.get(cfg.cond_key)
    if c is None and cfg.null_embedding:
        c = params["null"].expand(batch, -1)
    return c


def _join(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """A decoder block's input ``[B, C_h + C_skip, H, W]``: ``h`` and the encoder's ``skip``.

    Compiled, the concatenation is pinned channels-last: inductor lays a CPU graph's
    convolutions out channels-last but writes a channel concatenation contiguous, so each
    decoder convolution would read a transposed input.
    """
    out = torch.cat([h, skip], dim=1)
    if torch.compiler.is_compiling():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _apply(params, x, t, cond, cfg: ADMConfig, key, train) -> torch.Tensor:
    g, eps, heads = cfg.groups, cfg.eps, cfg.heads
    p = params["time"]
    feats = layers.timestep_features(t, cfg.time_embed_dim).to(p["fc1"]["weight"].dtype)
    emb = linear(p["fc2"], F.silu(linear(p["fc1"], feats)))
    tokens = None
    c = _condition(params, cond, x.shape[0], cfg)
    if c is not None:
        emb = emb + linear(params["cond"]["res"], c)
        tokens = rearrange(linear(params["cond"]["attn"], c), "b (t d) -> b t d", t=cfg.cond_tokens)
    calls = [0]  # one dropout key per residual block, by call order

    def res(block, h, resample=None):
        calls[0] += 1
        k = None if key is None else random.fold_in(key, calls[0])
        return layers.res_block(
            block, h, emb, groups=g, eps=eps, resample=resample,
            dropout=cfg.dropout, key=k, train=train,
        )  # fmt: skip

    def stage(block, h):
        h = res(block["res"], h)
        if "attn" in block:
            h = layers.attention_block(block["attn"], h, tokens, heads=heads, groups=g, eps=eps)
        return h

    h = conv.conv2d(params["inp"], x, padding=1)
    skips = [h]
    for level in params["down"]:
        for block in level["stages"]:
            h = stage(block, h)
            skips.append(h)
        if "down" in level:
            h = res(level["down"], h, "down")
            skips.append(h)
    mid = params["mid"]
    h = res(mid["res1"], h)
    h = layers.attention_block(mid["attn"], h, tokens, heads=heads, groups=g, eps=eps)
    h = res(mid["res2"], h)
    for level in params["up"]:
        for block in level["stages"]:
            h = stage(block, _join(h, skips.pop()))
        if "up" in level:
            h = res(level["up"], h, "up")
    h = F.silu(group_norm(params["out"]["norm"], h, groups=g, eps=eps))
    return conv.conv2d(params["out"]["conv"], h, padding=1)


def _check_inputs(
    params: Params, x, t, cond, cfg: ADMConfig, name: str = "x_t", cond_name: str = "cond"
) -> None:
    like = params["inp"]["weight"]
    checks.check_float(name, x, ("batch", cfg.in_channels, "height", "width"), like=like)
    side = 2**cfg.num_resize
    if x.shape[-1] % side or x.shape[-2] % side:
        raise ValueError(
            f"{name} must have height and width divisible by {side} (2 ** num_resize), "
            f"got {list(x.shape)}"
        )
    if t is not None:
        # The sinusoids would take any integer, but a t outside [0, timesteps) is no step
        # the U-Net was trained on (a sampler passes schedule.timesteps[i], never past T).
        checks.check_ids("t", t, (x.shape[0],), high=cfg.timesteps, of=name)
    if cfg.embed_dim is not None and cond is not None and cond.get(cfg.cond_key) is not None:
        checks.check_float(
            f"{cond_name}[{cfg.cond_key!r}]", cond[cfg.cond_key], (x.shape[0], cfg.embed_dim),
            like=like,
        )  # fmt: skip
    elif cfg.embed_dim is not None and not cfg.null_embedding:
        raise ValueError(
            f"{cond_name} must hold {cfg.cond_key!r}: [batch, {cfg.embed_dim}] (this U-Net has no "
            "null embedding to stand in for a missing condition)"
        )


def apply(
    params: Params,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: dict[str, torch.Tensor] | None = None,
    *,
    cfg: ADMConfig,
    key: torch.Tensor | None = None,
    train: bool = False,
) -> torch.Tensor:
    """The U-Net on noised images ``x_t: [B, in_channels, H, W]`` at timesteps ``t: [B]``
    (int64): ``[B, out_channels, H, W]``, the prediction then (``learned_variance``) the
    variance values in ``[-1, 1]`` (``fmm.diffusion.predict.split_output`` splits them).

    ``cond``: ``{cfg.cond_key: [B, embed_dim]}`` for a conditioned U-Net; absent or None,
    the null embedding stands in (``null_embedding``). Other keys are ignored. ``key``
    draws the residual blocks' dropout when ``train``. With ``cfg`` bound this is a
    denoiser of ``fmm.diffusion``: ``functools.partial(apply, cfg=cfg)``.

    Example: ``out = apply(params, torch.randn(2, 3, 16, 16), torch.tensor([0, 999]),
    cfg=adm_tiny())  # [2, 6, 16, 16]``.
    """
    checks.check_params(params, init=init, cfg=cfg)
    _check_inputs(params, x_t, t, cond, cfg)
    return _apply(params, x_t, t, cond, cfg, key, train)


def null_condition(params: Params, *, cfg: ADMConfig) -> dict[str, torch.Tensor]:
    """The unconditional ``cond``: ``{cfg.cond_key: the null embedding [1, embed_dim]}``,
    broadcast to any batch. It is the ``null=`` of ``fmm.diffusion``'s guidance::

        guided = classifier_free_guidance(
            functools.partial(apply, cfg=cfg), 8.0, learned_variance=cfg.learned_variance,
            null=functools.partial(null_condition, cfg=cfg))
    """
    if not cfg.null_embedding:
        raise ValueError("null_condition: this U-Net has no null embedding (cfg.null_embedding)")
    return {cfg.cond_key: params["null"][None]}


def schedule(cfg: ADMConfig) -> sched.Schedule:
    """The noise schedule the loss trains on: ``cfg.timesteps`` steps of Nichol & Dhariwal's
    cosine schedule (DALL-E 2's decoder; ``variance_range=1`` as the learned range's upper
    bound is beta)."""
    return sched.gaussian_schedule(sched.cosine_betas(cfg.timesteps), variance_range=1.0)


def batch_fields(cfg: ADMConfig) -> dict[str, Field]:
    """The batch :func:`loss` reads: ``images [batch, C, H, W]`` in ``[-1, 1]`` (for latent
    diffusion, the VAE's latents) and, for a conditioned U-Net, ``batch[cfg.cond_key]
    [batch, embed_dim]`` (optional with a null embedding: absent, every row is
    unconditional)."""
    c, s = cfg.in_channels, cfg.image_size
    fields = {"images": Field("float", ("batch", c, s, s), doc="images in [-1, 1]")}
    if cfg.embed_dim is not None:
        fields[cfg.cond_key] = Field(
            "float", ("batch", cfg.embed_dim), optional=cfg.null_embedding,
            doc="the condition (DALL-E 2: the CLIP image embedding)",
        )  # fmt: skip
    return fields


def loss(
    params: Params,
    batch: dict[str, torch.Tensor],
    *,
    cfg: ADMConfig,
    key: torch.Tensor | None = None,
    train: bool = True,
    block_fn: BlockFn | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The diffusion loss of ``batch`` (:func:`batch_fields`) on the cosine
    :func:`schedule`: ``fmm.diffusion.losses.diffusion_loss`` of ``cfg.prediction`` under
    ``cfg.snr_gamma`` (and the hybrid loss with a learned variance). ``key`` draws the
    timesteps, the noise, the dropped conditions and the dropout; it is required (the loss
    is a draw). ``block_fn`` is the contract's: the U-Net has no transformer stack.

    Returns ``(loss [], {"mse", ...})``.
    Example: ``value, metrics = loss(params, {"images": x}, cfg=adm_tiny(), key=key(0))``.
    """
    del block_fn  # see the docstring
    if key is None:
        raise ValueError("key= is missing: the diffusion loss draws timesteps and noise")
    checks.check_keys(batch, ("images",))
    checks.check_params(params, init=init, cfg=cfg)
    images = batch["images"]
    cond = {k: v for k, v in batch.items() if k == cfg.cond_key}
    _check_inputs(params, images, None, cond, cfg, name="batch['images']", cond_name="batch")
    if cfg.cond_dropout > 0.0 and train and cond:
        null = null_condition(params, cfg=cfg)
        cond = drop_condition(random.fold_in(key, "cond"), cond, null, cfg.cond_dropout)
    k_net = random.fold_in(key, "dropout")

    def denoise(p, x_t, t, c):
        return _apply(p, x_t, t, c, cfg, k_net, train)

    return diffusion_loss(
        denoise, params, images, random.fold_in(key, "diffusion"), cond or None,
        schedule=schedule(cfg), prediction=cfg.prediction, learned_variance=cfg.learned_variance,
        snr_gamma=cfg.snr_gamma,
    )  # fmt: skip
