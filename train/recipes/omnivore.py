"""Train one Omnivore encoder on images, videos and depth maps of the shapes world at once.

``python -m train omnivore --out runs/omnivore`` draws every step a batch of each modality:
still scenes (heads ``shape`` and ``color`` of the main object), moving-shape clips (head
``motion``: left / right / up / down / grow / shrink / turns) and RGB-D scenes (head
``nearest``: the shape of the object in front). It reports held-out accuracy per modality
(the still world's unseen colour x shape combinations and the clips' unseen motion x shape
pairs apart), and the shared encoder's transfer across modalities: the image heads read
videos (the moving object's shape and starting colour), and the depth head reads RGB alone.

``--drop-path P`` trains with stochastic depth (TorchMultimodal's Swin-T uses 0.2). Its
default is ``omnivore_shapes``' 0: at 0.1 the held-out figures moved within one seed's noise
(2000 steps, seed 0: nearest 0.801 -> 0.820, shape seen 0.676 -> 0.648, motion seen
0.993 -> 0.987, the rest equal; mean over the seven 0.790 -> 0.788), so it did not help.

``--data PATH`` trains Omnivore's video task on a user's labelled clips instead (a
video-csv/jsonl with a label column, or one sub-folder of clips per class:
:mod:`train.data.video_flags`): one head over the table's classes, clips of the moving
shapes' frames and size, and ``data_video_class_acc`` on ``--val-data`` (the same classes)
or on --data's first ``--eval-clips`` clips.
"""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial

import torch

import models
from models import omnivore
from train.data import WorldConfig, eval_set, is_holdout, sample_scenes
from train.data.pipeline import Labels
from train.data.video_flags import (
    add_video_data_arguments,
    eval_clips,
    open_video_data,
    video_source,
)
from train.data.video_shapes import (
    VideoWorldConfig,
    clip_eval_set,
    is_holdout_motion,
    sample_clips,
    sample_depth_scenes,
)
from train.loop import Defaults, Evaluation, Job, Recipe, SeededSource
from train.recipes import number

PRESETS = ("omnivore_shapes",)
DATA_HEAD = "video_class"  # the one head of a --data run


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", default="omnivore_shapes", choices=PRESETS,
        help="model size (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--drop-path", type=number(float, at_least=0, below=1),
        default=omnivore.omnivore_shapes().stochastic_depth,
        help="stochastic depth: the last block's drop-path rate, rising linearly from 0 "
        "over the blocks (TorchMultimodal's stochastic_depth_prob; default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--eval-per-class", type=number(at_least=1), default=4,
        help="held-out images per colour x shape class (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--eval-per-pair", type=number(at_least=1), default=4,
        help="held-out clips per motion x shape pair (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--eval-depth-scenes", type=number(at_least=1), default=256,
        help="held-out RGB-D scenes (default: %(default)s)",
    )  # fmt: skip
    add_video_data_arguments(parser)


@dataclasses.dataclass(frozen=True)
class Worlds:
    """The still world (images) and the world in time and depth (clips, RGB-D scenes)."""

    still: WorldConfig
    video: VideoWorldConfig


def heads(worlds: Worlds) -> tuple[tuple[str, int, str], ...]:
    """The four dataset heads, sized by the worlds' vocabularies."""
    still, video = worlds.still, worlds.video
    return (
        ("shape", len(still.shapes), "image"),
        ("color", len(still.colors), "image"),
        ("motion", len(video.motions), "video"),
        ("nearest", len(video.shapes), "rgbd"),
    )


def rgbd(scenes) -> torch.Tensor:
    """``[B, 4, H, W]``: a depth scene's RGB and its depth map as a fourth channel."""
    return torch.cat([scenes.images, scenes.depth], dim=1)


