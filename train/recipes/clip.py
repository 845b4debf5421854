"""Train a tiny CLIP on the built-in shapes world, then evaluate it zero-shot.

``python -m train clip --out runs/clip`` trains ``clip_tiny`` contrastively on captioned
scenes and ranks the 48 "a <colour> <shape>" classes for held-out images, including colour
x shape combinations it never saw. Besides the files of every run (see
:mod:`train.loop.run`) it writes ``tokenizer.json`` and ``zero_shot.png`` (accuracy per
class). Every flag of the loop applies: ``torchrun --nproc_per_node 2 -m train clip --dist
fsdp --ac --steps 20 --out runs/clip_fsdp`` (docs/scale.md).

``--data PATH`` trains on a user's image-caption pairs instead (any format of
:mod:`train.data.formats`, the flags of :mod:`train.data.flags`): a byte-level BPE trained
on its captions, random resized crops in the loader's workers (:mod:`train.data.pipeline`),
bad samples skipped and counted (``skipped_samples`` in ``metrics.json``).

``--val-data PATH`` (pairs) and ``--zeroshot-data DIR`` (an ImageFolder) add image<->text
recall and zero-shot on your own data (:mod:`train.recipes.evaluate`), every
``--eval-every N`` steps into ``metrics.jsonl`` and at the end into ``metrics.json``; with
``--zeroshot-data`` its zero-shot replaces the shapes world's (``zero_shot.png`` too).

``--modality video`` trains CLIP with a video tower on moving-shapes clips instead and
evaluates it zero-shot over every caption of that world (:mod:`train.recipes.clip_video`);
the run judges ``python -m train videogpt --judge RUN``'s clips.

``--init-from FILE --format open_clip|hf|torchmultimodal --vocab BPE_FILE`` fine-tunes
converted weights instead (on the shapes world or ``--data``, at the checkpoint's image size
and mean/std), ``--lock-image`` / ``--lock-text`` freeze a tower (LiT), and ``--export
open_clip|hf`` writes the trained weights back in that layout under ``RUN/export/``
(:mod:`train.finetune`).
"""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial

import torch

from models import clip
from train.data import WordTokenizer, WorldConfig, is_holdout, sample_scenes
from train.data.flags import add_data_arguments, loader_source, open_data
from train.data.pipeline import Captions, Samples, training_captions
from train.data.tokenizers import BPETokenizer
from train.evaluate import zero_shot_accuracy
from train.finetune import add_finetune_arguments, finetune_job, pretrained_from, with_export
from train.loop import Defaults, Evaluation, Job, Recipe, SeededSource
from train.plots import plot_class_accuracy
from train.recipes import number
from train.recipes.clip_video import add_video_arguments, evaluate_video, prepare_video
from train.recipes.evaluate import add_evaluation_arguments, with_user_evaluation, with_user_figures

IMAGE_MEAN, IMAGE_STD = 0.5, 0.25


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """Centre shapes-world pixels ``[B, 3, H, W]`` in ``[0, 1]`` to roughly unit scale."""
    return (images - IMAGE_MEAN) / IMAGE_STD


def captioned_scenes(world, tokenizer, context: int, generator, batch_size: int) -> dict:
    """A batch of training scenes: ``images [B, 3, H, W]`` normalised, ``tokens [B, context]``."""
    scenes = sample_scenes(world, batch_size, generator=generator)
    return {
        "images": normalize_images(scenes.images),
        "tokens": tokenizer.encode(scenes.captions, context),
    }


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--eval-per-class",
        type=number(at_least=1),
        default=20,
        help="held-out images per colour x shape class (default: %(default)s)",
    )
    add_video_arguments(parser)
    add_data_arguments(parser)
    add_finetune_arguments(parser)
    add_evaluation_arguments(parser)


