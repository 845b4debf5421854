"""uvicorn, with the limits it lacks: a header deadline, a header size, a connection cap.

uvicorn times out idle keep-alive connections but not a request whose headers arrive one
byte at a time (slowloris), nor bounds their size. :func:`guarded_protocol` subclasses its
HTTP protocol (httptools' when installed, else h11's) so that, per connection:

- request line and headers must arrive within ``header_timeout_s`` of their first byte
  (a connection that sends nothing is closed after ``keep_alive_s``): past it 408, closed;
- they may hold at most ``max_header_bytes``: past it 431, closed;
- a connection past ``max_connections`` gets 503 and is closed, before it costs a request;
- uvicorn's own plain-text 400 for a malformed request becomes the API's JSON error body.

Body limits and deadlines are the ASGI front door's (:mod:`fmm.serve.front_door`).
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

from fmm.serve.front_door import HttpLimits

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


def guarded_protocol(limits: HttpLimits) -> type:
    """uvicorn's HTTP protocol class with ``limits``' header deadline and size and its
    connection cap (see the module docstring); pass it as ``uvicorn.Config(http=...)``."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class GuardedProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._timer, self._refused = None, False
            # (h11 bounds its own headers: h11_max_incomplete_event_size)
            self._in_headers, self._header_bytes, self._raw_header_bytes = False, 0, 0
            if len(self.connections) > limits.max_connections:
                self._refuse(503, f"{limits.max_connections} connections are open, this "
                             "server's limit; retry later", **{"Retry-After": "1"})  # fmt: skip
                return
            # Until its first byte a connection costs no buffer: it may wait as long as an idle
            # keep-alive one (a client may connect long before it writes, on a busy machine).
            self._timer = self.loop.call_later(limits.keep_alive_s, self.transport.close)
            self._counting = False  # whether the timer is a request's deadline
            self._draining = False  # whether it is the deadline of an early answer's body

        def on_message_begin(self) -> None:  # httptools' parser: a request line begins
            self._in_headers, self._header_bytes, self._raw_header_bytes = True, 0, 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:  # httptools: counted as parsed, so a header
            self._count_header(len(url))  # too large is caught however it is chunked
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_header(len(name) + len(value) + 4)
            super().on_header(name, value)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            idle = self.cycle is None or self.cycle.response_complete
            if idle and not self._counting:  # a request begins, or an early answer's body
                self._arm()  # trickles in: either way it has the header deadline to finish
            before = self.cycle
            super().data_received(data)
            if self.cycle is not before:  # a request's headers are complete
                self._disarm()
                self._in_headers = False
            elif idle and self.cycle is not None and not self._in_headers and not self._draining:
                # The rest of a body answered early (413, 503): read and dropped for up to the
                # body deadline, so that the client can finish sending and read the answer
                # (closing on its unsent bytes would reset the connection, answer and all).
                self._arm(limits.body_timeout_s)
                self._draining = True
            elif self._in_headers:  # the parser holds a partial header meanwhile: bound it too
                self._raw_header_bytes += len(data)
                if self._raw_header_bytes > limits.max_header_bytes:
                    self._refuse(431, self._too_large())

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:  # the parser refused the request
            if self._header_bytes > limits.max_header_bytes:
                self._refuse(431, self._too_large())
            else:
                self._refuse(400, f"not a valid HTTP/1.1 request: {msg}")

        def _too_large(self) -> str:
            return (f"request line and headers are over {limits.max_header_bytes} bytes, "
                    "this server's limit")  # fmt: skip

        def _count_header(self, n: int) -> None:
            self._header_bytes += n
            if self._header_bytes > limits.max_header_bytes:
                raise ValueError("headers too large")  # httptools stops; uvicorn calls 400

        def _arm(self, seconds: float = limits.header_timeout_s) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, self._headers_too_slow)
            self._counting = True

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._counting, self._draining = None, False, False

        def _headers_too_slow(self) -> None:
            self._timer, self._counting, self._draining = None, False, False
            if not self._in_headers and self.cycle is not None:  # a trickle after an answer
                self.transport.close()
                return
            self._refuse(408, f"request headers did not arrive within "
                         f"{limits.header_timeout_s:g} s")  # fmt: skip

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


def make_server(app: Any, *, host: str, port: int, limits: HttpLimits, **config: Any) -> Any:
    """A ``uvicorn.Server`` for ``app`` with ``limits`` (header deadline and size, connection
    cap, keep-alive, listen backlog); ``config`` goes to ``uvicorn.Config``."""
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, http=guarded_protocol(limits),
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