def joint_batch(worlds: Worlds, generator: torch.Generator, batch_size: int) -> dict:
    """One training batch of every modality, ``batch_size`` examples each."""
    scenes = sample_scenes(worlds.still, batch_size, generator=generator)
    clips = sample_clips(worlds.video, batch_size, generator=generator)
    depth = sample_depth_scenes(worlds.video, batch_size, generator=generator)
    return {
        "images": scenes.images,
        "shape_labels": scenes.shapes,
        "color_labels": scenes.colors,
        "videos": clips.videos,
        "motion_labels": clips.motions,
        "rgbd": rgbd(depth),
        "nearest_labels": depth.shapes,
    }


def data_job(args: argparse.Namespace, table) -> Job:
    """Omnivore's video task on ``--data``, a labelled video table: one head over its
    classes, clips at the moving shapes' size and frames."""
    if table.kind != "video-classes":
        raise ValueError(
            f"--data {args.data} has no labels: `python -m train omnivore` trains on labelled "
            "clips (a --video-label-key column, or one sub-folder of clips per class)"
        )
    if args.val_data is not None:
        val = open_video_data(args, recipe="omnivore", path=args.val_data)
        if getattr(val, "classes", None) != table.classes:
            raise ValueError(
                f"--val-data {args.val_data}: its classes {getattr(val, 'classes', ())} are not "
                f"--data's {table.classes}"
            )
    video = VideoWorldConfig()
    size, frames = video.image_size, video.frames
    heads = ((DATA_HEAD, len(table.classes), "video"),)
    cfg = models.get_config(
        args.preset, heads=heads, image_size=size, frames=frames, stochastic_depth=args.drop_path
    )
    fields = Labels(f"{DATA_HEAD}_labels")
    return Job(
        cfg=cfg,
        source=video_source(args, table, frames=frames, size=size, fields=fields),
        config={"preset": args.preset, "data": args.data, "classes": list(table.classes)},
        curves=(f"{DATA_HEAD}_loss",),
        describe=f"{args.preset} on {args.data} ({len(table):,} clips, "
        f"{len(table.classes)} classes)",
        context=table,
    )


def evaluate_data(job: Job, params, args: argparse.Namespace, device) -> Evaluation:
    """Accuracy of the ``--data`` run's head on ``--val-data`` or --data's first clips."""
    cfg = job.cfg
    clips = eval_clips(
        args, job.context, recipe="omnivore", frames=cfg.frames, size=cfg.image_size,
        fields=Labels("labels"),
    )  # fmt: skip
    pred = predict(params, cfg, clips["videos"], DATA_HEAD, device)
    metrics = {
        "data_video_class_acc": _accuracy(pred, clips["labels"]),
        "data_eval_clips": len(pred),
    }
    return Evaluation(
        metrics=metrics,
        headline=("data_video_class_acc",),
        title=f"Omnivore on {args.data}: video class loss",
    )


def prepare(args: argparse.Namespace, device: torch.device) -> Job:
    table = open_video_data(args, recipe="omnivore")
    if table is not None:
        return data_job(args, table)
    worlds = Worlds(still=WorldConfig(), video=VideoWorldConfig())
    size, frames = worlds.video.image_size, worlds.video.frames
    cfg = models.get_config(
        args.preset,
        heads=heads(worlds),
        image_size=size,
        frames=frames,
        stochastic_depth=args.drop_path,
    )
    return Job(
        cfg=cfg,
        source=SeededSource(
            partial(joint_batch, worlds), batch_size=args.batch_size, seed=args.seed
        ),
        config={
            "preset": args.preset,
            "world": dataclasses.asdict(worlds.still),
            "video_world": dataclasses.asdict(worlds.video),
        },
        curves=tuple(f"{name}_loss" for name, _, _ in cfg.heads),
        describe=f"{args.preset} (Swin-3D {cfg.dim}x{len(cfg.depths)} stages, 4 heads)",
        context=worlds,
    )


