"""Asyncio inference engine: dynamic batching, a bounded queue, timeouts, a store in front.

A :class:`Batcher` turns many concurrent ``await submit(...)`` calls into few calls of a
batched function ``fn(items) -> [len(items), ...]``: it waits at most ``max_wait_ms`` after
the first queued item for up to ``max_batch`` items, then runs ``fn`` in a worker thread so
the event loop keeps accepting requests. Every queued or running item holds one of
``max_queue`` slots; a request that would exceed them is refused at once with
:class:`Overloaded`, so memory stays bounded under any load. A request that times out or is
cancelled gives its slots back immediately (its items are skipped if still queued).

An :class:`Engine` holds one batcher per kind of input (``"text"``, ``"image"``, ...) and an
optional embedding store (``train.store.EmbeddingStore`` or anything with ``get_many`` /
``put_many``): each request's items are looked up first and only the misses are computed;
each computed batch is written back in one transaction, as cached rows (``pinned=False``:
the store's bounded LRU part, never search results), so serving never grows the store
past its cache size.

Example::

    engine = Engine({"text": embed_texts}, store=store, max_batch=32, max_wait_ms=5)
    vectors = await engine.embed("text", ["a red circle"], keys=[content_key("text", "a red circle")])
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from train.serve.metrics import Metrics
from train.serve.openmp import releasing

_log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The queue has no free slot for the request: refused before any work was done."""


class EngineClosed(RuntimeError):
    """The engine was closed; it accepts no more requests."""


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    tag: Any = None


