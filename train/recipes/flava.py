"""Pretrain a tiny FLAVA on the built-in shapes world with all its tasks at once:
contrastive, MLM, MIM, ITM and the two MMM losses, then evaluate on held-out images.

``python -m train flava --out runs/flava`` writes ``metrics.json``, ``losses.png`` (one
curve per task, one plot), ``params.safetensors``, ``config.json`` and ``tokenizer.json``.
MIM targets come from a fixed random codebook over FLAVA's 8 x 8 pixel patches by default,
or from a trained VQ-VAE with ``--vqvae runs/vqvae4`` (``python -m train vqvae --preset
vqvae_shapes_4x4 --out runs/vqvae4``: its 4 x 4 codes match FLAVA's 4 x 4 patches).

Evaluation on held-out data: zero-shot top-1 over every colour x shape class (including
combinations never seen in training), image->text R@1 among the captions of a batch of
held-out scenes, and every task's loss and accuracy on held-out scenes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

import fmm
from models import flava, vqvae
from train import checkpoint, optim
from train.data import WordTokenizer, WorldConfig, sample_scenes, scene_stream
from train.evaluate import zero_shot_accuracy
from train.plots import plot_loss
from train.recipes import (
    add_device_arguments,
    device_of,
    number,
    out_dir,
    run_dir,
    wants_compile,
)
from train.recipes.clip import normalize_images
from train.step import init_state, make_train_step

CONTEXT = 16
RANDOM_CODES = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=out_dir, default=None, help="run directory (default: runs/flava-<time>)"
    )
    parser.add_argument(
        "--steps",
        type=number(at_least=1),
        default=2500,
        help="optimizer steps (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=number(at_least=2),
        default=48,
        help="image-caption pairs per step (default: %(default)s)",
    )
    parser.add_argument(
        "--lr",
        type=number(float, above=0),
        default=1e-3,
        help="peak AdamW learning rate (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=number(at_least=0),
        default=30,
        help="linear warmup steps (default: %(default)s)",
    )
    parser.add_argument(
        "--weight-decay",
        type=number(float, at_least=0),
        default=0.05,
        help="AdamW weight decay (default: %(default)s)",
    )
    parser.add_argument(
        "--text-mask-rate",
        type=number(float, above=0, below=1),
        default=0.3,
        help="share of caption words masked for MLM/MMM (default: %(default)s)",
    )
    parser.add_argument(
        "--patch-mask-rate",
        type=number(float, above=0, below=1),
        default=0.4,
        help="share of patches masked for MIM/MMM (default: %(default)s)",
    )
    parser.add_argument(
        "--vqvae",
        type=Path,
        default=None,
        help="run directory of `python -m train vqvae` whose codes are the MIM targets "
        "(4 x 4 codes, e.g. --preset vqvae_shapes_4x4; default: a fixed random codebook)",
    )
    parser.add_argument(
        "--seed",
        type=number(at_least=0),
        default=0,
        help="seed for init, masks and data (default: %(default)s)",
    )
    add_device_arguments(parser)
    parser.add_argument(
        "--eval-per-class",
        type=number(at_least=1),
        default=20,
        help="held-out images per colour x shape class for zero-shot (default: %(default)s)",
    )
    parser.add_argument(
        "--eval-scenes",
        type=number(at_least=1),
        default=256,
        help="held-out scenes for retrieval and the per-task held-out losses (default: %(default)s)",
    )


def image_tokenizer(args: argparse.Namespace, cfg: flava.FLAVAConfig, device):
    """``(tokenize, codebook size, description)``: the MIM target function for this run."""
    if args.vqvae is None:
        key = fmm.random.fold_in(fmm.random.key(args.seed), "codebook")
        tok = flava.random_codebook_tokenizer(
            key.to(device), patch_size=cfg.patch_size, codebook_size=RANDOM_CODES
        )
        return tok, RANDOM_CODES, f"random codebook ({RANDOM_CODES} codes)"
    from train.recipes.vqvae import load_run  # only needed with --vqvae

    vq_cfg, vq_params = load_run(args.vqvae)
    if vq_cfg.grid != cfg.grid or vq_cfg.image_size != cfg.image_size:
        raise SystemExit(
            f"--vqvae {args.vqvae}: its {vq_cfg.grid}x{vq_cfg.grid} codes of "
            f"{vq_cfg.image_size} px images do not match FLAVA's {cfg.grid}x{cfg.grid} patches"
        )
    vq_params = fmm.tree.map(lambda x: x.to(device), vq_params)
    tok = partial(vqvae.encode, vq_params, cfg=vq_cfg)
    return tok, vq_cfg.codebook_size, f"VQ-VAE {args.vqvae} ({vq_cfg.codebook_size} codes)"


def _batch(scenes, tokenizer: WordTokenizer, device) -> dict[str, torch.Tensor]:
    return {
        "images": normalize_images(scenes.images).to(device),
        "tokenizer_images": scenes.images.to(device),
        "tokens": tokenizer.encode(scenes.captions, CONTEXT).to(device),
    }


def retrieval_r1(params, cfg, scenes, tokenizer: WordTokenizer, device) -> float:
    """Image->text R@1 over held-out scenes: the top caption among all the scenes' captions
    is a hit if it is the image's own caption text (several scenes may share one)."""
    tokens = tokenizer.encode(scenes.captions, CONTEXT).to(device)
    img = flava.embed_image(params, normalize_images(scenes.images).to(device), cfg=cfg)
    txt = flava.embed_text(params, tokens, cfg=cfg)
    best = (img @ txt.T).argmax(-1).cpu().tolist()
    hits = [scenes.captions[j] == scenes.captions[i] for i, j in enumerate(best)]
    return round(sum(hits) / len(hits), 4)


