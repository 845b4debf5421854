"""Train a tiny CoCa on the shapes world: captions and zero-shot from one model.

``python -m train coca --out runs/coca`` trains ``coca_tiny`` (the world's word vocabulary)
with CoCa's contrastive + captioning loss on captioned scenes, colour x shape combinations
held out of training as for ``python -m train clip``. Evaluation on held-out single-object
scenes (every combination, never-seen ones included):

- greedy captions through :func:`models.coca.generate_captions` (fmm's KV cache): the
  caption's first colour and first shape word against the scene's, as
  ``caption_colour_shape_exact`` / ``caption_colour`` / ``caption_shape``, each with
  ``_seen`` / ``_unseen`` (the same figures as ``python -m train blip2``);
- zero-shot top-1 over the 48 class names with the same model's contrastive embeddings
  (:func:`train.evaluate.zero_shot_accuracy`, as the clip recipe ranks them);
- with ``--judge RUN`` (a ``python -m train clip`` run): ``consistency`` /
  ``consistency_unseen_combos``, how often that CLIP's zero-shot class of the image is the
  colour and shape the caption names (:func:`train.recipes.generate.caption_judge`).

Besides the files of every run it writes ``tokenizer.json`` and ``captions.png`` (sample
scenes with their generated captions).
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from functools import partial
from pathlib import Path

import torch

from models import coca
from train.data import (
    WordTokenizer,
    WorldConfig,
    class_names,
    is_holdout,
    prompt_templates,
    sample_scenes,
)
from train.evaluate import zero_shot_accuracy
from train.evaluate_data import embedder_for
from train.loop import Defaults, Evaluation, Job, Recipe, SeededSource, load_run
from train.plots_generation import save_image_grid
from train.recipes import number
from train.recipes.clip import captioned_scenes, normalize_images
from train.recipes.generate import (
    caption_judge,
    consistency,
    first_word,
    prompt_classes,
    split_rates,
)

SAMPLES = 8  # scenes in captions.png and in metrics.json's "samples"


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--eval-scenes", type=number(at_least=1), default=480,
        help="held-out single-object scenes to caption (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--eval-per-class", type=number(at_least=1), default=20,
        help="zero-shot images per colour x shape class (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--judge", type=Path, default=None,
        help="a `python -m train clip` run that judges the captions' consistency with the "
        "images (default: no judge)",
    )  # fmt: skip


def _judge(path: Path | None, world: WorldConfig):
    """The ``--judge`` run's zero-shot class of images ``[N, 3, H, W] -> [N]``; a run that is
    not an image CLIP of this world is refused by name."""
    if path is None:
        return None
    try:
        run = load_run(path, family="clip")
    except (ValueError, OSError) as e:
        raise ValueError(f"--judge {path}: {e}") from None
    if run.cfg.frames is not None or run.cfg.image_size != world.image_size:
        raise ValueError(f"--judge {path}: not an image CLIP of the shapes world's images")
    if "data" in run.config:
        raise ValueError(f"--judge {path}: trained on --data, not the shapes world")
    names = class_names(world)
    return caption_judge(run.params, run.cfg, run.tokenizer, names, templates=prompt_templates())


def prepare(args: argparse.Namespace, device: torch.device) -> Job:
    world = WorldConfig()
    tokenizer = WordTokenizer.for_world(world)
    judge = _judge(args.judge, world)  # before a directory exists
    cfg = coca.coca_tiny(vocab_size=tokenizer.vocab_size)
    draw = partial(captioned_scenes, world, tokenizer, cfg.context_length)
    return Job(
        cfg=cfg,
        source=SeededSource(draw, batch_size=args.batch_size, seed=args.seed),
        config={"world": dataclasses.asdict(world)},
        files={"tokenizer.json": tokenizer.to_json()},
        curves=("loss", "contrastive", "caption"),
        describe="coca_tiny",
        context=(world, tokenizer, judge),
    )


def caption_scores(params, cfg, world, tokenizer, *, n: int, seed: int, device, judge=None):
    """Greedy captions of ``n`` held-out single-object scenes: colour / shape exact-match
    rates (seen and never-seen combinations), the judge's consistency if one is given,
    and the first :data:`SAMPLES` scenes with their captions."""
    scenes = sample_scenes(world, n, generator=torch.Generator().manual_seed(seed), split="eval")
    labels = scenes.colors * len(world.shapes) + scenes.shapes
    unseen = is_holdout(world, labels)
    captions = []
    for images in scenes.images.split(256):
        out = coca.generate_captions(
            params, normalize_images(images).to(device), cfg=cfg, sot_id=tokenizer.sot_id,
            eos_id=tokenizer.eot_id, max_new_tokens=cfg.context_length - 2,
        )  # fmt: skip
        captions += tokenizer.decode(out.tokens.cpu())

    def matches(names: tuple[str, ...], truth: torch.Tensor) -> torch.Tensor:
        said = [first_word(c.split(), names) for c in captions]
        return torch.tensor([w == names[t] for w, t in zip(said, truth.tolist())])

    colour_ok, shape_ok = matches(world.colors, scenes.colors), matches(world.shapes, scenes.shapes)
    result = {
        **split_rates(colour_ok & shape_ok, unseen, "caption_colour_shape_exact"),
        **split_rates(colour_ok, unseen, "caption_colour"),
        **split_rates(shape_ok, unseen, "caption_shape"),
        "eval_scenes": n,
        "eval_unseen_scenes": int(unseen.sum()),
    }
    if judge is not None:
        # A caption naming no class (or two) never agrees with the judge.
        named = torch.tensor([(prompt_classes(c, world) or [-1])[0] for c in captions])
        result.update(consistency(judge(scenes.images) == named, unseen))
    result["samples"] = captions[:SAMPLES]
    return result, scenes.images[:SAMPLES]


def evaluate(job: Job, params, model_state, args: argparse.Namespace, device) -> Evaluation:
    world, tokenizer, judge = job.context
    cfg = job.cfg
    result, images = caption_scores(
        params, cfg, world, tokenizer, n=args.eval_scenes, seed=args.seed + 1, device=device,
        judge=judge,
    )  # fmt: skip
    embed = embedder_for(coca.FAMILY, params, cfg, tokenizer, transform=normalize_images,
                         device=device)  # fmt: skip
    acc = zero_shot_accuracy(
        world, lambda x: embed.images(normalize_images(x)), embed.texts,
        n_per_class=args.eval_per_class, seed=args.seed + 1,
    )  # fmt: skip
    plot = partial(
        save_image_grid, images, columns=1,
        # The plot's margin holds about 35 characters a line.
        row_labels=[textwrap.fill(c, 30) for c in result["samples"]],
        title=f"greedy captions of held-out scenes\n(colour+shape exact "
        f"{result['caption_colour_shape_exact']:.2f})",
    )  # fmt: skip
    return Evaluation(
        metrics={
            **result,
            "zero_shot_top1": acc["top1"],
            "zero_shot_top1_seen_combos": acc["top1_seen"],
            "zero_shot_top1_unseen_combos": acc["top1_unseen"],
            "zero_shot_classes": len(class_names(world)),
        },
        headline=(
            "caption_colour_shape_exact",
            "caption_colour_shape_exact_unseen",
            "zero_shot_top1",
            "final_loss",
            "train_seconds",
        ),
        title=f"CoCa on shapes world: caption exact {result['caption_colour_shape_exact']:.3f}, "
        f"zero-shot top-1 {acc['top1']:.3f}",
        plots={"captions.png": plot},
    )


RECIPE = Recipe(
    name="coca",
    help="train a tiny CoCa on the shapes world: held-out captions and zero-shot",
    family=coca.FAMILY,
    defaults=Defaults(
        steps=3000, batch_size=128, lr=1e-3, weight_decay=0.1, warmup=50, min_batch_size=2
    ),
    prepare=prepare,
    evaluate=evaluate,
    extra_arguments=_arguments,
)
