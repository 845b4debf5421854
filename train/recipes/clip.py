"""Train a tiny CLIP on the built-in shapes world, then evaluate it zero-shot.

``python -m train clip --out runs/clip`` writes ``metrics.json``, ``loss.png``,
``params.safetensors``, ``config.json`` and ``tokenizer.json`` into ``--out``.
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
from models import clip
from train import checkpoint, optim
from train.data import WordTokenizer, WorldConfig, is_holdout, scene_stream
from train.evaluate import zero_shot_accuracy
from train.plots import plot_class_accuracy, plot_loss
from train.step import init_state, make_train_step

IMAGE_MEAN, IMAGE_STD = 0.5, 0.25


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """Centre shapes-world pixels ``[B, 3, H, W]`` in ``[0, 1]`` to roughly unit scale."""
    return (images - IMAGE_MEAN) / IMAGE_STD


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=None, help="run directory (default: runs/clip-<time>)"
    )
    parser.add_argument(
        "--steps", type=int, default=600, help="optimizer steps (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="image-caption pairs per step (default: %(default)s)",
    )
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=0.1,
        help="AdamW decoupled weight decay (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=50,
        help="linear warmup steps before the cosine decay (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for init and the data stream (default: %(default)s)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the train step (default: on with CUDA, off on CPU, where it gains ~nothing)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--eval-per-class",
        type=int,
        default=20,
        help="held-out images per colour x shape class (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> dict:
    """Train, evaluate, save; returns the metrics dict also written to ``metrics.json``."""
    if args.steps < 1 or args.batch_size < 2:
        raise SystemExit(
            f"--steps must be >= 1 and --batch-size >= 2, got {args.steps} and {args.batch_size}"
        )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    out = args.out or Path("runs") / time.strftime("clip-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    world = WorldConfig()
    tokenizer = WordTokenizer.for_world(world)
    cfg = clip.clip_tiny(vocab_size=tokenizer.vocab_size)
    key = fmm.random.key(args.seed)
    params = clip.init(cfg, fmm.random.fold_in(key, "init"), dtype=torch.float32)
    params = fmm.tree.map(lambda x: x.to(device), params)
    schedule = optim.cosine_schedule(
        args.lr, total_steps=args.steps, warmup_steps=min(args.warmup, args.steps)
    )
    optimizer = optim.chain(
        optim.clip_by_global_norm(1.0), optim.adamw(schedule, weight_decay=args.weight_decay)
    )
    state = init_state(params, optimizer, key=fmm.random.fold_in(key, "dropout"))
    step = make_train_step(lambda p, b, k: clip.loss(p, b, cfg=cfg), optimizer, compile=use_compile)
    print(
        f"clip_tiny: {fmm.tree.count(params):,} params | {args.steps} steps x {args.batch_size} pairs "
        f"| {device} | compile={'on' if use_compile else 'off'} | out={out}"
    )

    stream = scene_stream(world, args.batch_size, seed=args.seed)
    losses: list[float] = []
    started = time.perf_counter()
    with tqdm(range(args.steps), desc="train clip", unit="step", dynamic_ncols=True) as bar:
        for i in bar:
            scenes = next(stream)
            batch = {
                "images": normalize_images(scenes.images).to(device),
                "tokens": tokenizer.encode(scenes.captions, cfg.context_length).to(device),
            }
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
            if i % 10 == 0 or i == args.steps - 1:
                seen = (i + 1) * args.batch_size
                bar.set_postfix(
                    loss=f"{losses[-1]:.3f}",
                    ex_per_s=f"{seen / (time.perf_counter() - started):.0f}",
                )
    train_seconds = time.perf_counter() - started

    params = state["params"]
    encode = lambda images: clip.encode_image(params, normalize_images(images).to(device), cfg=cfg)
    embed_text = lambda texts: clip.encode_text(
        params, tokenizer.encode(texts, cfg.context_length).to(device), cfg=cfg
    )
    with torch.no_grad():
        acc = zero_shot_accuracy(
            world, encode, embed_text, n_per_class=args.eval_per_class, seed=args.seed + 1
        )

    tail = losses[-min(50, len(losses)) :]
    metrics = {
        "zero_shot_top1": acc["top1"],
        "zero_shot_top1_seen_combos": acc["top1_seen"],
        "zero_shot_top1_unseen_combos": acc["top1_unseen"],
        "zero_shot_classes": acc["classes"],
        "eval_images": acc["images"],
        "final_loss": sum(tail) / len(tail),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train_seconds": round(train_seconds, 2),
        "examples_per_second": round(args.steps * args.batch_size / train_seconds, 1),
        "compiled": use_compile,
        "device": str(device),
    }
    checkpoint.save(
        out,
        params,
        config={
            "model": "clip",
            "clip": cfg.to_dict(),
            "world": dataclasses.asdict(world),
            "seed": args.seed,
        },
    )
    checkpoint.atomic_write(
        out / "tokenizer.json", lambda tmp: Path(tmp).write_text(tokenizer.to_json())
    )
    plot_loss(
        losses, out / "loss.png", title=f"CLIP on shapes world: zero-shot top-1 {acc['top1']:.3f}"
    )
    plot_class_accuracy(
        acc["predictions"] == acc["labels"],
        acc["labels"],
        list(world.colors),
        list(world.shapes),
        out / "zero_shot.png",
        unseen=is_holdout(world, acc["labels"]),
        title=f"zero-shot accuracy per class on held-out images (top-1 {acc['top1']:.3f})",
    )
    checkpoint.write_json(out / "metrics.json", metrics)
    print(
        json.dumps(
            {
                k: metrics[k]
                for k in (
                    "zero_shot_top1",
                    "zero_shot_top1_unseen_combos",
                    "final_loss",
                    "train_seconds",
                )
            }
        )
    )
    print(
        f"wrote {out}/: metrics.json loss.png zero_shot.png params.safetensors config.json tokenizer.json"
    )
    return metrics


def load_run(run_dir: str | Path) -> tuple[clip.CLIPConfig, dict, WordTokenizer]:
    """``(cfg, params, tokenizer)`` of a run saved by :func:`run`, checked key by key."""
    config = checkpoint.load_config(run_dir)
    cfg = clip.CLIPConfig(**config["clip"])
    like = clip.init(cfg, fmm.random.key(0).to("meta"))
    params = checkpoint.load_params(Path(run_dir) / checkpoint.PARAMS_FILE, like=like)
    tokenizer = WordTokenizer.from_json((Path(run_dir) / "tokenizer.json").read_text())
    return cfg, params, tokenizer
