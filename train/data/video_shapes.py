"""Shapes world in time and in depth: seeded clips of moving shapes, and RGB-D still scenes.

Clips (`sample_clips`, `clip_stream`, `clip_eval_set`): one object per clip that moves left /
right / up / down, grows, shrinks or turns another colour, over the whole clip or over its
first half ("... then stops"). Videos are [batch, 3, T, H, W] float32 in [0, 1], channels
first like TorchMultimodal's video models. Captions read "a red circle moves left then stops",
"a blue square grows", "a green bar turns white". Some motion x shape combinations
(`VideoWorldConfig.holdout`) never appear in the train split; `is_holdout_motion` finds them
in an eval set.

Depth scenes (`sample_depth_scenes`, `depth_stream`): two objects at different depths drawn
back to front, with a depth map [batch, 1, H, W] in [0, 1] (0 near, background 1) and the
nearest object's colour / shape, e.g. for Omnivore's RGB-D input
`torch.cat([s.images, s.depth], 1)[:, :, None]` -> [batch, 4, 1, H, W].

Everything is deterministic from a torch.Generator / seed and vectorised over batch x frames
(rendering reuses the still world's signed-distance silhouettes), so it is cheap on the fly:

    cfg = VideoWorldConfig(image_size=32, frames=8)
    clips = next(clip_stream(cfg, 16, seed=0))       # clips.videos [16, 3, 8, 32, 32]
    scenes = next(depth_stream(cfg, 16, seed=0))     # scenes.depth [16, 1, 32, 32]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from train.data.shapes import (
    _COLOR_JITTER,
    _DEFAULT_COLORS,
    _NOISE,
    COLOR_RGB,
    WorldConfig,
    _check_names,
    _shape_alpha,
    _uniform,
)

# Motion name -> caption phrase ("turns" takes the target colour).
MOTIONS: dict[str, str] = {
    "left": "moves left",
    "right": "moves right",
    "up": "moves up",
    "down": "moves down",
    "grow": "grows",
    "shrink": "shrinks",
    "recolor": "turns",
}
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_TRAVEL = 0.4  # distance a moving object covers, as a fraction of the canvas side
_RADIUS = 0.15  # base radius (fraction of the canvas side) of moving / recoloured objects
_SCALE_RANGE = (0.1, 0.22)  # radius at the small and large end of grow / shrink
_EXTENT = 1.1  # largest per-axis silhouette extent, in radii (as in the still world)
_DEPTH_GAP = 0.2  # least depth difference between the two objects of a depth scene


@dataclass(frozen=True, kw_only=True)
class VideoWorldConfig:
    """Clips of `frames` frames at image_size^2; holdout: (motion, shape) pairs kept out of train.

    Example: `VideoWorldConfig(frames=8, holdout=(("left", "circle"),))`.
    """

    image_size: int = 32
    frames: int = 8
    colors: tuple[str, ...] = _DEFAULT_COLORS
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "bar")
    motions: tuple[str, ...] = tuple(MOTIONS)
    holdout: tuple[tuple[str, str], ...] = (
        ("left", "triangle"),
        ("up", "cross"),
        ("grow", "circle"),
        ("recolor", "square"),
    )
    p_stop: float = 0.5  # share of clips whose change fills only the first half ("then stops")

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {self.image_size!r}")
        if not isinstance(self.frames, int) or self.frames < 2:
            raise ValueError(f"frames must be an int >= 2, got {self.frames!r}")
        # WorldConfig checks colour and shape names the same way for the still world.
        WorldConfig(image_size=self.image_size, colors=self.colors, shapes=self.shapes)
        _check_names("motions", self.motions, MOTIONS)
        if "recolor" in self.motions and len(self.colors) < 2:
            raise ValueError("motions has 'recolor', which needs at least two colors")
        for pair in self.holdout:
            if len(pair) != 2 or pair[0] not in self.motions or pair[1] not in self.shapes:
                raise ValueError(
                    f"holdout entry {pair!r} must be a (motion, shape) pair drawn from "
                    f"motions={self.motions} and shapes={self.shapes}"
                )
        if len(set(self.holdout)) >= len(self.motions) * len(self.shapes):
            raise ValueError("holdout covers every motion/shape combination; none left to train")
        if not 0.0 <= self.p_stop <= 1.0:
            raise ValueError(f"p_stop must be in [0, 1], got {self.p_stop!r}")


@dataclass(frozen=True)
class Clips:
    """A batch of clips: videos [batch, 3, T, H, W] in [0, 1] and batch captions.

    colors / shapes / motions [batch] int64 index cfg.colors / cfg.shapes / cfg.motions;
    stops [batch] bool: the change fills only the first half of the clip.
    """

    videos: torch.Tensor
    captions: list[str]
    colors: torch.Tensor
    shapes: torch.Tensor
    motions: torch.Tensor
    stops: torch.Tensor


@dataclass(frozen=True)
class DepthScenes:
    """Still RGB-D scenes: images [batch, 3, H, W], depth [batch, 1, H, W] in [0, 1] (0 near).

    colors / shapes [batch] int64: the nearest object's colour and shape; captions name both
    objects front to back ("a red circle in front of a blue square").
    """

    images: torch.Tensor
    depth: torch.Tensor
    captions: list[str]
    colors: torch.Tensor
    shapes: torch.Tensor


def vocabulary(cfg: VideoWorldConfig) -> list[str]:
    """Every word a clip or depth-scene caption can use, sorted.

    Example: `WordTokenizer(vocabulary(cfg))`.
    """
    phrases = ["a then stops in front of", *cfg.colors, *cfg.shapes]
    phrases += [MOTIONS[m] for m in cfg.motions]
    return sorted({w for p in phrases for w in p.split()})


def is_holdout_motion(cfg: VideoWorldConfig, motions: torch.Tensor, shapes: torch.Tensor):
    """Bool mask [N] of clips whose (motion, shape) indices ([N] each) are held out.

    Example: `is_holdout_motion(cfg, clips.motions, clips.shapes).float().mean()`.
    """
    n_shapes = len(cfg.shapes)
    held = [cfg.motions.index(m) * n_shapes + cfg.shapes.index(s) for m, s in cfg.holdout]
    held = torch.tensor(held, dtype=torch.int64, device=motions.device)
    return torch.isin(motions * n_shapes + shapes, held)


def _check_batch(batch_size: int, generator: torch.Generator, split: str) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def _progress(cfg: VideoWorldConfig, stops: torch.Tensor) -> torch.Tensor:
    """How far each clip's change has come at each frame: [batch, T] in [0, 1]."""
    t = torch.arange(cfg.frames, dtype=torch.float32)
    full = t / (cfg.frames - 1)
    # A stopping clip completes its change by the middle frame and holds it.
    half = (t / max(1, (cfg.frames - 1) // 2)).clamp(max=1)
    return torch.where(stops[:, None], half, full)


def _background(batch: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Dark tinted background with luminance noise, [batch, 3, H, W], as in the still world."""
    return _uniform((batch, 3, 1, 1), _NOISE, 0.15, g) + _uniform(
        (batch, 1, n, n), -_NOISE, _NOISE, g
    )


def _rgb(cfg: VideoWorldConfig, color: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    rgb = torch.tensor([COLOR_RGB[c] for c in cfg.colors])[color]
    return (rgb + _uniform((color.shape[0], 3), -_COLOR_JITTER, _COLOR_JITTER, g)).clamp(0, 1)


def _clip_captions(cfg, color, shape, motion, stops, target) -> list[str]:
    captions = []
    for c, s, m, stop, to in zip(*(x.tolist() for x in (color, shape, motion, stops, target))):
        name = cfg.motions[m]
        phrase = MOTIONS[name] + (f" {cfg.colors[to]}" if name == "recolor" else "")
        captions.append(
            f"a {cfg.colors[c]} {cfg.shapes[s]} {phrase}" + (" then stops" if stop else "")
        )
    return captions


def _sample_clip_params(cfg: VideoWorldConfig, motion, shape, color, g):
    """Per-frame centre (cx, cy), radius and rgb of one object per clip: [B, T] / [B, T, 3]."""
    batch, n = motion.shape[0], cfg.image_size
    stops = torch.rand(batch, generator=g) < cfg.p_stop
    progress = _progress(cfg, stops)
    names = [cfg.motions[m] for m in motion.tolist()]
    step = torch.tensor([_STEP.get(m, (0, 0)) for m in names], dtype=torch.float32)
    scaling = torch.tensor([{"grow": 1, "shrink": -1}.get(m, 0) for m in names])
    small, large = _SCALE_RANGE
    radius0 = torch.where(scaling == 0, _RADIUS, torch.where(scaling > 0, small, large))
    radius1 = torch.where(scaling == 0, _RADIUS, torch.where(scaling > 0, large, small))
    radius = radius0[:, None] + (radius1 - radius0)[:, None] * progress
    # Start anywhere that keeps the whole path, at the largest radius, inside the canvas.
    low = _EXTENT * torch.maximum(radius0, radius1) + 1 / n
    span = (1 - 2 * low)[:, None] - _TRAVEL * step.abs()  # [B, 2]
    start = low[:, None] + _TRAVEL * step.clamp(max=0).abs() + _uniform((batch, 2), 0, 1, g) * span
    centre = start[:, :, None] + _TRAVEL * step[:, :, None] * progress[:, None, :]  # [B, 2, T]
    # A recolouring clip turns to a different colour: offset 1.. len-1 from its own.
    target = (color + torch.randint(1, len(cfg.colors), (batch,), generator=g)) % len(cfg.colors)
    recolor = torch.tensor([m == "recolor" for m in names])
    target = torch.where(recolor, target, color)
    rgb0, rgb1 = _rgb(cfg, color, g), _rgb(cfg, target, g)
    rgb1 = torch.where(recolor[:, None], rgb1, rgb0)
    rgb = rgb0[:, None] + (rgb1 - rgb0)[:, None] * progress[:, :, None]
    return centre[:, 0], centre[:, 1], radius, rgb, stops, target


def sample_clips(
    cfg: VideoWorldConfig, batch_size: int, *, generator: torch.Generator, split: str = "train"
) -> Clips:
    """Renders batch_size clips: videos [batch, 3, T, H, W] in [0, 1] with captions.

    split="train" never renders a held-out (motion, shape) pair; split="eval" draws motion and
    shape uniformly over all pairs. Colours are uniform in both.

    Example: `sample_clips(VideoWorldConfig(), 64, generator=torch.Generator().manual_seed(0))`.
    """
    _check_batch(batch_size, generator, split)
    n_motions, n_shapes = len(cfg.motions), len(cfg.shapes)
    pairs = torch.arange(n_motions * n_shapes)
    if split == "train":
        pairs = pairs[~is_holdout_motion(cfg, pairs // n_shapes, pairs % n_shapes)]
    pair = pairs[torch.randint(len(pairs), (batch_size,), generator=generator)]
    color = torch.randint(len(cfg.colors), (batch_size,), generator=generator)
    return _render_clips(cfg, pair // n_shapes, pair % n_shapes, color, generator)


def _render_clips(cfg, motion, shape, color, g) -> Clips:
    batch, frames, n = motion.shape[0], cfg.frames, cfg.image_size
    cx, cy, radius, rgb, stops, target = _sample_clip_params(cfg, motion, shape, color, g)
    # Frames are rendered as one batch of batch*T stills over a background shared by a clip.
    alpha = _shape_alpha(
        cfg, shape.repeat_interleave(frames), cx.flatten(), cy.flatten(), radius.flatten()
    ).view(batch, frames, 1, n, n)
    video = _background(batch, n, g)[:, None].expand(batch, frames, 3, n, n)
    video = torch.lerp(video, rgb[:, :, :, None, None], alpha).clamp_(0, 1)
    captions = _clip_captions(cfg, color, shape, motion, stops, target)
    return Clips(video.transpose(1, 2).contiguous(), captions, color, shape, motion, stops)


def clip_eval_set(cfg: VideoWorldConfig, n_per_pair: int, *, seed: int) -> Clips:
    """Clips with every (motion, shape) pair n_per_pair times, in pair order, held-out included.

    Example: `clips = clip_eval_set(cfg, 4, seed=1); held = is_holdout_motion(cfg, clips.motions,
    clips.shapes)`.
    """
    if not isinstance(n_per_pair, int) or n_per_pair < 1:
        raise ValueError(f"n_per_pair must be a positive int, got {n_per_pair!r}")
    g = torch.Generator().manual_seed(seed)
    n_shapes = len(cfg.shapes)
    pair = torch.arange(len(cfg.motions) * n_shapes).repeat_interleave(n_per_pair)
    color = torch.randint(len(cfg.colors), pair.shape, generator=g)
    return _render_clips(cfg, pair // n_shapes, pair % n_shapes, color, g)


def clip_stream(
    cfg: VideoWorldConfig, batch_size: int, *, seed: int, split: str = "train"
) -> Iterator[Clips]:
    """An endless stream of `Clips` batches, deterministic from seed.

    Example: `clips = next(clip_stream(VideoWorldConfig(), 16, seed=0))`.
    """
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield sample_clips(cfg, batch_size, generator=generator, split=split)


def sample_depth_scenes(
    cfg: VideoWorldConfig, batch_size: int, *, generator: torch.Generator, split: str = "train"
) -> DepthScenes:
    """Renders batch_size still scenes of two objects at different depths, with depth maps.

    Objects may overlap: the nearer one is drawn over the farther one in the image and the
    depth map, so the nearest object is told by depth, not by size (sizes are independent of
    depth). Nothing is held out, so split is only checked: draw eval scenes from another seed.

    Example: `s = sample_depth_scenes(cfg, 8, generator=torch.Generator().manual_seed(0))`.
    """
    _check_batch(batch_size, generator, split)
    g, n = generator, cfg.image_size
    color = torch.randint(len(cfg.colors), (2, batch_size), generator=g)
    shape = torch.randint(len(cfg.shapes), (2, batch_size), generator=g)
    radius = _RADIUS * _uniform((2, batch_size), 0.8, 1.3, g)
    low = _EXTENT * radius + 1 / n
    cx, cy = (low + _uniform((2, batch_size), 0, 1, g) * (1 - 2 * low) for _ in range(2))
    near = _uniform((batch_size,), 0.05, 0.95 - _DEPTH_GAP, g)
    far = near + _DEPTH_GAP + _uniform((batch_size,), 0, 1, g) * (0.95 - _DEPTH_GAP - near)
    image = _background(batch_size, n, g)
    depth = torch.ones(batch_size, 1, n, n)
    # Painter's order: object 1 (far) first, then object 0 (near) over it.
    for k, d in ((1, far), (0, near)):
        alpha = _shape_alpha(cfg, shape[k], cx[k], cy[k], radius[k])[:, None]
        image.lerp_(_rgb(cfg, color[k], g)[:, :, None, None], alpha)
        depth.lerp_(d[:, None, None, None].expand_as(depth), alpha)
    captions = [
        f"a {cfg.colors[c0]} {cfg.shapes[s0]} in front of a {cfg.colors[c1]} {cfg.shapes[s1]}"
        for c0, s0, c1, s1 in zip(*(t.tolist() for t in (color[0], shape[0], color[1], shape[1])))
    ]
    return DepthScenes(image.clamp_(0, 1), depth, captions, color[0], shape[0])


def depth_stream(
    cfg: VideoWorldConfig, batch_size: int, *, seed: int, split: str = "train"
) -> Iterator[DepthScenes]:
    """An endless stream of `DepthScenes` batches, deterministic from seed.

    Example: `scenes = next(depth_stream(VideoWorldConfig(), 16, seed=0))`.
    """
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield sample_depth_scenes(cfg, batch_size, generator=generator, split=split)
