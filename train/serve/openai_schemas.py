"""Bodies of the OpenAI-compatible routes (:mod:`train.serve.openai_routes`), every list bounded.

They follow OpenAI's completions and embeddings APIs. Options this server does not implement
are declared with the one value that means "off" (``n``: 1, ``echo``: false, ``logprobs``:
null, ...), so a client that asks for more is refused with a message naming the option,
rather than silently served something else; unknown fields are refused too, as OpenAI does.

Example::

    bodies = openai_request_models("gpt2", max_new_tokens=1024)
    bodies.Completion.model_validate_json(b'{"model": "gpt2", "prompt": "Once"}')
"""

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from train.serve.schemas import (
    MAX_NEW_TOKENS,
    MAX_TEXT_CHARS,
    MAX_TEXTS,
    MAX_VECTOR,
    _bounded,
    _integer,
)

MAX_PROMPTS = 16  # prompts of one completion request (each is one generation)
MAX_PROMPT_CHARS = 32_000  # a whole GPT-2 context of text, with room
MAX_PROMPT_TOKENS = 8_192
MAX_STOPS = 4  # OpenAI's own limit
MAX_STOP_CHARS = 64
MAX_VOCAB = 2**31 - 1
COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens


def _off(value: bool) -> bool:
    if value:
        raise ValueError("this server does not implement it: leave it false")
    return value


# false only (Literal[False] would take a JSON 0 as well).
Off = Annotated[bool, AfterValidator(_off), Field(json_schema_extra={"const": False})]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class OpenAIErrorBody(BaseModel):
    message: str = Field(description="what was wrong, naming the field or limit")
    type: str = Field(description="invalid_request_error, not_found_error, server_error, ...")
    param: str | None = Field(description="the request field at fault, if one is")
    code: str | None = None


class OpenAIError(BaseModel):
    """Every error answer of the OpenAI-compatible routes, in OpenAI's shape."""

    error: OpenAIErrorBody


class StreamOptions(_Strict):
    include_usage: bool = False


@dataclass(frozen=True)
class OpenAIRequestModels:
    """The request bodies of one served model (see :func:`openai_request_models`)."""

    Completion: type[BaseModel]
    Embedding: type[BaseModel]


def openai_request_models(
    name: str,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    vocab_size: int | None = None,
    dim: int | None = None,
) -> OpenAIRequestModels:
    """Request bodies of ``/v1/completions`` for the model called ``name`` generating at
    most ``max_new_tokens`` a request (its context) from token ids below ``vocab_size``,
    and of ``/v1/embeddings`` for its ``dim``-wide text embeddings (``None``: any width up
    to ``MAX_VECTOR``)."""
    Name = Annotated[Literal[name], Field(description="the served model (GET /v1/models)")]
    high = min(max_new_tokens, MAX_NEW_TOKENS)
    Ids = _bounded(_integer(0, (vocab_size or MAX_VOCAB) - 1), 1, min(high, MAX_PROMPT_TOKENS))
    Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]

    class Completion(_Strict):
        model: Name
        prompt: Prompt | _bounded(Prompt, 1, MAX_PROMPTS) | Ids | _bounded(Ids, 1, MAX_PROMPTS) = (
            Field(description="a text, texts, token ids, or lists of token ids")
        )
        max_tokens: _integer(1, high) | None = Field(
            default=min(COMPLETION_DEFAULT_TOKENS, high),
            description="new tokens per prompt (null: as many as the context holds); a "
            "prompt's tokens plus max_tokens - 1 must fit the context (else 400), which no "
            "schema can state",
        )
        temperature: float = Field(default=1.0, ge=0.0, le=2.0)
        top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
        top_k: _integer(1, MAX_VOCAB) | None = Field(default=None, description="an extension")
        n: _integer(1, 1) = Field(default=1, description="this server draws one choice a prompt")
        best_of: _integer(1, 1) | None = None
        stop: Stop | _bounded(Stop, 0, MAX_STOPS) | None = None
        seed: _integer(0, 2**62) | None = Field(default=None, description="null: a fresh one")
        stream: bool = False
        stream_options: StreamOptions | None = None
        echo: Off = False
        logprobs: None = None
        suffix: None = None
        presence_penalty: Annotated[float, Field(ge=0.0, le=0.0)] = 0.0
        frequency_penalty: Annotated[float, Field(ge=0.0, le=0.0)] = 0.0
        user: Annotated[str, Field(max_length=256)] | None = None

    Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]

    class Embedding(_Strict):
        model: Name
        input: Text | _bounded(Text, 1, MAX_TEXTS)
        encoding_format: Literal["float", "base64"] = Field(
            default="float", description="base64: each vector's little-endian float32 bytes"
        )
        dimensions: _integer(dim or 1, dim or MAX_VECTOR) | None = Field(
            default=None, description="the model's own width, the one served"
        )
        user: Annotated[str, Field(max_length=256)] | None = None

    return OpenAIRequestModels(Completion, Embedding)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionChoice(BaseModel):
    text: str
    index: int
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionAnswer(BaseModel):
    """The answer of ``/v1/completions``, and (with ``usage`` null, ``finish_reason`` null
    until a choice's last chunk) each streamed chunk's ``data``."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="unit norm; a base64 string if asked")


class EmbeddingAnswer(BaseModel):
    object: Literal["list"]
    data: list[EmbeddingItem]
    model: str
    usage: Usage


def error_body(message: str, *, kind: str, param: str | None = None) -> dict[str, Any]:
    """An :class:`OpenAIError` as a dict."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
