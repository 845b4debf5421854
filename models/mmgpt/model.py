"""The multimodal GPT as pure functions: ``init``, ``apply``, ``loss``, ``generate_images``.

A sequence is ``text_len`` caption tokens then ``image_len`` VQ-VAE codes in raster order,
all in one id space (image code ``c`` is id ``text_vocab + c``). Param tree::

    text.token.weight     [text_vocab, width]    per-modality embeddings
    image.token.weight    [image_vocab, width]
    pos                   [seq_len, width]       learned positions
    transformer.blocks.N  pre-norm causal blocks (the shared text tower's stack)
    norm                  final layer norm
    text.head.weight      [text_vocab, width]    per-modality output heads
    image.head.weight     [image_vocab, width]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from fmm import checks, nn, random
from fmm.nn import towers
from fmm.nn.transformer import BlockFn
from models.family import Field
from models.mmgpt.config import MMGPTConfig

Params = dict[str, Any]
MODALITIES = ("text", "image")


def init(cfg: MMGPTConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params for ``cfg``, each subtree keyed by its path.

    Example: ``params = init(mmgpt_shapes(), fmm.random.key(0))``.
    """
    checks.check_type("cfg", cfg, MMGPTConfig)
    w, dev = cfg.width, key.device
    kt, ki = random.fold_in(key, "text"), random.fold_in(key, "image")

    def modality(k: torch.Tensor, vocab: int) -> Params:
        return {
            "token": nn.init_embedding(vocab, w, random.fold_in(k, "token"), dtype=dtype),
            "head": nn.init_linear(w, vocab, random.fold_in(k, "head"), bias=False, dtype=dtype),
        }

    return {
        "text": modality(kt, cfg.text_vocab),
        "image": modality(ki, cfg.image_vocab),
        "pos": nn.init_learned_positions(
            cfg.seq_len, w, random.fold_in(key, "pos"), std=0.02, dtype=dtype
        ),
        "transformer": nn.init_transformer(
            cfg.transformer, random.fold_in(key, "transformer"), dtype=dtype
        ),
        "norm": nn.init_layer_norm(w, device=dev, dtype=dtype),
    }


def _check_tokens(tokens: torch.Tensor, cfg: MMGPTConfig, name: str = "tokens") -> None:
    checks.check_ids(
        name, tokens, ("batch", range(1, cfg.seq_len + 1)), high=cfg.vocab_size,
        hint=f"seq_len={cfg.seq_len}: text_len + image_len",
    )  # fmt: skip


def _check_text(text: torch.Tensor, cfg: MMGPTConfig, name: str = "text") -> None:
    checks.check_ids(name, text, ("batch", cfg.text_len), high=cfg.text_vocab)


def _check_codes(codes: torch.Tensor, cfg: MMGPTConfig, name: str = "codes") -> None:
    # [batch, image_len] or a grid [batch, h, w] of h * w = image_len codes (raster order).
    dims: tuple = ("batch", cfg.image_len)
    if isinstance(codes, torch.Tensor) and codes.ndim == 3:
        dims = ("batch", *codes.shape[1:])
        if codes.shape[1] * codes.shape[2] != cfg.image_len:
            raise ValueError(
                f"{name} must hold image_len={cfg.image_len} codes per caption, got a grid "
                f"{list(codes.shape)}"
            )
    checks.check_ids(
        name, codes, dims, high=cfg.image_vocab, hint=f"image_len={cfg.image_len} per caption"
    )


def modality_mask(cfg: MMGPTConfig, modality: str, *, device=None) -> torch.Tensor:
    """Bool ``[vocab_size]``: True at the ids of ``modality`` (``"text"`` or ``"image"``).

    Example: ``mask_logits(logits, modality_mask(cfg, "image"))`` can only sample image codes.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    is_image = torch.arange(cfg.vocab_size, device=device) >= cfg.text_vocab
    return is_image if modality == "image" else ~is_image


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``logits [..., vocab]`` with every id where ``allowed [vocab]`` is False set to ``-inf``,
    so no sampler (greedy, temperature, top-k, top-p) can pick it."""
    if allowed.shape != logits.shape[-1:]:
        raise ValueError(
            f"allowed must have shape [{logits.shape[-1]}] to match logits {list(logits.shape)}, "
            f"got {list(allowed.shape)}"
        )
    return logits.masked_fill(~allowed, float("-inf"))


def embed_tokens(
    params: Params, tokens: torch.Tensor, *, cfg: MMGPTConfig, offset: int = 0
) -> torch.Tensor:
    """Per-modality token embeddings plus positions ``offset..``: ``[B, S] -> [B, S, width]``."""
    checks.check_params(params, init=init, cfg=cfg, only=("text", "image", "pos"))
    _check_tokens(tokens, cfg)
    if not 0 <= offset <= cfg.seq_len - tokens.shape[1]:
        raise ValueError(
            f"offset must lie in [0, {cfg.seq_len - tokens.shape[1]}] for "
            f"{tokens.shape[1]} tokens of a seq_len={cfg.seq_len} model, got {offset}"
        )
    return _embed_tokens(params, tokens, cfg, offset)


def _modality_embed(params: Params, tokens, cfg: MMGPTConfig) -> torch.Tensor:
    # Each id looked up in its modality's table, positions not added. Clamp so both
    # lookups are in range; `where` keeps the right one for each id.
    is_image = tokens >= cfg.text_vocab
    text = nn.embed(params["text"]["token"], tokens.clamp(max=cfg.text_vocab - 1))
    image = nn.embed(params["image"]["token"], (tokens - cfg.text_vocab).clamp(min=0))
    return torch.where(is_image[..., None], image, text)


