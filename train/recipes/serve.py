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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import fmm
import models
from models import gpt, mmgpt
from train import checkpoint
from train.loop import Run, load_run
from train.recipes import add_device_argument, device_of, number
from train.recipes.serve_streams import stream_image_codes, stream_text
from train.serve import ServedModel, Service
from train.serve.front_door import HttpLimits


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


def _run_name(run_dir: str | Path) -> str:
    # /healthz shows which run is served, never where it lies on the server's disk.
    return Path(run_dir).resolve().name


def _fingerprint(config: dict, params: dict) -> str:
    from train.store import model_fingerprint

    return model_fingerprint(config, params)


def _maybe_quantize(params: dict, quantize: str) -> dict:
    if quantize == "none":
        return params
    from fmm import quant

    return quant.quantize(params)


def _text_length(run: Run) -> int:
    # The longest token sequence the family's loss reads: what its tokenizer pads to.
    field = run.family.batch(run.cfg)["tokens"]
    return field.limits["seq"]


def embedding_model(run: Run, *, quantize: str = "none") -> ServedModel:
    """A :class:`ServedModel` of a run whose family declares embeddings
    (``FAMILY.serving``: CLIP, FLAVA, ALBEF, BERT): text and/or image embeddings, and
    zero-shot labels when it has both. Images arrive as ``[C, H, W]`` in ``[0, 1]`` and are
    normalised as the built-in data's training normalised them; texts are tokenised with the
    run's tokenizer.
    """
    from train.recipes.clip import normalize_images

    family, cfg, serving = run.family, run.cfg, run.family.serving
    params = _maybe_quantize(run.params, quantize)
    device = fmm.tree.leaves(params)[0].device
    embed_text = embed_image = tokenize = None
    if serving.embed_text is not None and run.tokenizer is not None:
        length = _text_length(run)

        def embed_text(texts: list[str]) -> torch.Tensor:
            tokens = run.tokenizer.encode(texts, length).to(device)
            return serving.embed_text(params, tokens, cfg=cfg)

        def tokenize(texts: list[str]) -> list[list[int]]:  # the ids read, pads (0) left out
            return [
                [i for i in row if i != 0] for row in run.tokenizer.encode(texts, length).tolist()
            ]

    if serving.embed_image is not None:

        def embed_image(images: list[torch.Tensor]) -> torch.Tensor:
            batch = normalize_images(torch.stack(images)).to(device)
            return serving.embed_image(params, batch, cfg=cfg)

    if embed_text is None and embed_image is None:
        raise checkpoint.CheckpointError(
            f"{run.path} holds a {family.name} run without a tokenizer: nothing to embed"
        )
    image_shape = serving.image_shape(cfg) if serving.image_shape is not None else None
    with torch.no_grad():  # the embedding width, from one real call
        probe = embed_text(["a"]) if embed_text else embed_image([torch.zeros(image_shape)])
    scale = serving.logit_scale(params) if serving.logit_scale is not None else 1.0
    config = {**run.config, "quantize": quantize}
    return ServedModel(
        name=family.name,
        fingerprint=_fingerprint(config, params),
        dim=probe.shape[-1],
        embed_text=embed_text,
        embed_image=embed_image,
        image_shape=image_shape if embed_image is not None else None,
        logit_scale=float(scale),
        tokenize=tokenize,
        info={
            "run": _run_name(run.path),
            "quantize": quantize,
            family.name: run.config[family.name],
        },
    )


@dataclass(frozen=True, kw_only=True)
class Batching:
    """How generations share the model: ``max_slots`` sequences in one pool,
    ``prefill_chunk`` prompt tokens per iteration, ``max_len`` positions per slot (``None``:
    the model's context), the decode step compiled with ``compile`` (a dynamo backend name,
    or ``None``: eager), its linear layers ``linears`` (``"packed"``, ``"columns"`` or ``"rows"``; ``None``: the
    scheduler's default). ``announce``: say on stdout what the start-up does and what it
    found (the command line's). See :class:`train.serve.scheduler.Scheduler`."""

    max_slots: int = 32
    prefill_chunk: int = 64
    max_len: int | None = None
    compile: str | None = "inductor"
    linears: str | None = None
    announce: bool = False

    def scheduler(self, params: dict, spec: Any, **kw: Any) -> Any:
        """A warmed-up :class:`~train.serve.scheduler.Scheduler` over ``params``."""
        from train.serve.scheduler import Scheduler

        scheduler = Scheduler(
            params, spec, max_slots=self.max_slots, prefill_chunk=self.prefill_chunk,
            max_len=self.max_len, compile=self.compile, linears=self.linears, **kw,
        )  # fmt: skip
        if self.announce:  # the probes and compiles take a minute or so on a small CPU
            print(f"scheduler: probing and compiling the decode step for {self.max_slots} "
                  f"slots of {scheduler.max_len} positions...", flush=True)  # fmt: skip
        started = time.perf_counter()
        scheduler.warmup()
        if self.announce:
            pool = scheduler.slots
            print(f"scheduler: ready in {time.perf_counter() - started:.0f} s; steps over "
                  f"{pool.buckets} rows and {pool.windows} key positions, "
                  f"{pool.linears} linears", flush=True)  # fmt: skip
        return scheduler


