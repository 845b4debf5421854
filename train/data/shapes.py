"""Shapes world: a seeded, procedural dataset of coloured shapes with captions (DESIGN.md).

Some colour/shape combinations never appear in training scenes, so zero-shot accuracy on them
in `eval_set` measures compositional generalisation. Rendering is vectorised over the batch:
each shape is a signed-distance function of pixel coordinates, turned into an anti-aliased
alpha mask; only caption strings are built in Python.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

COLOR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.75, 0.20),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.15, 0.30, 0.95),
    "purple": (0.60, 0.20, 0.85),
    "white": (0.95, 0.95, 0.95),
    "pink": (1.00, 0.50, 0.75),
    "gray": (0.55, 0.55, 0.55),
}

_Sdf = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Signed "distance" in units of the object's radius (<= 0 inside). Coordinates are centred on
# the object, with v pointing down. Proportions are tuned so areas are comparable and each
# silhouette stays recognisable at a 5-pixel radius.
_SHAPE_SDF: dict[str, _Sdf] = {
    "circle": lambda u, v: torch.sqrt(u * u + v * v) - 1.0,
    "square": lambda u, v: torch.maximum(u.abs(), v.abs()) - 0.8,
    "diamond": lambda u, v: (u.abs() + v.abs() - 1.1) * 0.7071,
    # Apex (0, -1.1), base corners (+-1.05, 0.55): points up, with its centroid at the centre
    # so position words describe where the triangle looks to be.
    "triangle": lambda u, v: torch.maximum((1.65 * u.abs() - 1.05 * (v + 1.1)) / 1.956, v - 0.55),
    "cross": lambda u, v: torch.minimum(
        torch.maximum(u.abs() - 1.0, v.abs() - 0.3), torch.maximum(u.abs() - 0.3, v.abs() - 1.0)
    ),
    "bar": lambda u, v: torch.maximum(u.abs() - 1.0, v.abs() - 0.35),
    "ring": lambda u, v: (torch.sqrt(u * u + v * v) - 0.75).abs() - 0.25,
}
# Largest per-axis extent of any silhouette, in radii: keeps every object inside the canvas.
_EXTENT = 1.1

_SIZES = ("small", "large")
_SIZE_RADIUS = (0.17, 0.27)  # fraction of the canvas side
_RADIUS_JITTER = 0.08
_COLOR_JITTER = 0.06
_NOISE = 0.04  # half-width of the uniform background noise
_N_CANDIDATES = 32  # placements tried for a two-object scene
_PAIR_SCALE = 0.8  # max small 0.17*1.08 stays below min large 0.27*0.92*0.8

_DEFAULT_COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
_PREFIXES = ("a", "there is a", "an image of a")
_VERTICAL = ("top", "center", "bottom")
_HORIZONTAL = ("left", "center", "right")
_TEMPLATES = (
    "a {}",
    "a photo of a {}",
    "there is a {}",
    "an image of a {}",
    "a small {}",
    "a large {}",
)


@dataclass(frozen=True, kw_only=True)
class WorldConfig:
    """The shapes world: canvas size, vocabulary of colours and shapes, held-out combinations.

    Example: `WorldConfig(image_size=32, holdout=(("red", "circle"),))`.
    """

    image_size: int = 32
    colors: tuple[str, ...] = _DEFAULT_COLORS
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "bar")
    holdout: tuple[tuple[str, str], ...] = (
        ("green", "triangle"),
        ("blue", "cross"),
        ("yellow", "circle"),
        ("purple", "square"),
    )
    p_two_objects: float = 0.3
    # Short single-object captions ("a red circle") make the prompts used for zero-shot
    # evaluation in-distribution, and take away position as a shortcut for telling
    # same-coloured objects apart, so the image tower must learn shape.
    p_no_position: float = 0.5
    p_no_size: float = 0.3

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {self.image_size!r}")
        _check_names("colors", self.colors, COLOR_RGB)
        _check_names("shapes", self.shapes, _SHAPE_SDF)
        for pair in self.holdout:
            if len(pair) != 2 or pair[0] not in self.colors or pair[1] not in self.shapes:
                raise ValueError(
                    f"holdout entry {pair!r} must be a (colour, shape) pair drawn from "
                    f"colors={self.colors} and shapes={self.shapes}"
                )
        if len(set(self.holdout)) >= len(self.colors) * len(self.shapes):
            raise ValueError("holdout covers every colour/shape combination; none left to train")
        for name in ("p_two_objects", "p_no_position", "p_no_size"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")


def _check_names(field: str, names: tuple[str, ...], known: dict) -> None:
    if len(names) == 0:
        raise ValueError(f"{field} must not be empty")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{field} has unknown names {unknown}; known: {sorted(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{field} has duplicate names: {names}")


@dataclass(frozen=True)
class Scenes:
    """A batch of rendered scenes.

    images [batch, 3, H, W] float32 in [0, 1]; captions: batch strings; colors / shapes [batch]
    int64 indices into cfg.colors / cfg.shapes of the first (main) object of each scene.
    """

    images: torch.Tensor
    captions: list[str]
    colors: torch.Tensor
    shapes: torch.Tensor


@dataclass(frozen=True)
class _Objects:
    """One object per scene; every field is [batch] (rgb is [batch, 3])."""

    color: torch.Tensor
    shape: torch.Tensor
    size: torch.Tensor  # 0 small, 1 large
    cx: torch.Tensor  # centre in [0, 1], x to the right
    cy: torch.Tensor  # centre in [0, 1], y downward
    radius: torch.Tensor  # fraction of the canvas side
    rgb: torch.Tensor


def class_names(cfg: WorldConfig) -> list[str]:
    """Names in label order (label = color_index * len(cfg.shapes) + shape_index).

    Example: `class_names(WorldConfig())[:2] == ["red circle", "red square"]`.
    """
    return [f"{c} {s}" for c in cfg.colors for s in cfg.shapes]


def is_holdout(cfg: WorldConfig, labels: torch.Tensor) -> torch.Tensor:
    """Bool mask [N] of labels [N] (int64 class ids) that are held-out combinations.

    Example: `is_holdout(cfg, labels).float().mean()` is the held-out share of an eval set.
    """
    n_classes = len(cfg.colors) * len(cfg.shapes)
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"labels must lie in [0, {n_classes}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    n_shapes = len(cfg.shapes)
    held = [cfg.colors.index(c) * n_shapes + cfg.shapes.index(s) for c, s in cfg.holdout]
    return torch.isin(labels, torch.tensor(held, dtype=torch.int64, device=labels.device))


def prompt_templates() -> tuple[str, ...]:
    """Zero-shot prompt templates, each with one "{}" slot for a class name.

    Example: `[t.format("red circle") for t in prompt_templates()]`.
    """
    return _TEMPLATES


def vocabulary(cfg: WorldConfig) -> list[str]:
    """Every word that captions and prompt templates can produce, sorted.

    Example: `WordTokenizer(vocabulary(cfg))`.
    """
    phrases = [*_PREFIXES, *_SIZES, *cfg.colors, *cfg.shapes, *_VERTICAL, *_HORIZONTAL]
    phrases += ["at the", "in the", "on the", "above", "below", "left of", "right of"]
    phrases += [t.replace("{}", " ") for t in _TEMPLATES]
    return sorted({w for p in phrases for w in p.split()})


def _uniform(shape: tuple[int, ...], low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=g)


def _sample_objects(
    cfg: WorldConfig, labels: torch.Tensor, g: torch.Generator, scale: torch.Tensor | float = 1.0
) -> _Objects:
    """Sizes, colours and a 3x3-cell placement for the objects with class ids labels [B]."""
    batch = labels.shape[0]
    size = torch.randint(2, (batch,), generator=g)
    jitter = _uniform((batch,), 1 - _RADIUS_JITTER, 1 + _RADIUS_JITTER, g)
    radius = torch.tensor(_SIZE_RADIUS)[size] * jitter * scale
    # Centres are drawn inside one third of the allowed range, away from its borders, so the
    # position word derived from the centre is never a coin flip.
    cell = torch.randint(3, (2, batch), generator=g)
    within = _uniform((2, batch), 0.1, 0.9, g)
    low = _margin(cfg, radius)
    centre = low + (cell + within) / 3 * (1 - 2 * low)
    color = labels // len(cfg.shapes)
    rgb = torch.tensor([COLOR_RGB[c] for c in cfg.colors])[color]
    rgb = (rgb + _uniform((batch, 3), -_COLOR_JITTER, _COLOR_JITTER, g)).clamp(0, 1)
    return _Objects(color, labels % len(cfg.shapes), size, centre[0], centre[1], radius, rgb)


def _margin(cfg: WorldConfig, radius: torch.Tensor | float) -> torch.Tensor | float:
    """Closest a centre may come to the canvas edge: the silhouette plus its anti-aliased rim."""
    return _EXTENT * radius + 1 / cfg.image_size


def _place_pair(
    cfg: WorldConfig, first: _Objects, second: _Objects, two: torch.Tensor, g: torch.Generator
) -> tuple[_Objects, _Objects]:
    """Re-places both objects of two-object scenes (two [B]) at the first clear pair of spots.

    Two-object captions carry no absolute position words, so the main object may move too.
    """
    batch = two.shape[0]
    spots = []
    for obj in (first, second):
        low = _margin(cfg, obj.radius)[:, None]
        spots.append(low + torch.rand((2, batch, _N_CANDIDATES), generator=g) * (1 - 2 * low))
    (x1, y1), (x2, y2) = spots
    gap = _EXTENT * (first.radius + second.radius)[:, None]
    # Scores tie at 0 for every clear pair and argmax takes the first; if none is clear, the
    # least overlapping pair wins.
    pick = (torch.hypot(x2 - x1, y2 - y1) - gap).clamp(max=0).argmax(dim=1, keepdim=True)
    moved = []
    for obj, x, y in ((first, x1, y1), (second, x2, y2)):
        cx = torch.where(two, x.gather(1, pick)[:, 0], obj.cx)
        cy = torch.where(two, y.gather(1, pick)[:, 0], obj.cy)
        moved.append(replace(obj, cx=cx, cy=cy))
    return moved[0], moved[1]


def _shape_alpha(cfg, shapes, cx, cy, radius, visible=None) -> torch.Tensor:
    """Anti-aliased coverage [B, H, W] in [0, 1] of shapes [B] centred at (cx, cy) [B] with
    radius [B]; objects where visible [B] is False get zero coverage without being evaluated.
    """
    n = cfg.image_size
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    # u stays [B, 1, W] and v [B, H, 1]: per-axis work is done once per row or column, and
    # only the final combination of each signed-distance function is a full [B, H, W].
    r = radius[:, None, None]
    u = (coords[None, None, :] - cx[:, None, None]) / r
    v = (coords[None, :, None] - cy[:, None, None]) / r
    alpha = torch.zeros(shapes.shape[0], n, n)
    for index, name in enumerate(cfg.shapes):
        chosen = shapes == index if visible is None else (shapes == index) & visible
        rows = chosen.nonzero()[:, 0]
        if rows.numel():
            d = _SHAPE_SDF[name](u[rows], v[rows])
            # d * r * n is the distance in pixels: a one-pixel ramp across the edge.
            alpha[rows] = (0.5 - d * (r[rows] * n)).clamp(0, 1)
    return alpha


def _render(
    cfg: WorldConfig, layers: list[tuple[_Objects, torch.Tensor]], g: torch.Generator
) -> torch.Tensor:
    """Composites (objects, visible [B] bool) layers, back to front, into [B, 3, H, W]."""
    batch, n = layers[0][0].radius.shape[0], cfg.image_size
    # Luminance noise on a dark, slightly tinted background; the bounds keep it inside [0, 1].
    noise = _uniform((batch, 1, n, n), -_NOISE, _NOISE, g)
    image = _uniform((batch, 3, 1, 1), _NOISE, 0.15, g) + noise
    for obj, visible in layers:
        alpha = _shape_alpha(cfg, obj.shape, obj.cx, obj.cy, obj.radius, visible)
        image.lerp_(obj.rgb[:, :, None, None], alpha[:, None])
    # lerp may round a hair past its end points.
    return image.clamp_(0, 1)


def _rows(obj: _Objects) -> list[tuple]:
    """Per-scene Python tuples (color, shape, size, cx, cy, radius) for caption building."""
    return list(
        zip(*(t.tolist() for t in (obj.color, obj.shape, obj.size, obj.cx, obj.cy, obj.radius)))
    )


def _position_phrase(cfg: WorldConfig, cx: float, cy: float, radius: float) -> str:
    # Recover the cell from the centre, with the same bounds used to sample it.
    low = _margin(cfg, radius)
    vertical, horizontal = (
        names[min(2, max(0, int(3 * (c - low) / (1 - 2 * low))))]
        for c, names in ((cy, _VERTICAL), (cx, _HORIZONTAL))
    )
    words = " ".join(w for w in (vertical, horizontal) if w != "center") or "center"
    # "in the center", "on the left", "at the top", "at the top left".
    return f"{'in' if words == 'center' else 'on' if vertical == 'center' else 'at'} the {words}"


def _relation(first: tuple, second: tuple) -> str:
    """Where the first object is relative to the second, along the dominant axis."""
    dx, dy = second[3] - first[3], second[4] - first[4]
    if abs(dx) > abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _noun(cfg: WorldConfig, row: tuple, *, size: bool = True) -> str:
    colour_shape = f"{cfg.colors[row[0]]} {cfg.shapes[row[1]]}"
    return f"{_SIZES[row[2]]} {colour_shape}" if size else colour_shape


def _captions(
    cfg: WorldConfig, first: _Objects, second: _Objects, two: torch.Tensor, g: torch.Generator
) -> list[str]:
    n = two.shape[0]
    prefixes = torch.randint(len(_PREFIXES), (n,), generator=g).tolist()
    position = (torch.rand(n, generator=g) >= cfg.p_no_position).tolist()
    size = (torch.rand(n, generator=g) >= cfg.p_no_size).tolist()
    captions = []
    rows = zip(prefixes, _rows(first), _rows(second), two.tolist(), position, size)
    for prefix, a, b, has_two, with_position, with_size in rows:
        if has_two:
            head = f"{_PREFIXES[prefix]} {_noun(cfg, a)}"
            captions.append(f"{head} {_relation(a, b)} a {_noun(cfg, b)}")
        elif with_position:
            head = f"{_PREFIXES[prefix]} {_noun(cfg, a, size=with_size)}"
            captions.append(f"{head} {_position_phrase(cfg, a[3], a[4], a[5])}")
        else:
            captions.append(f"{_PREFIXES[prefix]} {_noun(cfg, a, size=with_size)}")
    return captions


def sample_scenes(
    cfg: WorldConfig, batch_size: int, *, generator: torch.Generator, split: str = "train"
) -> Scenes:
    """Renders batch_size scenes: images [batch, 3, H, W] in [0, 1] with captions.

    split="train" never renders a held-out combination and has two objects with probability
    cfg.p_two_objects; split="eval" has one object per scene, uniform over all combinations.

    Example: `sample_scenes(WorldConfig(), 256, generator=torch.Generator().manual_seed(0))`.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    n_classes = len(cfg.colors) * len(cfg.shapes)
    if split == "train":
        allowed = (~is_holdout(cfg, torch.arange(n_classes))).nonzero()[:, 0]
        labels = allowed[torch.randint(len(allowed), (2, batch_size), generator=generator)]
        two = torch.rand(batch_size, generator=generator) < cfg.p_two_objects
    else:
        labels = torch.randint(n_classes, (2, batch_size), generator=generator)
        two = torch.zeros(batch_size, dtype=torch.bool)
    # Pairs are drawn smaller so two objects fit side by side; the size ranges stay disjoint.
    scale = torch.where(two, _PAIR_SCALE, 1.0)
    first = _sample_objects(cfg, labels[0], generator, scale)
    second = _sample_objects(cfg, labels[1], generator, scale)
    first, second = _place_pair(cfg, first, second, two, generator)
    # The main object is drawn last, so overlap never hides the object its label describes.
    images = _render(cfg, [(second, two), (first, torch.ones_like(two))], generator)
    captions = _captions(cfg, first, second, two, generator)
    return Scenes(images, captions, first.color, first.shape)


def eval_set(cfg: WorldConfig, n_per_class: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-object images [N, 3, H, W] and labels [N] int64, every class n_per_class times.

    label = color_index * len(cfg.shapes) + shape_index (see `class_names`); held-out classes
    are included, so `is_holdout(cfg, labels)` splits seen from unseen combinations.

    Example: `images, labels = eval_set(WorldConfig(), 10, seed=0)  # N = 480`.
    """
    if not isinstance(n_per_class, int) or n_per_class < 1:
        raise ValueError(f"n_per_class must be a positive int, got {n_per_class!r}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(cfg.colors) * len(cfg.shapes)).repeat_interleave(n_per_class)
    objects = _sample_objects(cfg, labels, g)
    return _render(cfg, [(objects, torch.ones_like(labels, dtype=torch.bool))], g), labels


def scene_stream(
    cfg: WorldConfig, batch_size: int, *, seed: int, split: str = "train"
) -> Iterator[Scenes]:
    """An endless stream of `Scenes` batches, deterministic from seed.

    Example: `scenes = next(scene_stream(WorldConfig(), 64, seed=0))`.
    """
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield sample_scenes(cfg, batch_size, generator=generator, split=split)
