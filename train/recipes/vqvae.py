"""Train a VQ-VAE on shapes-world images and report reconstruction error and codebook usage.

``python -m train vqvae --out runs/vqvae`` writes ``metrics.json``, ``loss.png``,
``reconstructions.png``, ``params.safetensors``, ``codebook_state.safetensors`` and
``config.json`` into ``--out``. ``python -m train mmgpt --vqvae runs/vqvae`` tokenises
images with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

import fmm
import models
from fmm.nn.codebook import code_usage
from models import vqvae
from train import checkpoint, optim
from train.data import WorldConfig, eval_set, scene_stream
from train.plots import plot_loss
from train.plots_generation import save_image_grid
from train.recipes import (
    add_device_arguments,
    device_of,
    number,
    out_dir,
    run_dir,
    wants_compile,
)
from train.step import init_state, make_train_step

STATE_FILE = "codebook_state.safetensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=out_dir, default=None, help="run directory (default: runs/vqvae-<time>)"
    )
    parser.add_argument(
        "--preset",
        default="vqvae_shapes",
        choices=sorted(vqvae.PRESETS),
        help="model size (default: %(default)s: 8x8 codes of 128)",
    )
    parser.add_argument(
        "--steps",
        type=number(at_least=1),
        default=1000,
        help="optimizer steps (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=number(at_least=1),
        default=64,
        help="images per step (default: %(default)s)",
    )
    parser.add_argument(
        "--lr",
        type=number(float, above=0),
        default=2e-3,
        help="peak AdamW learning rate (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=number(at_least=0),
        default=30,
        help="linear warmup steps (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=number(at_least=0),
        default=0,
        help="seed for init and data (default: %(default)s)",
    )
    add_device_arguments(parser)
    parser.add_argument(
        "--eval-per-class",
        type=number(at_least=1),
        default=10,
        help="held-out images per colour x shape class for the metrics (default: %(default)s)",
    )


def evaluate(params, cfg: vqvae.VQVAEConfig, images: torch.Tensor, device) -> dict:
    """Reconstruction MSE (pixels in [0, 1]) and codebook usage over ``images [N, 3, H, W]``."""
    recon, codes = [], []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            out = vqvae.apply(params, images[i : i + 256].to(device), cfg=cfg)
            recon.append(out["reconstruction"].clamp(0, 1).cpu())
            codes.append(out["codes"].cpu())
    recon, codes = torch.cat(recon), torch.cat(codes)
    mse = (recon - images).pow(2).mean()
    usage = code_usage(codes, cfg.codebook_size)
    return {
        "recon_mse": round(mse.item(), 6),
        "psnr_db": round((-10 * torch.log10(mse)).item(), 2),
        "perplexity": round(usage["perplexity"].item(), 2),
        "fraction_codes_used": round(usage["fraction_used"].item(), 4),
        "reconstructions": recon,
    }


def run(args: argparse.Namespace) -> dict:
    """Train, evaluate on held-out images, save; returns the metrics written to ``metrics.json``."""
    device = device_of(args)
    use_compile = wants_compile(args, device)
    out = run_dir(args, "vqvae")

    world = WorldConfig()
    cfg = models.get_config(args.preset)
    key = fmm.random.key(args.seed)
    params = vqvae.init(cfg, fmm.random.fold_in(key, "init"))
    params = fmm.tree.map(lambda x: x.to(device), params)
    ema = vqvae.init_codebook_state(params)
    schedule = optim.cosine_schedule(
        args.lr, total_steps=args.steps, warmup_steps=min(args.warmup, args.steps)
    )
    # The codebook is moved by update_codebook alone: keep weight decay off it.
    optimizer = optim.chain(
        optim.clip_by_global_norm(1.0),
        optim.adamw(
            schedule,
            weight_decay=1e-4,
            decay_mask=lambda path: "codebook" not in path and not path.endswith("bias"),
        ),
    )
    state = init_state(params, optimizer, key=fmm.random.fold_in(key, "dropout"))
    step = make_train_step(
        lambda p, b, k: vqvae.loss(p, b, cfg=cfg), optimizer, compile=use_compile
    )
    restart_key = fmm.random.fold_in(key, "restart")
    print(
        f"{args.preset}: {fmm.tree.count(params):,} params | {cfg.grid}x{cfg.grid} codes of "
        f"{cfg.codebook_size} | {args.steps} steps x {args.batch_size} images | {device} | out={out}"
    )

    stream = scene_stream(world, args.batch_size, seed=args.seed)
    losses: list[float] = []
    started = time.perf_counter()
    with tqdm(range(args.steps), desc="train vqvae", unit="step", dynamic_ncols=True) as bar:
        for i in bar:
            batch = {"images": next(stream).images.to(device)}
            state, metrics = step(state, batch)
            new_params, ema, info = vqvae.update_codebook(
                state["params"],
                ema,
                batch["images"],
                cfg=cfg,
                key=fmm.random.fold_in(restart_key, i),
            )
            state = {**state, "params": new_params}
            losses.append(float(metrics["recon_mse"]))
            if i % 10 == 0 or i == args.steps - 1:
                bar.set_postfix(
                    mse=f"{losses[-1]:.4f}",
                    ppl=f"{float(metrics['perplexity']):.0f}",
                    restarted=int(info["restarted"]),
                )
    train_seconds = time.perf_counter() - started

    params = state["params"]
    images, _ = eval_set(world, args.eval_per_class, seed=args.seed + 1)
    result = evaluate(params, cfg, images, device)
    recon = result.pop("reconstructions")
    metrics = {
        **{f"heldout_{k}": v for k, v in result.items()},
        "codebook_size": cfg.codebook_size,
        "grid": cfg.grid,
        "eval_images": len(images),
        "final_train_recon_mse": sum(losses[-20:]) / len(losses[-20:]),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train_seconds": round(train_seconds, 2),
        "device": str(device),
    }
    checkpoint.save(
        out,
        params,
        config={
            "model": "vqvae",
            "preset": args.preset,
            "vqvae": cfg.to_dict(),
            "world": dataclasses.asdict(world),
            "seed": args.seed,
        },
        files={STATE_FILE: ema, checkpoint.METRICS_FILE: metrics},
    )
    plot_loss(losses, out / "loss.png", title="VQ-VAE reconstruction MSE (train batches)")
    # Rows alternate originals and reconstructions; one held-out image per class, 8 classes a row.
    picks = torch.arange(0, len(images), args.eval_per_class)[:32]
    pairs = torch.stack([images[picks], recon[picks]]).reshape(2, -1, 8, *images.shape[1:])
    save_image_grid(
        pairs.transpose(0, 1).reshape(-1, *images.shape[1:]),
        out / "reconstructions.png",
        columns=8,
        row_labels=["original", "reconstruction"] * (len(picks) // 8),
        title=f"held-out images and their reconstructions (MSE {result['recon_mse']:.4f}, "
        f"{result['fraction_codes_used']:.0%} of codes used)",
    )
    print(json.dumps({k: v for k, v in metrics.items() if k.startswith("heldout_")}))
    print(f"wrote {out}/: metrics.json loss.png reconstructions.png params.safetensors config.json")
    return metrics


def load_run(run_dir: str | Path) -> tuple[vqvae.VQVAEConfig, dict]:
    """``(cfg, params)`` of a run saved by :func:`run`, checked key by key."""
    run = checkpoint.open_run(run_dir)
    config = run.config()
    if config.get("model") != "vqvae":
        raise checkpoint.CheckpointError(
            f"{run_dir} holds a {config.get('model')!r} run, not a 'vqvae' one"
        )
    cfg = vqvae.VQVAEConfig.from_dict(config["vqvae"])
    return cfg, run.params(like=vqvae.init(cfg, fmm.random.key(0).to("meta")))
