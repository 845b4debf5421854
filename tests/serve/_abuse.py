"""Hostile requests, shared by tests/serve/test_abuse.py and benchmarks/serve_abuse.py: each
one once took the server down or made it amplify (memory, output, time), and each must now
be a quick 4xx.

Every request is raw bytes on its own socket (a slow sender must control its pacing, and a
broken body must reach the server as it is).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import time
import zlib
from urllib.parse import urlsplit

from PIL import Image


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width x height`` grey pixels, then a few bytes of data:
    a decompression bomb as a decoder sees it, without building its pixels here."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 1024)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
            + chunk(b"IEND", b""))  # fmt: skip


def encoded(image: Image.Image, kind: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return base64.b64encode(buffer.getvalue()).decode()


def tiny_gif() -> str:
    """A 1x1 GIF (~40 bytes): not a format the server accepts."""
    return encoded(Image.new("P", (1, 1)), "GIF")


def broken_tiff() -> str:
    """A TIFF header promising an image directory that is not there."""
    return base64.b64encode(b"II*\x00\x08\x00\x00\x00\xff\xff" + b"\x00" * 20).decode()


def nested_list_bomb(size: int) -> bytes:
    """``{"images": [[[[0.5]]], ...]}`` of about ``size`` bytes: ~1 KB per item once parsed."""
    item = b"[[[0.5]]]"
    return b'{"images": [' + b",".join([item] * (size // (len(item) + 1))) + b"]}"


def post(path: str, body: bytes, content_type: str = "application/json") -> bytes:
    """A whole HTTP/1.1 POST of ``body`` to ``path``."""
    head = (f"POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")  # fmt: skip
    return head.encode() + body


def exchange(url: str, data: bytes, *, timeout: float = 10.0) -> tuple[int, dict, float]:
    """Send ``data`` on a new connection; ``(status, JSON body, seconds to the answer)``
    (status 0: the server closed without answering)."""
    start = time.perf_counter()
    with connect(url, timeout) as sock:
        sock.sendall(data)
        raw = read_all(sock)
    return *parse_answer(raw), time.perf_counter() - start


def connect(url: str, timeout: float) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=timeout)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, TimeoutError):
        pass
    return b"".join(chunks)


def parse_answer(raw: bytes) -> tuple[int, dict]:
    """``(status, JSON body)`` of one HTTP answer (``(0, {})`` if there is none)."""
    if not raw.startswith(b"HTTP/1.1 "):
        return 0, {}
    head, _, body = raw.partition(b"\r\n\r\n")
    try:
        return int(head[9:12]), json.loads(body or b"{}")
    except ValueError:
        return int(head[9:12]), {"raw": body[:200].decode(errors="replace")}


def slow_headers(url: str, sockets: list[socket.socket]) -> socket.socket:
    """A connection that has sent half a request line and stops there (slowloris)."""
    sock = connect(url, 10.0)
    sock.sendall(b"POST /v1/embed/text HTTP/1.1\r\nhost: local")
    sockets.append(sock)
    return sock


def slow_body(url: str, sockets: list[socket.socket], length: int = 1000) -> socket.socket:
    """A connection whose headers promise ``length`` bytes of body, of which it sends one."""
    sock = connect(url, 10.0)
    sock.sendall(post("/v1/embed/text", b"{" * length)[: -(length - 1)])
    sockets.append(sock)
    return sock
