"""Helpers of the serving tests: tiny saved runs (laid out as the recipes write them) and a
real uvicorn server on a loopback port, in a thread."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from pathlib import Path

import fmm
import models
from models import clip, mmgpt, vqvae
from train import checkpoint
from train.data import WordTokenizer, WorldConfig

WORLD = WorldConfig()


def _save_tokenizer(run_dir: Path, tokenizer: WordTokenizer) -> None:
    (run_dir / "tokenizer.json").write_text(tokenizer.to_json())


def tiny_clip_run(run_dir: Path, *, width: int = 16) -> Path:
    """A random-weight CLIP run as ``python -m train clip`` lays it out (8 px images)."""
    tokenizer = WordTokenizer.for_world(WORLD)
    cfg = dataclasses.replace(
        clip.clip_tiny(vocab_size=tokenizer.vocab_size, context_length=12),
        image_size=8, patch_size=4, image_width=width, image_layers=1, image_heads=2,
        text_width=width, text_layers=1, text_heads=2, embed_dim=8,
    )  # fmt: skip
    params = clip.init(cfg, fmm.random.key(0))
    config = {"model": "clip", "clip": cfg.to_dict(), "world": dataclasses.asdict(WORLD)}
    checkpoint.save(run_dir, params, config=config)
    _save_tokenizer(run_dir, tokenizer)
    return run_dir


def tiny_mmgpt_run(run_dir: Path) -> Path:
    """A random-weight mmgpt run (with its VQ-VAE) as ``python -m train mmgpt`` lays it out."""
    tokenizer = WordTokenizer.for_world(WORLD)
    vq_cfg = vqvae.VQVAEConfig(
        image_size=8, channels=(8,), res_blocks=1, res_hidden=8, code_dim=8, codebook_size=16
    )
    cfg = mmgpt.MMGPTConfig(
        text_vocab=tokenizer.vocab_size, text_len=10, image_vocab=vq_cfg.codebook_size,
        image_len=vq_cfg.grid**2, width=16, layers=1, heads=2,
    )  # fmt: skip
    key = fmm.random.key(1)
    config = {
        "model": "mmgpt",
        "mmgpt": cfg.to_dict(),
        "vqvae": vq_cfg.to_dict(),
        "world": dataclasses.asdict(WORLD),
    }
    checkpoint.save(run_dir, mmgpt.init(cfg, fmm.random.fold_in(key, "gpt")), config=config)
    checkpoint.save_params(run_dir / "vqvae.safetensors", vqvae.init(vq_cfg, key))
    _save_tokenizer(run_dir, tokenizer)
    return run_dir


@contextlib.contextmanager
def running(app, *, limits=None, protocol=None, timeout: float = 20.0):
    """Serve the ASGI ``app`` with uvicorn on a free loopback port, through
    ``train.serve.server.make_server`` (header deadline, connection cap) with ``limits`` and
    uvicorn's HTTP ``protocol`` class (default: its own choice); yields the base URL."""
    from train.serve.front_door import HttpLimits
    from train.serve.server import make_server

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = make_server(
        app, host="127.0.0.1", port=port, limits=limits or HttpLimits(), protocol=protocol,
        log_level="warning", lifespan="on",
    )  # fmt: skip
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def tiny_family_run(run_dir: Path, family: str) -> Path:
    """A random-weight run of ``family``'s tiny preset over the world's words, laid out as
    the training loop saves runs (config under the family's name, tokenizer beside)."""
    tokenizer = WordTokenizer.for_world(WORLD)
    fam = models.get_family(family)
    build = fam.presets[f"{family}_tiny"]
    cfg = build(vocab_size=tokenizer.vocab_size)
    config = {"model": family, family: cfg.to_dict(), "world": dataclasses.asdict(WORLD)}
    checkpoint.save(run_dir, fam.init(cfg, fmm.random.key(0)), config=config)
    _save_tokenizer(run_dir, tokenizer)
    return run_dir
