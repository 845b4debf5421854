"""Autoregressive decoding with an explicit, preallocated key/value cache.

The cache is a pytree the caller owns::

    {"layers": [{"k": [B, heads, max_len, head_dim], "v": ...,      # self-attention
                 "ck": [B, heads, ctx_len, head_dim], "cv": ...},   # cross-attention (optional)
                ...],
     "pos":   int64 [B]   tokens seen per sequence (the next token's position id),
     "start": int64 [B]   the slot of each sequence's first real token,
     "context_mask": bool [B, ctx_len]                               (cross-attention only)}

**Prompts of different lengths are left-padded** (right-aligned): a batch of prompts is one
``[B, S]`` tensor whose row ``b`` holds ``S - lengths[b]`` padding tokens and then its
prompt. Slot ``j`` of row ``b`` holds the token at position id ``j - start[b]``; slots
before ``start[b]`` are masked out as keys, so padding never changes a result, and after
the prefill every row writes its next token to the same slot.

A decoding step attends over the whole preallocated cache with a boolean mask built from
``start`` and ``pos`` (explicit offsets, no ``is_causal``), so a step costs the same at
position 10 and 1000 and, with ``pos`` a tensor, a compiled step never recompiles.

The functions are generic over a :class:`DecoderSpec`: how a model embeds tokens at given
positions, where its blocks (:mod:`fmm.nn.transformer`'s layout: pre- or post-norm, with or
without cross-attention) live, and its output head. A model family provides one (``models.gpt.decoder_spec(cfg)``); every ``cfg=``
below takes a spec or a config with a ``decoder_spec`` attribute.

Example::

    spec = models.gpt.decoder_spec(cfg)
    out = generate(params, prompt, cfg=spec, max_new_tokens=32, key=fmm.random.key(0),
                   temperature=0.8, top_k=40, eos_id=50256)
    out.tokens   # [B, 32], pad_id after each row's end-of-sequence token
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from fmm import checks, random
from fmm.kv_cache import Cache, DecoderSpec, Params, as_spec, cache_len, init_cache, run_cached
from fmm.nn.transformer import init_block
from fmm.sampling import Sampling, greedy, sample, top_k_mask, top_p_mask

# The samplers live in fmm.sampling and the cache in fmm.kv_cache; they are re-exported here
# because generate() takes their settings and most callers reach them through this module.
__all__ = [
    "DecoderSpec",
    "Generation",
    "Sampling",
    "decode_step",
    "generate",
    "greedy",
    "init_cache",
    "prefill",
    "sample",
    "top_k_mask",
    "top_p_mask",
]


def _check_params(params: Params, spec: DecoderSpec) -> None:
    if spec.init is not None:
        checks.check_params(params, init=spec.init, cfg=spec.config)
        return
    # Without the model's init only the blocks' layout is known here.
    try:
        blocks = spec.blocks(params)
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(
            f"params hold no transformer blocks where the spec reads them: {e!r}"
        ) from None
    if len(blocks) != spec.layers:
        raise ValueError(
            f"params have {len(blocks)} transformer blocks but the spec's transformer has "
            f"layers={spec.layers}"
        )
    for i, (bp, t) in enumerate(zip(blocks, spec.configs)):
        checks.check_params(bp, init=init_block, cfg=t, name=f"params' block {i}")


def _check_tokens(name: str, tokens: torch.Tensor, dims: tuple, spec: DecoderSpec) -> None:
    if spec.vocab_size is None:
        checks.check_int(name, tokens, dims)
    else:
        checks.check_ids(name, tokens, dims, high=spec.vocab_size)


def _check_cache(name: str, tokens: torch.Tensor, cache: Cache, spec: DecoderSpec) -> None:
    checks.check_keys(cache, ("layers", "pos", "start"), name="cache")
    b = cache["pos"].shape[0]
    if tokens.shape[0] != b:
        raise ValueError(
            f"{name} have batch {tokens.shape[0]} but the cache was built for batch {b} "
            f"({name} {list(tokens.shape)}, cache pos {list(cache['pos'].shape)})"
        )
    if len(cache["layers"]) != spec.layers:
        raise ValueError(
            f"cache has {len(cache['layers'])} layers but the model has "
            f"{spec.layers}: build it with init_cache(spec, ...)"
        )


def prefill(
    params: Params,
    tokens: torch.Tensor,
    cache: Cache,
    *,
    cfg: Any,
    lengths: torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
    donate: bool = False,
    last_only: bool = False,
    prefix: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Cache]:
    """Run ``tokens: [B, S]`` through the model, writing their keys/values into the cache.

    ``lengths: [B]``: real tokens per row of a left-padded batch (first prefill only; default
    all ``S``). On a cache that already holds tokens, ``tokens`` continue every row (a
    chunked prefill). ``context: [B, T, cross_dim]`` (cross-attending models, first prefill)
    fills the cross-attention keys/values once; ``context_mask: [B, T]`` marks real ones.
    ``donate``: the cache's buffers may be overwritten (pass it only for a cache nobody else
    reads); by default the caller's cache is left untouched.

    ``last_only``: compute logits for the last position only (all a generation loop needs).

    ``prefix: [B, P, width]`` (first prefill only): embeddings that go before each row's
    prompt at positions ``0..P-1``, the prompt following from position ``P`` (BLIP-2's
    projected queries before a frozen LM's text). They are the blocks' inputs as they are:
    whatever the model's ``embed`` adds to a token (its position embedding) must already be
    in them. With ``lengths``, each row is ``[padding, prefix, prompt]``.

    Returns ``(logits [B, P + S, vocab], new_cache)`` (``[B, 1, vocab]`` with
    ``last_only``); logits at padding slots are meaningless.

    Example: ``logits, cache = prefill(params, prompt, init_cache(spec, 2, 64), cfg=spec)``.
    """
    spec = as_spec(cfg)
    _check_params(params, spec)
    _check_tokens("tokens", tokens, ("batch", "seq"), spec)
    _check_cache("tokens", tokens, cache, spec)
    return _prefill(
        params, tokens, cache, spec, lengths, context, context_mask, donate, last_only, prefix
    )


def _check_prefix(prefix, tokens: torch.Tensor, cache: Cache, spec: DecoderSpec) -> None:
    like = next((layer["k"] for layer in cache["layers"] if "k" in layer), None)
    checks.check_float(
        "prefix", prefix, (tokens.shape[0], "prefix_len", spec.configs[0].width), like=like,
        hint="the tokens' batch, any length, the model's width",
    )  # fmt: skip


def _with_prefix(spec: DecoderSpec, tokens, prefix, start) -> tuple[DecoderSpec, torch.Tensor]:
    """A spec whose ``embed`` lays row ``b`` out as ``[padding, prefix, prompt]``, and the
    tokens in those slots (any real token id at the prefix slots: their embedding is
    replaced), for a first prefill of ``tokens [B, S]`` after ``prefix [B, P, width]``;
    ``start [B]``: padding slots per row."""
    (batch, seq), p = tokens.shape, prefix.shape[1]
    j = torch.arange(p + seq, device=tokens.device)[None]
    s = start[:, None]
    in_prefix = (j >= s) & (j < s + p)
    # Slot j holds padding token j before the prefix, prompt token j - P after it.
    token_at = torch.where(j < s, j, (j - p).clamp(min=0)).expand(batch, -1)
    slot_tokens = tokens.gather(1, torch.where(in_prefix, s, token_at).clamp(max=seq - 1))
    prefix_at = (j - s).clamp(0, p - 1)[..., None].expand(-1, -1, prefix.shape[2])
    slot_prefix = prefix.gather(1, prefix_at)
    embed = spec.embed

    def embed_with_prefix(params, toks, positions):
        x = embed(params, toks, positions)
        return torch.where(in_prefix[..., None], slot_prefix.to(x.dtype), x)

    return dataclasses.replace(spec, embed=embed_with_prefix), slot_tokens


def _prefill(
    params, tokens, cache, spec, lengths, context, context_mask, donate, last_only, prefix=None
):
    # prefill after its param and token checks (generate makes them on its prompt).
    batch, seq = tokens.shape
    max_len = cache_len(cache)
    filled = cache["start"] + cache["pos"]
    fresh = not torch.compiler.is_compiling() and not bool(filled.any())
    if prefix is not None and not torch.compiler.is_compiling():
        if not fresh:
            raise ValueError("prefix= is only allowed on an empty cache (the first prefill)")
        _check_prefix(prefix, tokens, cache, spec)
    p = 0 if prefix is None else prefix.shape[1]
    if not torch.compiler.is_compiling() and max_len is not None:
        end = int(filled.max()) + p + seq
        if end > max_len:
            raise ValueError(
                f"tokens need {end} cache slots ({p + seq} new tokens after {end - p - seq} "
                f"cached) but the cache has max_len={max_len}"
            )
    if lengths is not None:
        if not fresh:
            raise ValueError("lengths= is only allowed on an empty cache (the first prefill)")
        lengths = torch.as_tensor(lengths, device=tokens.device)
        checks.check_int("lengths", lengths, (batch,))
        if bool((lengths < 1).any()) or bool((lengths > seq).any()):
            raise ValueError(
                f"lengths must all be in [1, {seq}] (no empty row), got {lengths.tolist()}"
            )
        start = (seq - lengths).to(torch.int64)
    else:
        start = cache["start"]
    slots = filled[:, None] + torch.arange(p + seq, device=tokens.device)
    positions = (slots - start[:, None]).clamp(min=0)
    if prefix is not None:
        spec, tokens = _with_prefix(spec, tokens, prefix, start)

    cross_dim = spec.cross_dim
    new_cache: Cache = {"start": start}
    if cross_dim is not None and context is not None:
        want_t = cache_len(cache, "ck")
        like = next(layer["ck"] for layer in cache["layers"] if "ck" in layer)
        checks.check_float(
            "context", context, (batch, want_t, cross_dim), like=like,
            hint="batch, the cache's context_len, cross_dim",
        )  # fmt: skip
        cm = torch.ones(batch, want_t, dtype=torch.bool, device=tokens.device)
        if context_mask is not None:
            checks.check_mask("context_mask", context_mask, (batch, want_t))
            cm = context_mask.bool()
        new_cache["context_mask"] = cm
    elif cross_dim is not None and fresh:
        raise ValueError(
            "context= is missing: a cross-attending model needs context= at the first prefill"
        )
    elif "context_mask" in cache:
        new_cache["context_mask"] = cache["context_mask"]

    run_cache = {**cache, **new_cache}
    logits, layers = run_cached(
        params, tokens, run_cache, spec, slots, start, positions, donate, context, last_only
    )
    new_cache.update(layers=layers, pos=slots[:, -1] + 1 - start)
    return logits, {**cache, **new_cache}


def decode_step(
    params: Params,
    token: torch.Tensor,
    cache: Cache,
    *,
    cfg: Any,
    donate: bool = False,
    active: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Cache]:
    """Feed one token per sequence, ``token: [B]`` (or ``[B, 1]``), after a :func:`prefill`.

    Returns ``(logits [B, vocab], new_cache)`` with ``pos`` advanced by one. Pure unless
    ``donate`` (then the cache's buffers are written in place: only for a cache the caller
    will not read again, as in :func:`generate`). Eagerly, writing past ``max_len`` raises;
    compiled, the caller must keep ``start + pos < max_len``.

    ``active: bool [B]``: rows where it is False keep their ``pos`` (their token's keys and
    values land in the slot after their last, which their next token overwrites; their
    logits are meaningless), so one fixed-size batch can carry idle rows
    (:mod:`fmm.batching`).

    Example: ``logits, cache = decode_step(params, logits.argmax(-1), cache, cfg=spec)``.
    """
    spec = as_spec(cfg)
    _check_params(params, spec)
    if isinstance(token, torch.Tensor) and token.dim() == 2 and token.shape[1] == 1:
        token = token[:, 0]
    _check_tokens("token", token, ("batch",), spec)
    _check_cache("token", token, cache, spec)
    if active is not None:
        checks.check_mask("active", active, (token.shape[0],))
        active = active.bool()
    return _decode_step(params, token, cache, spec, donate, active)


def _decode_step(params: Params, token, cache: Cache, spec: DecoderSpec, donate: bool, active=None):
    # decode_step after its checks; generate's loop feeds it tokens it sampled itself.
    slots = (cache["start"] + cache["pos"])[:, None]
    max_len = cache_len(cache)
    if not torch.compiler.is_compiling() and max_len is not None and int(slots.max()) >= max_len:
        raise ValueError(f"cache is full (max_len={max_len}): no slot for another token")
    logits, layers = run_cached(
        params, token[:, None], cache, spec, slots, cache["start"], cache["pos"][:, None],
        donate, None,
    )  # fmt: skip
    pos = (
        cache["pos"] + 1 if active is None else torch.where(active, cache["pos"] + 1, cache["pos"])
    )
    return logits[:, 0], {**cache, "layers": layers, "pos": pos}


# --------------------------------------------------------------------------- generate


class Generation(NamedTuple):
    """``tokens``: int64 ``[B, max_new_tokens]``, ``pad_id`` after a row's EOS;
    ``lengths``: int64 ``[B]``, new tokens per row up to and including its EOS."""

    tokens: torch.Tensor
    lengths: torch.Tensor


def _pick(logits, done, key, sampling: Sampling, eos_id, pad_id):
    """``(output token, token to feed back, done)``: a finished row outputs ``pad_id`` but
    keeps feeding its sampled token, so ``pad_id`` need not be a valid input id."""
    tok = sampling(logits, key)
    out = torch.where(done, torch.full_like(tok, pad_id), tok)
    if eos_id is not None:
        done = done | (tok == eos_id)
    return out, tok, done


def _advance(params, token, cache, done, key, spec, sampling, eos_id, pad_id):
    """One generation step: feed ``token``, pick the next one. Compiled as one graph."""
    logits, cache = _decode_step(params, token, cache, spec, True)
    out, tok, done = _pick(logits, done, key, sampling, eos_id, pad_id)
    return out, tok, done, cache


_COMPILED: dict[str, Callable] = {}


def _compiled_advance(backend: str) -> Callable:
    # One compiled function per backend for the whole process: dynamo's cache lives on it,
    # so a second generate() with the same shapes reuses the graph instead of recompiling.
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(_advance, fullgraph=True, dynamic=False, backend=backend)
    return _COMPILED[backend]


def generate(
    params: Params,
    prompt: torch.Tensor,
    *,
    cfg: Any,
    max_new_tokens: int,
    key: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    lengths: torch.Tensor | None = None,
    max_len: int | None = None,
    context: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    compile: bool | str = False,
) -> Generation:
    """Continue each prompt of ``prompt: [B, S]`` (left-padded; ``lengths: [B]`` real tokens
    per row) by ``max_new_tokens`` tokens.

    Sampling: ``temperature=0`` (default) is greedy; otherwise pass ``key`` (with optional
    ``top_k``/``top_p``). A row stops at ``eos_id`` (later tokens are ``pad_id``); the loop
    ends early once every row has. ``max_len``: the cache size (default ``S +
    max_new_tokens - 1``; fix it to reuse one compiled step across prompt lengths).
    ``compile``: ``True`` compiles the decode step with inductor (or name a backend); it
    compiles once per shape and is reused by later calls. The cache is private to the call,
    so ``generate`` can be called any number of times. ``context``/``context_mask``: for
    cross-attending models; ``prefix [B, P, width]``: embeddings before every prompt (see
    :func:`prefill`; the cache then holds ``P`` more slots).

    Returns a :class:`Generation` ``(tokens [B, max_new_tokens], lengths [B])``.

    Example::

        out = generate(params, prompt, cfg=spec, max_new_tokens=16, key=fmm.random.key(0),
                       temperature=1.0, top_p=0.9, eos_id=2, compile=True)
    """
    spec = as_spec(cfg)
    _check_params(params, spec)
    _check_tokens("prompt", prompt, ("batch", "seq"), spec)
    batch, seq = prompt.shape
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature > 0 and key is None:
        raise ValueError("key= is missing: sampling with temperature > 0 needs key=")
    if prefix is not None:
        checks.check_float("prefix", prefix, (batch, "prefix_len", spec.configs[0].width))
    p = 0 if prefix is None else prefix.shape[1]
    need = p + seq + max_new_tokens - 1
    max_len = need if max_len is None else max_len
    if need > max_len:
        after = f" after a prefix of {p}" if p else ""
        raise ValueError(
            f"max_len is too small: a prompt of {seq} tokens{after} plus {max_new_tokens} new "
            f"ones needs max_len >= {need}, got max_len={max_len}"
        )
    leaf = spec.blocks(params)[0]["mlp"]["fc1"]["weight"] if spec.layers else None
    dtype = leaf.dtype if leaf is not None else torch.float32
    ctx_len = None if context is None else context.shape[1]
    cache = init_cache(spec, batch, max_len, dtype=dtype, device=prompt.device, context_len=ctx_len)
    logits, cache = _prefill(
        params, prompt, cache, spec, lengths, context, context_mask, True, True, prefix
    )
    keys = random.split(key if key is not None else random.key(0).to(prompt.device), max_new_tokens)
    done = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    first, tok, done = _pick(logits[:, -1], done, keys[0], sampling, eos_id, pad_id)
    out = [first]
    backend = "inductor" if compile is True else compile
    step = _compiled_advance(backend) if backend else _advance
    for i in range(1, max_new_tokens):
        if eos_id is not None and bool(done.all()):
            break
        new, tok, done, cache = step(
            params, tok, cache, done, keys[i], spec, sampling, eos_id, pad_id
        )
        out.append(new)
    tokens = torch.stack(out, dim=1)
    if tokens.shape[1] < max_new_tokens:
        fill = tokens.new_full((batch, max_new_tokens - tokens.shape[1]), pad_id)
        tokens = torch.cat([tokens, fill], dim=1)
    if eos_id is None:
        new_lengths = torch.full((batch,), max_new_tokens, dtype=torch.int64, device=prompt.device)
    else:
        hit = tokens == eos_id
        first = torch.where(hit.any(1), hit.int().argmax(1) + 1, max_new_tokens)
        new_lengths = first.to(torch.int64)
    return Generation(tokens, new_lengths)
