"""Image preprocessing for pretrained CLIPs: resize, center crop, normalise.

This is the evaluation transform every published CLIP was trained to expect: the shorter
side resized to ``size`` with bicubic filtering, the center ``size x size`` crop, RGB in
``[0, 1]``, then per-channel standardisation with OpenAI's dataset statistics. The
transform itself is :func:`train.data.images.eval_transform`; here it runs over a batch.

Example::

    batch = clip_preprocess([Image.open("dog.jpg")], size=224)   # [1, 3, 224, 224]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from train.data.images import eval_transform

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


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
        out.append(eval_transform(item.convert("RGB"), size=size, mean=mean, std=std))
    return torch.stack(out)
