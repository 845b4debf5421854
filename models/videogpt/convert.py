"""VideoGPT weights from and to TorchMultimodal's ``video_vqvae`` and ``MultimodalGPT``.

TorchMultimodal numbers the modules of its ``nn.Sequential`` stacks including the ReLUs,
splits q / k / v into three unbiased projections (fused here into ``attn.qkv``) and keeps
batch-norm batch counters (accepted and ignored on import, written as 0 on export). Its
codebook's EMA buffers ``code_usage`` / ``code_avg`` are the train state here
(:func:`vqvae_state_from_torchmultimodal`), not params. Conversions are strict: one
:class:`fmm.convert.ConversionError` lists every missing, unexpected and mis-shaped key.

Example::

    params = vqvae_from_torchmultimodal(tmm_vqvae.state_dict(), cfg)
    gpt = gpt_from_torchmultimodal(tmm_gpt.state_dict(), gpt_cfg)   # a MUGEN-style text -> video GPT
    vq = vqvae_from_torchmultimodal(strip_prefix(tmm_gpt.state_dict(), "out_tokenizer."), cfg)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fmm import random
from fmm.convert import (
    Rule,
    concat,
    export_state_dict,
    import_state_dict,
    same,
    strip_prefix,
)
from models.videogpt import gpt, vqvae
from models.videogpt.config import VideoGPTConfig, VideoVQVAEConfig

Params = dict[str, Any]
_BN = ("weight", "bias", "running_mean", "running_var")


def _bn(ours: str, theirs: str) -> list[Rule]:
    return [same(f"{ours}.{k}", f"{theirs}.{k}") for k in _BN]


def _conv(ours: str, theirs: str, *, bias: bool = True) -> list[Rule]:
    names = ("weight", "bias") if bias else ("weight",)
    return [same(f"{ours}.{k}", f"{theirs}.{k}") for k in names]


def _attention(ours: str, theirs: str) -> list[Rule]:
    return [
        concat(f"{ours}.qkv.weight", [f"{theirs}.{p}.weight" for p in ("query", "key", "value")]),
        same(f"{ours}.out.weight", f"{theirs}.output.weight"),
        same(f"{ours}.out.bias", f"{theirs}.output.bias"),
    ]


def _res_stack(ours: str, theirs: str, cfg: VideoVQVAEConfig) -> list[Rule]:
    rules = []
    for i in range(cfg.res_layers):
        o, t = f"{ours}.res.{i}", f"{theirs}.res_stack.{i}.block"
        rules += _bn(f"{o}.norm1", f"{t}.0") + _conv(f"{o}.conv1", f"{t}.2.conv", bias=False)
        rules += _bn(f"{o}.norm2", f"{t}.3") + _conv(f"{o}.conv2", f"{t}.5.conv", bias=False)
        rules += _bn(f"{o}.norm3", f"{t}.6")
        for a in range(3):
            rules += _attention(f"{o}.attn.axes.{a}", f"{t}.8.mha_attns.{a}")
    return rules + _bn(f"{ours}.norm", f"{theirs}.res_stack.{cfg.res_layers}")


def vqvae_rules(cfg: VideoVQVAEConfig) -> list[Rule]:
    """The key map between our params and a TorchMultimodal ``video_vqvae`` state dict."""
    rules = []
    for i in range(len(cfg.strides)):  # a ReLU sits between convs: every other index
        rules += _conv(f"encoder.convs.{i}", f"encoder.convs.{2 * i}.conv")
    rules += _res_stack("encoder", "encoder", cfg) + _conv("encoder.out", "encoder.conv_out.conv")
    rules += _conv("decoder.inp", "decoder.conv_in.conv") + _res_stack("decoder", "decoder", cfg)
    for i in range(len(cfg.down_strides)):
        rules += _conv(f"decoder.up.{i}", f"decoder.convts.{2 * i}.convt")
    return [*rules, same("codebook.weight", "codebook.embedding")]


def _counters(cfg: VideoVQVAEConfig) -> list[str]:
    names = []
    for side in ("encoder", "decoder"):
        for i in range(cfg.res_layers):
            names += [f"{side}.res_stack.{i}.block.{j}.num_batches_tracked" for j in (0, 3, 6)]
        names.append(f"{side}.res_stack.{cfg.res_layers}.num_batches_tracked")
    return names


def vqvae_from_torchmultimodal(
    state_dict: Mapping[str, torch.Tensor], cfg: VideoVQVAEConfig
) -> Params:
    """Our video VQ-VAE params from a TorchMultimodal ``video_vqvae`` (``VQVAE``) state dict."""
    like = vqvae.init(cfg, random.key(0).to("meta"))
    ignore = [*_counters(cfg), "codebook.code_usage", "codebook.code_avg"]
    sd = strip_prefix(dict(state_dict), "module.")
    return import_state_dict(sd, vqvae_rules(cfg), like=like, source="torchmultimodal", ignore=ignore)  # fmt: skip


def vqvae_state_from_torchmultimodal(state_dict: Mapping[str, torch.Tensor]) -> vqvae.State:
    """The EMA train state ``{"cluster_size", "embed_sum"}`` from TorchMultimodal's codebook
    buffers ``code_usage`` / ``code_avg``."""
    return {
        "cluster_size": state_dict["codebook.code_usage"].detach().float().clone(),
        "embed_sum": state_dict["codebook.code_avg"].detach().float().clone(),
    }


def vqvae_to_torchmultimodal(
    params: Params, cfg: VideoVQVAEConfig, state: vqvae.State | None = None
) -> dict[str, torch.Tensor]:
    """A ``video_vqvae`` state dict of ``params`` (EMA buffers from ``state``, or the
    codebook counted once per code), ready for a strict ``load_state_dict``."""
    sd = export_state_dict(params, vqvae_rules(cfg))
    state = vqvae.init_state(cfg, params, None) if state is None else state
    sd["codebook.code_usage"] = state["cluster_size"].detach().clone()
    sd["codebook.code_avg"] = state["embed_sum"].detach().clone()
    for name in _counters(cfg):
        sd[name] = torch.zeros((), dtype=torch.int64)
    return sd


def gpt_rules(
    cfg: VideoGPTConfig, *, text_key: str = "in_tokenizer.embedding.weight"
) -> list[Rule]:
    """The key map between our GPT and a TorchMultimodal ``MultimodalGPT`` state dict whose
    in-tokenizer embeds text with the table at ``text_key`` and whose out-tokenizer is a
    video VQ-VAE (its codebook becomes ``video.token``)."""
    d = "mm_decoder"
    rules = [
        same("text.token.weight", text_key),
        same("text.proj.weight", "in_projection.weight"),
        same("text.pos", f"{d}.in_pos_emb.weight"),
        same("video.token.weight", "out_tokenizer.codebook.embedding"),
        same("video.proj.weight", "out_projection.weight"),
        *(same(f"video.pos.d_{i}", f"{d}.out_pos_emb.embedding.d_{i}") for i in range(3)),
        same("sos", f"{d}.right_shift.sos"),
        same("norm.weight", "norm.weight"),
        same("norm.bias", "norm.bias"),
        same("head.weight", "to_logit.weight"),
    ]
    for i in range(cfg.layers):
        o, t = f"transformer.blocks.{i}", f"{d}.decoder.layers.{i}"
        rules += _conv(f"{o}.norm1", f"{t}.norm_attn") + _conv(f"{o}.norm2", f"{t}.norm_mlp")
        rules += _attention(f"{o}.attn", f"{t}.attention")
        rules += _conv(f"{o}.mlp.fc1", f"{t}.mlp.model.0") + _conv(
            f"{o}.mlp.fc2", f"{t}.mlp.model.2"
        )
    return rules  # fmt: skip


def gpt_from_torchmultimodal(
    state_dict: Mapping[str, torch.Tensor],
    cfg: VideoGPTConfig,
    *,
    text_key: str = "in_tokenizer.embedding.weight",
) -> Params:
    """Our GPT params from a text -> video ``MultimodalGPT`` state dict; the rest of the
    out-tokenizer (the VQ-VAE) is left for :func:`vqvae_from_torchmultimodal`."""
    sd = strip_prefix(dict(state_dict), "module.")
    keep = {r.theirs[0] for r in gpt_rules(cfg, text_key=text_key)}
    ignore = [k for k in sd if k.startswith(("out_tokenizer.", "in_tokenizer.")) and k not in keep]
    like = gpt.init(cfg, random.key(0).to("meta"))
    rules = gpt_rules(cfg, text_key=text_key)
    return import_state_dict(sd, rules, like=like, source="torchmultimodal", ignore=ignore)


def gpt_to_torchmultimodal(params: Params, cfg: VideoGPTConfig) -> dict[str, torch.Tensor]:
    """The GPT's part of a ``MultimodalGPT`` state dict (tokenizer tables included); the
    out-tokenizer's other weights come from :func:`vqvae_to_torchmultimodal`."""
    return export_state_dict(params, gpt_rules(cfg))
