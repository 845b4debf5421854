"""A generation's :class:`Handle`: its tokens as they come (from an event loop or any
thread), its cancel switch and its record. :mod:`train.serve.scheduler` makes them."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from fmm.sampling import Sampling

_END = object()


@dataclass(eq=False)
class Handle:
    """One submitted generation: iterate its tokens (``async for`` or :meth:`stream`),
    :meth:`cancel` it, or wait for :meth:`result`. ``times``: ``time.perf_counter()`` at
    each token; ``logits``: each token's logits ``[vocab]`` when submitted with
    ``keep_logits=True`` (exactness tests)."""

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    keys: torch.Tensor
    stop_ids: frozenset[int]
    guidance: float = 1.0
    null_ids: list[int] | None = None
    keep_logits: bool = False
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    stop_reason: str | None = None
    submitted: float = field(default_factory=time.perf_counter)
    _out: collections.deque = field(default_factory=collections.deque)
    _ready: threading.Condition = field(default_factory=threading.Condition)
    _loop: asyncio.AbstractEventLoop | None = None
    _wake: asyncio.Event | None = None
    _cancelled: bool = False
    _error: BaseException | None = None

    def cancel(self) -> None:
        """Stop this generation at the next iteration and free its slot (no-op once done)."""
        self._cancelled = True

    @property
    def done(self) -> bool:
        """Whether the generation has ended (its last token, if any, may still be unread)."""
        return self.stop_reason is not None or self._error is not None

    def push(self, item: Any) -> None:
        """(The scheduler's) hand the reader one token."""
        with self._ready:
            self._out.append(item)
            self._ready.notify_all()
        if self._loop is not None:
            # A closed submitting loop means nobody awaits this handle any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._wake.set)

    def end(self, reason: str | None = None, error: BaseException | None = None) -> None:
        """(The scheduler's) end this generation: with a ``stop_reason``, or an ``error``
        that its reader then raises."""
        self.stop_reason, self._error = reason, error
        self.push(_END)

    def _ended(self, item: Any) -> bool:
        if item is _END and self._error is not None:
            raise self._error
        return item is _END

    def stream(self, timeout: float | None = None) -> Iterator[int]:
        """The tokens as they come, blocking (any thread); ``TimeoutError`` if none arrives
        within ``timeout`` seconds."""
        while True:
            with self._ready:
                if not self._ready.wait_for(lambda: self._out, timeout):
                    raise TimeoutError(f"no token within {timeout}s")
                item = self._out.popleft()
            if self._ended(item):
                return
            yield item

    def result(self, timeout: float | None = None) -> list[int]:
        """All tokens once the generation ends (blocking)."""
        for _ in self.stream(timeout):
            pass
        return list(self.tokens)

    async def __aiter__(self) -> AsyncIterator[int]:
        if self._wake is None:
            raise RuntimeError("async iteration needs a handle submitted from an event loop")
        while True:
            with self._ready:
                item = self._out.popleft() if self._out else None
                if item is None:
                    self._wake.clear()
            if item is None:
                await self._wake.wait()
            elif self._ended(item):
                return
            else:
                yield item
