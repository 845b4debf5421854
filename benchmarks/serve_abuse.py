"""Hostile requests against ``python -m train serve``: each a quick 4xx, memory kept near idle.

Starts the server in a subprocess (a random-weight ``clip_tiny`` run, a store, the default
limits but deadlines of 0.5 s for headers and 5 s for bodies), or attacks one already running (``--url``,
``--pid`` for its memory). Then, while a client asks ``/healthz`` every 50 ms, it sends
each request that once took the server down or made it amplify (tests/serve/_abuse.py):

- a 7.4 MB body of nested lists (once 5.4 GB of memory and ~110 s of a blocked loop), a
  1 MB body of invalid pixels (once a 62 MB answer), a zero-shot template that pads to 20 MB
  (once 192 MB written into the store), ``{}{}`` and ``{}{x}`` templates (once 500s), a PNG
  claiming 20000 x 20000 pixels, a GIF, a broken TIFF (once 500s), a non-UTF-8 body;
- 8 connections sending half a request line and 2 sending one byte of their body
  (slowloris: once ``/healthz`` 503 for 20 s);
- 24 connections each starting an 8 MB body at once (memory bounded by
  ``--max-buffered-mb``, not by the number of connections).

Prints each answer's status and time (goal: a 4xx in under a second), the slowest
``/healthz`` meanwhile, and the server's peak resident memory during the attacks against
its idle one after warm-up (goal: at most 1.5x). The peak is the kernel's ``VmHWM`` after
resetting it at the start (``/proc/PID/clear_refs``), so no short spike is missed; where
that is not allowed, RSS sampled every 5 ms.

Run from the repo root::

    python benchmarks/serve_abuse.py            # ~20 s
    python benchmarks/serve_abuse.py --quick    # smaller bodies; for tests
    python benchmarks/serve_abuse.py --url http://127.0.0.1:8000 --pid 1234
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import torch  # noqa: E402

from tests.serve import _abuse  # noqa: E402

MB = 2**20


def rss(pid: int, field: str = "VmRSS") -> int:
    """``field`` of ``/proc/PID/status`` in bytes (``VmRSS`` now, ``VmHWM`` its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"no {field} in /proc/{pid}/status")


class Peak:
    """The peak RSS of ``pid`` from now on: the kernel's high-water mark, reset here, or
    (when that reset is refused) samples every 5 ms."""

    def __init__(self, pid: int):
        self.pid, self.sampled, self._stop = pid, rss(pid), threading.Event()
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            self.exact = True
        except OSError:
            self.exact = False
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.sampled = max(self.sampled, rss(self.pid))

    def value(self) -> int:
        self._stop.set()
        return rss(self.pid, "VmHWM") if self.exact else self.sampled


