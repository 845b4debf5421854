"""Train the multimodal GPT caption -> image on the shapes world, tokenising images with a
trained VQ-VAE; optionally score its drawings with a trained CLIP.

``python -m train mmgpt --vqvae runs/vqvae --clip runs/clip --out runs/mmgpt`` writes the
files of every run, ``samples.png``, ``tokenizer.json`` and ``vqvae.safetensors`` (the
tokeniser, so the run draws on its own). Then ``python -m train generate --ckpt runs/mmgpt
--prompt "a red circle"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from functools import partial
from pathlib import Path

import torch

import fmm
from models import mmgpt, vqvae
from train.data import WordTokenizer, WorldConfig, class_names, eval_set, is_holdout, sample_scenes
from train.loop import Defaults, Evaluation, Job, Recipe, SeededSource, load_run
from train.plots_generation import save_image_grid
from train.recipes import number
from train.recipes.generate import GUIDANCE, VQVAE_FILE, clip_classifier, consistency, draw

TEXT_LEN = 16  # <sot> + the longest shapes-world caption (12 words) + <eot>, with room


def _arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--vqvae", type=Path, required=True, help="run directory of `python -m train vqvae`")
    add("--clip", type=Path, default=None, help="a `python -m train clip` run to score drawings")
    add("--width", type=number(at_least=1), default=128,
        help="transformer width (default: %(default)s)")  # fmt: skip
    add("--layers", type=number(at_least=1), default=4,
        help="transformer blocks (default: %(default)s)")  # fmt: skip
    add("--caption-dropout", type=number(float, at_least=0, below=1), default=0.1,
        help="share of training captions replaced by the empty caption, which teaches the "
        "unconditional model classifier-free guidance needs (default: %(default)s)")  # fmt: skip
    add("--guidance", type=number(float, at_least=0), default=GUIDANCE,
        help="classifier-free guidance scale for the scored drawings; 1 is plain sampling "
        "(default: %(default)s)")  # fmt: skip
    add("--eval-per-class", type=number(at_least=1), default=4,
        help="drawings per colour x shape class for the CLIP score (default: %(default)s)")  # fmt: skip
    add("--temperature", type=number(float, at_least=0), default=1.0,
        help="sampling temperature (default: %(default)s)")  # fmt: skip
    add("--top-k", type=number(at_least=1), default=None,
        help="sample among the k likeliest codes (default: all)")  # fmt: skip


def captions_and_codes(world, tokenizer, vq, caption_dropout: float, generator, batch_size: int):
    """A batch of ``text [B, TEXT_LEN]`` caption ids (a ``caption_dropout`` share of them
    the empty caption) and ``codes [B, grid * grid]``, the scenes' VQ-VAE codes."""
    vq_params, vq_cfg = vq
    scenes = sample_scenes(world, batch_size, generator=generator)
    dropped = torch.rand(batch_size, generator=generator) < caption_dropout
    captions = ["" if d else c for d, c in zip(dropped.tolist(), scenes.captions)]
    with torch.no_grad():
        codes = vqvae.encode(vq_params, scenes.images, cfg=vq_cfg)
    return {"text": tokenizer.encode(captions, TEXT_LEN), "codes": codes.reshape(batch_size, -1)}


def prepare(args: argparse.Namespace, device: torch.device) -> Job:
    tokeniser = load_run(args.vqvae, family="vqvae")
    if args.clip is not None:  # scored after training: a wrong --clip must stop us now
        load_run(args.clip, family="clip")
    world = WorldConfig()
    tokenizer = WordTokenizer.for_world(world)
    vq_cfg = tokeniser.cfg
    cfg = dataclasses.replace(
        mmgpt.mmgpt_shapes(
            text_vocab=tokenizer.vocab_size, text_len=TEXT_LEN,
            image_vocab=vq_cfg.codebook_size, image_len=vq_cfg.grid**2,
        ),
        width=args.width, layers=args.layers,
    )  # fmt: skip
    vq = (tokeniser.params, vq_cfg)
    draw_batch = partial(captions_and_codes, world, tokenizer, vq, args.caption_dropout)
    return Job(
        cfg=cfg,
        source=SeededSource(draw_batch, batch_size=args.batch_size, seed=args.seed),
        config={
            "vqvae": vq_cfg.to_dict(),
            "vqvae_run": str(args.vqvae),
            "world": dataclasses.asdict(world),
        },
        files={"tokenizer.json": tokenizer.to_json(), VQVAE_FILE: tokeniser.params},
        curves=("image_nll",),
        describe=f"mmgpt ({cfg.text_len} text + {cfg.image_len} image tokens)",
        context=(world, tokenizer, vq),
    )


