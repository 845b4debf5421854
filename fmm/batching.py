"""Continuous batching: many independent sequences decoded together in one slot pool.

A *pool* is an :func:`fmm.kv_cache.init_cache` cache of ``max_slots`` rows; each row (a
*slot*) holds one sequence, which joins when a slot is free and leaves as soon as it ends.
The pieces here are what a token-level scheduler (``train.serve.scheduler``) runs:

- :func:`prefill_slot`: a prompt (or the next chunk of one) into one slot, alone, in place;
- :func:`decode_slots`: one token for every slot at once, ``active [M]`` saying which rows
  are real (the others keep their position: an idle or half-prefilled row costs a row of
  compute but changes nothing);
- :func:`slot_noise` and :func:`sample_slots`: each row's token with its own sampling
  options and key.

**Why a result does not depend on the batch.** The decode step always runs all
``max_slots`` rows (a fixed shape, so one compiled graph serves every step whatever the
occupancy), and on a fixed shape the kernels compute each row alone: a matmul's row ``i``
reads row ``i`` of its input with a reduction order set by the shape, not by the other
rows' values or by which row it is (``tests/fmm/test_batching.py`` pins this); attention
and sampling are per row. A prompt is prefilled alone at batch 1, in chunks whose bounds
depend on the prompt only. Each row's key is the one its request would use at that token
(``fmm.random.split(key, max_new_tokens)[i]`` for token ``i``, as
:func:`fmm.decoding.generate` draws), chosen by the request's own position and never by
its slot. So a request draws the same tokens whatever shares the pool and whenever it
arrived. Against :func:`fmm.decoding.generate` of the request alone (batch 1 at its own
``max_len``) the logits agree within float rounding (the kernels' shapes differ).

Example::

    spec = models.gpt.decoder_spec(cfg)
    pool = init_cache(spec, 8, cfg.context_length)
    logits = prefill_slot(params, prompt, pool, 3, cfg=spec)         # [vocab], slot 3
    active = torch.zeros(8, dtype=torch.bool); active[3] = True
    tokens = torch.zeros(8, dtype=torch.int64); tokens[3] = logits.argmax()
    logits, pool = decode_slots(params, tokens, pool, active, cfg=spec)   # [8, vocab]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fmm import checks, decoding, random
from fmm.kv_cache import Cache, Params, as_spec
from fmm.sampling import top_k_mask, top_p_mask

__all__ = ["compiled_decode", "decode_slots", "free_slot", "prefill_slot", "sample_slots",
           "slot_noise"]  # fmt: skip


def _slot_view(cache: Cache, slot: int) -> Cache:
    # Batch-1 views of one row: a donated prefill writes through them into the pool.
    rows = slice(slot, slot + 1)
    return {
        **{k: v[rows] for k, v in cache.items() if k != "layers"},
        "layers": [{k: v[rows] for k, v in layer.items()} for layer in cache["layers"]],
    }


def prefill_slot(
    params: Params, tokens: torch.Tensor, cache: Cache, slot: int, *, cfg: Any
) -> torch.Tensor:
    """Feed ``tokens: [S]`` to slot ``slot`` of the pool ``cache`` (in place) after what it
    holds: its prompt, or the next chunk of it. Returns the last token's logits ``[vocab]``.

    A new sequence starts from a free slot (:func:`free_slot`). The slot is computed alone
    (batch 1), so its result is the same whatever the other slots hold.

    Example: ``logits = prefill_slot(params, prompt[:64], pool, 0, cfg=spec)``.
    """
    spec = as_spec(cfg)
    checks.check_int("tokens", tokens, ("seq",))
    if not 0 <= slot < cache["pos"].shape[0]:
        raise ValueError(f"slot must be in [0, {cache['pos'].shape[0]}), got {slot}")
    view = _slot_view(cache, slot)
    logits, out = decoding.prefill(
        params, tokens[None], view, cfg=spec, donate=True, last_only=True
    )
    cache["pos"][slot] = out["pos"][0]
    cache["start"][slot] = out["start"][0]
    return logits[0, -1]


def free_slot(cache: Cache, slot: int) -> None:
    """Mark slot ``slot`` empty (position 0), in place; its stale keys/values are never seen
    again: a new sequence's queries see only the slots it has written."""
    cache["pos"][slot] = 0
    cache["start"][slot] = 0