class HealthWatch:
    """Asks ``/healthz`` every 50 ms in a thread; the slowest answer and any failure."""

    def __init__(self, url: str):
        self.url, self.slowest, self.failures = url, 0.0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.wait(0.05):
                start = time.perf_counter()
                try:
                    status = client.get("/healthz").status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                self.slowest = max(self.slowest, time.perf_counter() - start)
                if status != 200:
                    self.failures.append(status)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def attacks(shape: tuple[int, int, int]) -> list[tuple[str, str, bytes]]:
    """``(name, path, body)`` of every single-request attack on a model of ``shape`` images."""
    c, h, w = shape
    invalid = [[[2.0] * w] * h] * c
    pixels = json.dumps({"images": [invalid] * max(1, 64 * 3072 // (c * h * w))}).encode()
    image = torch.rand(shape).tolist()

    def zeroshot(template: str) -> bytes:
        return json.dumps({"image": image, "labels": ["a", "b"], "template": template}).encode()

    def one_image(payload: str) -> bytes:
        return json.dumps({"images": [payload]}).encode()

    bomb = base64.b64encode(_abuse.png_claiming(20_000, 20_000)).decode()
    return [
        ("nested lists", "/v1/embed/image", _abuse.nested_list_bomb(7_400_000)),
        ("invalid pixels", "/v1/embed/image", pixels),
        ("template {{}}{0:>20000000}", "/v1/zeroshot", zeroshot("{{}}{0:>20000000}")),
        ("template {}{}", "/v1/zeroshot", zeroshot("{}{}")),
        ("template {}{x}", "/v1/zeroshot", zeroshot("{}{x}")),
        ("PNG of 20000x20000", "/v1/embed/image", one_image(bomb)),
        ("GIF", "/v1/embed/image", one_image(_abuse.tiny_gif())),
        ("broken TIFF", "/v1/embed/image", one_image(_abuse.broken_tiff())),
        ("non-UTF-8 body", "/v1/embed/text", b'{"texts": ["caf\xe9"]}'),
    ]


def slowloris(url: str) -> list[tuple[str, int, float]]:
    """8 connections stuck in their headers and 2 in their bodies: ``(kind, status, s)``."""
    sockets: list[socket.socket] = []
    start = time.perf_counter()
    kinds = ["headers"] * 8 + ["body"] * 2
    slow = [_abuse.slow_headers(url, sockets) for _ in range(8)]
    slow += [_abuse.slow_body(url, sockets) for _ in range(2)]
    out = []
    for kind, sock in zip(kinds, slow):
        status, _ = _abuse.parse_answer(_abuse.read_all(sock))
        out.append((kind, status, time.perf_counter() - start))
    for sock in sockets:
        sock.close()
    return out


def many_large_bodies(url: str, n: int, size: int) -> dict[int, int]:
    """``n`` connections each sending a ``size``-byte body at once: how many got each status."""
    body = b'{"texts": ["' + b"a" * (size - 16) + b'"]}'
    results: dict[int, int] = {}
    lock = threading.Lock()

    def one() -> None:
        try:
            status, _, _ = _abuse.exchange(url, _abuse.post("/v1/embed/text", body), timeout=60)
        except OSError:
            status = 0
        with lock:
            results[status] = results.get(status, 0) + 1

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return dict(sorted(results.items()))


def start_server(tmp: Path, port: int, *, body_timeout_s: float, micro: bool):
    import subprocess

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve_load import random_run

    run_dir = random_run(tmp / "clip", micro=micro)
    cmd = [sys.executable, "-m", "train", "serve", "--ckpt", str(run_dir), "--store",
           str(tmp / "store.sqlite"), "--port", str(port), "--device", "cpu",
           "--header-timeout-s", "0.5", "--body-timeout-s", str(body_timeout_s)]  # fmt: skip
    log = open(tmp / "server.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see server.log")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server was not ready within {timeout}s")


def warm_up(url: str) -> tuple[int, int, int]:
    """The served model's image shape ``(C, H, W)``, after the first answers of each kind
    have allocated what serving needs (model paths, caches): idle is measured after them."""
    json_body = {"content-type": "application/json"}
    with httpx.Client(base_url=url, timeout=60) as client:
        cfg = client.get("/healthz").json()["info"].get("clip", {})
        shape = (cfg.get("in_channels", 3), cfg.get("image_size", 32), cfg.get("image_size", 32))
        for i in range(3):
            client.post("/v1/embed/text", json={"texts": [f"a red circle {i}"] * 8})
            client.post("/v1/embed/image", json={"images": [torch.rand(shape).tolist()]})
            client.post("/v1/embed/text", content=b"{", headers=json_body)
    time.sleep(0.5)
    return shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="attack this running server instead")
    parser.add_argument("--pid", type=int, default=None, help="its process id (for memory)")
    parser.add_argument("--bodies", type=int, default=24, help="connections sending a body each")
    parser.add_argument("--body-mb", type=float, default=8.0, help="the size of each")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in this process")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller bodies; for tests")
    args = parser.parse_args()
    if args.quick:
        args.bodies, args.body_mb = 4, 1.0
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        proc = None
        url = args.url
        if url is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            proc = start_server(
                Path(tmp), port, body_timeout_s=0.5 if args.quick else 5.0, micro=args.quick
            )
            url, args.pid = f"http://127.0.0.1:{port}", proc.pid
        try:
            run(url, args)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)


def run(url: str, args) -> None:
    wait_ready(url, None)
    shape = warm_up(url)
    idle = rss(args.pid) if args.pid else None
    peak = Peak(args.pid) if args.pid else None
    watch = HealthWatch(url)
    print(f"server {url} | torch {torch.__version__} | {torch.get_num_threads()} threads here")
    print(f"\n== one request each, to a model of {list(shape)} images (goal: a 4xx in under "
          "1 s) ==")  # fmt: skip
    worst = 0.0
    for name, path, body in attacks(shape):
        status, answer, seconds = _abuse.exchange(url, _abuse.post(path, body), timeout=300)
        worst = max(worst, seconds)
        detail = str(answer.get("detail", answer))[:70]
        print(f"{name:28s} {len(body) / MB:6.2f} MB -> {status} in {seconds:.3f} s: {detail}")
    print("\n== slow senders (the server's deadlines: this script starts one with 0.5 s for "
          "headers, 5 s for bodies) ==")  # fmt: skip
    for kind, status, seconds in slowloris(url):
        print(f"stuck in its {kind:7s} -> {status} after {seconds:.3f} s")
    print(f"\n== {args.bodies} connections each sending a body of {args.body_mb:g} MB, at once ==")
    answers = many_large_bodies(url, args.bodies, int(args.body_mb * MB) - 64)
    print(f"answers by status: {answers} (0: none, the connection closed)")
    watch.stop()
    print(f"\n/healthz every 50 ms meanwhile: slowest {watch.slowest:.3f} s, "
          f"failures {watch.failures or 'none'}; slowest attack answer {worst:.3f} s")  # fmt: skip
    if peak is not None:
        top = peak.value()
        how = "VmHWM, reset after warm-up" if peak.exact else "sampled every 5 ms"
        print(f"server memory: idle {idle / MB:.0f} MiB | peak during the attacks "
              f"{top / MB:.0f} MiB ({how}) | +{(top - idle) / MB:.0f} MiB | ratio "
              f"{top / idle:.2f} (goal <= 1.5)")  # fmt: skip


if __name__ == "__main__":
    main()
