"""Load test of ``python -m train serve`` over loopback, against baselines of the same run.

Starts the server in a subprocess (a CLIP run: ``--ckpt``, or a random-weight ``clip_tiny``
shapes-world run written to a temporary folder), then, from this process:

1. **one by one**: ``--sequential`` text-embedding requests, each sent after the previous
   answer (the baseline: no batching possible);
2. **concurrent**: ``--bursts`` bursts of ``--requests`` requests of one new caption each,
   all of a burst in flight at once (one httpx connection each). Every answer is checked
   against ``encode_text`` computed here: *lost* = no 200 answer (counted by cause: a reset,
   a timeout, a status), *wrong* = an embedding off by more than 1e-4 (goal: 0 of 10 x 1000).
   Prints p50/p99 latency, throughput, ``speedup`` = concurrent / one-by-one throughput
   (goal >= 5), the batch sizes and the kernel's listen-queue drops and resets the server reports at
   ``/metrics``; then one burst through ``train.serve.Service`` in this process, without HTTP
   (what the HTTP layer costs);
3. **store hit vs recompute**, in process: the served model's ``encode_text`` on one
   caption against ``EmbeddingStore.get`` of its stored vector (in-memory LRU, then a cold
   SQLite read from a fresh store), and the same for ``--hit-items`` captions at once; over
   HTTP, a repeated request (all hits) against a request of new captions (goal >= 100x);
4. **int8 vs fp32** (``fmm.quant``): params size and text+image encoding latency of a batch
   (goals: size <= 0.3, latency <= 1.0).

Every figure is a ratio against a baseline measured in the same run. The client shares the
machine's cores with the server, so absolute figures are pessimistic; on a loaded machine
they move by 2-3x.

Run from the repo root::

    python benchmarks/serve_load.py                    # 10 x 1000 concurrent, ~3 min on 2 cores
    python benchmarks/serve_load.py --ckpt runs/clip   # a trained run
    python benchmarks/serve_load.py --quick            # seconds; for tests, figures mean nothing
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fmm  # noqa: E402
from models import clip  # noqa: E402
from train import checkpoint  # noqa: E402
from train.data import WordTokenizer, WorldConfig  # noqa: E402
from train.loop import load_run  # noqa: E402
from train.recipes.clip import normalize_images  # noqa: E402
from train.serve import percentile  # noqa: E402


def captions(world: WorldConfig, n: int, offset: int = 0) -> list[str]:
    """``n`` distinct shapes-world captions (``"a small red circle left of a blue bar"``)."""
    sizes, relations = ("small", "large", ""), ("above", "below", "left of", "right of")
    objects = [f"{c} {s}" for c in world.colors for s in world.shapes]
    combos = itertools.product(sizes, objects, relations, objects)
    picked = itertools.islice(combos, offset, offset + n)
    out = [" ".join(f"a {size} {a} {rel} a {b}".split()) for size, a, rel, b in picked]
    if len(out) < n:
        raise SystemExit(f"only {len(out)} distinct captions from offset {offset}; ask for fewer")
    return out


def random_run(run_dir: Path, *, micro: bool = False) -> Path:
    """A random-weight ``clip_tiny`` run (``micro``: 8 px, width 16, for ``--quick``) laid
    out as ``python -m train clip`` writes it."""
    world = WorldConfig()
    tokenizer = WordTokenizer.for_world(world)
    cfg = clip.clip_tiny(vocab_size=tokenizer.vocab_size)
    if micro:
        cfg = dataclasses.replace(
            cfg, image_size=8, patch_size=4, image_width=16, image_layers=1, image_heads=2,
            text_width=16, text_layers=1, text_heads=2, embed_dim=8,
        )  # fmt: skip
    params = clip.init(cfg, fmm.random.key(0))
    config = {"model": "clip", "clip": cfg.to_dict(), "world": dataclasses.asdict(world)}
    checkpoint.save(run_dir, params, config=config)
    (run_dir / "tokenizer.json").write_text(tokenizer.to_json())
    return run_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, run_dir: Path, store: Path, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "train", "serve", "--ckpt", str(run_dir), "--store", str(store),
        "--port", str(port), "--max-batch", str(args.max_batch),
        "--max-wait-ms", str(args.max_wait_ms), "--max-queue", str(4 * args.requests + 64),
        "--timeout-s", "120", "--device", "cpu",
    ]  # fmt: skip
    log = open(store.parent / "server.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


async def wait_ready(client, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see server.log")
        try:
            if (await client.get("/healthz")).status_code == 200:
                return
        except Exception:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit(f"the server was not ready within {timeout}s")


async def timed_post(client, texts: list[str]) -> tuple[float, object]:
    start = time.perf_counter()
    try:
        r = await client.post("/v1/embed/text", json={"texts": texts})
    except Exception as e:  # counted as lost
        return time.perf_counter() - start, e
    return time.perf_counter() - start, r


def failure(r) -> str | None:
    """What went wrong with one answer (``None``: a 200): the exception's type, or the status."""
    if isinstance(r, Exception):
        return f"{type(r).__name__}: {str(r)[:80]}"
    return None if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:80]}"


