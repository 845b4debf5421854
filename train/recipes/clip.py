"""Train a tiny CLIP on the built-in shapes world, then evaluate it zero-shot.

``python -m train clip --out runs/clip`` writes ``metrics.json``, ``loss.png``,
``params.safetensors``, ``config.json`` and ``tokenizer.json`` into ``--out``.

Scaling out (see docs/scale.md): ``torchrun --nproc_per_node 2 -m train clip --dist fsdp
--ac --steps 20 --out runs/clip_fsdp``. ``--dist``, ``--ac``, ``--precision bf16-mixed``,
``--checkpoint-every`` and ``--resume`` train through ``fmm.adapter`` and
``train.distributed`` (one process or many); without them the pure train step runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

import fmm
from fmm.adapter import ModelAdapter
from models import clip
from train import checkpoint, optim
from train import distributed as dist_
from train.data import WordTokenizer, WorldConfig, is_holdout, sample_scenes
from train.evaluate import zero_shot_accuracy
from train.plots import plot_class_accuracy, plot_loss
from train.recipes import (
    add_device_arguments,
    device_of,
    number,
    out_dir,
    run_dir,
    wants_compile,
)
from train.step import init_state, make_train_step

IMAGE_MEAN, IMAGE_STD = 0.5, 0.25


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """Centre shapes-world pixels ``[B, 3, H, W]`` in ``[0, 1]`` to roughly unit scale."""
    return (images - IMAGE_MEAN) / IMAGE_STD


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=out_dir, default=None, help="run directory (default: runs/clip-<time>)"
    )
    parser.add_argument(
        "--steps",
        type=number(at_least=1),
        default=600,
        help="optimizer steps (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size",
        type=number(at_least=2),
        default=128,
        help="image-caption pairs per step (default: %(default)s)",
    )
    parser.add_argument(
        "--lr",
        type=number(float, above=0),
        default=1e-3,
        help="peak AdamW learning rate (default: %(default)s)",
    )
    parser.add_argument(
        "--weight-decay",
        type=number(float, at_least=0),
        default=0.1,
        help="AdamW decoupled weight decay (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=number(at_least=0),
        default=50,
        help="linear warmup steps before the cosine decay (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=number(at_least=0),
        default=0,
        help="seed for init and the data stream (default: %(default)s)",
    )
    add_device_arguments(parser, compile_note=", where it gains ~nothing")
    parser.add_argument(
        "--dist",
        choices=dist_.MODES,
        default=None,
        help="data parallelism across torchrun processes: ddp, or fsdp (FSDP2, params sharded)",
    )
    parser.add_argument(
        "--ac", action="store_true", help="activation checkpointing per transformer block"
    )
    parser.add_argument(
        "--precision",
        choices=dist_.PRECISIONS,
        default="fp32",
        help="fp32, or bf16-mixed (bf16 compute, fp32 params and grad reduction)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=number(at_least=0),
        default=0,
        help="save a sharded checkpoint to OUT/checkpoints every N steps and at the end "
        "(default: off)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in OUT/checkpoints, bit for bit",
    )
    parser.add_argument(
        "--eval-per-class",
        type=number(at_least=1),
        default=20,
        help="held-out images per colour x shape class (default: %(default)s)",
    )


def _scaled(args: argparse.Namespace) -> bool:
    return bool(
        args.dist or args.ac or args.precision != "fp32" or args.checkpoint_every or args.resume
    )


def _batch(world, tokenizer, cfg, generator, batch_size, device, env=None) -> dict:
    # The whole global batch is drawn on every rank from the same generator, then each rank
    # keeps its rows: the data position is one generator state, and the global batch is
    # the one a single process would see.
    scenes = sample_scenes(world, batch_size, generator=generator)
    batch = {
        "images": normalize_images(scenes.images),
        "tokens": tokenizer.encode(scenes.captions, cfg.context_length),
    }
    if env is not None and env.world_size > 1:
        per = batch_size // env.world_size
        batch = {k: v[env.rank * per : (env.rank + 1) * per] for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def _progress(args, start: int, show: bool):
    return tqdm(
        range(start, args.steps),
        desc="train clip",
        unit="step",
        dynamic_ncols=True,
        initial=start,
        total=args.steps,
        disable=not show,
    )


def _train_pure(args, cfg, params, world, tokenizer, device, use_compile):
    schedule = optim.cosine_schedule(
        args.lr, total_steps=args.steps, warmup_steps=min(args.warmup, args.steps)
    )
    optimizer = optim.chain(
        optim.clip_by_global_norm(1.0), optim.adamw(schedule, weight_decay=args.weight_decay)
    )
    key = fmm.random.key(args.seed)
    state = init_state(params, optimizer, key=fmm.random.fold_in(key, "dropout"))
    step = make_train_step(lambda p, b, k: clip.loss(p, b, cfg=cfg), optimizer, compile=use_compile)
    generator = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    started = time.perf_counter()
    with _progress(args, 0, True) as bar:
        for i in bar:
            batch = _batch(world, tokenizer, cfg, generator, args.batch_size, device)
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
            if i % 10 == 0 or i == args.steps - 1:
                seen = (i + 1) * args.batch_size
                bar.set_postfix(
                    loss=f"{losses[-1]:.3f}",
                    ex_per_s=f"{seen / (time.perf_counter() - started):.0f}",
                )
    return state["params"], losses, time.perf_counter() - started, args.steps


def _train_scaled(args, cfg, params, world, tokenizer, env, out):
    """The module path: ``fmm.adapter`` + ``train.distributed``, with sharded checkpoints."""
    adapter = ModelAdapter(
        params,
        functools.partial(clip.loss, cfg=cfg, gather=dist_.all_gather_with_grad),
        checkpoint=args.ac,
    )
    mode = args.dist
    model = (
        dist_.wrap(adapter, mode, precision=args.precision, device=env.device) if mode else adapter
    )
    schedule = optim.cosine_schedule(
        args.lr, total_steps=args.steps, warmup_steps=min(args.warmup, args.steps)
    )
    optimizer = optim.adamw(schedule, weight_decay=args.weight_decay)
    step = dist_.make_step(
        model, adapter, optimizer, loss_call=lambda m, b, k: m(b), mode=mode,
        max_grad_norm=1.0, precision=args.precision, device=env.device,
    )  # fmt: skip
    local_params = fmm.tree.map(lambda p: dist_.local(p.detach()), adapter.tree())
    state = {
        "opt_state": optimizer.init(local_params),
        "step": torch.zeros((), dtype=torch.int64, device=env.device),
        "key": fmm.random.fold_in(fmm.random.key(args.seed), "dropout").to(env.device),
    }
    generator = torch.Generator().manual_seed(args.seed)
    ckpt_dir = out / "checkpoints"

    def saved_state():
        tree_ = fmm.tree.map(lambda p: p.detach(), adapter.tree())
        return {
            "params": tree_,
            "opt_state": dist_.shard_like(state["opt_state"], tree_),
            "step": state["step"],
            "key": state["key"],
            "data": {"generator": generator.get_state()},
        }

    losses: list[float] = []
    start = 0
    if args.resume:
        template = saved_state()
        try:
            start, extra = checkpoint.load_sharded(ckpt_dir, template)
        except checkpoint.CheckpointError as e:
            raise SystemExit(f"--resume: {e}") from e
        generator.set_state(template["data"]["generator"])
        losses = list(extra.get("losses", []))[:start]
        if env.is_main:
            print(f"resumed from {ckpt_dir} at step {start}")
    started = time.perf_counter()
    with _progress(args, start, env.is_main) as bar:
        for i in bar:
            batch = _batch(world, tokenizer, cfg, generator, args.batch_size, env.device, env)
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
            every = args.checkpoint_every
            if every and ((i + 1) % every == 0 or i == args.steps - 1):
                checkpoint.save_sharded(ckpt_dir, i + 1, saved_state(), extra={"losses": losses})
            if i % 10 == 0 or i == args.steps - 1:
                seen = (i + 1 - start) * args.batch_size
                bar.set_postfix(
                    loss=f"{losses[-1]:.3f}",
                    ex_per_s=f"{seen / (time.perf_counter() - started):.0f}",
                )
    train_seconds = time.perf_counter() - started
    return dist_.full_params(model), losses, train_seconds, args.steps - start


def run(args: argparse.Namespace) -> dict:
    """Train, evaluate, save; returns the metrics dict also written to ``metrics.json``."""
    scaled = _scaled(args)
    if scaled and args.compile:
        raise SystemExit(
            "--compile is for the single-process pure step; drop it with --dist, --ac, "
            "--precision bf16-mixed, --checkpoint-every or --resume"
        )
    if args.dist:
        try:
            env = dist_.setup(args.device)
        except RuntimeError as e:
            raise SystemExit(str(e)) from e
    else:
        dev = device_of(args)
        env = dist_.Env(0, 1, dev)
    device = env.device
    if args.batch_size % env.world_size:
        raise SystemExit(
            f"--batch-size {args.batch_size} does not split evenly over {env.world_size} ranks: "
            f"pass a multiple of {env.world_size}"
        )
    if (args.resume or args.dist) and args.out is None:
        raise SystemExit("--out is required with --dist or --resume (every rank must agree on it)")
    if args.resume:  # before building anything: a missing checkpoint is the common mistake
        try:
            found = checkpoint.latest_step(args.out / "checkpoints")
        except checkpoint.CheckpointError as e:
            raise SystemExit(f"--resume: {e}") from e
        if found is None:
            raise SystemExit(
                f"--resume: no completed checkpoint in {args.out / 'checkpoints'} "
                "(train with --checkpoint-every N first)"
            )
    use_compile = wants_compile(args, device) and not scaled
    out = run_dir(args, "clip")

    world = WorldConfig()
    tokenizer = WordTokenizer.for_world(world)
    cfg = clip.clip_tiny(vocab_size=tokenizer.vocab_size)
    key = fmm.random.key(args.seed)
    params = clip.init(cfg, fmm.random.fold_in(key, "init"), dtype=torch.float32)
    params = fmm.tree.map(lambda x: x.to(device), params)
    if env.is_main:
        how = f"dist={args.dist or 'none'} x{env.world_size} ac={'on' if args.ac else 'off'} "
        how += (
            f"precision={args.precision}" if scaled else f"compile={'on' if use_compile else 'off'}"
        )
        print(
            f"clip_tiny: {fmm.tree.count(params):,} params | {args.steps} steps x "
            f"{args.batch_size} pairs | {device} | {how} | out={out}"
        )
    if scaled:
        trained = _train_scaled(args, cfg, params, world, tokenizer, env, out)
    else:
        trained = _train_pure(args, cfg, params, world, tokenizer, device, use_compile)
    params, losses, train_seconds, steps_run = trained
    if not env.is_main:
        dist_.teardown()
        return {}
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
        "examples_per_second": round(steps_run * args.batch_size / train_seconds, 1),
        "compiled": use_compile,
        "device": str(device),
        "dist": args.dist,
        "world_size": env.world_size,
        "activation_checkpointing": args.ac,
        "precision": args.precision,
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
        files={
            checkpoint.TOKENIZER_FILE: tokenizer.to_json(),
            checkpoint.METRICS_FILE: metrics,
            "losses.json": losses,
        },
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
    if args.dist:
        dist_.teardown()
    return metrics


def load_run(run_dir: str | Path) -> tuple[clip.CLIPConfig, dict, WordTokenizer]:
    """``(cfg, params, tokenizer)`` of a run saved by :func:`run`, checked key by key."""
    run = checkpoint.open_run(run_dir)
    cfg = clip.CLIPConfig(**run.config()["clip"])
    params = run.params(like=clip.init(cfg, fmm.random.key(0).to("meta")))
    return cfg, params, WordTokenizer.from_json(run.text(checkpoint.TOKENIZER_FILE))
