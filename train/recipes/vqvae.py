"""Train a VQ-VAE on shapes-world images and report reconstruction error and codebook usage.

``python -m train vqvae --out runs/vqvae`` writes the files of every run (its EMA codebook
statistics as ``model_state.safetensors``) and ``reconstructions.png``. ``python -m train
mmgpt --vqvae runs/vqvae`` tokenises images with it.
"""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial

import torch

import models
from fmm.nn.codebook import code_usage
from models import vqvae
from train.data import WorldConfig, eval_set, sample_scenes
from train.loop import Defaults, Evaluation, Job, Recipe, SeededSource
from train.plots_generation import save_image_grid
from train.recipes import number


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", default="vqvae_shapes", choices=sorted(vqvae.PRESETS),
        help="model size (default: %(default)s: 8x8 codes of 128)",
    )  # fmt: skip
    parser.add_argument(
        "--eval-per-class", type=number(at_least=1), default=10,
        help="held-out images per colour x shape class for the metrics (default: %(default)s)",
    )  # fmt: skip


def scene_images(world: WorldConfig, generator, batch_size: int) -> dict:
    """A batch of training scenes' pixels ``images [B, 3, H, W]`` in ``[0, 1]``."""
    return {"images": sample_scenes(world, batch_size, generator=generator).images}


def _no_decay_on_codebook(path: str) -> bool:
    # The codebook is moved by the EMA update alone: keep weight decay off it (and biases).
    return "codebook" not in path and not path.endswith("bias")


def prepare(args: argparse.Namespace, device: torch.device) -> Job:
    world = WorldConfig()
    cfg = models.get_config(args.preset)
    return Job(
        cfg=cfg,
        source=SeededSource(
            partial(scene_images, world), batch_size=args.batch_size, seed=args.seed
        ),
        config={"preset": args.preset, "world": dataclasses.asdict(world)},
        curves=("recon_mse",),
        decay_mask=_no_decay_on_codebook,
        describe=f"{args.preset} ({cfg.grid}x{cfg.grid} codes of {cfg.codebook_size})",
        context=world,
    )


def reconstruction_figures(run, inputs: torch.Tensor, *, codebook_size: int, chunk: int) -> dict:
    """Reconstruct ``inputs [N, 3, ...]`` (pixels in [0, 1]) ``chunk`` at a time with
    ``run(x) -> {"reconstruction", "codes"}``: ``recon_mse``, ``psnr_db``, the codes'
    ``perplexity`` and ``fraction_codes_used``, and ``reconstructions`` (clamped to [0, 1],
    on the CPU). Images and videos alike (the video recipe uses it too)."""
    recon, codes = [], []
    for i in range(0, len(inputs), chunk):
        out = run(inputs[i : i + chunk])
        recon.append(out["reconstruction"].clamp(0, 1).cpu())
        codes.append(out["codes"].cpu())
    recon, codes = torch.cat(recon), torch.cat(codes)
    mse = (recon - inputs).pow(2).mean()
    usage = code_usage(codes, codebook_size)
    return {
        "recon_mse": round(mse.item(), 6),
        "psnr_db": round((-10 * torch.log10(mse)).item(), 2),
        "perplexity": round(usage["perplexity"].item(), 2),
        "fraction_codes_used": round(usage["fraction_used"].item(), 4),
        "reconstructions": recon,
    }


def reconstruct(params, cfg: vqvae.VQVAEConfig, images: torch.Tensor, device) -> dict:
    """Reconstruction MSE (pixels in [0, 1]) and codebook usage over ``images [N, 3, H, W]``."""
    return reconstruction_figures(
        lambda x: vqvae.apply(params, x.to(device), cfg=cfg),
        images, codebook_size=cfg.codebook_size, chunk=256,
    )  # fmt: skip


def evaluate(job: Job, params, model_state, args: argparse.Namespace, device) -> Evaluation:
    cfg = job.cfg
    images, _ = eval_set(job.context, args.eval_per_class, seed=args.seed + 1)
    result = reconstruct(params, cfg, images, device)
    recon = result.pop("reconstructions")
    # Rows alternate originals and reconstructions; one held-out image per class, 8 a row.
    picks = torch.arange(0, len(images), args.eval_per_class)[:32]
    pairs = torch.stack([images[picks], recon[picks]]).reshape(2, -1, 8, *images.shape[1:])
    grid = partial(
        save_image_grid,
        pairs.transpose(0, 1).reshape(-1, *images.shape[1:]),
        columns=8,
        row_labels=["original", "reconstruction"] * (len(picks) // 8),
        title=f"held-out images and their reconstructions (MSE {result['recon_mse']:.4f}, "
        f"{result['fraction_codes_used']:.0%} of codes used)",
    )
    metrics = {
        **{f"heldout_{k}": v for k, v in result.items()},
        "codebook_size": cfg.codebook_size,
        "grid": cfg.grid,
        "eval_images": len(images),
    }
    return Evaluation(
        metrics=metrics,
        headline=tuple(k for k in metrics if k.startswith("heldout_")),
        title="VQ-VAE reconstruction MSE (train batches)",
        plots={"reconstructions.png": grid},
    )


RECIPE = Recipe(
    name="vqvae",
    help="train a VQ-VAE image tokeniser on the shapes world",
    family=vqvae.FAMILY,
    defaults=Defaults(steps=1000, batch_size=64, lr=2e-3, weight_decay=1e-4, warmup=30),
    prepare=prepare,
    evaluate=evaluate,
    extra_arguments=_arguments,
)
