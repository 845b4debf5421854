"""The slots of a :class:`~train.serve.scheduler.Scheduler`: one preallocated cache of
``max_slots`` sequences, which rows its decode step runs over, and how prompts enter it.

A :class:`SlotPool` probes at start-up (:meth:`SlotPool.calibrate`) which buckets of rows
and which batched prefill shapes give a row bitwise what it gets in the whole pool or
alone, on this machine with this step (:func:`fmm.probes.invariant_buckets`,
:func:`fmm.probes.invariant_prefill`), then: hands out the lowest free slots, keeps the
live rows packed below the bucket that holds them (:meth:`SlotPool.compact`), prefills
waiting prompts' chunks of one length together (:meth:`SlotPool.prefill`) and runs the
decode step over that bucket (:meth:`SlotPool.step`). The scheduler owns the requests;
a *row* here is any object with ``slot``, ``chunks`` (``[(tokens, real tokens)]``),
``fed`` (chunks prefilled) and ``last`` (its last logits) attributes, and for a
cross-attending model ``context [1, T, cross_dim]`` and ``context_mask [1, T]`` (or
``None``: all real), written into its slot with its first chunk.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import torch

from fmm import batching, probes, random
from fmm.invariance import linears_mode, mkl_reproducible, packed_available
from fmm.kv_cache import DecoderSpec, init_cache

__all__ = ["SlotPool"]

log = logging.getLogger(__name__)


class SlotPool:
    """``max_slots`` sequences of ``max_len`` positions for ``params``/``spec``, the decode
    step compiled with ``backend`` (``None``: eager). ``follow_occupancy``: step over the
    smallest exact bucket (``False``: the whole pool); ``batch_prefill``: prefill prompts
    together where exact (``False``: each alone). ``context_len``: each slot's context
    length ``T`` (cross-attending models only). ``linears``: ``"packed"`` (the default on
    CPU where oneDNN is there) runs the step and the prefills under
    :class:`fmm.invariance.PackedLinears`; ``"columns"`` runs the step and
    the prefills under :class:`fmm.invariance.ColumnLinears` (a row rounds alike at any row
    count, so every bucket is exact: a lone sequence steps at 1 row in any pool);
    ``"rows"``: the plain linear layers, exact only within their row-count groups.
    ``step_attention``: the decode step's attention, ``"math"`` (matmul, softmax, matmul; the
    faster for one query on CPU) or ``"sdpa"`` (:func:`fmm.batching.with_attention`).
    After :meth:`calibrate`, ``buckets`` holds the row counts in use and
    ``batched_prefill`` ``{chunk length: row counts}``."""

    def __init__(
        self,
        params: Any,
        spec: DecoderSpec,
        *,
        max_slots: int,
        max_len: int,
        prefill_chunk: int,
        backend: Any,
        follow_occupancy: bool = True,
        batch_prefill: bool = True,
        context_len: int | None = None,
        linears: str | None = None,
        follow_length: bool = True,
        step_attention: str = "math",
    ):
        leaf = spec.blocks(params)[0]["attn"]["qkv"]["weight"]
        if linears is None:  # oneDNN where this torch has it, on CPU
            linears = "packed" if leaf.device.type == "cpu" and packed_available() else "columns"
        self._mode = linears_mode(linears)  # refuses an unknown name
        if linears == "packed" and not packed_available():
            raise ValueError("SlotPool: linears='packed' needs oneDNN (torch.backends.mkldnn)")
        self.params, self.spec, self.max_slots, self.max_len = params, spec, max_slots, max_len
        # The decode step's attention (and its probes'). Prompts are prefilled with the
        # model's own: a left-padded prompt's padding rows see no key, and SDPA gives them
        # zeros where the math path's softmax would give NaN keys to the layers above.
        self.step_spec = batching.with_attention(spec, step_attention)
        self.step_attention = step_attention
        self.prefill_chunk = prefill_chunk
        self.follow_occupancy, self.batch_prefill = follow_occupancy, batch_prefill
        self.device = leaf.device
        with torch.inference_mode():  # the step's inputs, as the probe's (no recompile)
            self.cache = init_cache(spec, max_slots, max_len, dtype=leaf.dtype,
                                    device=self.device, context_len=context_len)  # fmt: skip
            self.windows = batching.window_sizes(max_len) if follow_length else [max_len]
            if len(self.windows) > 1:
                self._pad_keys()
            self.next_token = torch.zeros(max_slots, dtype=torch.int64)
        # The probes' rows cross-attend one random context (any context shows the rounding).
        self.probe_context = None if spec.cross_dim is None else random.normal(
            random.key(0), (1, context_len, spec.cross_dim)).to(self.device, leaf.dtype)  # fmt: skip
        # The eager parts (prefills, the probes' fills) run under the mode the compiled step
        # traces inside itself (self._mode), so a prompt's keys round as the steps that read
        # them.
        self.linears = linears
        self.decode = batching.compiled_decode(backend, linears=linears)
        self.noise = batching.compiled_noise(backend)
        self.buckets: list[int] | None = None
        self.batched_prefill: dict[int, list[int]] = {}
        self.bucket_steps: collections.Counter[int] = collections.Counter()  # metrics, tests
        self.window_steps: collections.Counter[int] = collections.Counter()
        self.free = list(range(max_slots))  # ascending

    def calibrate(self) -> None:
        """The start-up probes (the pool must be empty), and the compiles: the step at every
        size probed, the sampling noise at every bucket kept."""
        # The pool's own step compiles once per size probed, past dynamo's recompile limit
        # (8 per code object) for pools of over 128 slots; each is a graph the server keeps,
        # and no step compiles after start-up (the shapes are the probed ones).
        with torch._dynamo.config.patch(recompile_limit=1024):
            self._calibrate()

    def _pad_keys(self) -> None:
        # Each layer's keys and values as the first max_len positions of a buffer one
        # position longer: every window, the whole slot included, is then the same kind of
        # view (strided), so a bucket compiles one graph for all its windows, not a second
        # for the slot's whole, contiguous, length.
        for layer in self.cache["layers"]:
            for name in ("k", "v"):
                if name in layer:
                    t = layer[name]
                    room = t.new_zeros(*t.shape[:2], t.shape[2] + 1, t.shape[3])
                    layer[name] = room[:, :, : t.shape[2]]

    def _calibrate(self) -> None:
        m, spec, windows = self.max_slots, self.spec, self.windows
        if self.device.type == "cpu" and mkl_reproducible() is False:  # the probes can't see it
            log.warning("MKL's reproducibility is off (MKL computed before fmm was imported): "
                        "equal rows may round by their memory alignment, so a request's tokens "
                        "may depend on its slot; import fmm first or set MKL_CBWR=AUTO")  # fmt: skip
        probe = {"cfg": self.step_spec, "context": self.probe_context, "linears": self.linears}
        if len(windows) > 1:
            windows, why = probes.invariant_windows(self.decode, self.params, self.cache,
                                                      windows, **probe)  # fmt: skip
            if why:
                log.warning("key lengths %s (a row rounds differently at: %s)", windows,
                            "; ".join(why))  # fmt: skip
        sizes = batching.bucket_sizes(m) if self.follow_occupancy else [m]
        # With windows every step is a window's view (the whole slot's too): one graph a
        # bucket, which the window probe has shown exact at every window kept.
        length = windows[0] if len(windows) > 1 else None
        buckets, reasons = probes.invariant_buckets(self.decode, self.params, self.cache,
                                                    sizes, length=length, **probe)  # fmt: skip
        self.windows = windows
        if reasons:
            log.warning("decode buckets %s of %s (a row rounds differently at: %s)", buckets,
                        sizes, "; ".join(reasons))  # fmt: skip
        if self.batch_prefill:
            c = self.prefill_chunk
            lengths = [1 << i for i in range(c.bit_length()) if 1 << i < c]
            with self._mode():
                counts = probes.invariant_prefill(self.params, self.cache, lengths, c,
                                                    cfg=spec, context=self.probe_context)  # fmt: skip
            self.batched_prefill = {p: n for p, n in counts.items() if len(n) > 1}
        for n in buckets:
            keys = torch.zeros(n, 2, dtype=torch.int64, device=self.device)
            self.noise(keys, spec.vocab_size)
        self.buckets = buckets
        log.info("decode step over %s rows and %s positions; prompts prefilled together "
                 "{chunk length: rows}: %s", buckets, windows, self.batched_prefill)  # fmt: skip

    def chunks(self, prompt: list[int], max_new_tokens: int) -> list[tuple[list[int], int]]:
        """A prompt's chunks ``(tokens, real tokens)``, from the prompt and the server only:
        cut at multiples of ``prefill_chunk``; a shorter prompt left-padded to a length
        that is prefilled in batches, if its slot has room for the padding."""
        c, n = self.prefill_chunk, len(prompt)
        if n >= c:
            return [(prompt[i : i + c], len(prompt[i : i + c])) for i in range(0, n, c)]
        padded = 1 << (n - 1).bit_length()
        if padded in self.batched_prefill and padded + max_new_tokens - 1 <= self.max_len:
            return [([0] * (padded - n) + prompt, n)]
        return [(prompt, n)]

    def take(self) -> int:
        """The lowest free slot (the live rows stay packed at the pool's start)."""
        return self.free.pop(0)

    def release(self, slot: int) -> None:
        batching.free_slot(self.cache, slot)
        self.next_token[slot] = 0
        self.free = sorted([*self.free, slot])

    def compact(self, rows: list) -> None:
        """Move the live ``rows`` above the bucket that holds them into free slots below it
        (a bit-exact copy), so the step runs over that bucket and no larger."""
        if not rows:
            return
        bucket = batching.bucket_for(len(rows), self.buckets)
        for row in rows:
            if row.slot >= bucket:
                dst = self.take()  # below the bucket: fewer than `bucket` rows live there
                batching.move_slot(self.cache, row.slot, dst)
                self.next_token[dst] = self.next_token[row.slot]
                self.release(row.slot)
                row.slot = dst

    def prefill(self, rows: list) -> None:
        """Prefill at most ``prefill_chunk`` tokens of the ``rows`` still to feed (in order):
        rows whose next chunk has the same length go in one call, as many as the probe
        found exact at that length."""
        budget = self.prefill_chunk
        while budget > 0:
            pending = [r for r in rows if r.fed < len(r.chunks)]
            if not pending:
                return
            p, fresh = len(pending[0].chunks[pending[0].fed][0]), pending[0].fed == 0
            if p > budget:
                return
            group = [r for r in pending if len(r.chunks[r.fed][0]) == p and (r.fed == 0) == fresh]
            n = max(
                k for k in self.batched_prefill.get(p, [1]) if k <= len(group) and k * p <= budget
            )
            self._prefill_rows(group[:n], p, fresh)
            budget -= n * p

    def _prefill_rows(self, group: list, p: int, fresh: bool) -> None:
        chunks = [row.chunks[row.fed] for row in group]
        context = mask = None
        if fresh and self.spec.cross_dim is not None:
            context = torch.cat([row.context for row in group])
            t = context.shape[1]
            mask = torch.cat([torch.ones(1, t, dtype=torch.bool, device=self.device)
                              if row.context_mask is None else row.context_mask
                              for row in group])  # fmt: skip
        with self._mode():
            logits = batching.prefill_slots(
                self.params, torch.tensor([c[0] for c in chunks], device=self.device),
                self.cache, [row.slot for row in group], cfg=self.spec,
                lengths=[c[1] for c in chunks] if fresh else None,
                # Lengths prefilled in batches run the output layer on every position,
                # alone too (see fmm.batching.prefill_slots): the choice follows the length.
                last_only=p not in self.batched_prefill, context=context, context_mask=mask,
            )  # fmt: skip
        for row, last in zip(group, logits):
            row.last, row.fed = last, row.fed + 1

    def bucket(self, live: int) -> int:
        """The rows the step runs over for ``live`` live rows."""
        return batching.bucket_for(live, self.buckets)

    def step(self, active: torch.Tensor) -> torch.Tensor:
        """One decode step over the first ``m`` rows, ``active: bool [m]`` (``m`` a bucket),
        each fed its ``next_token``, attending over the smallest window of positions that
        holds every row's sequence; returns the logits ``[m, vocab]``."""
        m = active.shape[0]
        need = int((self.cache["start"][:m] + self.cache["pos"][:m]).max()) + 1
        window = batching.bucket_for(need, self.windows)
        rows = batching.rows(self.cache, m, length=window if len(self.windows) > 1 else None)
        logits, out = self.decode(self.params, self.next_token[:m].to(self.device), rows,
                                  active.to(self.device), self.step_spec)  # fmt: skip
        rows["pos"].copy_(out["pos"])  # the blocks wrote their keys/values in place
        self.bucket_steps[m] += 1
        self.window_steps[window] += 1
        return logits
