"""The HTTP API's bodies (pydantic): requests with every bound a request needs, answers, errors.

Request models are built per served model by :func:`request_models`, so the OpenAPI document
states the exact image shape ``[C][H][W]`` and vector length the model takes. Every list has
a bound (``train.serve.bodies.json_budget`` refuses a model with an unbounded one) and stops at
its first bad item (``fail_fast``: a million bad pixels are one error, not a million).

Images travel as a base64 PNG or JPEG string (format ``png-or-jpeg-base64`` in the OpenAPI
document) or as nested lists of floats in ``[0, 1]``; ``train.serve.images`` decodes them.

Example::

    bodies = request_models(image_shape=(3, 32, 32), dim=64)
    bodies.EmbedImage.model_validate_json(b'{"images": [...]}')
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    RootModel,
    StringConstraints,
    Tag,
)

from fmm.templates import TEMPLATE_PATTERN, check_template
from train.serve.images import ACCEPTED_FORMATS, MAX_IMAGE_BASE64_CHARS, MAX_IMAGE_SIDE

MAX_TEXTS = 256
MAX_TEXT_CHARS = 2_000
MAX_IMAGES = 64
MAX_LABELS = 256
MAX_K = 1_000
MAX_VECTOR = 65_536
MAX_CHANNELS = 4
MAX_NEW_TOKENS = 4_096
IMAGE_FORMAT = "png-or-jpeg-base64"

Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
Template = Annotated[
    str,
    Field(max_length=MAX_TEXT_CHARS, json_schema_extra={"pattern": TEMPLATE_PATTERN}),
    AfterValidator(check_template),
]
EncodedImage = Annotated[
    str,
    Field(
        max_length=MAX_IMAGE_BASE64_CHARS,
        description=f"a base64 {' or '.join(ACCEPTED_FORMATS)} file, at most "
        f"{MAX_IMAGE_SIDE} pixels a side, resized to the model's input",
        json_schema_extra={"format": IMAGE_FORMAT, "contentEncoding": "base64"},
    ),
]


def _integral(value: Any) -> Any:
    # JSON Schema counts 750.0 as an integer; the strict check after this refuses "750".
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _integer(low: int, high: int) -> Any:
    # The bounds come first, so that they reach the JSON schema as minimum and maximum.
    return Annotated[int, Field(ge=low, le=high), BeforeValidator(_integral)]


Pixel = Annotated[float, Field(ge=0.0, le=1.0)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


def _bounded(item: Any, low: int, high: int) -> Any:
    return Annotated[list[item], Field(min_length=low, max_length=high, fail_fast=True)]


class _Strict(BaseModel):
    # Unknown fields are a typo worth reporting, not something to ignore; and JSON types
    # are taken as the schema states them (no `false` for a pixel, no "5" for k).
    model_config = ConfigDict(extra="forbid", strict=True)


@dataclass(frozen=True)
class RequestModels:
    """The request bodies of one served model (see :func:`request_models`)."""

    EmbedText: type[BaseModel]
    EmbedImage: type[BaseModel]
    ZeroShot: type[BaseModel]
    Items: type[BaseModel]
    Search: type[BaseModel]
    Generate: type[BaseModel]


def request_models(
    image_shape: tuple[int, int, int] | None = None,
    dim: int | None = None,
    generate_limits: Mapping[str, tuple[float, float]] | None = None,
) -> RequestModels:
    """Request bodies for a model taking ``[C, H, W]`` images and ``dim``-long vectors
    (``None``: any shape up to ``MAX_CHANNELS`` x ``MAX_IMAGE_SIDE``\\ ², any length up to
    ``MAX_VECTOR``); ``generate_limits``: ``{option: (low, high)}`` narrowing generation's
    ``max_new_tokens`` or ``guidance`` to what the model takes (an mmgpt image's fixed code
    count; a text model's guidance of 1)."""
    if image_shape is None:
        (c_lo, c_hi), (h_lo, h_hi), (w_lo, w_hi) = (1, MAX_CHANNELS), *[(1, MAX_IMAGE_SIDE)] * 2
    else:
        (c_lo, c_hi), (h_lo, h_hi), (w_lo, w_hi) = ((n, n) for n in image_shape)
    PixelLists = _bounded(_bounded(_bounded(Pixel, w_lo, w_hi), h_lo, h_hi), c_lo, c_hi)
    # A string is an encoded image, anything else pixel lists: errors then speak of the
    # branch the client meant, not of both.
    Image = Annotated[
        Annotated[EncodedImage, Tag("base64-image")] | Annotated[PixelLists, Tag("pixel-lists")],
        Discriminator(lambda v: "base64-image" if isinstance(v, str) else "pixel-lists"),
    ]
    Vector = _bounded(Finite, dim or 1, dim or MAX_VECTOR)

    class EmbedText(_Strict):
        texts: _bounded(Text, 1, MAX_TEXTS)

    class EmbedImage(_Strict):
        images: _bounded(Image, 1, MAX_IMAGES)

    class ZeroShot(_Strict):
        image: Image
        labels: _bounded(Text, 2, MAX_LABELS)
        template: Template = "{}"

    class Items(_Strict):
        texts: _bounded(Text, 0, MAX_TEXTS) = Field(default_factory=list)
        images: _bounded(Image, 0, MAX_IMAGES) = Field(default_factory=list)

    class Search(_Strict):
        # Exactly one of the two; neither may be null (the schema says so too).
        model_config = ConfigDict(
            extra="forbid",
            strict=True,
            json_schema_extra={"oneOf": [{"required": ["text"]}, {"required": ["vector"]}]},
        )
        text: Text = None
        vector: Vector = None
        k: _integer(1, MAX_K) = 5

    limits = {"max_new_tokens": (1, MAX_NEW_TOKENS), "guidance": (0.0, 100.0)}
    for option, (low, high) in (generate_limits or {}).items():
        if option not in limits or not limits[option][0] <= low <= high <= limits[option][1]:
            raise ValueError(
                f"request_models: generate_limits[{option!r}] = {(low, high)} is not a range "
                f"within {limits.get(option, 'an option of /v1/generate')}"
            )
        limits[option] = (low, high)
    (new_lo, new_hi), (guide_lo, guide_hi) = limits["max_new_tokens"], limits["guidance"]

    class Generate(_Strict):
        prompt: Text
        temperature: float = Field(default=1.0, ge=0.0, le=100.0)
        top_k: _integer(1, 2**31 - 1) | None = None
        top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
        guidance: float = Field(default=min(max(1.0, guide_lo), guide_hi), ge=guide_lo, le=guide_hi)
        seed: _integer(0, 2**62) = 0
        # None: the model's own length (an mmgpt image's code count, 64 for a text model).
        max_new_tokens: _integer(int(new_lo), int(new_hi)) | None = None

    return RequestModels(EmbedText, EmbedImage, ZeroShot, Items, Search, Generate)


class Error(BaseModel):
    """Every error answer: 4xx and 5xx alike."""

    detail: str = Field(description="what was wrong, naming the field or limit")


class Embeddings(BaseModel):
    model: str
    fingerprint: str
    dim: int
    embeddings: list[list[float]] = Field(description="[n, dim], unit norm")
    cached: list[bool] = Field(description="per item: served from the store")


class Ranked(BaseModel):
    label: str
    prob: float
    logit: float


class Ranking(BaseModel):
    ranking: list[Ranked] = Field(description="every label once, most probable first")


class StoredKeys(BaseModel):
    keys: list[str] = Field(description="store keys of the texts, then of the images")


class Hit(BaseModel):
    key: str
    score: float
    meta: str | None = Field(description="the text, or 'image'")


class SearchResults(BaseModel):
    results: list[Hit] = Field(description="best first")


class Token(BaseModel):
    """One generated token (a text model adds the text it adds to the decoded string)."""

    index: int
    token: int
    text: str | None = None


class Done(BaseModel):
    """The last event: every token, and the image (mmgpt) or the text and why it stopped."""

    done: Literal[True]
    tokens: list[int]
    image_png: str | None = Field(default=None, description="base64 PNG (mmgpt)")
    text: str | None = None
    stop_reason: Literal["eos", "length"] | None = None


class StreamError(BaseModel):
    """A failure after the stream began (the status line was already sent)."""

    error: str


class GenerationEvent(RootModel[Token | Done | StreamError]):
    """The JSON ``data`` of one server-sent event of ``/v1/generate``."""


class Serves(BaseModel):
    text: bool
    image: bool
    generate: bool
    store: bool


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    fingerprint: str
    serves: Serves
    info: dict[str, Any] = Field(description="the run's name and configuration")
