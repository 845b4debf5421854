"""Request bodies of the HTTP API (pydantic), with the bounds that keep one request small.

Images travel either as a base64 PNG string or as nested lists ``[C][H][W]`` of floats in
``[0, 1]``; :func:`decode_image` turns either into a ``[C, H, W]`` tensor.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_TEXTS = 256
MAX_TEXT_CHARS = 2_000
MAX_IMAGES = 64
MAX_LABELS = 256
MAX_K = 1_000
MAX_IMAGE_SIDE = 1_024
MAX_NEW_TOKENS = 4_096

Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
Image = str | list[list[list[float]]]


class _Strict(BaseModel):
    # Unknown fields are a typo worth reporting, not something to ignore.
    model_config = ConfigDict(extra="forbid")


class EmbedText(_Strict):
    texts: list[Text] = Field(min_length=1, max_length=MAX_TEXTS)


class EmbedImage(_Strict):
    images: list[Image] = Field(min_length=1, max_length=MAX_IMAGES)


class ZeroShot(_Strict):
    image: Image
    labels: list[Text] = Field(min_length=2, max_length=MAX_LABELS)
    template: str = Field(default="{}", max_length=MAX_TEXT_CHARS)


class Search(_Strict):
    text: Text | None = None
    vector: list[float] | None = Field(default=None, min_length=1, max_length=65_536)
    k: int = Field(default=5, ge=1, le=MAX_K)


class Items(_Strict):
    texts: list[Text] = Field(default_factory=list, max_length=MAX_TEXTS)
    images: list[Image] = Field(default_factory=list, max_length=MAX_IMAGES)


class Generate(_Strict):
    prompt: Text
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    guidance: float = Field(default=1.0, ge=0.0, le=100.0)
    seed: int = Field(default=0, ge=0, le=2**62)
    # None: the model's own length (an mmgpt image's code count, 64 tokens for a text model).
    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)


def decode_image(payload: str | list, size: tuple[int, int, int] | None, name: str) -> torch.Tensor:
    """A ``[C, H, W]`` float tensor in ``[0, 1]`` from a base64 PNG (resized to ``size``'s
    ``H, W`` if it differs) or from nested lists (taken as they are).

    Example: ``decode_image([[[0.5] * 32] * 32] * 3, (3, 32, 32), "image")`` -> ``[3, 32, 32]``.
    """
    if isinstance(payload, list):
        try:
            return torch.tensor(payload, dtype=torch.float32)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{name}: nested lists must form a [C, H, W] array: {e}") from None
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name}: not valid base64") from None
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            if max(im.size) > MAX_IMAGE_SIDE:
                raise ValueError(f"{name}: {im.size} is larger than {MAX_IMAGE_SIDE} pixels a side")
            channels = size[0] if size is not None else 3
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != (size[2], size[1]):
                im = im.resize((size[2], size[1]), PILImage.Resampling.BICUBIC)
            pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            h, w = im.size[1], im.size[0]
    except (UnidentifiedImageError, OSError):
        raise ValueError(f"{name}: not a readable image (send a base64 PNG)") from None
    return pixels.reshape(h, w, -1).permute(2, 0, 1).float() / 255.0
