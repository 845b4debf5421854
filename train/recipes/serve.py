"""``python -m train serve --ckpt DIR``: serve a trained run over HTTP.

::

    python -m train serve --ckpt runs/clip --store runs/clip/store.sqlite [--quantize int8]

A ``python -m train clip`` run serves text and image embeddings, zero-shot labels and (with
``--store``) top-k search; a ``python -m train mmgpt`` run serves image generation with the
codes streamed as server-sent events; a Hugging Face GPT-2 directory (``config.json``,
``model.safetensors`` or ``pytorch_model.bin``, ``tokenizer.json``) serves text generation
with the tokens streamed likewise. Routes and status codes: :mod:`train.serve.app`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import fmm
from fmm.losses import logit_scale_value
from models import clip, gpt
from train import checkpoint
from train.recipes import add_device_argument, device_of, number
from train.recipes.serve_streams import stream_image_codes, stream_text
from train.serve import ServedModel, Service
from train.serve.front_door import HttpLimits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ckpt", type=Path, required=True,
        help="run directory of `python -m train clip|mmgpt`, or a Hugging Face GPT-2 directory",
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
        "--max-generations", type=number(at_least=1), default=2,
        help="concurrent generations before 503 (default: %(default)s)",
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


def clip_model(run_dir: str | Path, *, quantize: str = "none", device: str = "cpu") -> ServedModel:
    """A :class:`ServedModel` of a ``python -m train clip`` run: text and image embeddings.

    Images arrive as ``[3, H, W]`` in ``[0, 1]`` and are normalised as in training.
    """
    from train.loop import load_run
    from train.recipes.clip import normalize_images

    run = load_run(run_dir, family="clip", device=device)
    cfg, tokenizer = run.cfg, run.tokenizer
    params = _maybe_quantize(run.params, quantize)
    config = {**run.config, "quantize": quantize}

    def embed_text(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer.encode(texts, cfg.context_length).to(device)
        return clip.encode_text(params, tokens, cfg=cfg)

    def embed_image(images: list[torch.Tensor]) -> torch.Tensor:
        batch = normalize_images(torch.stack(images)).to(device)
        return clip.encode_image(params, batch, cfg=cfg)

    return ServedModel(
        name="clip",
        fingerprint=_fingerprint(config, params),
        dim=cfg.embed_dim,
        embed_text=embed_text,
        embed_image=embed_image,
        image_shape=(cfg.in_channels, cfg.image_size, cfg.image_size),
        logit_scale=float(logit_scale_value(params["logit_scale"])),
        info={"run": _run_name(run_dir), "quantize": quantize, "clip": cfg.to_dict()},
    )


def mmgpt_model(run_dir: str | Path, *, quantize: str = "none", device: str = "cpu") -> ServedModel:
    """A :class:`ServedModel` of a ``python -m train mmgpt`` run: streamed image generation."""
    from train.loop import load_run
    from train.recipes.generate import drawing_kit

    saved = load_run(run_dir, family="mmgpt", device=device)
    run = drawing_kit(saved)
    run["params"] = _maybe_quantize(run["params"], quantize)
    config = {**saved.config, "quantize": quantize}
    return ServedModel(
        name="mmgpt",
        fingerprint=_fingerprint(config, {"mmgpt": run["params"], "vqvae": run["vqvae_params"]}),
        generate=lambda prompt, **options: stream_image_codes(run, prompt, **options),
        generate_limits={"max_new_tokens": (run["cfg"].image_len,) * 2},
        info={"run": _run_name(run_dir), "quantize": quantize, "image_len": run["cfg"].image_len},
    )


def gpt_model(model_dir: str | Path, *, quantize: str = "none", device: str = "cpu") -> ServedModel:
    """A :class:`ServedModel` of a Hugging Face GPT-2 directory: streamed text generation.

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
    return ServedModel(
        name="gpt2",
        fingerprint=_fingerprint(config, params),
        generate=lambda prompt, **options: stream_text(run, prompt, **options),
        generate_limits={"guidance": (1.0, 1.0), "max_new_tokens": (1, cfg.context_length)},
        info={"run": _run_name(model_dir), "quantize": quantize, "gpt": cfg.to_dict()},
    )


def load_model(run_dir: str | Path, *, quantize: str = "none", device: str = "cpu") -> ServedModel:
    """The :class:`ServedModel` for whatever ``run_dir`` holds: a ``clip`` or ``mmgpt`` run,
    or a Hugging Face GPT-2 directory (its ``config.json`` says ``"model_type": "gpt2"``)."""
    config = checkpoint.load_config(run_dir)
    if "model_type" in config:  # Hugging Face's config.json, not one of our runs'
        if config["model_type"] != "gpt2":
            raise checkpoint.CheckpointError(
                f"{run_dir} holds a Hugging Face {config['model_type']!r} model; `serve` "
                "serves gpt2 ones"
            )
        return gpt_model(run_dir, quantize=quantize, device=device)
    kind = config.get("model")
    builders = {"clip": clip_model, "mmgpt": mmgpt_model}
    if kind not in builders:
        raise checkpoint.CheckpointError(
            f"{run_dir} holds a {kind!r} run; `serve` serves {sorted(builders)} runs "
            "and Hugging Face gpt2 directories"
        )
    return builders[kind](run_dir, quantize=quantize, device=device)


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
    model = load_model(args.ckpt, quantize=args.quantize, device=device)
    store = None
    if args.store is not None:
        from train.store import EmbeddingStore

        store = EmbeddingStore(
            args.store, model.fingerprint, dim=model.dim, max_cached_bytes=_mb(args.store_cache_mb)
        )
    return Service(
        model, store=store, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue, timeout_s=args.timeout_s, max_generations=args.max_generations,
    )  # fmt: skip


def run(args: argparse.Namespace) -> None:
    """Load the run and serve it until interrupted."""
    from train.serve.app import create_app
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
    try:
        make_server(app, host=args.host, port=args.port, limits=limits, log_level="info").run()
    finally:
        if service.store is not None:
            service.store.close()
