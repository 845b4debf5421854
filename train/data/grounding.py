"""Phrase grounding on the shapes world: scenes of 1-3 objects, a phrase naming one of them,
its true box and the words that name it (``python -m train mdetr``).

The scenes are the shapes world's (:mod:`train.data.shapes`: the same silhouettes, colours,
placement and rendering); the box of an object is its silhouette's exact bounding box.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from train.data.shapes import (
    _EXTENT,
    _N_CANDIDATES,
    WorldConfig,
    _margin,
    _noun,
    _Objects,
    _relation,
    _render,
    _rows,
    _sample_objects,
    is_holdout,
)

# Each silhouette's bounding box in radii (u0, v0, u1, v1) around its centre, v downward:
# the zero set of its signed-distance function above.
_SHAPE_BOX: dict[str, tuple[float, float, float, float]] = {
    "circle": (-1.0, -1.0, 1.0, 1.0),
    "square": (-0.8, -0.8, 0.8, 0.8),
    "diamond": (-1.1, -1.1, 1.1, 1.1),
    "triangle": (-1.05, -1.1, 1.05, 0.55),
    "cross": (-1.0, -1.0, 1.0, 1.0),
    "bar": (-1.0, -0.35, 1.0, 0.35),
    "ring": (-1.0, -1.0, 1.0, 1.0),
}
_GROUNDING_SCALE = 0.7  # up to three objects must fit side by side
_P_DISTRACTOR = 0.5  # three-object scenes whose target has a twin: only the relation tells


@dataclass(frozen=True)
class Grounding:
    """Scenes of 1-3 objects, each with a phrase naming one of them (the target).

    images [N, 3, H, W] in [0, 1]; phrases: N strings, "the red circle" (plain) or "the red
    circle left of the blue square" (relation); boxes [N, 2, 4] normalised cxcywh of the
    target and of the object a relation refers to (row 1 is zeros when ``n_boxes`` is 1);
    spans [N, 2, 2] int64 word spans ``[start, end)`` of the phrase naming each box (the
    colour and shape words); n_boxes [N] (1 or 2); relation [N] bool; twin [N] bool (another
    object shares the target's colour and shape, so only the relation picks it out);
    holdout [N] bool (the target's colour x shape is held out); objects [N] (1-3).
    """

    images: torch.Tensor
    phrases: list[str]
    boxes: torch.Tensor
    spans: torch.Tensor
    n_boxes: torch.Tensor
    relation: torch.Tensor
    twin: torch.Tensor
    holdout: torch.Tensor
    objects: torch.Tensor


def _bounding_box(cfg: WorldConfig, obj: _Objects) -> torch.Tensor:
    """Normalised cxcywh [B, 4] of each object's silhouette."""
    extent = torch.tensor([_SHAPE_BOX[s] for s in cfg.shapes])[obj.shape]  # [B, 4] in radii
    r = obj.radius[:, None]
    xyxy = torch.stack((obj.cx, obj.cy, obj.cx, obj.cy), dim=1) + extent * r
    xyxy = xyxy.clamp(0, 1)
    return torch.cat(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), dim=1)


def _place_all(
    cfg: WorldConfig, objects: list[_Objects], visible: list[torch.Tensor], g: torch.Generator
) -> list[_Objects]:
    """Re-places every object at the first candidate set of spots where no two visible
    objects overlap (else the least overlapping one), as :func:`_place_pair` for two."""
    batch = objects[0].radius.shape[0]
    spots = []
    for obj in objects:
        low = _margin(cfg, obj.radius)[:, None]
        spots.append(low + torch.rand((2, batch, _N_CANDIDATES), generator=g) * (1 - 2 * low))
    overlap = torch.zeros(batch, _N_CANDIDATES)
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            gap = _EXTENT * (objects[i].radius + objects[j].radius)[:, None]
            (xi, yi), (xj, yj) = spots[i], spots[j]
            clear = (torch.hypot(xj - xi, yj - yi) - gap).clamp(max=0)
            overlap += torch.where((visible[i] & visible[j])[:, None], clear, 0.0)
    pick = overlap.argmax(dim=1, keepdim=True)
    return [
        replace(obj, cx=x.gather(1, pick)[:, 0], cy=y.gather(1, pick)[:, 0])
        for obj, (x, y) in zip(objects, spots)
    ]


def sample_grounding(
    cfg: WorldConfig, n: int, *, generator: torch.Generator, split: str = "train"
) -> Grounding:
    """Renders ``n`` grounding scenes (:class:`Grounding`): 1-3 objects, one phrase each.

    The target is named by colour and shape ("the red circle") when no other object shares
    them, or by a relation to another object ("the red circle above the blue square",
    the relation along the dominant axis as in captions). Half the three-object scenes
    give the target a twin of the same colour and shape, whose relation to the referred
    object differs, so only the relation picks the target out. split="train" renders no
    held-out combination at all; split="eval" draws the target's combination from the
    held-out ones half the time (every object else from all combinations), so both
    splits of the evaluation have their share.

    Example: ``sample_grounding(WorldConfig(image_size=64), 8, generator=g).phrases[0]``.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    g, n_classes = generator, len(cfg.colors) * len(cfg.shapes)
    held = is_holdout(cfg, torch.arange(n_classes))
    pool = (~held).nonzero()[:, 0] if split == "train" else torch.arange(n_classes)
    if len(pool) < 3:
        raise ValueError("sample_grounding needs at least 3 colour/shape combinations to train")
    # Three distinct combinations per scene: target, referred object, third object.
    labels = pool[torch.rand(n, len(pool), generator=g).argsort(dim=1)[:, :3]].T.clone()
    if split == "eval":
        unseen = held.nonzero()[:, 0]
        pick = unseen[torch.randint(len(unseen), (n,), generator=g)]
        take = torch.rand(n, generator=g) < 0.5
        # A drawn held-out target swaps places with any other object that drew it.
        for row in labels[1:]:
            row[take & (row == pick)] = labels[0][take & (row == pick)]
        labels[0] = torch.where(take, pick, labels[0])
    objects = 1 + torch.randint(3, (n,), generator=g)
    twin = (objects == 3) & (torch.rand(n, generator=g) < _P_DISTRACTOR)
    relation = twin | ((objects >= 2) & (torch.rand(n, generator=g) < 0.5))
    labels[2] = torch.where(twin, labels[0], labels[2])
    visible = [torch.ones(n, dtype=torch.bool), objects >= 2, objects == 3]
    drawn = [_sample_objects(cfg, lab, g, _GROUNDING_SCALE) for lab in labels]
    drawn = _place_all(cfg, drawn, visible, g)
    target, other, third = (_rows(o) for o in drawn)
    # A twin whose relation to the referred object is the target's would leave the phrase
    # ambiguous: it is not drawn (the scene keeps two objects).
    same = [twin_i and _relation(a, b) == _relation(c, b)
            for twin_i, a, b, c in zip(twin.tolist(), target, other, third)]  # fmt: skip
    same = torch.tensor(same, dtype=torch.bool)
    twin, objects = twin & ~same, torch.where(same, 2, objects)
    visible[2] = objects == 3
    # The target is drawn last, so an overlap never hides the object the phrase names.
    images = _render(
        cfg, [(drawn[2], visible[2]), (drawn[1], visible[1]), (drawn[0], visible[0])], g
    )
    phrases, spans = [], []
    for a, b, rel in zip(target, other, relation.tolist()):
        head = f"the {_noun(cfg, a, size=False)}"
        if rel:
            words = f"{head} {_relation(a, b)} the {_noun(cfg, b, size=False)}".split()
            phrases.append(" ".join(words))
            spans.append([[1, 3], [len(words) - 2, len(words)]])
        else:
            phrases.append(head)
            spans.append([[1, 3], [0, 0]])
    n_boxes = 1 + relation.long()
    boxes = torch.stack((_bounding_box(cfg, drawn[0]), _bounding_box(cfg, drawn[1])), dim=1)
    boxes[:, 1] *= relation[:, None]
    return Grounding(
        images=images, phrases=phrases, boxes=boxes, spans=torch.tensor(spans),
        n_boxes=n_boxes, relation=relation, twin=twin,
        holdout=is_holdout(cfg, labels[0]), objects=objects,
    )  # fmt: skip