class Batcher:
    """Dynamic batching of ``fn(items: list) -> Tensor [len(items), ...]`` (or any sequence
    of ``len(items)`` results).

    ``max_batch``: most items per call; ``max_wait_ms``: how long the first queued item waits
    for company; ``max_queue``: slots for items queued or running; ``executor``: where ``fn``
    runs (default: one private worker thread, so calls never overlap).

    Example::

        batcher = Batcher(lambda xs: model(torch.stack(xs)), max_batch=16, max_wait_ms=2)
        ys = await batcher.run([x1, x2], timeout=1.0)   # [2, ...]
    """

    def __init__(
        self,
        fn: Callable[[list], Any],
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        executor: concurrent.futures.Executor | None = None,
        metrics: Metrics | None = None,
        name: str = "batch",
    ):
        for arg, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"Batcher: {arg} must be an int >= {low}, got {value!r}")
        if not max_wait_ms >= 0:
            raise ValueError(f"Batcher: max_wait_ms must be >= 0, got {max_wait_ms!r}")
        self.fn, self.name = fn, name
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1e3, max_queue
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"fmm-serve-{name}"
        )
        self.metrics = metrics or Metrics()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._depth = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False

    @property
    def depth(self) -> int:
        """Slots held now: items queued or running whose requests still wait for them."""
        return self._depth

    def _release(self, _future: asyncio.Future) -> None:
        self._depth -= 1

    def _ensure_started(self) -> None:
        if self._closed:
            raise EngineClosed(f"batcher {self.name!r} is closed")
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def submit_many(self, items: Sequence[Any], tags: Sequence[Any] | None = None) -> list:
        """Queue ``items`` all or none: futures of their results, or :class:`Overloaded` if
        fewer than ``len(items)`` slots are free. Call from the event loop."""
        self._ensure_started()
        if self._depth + len(items) > self.max_queue:
            self.metrics.count("refused_overloaded")
            raise Overloaded(
                f"{self.name} queue is full: {self._depth} of {self.max_queue} slots held, "
                f"{len(items)} more requested; retry later"
            )
        loop = asyncio.get_running_loop()
        tags = [None] * len(items) if tags is None else tags
        futures = []
        for item, tag in zip(items, tags, strict=True):
            future = loop.create_future()
            self._depth += 1
            future.add_done_callback(self._release)
            self._queue.append(_Pending(item, future, tag))
            futures.append(future)
        self._wake.set()
        return futures

    async def run(self, items: Sequence[Any], *, timeout: float | None = None) -> list:
        """Results of ``items`` (in order), computed in batches with other requests' items.

        Raises :class:`Overloaded` (nothing queued), ``TimeoutError`` after ``timeout``
        seconds, or what ``fn`` raised. On timeout or cancellation every slot is freed.
        """
        futures = self.submit_many(items)
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), timeout)
        finally:
            for future in futures:
                future.cancel()  # no-op on finished ones; frees the slots of the rest

    def _take(self, n: int) -> list[_Pending]:
        taken = []
        while self._queue and len(taken) < n:
            pending = self._queue.popleft()
            if not pending.future.done():  # skip items whose request gave up
                taken.append(pending)
        return taken

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            batch = self._take(self.max_batch)
            if not batch:
                await self._wake.wait()
                continue
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch and (left := deadline - loop.time()) > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    break
                batch += self._take(self.max_batch - len(batch))
            batch = [p for p in batch if not p.future.done()]
            if batch:
                await self._run_batch(loop, batch)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        self.metrics.observe_batch(self.name, len(batch))
        try:
            results = await loop.run_in_executor(self._executor, releasing(self._call), batch)
        except Exception as e:  # fn's failure belongs to the requests of this batch
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        for p, result in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(result)

    def _call(self, batch: list[_Pending]) -> Sequence[Any]:
        with torch.inference_mode():
            results = self.fn([p.item for p in batch])
        if len(results) != len(batch):
            raise RuntimeError(
                f"{self.name}: fn returned {len(results)} results for {len(batch)} items"
            )
        return results

    async def aclose(self) -> None:
        """Stop batching; queued requests fail with :class:`EngineClosed`."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(EngineClosed(f"batcher {self.name!r} closed"))
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)


class Engine:
    """Batched embedding of several kinds of input behind an optional embedding store.

    ``fns``: ``{kind: fn}`` with ``fn(items: list) -> Tensor [len(items), dim]``. All kinds
    share one worker thread (one model, one set of intra-op threads). ``store``: consulted
    with the keys a caller passes; computed vectors are written back per batch (the item's
    ``meta`` string alongside). Other arguments as :class:`Batcher`.

    Example::

        engine = Engine({"text": lambda texts: encode(tokenize(texts))}, store=store)
        vecs = await engine.embed("text", texts, keys=[content_key("text", t) for t in texts])
    """

    def __init__(
        self,
        fns: Mapping[str, Callable[[list], torch.Tensor]],
        *,
        store: Any = None,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        metrics: Metrics | None = None,
    ):
        if not fns:
            raise ValueError("Engine: fns is empty; give at least one {kind: fn}")
        self.store = store
        self.metrics = metrics or Metrics()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fmm-model")
        # Store lookups get their own thread: a hit must not wait behind a model batch.
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fmm-store")
        self.batchers = {
            kind: Batcher(
                self._storing(fn),
                max_batch=max_batch,
                max_wait_ms=max_wait_ms,
                max_queue=max_queue,
                executor=self._executor,
                metrics=self.metrics,
                name=kind,
            )
            for kind, fn in fns.items()
        }

    def _storing(self, fn: Callable[[list], torch.Tensor]) -> Callable[[list], torch.Tensor]:
        # Items travel as (item, key, meta). Popular content arrives many times at once, and
        # every copy missed the store when its request looked: so the batch looks again
        # (an earlier batch may have stored it since), computes each key once, and writes
        # its new vectors in one transaction, all before any waiter is answered.
        def run(entries: list) -> torch.Tensor:
            keys = [key for _, key, _ in entries]
            known = self._recheck([k for k in dict.fromkeys(keys) if k is not None])
            first: dict = {}  # what to compute: key (or position, unkeyed) -> first entry
            for i, key in enumerate(keys):
                if key not in known:
                    first.setdefault(i if key is None else key, i)
            computed = {}
            if first:
                out = fn([entries[i][0] for i in first.values()]).detach().cpu()
                computed = dict(zip(first, out))
            self.metrics.count("deduplicated", len(entries) - len(first))
            fresh = {key: v for key, v in computed.items() if isinstance(key, str)}
            if self.store is not None and fresh:
                meta = {k: m for _, k, m in entries if k in fresh and m is not None}
                try:
                    self.store.put_many(fresh, meta=meta or None, pinned=False)
                except Exception:  # the vectors are right; only their reuse is lost
                    self.metrics.count("store_write_errors")
                    _log.exception("could not store %d embeddings", len(fresh))
            rows = [
                known[key] if key in known else computed[i if key is None else key]
                for i, key in enumerate(keys)
            ]
            return torch.stack(rows)

        return run

    def _recheck(self, keys: list[str]) -> dict[str, torch.Tensor]:
        if self.store is None or not keys:
            return {}
        try:
            return self.store.get_many(keys)
        except Exception:  # a failed lookup only costs a recompute
            _log.exception("could not read %d embeddings back", len(keys))
            return {}

    async def in_store_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` run in the store's thread (store calls never block the
        event loop, and never wait behind a model batch)."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._io, call)

    @property
    def depth(self) -> int:
        """Slots held across all kinds."""
        return sum(b.depth for b in self.batchers.values())

    async def embed(
        self,
        kind: str,
        items: Sequence[Any],
        *,
        keys: Sequence[str] | None = None,
        meta: Sequence[str | None] | None = None,
        timeout: float | None = None,
        keep: bool = True,
    ) -> tuple[torch.Tensor, list[bool]]:
        """``(vectors [len(items), dim], hit per item)``: store hits first, the rest batched.

        ``keys``: one store key per item (``train.store.content_key``); without them (or
        without a store) everything is computed. ``keep=False``: look up, but do not store
        what is computed (a search query is not an item). Raises ``KeyError`` for an
        unknown ``kind``, :class:`Overloaded`, ``TimeoutError``.
        """
        if kind not in self.batchers:
            raise KeyError(f"unknown kind {kind!r}; this engine embeds {sorted(self.batchers)}")
        if not items:
            raise ValueError(f"embed({kind!r}): items is empty")
        if keys is not None and len(keys) != len(items):
            raise ValueError(f"embed: {len(keys)} keys for {len(items)} items")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        hits: dict[str, torch.Tensor] = {}
        if self.store is not None and keys is not None:
            hits = await asyncio.wait_for(
                loop.run_in_executor(self._io, self.store.get_many, list(keys)), timeout
            )
        keys = list(keys) if keys is not None and self.store is not None else [None] * len(items)
        meta = list(meta) if meta is not None else [None] * len(items)
        miss = [i for i, key in enumerate(keys) if key not in hits]
        self.metrics.count("cache_hits", len(items) - len(miss))
        self.metrics.count("cache_misses", len(miss))
        computed: list = []
        if miss:
            left = None if deadline is None else max(deadline - loop.time(), 0.0)
            entries = [(items[i], keys[i] if keep else None, meta[i]) for i in miss]
            computed = await self.batchers[kind].run(entries, timeout=left)
        rows: list = [hits.get(key) if key is not None else None for key in keys]
        for i, vector in zip(miss, computed):
            rows[i] = vector
        missed = set(miss)
        return torch.stack(rows), [i not in missed for i in range(len(items))]

    async def aclose(self) -> None:
        """Close every batcher and the worker threads."""
        for batcher in self.batchers.values():
            await batcher.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._io.shutdown(wait=False, cancel_futures=True)
