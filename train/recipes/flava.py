"""Pretrain a tiny FLAVA on the built-in shapes world with all its tasks at once:
contrastive, MLM, MIM, ITM and the two MMM losses, then evaluate on held-out images.

``python -m train flava --out runs/flava`` writes the files of every run (``loss.png`` has
one curve per task) and ``tokenizer.json``. MIM targets (the batch's ``image_codes``) come
from a fixed random codebook over FLAVA's 8 x 8 pixel patches by default, or from a trained
VQ-VAE with ``--vqvae runs/vqvae4`` (``python -m train vqvae --preset vqvae_shapes_4x4
--out runs/vqvae4``: its 4 x 4 codes match FLAVA's 4 x 4 patches); the data pipeline
computes them, so the loss stays a pure function of params, batch and key.

Evaluation on held-out data: zero-shot top-1 over every colour x shape class (including
combinations never seen in training), image->text R@1 among the captions of a batch of
held-out scenes, and every task's loss and accuracy on held-out scenes.

``--data PATH`` pretrains on a user's image-caption pairs instead (:mod:`train.data.flags`):
a BPE tokenizer trained on its captions, the loader's crops, MIM targets from the same image
tokenizer computed on every batch.
"""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial
from pathlib import Path

import torch

import fmm
from models import flava, vqvae
from train.data import WordTokenizer, WorldConfig, sample_scenes
from train.data.flags import add_data_arguments, loader_source, open_data
from train.data.pipeline import Captions, Samples, training_captions
from train.data.tokenizers import BPETokenizer
from train.evaluate import zero_shot_accuracy
from train.loop import Defaults, Evaluation, Job, Recipe, SeededSource, load_run
from train.recipes import number
from train.recipes.clip import IMAGE_MEAN, IMAGE_STD, normalize_images
from train.recipes.evaluate import add_evaluation_arguments, with_user_evaluation, with_user_figures

CONTEXT = 16
RANDOM_CODES = 64


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_evaluation_arguments(parser)
    parser.add_argument(
        "--text-mask-rate", type=number(float, above=0, below=1), default=0.3,
        help="share of caption words masked for MLM/MMM (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--patch-mask-rate", type=number(float, above=0, below=1), default=0.4,
        help="share of patches masked for MIM/MMM (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--vqvae", type=Path, default=None,
        help="run directory of `python -m train vqvae` whose codes are the MIM targets "
        "(4 x 4 codes, e.g. --preset vqvae_shapes_4x4; default: a fixed random codebook)",
    )  # fmt: skip
    parser.add_argument(
        "--eval-per-class", type=number(at_least=1), default=20,
        help="held-out images per colour x shape class for zero-shot (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--eval-scenes", type=number(at_least=1), default=256,
        help="held-out scenes for retrieval and the per-task held-out losses "
        "(default: %(default)s)",
    )  # fmt: skip
    add_data_arguments(parser)


def image_tokenizer(args: argparse.Namespace, grid: int, image_size: int):
    """``(tokenize, codebook size, description)``: the MIM targets of this run, ``tokenize:
    pixels [B, 3, H, W] in [0, 1] -> codes [B, grid, grid]`` (on the CPU, in the data)."""
    if args.vqvae is None:
        key = fmm.random.fold_in(fmm.random.key(args.seed), "codebook")
        patch = image_size // grid
        tok = flava.random_codebook_tokenizer(key, patch_size=patch, codebook_size=RANDOM_CODES)
        return tok, RANDOM_CODES, f"random codebook ({RANDOM_CODES} codes)"
    run = load_run(args.vqvae, family="vqvae")
    if run.cfg.grid != grid or run.cfg.image_size != image_size:
        raise SystemExit(
            f"--vqvae {args.vqvae}: its {run.cfg.grid}x{run.cfg.grid} codes of "
            f"{run.cfg.image_size} px images do not match FLAVA's {grid}x{grid} patches"
        )
    tok = partial(vqvae.encode, run.params, cfg=run.cfg)
    return tok, run.cfg.codebook_size, f"VQ-VAE {args.vqvae} ({run.cfg.codebook_size} codes)"


def _batch(scenes, tokenizer: WordTokenizer, tokenize_image) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        codes = tokenize_image(scenes.images)
    return {
        "images": normalize_images(scenes.images),
        "tokens": tokenizer.encode(scenes.captions, CONTEXT),
        "image_codes": codes,
    }


def pretraining_scenes(world, tokenizer, tokenize_image, generator, batch_size: int) -> dict:
    """A batch of training scenes with their MIM targets (:func:`models.flava.batch_fields`)."""
    scenes = sample_scenes(world, batch_size, generator=generator)
    return _batch(scenes, tokenizer, tokenize_image)


