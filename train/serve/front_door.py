"""The ASGI front door: every request body is bounded in bytes and in time before the app sees it.

- Headers over ``max_header_bytes`` are answered 431 (the protocol refuses partial ones
  that grow past it: :mod:`train.serve.server`).
- A body over ``max_body_bytes`` is answered 413 before it is read (by its Content-Length)
  or as soon as it passes the limit (chunked).
- All bodies being read or handled at once share ``max_buffered_bytes``: a request that would
  pass it is answered 503 (``Retry-After: 1``) once its body is read and dropped, so memory
  is bounded whatever the number of connections (each connection costs at most ~64 KB
  more: uvicorn's read-ahead).
- A body that has not fully arrived ``body_timeout_s`` after its headers is answered 408 and
  its connection closed (a slow sender holds a connection for at most that long; the header
  timeout is the protocol's, in :mod:`train.serve.server`).
- Every answer's status and latency is counted in :class:`~train.serve.metrics.Metrics`.

Plain ASGI: Starlette's ``BaseHTTPMiddleware`` costs a task and a stream per request.

Example::

    app = FrontDoor(fastapi_app, HttpLimits(max_body_bytes=2**20), metrics)
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from train.serve.metrics import Metrics

_NO_BODY = ("GET", "HEAD")  # routes of these methods never read a body: pass them through


@dataclass(frozen=True, kw_only=True)
class HttpLimits:
    """What one server accepts from its clients (the ``--max-*`` / ``--*-timeout-s`` flags).

    ``max_connections``: open connections before a new one is answered 503 and closed;
    ``max_header_bytes``: request line and headers (431 past it); ``keep_alive_s``: how long
    an idle connection stays open: longer than the idle expiry of clients' pools (httpx 5 s,
    aiohttp 15 s, Go's net/http 90 s), so that a client never sends a request on a connection
    the server is closing at that moment (the kernel answers it with a reset: a lost
    request); ``backlog``: the listen queue (the kernel caps it at ``net.core.somaxconn``).
    """

    max_body_bytes: int = 8 * 2**20
    max_buffered_bytes: int = 32 * 2**20
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    max_header_bytes: int = 16 * 2**10
    keep_alive_s: float = 100.0
    max_connections: int = 2048
    backlog: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_buffered_bytes", "max_header_bytes",
                     "max_connections", "backlog"):  # fmt: skip
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(
                    f"HttpLimits: {name} must be an int >= 1, got {getattr(self, name)!r}"
                )
        for name in ("body_timeout_s", "header_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HttpLimits: {name} must be > 0, got {getattr(self, name)!r}")
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ValueError(
                f"HttpLimits: max_buffered_bytes ({self.max_buffered_bytes}) must be at least "
                f"max_body_bytes ({self.max_body_bytes}), or the largest body could never be read"
            )


async def _answer(send: Any, status: int, detail: str, headers: dict[str, str]) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class FrontDoor:
    """ASGI middleware in front of ``app`` enforcing ``limits`` (see the module docstring)."""

    def __init__(self, app: Any, limits: HttpLimits, metrics: Metrics):
        self.app, self.limits, self.metrics = app, limits, metrics
        self.buffered = 0  # bytes of bodies being read or handled now
        self.in_flight = 0

    def gauges(self) -> dict:
        """``{"buffered_bytes", "requests_in_flight"}`` now."""
        return {"buffered_bytes": self.buffered, "requests_in_flight": self.in_flight}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, held = time.perf_counter(), None, [0]

        async def send_and_watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.in_flight += 1
        try:
            head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            head += sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if head > self.limits.max_header_bytes:  # (the protocol bounds partial ones)
                detail = (f"request line and headers are over {self.limits.max_header_bytes} "
                          "bytes, this server's limit")  # fmt: skip
                await self._refuse(send_and_watch, 431, detail, connection="close")
            elif scope["method"] in _NO_BODY:
                await self.app(scope, receive, send_and_watch)
            else:
                body = await self._read_body(scope, receive, send_and_watch, held)
                if body is not None:
                    await self.app(scope, _replay(body, receive), send_and_watch)
        finally:
            self.in_flight -= 1
            self.buffered -= held[0]
            self.metrics.count(f"http {status}" if status is not None else "client_disconnected")
            route = scope.get("route")  # set by the router; None: unknown path (bounded labels)
            path = route.path if route is not None else "unmatched"
            self.metrics.observe_latency(path, time.perf_counter() - started)

    def _hold(self, n: int, held: list[int]) -> bool:
        if self.buffered + n > self.limits.max_buffered_bytes:
            return False
        self.buffered += n
        held[0] += n
        return True

    async def _read_body(
        self, scope: dict, receive: Any, send: Any, held: list[int]
    ) -> bytes | None:
        """The whole body, or ``None`` once an error is answered (or the client left)."""
        limit = self.limits.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            # Answered unread: such a body may be any size (a client that wants the answer
            # before sending it asks with `Expect: 100-continue`, which is never granted).
            return await self._refuse(send, 413, f"request body is {int(length)} bytes; "
                                      f"this server accepts at most {limit}")  # fmt: skip
        fits = length is None or not length.isdigit() or self._hold(int(length), held)
        busy = None if fits else self._busy_detail()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout_s
        chunks, size, more = [], 0, True
        while more:  # the deadline is for the whole body: dripping bytes does not extend it
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                return await self._refuse(
                    send, 408, f"the request body did not arrive within "
                    f"{self.limits.body_timeout_s:g} s of its headers", connection="close",
                )  # fmt: skip
            if message["type"] != "http.request":  # the client went away
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # chunked, or more than its Content-Length said
                return await self._refuse(
                    send,
                    413,
                    f"request body is larger than this server accepts (at most {limit} bytes)",
                )
            if busy is None and size > held[0] and not self._hold(size - held[0], held):
                busy = self._busy_detail()
            if busy is None:
                chunks.append(chunk)
            more = message.get("more_body", False)
        if busy is not None:
            # Refused, but read to its end (and dropped, holding nothing): answering while
            # the client still sends would reset a connection it asked to close, answer and
            # all, before the client reads it.
            return await self._refuse(send, 503, busy, **{"Retry-After": "1"})
        return b"".join(chunks)

    def _busy_detail(self) -> str:
        return (f"the server is reading {self.buffered} bytes of other requests' bodies, its "
                "limit; retry later")  # fmt: skip

    async def _refuse(self, send: Any, status: int, detail: str, **headers: str) -> None:
        self.metrics.count(f"refused_{status}")
        await _answer(send, status, detail, headers)


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: disconnects, for streaming answers

    return replayed
