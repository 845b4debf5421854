"""Continuous batching: many independent sequences decoded together in one slot pool.

A *pool* is an :func:`fmm.kv_cache.init_cache` cache of ``max_slots`` rows; each row (a
*slot*) holds one sequence, which joins when a slot is free and leaves as soon as it ends.
The pieces here are what a token-level scheduler (``train.serve.scheduler``) runs:

- :func:`prefill_slots`: the next chunk of ``n`` prompts into their slots, in one batched
  call, in place (:func:`prefill_slot`: one prompt);
- :func:`decode_slots`: one token for every slot of the pool, or of its first ``bucket``
  rows (:func:`rows`), ``active`` saying which rows are real (the others keep their
  position: an idle or half-prefilled row costs a row of compute but changes nothing);
- :func:`move_slot`: a sequence moved to another slot, so that the live rows stay packed
  at the start of the pool and the step runs over the smallest bucket that holds them;
- :func:`slot_noise` and :func:`sample_slots`: each row's token with its own sampling
  options and key;
- :func:`rows` with ``length``: a step that attends over the first ``length`` positions,
  the window its live sequences need (:func:`window_sizes`);
- the probes that say, on this machine, which row counts, windows and prefill shapes give a
  row bitwise the same result are in :mod:`fmm.probes`.

**Why a result does not depend on the batch.** A matmul's row ``i`` reads row ``i`` of
its input, but the kernel (and with it the reduction order) is chosen from the shape: at a
fixed row count the result of a row does not depend on the other rows' values or on
which row it is (``tests/fmm/test_batching.py`` pins this), across row counts it may (on
MKL with AVX-512, GPT-2 small's matmuls round one way at 1 row, another at 2-15 rows and
a third at 16-64: ``benchmarks/batch_invariance.py`` measures it; under
:class:`fmm.invariance.ColumnLinears`, which computes each linear layer with the rows as
the product's columns, they round alike from 1 row to over 32). So the row counts a
scheduler uses are the ones :func:`fmm.probes.invariant_buckets` finds bitwise equal, on
its own hardware and compiled step, to the whole pool; prompts are batched only at the
``(chunk, count)`` shapes :func:`fmm.probes.invariant_prefill` finds equal to the prompt alone, in
chunks whose bounds and padding depend on the prompt only. Attention, norms and sampling
are per row. Each row's key is the one its request would use at that token
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

import dataclasses
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fmm import checks, decoding, random
from fmm.invariance import ColumnLinears, PackedLinears
from fmm.kv_cache import Cache, Params, as_spec
from fmm.sampling import top_k_mask, top_p_mask

__all__ = ["bucket_for", "bucket_sizes", "compiled_decode", "compiled_noise", "decode_slots",
           "free_slot", "move_slot", "prefill_slot", "prefill_slots", "rows", "sample_slots",
           "slot_noise", "window_sizes", "with_attention"]  # fmt: skip


def _map_rows(cache: Cache, fn: Callable[[torch.Tensor], torch.Tensor]) -> Cache:
    return {
        **{k: fn(v) for k, v in cache.items() if k != "layers"},
        "layers": [{k: fn(v) for k, v in layer.items()} for layer in cache["layers"]],
    }


def rows(cache: Cache, n: int, first: int = 0, length: int | None = None) -> Cache:
    """The pool's rows ``[first, first + n)`` as a cache of batch ``n``: views, so a donated
    step or prefill on it writes into the pool. ``length``: the self-attention keys and
    values cut to their first ``length`` positions (every row's sequence ends before it),
    marked dynamic along that dimension so that a compiled step compiles one graph for
    every length; the step then reads and masks ``length`` positions, not the slot's whole
    ``max_len``. Example: ``rows(pool, 4)`` (a bucket), ``rows(pool, 4, length=128)``."""
    view = _map_rows(cache, lambda t: t[first : first + n])
    if length is None:
        return view
    for layer in view["layers"]:
        for name in ("k", "v"):
            if name in layer:
                layer[name] = layer[name][:, :, :length]
                torch._dynamo.mark_dynamic(layer[name], 2)
    return view


def window_sizes(max_len: int, least: int = 64, most: int = 512) -> list[int]:
    """The key lengths a pool of ``max_len`` positions may attend over: powers of two from
    ``least`` below ``min(most, max_len)``, and ``max_len``. Why none between 512 and the
    slot: PyTorch's CPU flash attention reads keys in blocks of at most 512 (as we read its
    kernel), so a window up to there keeps a row's real keys in one block and its masked
    tail only adds zeros; past it a window could move a block's bounds. The probe
    (:func:`fmm.probes.invariant_windows`) checks each window anyway. Example: ``window_sizes(1024)`` -> ``[64, 128, 256, 512, 1024]``."""
    sizes = [w for w in (least << i for i in range(max_len.bit_length())) if w < max_len]
    return [w for w in sizes if w <= most] + [max_len]


def prefill_slots(
    params: Params,
    tokens: torch.Tensor,
    cache: Cache,
    slots: Sequence[int],
    *,
    cfg: Any,
    lengths: Sequence[int] | None = None,
    last_only: bool = True,
    context: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed ``tokens: [n, S]`` to the pool's ``slots`` (``n`` of them, in place), each row
    after what its slot holds: a prompt's first chunk or its next one. Returns each row's
    last logits ``[n, vocab]``.

    ``context: [1 or n, T, cross_dim]`` (cross-attending models, with a first chunk; ``1``:
    the same for every row) and ``context_mask: [1 or n, T]``: each slot's own
    cross-attention keys/values and mask, written into its rows of the pool's
    ``ck``/``cv``/``context_mask`` once, so every later decode step of the slot reads them
    (a CoCa slot's image queries, :func:`models.coca.generate.decoder_spec`).

    ``lengths: [n]``: real tokens of each row of a left-padded first chunk (the slots must
    be free, :func:`free_slot`); the padding takes slots but is never attended to. One call
    computes the rows together: a row's result equals its prefill alone only at the shapes
    :func:`fmm.probes.invariant_prefill` finds, and only with ``last_only=False`` (the output layer
    then runs on all ``n * S`` positions, as the blocks do; with ``last_only`` it runs on
    ``n`` rows, and 1 row never rounds as 2 do).

    Example: ``logits = prefill_slots(params, chunks, pool, [0, 1, 5], cfg=spec)``.
    """
    spec = as_spec(cfg)
    checks.check_int("tokens", tokens, ("batch", "seq"))
    m, slots = cache["pos"].shape[0], [int(s) for s in slots]
    if len(slots) != tokens.shape[0] or len(set(slots)) != len(slots):
        raise ValueError(f"slots must be {tokens.shape[0]} distinct slots, got {slots}")
    if not all(0 <= s < m for s in slots):
        raise ValueError(f"slots must be in [0, {m}), got {slots}")
    packed = slots == list(range(slots[0], slots[0] + len(slots)))
    index = torch.tensor(slots, device=cache["pos"].device)
    # Consecutive slots are a view the donated prefill writes through; others are gathered.
    view = rows(cache, len(slots), slots[0]) if packed else _map_rows(cache, lambda t: t[index])
    context, context_mask = (_per_row(t, len(slots)) for t in (context, context_mask))
    logits, out = decoding.prefill(
        params, tokens, view, cfg=spec, donate=True, last_only=last_only,
        lengths=None if lengths is None else torch.tensor(lengths, device=tokens.device),
        context=context, context_mask=context_mask,
    )  # fmt: skip
    if packed:
        # The donated prefill wrote k/v through the view; what it made anew (positions, and
        # with a context the cross keys/values and mask) is copied in.
        def put(dst: torch.Tensor, src: torch.Tensor) -> None:
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
    else:
        view = cache

        def put(dst: torch.Tensor, src: torch.Tensor) -> None:
            dst.index_copy_(0, index, src)

    for dst, src in zip(view["layers"], out["layers"]):
        for name, value in src.items():
            put(dst[name], value)
    for name in ("pos", "start", "context_mask"):
        if name in out:
            put(view[name], out[name])
    return logits[:, -1]