def score(classify, world: WorldConfig, kit: dict, args, device) -> dict:
    """Draw ``--eval-per-class`` images for "a <colour> <shape>" of every class and count how
    often CLIP's top-1 class is the prompt's; also CLIP on VQ-VAE reconstructions (the ceiling)."""
    names = class_names(world)
    labels = torch.arange(len(names)).repeat_interleave(args.eval_per_class)
    prompts = [f"a {names[i]}" for i in labels.tolist()]
    images = torch.cat([
        draw(kit, prompts[i : i + 128], key=fmm.random.fold_in(fmm.random.key(args.seed), i),
             temperature=args.temperature, top_k=args.top_k, guidance=args.guidance).cpu()
        for i in range(0, len(prompts), 128)
    ])  # fmt: skip
    hits = classify(images) == labels
    real, real_labels = eval_set(world, 2, seed=args.seed + 1)
    recon = vqvae.apply(kit["vqvae_params"], real.to(device), cfg=kit["vqvae_cfg"])
    ceiling = (classify(recon["reconstruction"].clamp(0, 1).cpu()) == real_labels).float().mean()
    return {
        **consistency(hits, is_holdout(world, labels)),
        "clip_on_vqvae_reconstructions": round(ceiling.item(), 4),
        "scored_images": len(labels),
        "images": images,
    }


def evaluate(job: Job, params, model_state, args: argparse.Namespace, device) -> Evaluation:
    world, tokenizer, (vq_params, vq_cfg) = job.context
    kit = {
        "cfg": job.cfg, "params": params, "tokenizer": tokenizer, "vqvae_cfg": vq_cfg,
        "vqvae_params": fmm.tree.map(lambda x: x.to(device), vq_params),
    }  # fmt: skip
    metrics: dict = {}
    if args.clip is not None:
        started = time.perf_counter()
        result = score(clip_classifier(args.clip, world, device=device), world, kit, args, device)
        images = result.pop("images")
        metrics.update(result, score_seconds=round(time.perf_counter() - started, 2))
        first = images[:: args.eval_per_class]  # one drawing of each class
        title = f"one drawing per caption 'a <colour> <shape>' (CLIP agrees on {result['consistency']:.0%})"
    else:
        prompts = [f"a {n}" for n in class_names(world)]
        first = draw(kit, prompts, key=fmm.random.key(args.seed), guidance=args.guidance).cpu()
        title = "one drawing per caption 'a <colour> <shape>'"
    # Eight classes (one colour) per row.
    samples = partial(
        save_image_grid, first, columns=len(world.shapes), row_labels=list(world.colors),
        column_labels=list(world.shapes), title=title,
    )  # fmt: skip
    return Evaluation(
        metrics=metrics,
        headline=(*metrics, "final_loss", "train_seconds"),
        title="multimodal GPT: image-token NLL (caption -> image)",
        plots={"samples.png": samples},
    )


RECIPE = Recipe(
    name="mmgpt",
    help="train a multimodal GPT caption -> image on VQ-VAE tokens of the shapes world",
    family=mmgpt.FAMILY,
    defaults=Defaults(steps=900, batch_size=64, lr=2e-3, weight_decay=0.01, warmup=30),
    prepare=prepare,
    evaluate=evaluate,
    extra_arguments=_arguments,
)