def drawing_model(
    run: Run, *, quantize: str = "none", batching: Batching | None = None
) -> ServedModel:
    """A :class:`ServedModel` of a caption -> image run (``python -m train mmgpt``: a
    generator and the VQ-VAE whose codes it draws): streamed image generation."""
    from train.recipes.generate import drawing_kit

    kit = drawing_kit(run)
    kit["params"] = _maybe_quantize(kit["params"], quantize)
    if batching is not None:
        cfg = kit["cfg"]
        kit["scheduler"] = batching.scheduler(
            kit["params"], mmgpt.image_decoder_spec(cfg), guided_from=cfg.text_vocab
        )
    config = {**run.config, "quantize": quantize}
    return ServedModel(
        name=run.family.name,
        fingerprint=_fingerprint(config, {"mmgpt": kit["params"], "vqvae": kit["vqvae_params"]}),
        generate=lambda prompt, **options: stream_image_codes(kit, prompt, **options),
        generate_limits={"max_new_tokens": (kit["cfg"].image_len,) * 2},
        info={"run": _run_name(run.path), "quantize": quantize, "image_len": kit["cfg"].image_len},
    )


def gpt_model(
    model_dir: str | Path,
    *,
    quantize: str = "none",
    device: str = "cpu",
    batching: Batching | None = None,
) -> ServedModel:
    """A :class:`ServedModel` of a Hugging Face GPT-2 directory: streamed text generation
    (``batching``: through one shared scheduler; ``None``: each request alone).

    Needs ``tokenizer.json`` (the ``tokenizers`` file GPT-2 ships with) beside the weights.
    """
    from tokenizers import Tokenizer

    model_dir = Path(model_dir)
    tokenizer_path = model_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {model_dir}: a text model is served with its `tokenizers` file"
        )
    cfg, params = gpt.load_pretrained(model_dir)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise ValueError(
            f"{tokenizer_path} has {tokenizer.get_vocab_size()} tokens but the model only "
            f"{cfg.vocab_size}"
        )
    params = _maybe_quantize(fmm.tree.map(lambda x: x.to(device), params), quantize)
    config = {**checkpoint.load_config(model_dir), "quantize": quantize}
    run = {
        "cfg": cfg,
        "params": params,
        "tokenizer": tokenizer,
        "eos_id": config.get("eos_token_id"),
    }
    positions = cfg.context_length  # what a prompt and its new tokens must fit in
    if batching is not None:
        run["scheduler"] = batching.scheduler(params, gpt.decoder_spec(cfg), eos_id=run["eos_id"])
        positions = min(positions, batching.max_len or positions)  # a slot holds --slot-len
    return ServedModel(
        name="gpt2",
        fingerprint=_fingerprint(config, params),
        generate=lambda prompt, **options: stream_text(run, prompt, **options),
        generate_limits={"guidance": (1.0, 1.0), "max_new_tokens": (1, positions)},
        tokenize=lambda texts: [e.ids for e in tokenizer.encode_batch(texts)],
        vocab_size=cfg.vocab_size,
        info={"run": _run_name(model_dir), "quantize": quantize, "gpt": cfg.to_dict()},
    )


def load_model(
    run_dir: str | Path,
    *,
    quantize: str = "none",
    device: str = "cpu",
    batching: Batching | None = None,
) -> ServedModel:
    """The :class:`ServedModel` for whatever ``run_dir`` holds: a run of a family with
    embeddings (``FAMILY.serving``), a caption -> image run (it carries its VQ-VAE), or a
    Hugging Face GPT-2 directory (its ``config.json`` says ``"model_type": "gpt2"``).
    ``batching``: generations share one :class:`Batching` scheduler (``None``: each runs
    alone)."""
    config = checkpoint.load_config(run_dir)
    if "model_type" in config:  # Hugging Face's config.json, not one of our runs'
        if config["model_type"] != "gpt2":
            raise checkpoint.CheckpointError(
                f"{run_dir} holds a Hugging Face {config['model_type']!r} model; `serve` "
                "serves gpt2 ones"
            )
        return gpt_model(run_dir, quantize=quantize, device=device, batching=batching)
    run = load_run(run_dir, device=device)
    if run.family.serving is not None:
        return embedding_model(run, quantize=quantize)
    if run.family.decoder_spec is not None and "vqvae" in run.config:
        return drawing_model(run, quantize=quantize, batching=batching)
    servable = sorted(f.name for f in models.FAMILIES if f.serving is not None)
    raise checkpoint.CheckpointError(
        f"{run_dir} holds a {run.family.name!r} run, which `serve` cannot serve: it serves runs "
        f"of {servable}, caption -> image runs and Hugging Face gpt2 directories"
    )


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
            max_len=args.slot_len, compile=backend, linears=args.linears, announce=True,
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
