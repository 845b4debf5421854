"""CLIP's video tower on the moving-shapes world: ``python -m train clip --modality video``.

``clip_video_tiny`` (:func:`models.clip.clip_video_tiny`: space-time attention over tubes of
2 frames x 8 x 8 pixels) learns clips against their captions ("a red circle moves left then
stops") and is evaluated zero-shot on held-out clips: each clip ranks every caption the
world can say (:func:`world_captions`), split into motion x shape pairs seen in training
and the held-out ones. ``zero_shot.png`` shows clips with the caption that ranked first.
The run then judges ``python -m train videogpt --judge RUN``'s drawn clips
(:func:`train.recipes.generate.clip_judge`).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from functools import partial

import torch

from models import clip
from train.data import WordTokenizer
from train.data.video_shapes import (
    VideoWorldConfig,
    _clip_captions,
    clip_eval_set,
    is_holdout_motion,
    sample_clips,
    vocabulary,
)
from train.loop import Evaluation, Job, SeededSource
from train.plots_generation import save_image_grid
from train.recipes import number
from train.recipes.generate import caption_judge, consistency

# Flags of image runs that a video run has no use for: refused by name, not ignored.
_IMAGE_ONLY = ("data", "init_from", "val_data", "zeroshot_data", "export")


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    """``--modality``, and the clip size and evaluation flags of ``--modality video``."""
    add = parser.add_argument
    add("--modality", choices=("image", "video"), default="image",
        help="image: captioned scenes; video: captioned moving-shapes clips, CLIP with a "
        "video tower (default: %(default)s)")  # fmt: skip
    add("--frames", type=number(at_least=2), default=8,
        help="--modality video: frames per clip, a multiple of 2 (default: %(default)s)")  # fmt: skip
    add("--video-size", type=number(at_least=16), default=32,
        help="--modality video: frame side in pixels, a multiple of 8 (default: %(default)s)")  # fmt: skip
    add("--eval-per-pair", type=number(at_least=1), default=8,
        help="--modality video: held-out clips per motion x shape pair (default: %(default)s)")  # fmt: skip


def world_captions(world: VideoWorldConfig) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Every caption a clip of ``world`` can have, and per caption its ``color``, ``shape``,
    ``motion``, ``stop`` and ``target`` (the colour a "turns" clip ends in) ``[K]`` each.

    Example: ``captions, attrs = world_captions(VideoWorldConfig())`` (1248 captions).
    """
    n_colors, rows = len(world.colors), []
    for c, s, m, stop in itertools.product(
        range(n_colors), range(len(world.shapes)), range(len(world.motions)), (False, True)
    ):
        recolor = world.motions[m] == "recolor"
        rows += [(c, s, m, stop, t) for t in range(n_colors) if (t != c) == recolor]
    columns = torch.tensor(rows).T
    attrs = dict(zip(("color", "shape", "motion", "stop", "target"), columns))
    attrs["stop"] = attrs["stop"].bool()
    captions = _clip_captions(
        world, attrs["color"], attrs["shape"], attrs["motion"], attrs["stop"], attrs["target"]
    )
    return captions, attrs


def captioned_clips(world, tokenizer, context: int, generator, batch_size: int) -> dict:
    """A batch of training clips, ``images [B, 3, T, H, W]`` normalised as CLIP's scenes,
    and ``tokens [B, context]``."""
    from train.recipes.clip import normalize_images

    clips = sample_clips(world, batch_size, generator=generator)
    return {
        "images": normalize_images(clips.videos),
        "tokens": tokenizer.encode(clips.captions, context),
    }


def prepare_video(args: argparse.Namespace) -> Job:
    """``clip_video_tiny`` at ``--frames`` x ``--video-size``² on the moving-shapes world."""
    given = [f"--{k.replace('_', '-')}" for k in _IMAGE_ONLY if getattr(args, k, None)]
    if given:
        raise SystemExit(f"{given[0]} is for image runs: drop it or --modality video")
    world = VideoWorldConfig(image_size=args.video_size, frames=args.frames)
    tokenizer = WordTokenizer(vocabulary(world))
    cfg = dataclasses.replace(
        clip.clip_video_tiny(vocab_size=tokenizer.vocab_size),
        frames=args.frames, image_size=args.video_size,
    )  # fmt: skip
    draw = partial(captioned_clips, world, tokenizer, cfg.context_length)
    return Job(
        cfg=cfg,
        source=SeededSource(draw, batch_size=args.batch_size, seed=args.seed),
        config={"world": dataclasses.asdict(world), "modality": "video"},
        files={"tokenizer.json": tokenizer.to_json()},
        describe=f"clip_video_tiny ({cfg.image_tower.seq - 1} tubes of {args.frames} frames)",
        context=("video", world, tokenizer),
    )


def _share(hits: torch.Tensor) -> float:
    return round(hits.float().mean().item(), 4)


def evaluate_video(job: Job, params, args: argparse.Namespace, device) -> Evaluation:
    """Zero-shot over :func:`world_captions` on held-out clips (every motion x shape pair
    ``--eval-per-pair`` times): the whole caption, and its motion (with "then stops")."""
    _, world, tokenizer = job.context
    clips = clip_eval_set(world, args.eval_per_pair, seed=args.seed + 1)
    captions, attrs = world_captions(world)
    judge = caption_judge(params, job.cfg, tokenizer, captions, device=device)
    picked = judge(clips.videos)
    index = {c: i for i, c in enumerate(captions)}
    own = torch.tensor([index[c] for c in clips.captions])
    unseen = is_holdout_motion(world, clips.motions, clips.shapes)
    whole = consistency(picked == own, unseen)
    motion = (attrs["motion"][picked] == clips.motions) & (attrs["stop"][picked] == clips.stops)
    shape = attrs["shape"][picked] == clips.shapes
    metrics = {
        "zero_shot_top1": _share(picked == own),
        "zero_shot_top1_seen_combos": whole["consistency"],
        "zero_shot_top1_unseen_combos": whole["consistency_unseen_combos"],
        "zero_shot_motion_top1_seen_combos": _share(motion[~unseen]),
        "zero_shot_motion_top1_unseen_combos": _share(motion[unseen]),
        "zero_shot_shape_top1_unseen_combos": _share(shape[unseen]),
        "zero_shot_captions": len(captions),
        "eval_clips": len(clips.videos),
    }
    # One clip per motion, each of another shape (clips are in motion-major pair order).
    n_shapes, motions = len(world.shapes), torch.arange(len(world.motions))
    picks = (motions * n_shapes + motions % n_shapes) * args.eval_per_pair
    strips = partial(
        save_image_grid, clips.videos[picks].transpose(1, 2).flatten(0, 1), columns=world.frames,
        row_labels=[captions[i][:40] for i in picked[picks].tolist()],
        title=f"held-out clips, each with the caption CLIP ranks first (top-1 "
        f"{metrics['zero_shot_top1']:.3f} of {len(captions)})",
    )  # fmt: skip
    return Evaluation(
        metrics=metrics,
        headline=(
            "zero_shot_top1_seen_combos", "zero_shot_top1_unseen_combos",
            "zero_shot_motion_top1_unseen_combos", "final_loss", "train_seconds",
        ),
        title=f"video CLIP on moving shapes: zero-shot top-1 {metrics['zero_shot_top1']:.3f}",
        plots={"zero_shot.png": strips},
    )  # fmt: skip
