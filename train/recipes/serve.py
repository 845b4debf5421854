"""``python -m train serve --ckpt DIR``: serve a trained run over HTTP.

::

    python -m train serve --ckpt runs/clip --store runs/clip/store.sqlite [--quantize int8]

A run of a family that declares embeddings (``FAMILY.serving``: ``python -m train clip``,
``flava``, ``albef``, a BERT run) serves text and image embeddings, zero-shot labels and
(with ``--store``) top-k search; a caption -> image run (``python -m train mmgpt``) serves
image generation with the codes streamed as server-sent events; a Hugging Face GPT-2 directory (``config.json``,
``model.safetensors`` or ``pytorch_model.bin``, ``tokenizer.json``) serves text generation
with the tokens streamed likewise. Routes and status codes: :mod:`train.serve.app`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from train.recipes import add_device_argument, device_of, number
from train.recipes.serve_models import Batching, load_model  # the recipe's API too
from train.serve import Service
from train.serve.front_door import HttpLimits

__all__ = ["Batching", "add_arguments", "build_service", "limits_of", "load_model", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ckpt", type=Path, required=True,
        help="a run directory (clip, flava, albef, bert: embeddings; mmgpt: image generation), "
        "or a Hugging Face GPT-2 directory",
    )  # fmt: skip
    parser.add_argument(
        "--quantize", choices=("none", "int8"), default="none",
        help="int8 weight-only quantization of the linear layers (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--store", type=Path, default=None,
        help="SQLite embedding store: computed embeddings are kept and served from it, and "
        "/v1/search searches it (default: none)",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    parser.add_argument(
        "--port",
        type=number(at_least=0, at_most=65535),
        default=8000,
        help="(default: %(default)s)",
    )
    parser.add_argument(
        "--max-batch", type=number(at_least=1), default=32,
        help="most items per model call (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--max-wait-ms", type=number(float, at_least=0), default=5.0,
        help="how long a request waits for others to batch with (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--max-queue", type=number(at_least=1), default=1024,
        help="items queued or running before requests are refused with 503 (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout-s", type=number(float, above=0), default=30.0,
        help="per-request budget; past it the answer is 504 (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--store-cache-mb", type=number(float, at_least=0), default=256.0,
        help="most MiB of computed embeddings the store keeps (least recently used evicted "
        "first; /v1/items rows are kept apart, never evicted) (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--max-body-mb", type=number(float, above=0), default=8.0,
        help="largest request body accepted; larger ones get 413 (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--max-buffered-mb", type=number(float, above=0), default=32.0,
        help="request bodies read or handled at once, all connections together; past it "
        "503 (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--header-timeout-s", type=number(float, above=0), default=10.0,
        help="request line and headers must arrive within this; past it 408 (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--body-timeout-s", type=number(float, above=0), default=30.0,
        help="a body must arrive within this of its headers; past it 408 (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--keep-alive-s", type=number(float, above=0), default=100.0,
        help="idle connections stay open this long; keep it above clients' pool expiry "
        "(httpx 5 s, aiohttp 15 s, Go 90 s), or some requests are lost as resets "
        "(default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--max-connections", type=number(at_least=1), default=2048,
        help="open connections; one more gets 503 and is closed (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--backlog", type=number(at_least=1), default=4096,
        help="listen queue for connections not yet accepted (the kernel caps it at "
        "net.core.somaxconn) (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--max-generations", type=number(at_least=1), default=None,
        help="concurrent generations (running or waiting for a slot) before 503 (default: "
        "4 x --max-slots; 2 with --no-batching)",
    )  # fmt: skip
    parser.add_argument(
        "--max-slots", type=number(at_least=1), default=32,
        help="generations decoded together, one token each per step, in one shared cache "
        "(continuous batching) (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--linears", choices=("packed", "columns", "rows"), default=None,
        help="how the batched step computes linear layers: packed (oneDNN over weights "
        "packed once: a row rounds alike at every row count, and few rows cost about one "
        "row), columns ((W @ x.T).T on the BLAS: also alike at every row count, but twice "
        "the cost at a few rows) or "
        "rows (plain F.linear: on MKL exact only within 1, 2-15 and 16+ rows) (default: "
        "packed on CPU where this torch has oneDNN, else columns)",
    )  # fmt: skip
    parser.add_argument(
        "--step-attention", choices=("math", "sdpa"), default="math",
        help="how the batched decode step attends: math (matmul, softmax, matmul: the faster "
        "for one query on CPU) or sdpa (torch's fused kernels) (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--prefill-chunk", type=number(at_least=1), default=64,
        help="most prompt tokens prefilled between two decode steps, so that a long prompt "
        "does not stall the running generations (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--slot-len", type=number(at_least=1), default=None,
        help="positions per slot, prompt and new tokens (a step reads the smallest window "
        "of 64 ... 512 positions, or all, that holds its live sequences) (default: the "
        "model's context)",
    )  # fmt: skip
    parser.add_argument(
        "--compile-step", choices=("inductor", "aot_eager", "none"), default="inductor",
        help="how the batched decode step runs: compiled once at start-up (inductor, the "
        "fastest), or eager (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--no-batching", action="store_true",
        help="run each generation alone in its own thread and cache (the path before the "
        "scheduler; --quantize int8 always does)",
    )  # fmt: skip
    add_device_argument(parser)


def _mb(value: float) -> int:
    return int(value * 2**20)


def _check_flags(args: argparse.Namespace) -> None:
    # Each flag's own range is its parser's type= check; this is the one between two flags.
    if args.max_buffered_mb < args.max_body_mb:
        raise SystemExit(
            f"--max-buffered-mb ({args.max_buffered_mb}) must be at least --max-body-mb "
            f"({args.max_body_mb}), or the largest body could never be read"
        )


def limits_of(args: argparse.Namespace) -> HttpLimits:
    """The :class:`~train.serve.front_door.HttpLimits` the flags describe."""
    _check_flags(args)
    return HttpLimits(
        max_body_bytes=_mb(args.max_body_mb), max_buffered_bytes=_mb(args.max_buffered_mb),
        body_timeout_s=args.body_timeout_s, header_timeout_s=args.header_timeout_s,
        keep_alive_s=args.keep_alive_s, max_connections=args.max_connections,
        backlog=args.backlog,
    )  # fmt: skip


def build_service(args: argparse.Namespace) -> Service:
    """The :class:`Service` the flags describe (model, store, batching limits)."""
    _check_flags(args)
    device = device_of(args)
    batching = None
    # int8 weights quantize a call's activations with one range for the whole batch (and
    # do not compile), so batched rows would depend on each other: each runs alone.
    if not args.no_batching and args.quantize == "none":
        backend = None if args.compile_step == "none" else args.compile_step
        batching = Batching(
            max_slots=args.max_slots, prefill_chunk=args.prefill_chunk,
            max_len=args.slot_len, compile=backend, linears=args.linears,
            step_attention=args.step_attention, announce=True,
        )  # fmt: skip
    model = load_model(args.ckpt, quantize=args.quantize, device=device, batching=batching)
    generations = args.max_generations
    if generations is None:
        generations = 2 if batching is None else 4 * args.max_slots
    store = None
    if args.store is not None:
        from train.store import EmbeddingStore

        store = EmbeddingStore(
            args.store, model.fingerprint, dim=model.dim, max_cached_bytes=_mb(args.store_cache_mb)
        )
    return Service(
        model, store=store, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, timeout_s=args.timeout_s, max_generations=generations,
    )  # fmt: skip


def run(args: argparse.Namespace) -> None:
    """Load the run and serve it until interrupted."""
    from train.serve.app import create_app
    from train.serve.openmp import release_workers
    from train.serve.server import make_server, somaxconn

    limits = limits_of(args)
    service = build_service(args)
    app = create_app(service, limits=limits)
    print(
        f"serving {service.model.name} from {args.ckpt} on http://{args.host}:{args.port} "
        f"(fingerprint {service.model.fingerprint[:12]}, quantize={args.quantize}, "
        f"store={args.store}); OpenAPI at /docs"
    )
    cap = somaxconn()
    if cap is not None and cap < limits.backlog:
        print(f"note: the kernel caps the listen backlog at net.core.somaxconn={cap} "
              f"(--backlog {limits.backlog})")  # fmt: skip
    release_workers()  # loading ran here; from now on this thread only serves HTTP
    try:
        make_server(app, host=args.host, port=args.port, limits=limits, log_level="info").run()
    finally:
        if service.store is not None:
            service.store.close()
