"""uvicorn, with the limits it lacks: a header deadline, a header size, a connection cap.

uvicorn times out idle keep-alive connections but not a request whose headers arrive one
byte at a time (slowloris), nor bounds their size. :func:`guarded_protocol` subclasses its
HTTP protocol (httptools' when installed, else h11's) so that, per connection:

- request line and headers must arrive within ``header_timeout_s`` of their first byte
  (a connection that sends nothing is closed after ``keep_alive_s``): past it 408, closed;
- while they arrive they may hold at most ``max_header_bytes``: past it 431, closed (the
  front door refuses complete ones over it, whichever parser read them);
- a connection past ``max_connections`` gets 503 and is closed, before it costs a request;
- uvicorn's own plain-text 400 for a malformed request becomes the API's JSON error body.

Body limits and deadlines are the ASGI front door's (:mod:`train.serve.front_door`).
:func:`make_server` builds the ``uvicorn.Server`` with them and the listen backlog;
:func:`tcp_counters` reads the kernel's counts of connections dropped because the listen
queue was full, or reset after a close (they never reach the process, so only the kernel
can count them).

Example::

    server = make_server(app, host="127.0.0.1", port=8000, limits=HttpLimits())
    server.run()
"""

from __future__ import annotations

import json
from http import HTTPStatus
from pathlib import Path
from typing import Any

from train.serve.front_door import HttpLimits

_NETSTAT = Path("/proc/net/netstat")
_SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
_LINGER_S = 1.0  # how long a refused connection is read (and discarded) before it is closed


def error_response(status: int, detail: str, **headers: str) -> bytes:
    """A whole HTTP/1.1 answer ``status`` with the API's error body; it closes the connection."""
    body = json.dumps({"detail": detail}).encode()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close",
            *(f"{k}: {v}" for k, v in headers.items())]  # fmt: skip
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def guarded_protocol(limits: HttpLimits, base: type | None = None) -> type:
    """uvicorn's HTTP protocol class (``base``: httptools' when installed, else h11's) with
    ``limits``' header deadline and size and its connection cap (see the module docstring);
    pass it as ``uvicorn.Config(http=...)``."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol as base

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        # Between two requests a connection is idle, waiting for headers (bytes arrived, no
        # request yet: they are counted and timed), or draining the rest of a body that was
        # answered before it was read (timed by the body deadline, not counted as headers).
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._timer, self._refused, self._state = None, False, "idle"
            self._header_bytes = self._feeding = 0
            if len(self.connections) > limits.max_connections:
                self._refuse(503, f"{limits.max_connections} connections are open, this "
                             "server's limit; retry later", **{"Retry-After": "1"})  # fmt: skip
                return
            # Until its first byte a connection costs no buffer: it may wait as long as an idle
            # keep-alive one (a client may connect long before it writes, on a busy machine).
            self._timer = self.loop.call_later(limits.keep_alive_s, self.transport.close)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._state == "idle" and (self.cycle is None or self.cycle.response_complete):
                # A request begins, or an early answer's body goes on arriving.
                draining = self.cycle is not None and self.cycle.more_body
                self._state = "draining" if draining else "headers"
                self._arm(limits.body_timeout_s if draining else limits.header_timeout_s)
            before, self._feeding = self.cycle, len(data)
            super().data_received(data)
            self._feeding = 0
            if self.cycle is not before:  # a request's headers are complete
                self._disarm()
            elif self._state == "headers" and not self._refused:
                # The parser holds a partial header meanwhile: bound it. (Headers complete
                # in one read are bounded by the front door, which sees them all.)
                self._header_bytes += len(data)
                if self._header_bytes > limits.max_header_bytes:
                    self._refuse(431, self._too_large())

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:  # the parser refused the request
            if self._header_bytes + self._feeding > limits.max_header_bytes:  # h11's own limit
                self._refuse(431, self._too_large())
            else:
                self._refuse(400, f"not a valid HTTP/1.1 request: {msg}")

        def _too_large(self) -> str:
            return (f"request line and headers are over {limits.max_header_bytes} bytes, "
                    "this server's limit")  # fmt: skip

        def _arm(self, seconds: float) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._state, self._header_bytes = None, "idle", 0

        def _too_slow(self) -> None:
            self._timer = None
            if self._state == "headers":
                self._refuse(408, f"request headers did not arrive within "
                             f"{limits.header_timeout_s:g} s")  # fmt: skip
            else:  # the rest of an answered body, still trickling: nothing more to say
                self.transport.close()

        def _refuse(self, status: int, detail: str, **headers: str) -> None:
            # Answer, stop writing, and keep reading (discarding) a moment before closing:
            # closing on a client's unread request bytes resets the connection, and a reset
            # can destroy the answer before the client reads it.
            self._disarm()
            self._refused = True
            if self.transport.is_closing():
                return
            self.transport.write(error_response(status, detail, **headers))
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(_LINGER_S, self.transport.close)

    return GuardedProtocol


def make_server(
    app: Any,
    *,
    host: str,
    port: int,
    limits: HttpLimits,
    protocol: type | None = None,
    **config: Any,
) -> Any:
    """A ``uvicorn.Server`` for ``app`` with ``limits`` (header deadline and size, connection
    cap, keep-alive, listen backlog); ``protocol``: uvicorn's HTTP protocol class to guard
    (default: httptools' when installed, else h11's); ``config`` goes to ``uvicorn.Config``."""
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, http=guarded_protocol(limits, protocol),
        timeout_keep_alive=limits.keep_alive_s, backlog=limits.backlog,
        h11_max_incomplete_event_size=limits.max_header_bytes, **config,
    )  # fmt: skip
    return uvicorn.Server(config)


def somaxconn() -> int | None:
    """The kernel's cap on any listen backlog (``net.core.somaxconn``), if readable."""
    try:
        return int(_SOMAXCONN.read_text())
    except (OSError, ValueError):
        return None


_COUNTERS = {  # /proc/net/netstat's TcpExt names -> what they count
    "ListenOverflows": "listen_overflows",  # connections dropped: the accept queue was full
    "ListenDrops": "listen_drops",  # ... for any reason, overflows included
    "TCPAbortOnData": "resets_on_data_after_close",  # e.g. a request on a closing keep-alive
    "TCPAbortOnClose": "resets_on_close_with_unread_data",
}


def tcp_counter_names() -> list[str]:
    """The names :func:`tcp_counters` reports."""
    return list(_COUNTERS.values())


def tcp_counters() -> dict[str, int] | None:
    """The kernel's counts of connections it dropped or reset without the process seeing
    them (listen-queue overflows, resets of data sent to a closed connection), for the whole
    network namespace since boot; ``None`` where ``/proc/net/netstat`` is unreadable."""
    try:
        lines = _NETSTAT.read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:]))
            return {ours: int(row.get(theirs, 0)) for theirs, ours in _COUNTERS.items()}
    return None