def _embed_tokens(params: Params, tokens, cfg: MMGPTConfig, offset: int) -> torch.Tensor:
    return _modality_embed(params, tokens, cfg) + params["pos"][offset : offset + tokens.shape[1]]


def output_logits(params: Params, h: torch.Tensor, *, cfg: MMGPTConfig) -> torch.Tensor:
    """Both heads on final features ``h: [B, S, width]``: ``[B, S, vocab_size]`` (text ids first)."""
    return torch.cat(
        [nn.linear(params["text"]["head"], h), nn.linear(params["image"]["head"], h)], dim=-1
    )


def _features(params: Params, tokens, cfg: MMGPTConfig, key, train: bool, block_fn):
    x = _embed_tokens(params, tokens, cfg, 0)
    out = towers.encode_embeddings(
        params, x, cfg=cfg.tower, causal=True, key=key, train=train, block_fn=block_fn
    )
    return out.sequence


def features(
    params: Params,
    tokens: torch.Tensor,
    *,
    cfg: MMGPTConfig,
    key: torch.Tensor | None = None,
    train: bool = False,
    block_fn: BlockFn | None = None,
) -> torch.Tensor:
    """Causal features after the final norm: ``tokens [B, S]`` (unified ids) -> ``[B, S, width]``.

    ``block_fn`` runs each block (see :func:`fmm.nn.transformer`)."""
    checks.check_params(params, init=init, cfg=cfg)
    _check_tokens(tokens, cfg)
    return _features(params, tokens, cfg, key, train, block_fn)


def apply(
    params: Params,
    tokens: torch.Tensor,
    *,
    cfg: MMGPTConfig,
    key: torch.Tensor | None = None,
    train: bool = False,
    block_fn: BlockFn | None = None,
) -> torch.Tensor:
    """Next-token logits of a causal forward: ``tokens [B, S]`` -> ``[B, S, vocab_size]``.

    Position ``i``'s logits predict token ``i + 1``; mask them with :func:`modality_mask`
    to the modality expected there.
    """
    checks.check_params(params, init=init, cfg=cfg)
    _check_tokens(tokens, cfg)
    return output_logits(params, _features(params, tokens, cfg, key, train, block_fn), cfg=cfg)


def sequence(text: torch.Tensor, codes: torch.Tensor, *, cfg: MMGPTConfig) -> torch.Tensor:
    """One id sequence from ``text [B, text_len]`` and ``codes [B, image_len]`` (or
    ``[B, h, w]``, read in raster order): ``[B, seq_len]``."""
    _check_text(text, cfg)
    _check_codes(codes, cfg)
    checks.check_same_batch(("text", text), ("codes", codes))
    return _sequence(text, codes, cfg)


def _sequence(text: torch.Tensor, codes: torch.Tensor, cfg: MMGPTConfig) -> torch.Tensor:
    return torch.cat([text, codes.reshape(codes.shape[0], -1) + cfg.text_vocab], dim=1)


def batch_fields(cfg: MMGPTConfig) -> dict[str, Field]:
    """The batch :func:`loss` reads: ``text [batch, text_len]`` caption ids and ``codes
    [batch, image_len]`` image codes (raster order), both int64."""
    return {
        "text": Field("int", ("batch", cfg.text_len), high=cfg.text_vocab, doc="caption ids"),
        "codes": Field(
            "int", ("batch", cfg.image_len), high=cfg.image_vocab, doc="VQ-VAE codes, raster order"
        ),
    }


def loss(
    params: Params,
    batch: dict[str, torch.Tensor],
    *,
    cfg: MMGPTConfig,
    key: torch.Tensor | None = None,
    train: bool = True,
    block_fn: BlockFn | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Caption -> image next-token loss of ``batch = {"text": [B, text_len], "codes": [B, image_len]}``
    (codes may also be a grid ``[B, h, w]``).

    Image positions are scored by the image head alone (the logits mask made exact), text
    positions by the text head with weight ``cfg.text_loss_weight``. Returns
    ``(loss [], {"image_nll", "image_accuracy"})``; ``key`` is needed for dropout in training.
    """
    checks.check_keys(batch, ("text", "codes"))
    checks.check_params(params, init=init, cfg=cfg)
    _check_text(batch["text"], cfg, "batch['text']")
    _check_codes(batch["codes"], cfg, "batch['codes']")
    checks.check_same_batch(("batch['text']", batch["text"]), ("batch['codes']", batch["codes"]))
    seq = _sequence(batch["text"], batch["codes"], cfg)
    h = _features(params, seq[:, :-1], cfg, key, train, block_fn)
    t = cfg.text_len
    # Features at positions t-1 .. seq_len-2 predict the image tokens.
    image_logits = nn.linear(params["image"]["head"], h[:, t - 1 :])
    targets = seq[:, t:] - cfg.text_vocab
    image_nll = F.cross_entropy(rearrange(image_logits, "b s v -> (b s) v"), targets.reshape(-1))
    total = image_nll
    if cfg.text_loss_weight > 0 and t > 1:
        text_logits = nn.linear(params["text"]["head"], h[:, : t - 1])
        text_nll = F.cross_entropy(
            rearrange(text_logits, "b s v -> (b s) v"), seq[:, 1:t].reshape(-1)
        )
        total = total + cfg.text_loss_weight * text_nll
    accuracy = (image_logits.argmax(-1) == targets).float().mean()
    return total, {"image_nll": image_nll.detach(), "image_accuracy": accuracy.detach()}