def data_job(args: argparse.Namespace, table) -> Job:
    """``clip_tiny`` from scratch on ``--data`` (a pairs table): a BPE tokenizer trained on
    its captions, crops at the model's image size, the shapes world's mean/std."""
    tokenizer = BPETokenizer.train(training_captions(table), vocab_size=args.vocab_size)
    cfg = clip.clip_tiny(vocab_size=tokenizer.vocab_size)
    mean, std = (IMAGE_MEAN,) * 3, (IMAGE_STD,) * 3
    text = Captions(tokenizer, cfg.context_length)
    samples = Samples(table, text, size=cfg.image_size, mean=mean, std=std, seed=args.seed)
    return Job(
        cfg=cfg,
        source=loader_source(args, samples),
        config={"data": str(args.data), "image_mean": list(mean), "image_std": list(std)},
        files={"tokenizer.json": tokenizer.to_json()},
        describe=f"clip_tiny on {args.data} ({len(table):,} samples, BPE of "
        f"{tokenizer.vocab_size:,} ids)",
        context=(WorldConfig(), tokenizer),
    )


def prepare(args: argparse.Namespace, device: torch.device) -> Job:
    if args.modality == "video":
        return prepare_video(args)
    pretrained = pretrained_from(args)  # --init-from: fine-tune converted weights
    table = open_data(args, wants="pairs", recipe="clip")
    if pretrained is not None:
        return finetune_job(args, pretrained, table)
    if table is not None:
        return data_job(args, table)
    world = WorldConfig()
    tokenizer = WordTokenizer.for_world(world)
    cfg = clip.clip_tiny(vocab_size=tokenizer.vocab_size)
    draw = partial(captioned_scenes, world, tokenizer, cfg.context_length)
    return Job(
        cfg=cfg,
        source=SeededSource(draw, batch_size=args.batch_size, seed=args.seed),
        config={"world": dataclasses.asdict(world)},
        files={"tokenizer.json": tokenizer.to_json()},
        describe="clip_tiny",
        context=(world, tokenizer),
    )


def evaluate(job: Job, params, model_state, args: argparse.Namespace, device) -> Evaluation:
    if args.modality == "video":
        return evaluate_video(job, params, args, device)
    world, tokenizer, *fine = job.context  # a fine-tuning job brings its image inputs
    scene_inputs = fine[0] if fine else normalize_images
    cfg = job.cfg
    acc = zero_shot_accuracy(
        world,
        lambda images: clip.encode_image(params, scene_inputs(images.to(device)), cfg=cfg),
        lambda texts: clip.encode_text(
            params, tokenizer.encode(texts, cfg.context_length).to(device), cfg=cfg
        ),
        n_per_class=args.eval_per_class,
        seed=args.seed + 1,
    )
    hits = acc["predictions"] == acc["labels"]
    per_class = partial(
        plot_class_accuracy, hits, acc["labels"], list(world.colors), list(world.shapes),
        unseen=is_holdout(world, acc["labels"]),
        title=f"zero-shot accuracy per class on held-out images (top-1 {acc['top1']:.3f})",
    )  # fmt: skip
    return Evaluation(
        metrics={
            "zero_shot_top1": acc["top1"],
            "zero_shot_top1_seen_combos": acc["top1_seen"],
            "zero_shot_top1_unseen_combos": acc["top1_unseen"],
            "zero_shot_classes": acc["classes"],
            "eval_images": acc["images"],
        },
        headline=("zero_shot_top1", "zero_shot_top1_unseen_combos", "final_loss", "train_seconds"),
        title=f"CLIP on shapes world: zero-shot top-1 {acc['top1']:.3f}",
        plots={"zero_shot.png": per_class},
    )


RECIPE = Recipe(
    name="clip",
    help="train a tiny CLIP on the built-in shapes world and evaluate it zero-shot",
    family=clip.FAMILY,
    defaults=Defaults(
        steps=600, batch_size=128, lr=1e-3, weight_decay=0.1, warmup=50, min_batch_size=2
    ),
    prepare=with_user_evaluation(prepare, clip.FAMILY),
    evaluate=with_export(with_user_figures(evaluate)),
    extra_arguments=_arguments,
)