def check(responses, want: torch.Tensor) -> tuple[int, int]:
    """``(lost, wrong)`` of one-caption responses against ``want [n, dim]``."""
    lost = wrong = 0
    for (_, r), row in zip(responses, want):
        if isinstance(r, Exception) or r.status_code != 200:
            lost += 1
        elif not torch.allclose(torch.tensor(r.json()["embeddings"][0]), row, atol=1e-4):
            wrong += 1
    return lost, wrong


def median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def load_test(args, run_dir: Path, world: WorldConfig, direct) -> dict:
    import httpx

    port = free_port()
    store = Path(args.tmp) / "store.sqlite"
    proc = start_server(args, run_dir, store, port)
    limits = httpx.Limits(max_connections=args.requests + 8, max_keepalive_connections=64)
    out: dict = {}
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=300, limits=limits
        ) as client:
            await wait_ready(client, proc, timeout=120)
            await timed_post(client, captions(world, 1, offset=27_000))  # warm the model path
            seq_texts = captions(world, args.sequential, offset=0)
            start = time.perf_counter()
            seq = [await timed_post(client, [t]) for t in seq_texts]
            out["seq_s"] = time.perf_counter() - start
            out["seq_lost"], out["seq_wrong"] = check(seq, direct(seq_texts))

            before = (await client.get("/metrics")).json()["batches"]["text"]["histogram"]
            out.update(lost=0, wrong=0, conc_s=0.0, latencies=[], failures=collections.Counter())
            for burst in range(args.bursts):  # new captions each time: every one is computed
                texts = captions(
                    world, args.requests, offset=args.sequential + burst * args.requests
                )
                want = direct(texts)
                start = time.perf_counter()
                conc = await asyncio.gather(*(timed_post(client, [t]) for t in texts))
                out["conc_s"] += time.perf_counter() - start
                lost, wrong = check(conc, want)
                out["lost"], out["wrong"] = out["lost"] + lost, out["wrong"] + wrong
                out["latencies"] += [t for t, r in conc if not isinstance(r, Exception)]
                out["failures"].update(failure(r) for _, r in conc if failure(r))
            metrics = (await client.get("/metrics")).json()
            after = metrics["batches"]["text"]["histogram"]
            out["tcp"], out["counters"] = metrics["tcp"], metrics["counters"]
            # The bursts' own batches: the histogram now minus before them.
            out["burst_batches"] = {
                int(size): n - before.get(size, 0)
                for size, n in after.items()
                if n > before.get(size, 0)
            }

            # HTTP: a request of n repeated captions (all hits) vs n new ones.
            n = min(args.hit_items, args.requests)
            fresh = captions(world, n, offset=args.sequential + args.bursts * args.requests)
            t_miss, r_miss = await timed_post(client, fresh)
            hit_times = [await timed_post(client, fresh) for _ in range(args.repeats)]
            out["http_miss_s"], out["http_hit_s"] = (
                t_miss,
                statistics.median(t for t, _ in hit_times),
            )
            out["http_hit_cached"] = all(hit_times[-1][1].json()["cached"])
            out["http_miss_cached"] = any(r_miss.json()["cached"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def engine_figure(args, run_dir: Path, world: WorldConfig) -> tuple[float, dict]:
    """The same burst through ``train.serve.Service`` in this process, without HTTP: where
    the HTTP layer's cost shows (requests/s, server batches)."""
    from train.recipes import serve
    from train.serve import Service

    model = serve.load_model(run_dir)
    texts = captions(world, args.requests, offset=10_000)

    async def burst() -> tuple[float, dict]:
        service = Service(model, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                          max_queue=4 * args.requests)  # fmt: skip
        await service.embed_text(["warm up"])
        service.metrics.batch_sizes.clear()  # count the burst's batches only
        start = time.perf_counter()
        await asyncio.gather(*(service.embed_text([t]) for t in texts))
        seconds = time.perf_counter() - start
        batches = service.snapshot()["batches"]["text"]
        await service.aclose()
        return args.requests / seconds, batches

    return asyncio.run(burst())


def store_figures(args, run_dir: Path, world: WorldConfig, encode) -> dict:
    """In-process: recompute vs LRU hit vs cold SQLite read, one caption and a batch."""
    from train.store import EmbeddingStore, content_key, model_fingerprint

    texts = captions(world, args.hit_items, offset=20_000)
    keys = [content_key("text", t) for t in texts]
    fp = model_fingerprint({"bench": True}, {"x": torch.zeros(1)})
    path = Path(args.tmp) / "hits.sqlite"
    with EmbeddingStore(path, fp) as store:
        store.put_many(dict(zip(keys, encode(texts))))
        # One caption is quick to time: more repeats steady its median on a busy machine.
        one = {
            "recompute": median_s(lambda: encode(texts[:1]), 4 * args.repeats),
            "lru hit": median_s(lambda: store.get(keys[0]), 4 * args.repeats),
        }
        many = {
            "recompute": median_s(lambda: encode(texts), args.repeats),
            "lru hit": median_s(lambda: store.get_many(keys), args.repeats),
        }

    def cold(n: int) -> float:
        times = []
        for _ in range(args.repeats):
            with EmbeddingStore(path, fp, lru_size=0) as fresh:
                start = time.perf_counter()
                fresh.get_many(keys[:n])
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    one["sqlite read (cold)"], many["sqlite read (cold)"] = cold(1), cold(len(keys))
    return {"one": one, "many": many, "n": len(keys)}


def quant_figures(args, params, cfg, tokenizer, world) -> dict | None:
    try:
        from fmm import quant
    except ImportError:
        return None
    q = quant.quantize(params)
    tokens = tokenizer.encode(captions(world, args.quant_batch, offset=1000), cfg.context_length)
    images = normalize_images(torch.rand(args.quant_batch, 3, cfg.image_size, cfg.image_size))

    def run(p):
        with torch.inference_mode():
            clip.encode_text(p, tokens, cfg=cfg)
            clip.encode_image(p, images, cfg=cfg)

    # Alternate the two, so load on the machine hits both alike.
    fp32, int8 = [], []
    for _ in range(args.repeats):
        fp32.append(median_s(lambda: run(params), 1))
        int8.append(median_s(lambda: run(q), 1))
    with torch.inference_mode():
        a = clip.encode_text(params, tokens, cfg=cfg)
        b = clip.encode_text(q, tokens, cfg=cfg)
    return {
        "fp32_bytes": quant.size_bytes(params),
        "int8_bytes": quant.size_bytes(q),
        "fp32_s": statistics.median(fp32),
        "int8_s": statistics.median(int8),
        "min_cosine": torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, default=None, help="a `python -m train clip` run")
    parser.add_argument("--requests", type=int, default=1000, help="concurrent, per burst")
    parser.add_argument("--bursts", type=int, default=10)
    parser.add_argument("--sequential", type=int, default=100)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--hit-items", type=int, default=256)
    parser.add_argument("--quant-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in this process")
    parser.add_argument("--quick", action="store_true", help="tiny counts, for tests")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.bursts, args.sequential, args.hit_items, args.quant_batch = (
            40, 2, 8, 16, 8,
        )  # fmt: skip
        args.repeats = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__} | {torch.get_num_threads()} threads here, server in its own "
        f"process | {os.cpu_count()} cores"
    )

    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        run_dir = args.ckpt or random_run(Path(tmp) / "clip", micro=args.quick)
        run = load_run(run_dir, family="clip")
        cfg, params, tokenizer = run.cfg, run.params, run.tokenizer
        world = WorldConfig()

        def encode(texts: list[str]) -> torch.Tensor:
            with torch.inference_mode():
                tokens = tokenizer.encode(texts, cfg.context_length)
                return clip.encode_text(params, tokens, cfg=cfg)

        source = args.ckpt or f"random-weight clip_tiny{' (micro)' if args.quick else ''}"
        print(f"model: {source} ({fmm.tree.count(params):,} params)")
        load = asyncio.run(load_test(args, run_dir, world, encode))
        lat = load["latencies"]
        seq_tput = args.sequential / load["seq_s"]
        conc_tput = args.bursts * args.requests / load["conc_s"]
        burst = load["burst_batches"]
        calls = sum(burst.values())
        mean_size = sum(size * n for size, n in burst.items()) / calls
        print(f"\n== {args.bursts} bursts of {args.requests} concurrent one-caption requests "
              "over loopback ==")  # fmt: skip
        print(f"lost {load['lost']} | wrong {load['wrong']} (of {args.bursts} x {args.requests}); "
              f"one-by-one: lost {load['seq_lost']} wrong {load['seq_wrong']} "
              f"(of {args.sequential})")  # fmt: skip
        for what, n in load["failures"].most_common(5):
            print(f"  lost as {what!r}: {n}")
        tcp = load["tcp"]
        print(f"kernel, during the run ({tcp['counted_for']}): listen queue {tcp['backlog']}, "
              f"overflows {tcp['listen_overflows']}, drops {tcp['listen_drops']}, resets of "
              f"data after close {tcp['resets_on_data_after_close']}; server refusals: "
              f"{ {k: v for k, v in load['counters'].items() if k.startswith('refused')} }")  # fmt: skip
        print(f"latency p50 {percentile(lat, 50) * 1e3:.1f} ms | "
              f"p99 {percentile(lat, 99) * 1e3:.1f} ms")  # fmt: skip
        print(f"throughput: one-by-one {seq_tput:.1f} req/s | concurrent {conc_tput:.1f} req/s | "
              f"speedup {conc_tput / seq_tput:.1f}x (goal >= 5)")  # fmt: skip
        print(f"server batches during the bursts: {calls} calls, mean size {mean_size:.1f}, "
              f"max {max(burst)} (--max-batch {args.max_batch})")  # fmt: skip

        rate, inproc = engine_figure(args, run_dir, world)
        print(f"same burst in process through train.serve.Service (no HTTP): {rate:.1f} req/s | "
              f"{inproc['calls']} batches, mean size {inproc['mean_size']} | HTTP keeps "
              f"{conc_tput / rate:.2f} of it")  # fmt: skip

        s = store_figures(args, run_dir, world, encode)
        print("\n== store hit vs recompute (in process; goal >= 100x) ==")
        for label, rows in (("one caption", s["one"]), (f"{s['n']} captions", s["many"])):
            base = rows["recompute"]
            cells = " | ".join(
                f"{name} {t * 1e3:.3f} ms ({base / t:.0f}x)" for name, t in rows.items()
                if name != "recompute"
            )  # fmt: skip
            print(f"{label}: recompute {base * 1e3:.3f} ms | {cells}")
        print(f"over HTTP, {min(args.hit_items, args.requests)} captions in one request: new "
              f"{load['http_miss_s'] * 1e3:.1f} ms | repeated (all hits: "
              f"{load['http_hit_cached']}) {load['http_hit_s'] * 1e3:.1f} ms | "
              f"{load['http_miss_s'] / load['http_hit_s']:.1f}x")  # fmt: skip

        qf = quant_figures(args, params, cfg, tokenizer, world)
        print("\n== int8 vs fp32 (fmm.quant; goals: size <= 0.3, latency <= 1.0) ==")
        if qf is None:
            print("fmm.quant is not installed here: skipped")
        else:
            print(f"params size: fp32 {qf['fp32_bytes'] / 2**20:.2f} MiB | int8 "
                  f"{qf['int8_bytes'] / 2**20:.2f} MiB | ratio "
                  f"{qf['int8_bytes'] / qf['fp32_bytes']:.3f}")  # fmt: skip
            print(f"encode {args.quant_batch} captions + {args.quant_batch} images: fp32 "
                  f"{qf['fp32_s'] * 1e3:.1f} ms | int8 {qf['int8_s'] * 1e3:.1f} ms | ratio "
                  f"{qf['int8_s'] / qf['fp32_s']:.2f} | min cosine int8 vs fp32 "
                  f"{qf['min_cosine']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