def run(args: argparse.Namespace) -> dict:
    """Pretrain, evaluate, save; returns the metrics dict also written to ``metrics.json``."""
    device = device_of(args)
    use_compile = wants_compile(args, device)

    world = WorldConfig()
    tokenizer = WordTokenizer.for_world(world)
    mask_id = tokenizer.vocab_size  # one extra id past the shapes-world words: [MASK]
    cfg = flava.flava_tiny(vocab_size=tokenizer.vocab_size + 1, max_positions=CONTEXT)
    tokenize_image, codes, tok_desc = image_tokenizer(args, cfg, device)
    out = run_dir(args, "flava")  # after --vqvae loaded: a wrong one leaves no empty run
    cfg = dataclasses.replace(cfg, image_vocab_size=codes)
    pcfg = flava.PretrainConfig(
        mask_id=mask_id,
        special_ids=(tokenizer.pad_id, tokenizer.unk_id, tokenizer.sot_id, tokenizer.eot_id),
        text_mask_rate=args.text_mask_rate,
        patch_mask_rate=args.patch_mask_rate,
    )
    key = fmm.random.key(args.seed)
    params = flava.init(cfg, fmm.random.fold_in(key, "init"))
    params = fmm.tree.map(lambda x: x.to(device), params)
    schedule = optim.cosine_schedule(
        args.lr, total_steps=args.steps, warmup_steps=min(args.warmup, args.steps)
    )
    optimizer = optim.chain(
        optim.clip_by_global_norm(1.0), optim.adamw(schedule, weight_decay=args.weight_decay)
    )
    state = init_state(params, optimizer, key=fmm.random.fold_in(key, "masks"))
    loss_fn = partial(flava.pretraining_loss, cfg=cfg, pcfg=pcfg, image_tokenizer=tokenize_image)
    step = make_train_step(loss_fn, optimizer, compile=use_compile)
    print(
        f"flava_tiny: {fmm.tree.count(params):,} params | {args.steps} steps x {args.batch_size} "
        f"pairs | MIM targets: {tok_desc} | {device} | compile={'on' if use_compile else 'off'} "
        f"| out={out}"
    )

    stream = scene_stream(world, args.batch_size, seed=args.seed)
    curves: dict[str, list[float]] = {t: [] for t in flava.TASKS}
    totals: list[float] = []
    started = time.perf_counter()
    with tqdm(range(args.steps), desc="pretrain flava", unit="step", dynamic_ncols=True) as bar:
        for i in bar:
            state, metrics = step(state, _batch(next(stream), tokenizer, device))
            for t in flava.TASKS:
                curves[t].append(float(metrics[t]))
            totals.append(float(metrics["loss"]))
            if i % 10 == 0 or i == args.steps - 1:
                bar.set_postfix(
                    loss=f"{totals[-1]:.2f}",
                    itm_acc=f"{float(metrics['itm_acc']):.2f}",
                    mlm_acc=f"{float(metrics['mlm_acc']):.2f}",
                )
    train_seconds = time.perf_counter() - started

    params = state["params"]
    with torch.no_grad():
        zs = zero_shot_accuracy(
            world,
            lambda images: flava.embed_image(params, normalize_images(images).to(device), cfg=cfg),
            lambda texts: flava.embed_text(
                params, tokenizer.encode(texts, CONTEXT).to(device), cfg=cfg
            ),
            n_per_class=args.eval_per_class,
            seed=args.seed + 1,
        )
        g = torch.Generator().manual_seed(args.seed + 2)
        held_out = sample_scenes(world, args.eval_scenes, generator=g, split="eval")
        r1 = retrieval_r1(params, cfg, held_out, tokenizer, device)
        _, held = loss_fn(
            params, _batch(held_out, tokenizer, device), fmm.random.key(args.seed + 3), train=False
        )

    tail = lambda values: round(sum(values[-50:]) / len(values[-50:]), 4)
    metrics = {
        "final_loss": tail(totals),
        "final_task_losses": {t: tail(curves[t]) for t in flava.TASKS},
        "held_out_task_losses": {t: round(float(held[t]), 4) for t in flava.TASKS},
        "held_out_mlm_acc": round(float(held["mlm_acc"]), 4),
        "held_out_mim_acc": round(float(held["mim_acc"]), 4),
        "held_out_itm_acc": round(float(held["itm_acc"]), 4),
        "image_to_text_r1": r1,
        "retrieval_scenes": args.eval_scenes,
        "zero_shot_top1": zs["top1"],
        "zero_shot_top1_seen_combos": zs["top1_seen"],
        "zero_shot_top1_unseen_combos": zs["top1_unseen"],
        "eval_images": zs["images"],
        "mim_targets": tok_desc,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train_seconds": round(train_seconds, 2),
        "compiled": use_compile,
        "device": str(device),
    }
    checkpoint.save(
        out,
        params,
        config={
            "model": "flava",
            "flava": cfg.to_dict(),
            "pretrain": dataclasses.asdict(pcfg),
            "world": dataclasses.asdict(world),
            "context_length": CONTEXT,
            "seed": args.seed,
        },
        files={checkpoint.TOKENIZER_FILE: tokenizer.to_json(), checkpoint.METRICS_FILE: metrics},
    )
    plot_loss(
        curves,
        out / "losses.png",
        title=f"FLAVA on the shapes world: per-task losses (image->text R@1 {r1:.3f})",
    )
    print(
        json.dumps(
            {
                k: metrics[k]
                for k in (
                    "final_task_losses",
                    "image_to_text_r1",
                    "zero_shot_top1",
                    "held_out_itm_acc",
                    "train_seconds",
                )
            }
        )
    )
    print(f"wrote {out}/: metrics.json losses.png params.safetensors config.json tokenizer.json")
    return metrics


def load_run(run_dir: str | Path) -> tuple[flava.FLAVAConfig, dict, WordTokenizer]:
    """``(cfg, params, tokenizer)`` of a run saved by :func:`run`, checked key by key."""
    run = checkpoint.open_run(run_dir)
    cfg = flava.FLAVAConfig(**run.config()["flava"])
    params = run.params(like=flava.init(cfg, fmm.random.key(0).to("meta")))
    return cfg, params, WordTokenizer.from_json(run.text(checkpoint.TOKENIZER_FILE))
