"""CLIP as the memory planner (``train.plan``) sees it: two stacks and the activations
outside them."""

from __future__ import annotations

import math

from fmm import random
from models.clip.config import CLIPConfig
from models.clip.model import init
from models.family import Layout, Stack, plan_seq


def plan(cfg: CLIPConfig, *, seq: int | None = None, train: bool = True) -> Layout:
    """The :class:`models.family.Layout` of one contrastive step: the image tower over
    ``patches + 1`` tokens (a video tower: ``tubes * patches + 1``) and the text tower over ``seq`` tokens (default ``context_length``).

    ``train`` changes nothing: CLIP has no dropout. Example:
    ``plan(clip_vit_l14()).stacks[0].seq == 257`` (256 patches and a class token).
    """
    del train  # no dropout masks to count
    s_img, s_txt = cfg.image_tower.seq, plan_seq(seq, cfg.context_length, "text tokens")
    it, tt = cfg.image_transformer, cfg.text_transformer
    pixels = math.prod(cfg.input_shape)
    edges = (
        (pixels, None),
        # norm_pre and the final norm's inputs, and the final norm's output kept alive by
        # the class-token view
        (3 * s_img * it.width, None), (4 * s_img, 4),
        (s_txt, 8), (s_txt * tt.width, None), (2 * s_txt, 4), (tt.width, None),
    )  # fmt: skip
    stacks = (Stack("image", it, s_img), Stack("text", tt, s_txt))
    return Layout("clip", init(cfg, random.key(0).to("meta")), stacks, edges)
