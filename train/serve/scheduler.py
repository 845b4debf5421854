"""Token-level scheduling of generations: continuous batching over one slot pool.

A :class:`Scheduler` owns a pool of ``max_slots`` sequences in one preallocated cache
(:class:`~train.serve.slot_pool.SlotPool` over :mod:`fmm.batching`) and one worker thread. Every iteration it admits waiting requests
into the lowest free slots, prefills at most ``prefill_chunk`` prompt tokens (waiting
prompts' chunks of one shape in one batched call; a long prompt takes several iterations,
so it never stalls the others for long), runs **one** compiled decode step over the
smallest *bucket* of rows that holds the live slots (moving a sequence down when a lower
slot frees, so they stay packed), hands each request its token, and frees a slot the
moment its request ends (EOS, a stop id, its length, or a cancel): the next waiting
request joins at the next iteration.

A request's tokens are the same whatever else runs (see :mod:`fmm.batching` for why). At
start-up (:meth:`Scheduler.warmup`, or before the first request) the scheduler measures,
with its own compiled step on this machine, which buckets (powers of two up to
``max_slots``) give every row bitwise the logits of the whole pool
(:func:`fmm.probes.invariant_buckets`), and steps over those only (one compiled graph
each, none after start-up); at worst the whole pool, always, with the reason logged. It
batches prompts only at the chunk shapes whose rows
:func:`fmm.probes.invariant_prefill` finds bitwise equal to the prompt alone (others are
prefilled alone), and a prompt's chunks (and its left padding) depend on the prompt and
the server only. Token ``i`` of a request is drawn with ``fmm.random.split(fmm.random.key(seed),
max_new_tokens)[i]``, what ``fmm.decoding.generate`` draws for it alone.

Submitting and reading (from an event loop or from any thread)::

    scheduler = Scheduler(params, spec, max_slots=32, prefill_chunk=64, eos_id=50256)
    handle = scheduler.submit(prompt_ids, max_new_tokens=64, temperature=0.8, top_k=40,
                              top_p=0.9, seed=0, stop=[198])
    async for token in handle:          # ints as they are drawn (or: for token in handle.stream())
        ...
    handle.stop_reason                  # "eos" | "stop" | "length" | "cancelled"
    handle.cancel()                     # at any time, from any thread: frees the slot
    tokens = scheduler.submit(ids, max_new_tokens=8).result()   # blocking: all tokens

An EOS or stop token ends the request and is not yielded. ``guidance != 1`` (an image model's
classifier-free guidance) takes two slots, the prompt's and ``null_ids``' (the empty
caption), fed the same token; the guided logits ``uncond + guidance * (cond - uncond)``
are sampled over ids ``[guided_from, vocab)`` only, as ``models.mmgpt.generate_images``
does, and yielded as full-vocabulary ids.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fmm import batching, random
from fmm.kv_cache import as_spec
from fmm.sampling import Sampling
from train.serve.engine import EngineClosed, Overloaded
from train.serve.handle import Handle
from train.serve.openmp import release_workers
from train.serve.slot_pool import SlotPool

__all__ = ["Handle", "Scheduler"]


@dataclass(eq=False)
class _Row:
    handle: Handle
    slot: int
    chunks: list[tuple[list[int], int]]  # the prompt's chunks: (tokens, real tokens)
    fed: int = 0  # chunks prefilled so far
    last: torch.Tensor | None = None  # the prompt's last logits [vocab], once all fed
    context: torch.Tensor | None = None  # [1, T, cross_dim]: cross-attending models
    context_mask: torch.Tensor | None = None  # [1, T] bool, None: all real


class Scheduler:
    """Continuous batching of generations over one pool of ``max_slots`` sequences.

    ``params``/``cfg``: the model and its :class:`fmm.decoding.DecoderSpec` (or a config
    with one). ``max_len``: slots per sequence, prompt and new tokens (default: the model's
    positions). ``prefill_chunk``: most prompt tokens prefilled per iteration.
    ``eos_id``: ends every request. ``compile``: the decode step's dynamo backend
    (``"inductor"``, ``"aot_eager"``, a backend callable) or ``None``/``False``: eager.
    ``max_waiting``: requests queued for a slot before :class:`Overloaded`.
    ``guided_from``: the first id guided requests may draw (see the module docstring).
    ``follow_occupancy``: step over the smallest bucket that holds the live slots (where
    the start-up probe finds it exact); ``False``: always the whole pool.
    ``batch_prefill``: prefill prompts' chunks together (where the probe finds it exact);
    ``False``: each alone. ``context_len``: the context length ``T`` of every request of a
    cross-attending model (each :meth:`submit` gives its own ``context``; CoCa: its
    ``caption_queries``). ``linears``: ``"packed"`` (the default on CPU with oneDNN:
    :class:`fmm.invariance.PackedLinears`), ``"columns"`` (the linear layers computed so that a
    row rounds alike at every row count: :class:`fmm.invariance.ColumnLinears`) or
    ``"rows"`` (plain; fewer buckets prove exact). ``follow_length``: attend over the
    smallest window of positions (64, 128, ... up to 512, then the slot) that holds the live
    sequences, where the probe finds it exact; ``False``: always the slot's ``max_len``.
    ``step_attention``: the decode step's attention, ``"math"`` (the default: faster for one
    query on CPU) or ``"sdpa"``. ``slots``: its :class:`~train.serve.slot_pool.SlotPool`
    (after start-up, ``slots.buckets`` holds the row counts in use and
    ``slots.batched_prefill`` the ``{chunk length: row counts}`` prefilled together).
    """

    def __init__(
        self,
        params: Any,
        cfg: Any,
        *,
        max_slots: int = 32,
        prefill_chunk: int = 64,
        max_len: int | None = None,
        eos_id: int | None = None,
        compile: Any = "inductor",
        max_waiting: int = 1024,
        guided_from: int = 0,
        follow_occupancy: bool = True,
        batch_prefill: bool = True,
        context_len: int | None = None,
        linears: str | None = None,
        follow_length: bool = True,
        step_attention: str = "math",
    ):
        self.spec = spec = as_spec(cfg)
        for name, value in (("max_slots", max_slots), ("prefill_chunk", prefill_chunk),
                            ("max_waiting", max_waiting)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Scheduler: {name} must be an int >= 1, got {value!r}")
        self.max_len = spec.max_positions if max_len is None else max_len
        if self.max_len is None:
            raise ValueError("Scheduler: max_len= is needed for a model of unbounded positions")
        self.params, self.max_slots, self.prefill_chunk = params, max_slots, prefill_chunk
        self.eos_id, self.max_waiting, self.guided_from = eos_id, max_waiting, guided_from
        self.backend = compile or None
        cross = spec.cross_dim is not None
        if cross != (context_len is not None) or (cross and context_len < 1):
            raise ValueError(
                f"Scheduler: context_len must be an int >= 1 for a cross-attending model and "
                f"None otherwise, got {context_len!r}"
            )
        self.context_len = context_len
        self.slots = SlotPool(
            params, spec, max_slots=max_slots, max_len=self.max_len, prefill_chunk=prefill_chunk,
            backend=self.backend, follow_occupancy=follow_occupancy, batch_prefill=batch_prefill,
            context_len=context_len, linears=linears, follow_length=follow_length,
            step_attention=step_attention,
        )  # fmt: skip
        self.device, self.vocab = self.slots.device, spec.vocab_size
        self._waiting: collections.deque[Handle] = collections.deque()
        self._contexts: dict[Handle, tuple] = {}  # waiting requests' (context, context_mask)
        self._prefilling: list[list[_Row]] = []  # a request's rows (two when guided)
        self._running: list[list[_Row]] = []
        self._cv = threading.Condition()
        self._closed = False
        self.steps = 0  # decode iterations run (metrics, tests)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ submitting

    def submit(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop: Sequence[int] = (),
        guidance: float = 1.0,
        null_ids: Sequence[int] | None = None,
        keep_logits: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> Handle:
        """Queue one generation of up to ``max_new_tokens`` after ``prompt_ids``; returns its
        :class:`Handle` at once. ``stop``: token ids that end it (like ``eos_id``).
        ``context: [context_len, cross_dim]`` (cross-attending models only, then required)
        and ``context_mask: bool [context_len]``: what the request's slot cross-attends
        (CoCa: one image's ``image_queries``), its keys and values computed once at its
        prefill.
        ``ValueError`` for bad options, :class:`Overloaded` when ``max_waiting`` requests
        already wait, :class:`~train.serve.engine.EngineClosed` after :meth:`close`."""
        prompt = self._ids("prompt_ids", prompt_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens < 1 or len(prompt) + max_new_tokens - 1 > self.max_len:
            raise ValueError(
                f"prompt of {len(prompt)} tokens plus max_new_tokens={max_new_tokens} is past "
                f"the {self.max_len} positions of a slot"
            )
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)  # checks them
        contexts = self._context(context, context_mask)
        if guidance != 1.0:
            if null_ids is None:
                raise ValueError(f"null_ids is missing: guidance={guidance} needs null_ids")
            null_ids = self._ids("null_ids", null_ids)
            if len(null_ids) + max_new_tokens - 1 > self.max_len or self.max_slots < 2:
                raise ValueError("null_ids: too long for a slot (or fewer than 2 slots)")
        keys = random.split(random.key(seed), max_new_tokens)
        handle = Handle(
            prompt=prompt, max_new_tokens=max_new_tokens, sampling=sampling, keys=keys,
            stop_ids=frozenset(int(s) for s in stop) | (
                frozenset() if self.eos_id is None else {self.eos_id}),
            guidance=float(guidance), null_ids=null_ids,
            keep_logits=keep_logits,
        )  # fmt: skip
        try:
            handle._loop = asyncio.get_running_loop()
            handle._wake = asyncio.Event()
        except RuntimeError:  # submitted from a plain thread: read it with stream()/result()
            pass
        with self._cv:
            if self._closed:
                raise EngineClosed("the scheduler is closed")
            if len(self._waiting) >= self.max_waiting:
                raise Overloaded(
                    f"{len(self._waiting)} generations wait for a slot (max "
                    f"{self.max_waiting}); retry later"
                )
            self._waiting.append(handle)
            if contexts is not None:
                self._contexts[handle] = contexts
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fmm-scheduler", daemon=True)
                self._thread.start()
            self._cv.notify()
        return handle

    def _ids(self, name: str, ids: Sequence[int]) -> list[int]:
        out = [int(t) for t in ids]
        if not out:
            raise ValueError(f"{name}: empty; a generation needs at least one token")
        if self.vocab is not None and not all(0 <= t < self.vocab for t in out):
            raise ValueError(f"{name}: every id must be in [0, {self.vocab})")
        return out

    def _context(self, context, context_mask) -> tuple | None:
        # A request's context as [1, T, cross_dim] (and mask [1, T]) on the pool's device.
        if self.context_len is None:
            if context is not None or context_mask is not None:
                raise ValueError("context: this model does not cross-attend; give none")
            return None
        want = (self.context_len, self.spec.cross_dim)
        if not isinstance(context, torch.Tensor) or tuple(context.shape) != want:
            got = "none" if context is None else f"{tuple(getattr(context, 'shape', ()))}"
            raise ValueError(f"context: a [{want[0]}, {want[1]}] float tensor is needed, got {got}")
        if not context.is_floating_point() or not bool(torch.isfinite(context).all()):
            raise ValueError("context: must be a finite float tensor")
        if context_mask is not None:
            if not isinstance(context_mask, torch.Tensor) or tuple(context_mask.shape) != want[:1]:
                raise ValueError(f"context_mask: a bool tensor [{want[0]}] is needed")
            if not bool(context_mask.any()):
                raise ValueError("context_mask: at least one position must be real")
            context_mask = context_mask.bool()[None].to(self.device)
        dtype = self.slots.cache["layers"][-1]["ck"].dtype
        return context[None].to(self.device, dtype), context_mask

    def warmup(self) -> None:
        """Probe and compile now, on the idle pool, so that no request waits for it: which
        buckets and prefill shapes are exact on this machine (see the module docstring),
        the decode step compiled at each bucket and the sampling noise at each one used.
        Call before the first submit (otherwise the worker does it before its first
        request)."""
        if self._thread is not None:
            raise RuntimeError("warmup() must run before the first submit")
        with torch.inference_mode():
            self.slots.calibrate()
        release_workers()  # this thread's idle workers would slow every step (see openmp)

    @property
    def load(self) -> dict:
        """``{"waiting", "running", "free_slots"}`` now."""
        return {"waiting": len(self._waiting), "running": len(self._running) + len(
            self._prefilling), "free_slots": len(self.slots.free)}  # fmt: skip

    def close(self) -> None:
        """Stop the worker; unfinished requests end with :class:`EngineClosed`."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                try:
                    if not self._iterate():
                        break
                except Exception as e:  # the model failed: its requests end with the error
                    # (all waiting ones too if it failed in the start-up probe)
                    waiting = self._take_waiting() if self.slots.buckets is None else []
                    self._fail(waiting + self._prefilling + self._running, e)
                    self._prefilling, self._running = [], []
            self._fail(self._take_waiting() + self._prefilling + self._running,
                       EngineClosed("the scheduler closed"))  # fmt: skip

    def _take_waiting(self) -> list[list[_Row]]:
        with self._cv:
            waiting = [[_Row(h, -1, [])] for h in self._waiting]
            self._waiting.clear()
            self._contexts.clear()
        return waiting

    def _fail(self, requests: list[list[_Row]], error: BaseException) -> None:
        for rows in requests:
            handle = rows[0].handle
            self._release([row for row in rows if row.slot >= 0])
            if not handle.done:
                handle.end(error=error)

    def _iterate(self) -> bool:
        with self._cv:
            while not (self._closed or self._waiting or self._prefilling or self._running):
                release_workers()  # idle: other threads' work gets the cores (see openmp)
                self._cv.wait()
            if self._closed:
                return False
        if self.slots.buckets is None:
            self.slots.calibrate()
        with self._cv:
            self._admit()
        self._drop_cancelled()
        self.slots.compact([row for rows in self._prefilling + self._running for row in rows])
        self._prefill()
        if self._running:
            self._decode()
        return True

    def _admit(self) -> None:
        while self._waiting:
            handle = self._waiting[0]
            if handle._cancelled:
                self._waiting.popleft()
                self._contexts.pop(handle, None)
                self._finish(handle, [], "cancelled")
                continue
            prompts = [handle.prompt] + ([handle.null_ids] if handle.guidance != 1.0 else [])
            if len(self.slots.free) < len(prompts):
                return
            self._waiting.popleft()
            new, (context, mask) = handle.max_new_tokens, self._contexts.pop(handle, (None, None))
            rows = [_Row(handle, self.slots.take(), self.slots.chunks(p, new), context=context,
                         context_mask=mask) for p in prompts]  # fmt: skip
            self._prefilling.append(rows)

    def _drop_cancelled(self) -> None:
        for rows in [r for r in self._prefilling if r[0].handle._cancelled]:
            self._prefilling.remove(rows)
            self._finish(rows[0].handle, rows, "cancelled")
        for rows in [r for r in self._running if r[0].handle._cancelled]:
            self._running.remove(rows)
            self._finish(rows[0].handle, rows, "cancelled")

    def _prefill(self) -> None:
        self.slots.prefill([row for rows in self._prefilling for row in rows])
        for rows in [r for r in self._prefilling if all(x.fed == len(x.chunks) for x in r)]:
            self._prefilling.remove(rows)
            handle, logits = rows[0].handle, torch.stack([row.last for row in rows])
            token = self._pick(handle, logits, handle.keys[0])
            if self._emit(handle, rows, token, logits):
                self._running.append(rows)

    def _pick(self, handle: Handle, logits: torch.Tensor, key: torch.Tensor) -> int:
        """A token of one request from its rows' logits ``[1 or 2, vocab]`` (batch 1 alone)."""
        if handle.guidance == 1.0:
            return int(handle.sampling(logits[:1], key.to(self.device))[0])
        g = self.guided_from
        cond, uncond = logits[:1, g:], logits[1:, g:]
        guided = uncond + handle.guidance * (cond - uncond)
        return int(handle.sampling(guided, key.to(self.device))[0]) + g

    def _emit(self, handle: Handle, rows: list[_Row], token: int, logits: torch.Tensor) -> bool:
        """Hand ``token`` to its request; False (and the slots freed) if the request ended."""
        if handle.keep_logits:
            handle.logits.append(logits[0].detach().clone())
        if token in handle.stop_ids:
            self._finish(handle, rows, "eos" if token == self.eos_id else "stop")
            return False
        handle.tokens.append(token)
        handle.times.append(time.perf_counter())
        handle.push(token)
        if len(handle.tokens) >= handle.max_new_tokens:
            self._finish(handle, rows, "length")
            return False
        for row in rows:
            self.slots.next_token[row.slot] = token
        return True

    def _finish(self, handle: Handle, rows: list[_Row], reason: str) -> None:
        self._release(rows)
        handle.end(reason)

    def _release(self, rows: list[_Row]) -> None:
        for row in rows:
            self.slots.release(row.slot)

    def _decode(self) -> None:
        m = self.slots.bucket(sum(len(rows) for rows in self._prefilling + self._running))
        active = torch.zeros(m, dtype=torch.bool)
        temperature, top_p = torch.zeros(m), torch.zeros(m)
        top_k = torch.zeros(m, dtype=torch.int64)
        keys = torch.zeros(m, 2, dtype=torch.int64)
        plain = []  # requests sampled in the batch (the guided ones are combined per pair)
        for rows in self._running:
            h = rows[0].handle
            for row in rows:
                active[row.slot] = True
            if h.guidance == 1.0:
                s, i = rows[0].slot, len(h.tokens)
                temperature[s] = h.sampling.temperature
                top_k[s] = h.sampling.top_k or 0
                top_p[s] = h.sampling.top_p or 0.0
                keys[s] = h.keys[i]
                plain.append(rows)
        dev, logits = self.device, self.slots.step(active)
        self.steps += 1
        tokens = None
        if plain:
            noise = None
            if bool((temperature > 0).any()):
                noise = self.slots.noise(keys.to(dev), logits.shape[-1])
            tokens = batching.sample_slots(
                logits, noise, temperature=temperature.to(dev), top_k=top_k.to(dev),
                top_p=top_p.to(dev),
            ).tolist()  # fmt: skip
        for rows in list(self._running):
            h = rows[0].handle
            own = logits[[row.slot for row in rows]]
            if h.guidance == 1.0:
                token = tokens[rows[0].slot]
            else:
                token = self._pick(h, own, h.keys[len(h.tokens)])
            if not self._emit(h, rows, token, own):
                self._running.remove(rows)
