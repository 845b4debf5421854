"""Train the multimodal GPT caption -> image on the shapes world, tokenising images with a
trained VQ-VAE; optionally score its drawings with a trained CLIP.

``python -m train mmgpt --vqvae runs/vqvae --clip runs/clip --out runs/mmgpt`` writes
``metrics.json``, ``loss.png``, ``samples.png``, ``params.safetensors``, ``vqvae.safetensors``
(the tokeniser, so the run draws on its own), ``config.json`` and ``tokenizer.json``.
Then ``python -m train generate --ckpt runs/mmgpt --prompt "a red circle"``.
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
from models import mmgpt, vqvae
from train import checkpoint, optim
from train.data import WordTokenizer, WorldConfig, class_names, eval_set, is_holdout, scene_stream
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
from train.recipes import vqvae as vqvae_recipe
from train.recipes.generate import GUIDANCE, VQVAE_FILE, clip_classifier, draw
from train.step import init_state, make_train_step

TEXT_LEN = 16  # <sot> + the longest shapes-world caption (12 words) + <eot>, with room


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vqvae", type=Path, required=True, help="run directory of `python -m train vqvae`"
    )
    parser.add_argument(
        "--clip", type=Path, default=None, help="a `python -m train clip` run to score drawings"
    )
    parser.add_argument(
        "--out", type=out_dir, default=None, help="run directory (default: runs/mmgpt-<time>)"
    )
    parser.add_argument(
        "--steps",
        type=number(at_least=1),
        default=900,
        help="optimizer steps (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=number(at_least=1),
        default=64,
        help="caption-image pairs per step (default: %(default)s)",
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
        "--width",
        type=number(at_least=1),
        default=128,
        help="transformer width (default: %(default)s)",
    )
    parser.add_argument(
        "--layers",
        type=number(at_least=1),
        default=4,
        help="transformer blocks (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=number(at_least=0),
        default=0,
        help="seed for init, data and sampling (default: %(default)s)",
    )
    parser.add_argument(
        "--caption-dropout",
        type=number(float, at_least=0, below=1),
        default=0.1,
        help="share of training captions replaced by the empty caption, which teaches the "
        "unconditional model classifier-free guidance needs (default: %(default)s)",
    )
    parser.add_argument(
        "--guidance",
        type=number(float, at_least=0),
        default=GUIDANCE,
        help="classifier-free guidance scale for the scored drawings; 1 is plain sampling "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--eval-per-class",
        type=number(at_least=1),
        default=4,
        help="drawings per colour x shape class for the CLIP score (default: %(default)s)",
    )
    parser.add_argument(
        "--temperature",
        type=number(float, at_least=0),
        default=1.0,
        help="sampling temperature (default: %(default)s)",
    )
    parser.add_argument(
        "--top-k",
        type=number(at_least=1),
        default=None,
        help="sample among the k likeliest codes (default: all)",
    )
    add_device_arguments(parser)


def score(classify, world: WorldConfig, run: dict, args, device) -> dict:
    """Draw ``--eval-per-class`` images for "a <colour> <shape>" of every class and count how
    often CLIP's top-1 class is the prompt's; also CLIP on VQ-VAE reconstructions (the ceiling)."""
    names = class_names(world)
    labels = torch.arange(len(names)).repeat_interleave(args.eval_per_class)
    prompts = [f"a {names[i]}" for i in labels.tolist()]
    images = torch.cat(
        [
            draw(
                run,
                prompts[i : i + 128],
                key=fmm.random.fold_in(fmm.random.key(args.seed), i),
                temperature=args.temperature,
                top_k=args.top_k,
                guidance=args.guidance,
            ).cpu()
            for i in range(0, len(prompts), 128)
        ]
    )
    hits = classify(images) == labels
    unseen = is_holdout(world, labels)
    real, real_labels = eval_set(world, 2, seed=args.seed + 1)
    with torch.no_grad():
        recon = vqvae.apply(run["vqvae_params"], real.to(device), cfg=run["vqvae_cfg"])
    ceiling = (classify(recon["reconstruction"].clamp(0, 1).cpu()) == real_labels).float().mean()
    return {
        "consistency": round(hits[~unseen].float().mean().item(), 4),
        "consistency_unseen_combos": round(hits[unseen].float().mean().item(), 4),
        "clip_on_vqvae_reconstructions": round(ceiling.item(), 4),
        "scored_images": len(labels),
        "images": images,
        "labels": labels,
    }


def run(args: argparse.Namespace) -> dict:
    """Train, save, score; returns the metrics written to ``metrics.json``."""
    device = device_of(args)
    use_compile = wants_compile(args, device)
    vq_cfg, vq_params = vqvae_recipe.load_run(args.vqvae)
    if args.clip is not None:  # scored after training: a wrong --clip must stop us now
        checkpoint.load_config(args.clip)
    out = run_dir(args, "mmgpt")  # after --vqvae loaded: a wrong one leaves no empty run
    vq_params = fmm.tree.map(lambda x: x.to(device), vq_params)
    world = WorldConfig()
    tokenizer = WordTokenizer.for_world(world)
    cfg = dataclasses.replace(
        mmgpt.mmgpt_shapes(
            text_vocab=tokenizer.vocab_size,
            text_len=TEXT_LEN,
            image_vocab=vq_cfg.codebook_size,
            image_len=vq_cfg.grid**2,
        ),
        width=args.width,
        layers=args.layers,
    )
    key = fmm.random.key(args.seed)
    params = mmgpt.init(cfg, fmm.random.fold_in(key, "init"))
    params = fmm.tree.map(lambda x: x.to(device), params)
    schedule = optim.cosine_schedule(
        args.lr, total_steps=args.steps, warmup_steps=min(args.warmup, args.steps)
    )
    optimizer = optim.chain(
        optim.clip_by_global_norm(1.0), optim.adamw(schedule, weight_decay=0.01)
    )
    state = init_state(params, optimizer, key=fmm.random.fold_in(key, "dropout"))
    step = make_train_step(
        lambda p, b, k: mmgpt.loss(p, b, cfg=cfg, key=k), optimizer, compile=use_compile
    )
    print(
        f"mmgpt: {fmm.tree.count(params):,} params | {cfg.text_len} text + {cfg.image_len} image "
        f"tokens | {args.steps} steps x {args.batch_size} pairs | {device} | out={out}"
    )

    stream = scene_stream(world, args.batch_size, seed=args.seed)
    drop = torch.Generator().manual_seed(args.seed + 1)
    losses: list[float] = []
    started = time.perf_counter()
    with tqdm(range(args.steps), desc="train mmgpt", unit="step", dynamic_ncols=True) as bar:
        for i in bar:
            scenes = next(stream)
            with torch.no_grad():
                codes = vqvae.encode(vq_params, scenes.images.to(device), cfg=vq_cfg)
            captions = [
                "" if u < args.caption_dropout else c
                for u, c in zip(
                    torch.rand(len(scenes.captions), generator=drop).tolist(), scenes.captions
                )
            ]
            batch = {
                "text": tokenizer.encode(captions, cfg.text_len).to(device),
                "codes": codes.reshape(len(codes), -1),
            }
            state, metrics = step(state, batch)
            losses.append(float(metrics["image_nll"]))
            if i % 10 == 0 or i == args.steps - 1:
                bar.set_postfix(
                    nll=f"{losses[-1]:.3f}", acc=f"{float(metrics['image_accuracy']):.3f}"
                )
    train_seconds = time.perf_counter() - started

    params = state["params"]
    tail = losses[-min(20, len(losses)) :]
    metrics = {
        "final_image_nll": sum(tail) / len(tail),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train_seconds": round(train_seconds, 2),
        "device": str(device),
    }
    loaded = {
        "cfg": cfg,
        "params": params,
        "vqvae_cfg": vq_cfg,
        "vqvae_params": vq_params,
        "tokenizer": tokenizer,
    }
    if args.clip is not None:
        started = time.perf_counter()
        result = score(
            clip_classifier(args.clip, world, device=device), world, loaded, args, device
        )
        images = result.pop("images")
        del result["labels"]
        metrics.update(result, score_seconds=round(time.perf_counter() - started, 2))
        # One drawing of each class, eight classes (one colour) per row.
        first = images[:: args.eval_per_class]
        title = f"one drawing per caption 'a <colour> <shape>' (CLIP agrees on {result['consistency']:.0%})"
    else:
        names = class_names(world)
        first = draw(
            loaded, [f"a {n}" for n in names], key=fmm.random.key(args.seed), guidance=args.guidance
        ).cpu()
        title = "one drawing per caption 'a <colour> <shape>'"
    checkpoint.save(
        out,
        params,
        config={
            "model": "mmgpt",
            "mmgpt": cfg.to_dict(),
            "vqvae": vq_cfg.to_dict(),
            "vqvae_run": str(args.vqvae),
            "world": dataclasses.asdict(world),
            "seed": args.seed,
        },
        files={
            VQVAE_FILE: vq_params,
            checkpoint.TOKENIZER_FILE: tokenizer.to_json(),
            checkpoint.METRICS_FILE: metrics,
        },
    )
    save_image_grid(
        first, out / "samples.png", columns=len(world.shapes), row_labels=list(world.colors),
        column_labels=list(world.shapes),
        title=title,
    )  # fmt: skip
    plot_loss(losses, out / "loss.png", title="multimodal GPT: image-token NLL (caption -> image)")
    print(json.dumps(metrics))
    print(f"wrote {out}/: metrics.json loss.png samples.png params.safetensors vqvae.safetensors")
    return metrics
