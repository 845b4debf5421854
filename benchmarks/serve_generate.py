"""Generation at serving load: fmm's scheduler against one thread per request and against
``transformers``' continuous batching, on the same random GPT-2-small weights.

``--concurrency`` clients (1, 8, 32, 64) each ask for ``--new-tokens`` (128) greedy tokens
after a random prompt of ``--prompt-len`` ids, all at once. Rows:

- ``per-request``: the server's path without ``--no-batching``'s scheduler, kept as the
  baseline: each request decodes alone (batch 1, eager) in its own generation thread;
- ``scheduler``: ``python -m train serve``'s default: one
  :class:`~train.serve.scheduler.Scheduler` of ``--max-slots`` slots, its decode step
  compiled with ``--compile-step`` over the smallest bucket of rows that holds the live
  ones, waiting prompts prefilled together (the buckets and prefill shapes its start-up
  probe found exact on this machine are printed before the table);
- ``transformers CB``: ``model.generate_batch`` (its ``ContinuousBatchingManager``, paged
  cache), in process only, timed by its own per-token timestamps (its warmup excluded).

Both fmm rows run in process (``train.serve.Service``, as the HTTP routes call it) and over
HTTP (``POST /v1/completions`` with ``"stream": true`` to a uvicorn server in this
process: the client shares the process and its 2 cores, so the HTTP figures are
pessimistic). Every method but ``fmm.decoding.generate`` decodes on a thread of its own,
and before each timed run the main thread hands back its idle OpenMP workers
(:mod:`train.serve.openmp`: while they live, libgomp throttles every other thread's), so
each method has the cores to itself. Per row: total tokens/s, time to first token (p50)
and the gap between a request's tokens (inter-token p50/p99, all requests' gaps
together). Then the goals, each a ratio against a baseline measured in this run:
scheduler >= 5x per-request and >= 1.5x transformers in tokens/s at 32 clients;
inter-token p99 <= 2x the single-stream step (``fmm.decoding.generate`` compiled, batch 1:
``(t(n) - t(1)) / (n - 1)``); one client no slower than ``fmm.decoding.generate`` alone.
``generate`` is timed twice, with plain linear layers (MKL) and under the scheduler's
:class:`~fmm.invariance.PackedLinears` (oneDNN), and the goals take the faster: which one
wins depends on the CPU (MKL at one row on an Intel CPU, oneDNN on an AMD EPYC).

Run from the repo root (the default takes ~20 minutes on 2 cores; the per-request rows are
the slow ones: ``--baseline-up-to`` / ``--baseline-http-up-to`` cap their concurrency)::

    python benchmarks/serve_generate.py
    python benchmarks/serve_generate.py --concurrency 1 32 --no-http
    python benchmarks/serve_generate.py --quick          # seconds; for tests, figures mean nothing
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fmm import decoding  # noqa: E402
from fmm.invariance import PackedLinears, packed_available  # noqa: E402
from models import gpt  # noqa: E402
from tests.reference import reference  # noqa: E402  (test-only reference packages)
from tests.serve._runs import running  # noqa: E402
from train.recipes import serve  # noqa: E402
from train.serve import Service, percentile  # noqa: E402
from train.serve.app import create_app  # noqa: E402
from train.serve.openmp import release_workers  # noqa: E402


@dataclass
class Timed:
    """One request: when it was sent and when each of its tokens arrived (s)."""

    sent: float
    times: list[float] = field(default_factory=list)


@dataclass
class Row:
    method: str
    clients: int
    tokens_per_s: float
    ttft_ms: float
    gap_p50_ms: float
    gap_p99_ms: float


def summarise(method: str, requests: list[Timed], new: int) -> Row:
    short = [len(r.times) for r in requests if len(r.times) != new]
    if short:
        raise SystemExit(f"{method}: {len(short)} requests got {short[:3]} tokens, not {new}")
    start, end = min(r.sent for r in requests), max(r.times[-1] for r in requests)
    gaps = [1e3 * (b - a) for r in requests for a, b in zip(r.times, r.times[1:])] or [0.0]
    ttft = statistics.median(1e3 * (r.times[0] - r.sent) for r in requests)
    return Row(method, len(requests), len(requests) * new / (end - start), ttft,
               percentile(gaps, 50), percentile(gaps, 99))  # fmt: skip


# ----------------------------------------------------------------------------- the model


def build(args, folder: Path):
    """``(transformers model, fmm cfg, fmm params, GPT-2 directory)``: random GPT-2 weights
    saved as ``save_pretrained`` writes them, with a word-level ``tokenizer.json`` of one
    word per id (every token adds text, so every token is a streamed chunk)."""
    import tokenizers

    transformers = reference("transformers")
    torch.manual_seed(0)
    hc = transformers.GPT2Config(
        n_layer=args.layers, n_embd=args.width, n_head=args.heads, vocab_size=args.vocab,
        n_positions=args.context, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(hc).eval()
    model.save_pretrained(folder)
    words = tokenizers.models.WordLevel({f"w{i}": i for i in range(args.vocab)}, unk_token="w0")
    tok = tokenizers.Tokenizer(words)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    cfg = gpt.config_from_hf(hc)
    return model, cfg, gpt.from_hf(model.state_dict(), cfg), folder


def prompts(args, n: int, offset: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(offset)
    return torch.randint(0, args.vocab, (n, args.prompt_len), generator=g).tolist()


# ----------------------------------------------------------------------------- the clients


async def in_process(service: Service, batch: list[list[int]], new: int) -> list[Timed]:
    async def one(ids: list[int]) -> Timed:
        timed = Timed(time.perf_counter())
        events = service.generate(ids, temperature=0.0, max_new_tokens=new)
        async for event in events:
            if "done" not in event:
                timed.times.append(time.perf_counter())
        return timed

    return list(await asyncio.gather(*(one(ids) for ids in batch)))


async def over_http(url: str, batch: list[list[int]], new: int) -> list[Timed]:
    import httpx

    limits = httpx.Limits(max_connections=len(batch) + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=None) as client:

        async def one(ids: list[int]) -> Timed:
            body = {"model": "gpt2", "prompt": ids, "max_tokens": new, "temperature": 0,
                    "stream": True}  # fmt: skip
            timed = Timed(time.perf_counter())
            async with client.stream("POST", "/v1/completions", json=body) as answer:
                if answer.status_code != 200:
                    raise SystemExit(f"HTTP {answer.status_code}: {await answer.aread()}")
                async for line in answer.aiter_lines():
                    if line.startswith("data: {"):
                        choice = json.loads(line[6:])["choices"][0]
                        if choice["finish_reason"] is None:
                            timed.times.append(time.perf_counter())
            return timed

        return list(await asyncio.gather(*(one(ids) for ids in batch)))


def transformers_cb(model, batch: list[list[int]], new: int) -> list[Timed]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None,
                              pad_token_id=0)  # fmt: skip
    # Sized for the workload (one 256-token page a request): left to itself on a CPU it
    # probes the machine's memory for a minute first.
    pool = ContinuousBatchingConfig(num_blocks=len(batch) + 2,
                                    max_batch_tokens=max(256, len(batch) * len(batch[0])))  # fmt: skip
    out = model.generate_batch(batch, generation_config=config, continuous_batching_config=pool,
                               record_timestamps=True)  # fmt: skip
    return [Timed(r.created_time, list(r.timestamps)) for r in out.values()]


def single_stream(params, cfg, args, *, packed: bool) -> tuple[float, float]:
    """``(tokens/s, ms a step)`` of ``fmm.decoding.generate`` compiled, batch 1, alone, in a
    cache of ``--slot-len`` positions (a slot's); ``packed``: under
    :class:`fmm.invariance.PackedLinears` (dynamo traces the mode into the step), the
    scheduler's linear layers, faster than MKL's at one row on some CPUs."""
    prompt = torch.tensor(prompts(args, 1, 999))
    backend = False if args.compile_step == "none" else args.compile_step
    mode = PackedLinears if packed else contextlib.nullcontext

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode(), mode():  # as the server runs it
            decoding.generate(params, prompt, cfg=cfg, max_new_tokens=n, max_len=args.slot_len,
                              compile=backend)  # fmt: skip
        return time.perf_counter() - start

    run(2)  # compiles
    whole = min(run(args.new_tokens) for _ in range(3))
    first = min(run(1) for _ in range(3))
    return args.new_tokens / whole, 1e3 * (whole - first) / (args.new_tokens - 1)


# ----------------------------------------------------------------------------- the run


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--layers", type=int, default=12, help="GPT-2 small: 12 x 768, 12 heads")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--max-slots", type=int, default=32, help="the scheduler's pool")
    p.add_argument(
        "--linears",
        nargs="+",
        choices=("packed", "columns", "rows"),
        default=["packed"],
        help="the scheduler's linear layers (serve --linears); each its own rows",
    )
    p.add_argument(
        "--step-attention",
        nargs="+",
        choices=("math", "sdpa"),
        default=["math"],
        help="the scheduler's decode attention (serve --step-attention); each after the "
        "first its own rows, with the first --linears",
    )
    p.add_argument("--slot-len", type=int, default=256, help="positions per slot")
    p.add_argument("--prefill-chunk", type=int, default=64,
                   help="the scheduler's most prompt tokens per iteration (serve's)")  # fmt: skip
    p.add_argument("--compile-step", default="inductor", help="inductor | aot_eager | none")
    p.add_argument(
        "--baseline-up-to",
        type=int,
        default=32,
        help="run the per-request rows only up to this many clients",
    )
    p.add_argument("--baseline-http-up-to", type=int, default=8,
                   help="and their HTTP rows up to this many")  # fmt: skip
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-http", action="store_true")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--quick", action="store_true", help="a 2-layer toy, 1 and 4 clients")
    args = p.parse_args()
    if args.quick:
        args.concurrency, args.new_tokens, args.prompt_len = [1, 4], 6, 4
        args.layers, args.width, args.heads, args.vocab, args.context = 2, 32, 2, 256, 64
        args.max_slots, args.slot_len, args.compile_step = 4, 16, "none"
    return args


def served(model_dir: Path, args, *, linears: str | None, attention: str = "math"):
    """The GPT-2 directory as ``serve`` loads it: through a warmed-up scheduler whose
    linear layers are ``linears`` and whose step attends by ``attention``, or (``linears``
    ``None``) each request alone."""
    backend = None if args.compile_step == "none" else args.compile_step
    batching = serve.Batching(max_slots=args.max_slots, max_len=args.slot_len, compile=backend,
                              prefill_chunk=args.prefill_chunk, linears=linears,
                              step_attention=attention)  # fmt: skip
    return serve.load_model(model_dir, batching=batching if linears else None)


def scheduler_variants(args) -> list[tuple[str, str, str]]:
    """``(row name, linears, attention)`` of every scheduler raced: each ``--linears`` with
    the first ``--step-attention``, then each other attention with the first linears."""
    first = args.step_attention[0]
    variants = [(linears, first) for linears in args.linears]
    variants += [(args.linears[0], a) for a in args.step_attention[1:]]
    names = []
    for linears, attention in variants:
        parts = [f"{linears} linears"] * (linears != "packed")
        parts += [f"{attention} attention"] * (attention != "math")
        names.append(("scheduler" + "".join(f", {p}" for p in parts), linears, attention))
    return names


HEADER = (f"{'method':<32}{'clients':>8}{'tokens/s':>10}{'TTFT p50 ms':>13}"
          f"{'gap p50 ms':>12}{'gap p99 ms':>12}")  # fmt: skip


def line(r: Row) -> str:
    return (f"{r.method:<32}{r.clients:>8}{r.tokens_per_s:>10.1f}{r.ttft_ms:>13.1f}"
            f"{r.gap_p50_ms:>12.1f}{r.gap_p99_ms:>12.1f}")  # fmt: skip


def goals(rows: list[Row], alone_tps: float, step_ms: float) -> None:
    at = {(r.method, r.clients): r for r in rows}

    def verdict(name: str, value: float | None, goal: float, higher: bool = True) -> None:
        if value is None:
            print(f"  {name}: not measured")
            return
        met = value >= goal if higher else value <= goal
        print(f"  {name}: {value:.2f} (goal {'>=' if higher else '<='} {goal}): "
              f"{'met' if met else 'not met'}")  # fmt: skip

    def ratio(a: tuple, b: tuple) -> float | None:
        return at[a].tokens_per_s / at[b].tokens_per_s if a in at and b in at else None

    print("goals (32 clients, in process):")
    verdict("scheduler / per-request tokens/s", ratio(("scheduler", 32), ("per-request", 32)), 5)
    verdict("scheduler / transformers CB tokens/s",
            ratio(("scheduler", 32), ("transformers CB", 32)), 1.5)  # fmt: skip
    for clients in sorted({r.clients for r in rows if r.method == "scheduler"}):
        p99 = at[("scheduler", clients)].gap_p99_ms / step_ms
        verdict(f"scheduler gap p99 / single-stream step, {clients} clients", p99, 2, False)
    one = at.get(("scheduler", 1))
    verdict("scheduler, 1 client / fmm.decoding.generate tokens/s",
            one.tokens_per_s / alone_tps if one else None, 1.0)  # fmt: skip


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    # The scheduler's start-up probe says which buckets and prefill shapes it uses.
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("train.serve.slot_pool").setLevel(logging.INFO)
    print(f"torch {torch.__version__}, {args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        hf, cfg, params, model_dir = build(args, Path(tmp))
        # The goals hold the scheduler to the faster of generate's two linear layers.
        alone_tps, step_ms = 0.0, float("inf")
        for packed in (False, True) if packed_available() else (False,):
            tps, ms = single_stream(params, cfg, args, packed=packed)
            alone_tps, step_ms = max(alone_tps, tps), min(step_ms, ms)
            print(f"single stream, fmm.decoding.generate{', packed linears' if packed else ''}: "
                  f"{tps:.1f} tokens/s, a step {ms:.1f} ms", flush=True)  # fmt: skip
        schedulers = []
        for name, linears, attention in scheduler_variants(args):
            started = time.perf_counter()
            model = served(model_dir, args, linears=linears, attention=attention)
            schedulers.append((name, model))
            print(
                f"{schedulers[-1][0]} ready (warmed up) in {time.perf_counter() - started:.1f} "
                f"s; {args.max_slots} slots of {args.slot_len}, step {args.compile_step}"
            )
        per_request = served(model_dir, args, linears=None)
        room = 4 * max(args.concurrency)  # no 503s: every client is let in
        print(f"{args.layers} layers x {args.width}, vocab {args.vocab}, prompts of "
              f"{args.prompt_len}, {args.new_tokens} new tokens each, greedy")  # fmt: skip
        print(HEADER)
        rows: list[Row] = []

        def add(row: Row) -> None:
            rows.append(row)
            print(line(row), flush=True)

        for clients in args.concurrency:
            batch = prompts(args, clients, clients)
            contenders = list(schedulers)
            if clients <= args.baseline_up_to:
                contenders.insert(0, ("per-request", per_request))
            for name, model in contenders:
                service = Service(model, max_generations=room)
                asyncio.run(in_process(service, batch[:1], 2))  # threads started, untimed
                release_workers()  # this thread's OpenMP workers would slow every method's
                timed = asyncio.run(in_process(service, batch, args.new_tokens))
                add(summarise(name, timed, args.new_tokens))
                asyncio.run(service.aclose())
                http = not args.no_http and (
                    name.startswith("scheduler") or clients <= args.baseline_http_up_to
                )
                if http:  # a server's own Service (closed with the server)
                    service = Service(model, max_generations=room)
                    with running(create_app(service)) as url:
                        asyncio.run(over_http(url, batch[:1], 2))
                        release_workers()
                        timed = asyncio.run(over_http(url, batch, args.new_tokens))
                    add(summarise(f"{name}, HTTP", timed, args.new_tokens))
            if not args.no_transformers:
                release_workers()  # its generation thread gets the cores as ours does
                timed = transformers_cb(hf, batch, args.new_tokens)
                add(summarise("transformers CB", timed, args.new_tokens))
        goals(rows, alone_tps, step_ms)


if __name__ == "__main__":
    main()