def _per_row(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    # A context (or mask) given once for n rows: the same tensor for each, as a view.
    if t is None or t.dim() < 1 or t.shape[0] != 1 or n == 1:
        return t
    return t.expand(n, *t.shape[1:])


def prefill_slot(
    params: Params,
    tokens: torch.Tensor,
    cache: Cache,
    slot: int,
    *,
    cfg: Any,
    context: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed ``tokens: [S]`` to slot ``slot`` of the pool ``cache`` (in place) after what it
    holds: its prompt, or the next chunk of it. Returns the last token's logits ``[vocab]``.
    ``context: [1, T, cross_dim]``, ``context_mask: [1, T]``: the slot's cross-attention
    input, with its first chunk (see :func:`prefill_slots`).

    A new sequence starts from a free slot (:func:`free_slot`). The slot is computed alone
    (batch 1), so its result is the same whatever the other slots hold.

    Example: ``logits = prefill_slot(params, prompt[:64], pool, 0, cfg=spec)``.
    """
    checks.check_int("tokens", tokens, ("seq",))
    if not 0 <= slot < cache["pos"].shape[0]:
        raise ValueError(f"slot must be in [0, {cache['pos'].shape[0]}), got {slot}")
    return prefill_slots(
        params, tokens[None], cache, [slot], cfg=cfg, context=context, context_mask=context_mask
    )[0]


def move_slot(cache: Cache, src: int, dst: int) -> None:
    """Move the sequence in slot ``src`` to the free slot ``dst`` (in place; ``src`` is then
    free). A bit-exact copy of every row tensor (cross-attention ``ck``/``cv`` and
    ``context_mask`` too): the sequence continues in ``dst`` as it would have in ``src``."""
    for t in _tensors(cache):
        t[dst] = t[src]
    free_slot(cache, src)


def _tensors(cache: Cache) -> list[torch.Tensor]:
    # Every per-row tensor of a cache (batch first).
    own = [v for k, v in cache.items() if k != "layers"]
    return own + [t for layer in cache["layers"] for t in layer.values()]


def with_attention(spec: Any, impl: str) -> Any:
    """``spec`` (a :class:`~fmm.kv_cache.DecoderSpec`) with every block's attention computed
    by ``impl``: ``"sdpa"`` (torch's fused kernels) or ``"math"`` (matmul, softmax, matmul:
    :class:`fmm.nn.AttentionConfig`). A serving pool's decode step takes ``"math"``: for one
    query over a window of keys, torch's CPU flash kernel took 40% of a 32-row GPT-2 small
    step on an AMD EPYC, and the plain products ran that step 25% faster. Example:
    ``step_spec = with_attention(models.gpt.decoder_spec(cfg), "math")``."""
    spec = as_spec(spec)
    swap = lambda c: dataclasses.replace(c, attn_impl=impl)  # the config refuses a bad impl
    blocks = spec.transformer
    blocks = tuple(map(swap, blocks)) if isinstance(blocks, tuple) else swap(blocks)
    return dataclasses.replace(spec, transformer=blocks)


def bucket_sizes(max_slots: int) -> list[int]:
    """The row counts a pool of ``max_slots`` may step over: powers of two below it and
    itself. Example: ``bucket_sizes(24)`` -> ``[1, 2, 4, 8, 16, 24]``."""
    return [1 << i for i in range(max_slots.bit_length()) if 1 << i < max_slots] + [max_slots]


def bucket_for(n: int, sizes: Sequence[int]) -> int:
    """The smallest of ``sizes`` (ascending) that holds ``n`` rows."""
    return next(s for s in sizes if s >= n)


def free_slot(cache: Cache, slot: int) -> None:
    """Mark slot ``slot`` empty (position 0), in place; its stale keys/values are never seen
    again: a new sequence's queries see only the slots it has written, and a cross-attending
    model's first prefill of the slot must give its context, which replaces the old one."""
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


def _decode_columns(params: Params, tokens, cache: Cache, active, spec):
    with ColumnLinears():  # entered inside: a compiled step traces the mode into its graph
        return decoding._decode_step(params, tokens, cache, spec, True, active)


def _decode_packed(params: Params, tokens, cache: Cache, active, spec):
    with PackedLinears():
        return decoding._decode_step(params, tokens, cache, spec, True, active)


def compiled_decode(backend: Any = "inductor", *, linears: str = "rows") -> Callable:
    """:func:`decode_slots` compiled with ``backend`` (a name or a dynamo backend callable),
    as ``step(params, tokens, cache, active, spec) -> (logits, cache)``; ``backend=None``:
    the unchecked eager step. The step's inputs keep their shapes from step to step, so it
    compiles once per pool shape. ``linears``: ``"packed"`` (its linear layers under
    :class:`fmm.invariance.PackedLinears`), ``"columns"``
    (:class:`~fmm.invariance.ColumnLinears`) or ``"rows"`` (plain).

    Each call gives a new compiled function (:func:`_compile_own`)."""
    fn = {"packed": _decode_packed, "columns": _decode_columns, "rows": _decode}[linears]
    return fn if backend is None else _compile_own(fn, backend)


def _compile_own(fn: Callable, backend: Any) -> Callable:
    """``fn`` compiled over its own copy of its code: dynamo caches graphs, and counts them
    against its recompile limit (8), per code object, so a pool's graphs are its own (freed
    with it), and a process holding several pools or models (a test suite) never runs one
    pool into the limit with another's graphs."""
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
    options = _ROW_COUNT_BLIND if backend == "inductor" else None
    return torch.compile(own, fullgraph=True, dynamic=False, backend=backend, options=options)


# Inductor computes a small variance (a layer norm's) in two passes when there are several
# rows and by Welford's method when there is one: a lone row would then round otherwise
# than in any batch. Welford always, so that one row steps as one of many.
_ROW_COUNT_BLIND = {"cpp.use_two_step_variance_threshold": 0}


def _noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    u = random.uniform(keys[:, None], (vocab,)).clamp(min=1e-12)
    return torch.log(-torch.log(u))


def slot_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise ``log(-log u)`` ``[M, vocab]``, row ``m`` drawn from ``keys[m]`` (the
    numbers :func:`fmm.sampling.sample` draws from that key for one row)."""
    return _noise(keys, vocab)


def compiled_noise(backend: Any = "inductor") -> Callable:
    """:func:`slot_noise` compiled with ``backend`` (it is elementwise integer hashing, ~10x
    faster compiled), as ``noise(keys, vocab)``; ``None``: eager. A new compiled function
    each call, as :func:`compiled_decode`."""
    return _noise if backend is None else _compile_own(_noise, backend)


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
