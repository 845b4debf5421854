"""The GPT over video codes, conditioned on a caption, as pure functions.

A sequence is the start token, ``text_len`` caption ids, then the clip's ``latent_len``
codes in (t, h, w) raster order, one id space (see :class:`VideoGPTConfig`). Param tree
(TorchMultimodal's ``MultimodalGPT``, MUGEN's text -> video)::

    text.token.weight   [text_vocab, text_dim]     caption embedding
    text.proj.weight    [width, text_dim]          (in_projection)
    text.pos            [text_len, width]          learned positions (MUGEN's nn.Embedding)
    video.token.weight  [video_vocab, code_dim]    the VQ-VAE codebook (no gradient reaches it)
    video.proj.weight   [width, code_dim]          (out_projection)
    video.pos.d_0/1/2   [t | h | w, width / 3]     per-axis positions, concatenated
    sos                 [width]                    the start token (the right shift)
    transformer.blocks.N  pre-norm causal blocks, quick-GELU MLP (the reference's "SiLU"), q/k/v unbiased
    norm, head.weight   final layer norm, [text_vocab + video_vocab, width] logits

Generation runs :mod:`fmm.decoding`'s preallocated cache (:func:`generate_codes`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from fmm import checks, decoding, nn, random
from fmm.nn.transformer import BlockFn
from models.family import Field
from models.videogpt.config import VideoGPTConfig

Params = dict[str, Any]


def _init_positions(shape: tuple[int, ...], width: int, key: torch.Tensor, dtype) -> Params:
    part = width // len(shape)
    return {
        f"d_{i}": random.normal(random.fold_in(key, i), (n, part), dtype=dtype) * 0.01
        for i, n in enumerate(shape)
    }


def init(cfg: VideoGPTConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params for ``cfg``; the head starts at zero, as TorchMultimodal's.

    ``video.token`` should be replaced by the trained VQ-VAE's codebook before training.
    Example: ``params = init(videogpt_shapes(), fmm.random.key(0))``.
    """
    checks.check_type("cfg", cfg, VideoGPTConfig)
    w = cfg.width

    def fold(*names):
        return random.fold_in(key, ".".join(names))

    transformer = nn.init_transformer(cfg.transformer, fold("transformer"), dtype=dtype)
    for block in transformer["blocks"]:
        del block["attn"]["qkv"]["bias"]  # unbiased q/k/v projections, as the reference
    return {
        "text": {
            "token": nn.init_embedding(cfg.text_vocab, cfg.text_dim, fold("text", "token"), dtype=dtype),
            "proj": nn.init_linear(cfg.text_dim, w, fold("text", "proj"), bias=False, std=0.02, dtype=dtype),
            "pos": random.normal(fold("text", "pos"), (cfg.text_len, w), dtype=dtype) * 0.01,
        },
        "video": {
            "token": nn.init_embedding(cfg.video_vocab, cfg.code_dim, fold("video", "token"), dtype=dtype),
            "proj": nn.init_linear(cfg.code_dim, w, fold("video", "proj"), bias=False, std=0.02, dtype=dtype),
            "pos": _init_positions(cfg.latent_shape, w, fold("video", "pos"), dtype),
        },
        "sos": random.normal(fold("sos"), (w,), dtype=dtype) * 0.02,
        "transformer": transformer,
        "norm": nn.init_layer_norm(w, device=key.device, dtype=dtype),
        "head": {"weight": torch.zeros(cfg.text_vocab + cfg.video_vocab, w, dtype=dtype, device=key.device)},
    }  # fmt: skip


def broadcast_positions(pos: Params, positions: torch.Tensor) -> torch.Tensor:
    """Per-axis tables ``{"d_i": [n_i, width / k]}`` at raster ``positions [...]`` (the first
    axis slowest): ``[..., width]``, each axis's row concatenated. Only the asked-for rows
    are gathered, so a decoding step costs the same at every position."""
    tables = [pos[f"d_{i}"] for i in range(len(pos))]
    parts, rest = [], positions
    for table in reversed(tables):  # unravel from the fastest axis
        parts.append(table[rest % table.shape[0]])
        rest = rest // table.shape[0]
    return torch.cat(parts[::-1], dim=-1)


def _embed(params: Params, tokens: torch.Tensor, positions: torch.Tensor, *, cfg: VideoGPTConfig):
    """``tokens [B, S]`` at slots ``positions [B, S]`` (0 = the start token) -> ``[B, S, width]``."""
    tv, tl = cfg.text_vocab, cfg.text_len
    text = nn.linear(
        params["text"]["proj"], nn.embed(params["text"]["token"], tokens.clamp(max=tv - 1))
    )
    text = text + params["text"]["pos"][(positions - 1).clamp(0, tl - 1)]
    # The codebook is the VQ-VAE's: the GPT learns its projection, not the code vectors.
    codes = (tokens - tv).clamp(0, cfg.video_vocab - 1)
    video = nn.linear(
        params["video"]["proj"], F.embedding(codes, params["video"]["token"]["weight"].detach())
    )
    slot = (positions - 1 - tl).clamp(0, cfg.latent_len - 1)
    video = video + broadcast_positions(params["video"]["pos"], slot)
    x = torch.where((tokens >= tv)[..., None], video, text)
    return torch.where((tokens == cfg.sos_id)[..., None], params["sos"].to(x.dtype), x)  # fmt: skip


