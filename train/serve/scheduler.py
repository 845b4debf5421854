"""Token-level scheduling of generations: continuous batching over one slot pool.

A :class:`Scheduler` owns a pool of ``max_slots`` sequences in one preallocated cache
(:mod:`fmm.batching`) and one worker thread. Every iteration it admits waiting requests
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
(:func:`fmm.batching.invariant_buckets`), and steps over those only (one compiled graph
each, none after start-up); at worst the whole pool, always, with the reason logged. It
batches prompts only at the chunk shapes whose rows
:func:`fmm.batching.invariant_prefill` finds bitwise equal to the prompt alone (others are
prefilled alone), and a prompt's chunks (and its left padding) depend on the prompt only.
Token ``i`` of a request is drawn with ``fmm.random.split(fmm.random.key(seed),
max_new_tokens)[i]``, what ``fmm.decoding.generate`` draws for it alone.

Submitting and reading (from an event loop or from any thread)::

    scheduler = Scheduler(params, spec, max_slots=16, prefill_chunk=64, eos_id=50256)
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
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fmm import batching, random
from fmm.kv_cache import as_spec, init_cache
from fmm.sampling import Sampling
from train.serve.engine import EngineClosed, Overloaded
from train.serve.handle import Handle

__all__ = ["Handle", "Scheduler"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Row:
    handle: Handle
    slot: int
    chunks: list[tuple[list[int], int]]  # the prompt's chunks: (tokens, real tokens)
    fed: int = 0  # chunks prefilled so far
    last: torch.Tensor | None = None  # the prompt's last logits [vocab], once all fed


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
    ``False``: each alone. After start-up, ``buckets`` holds the row counts in use and
    ``batched_prefill`` the ``{chunk length: row counts}`` prefilled together.
    """

    def __init__(
        self,
        params: Any,
        cfg: Any,
        *,
        max_slots: int = 16,
        prefill_chunk: int = 64,
        max_len: int | None = None,
        eos_id: int | None = None,
        compile: Any = "inductor",
        max_waiting: int = 1024,
        guided_from: int = 0,
        follow_occupancy: bool = True,
        batch_prefill: bool = True,
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
        leaf = spec.blocks(params)[0]["attn"]["qkv"]["weight"]
        self.device, self.vocab = leaf.device, spec.vocab_size
        with torch.inference_mode():  # the step's inputs, as the probe's (no recompile)
            self.pool = init_cache(spec, max_slots, self.max_len, dtype=leaf.dtype,
                                   device=self.device)  # fmt: skip
            self._next_token = torch.zeros(max_slots, dtype=torch.int64)
        self._step = batching.compiled_decode(self.backend)
        self.follow_occupancy, self.batch_prefill = follow_occupancy, batch_prefill
        self.buckets: list[int] | None = None  # set by the start-up probe
        self.batched_prefill: dict[int, list[int]] = {}
        self.bucket_steps: collections.Counter[int] = collections.Counter()  # metrics, tests
        self._waiting: collections.deque[Handle] = collections.deque()
        self._prefilling: list[list[_Row]] = []  # a request's rows (two when guided)
        self._running: list[list[_Row]] = []
        self._free = list(range(max_slots))
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
    ) -> Handle:
        """Queue one generation of up to ``max_new_tokens`` after ``prompt_ids``; returns its
        :class:`Handle` at once. ``stop``: token ids that end it (like ``eos_id``).
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

    def warmup(self) -> None:
        """Probe and compile now, on the idle pool, so that no request waits for it: which
        buckets and prefill shapes are exact on this machine (see the module docstring),
        the decode step compiled at each bucket and the sampling noise at each one used.
        Call before the first submit (otherwise the worker does it before its first
        request)."""
        if self._thread is not None:
            raise RuntimeError("warmup() must run before the first submit")
        with torch.inference_mode():
            self._calibrate()

    def _calibrate(self) -> None:
        m, spec = self.max_slots, self.spec
        sizes = batching.bucket_sizes(m) if self.follow_occupancy else [m]
        buckets, reasons = batching.invariant_buckets(self._step, self.params, self.pool,
                                                      sizes, cfg=spec)  # fmt: skip
        if reasons:
            log.warning("decode buckets %s of %s (a row rounds differently at: %s)", buckets,
                        sizes, "; ".join(reasons))  # fmt: skip
        if self.batch_prefill:
            c = self.prefill_chunk
            lengths = [1 << i for i in range(c.bit_length()) if 1 << i < c]
            counts = batching.invariant_prefill(self.params, self.pool, lengths, c, cfg=spec)
            self.batched_prefill = {p: n for p, n in counts.items() if len(n) > 1}
        for n in buckets:
            keys = torch.zeros(n, 2, dtype=torch.int64, device=self.device)
            batching.slot_noise(keys, self.vocab, backend=self.backend)
        self.buckets = buckets

    @property
    def load(self) -> dict:
        """``{"waiting", "running", "free_slots"}`` now."""
        return {"waiting": len(self._waiting), "running": len(self._running) + len(
            self._prefilling), "free_slots": len(self._free)}  # fmt: skip

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
                    self._fail(self._prefilling + self._running, e)
                    self._prefilling, self._running = [], []
            with self._cv:
                waiting = [[_Row(h, -1, [])] for h in self._waiting]
                self._waiting.clear()
            self._fail(waiting + self._prefilling + self._running,
                       EngineClosed("the scheduler closed"))  # fmt: skip

    def _fail(self, requests: list[list[_Row]], error: BaseException) -> None:
        for rows in requests:
            handle = rows[0].handle
            self._release([row for row in rows if row.slot >= 0])
            if not handle.done:
                handle.end(error=error)

    def _iterate(self) -> bool:
        with self._cv:
            while not (self._closed or self._waiting or self._prefilling or self._running):
                self._cv.wait()
            if self._closed:
                return False
        if self.buckets is None:
            self._calibrate()
        with self._cv:
            self._admit()
        self._drop_cancelled()
        self._compact()
        self._prefill()
        if self._running:
            self._decode()
        return True

    def _admit(self) -> None:
        while self._waiting:
            handle = self._waiting[0]
            if handle._cancelled:
                self._waiting.popleft()
                self._finish(handle, [], "cancelled")
                continue
            prompts = [handle.prompt] + ([handle.null_ids] if handle.guidance != 1.0 else [])
            if len(self._free) < len(prompts):
                return
            self._waiting.popleft()
            new = handle.max_new_tokens
            rows = [_Row(handle, self._free.pop(0), self._chunks(p, new)) for p in prompts]
            self._prefilling.append(rows)

    def _chunks(self, prompt: list[int], max_new_tokens: int) -> list[tuple[list[int], int]]:
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

    def _drop_cancelled(self) -> None:
        for rows in [r for r in self._prefilling if r[0].handle._cancelled]:
            self._prefilling.remove(rows)
            self._finish(rows[0].handle, rows, "cancelled")
        for rows in [r for r in self._running if r[0].handle._cancelled]:
            self._running.remove(rows)
            self._finish(rows[0].handle, rows, "cancelled")

    def _compact(self) -> None:
        # Live sequences above the bucket that holds them move down into free slots (a
        # bit-exact copy), so the step runs over that bucket and no larger.
        live = [row for rows in self._prefilling + self._running for row in rows]
        if not live:
            return
        bucket = batching.bucket_for(len(live), self.buckets)
        for row in live:
            if row.slot >= bucket:
                with self._cv:
                    dst = self._free.pop(0)
                    self._free = sorted([*self._free, row.slot])
                batching.move_slot(self.pool, row.slot, dst)
                self._next_token[dst] = self._next_token[row.slot]
                self._next_token[row.slot] = 0
                row.slot = dst

    def _prefill(self) -> None:
        # At most prefill_chunk tokens per iteration: rows whose next chunk has the same
        # length go in one call, as many as the probe found exact at that length.
        budget = self.prefill_chunk
        while budget > 0:
            pending = [r for rows in self._prefilling for r in rows if r.fed < len(r.chunks)]
            if not pending:
                break
            p, fresh = len(pending[0].chunks[pending[0].fed][0]), pending[0].fed == 0
            if p > budget:
                break
            group = [r for r in pending if len(r.chunks[r.fed][0]) == p and (r.fed == 0) == fresh]
            n = max(
                k for k in self.batched_prefill.get(p, [1]) if k <= len(group) and k * p <= budget
            )
            self._prefill_rows(group[:n], p, fresh)
            budget -= n * p
        for rows in [r for r in self._prefilling if all(x.fed == len(x.chunks) for x in r)]:
            self._prefilling.remove(rows)
            handle, logits = rows[0].handle, torch.stack([row.last for row in rows])
            token = self._pick(handle, logits, handle.keys[0])
            if self._emit(handle, rows, token, logits):
                self._running.append(rows)

    def _prefill_rows(self, group: list[_Row], p: int, fresh: bool) -> None:
        chunks = [row.chunks[row.fed] for row in group]
        logits = batching.prefill_slots(
            self.params, torch.tensor([c[0] for c in chunks], device=self.device), self.pool,
            [row.slot for row in group], cfg=self.spec,
            lengths=[c[1] for c in chunks] if fresh else None,
            # Lengths prefilled in batches run the output layer on every position, alone
            # too (see fmm.batching.prefill_slots): the choice follows the length only.
            last_only=p not in self.batched_prefill,
        )  # fmt: skip
        for row, last in zip(group, logits):
            row.last, row.fed = last, row.fed + 1

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
            self._next_token[row.slot] = token
        return True

    def _finish(self, handle: Handle, rows: list[_Row], reason: str) -> None:
        self._release(rows)
        handle.end(reason)

    def _release(self, rows: list[_Row]) -> None:
        for row in rows:
            batching.free_slot(self.pool, row.slot)
            self._next_token[row.slot] = 0
        with self._cv:
            self._free = sorted(self._free + [row.slot for row in rows])

    def _decode(self) -> None:
        live = sum(len(rows) for rows in self._prefilling + self._running)
        m = batching.bucket_for(live, self.buckets)
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
        dev, bucket = self.device, batching.rows(self.pool, m)
        logits, out = self._step(
            self.params, self._next_token[:m].to(dev), bucket, active.to(dev), self.spec
        )
        bucket["pos"].copy_(out["pos"])  # the blocks wrote their keys/values in place
        self.steps += 1
        self.bucket_steps[m] += 1
        tokens = None
        if plain:
            noise = None
            if bool((temperature > 0).any()):
                noise = batching.slot_noise(keys.to(dev), logits.shape[-1], backend=self.backend)
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
