"""The start-up probes of a slot pool: which row counts, key lengths and batched prefill
shapes give a row bitwise what it gets in the whole pool, or alone, measured on this
machine with the pool's own step.

Why measure rather than trust: a BLAS chooses its kernel, and with it a row's rounding,
from the shape of the whole product, and which shapes round alike differs by library,
CPU and compiler (see :mod:`fmm.batching` and :mod:`fmm.invariance`). A scheduler
(``train.serve.slot_pool``) runs these once at start-up and steps only over what they
found exact:

- :func:`invariant_buckets`: the row counts whose rows equal the whole pool's;
- :func:`invariant_windows`: the key lengths (:func:`fmm.batching.rows`' ``length``)
  whose rows equal those attending over the whole slot;
- :func:`invariant_prefill`: per chunk length, how many prompts prefilled together equal
  each prompt alone.

Each leaves the pool's cache empty. Example::

    step = batching.compiled_decode("inductor", linears="packed")
    sizes, why = invariant_buckets(step, params, pool, batching.bucket_sizes(32), cfg=spec,
                                   linears="packed")   # e.g. [2, 4, 8, 16, 32], [...]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fmm import random
from fmm.batching import free_slot, prefill_slot, prefill_slots, rows
from fmm.invariance import linears_mode
from fmm.kv_cache import Cache, Params, as_spec, cache_len

__all__ = ["invariant_buckets", "invariant_prefill", "invariant_windows"]


def _probe_ids(n: int, length: int, vocab: int | None, seed: int) -> torch.Tensor:
    return (random.uniform(random.key(seed), (n, length)) * (vocab or 2)).long()


def _fill(params, cache: Cache, prompts: torch.Tensor, m: int, spec, context, linears: str):
    # Slots 0..m-1 prefilled with the two prompts in turn (so equal rows must also agree
    # across slots), under the step's mode.
    with linears_mode(linears)():
        for s in range(m):
            prefill_slot(params, prompts[s % 2], cache, s, cfg=spec, context=context)


def invariant_buckets(
    step: Callable,
    params: Params,
    cache: Cache,
    sizes: Sequence[int],
    *,
    cfg: Any,
    context: torch.Tensor | None = None,
    length: int | None = None,
    linears: str = "rows",
) -> tuple[list[int], list[str]]:
    """Which row counts of ``sizes`` (ascending; the last is the pool's rows) give every row
    of the decode ``step`` bitwise the logits it gets in the whole pool, measured with this
    ``step`` (:func:`compiled_decode`'s signature; compiled, the probe compiles it at each
    size it tries) on this machine. ``cache``: the pool, empty; the probe fills rows with two prompts
    (alternating, so equal rows must also agree across slots) and leaves it empty.
    ``context: [1, T, cross_dim]``: every probe row's context (cross-attending models).
    ``linears``: the probe rows' prompts prefilled under the mode of a ``step`` of
    ``compiled_decode(linears=...)``, which enters it itself: the step is never called
    under it, or it would recompile outside. ``length``: the step attends over that many
    positions (:func:`rows`), the whole slot by default.

    Returns ``(usable sizes, reasons)``: the sizes whose rows equal the pool's (always the
    pool itself), tried from the largest down to the first that differs, and why the
    others are left out. Example::

        sizes, why = invariant_buckets(compiled_decode("inductor"), params, pool,
                                       bucket_sizes(32), cfg=spec)   # e.g. [16, 32]
    """
    spec = as_spec(cfg)
    m = sizes[-1]
    # Prompts long enough that attention sums over many keys: over a handful, two kernels
    # that round differently can still agree bit for bit.
    plen = max(1, min(32, (length or cache_len(cache) or 34) - 2))
    prompts = _probe_ids(2, plen, spec.vocab_size, 0)
    fed = _probe_ids(1, 2, spec.vocab_size, 1)[0]
    _fill(params, cache, prompts, m, spec, context, linears)
    tokens, idle = fed[torch.arange(m) % 2], torch.zeros(m, dtype=torch.bool)
    # Idle rows keep their position: every size computes the same next token on the same
    # cache (each rewrites the slot it reads back first).
    dev = cache["pos"].device

    def logits(n: int) -> torch.Tensor:
        view = rows(cache, n, length=length)
        return step(params, tokens[:n].to(dev), view, idle[:n].to(dev), spec)[0]

    ref, usable, reasons = logits(m).clone(), [m], []
    # A row's logits depending on its slot: no row count is safe, nor moving a sequence.
    by_slot = not all(torch.equal(ref[s], ref[s % 2]) for s in range(m))
    if by_slot:
        reasons.append(f"at {m} rows a row's logits depend on its slot")
    # Downwards, stopping at the first that rounds otherwise: a kernel changes at a row
    # count, and each size probed is a compile.
    for n in sorted(sizes[:-1], reverse=True):
        if by_slot:
            break
        got = logits(n)
        if not torch.equal(got, ref[:n]):
            gap = float((got - ref[:n]).abs().max())
            reasons.append(f"{n} rows: logits differ from the pool of {m} by up to {gap:.1e} "
                           f"(fewer not tried)")  # fmt: skip
            break
        usable.insert(0, n)
    for s in range(m):
        free_slot(cache, s)
    return usable, reasons


def invariant_windows(
    step: Callable,
    params: Params,
    cache: Cache,
    windows: Sequence[int],
    *,
    cfg: Any,
    context: torch.Tensor | None = None,
    linears: str = "rows",
) -> tuple[list[int], list[str]]:
    """Which key lengths of ``windows`` (ascending; the last is the pool's ``max_len``)
    give every row of the decode ``step`` over the whole pool bitwise the logits it gets
    attending over all ``max_len`` positions (:func:`rows`' ``length``). The rows are
    filled with prompts as long as the smallest window allows, so each real key sits
    before the masked tail that the lengths differ by. ``cache``, ``context``, ``linears``:
    as :func:`invariant_buckets`. Returns ``(usable lengths, reasons)``, always the last.
    """
    spec = as_spec(cfg)
    m, full = cache["pos"].shape[0], windows[-1]
    prompts = _probe_ids(2, max(1, min(windows[0], full) - 2), spec.vocab_size, 2)
    _fill(params, cache, prompts, m, spec, context, linears)
    tokens = _probe_ids(1, 2, spec.vocab_size, 3)[0][torch.arange(m) % 2]
    idle, dev = torch.zeros(m, dtype=torch.bool), cache["pos"].device

    def logits(w: int | None) -> torch.Tensor:
        return step(params, tokens.to(dev), rows(cache, m, length=w), idle.to(dev), spec)[0]

    ref, usable, reasons = logits(full).clone(), [], []
    for w in windows[:-1]:
        got = logits(w)
        if torch.equal(got, ref):
            usable.append(w)
        else:
            reasons.append(f"{w} positions: logits differ from {full} by up to "
                           f"{float((got - ref).abs().max()):.1e}")  # fmt: skip
    for s in range(m):
        free_slot(cache, s)
    return [*usable, full], reasons


def invariant_prefill(
    params: Params,
    cache: Cache,
    lengths: Sequence[int],
    budget: int,
    *,
    cfg: Any,
    most: int = 8,
    context: torch.Tensor | None = None,
) -> dict[int, list[int]]:
    """For each chunk length ``P`` of ``lengths``: the row counts ``n`` (powers of two,
    ``n * P <= budget`` tokens, at most ``most`` and the pool's rows) at which :func:`prefill_slots` of
    ``n`` rows gives every row bitwise the logits it gets alone, for a left-padded first
    chunk and for the chunk after it (``last_only=False``, see :func:`prefill_slots`). ``cache``: the pool, empty (left empty).
    ``context: [1, T, cross_dim]``: every probe row's context (cross-attending models).

    Returns ``{P: [1, ...]}`` (1: alone is always allowed). Example:
    ``invariant_prefill(params, pool, [4, 8, 16], 64, cfg=spec)`` -> ``{4: [1], 8: [1],
    16: [1, 2, 4]}`` (GPT-2 small on MKL: 16 rows and more round alike).
    """
    spec = as_spec(cfg)
    m, max_len, allowed = cache["pos"].shape[0], cache["layers"][0]["k"].shape[2], {}
    for p in lengths:
        counts = [1 << i for i in range(budget.bit_length()) if (1 << i) * p <= budget
                  and 1 << i <= min(m, most)]  # fmt: skip
        allowed[p] = [1]
        if len(counts) < 2 or 2 * p > max_len:
            continue
        ids = _probe_ids(counts[-1], 2 * p, spec.vocab_size, p)
        real = [max(1, p - i % 2) for i in range(counts[-1])]
        alone = torch.cat([_two_chunks(params, cache, ids, real, p, range(i, i + 1), spec,
                                       context) for i in range(counts[-1])])  # fmt: skip
        allowed[p] += [n for n in counts[1:]
                       if torch.equal(_two_chunks(params, cache, ids, real, p, range(n), spec,
                                                  context), alone[:n])]  # fmt: skip
    return allowed


def _two_chunks(params, cache, ids, real, p, slots: range, spec, context=None) -> torch.Tensor:
    # Rows ``slots`` of ``ids`` prefilled together in two chunks of p (the first left-padded
    # to ``real`` tokens) into those slots, then freed: their logits [n, 2, vocab].
    first = prefill_slots(params, ids[slots, :p], cache, slots, cfg=spec,
                          lengths=real[slots.start : slots.stop], last_only=False,
                          context=context)  # fmt: skip
    second = prefill_slots(params, ids[slots, p:], cache, slots, cfg=spec, last_only=False)
    for s in slots:
        free_slot(cache, s)
    return torch.stack([first, second], dim=1)
