"""Decoding users' images, and the transforms that turn them into model inputs.

:func:`decode` turns encoded bytes into an RGB ``PIL.Image`` the same way whatever the
file holds: EXIF orientation applied; grey, palette, CMYK and 16-bit images converted;
transparency composited over white (the colour most datasets' transparent logos and
products sit on). Anything that cannot be an image here, a damaged or truncated file, a
zero-size image or a decompression bomb, is one :class:`BadSample` for the loader to skip
and count.

The transforms give ``[3, size, size]`` float32, standardised by the model's mean/std:
:func:`train_transform` is the random resized crop open_clip trains CLIP with (scale
0.9..1, bicubic), drawn from a ``torch.Generator`` so a sample's crop is a function of its
seed; :func:`eval_transform` is CLIP's resize-the-shorter-side then center crop.

Example::

    image = decode(Path("dog.jpg").read_bytes(), where="dog.jpg")
    x = train_transform(image, size=224, mean=OPENAI_MEAN, std=OPENAI_STD,
                        generator=torch.Generator().manual_seed(7))   # [3, 224, 224]
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# Pixels (width x height) an image may have: 8192 x 8192, about 67M, below PIL's own 89M
# warning. A larger one costs 200 MB and more per worker to decode for a 224 px crop;
# in a web-scraped dataset it is far more often a bomb or a scan than a photo worth it.
MAX_PIXELS = 8192 * 8192
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class BadSample(Exception):
    """A sample that cannot be used: ``where`` names it (a path, ``shard.tar:key``, a
    row), ``reason`` says why."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason

    def __reduce__(self):  # DataLoader workers send exceptions back pickled
        return type(self), (self.where, self.reason)


def file_within(path: Path, *, where: str, max_bytes: int, noun: str) -> int:
    """``path``'s size in bytes, or :class:`BadSample` (``where``) when it cannot be read or
    is over ``max_bytes``: checked before a decoder opens the file. ``noun``: what it holds,
    for the message ("video")."""
    try:
        nbytes = path.stat().st_size
    except OSError as e:
        raise BadSample(where, f"cannot read the {noun}: {e}") from None
    if nbytes > max_bytes:
        raise BadSample(where, f"{nbytes} bytes is more than the limit of {max_bytes}")
    return nbytes


def decode(
    data: bytes, *, where: str, max_pixels: int = MAX_PIXELS, draft: int | None = None
) -> Image.Image:
    """Encoded image bytes -> an RGB ``PIL.Image`` (EXIF-oriented), or :class:`BadSample`.

    ``max_pixels``: the decompression-bomb limit, checked from the header before any
    pixel is decoded (PIL refuses past twice its own ``Image.MAX_IMAGE_PIXELS`` whatever
    this says). ``draft``: a JPEG may decode at 1/2, 1/4 or 1/8 scale (its DCT does it at
    a fraction of the cost) as long as both sides stay ``>= draft`` pixels; a loader that
    crops to ``size`` passes ``size``.
    """
    try:
        with warnings.catch_warnings():
            # PIL's bomb warning (between its limit and twice that) is a refusal here too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise BadSample(
                    where, f"{width}x{height} pixels is more than the limit of {max_pixels} "
                    "(a decompression bomb?)",
                )  # fmt: skip
            if width == 0 or height == 0:
                raise BadSample(where, f"a zero-size image ({width}x{height})")
            if draft is not None and image.format == "JPEG":
                image.draft(None, (draft, draft))
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample(where, f"a decompression bomb ({e})") from None
    except Exception as e:  # a decoder's failures on broken bytes are no contract: all skip
        raise BadSample(where, f"cannot decode the image ({type(e).__name__}: {e})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _16_BIT_MODES:
        # PIL's own conversion clips 16-bit values at 255 (all but black turns white);
        # 65535 / 257 = 255 maps the whole range.
        values = np.asarray(image).astype(np.float32).clip(0, 65535)
        return Image.fromarray((values / 257).round().astype(np.uint8), "L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        white.alpha_composite(image.convert("RGBA"))
        return white.convert("RGB")
    return image.convert("RGB")  # L, P, CMYK, 1, YCbCr, ...


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


def to_tensor(image: Image.Image, *, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An RGB image ``[H, W]`` -> ``[3, H, W]`` float32, ``(pixel / 255 - mean) / std``
    (torchvision's ToTensor + Normalize, to the last bit)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    array = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (array.permute(2, 0, 1) - mean_t) / std_t


def eval_transform(
    image: Image.Image, *, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """CLIP's evaluation transform: shorter side to ``size`` (bicubic), center
    ``size x size`` crop, standardised: ``[3, size, size]`` float32."""
    _check_size(size)
    return to_tensor(center_crop(resize_shorter(image, size), size), mean=mean, std=std)


def train_transform(
    image: Image.Image,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """A random resized crop (``scale`` of the area, aspect ``ratio``, torchvision's
    RandomResizedCrop rule) resized to ``size x size`` bicubic, standardised:
    ``[3, size, size]`` float32. Every draw comes from ``generator``."""
    _check_size(size)
    left, top, w, h = _crop_box(*image.size, scale=scale, ratio=ratio, generator=generator)
    crop = image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    return to_tensor(crop, mean=mean, std=std)


def _crop_box(width, height, *, scale, ratio, generator) -> tuple[int, int, int, int]:
    """(left, top, w, h): ten tries at a random area and aspect that fit, then the center
    crop at the nearest allowed aspect (torchvision's fallback)."""
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u, v = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u)
        aspect = math.exp(log_low + (log_high - log_low) * v)
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return left, top, w, h
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    return (width - w) // 2, (height - h) // 2, w, h


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