def _with_codes(tokenize_image, batch: dict) -> dict:
    # The loader's images are normalised; the image tokenizer reads pixels in [0, 1].
    with torch.no_grad():
        codes = tokenize_image(batch["images"] * IMAGE_STD + IMAGE_MEAN)
    return {**batch, "image_codes": codes}


def data_source(args: argparse.Namespace, table, tokenizer, tokenize_image, cfg):
    """The loop's source over ``--data`` (a pairs table): crops at FLAVA's image size, a
    caption each, and the MIM targets of every batch computed in this process."""
    mean, std = (IMAGE_MEAN,) * 3, (IMAGE_STD,) * 3
    text = Captions(tokenizer, CONTEXT)
    samples = Samples(table, text, size=cfg.image_size, mean=mean, std=std, seed=args.seed)
    return loader_source(args, samples, finish=partial(_with_codes, tokenize_image))


def prepare(args: argparse.Namespace, device: torch.device) -> Job:
    world = WorldConfig()
    table = open_data(args, wants="pairs", recipe="flava")
    if table is None:
        tokenizer = WordTokenizer.for_world(world)
        specials = (tokenizer.pad_id, tokenizer.unk_id, tokenizer.sot_id, tokenizer.eot_id)
    else:
        tokenizer = BPETokenizer.train(training_captions(table), vocab_size=args.vocab_size)
        specials = (tokenizer.pad_id, tokenizer.sot_id, tokenizer.eot_id)
    mask_id = tokenizer.vocab_size  # one extra id past the tokenizer's: [MASK]
    shape = flava.flava_tiny()
    tokenize_image, codes, described = image_tokenizer(args, shape.grid, shape.image_size)
    pretrain = flava.PretrainConfig(
        mask_id=mask_id,
        special_ids=specials,
        text_mask_rate=args.text_mask_rate,
        patch_mask_rate=args.patch_mask_rate,
    )
    cfg = flava.flava_tiny(
        vocab_size=mask_id + 1, max_positions=CONTEXT, image_vocab_size=codes, pretrain=pretrain
    )
    draw = partial(pretraining_scenes, world, tokenizer, tokenize_image)
    config = {"world": dataclasses.asdict(world), "context_length": CONTEXT}
    if table is None:
        source = SeededSource(draw, batch_size=args.batch_size, seed=args.seed)
    else:
        source = data_source(args, table, tokenizer, tokenize_image, cfg)
        config |= {"data": str(args.data), "image_mean": [IMAGE_MEAN] * 3,
                   "image_std": [IMAGE_STD] * 3}  # fmt: skip
    return Job(
        cfg=cfg,
        source=source,
        config={**config, "mim_targets": described},
        files={"tokenizer.json": tokenizer.to_json()},
        curves=flava.TASKS,
        describe=f"flava_tiny, MIM targets: {described}",
        context=(world, tokenizer, tokenize_image, described),
    )


def retrieval_r1(params, cfg, scenes, tokenizer: WordTokenizer, device) -> float:
    """Image->text R@1 over held-out scenes: the top caption among all the scenes' captions
    is a hit if it is the image's own caption text (several scenes may share one)."""
    tokens = tokenizer.encode(scenes.captions, CONTEXT).to(device)
    img = flava.embed_image(params, normalize_images(scenes.images).to(device), cfg=cfg)
    txt = flava.embed_text(params, tokens, cfg=cfg)
    best = (img @ txt.T).argmax(-1).cpu().tolist()
    hits = [scenes.captions[j] == scenes.captions[i] for i, j in enumerate(best)]
    return round(sum(hits) / len(hits), 4)


def evaluate(job: Job, params, model_state, args: argparse.Namespace, device) -> Evaluation:
    world, tokenizer, tokenize_image, described = job.context
    cfg = job.cfg
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
    batch = {k: v.to(device) for k, v in _batch(held_out, tokenizer, tokenize_image).items()}
    _, held = flava.loss(params, batch, cfg=cfg, key=fmm.random.key(args.seed + 3), train=False)
    return Evaluation(
        metrics={
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
            "mim_targets": described,
        },
        headline=(
            "image_to_text_r1",
            "zero_shot_top1",
            "held_out_itm_acc",
            "final_loss",
            "train_seconds",
        ),
        title=f"FLAVA on the shapes world: per-task losses (image->text R@1 {r1:.3f})",
    )


RECIPE = Recipe(
    name="flava",
    help="pretrain a tiny FLAVA on the shapes world: contrastive, MLM, MIM, ITM and MMM at once",
    family=flava.FAMILY,
    defaults=Defaults(
        steps=2500, batch_size=48, lr=1e-3, weight_decay=0.05, warmup=30, min_batch_size=2
    ),
    prepare=with_user_evaluation(prepare, flava.FAMILY),
    evaluate=with_user_figures(evaluate),
    extra_arguments=_arguments,
)