@torch.no_grad()
def predict(params, cfg, x: torch.Tensor, head: str, device, chunk: int = 128) -> torch.Tensor:
    """Class ids ``[N]`` of head ``head`` for inputs ``x`` ``[N, C, (T,) H, W]``."""
    out = [
        omnivore.classify(params, x[i : i + chunk].to(device), head, cfg=cfg).argmax(-1).cpu()
        for i in range(0, len(x), chunk)
    ]
    return torch.cat(out)


def _accuracy(pred: torch.Tensor, labels: torch.Tensor, where=None) -> float:
    hits = pred == labels
    if where is not None:
        hits = hits[where]
    return round(hits.float().mean().item(), 4) if hits.numel() else float("nan")


def held_out_metrics(params, cfg, worlds: Worlds, args, device) -> dict:
    """Held-out accuracy per modality, and the heads' transfer across modalities."""
    still, video = worlds.still, worlds.video
    images, labels = eval_set(still, args.eval_per_class, seed=args.seed + 1)
    shapes, colors = labels % len(still.shapes), labels // len(still.shapes)
    unseen = is_holdout(still, labels)
    shape_pred = predict(params, cfg, images, "shape", device)
    color_pred = predict(params, cfg, images, "color", device)
    clips = clip_eval_set(video, args.eval_per_pair, seed=args.seed + 2)
    unseen_pair = is_holdout_motion(video, clips.motions, clips.shapes)
    motion_pred = predict(params, cfg, clips.videos, "motion", device)
    g = torch.Generator().manual_seed(args.seed + 3)
    depth = sample_depth_scenes(video, args.eval_depth_scenes, generator=g, split="eval")
    nearest = predict(params, cfg, rgbd(depth), "nearest", device)
    # Transfer: the same encoder, another modality than the head was trained on.
    shape_on_video = predict(params, cfg, clips.videos, "shape", device)
    color_on_video = predict(params, cfg, clips.videos, "color", device)
    keeps_colour = clips.motions != video.motions.index("recolor")
    nearest_rgb_only = predict(params, cfg, depth.images, "nearest", device)
    return {
        "image_shape_acc_seen": _accuracy(shape_pred, shapes, ~unseen),
        "image_shape_acc_heldout": _accuracy(shape_pred, shapes, unseen),
        "image_color_acc_seen": _accuracy(color_pred, colors, ~unseen),
        "image_color_acc_heldout": _accuracy(color_pred, colors, unseen),
        "video_motion_acc_seen": _accuracy(motion_pred, clips.motions, ~unseen_pair),
        "video_motion_acc_heldout": _accuracy(motion_pred, clips.motions, unseen_pair),
        "rgbd_nearest_acc": _accuracy(nearest, depth.shapes),
        "transfer_image_shape_head_on_video": _accuracy(shape_on_video, clips.shapes),
        "transfer_image_color_head_on_video": _accuracy(color_on_video, clips.colors, keeps_colour),
        "transfer_rgbd_head_on_rgb_only": _accuracy(nearest_rgb_only, depth.shapes),
        "eval_images": len(images),
        "eval_clips": len(clips.videos),
        "eval_depth_scenes": len(depth.images),
    }


def evaluate(job: Job, params, model_state, args: argparse.Namespace, device) -> Evaluation:
    if args.data is not None:
        return evaluate_data(job, params, args, device)
    metrics = held_out_metrics(params, job.cfg, job.context, args, device)
    headline = tuple(k for k in metrics if "_acc" in k or k.startswith("transfer_"))
    return Evaluation(
        metrics=metrics,
        headline=headline,
        title="Omnivore: per-head training losses (one encoder, three modalities)",
    )


RECIPE = Recipe(
    name="omnivore",
    help="train one Swin-3D encoder on shapes-world images, videos and depth (Omnivore)",
    family=omnivore.FAMILY,
    defaults=Defaults(steps=2000, batch_size=32, lr=3e-3, weight_decay=0.05, warmup=30),
    prepare=prepare,
    evaluate=evaluate,
    extra_arguments=_arguments,
)