def decode_slots(
    params: Params, tokens: torch.Tensor, cache: Cache, active: torch.Tensor, *, cfg: Any
) -> tuple[torch.Tensor, Cache]:
    """One decode step for every slot: ``tokens: [M]`` fed at each slot's position, the pool
    written in place. ``active: bool [M]``: rows that advance; the others keep their
    position and their logits are meaningless. Returns ``(logits [M, vocab], cache)``.

    Eager and checked; :func:`compiled_decode` gives the same step compiled.
    """
    return decoding.decode_step(params, tokens, cache, cfg=cfg, donate=True, active=active)


def _decode(params: Params, tokens, cache: Cache, active, spec) -> tuple[torch.Tensor, Cache]:
    return decoding._decode_step(params, tokens, cache, spec, True, active)


_COMPILED: dict[Any, Callable] = {}


def compiled_decode(backend: Any = "inductor") -> Callable:
    """:func:`decode_slots` compiled with ``backend`` (a name or a dynamo backend callable),
    as ``step(params, tokens, cache, active, spec) -> (logits, cache)``; ``backend=None``:
    the unchecked eager step. One compiled function per backend for the process; the step's
    inputs keep their shapes from step to step, so it compiles once per pool shape."""
    if backend is None:
        return _decode
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(_decode, fullgraph=True, dynamic=False, backend=backend)
    return _COMPILED[backend]


def _noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    u = random.uniform(keys[:, None], (vocab,)).clamp(min=1e-12)
    return torch.log(-torch.log(u))


def slot_noise(keys: torch.Tensor, vocab: int, *, backend: Any = None) -> torch.Tensor:
    """Gumbel noise ``log(-log u)`` ``[M, vocab]``, row ``m`` drawn from ``keys[m]`` (the
    numbers :func:`fmm.sampling.sample` draws from that key for one row). ``backend``:
    compile it (it is elementwise integer hashing, ~10x faster compiled)."""
    if backend is None:
        return _noise(keys, vocab)
    name = ("noise", backend)
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_noise, fullgraph=True, dynamic=False, backend=backend)
    return _COMPILED[name](keys, vocab)


def sample_slots(
    logits: torch.Tensor,
    noise: torch.Tensor | None,
    *,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
) -> torch.Tensor:
    """One token per row of ``logits: [M, vocab]`` with per-row options -> int64 ``[M]``.

    ``temperature: [M]`` (0: greedy), ``top_k: int64 [M]`` (0: no top-k), ``top_p: [M]``
    (0: no nucleus); ``noise``: :func:`slot_noise` of the rows' keys (``None`` when every
    row is greedy). Row ``m`` gets what ``fmm.sampling.sample(logits[m:m+1], key_m,
    temperature=, top_k=, top_p=)`` draws. The top-k / top-p masks are computed only when a
    row asks for them; they are exact sets, so whether they are computed for a row's
    neighbours never changes the row's token.
    """
    greedy = logits.argmax(dim=-1)
    if noise is None:
        return greedy
    hot = temperature > 0
    x = logits.float() / torch.where(hot, temperature, 1.0)[:, None]
    if bool((top_k > 0).any()):
        keep = top_k_mask(x, top_k.clamp(min=1)) | (top_k == 0)[:, None]
        x = x.masked_fill(~keep, float("-inf"))
    if bool((top_p > 0).any()):
        keep = top_p_mask(x, top_p) | (top_p == 0)[:, None]
        x = x.masked_fill(~keep, float("-inf"))
    return torch.where(hot, (x - noise).argmax(dim=-1), greedy)
