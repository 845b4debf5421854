"""Image preprocessing for pretrained CLIPs: resize, center crop, normalise.

This is the evaluation transform every published CLIP was trained to expect: the shorter
side resized to ``size`` with bicubic filtering, the center ``size x size`` crop, RGB in
``[0, 1]``, then per-channel standardisation with OpenAI's dataset statistics.

Example::

    batch = clip_preprocess([Image.open("dog.jpg")], size=224)   # [1, 3, 224, 224]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is ``size`` (the longer one truncated, as torchvision does)."""
    w, h = image.size
    if min(w, h) == size:
        return image
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return image.resize((new_w, new_h), Image.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The central ``size x size`` square (offsets rounded as torchvision rounds them)."""
    w, h = image.size
    left, top = round((w - size) / 2.0), round((h - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def clip_preprocess(
    images: Sequence[Image.Image | str | Path],
    *,
    size: int,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> torch.Tensor:
    """PIL images (or paths) -> ``[n, 3, size, size]`` float32, ready for ``encode_image``."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    out = []
    for item in images:
        if isinstance(item, (str, Path)):
            try:
                with Image.open(item) as opened:
                    item = opened.convert("RGB")
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read image {item}: {e}") from e
        image = center_crop(resize_shorter(item.convert("RGB"), size), size)
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        out.append(array.permute(2, 0, 1))
    batch = torch.stack(out)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (batch - mean_t) / std_t
