"""Converters between our ADM / DALL-E 2 decoder / VAE params and TorchMultimodal's state
dicts, written as :class:`fmm.convert.Rule` tables.

- an unconditioned or conditioned U-Net (``null_embedding`` off): ``ADMUNet`` (``adm_unet()``);
- a U-Net with a null embedding: the ``dalle2_decoder()`` sampler, ``DDPModule(CFGuidance(
  ADMUNet))``: the U-Net under ``model.model.``, the null embedding as
  ``model.{train,eval}_unconditional_embedding.<cond_key>`` (one parameter, two names);
- the VAE: ``ldm_variational_autoencoder(...)``'s ``VariationalAutoencoder``.

Their attention keeps separate query, key and value projections, ours one fused ``qkv``;
their VAE attention projects with 1x1 convolutions, ours with linear maps (the same
numbers, ``[C, C, 1, 1]`` against ``[C, C]``). Everything else keeps its layout.

Example::

    params = from_torchmultimodal(tmm_unet.state_dict(), adm_tiny())
    tmm_unet.load_state_dict(to_torchmultimodal(params, adm_tiny()))
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fmm import checks, tree
from fmm.convert import Rule, concat, export_state_dict, import_state_dict, same
from models.adm import unet, vae
from models.adm.config import ADMConfig, VAEConfig

_PARAMS = ("weight", "bias")


def _like(init, cfg) -> dict:
    """The expected tree, shapes only: from ``fmm.checks``' per-config cache, since building
    even a tiny U-Net on the meta device takes a third of a second."""
    shapes = checks.param_shapes(init, cfg)
    return tree.unflatten({k: torch.empty(s, device="meta") for k, s in shapes.items()})


def _pair(ours: str, theirs: str) -> list[Rule]:
    return [same(f"{ours}.{n}", f"{theirs}.{n}") for n in _PARAMS]


def _conv1x1(ours: str, theirs: tuple[str, ...]) -> list[Rule]:
    """Our linear map (``[out, in]``) from 1x1 convolutions (``[out, in, 1, 1]``), fused."""
    n = len(theirs)
    to_theirs = lambda w: tuple(p[:, :, None, None] for p in w.chunk(n, 0))
    return [
        Rule(f"{ours}.weight", tuple(f"{t}.weight" for t in theirs),
             to_ours=lambda *ws: torch.cat([w.flatten(1) for w in ws]), to_theirs=to_theirs),
        concat(f"{ours}.bias", [f"{t}.bias" for t in theirs]),
    ]  # fmt: skip


def _res(ours: str, theirs: str, params: dict, *, norm1: str = "in_block.0",
         conv1: str = "in_block.3", norm2: str = "out_group_norm",
         conv2: str = "out_block.2") -> list[Rule]:  # fmt: skip
    rules = [
        *_pair(f"{ours}.norm1", f"{theirs}.{norm1}"),
        *_pair(f"{ours}.conv1", f"{theirs}.{conv1}"),
        *_pair(f"{ours}.norm2", f"{theirs}.{norm2}"),
        *_pair(f"{ours}.conv2", f"{theirs}.{conv2}"),
    ]
    if "skip" in params:
        rules += _pair(f"{ours}.skip", f"{theirs}.skip_block.1")
    if "cond" in params:
        rules += _pair(f"{ours}.cond", f"{theirs}.cond_proj.1")
    return rules


def _attn(ours: str, theirs: str, params: dict) -> list[Rule]:
    rules = [
        *_pair(f"{ours}.norm", f"{theirs}.norm"),
        *(concat(f"{ours}.attn.qkv.{n}", [f"{theirs}.attn.{p}.{n}" for p in ("query", "key", "value")])
          for n in _PARAMS),
        *_pair(f"{ours}.attn.out", f"{theirs}.attn.output"),
    ]  # fmt: skip
    if "cond" in params:
        rules += _pair(f"{ours}.cond", f"{theirs}.attn.attn.cond_proj")
    return rules


def _stage(ours: str, theirs: str, block: dict) -> list[Rule]:
    rules = _res(f"{ours}.res", f"{theirs}._module_list.0", block["res"])
    if "attn" in block:
        rules += _attn(f"{ours}.attn", f"{theirs}._module_list.1", block["attn"])
    return rules


def _unet_rules(cfg: ADMConfig, like: dict, prefix: str = "") -> list[Rule]:
    """Rules of the U-Net's params, TorchMultimodal's ``ADMUNet`` keys under ``prefix``."""
    t, key = prefix, cfg.cond_key
    rules = [
        *_pair("time.fc1", f"{t}timestep_encoder.1"),
        *_pair("time.fc2", f"{t}timestep_encoder.3"),
    ]
    if cfg.embed_dim is not None:
        rules += _pair("cond.res", f"{t}res_cond_proj.{key}")
        rules += _pair("cond.attn", f"{t}attn_cond_proj.{key}.0")
    rules += _pair("inp", f"{t}down.0._module_list.0")
    stack = 1  # their down stacks: the input convolution, then one per block
    for i, level in enumerate(like["down"]):
        for j, block in enumerate(level["stages"]):
            rules += _stage(f"down.{i}.stages.{j}", f"{t}down.{stack}", block)
            stack += 1
        if "down" in level:
            rules += _res(f"down.{i}.down", f"{t}down.{stack}._module_list.0", level["down"])
            stack += 1
    mid = like["mid"]
    rules += _res("mid.res1", f"{t}bottleneck._module_list.0", mid["res1"])
    rules += _attn("mid.attn", f"{t}bottleneck._module_list.1", mid["attn"])
    rules += _res("mid.res2", f"{t}bottleneck._module_list.2", mid["res2"])
    stack = 0
    for i, level in enumerate(like["up"]):
        for j, block in enumerate(level["stages"]):
            rules += _stage(f"up.{i}.stages.{j}", f"{t}up.{stack}", block)
            stack += 1
        if "up" in level:
            # Theirs appends the upsampling block to the level's last stack.
            last = 2 if "attn" in level["stages"][-1] else 1
            rules += _res(f"up.{i}.up", f"{t}up.{stack - 1}._module_list.{last}", level["up"])
    rules += _pair("out.norm", f"{t}up.{stack}._module_list.0.0")
    rules += _pair("out.conv", f"{t}up.{stack}._module_list.0.2")
    return rules


_NULL = "model.{}_unconditional_embedding.{}"


def _adm_rules(cfg: ADMConfig) -> list[Rule]:
    like = _like(unet.init, cfg)
    if not cfg.null_embedding:
        return _unet_rules(cfg, like)
    names = tuple(_NULL.format(which, cfg.cond_key) for which in ("train", "eval"))
    null = Rule(
        "null", names, to_ours=lambda train, _eval: train.reshape(-1),
        to_theirs=lambda x: (x.view(1, -1), x.view(1, -1)),
    )  # fmt: skip
    return [*_unet_rules(cfg, like, "model.model."), null]


def _eval_steps(steps: int) -> dict[str, torch.Tensor]:
    """``dalle2_decoder``'s sampler buffers: every fourth step of ``steps`` and its index map."""
    kept = torch.linspace(0, steps - 1, steps // 4, dtype=torch.int).long()
    index = torch.zeros(steps, dtype=torch.long)
    index[kept] = torch.arange(len(kept))
    return {"eval_steps": kept, "eval_steps_map": index}


def from_torchmultimodal(
    state_dict: Mapping[str, torch.Tensor], cfg: ADMConfig | VAEConfig, *, dtype=torch.float32
) -> dict:
    """Our params from a TorchMultimodal state dict of ``cfg``'s sizes: an ``ADMUNet``
    (``adm_unet()``), a ``dalle2_decoder()`` (``cfg.null_embedding``; its sampler buffers
    ``eval_steps*`` are not params and are skipped) or a ``VariationalAutoencoder``
    (a :class:`VAEConfig`).

    Raises :class:`fmm.convert.ConversionError` listing every missing, unexpected and
    mis-shaped key.
    """
    if isinstance(cfg, VAEConfig):
        like = _like(vae.init, cfg)
        return import_state_dict(
            state_dict, _vae_rules(cfg), like=like, source="TorchMultimodal VAE", dtype=dtype
        )
    like = _like(unet.init, cfg)
    source = "TorchMultimodal " + ("dalle2_decoder" if cfg.null_embedding else "ADMUNet")
    ignore = ("eval_steps", "eval_steps_map") if cfg.null_embedding else ()
    return import_state_dict(
        state_dict, _adm_rules(cfg), like=like, source=source, ignore=ignore, dtype=dtype
    )


def to_torchmultimodal(params: dict, cfg: ADMConfig | VAEConfig) -> dict[str, torch.Tensor]:
    """The state dict TorchMultimodal's module of ``cfg``'s sizes loads strictly (for a
    DALL-E 2 decoder, with the sampler buffers of ``dalle2_decoder(timesteps=cfg.timesteps)``);
    the inverse of :func:`from_torchmultimodal`."""
    if isinstance(cfg, VAEConfig):
        return export_state_dict(params, _vae_rules(cfg))
    out = export_state_dict(params, _adm_rules(cfg))
    return {**out, **_eval_steps(cfg.timesteps)} if cfg.null_embedding else out


def _vae_attn(ours: str, theirs: str) -> list[Rule]:
    net = f"{theirs}.net"
    return [
        *_pair(f"{ours}.norm", f"{net}.norm"),
        *_conv1x1(f"{ours}.attn.qkv", tuple(f"{net}.attn.{p}" for p in ("query", "key", "value"))),
        *_conv1x1(f"{ours}.attn.out", (f"{net}.out",)),
    ]


def _vae_rules(cfg: VAEConfig) -> list[Rule]:
    like = _like(vae.init, cfg)
    enc, dec = like["encoder"], like["decoder"]
    te, td = "encoder.resnet_encoder", "decoder.resnet_decoder"
    rules = _pair("encoder.inp", f"{te}.init_conv")
    for i, level in enumerate(enc["levels"]):
        for j, block in enumerate(level["stages"]):
            rules += _res(f"encoder.levels.{i}.stages.{j}", f"{te}.down_block.{i}.{j}", block)
        if "down" in level:
            n = len(level["stages"])
            rules += _pair(f"encoder.levels.{i}.down.conv", f"{te}.down_block.{i}.{n}.op.1")
    for part, prefix in (("encoder", te), ("decoder", td)):
        mid = like[part]["mid"]
        rules += _res(f"{part}.mid.res1", f"{prefix}.mid_block.0", mid["res1"])
        rules += _vae_attn(f"{part}.mid.attn", f"{prefix}.mid_block.1")
        rules += _res(f"{part}.mid.res2", f"{prefix}.mid_block.2", mid["res2"])
    rules += _pair("encoder.norm", f"{te}.out_block.0")
    rules += _pair("encoder.out", f"{te}.out_block.2")
    rules += _pair("encoder.moments", "encoder.quant_conv")
    rules += _pair("decoder.latent", "decoder.post_quant_conv")
    rules += _pair("decoder.inp", f"{td}.init_conv")
    for i, level in enumerate(dec["levels"]):
        for j, block in enumerate(level["stages"]):
            rules += _res(f"decoder.levels.{i}.stages.{j}", f"{td}.up_block.{i}.{j}", block)
        if "up" in level:
            n = len(level["stages"])
            rules += _pair(f"decoder.levels.{i}.up.conv", f"{td}.up_block.{i}.{n}.conv")
    rules += _pair("decoder.norm", f"{td}.out_nonlinearity_block.0")
    rules += _pair("decoder.out", f"{td}.conv_out")
    if cfg.alpha_channel:
        rules += _pair("decoder.alpha", f"{td}.alpha_conv_out")
    return rules
