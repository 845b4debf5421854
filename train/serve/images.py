"""Images as requests carry them: a base64 PNG or JPEG, or nested lists ``[C][H][W]``.

An encoded image is checked before it is decoded: its format (PNG and JPEG only) and its
size in pixels come from the file's header, so a 20000 x 20000 PNG of a few kilobytes (a
decompression bomb) is refused without allocating its pixels. Whatever the decoder raises
on a damaged file becomes one ``ValueError`` naming the field.

Example::

    decode_image(b64_png, (3, 32, 32), "images[0]")      # [3, 32, 32] float in [0, 1]
    image_from_lists([[[0.5] * 8] * 8] * 3, "image")     # [3, 8, 8]
"""

from __future__ import annotations

import base64
import binascii
import io

import torch

ACCEPTED_FORMATS = ("PNG", "JPEG")
MAX_IMAGE_SIDE = 1_024  # pixels a side of an encoded image (it is resized to the model's)
MAX_IMAGE_BYTES = 4 * 2**20  # of one encoded image, before base64
MAX_IMAGE_BASE64_CHARS = 4 * (MAX_IMAGE_BYTES // 3 + 1)


def _accepted() -> str:
    return " or ".join(ACCEPTED_FORMATS)


def decode_image(payload: str, shape: tuple[int, int, int] | None, name: str) -> torch.Tensor:
    """A ``[C, H, W]`` float tensor in ``[0, 1]`` from a base64 PNG or JPEG, resized to
    ``shape``'s ``H, W`` when it differs (``C`` from ``shape``: 1 grey, else RGB; 3 without
    a ``shape``). ``ValueError`` naming ``name`` for anything else: not base64, another
    format, more than :data:`MAX_IMAGE_SIDE` pixels a side, a damaged file."""
    from PIL import Image, UnidentifiedImageError

    if len(payload) > MAX_IMAGE_BASE64_CHARS:
        raise ValueError(
            f"{name}: {len(payload)} base64 characters; at most {MAX_IMAGE_BASE64_CHARS}"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name}: not valid base64") from None
    try:
        # `formats` keeps every other decoder (GIF, TIFF, BMP, WEBP, ...) out of reach; open()
        # reads the header only, so the size is known before any pixel is decoded.
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as im:
            width, height = im.size
            if max(width, height) > MAX_IMAGE_SIDE:
                raise _TooLarge(width, height)
            channels = shape[0] if shape is not None else 3
            im = im.convert("L" if channels == 1 else "RGB")
            if shape is not None and im.size != (shape[2], shape[1]):
                im = im.resize((shape[2], shape[1]), Image.Resampling.BICUBIC)
            pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            h, w = im.size[1], im.size[0]
    except _TooLarge as e:
        raise ValueError(
            f"{name}: the image is {e.width}x{e.height} pixels; this server decodes at most "
            f"{MAX_IMAGE_SIDE} pixels a side"
        ) from None
    except Image.DecompressionBombError:  # past PIL's own limit, which it checks in open()
        raise ValueError(
            f"{name}: the image is larger than {MAX_IMAGE_SIDE} pixels a side"
        ) from None
    except UnidentifiedImageError:
        raise ValueError(
            f"{name}: not a {_accepted()} image (send one of them, base64-encoded)"
        ) from None
    except Exception:  # a decoder's failures on hostile bytes are no contract: all are 422
        raise ValueError(f"{name}: a damaged or unsupported {_accepted()} file") from None
    return pixels.reshape(h, w, -1).permute(2, 0, 1).float() / 255.0


def image_from_lists(rows: list, name: str) -> torch.Tensor:
    """A float32 ``[C, H, W]`` tensor from nested lists (already bounded by the request
    schema); ``ValueError`` naming ``name`` if they are ragged."""
    try:
        return torch.tensor(rows, dtype=torch.float32)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name}: nested lists must form a [C, H, W] array: {e}") from None


class _TooLarge(Exception):
    def __init__(self, width: int, height: int):
        super().__init__(width, height)
        self.width, self.height = width, height