def _video_head(params: Params, h: torch.Tensor, *, cfg: VideoGPTConfig) -> torch.Tensor:
    logits = nn.linear(params["head"], nn.layer_norm(params["norm"], h, eps=cfg.norm_eps))
    # Text ids can never be drawn where a video code belongs.
    return logits.index_fill(-1, torch.arange(cfg.text_vocab, device=h.device), float("-inf"))


@functools.cache
def decoder_spec(cfg: VideoGPTConfig) -> decoding.DecoderSpec:
    """How :mod:`fmm.decoding` runs the model to draw video codes (text ids masked out).
    Cached per config, so compile guards hold."""
    return decoding.DecoderSpec(
        transformer=cfg.transformer,
        embed=functools.partial(_embed, cfg=cfg),
        head=functools.partial(_video_head, cfg=cfg),
        max_positions=cfg.seq_len,
        vocab_size=cfg.vocab_size,
        init=init,
        config=cfg,
    )


def _check_text(text, cfg: VideoGPTConfig, name: str = "text") -> None:
    checks.check_ids(name, text, ("batch", cfg.text_len), high=cfg.text_vocab)


def _check_codes(codes, cfg: VideoGPTConfig, name: str = "codes") -> None:
    checks.check_ids(
        name, codes, ("batch", cfg.latent_len), high=cfg.video_vocab,
        hint=f"latent_shape={cfg.latent_shape} flattened in raster order",
    )  # fmt: skip


def _prompt(text: torch.Tensor, cfg: VideoGPTConfig) -> torch.Tensor:
    return torch.cat([torch.full_like(text[:, :1], cfg.sos_id), text], dim=1)


def apply(
    params: Params, text: torch.Tensor, codes: torch.Tensor, *, cfg: VideoGPTConfig,
    key: torch.Tensor | None = None, train: bool = False, block_fn: BlockFn | None = None,
) -> torch.Tensor:  # fmt: skip
    """Causal logits ``[B, text_len + latent_len, text_vocab + video_vocab]`` of caption
    ``text [B, text_len]`` then ``codes [B, latent_len]``: position ``i`` predicts token ``i``
    (the start token shifts the sequence right)."""
    checks.check_params(params, init=init, cfg=cfg)
    _check_text(text, cfg)
    _check_codes(codes, cfg)
    checks.check_same_batch(("text", text), ("codes", codes))
    h = _features(params, text, codes, cfg, key, train, block_fn)
    return nn.linear(params["head"], h)


def _features(params, text, codes, cfg: VideoGPTConfig, key, train, block_fn):
    tokens = torch.cat([_prompt(text, cfg), codes[:, :-1] + cfg.text_vocab], dim=1)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    x = _embed(params, tokens, positions, cfg=cfg)
    x = nn.transformer(
        params["transformer"], x, cfg=cfg.transformer, causal=True, key=key, train=train,
        block_fn=block_fn,
    )  # fmt: skip
    return nn.layer_norm(params["norm"], x, eps=cfg.norm_eps)


def batch_fields(cfg: VideoGPTConfig) -> dict[str, Field]:
    """The batch :func:`loss` reads: caption ids and the clip's VQ-VAE codes, int64."""
    return {
        "text": Field("int", ("batch", cfg.text_len), high=cfg.text_vocab, doc="caption ids"),
        "codes": Field(
            "int", ("batch", cfg.latent_len), high=cfg.video_vocab, doc="video codes, raster order"
        ),
    }


def loss(
    params: Params, batch: dict[str, torch.Tensor], *, cfg: VideoGPTConfig,
    key: torch.Tensor | None = None, train: bool = True, block_fn: BlockFn | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Caption -> video next-code cross-entropy of ``batch = {"text", "codes"}``, scored by the
    video rows of the head alone. Returns ``(loss [], {"video_nll", "video_accuracy"})``."""
    checks.check_keys(batch, ("text", "codes"))
    checks.check_params(params, init=init, cfg=cfg)
    _check_text(batch["text"], cfg, "batch['text']")
    _check_codes(batch["codes"], cfg, "batch['codes']")
    checks.check_same_batch(("batch['text']", batch["text"]), ("batch['codes']", batch["codes"]))
    h = _features(params, batch["text"], batch["codes"], cfg, key, train, block_fn)
    logits = F.linear(h[:, cfg.text_len :], params["head"]["weight"][cfg.text_vocab :])
    targets = batch["codes"]
    nll = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1))
    accuracy = (logits.argmax(-1) == targets).float().mean()
    return nll, {"video_nll": nll.detach(), "video_accuracy": accuracy.detach()}


def generate_codes(
    params: Params, text: torch.Tensor, *, cfg: VideoGPTConfig, key: torch.Tensor | None = None,
    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    compile: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Sample ``latent_len`` video codes after each caption of ``text [B, text_len]``.

    Returns int64 ``[B, latent_len]`` in ``[0, video_vocab)``, raster order (reshape to
    ``cfg.latent_shape`` and :func:`models.videogpt.decode` them). ``temperature=0`` is
    greedy; otherwise ``key`` is needed. Runs :func:`fmm.decoding.generate`: one prefill of
    the caption, then one cached step per code, each the same cost.

    Example: ``codes = generate_codes(params, tok.encode(["a red circle grows"], 8), cfg=cfg,
    temperature=0)``.
    """
    checks.check_params(params, init=init, cfg=cfg)
    _check_text(text, cfg)
    with torch.no_grad():
        out = decoding.generate(
            params, _prompt(text, cfg), cfg=decoder_spec(cfg), max_new_tokens=cfg.latent_len,
            key=key, temperature=temperature, top_k=top_k, top_p=top_p, compile=compile,
        )  # fmt: skip
    return out.tokens - cfg.text_vocab
