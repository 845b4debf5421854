"""The models ``python -m train serve`` serves (:func:`load_model`): a run of a family with
embeddings, a caption -> image run, or a Hugging Face GPT-2 directory, each as a
:class:`~train.serve.ServedModel`; and :class:`Batching`, how its generations share one
scheduler. The command line itself is :mod:`train.recipes.serve`.
"""

from __future__ import annotations

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
from train.recipes.serve_streams import stream_image_codes, stream_text
from train.serve import ServedModel

__all__ = ["Batching", "drawing_model", "embedding_model", "gpt_model", "load_model"]


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
    or ``None``: eager), its linear layers ``linears`` (``"packed"``, ``"columns"`` or
    ``"rows"``; ``None``: the scheduler's default), its attention ``step_attention``
    (``"math"`` or ``"sdpa"``). ``announce``: say on stdout what the start-up does and what it
    found (the command line's). See :class:`train.serve.scheduler.Scheduler`."""

    max_slots: int = 32
    prefill_chunk: int = 64
    max_len: int | None = None
    compile: str | None = "inductor"
    linears: str | None = None
    step_attention: str = "math"
    announce: bool = False

    def scheduler(self, params: dict, spec: Any, **kw: Any) -> Any:
        """A warmed-up :class:`~train.serve.scheduler.Scheduler` over ``params``."""
        from train.serve.scheduler import Scheduler

        scheduler = Scheduler(
            params, spec, max_slots=self.max_slots, prefill_chunk=self.prefill_chunk,
            max_len=self.max_len, compile=self.compile, linears=self.linears,
            step_attention=self.step_attention, **kw,
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
                  f"{pool.linears} linears, {pool.step_attention} attention",
                  flush=True)  # fmt: skip
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
