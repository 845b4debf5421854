"""OpenAI-compatible routes beside fmm's own, so that clients written for that API just work.

::

    POST /v1/completions  {"model", "prompt", "max_tokens", "temperature", "top_p", "stop",
                           "seed", "stream"}  -> {"choices": [{"text", "finish_reason"}], "usage"}
                           (or, with "stream": true, server-sent chunks, then "data: [DONE]")
    POST /v1/embeddings   {"model", "input", "encoding_format"} -> {"data": [{"embedding"}]}
    GET  /v1/models       -> {"data": [{"id": the served model's name}]}

Completions need a model that generates text (a GPT); embeddings one with a text encoder;
``model`` must be the served model's name (``GET /v1/models``; the document states it). Generation goes through
:meth:`~train.serve.service.Service.generate`, the same path as ``/v1/generate``: a prompt
given as text is tokenised once, in the parse thread, and generated from as those ids. A
``stop`` string is found in the decoded text as it grows (text that could begin one is held
back until it cannot), the generation is stopped there and the text cut before it.

Errors come in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for
a body that is not valid (naming ``param``, the first field at fault, including another ``model``, ``n`` > 1
and the other options this server does not implement), 404 for a capability the model lacks, 415 for a body that is not JSON, 503 when the generations are all busy, 504
past the time budget. What the front door answers before any route (408, 413, 503 for the
buffered bytes) keeps fmm's ``{"detail"}`` shape. Bounds (prompts, prompt tokens plus
``max_tokens`` against the context, inputs) are checked before any work.

Example::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="gpt2", prompt="Once upon", max_tokens=8).choices[0].text
"""

import asyncio
import base64
import json
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from train.serve import bodies, schemas
from train.serve.engine import Overloaded
from train.serve.openai_schemas import (
    CompletionAnswer,
    EmbeddingAnswer,
    OpenAIError,
    error_body,
    openai_request_models,
)
from train.serve.openmp import releasing
from train.serve.service import NotServed, Service

_RETRY = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}


class _Refused(Exception):
    """An answer in OpenAI's error shape: ``status``, ``kind``, ``param``."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


_FIELD = re.compile(r"([A-Za-z_][\w.\[\]]*):")


def _param(message: str) -> str | None:
    # bodies.describe and the generation path start their messages with the field's path.
    match = _FIELD.match(message)
    return match.group(1) if match else None


def _refusal(e: Exception, timeout: float | None) -> _Refused:
    if isinstance(e, _Refused):
        return e
    if isinstance(e, ValueError):
        return _Refused(400, str(e), "invalid_request_error", _param(str(e)))
    if isinstance(e, NotServed):
        return _Refused(404, str(e), "not_found_error")
    if isinstance(e, Overloaded):
        return _Refused(503, str(e), "server_overloaded")
    if isinstance(e, TimeoutError):
        return _Refused(504, f"the request took longer than the server's {timeout}s budget",
                        "timeout")  # fmt: skip
    raise e


class _StopScan:
    """Text pieces in, the text safe to send out: any part that could begin a stop string
    is held back until it cannot; :meth:`feed` says when one is complete (cut before it)."""

    def __init__(self, stops: list[str]):
        self.stops, self.held = stops, ""

    def feed(self, piece: str) -> tuple[str, bool]:
        text = self.held + piece
        found = [at for at in (text.find(s) for s in self.stops) if at >= 0]
        if found:
            self.held = ""
            return text[: min(found)], True
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)  # fmt: skip
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


async def _choice(events: AsyncIterator[dict], first: dict, stops: list[str]) -> AsyncIterator:
    """``("text", piece)`` items, one a token (``piece``: the text it lets out, maybe
    empty), then ``("end", finish_reason, tokens generated)``; closes ``events`` when done
    or at a stop string."""
    scan, count, event, seen = _StopScan(stops), 0, first, ""
    try:
        while True:
            if "done" in event:  # its text may end with what no token's piece held yet
                piece, hit = scan.feed(event["text"][len(seen) :])
                if piece := piece + ("" if hit else scan.flush()):
                    yield "text", piece
                reason = "stop" if hit or event["stop_reason"] == "eos" else "length"
                yield "end", reason, count
                return
            count, seen = count + 1, seen + event["text"]
            piece, hit = scan.feed(event["text"])
            yield "text", piece
            if hit:
                yield "end", "stop", count
                return
            event = await anext(events)
    finally:
        await events.aclose()


def mount(app: Any, service: Service, parse_pool: Any) -> None:
    """Add the routes above to the FastAPI ``app`` serving ``service``; bodies are validated
    (and prompts tokenised) in ``parse_pool``'s threads."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, StreamingResponse

    model = service.model
    context = int(model.generate_limits.get("max_new_tokens", (1, schemas.MAX_NEW_TOKENS))[1])
    models_of = openai_request_models(
        model.name, max_new_tokens=context, vocab_size=model.vocab_size, dim=model.dim
    )
    budgets = {cls: bodies.json_budget(cls) for cls in (models_of.Completion, models_of.Embedding)}

    def refused(e: _Refused) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        body = error_body(str(e), kind=e.kind, param=e.param)
        return JSONResponse(body, status_code=e.status, headers=headers)

    async def parse(request: Request, cls: type, then: Any) -> tuple[Any, Any]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise _Refused(415, f"send the body as application/json, not {kind[:60]!r}",
                           "invalid_request_error")  # fmt: skip
        raw = await request.body()

        def work() -> tuple[Any, Any]:
            body = bodies.parse_body(cls, raw, budgets[cls])
            return body, then(body)

        return await asyncio.get_running_loop().run_in_executor(parse_pool, releasing(work))

    def prompt_ids(body: Any) -> list[list[int]]:
        # One list of ids per prompt; their length plus max_tokens must fit the context.
        prompt = body.prompt
        many = isinstance(prompt, list) and (not prompt or not isinstance(prompt[0], int))
        prompts = prompt if many else [prompt]
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(model.tokenize(texts) if texts else [])
        if len(prompts) > service.max_generations:  # could never be served at once
            raise ValueError(f"prompt: {len(prompts)} prompts, but this server runs at most "
                             f"{service.max_generations} generations at once")  # fmt: skip
        ids = [next(encoded) if isinstance(p, str) else p for p in prompts]
        for i, row in enumerate(ids):
            at = f"prompt[{i}]" if many else "prompt"
            if not row:
                raise ValueError(f"{at}: encodes to no tokens")
            room = context - len(row) + 1  # the last token drawn is never fed back
            if room < (body.max_tokens or 1):
                raise ValueError(f"max_tokens: {at} has {len(row)} tokens, so at most "
                                 f"{max(room, 0)} new ones fit this model's context of {context}")  # fmt: skip
        return ids

    def created() -> tuple[str, int]:
        return f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(ident: str, made: int, choices: list[dict], **more: Any) -> str:
        data = {"id": ident, "object": "text_completion", "created": made, "model": model.name,
                "choices": choices, **more}  # fmt: skip
        return f"data: {json.dumps(data)}\n\n"

    async def start(body: Any, ids: list[list[int]]) -> list[AsyncIterator]:
        """One item stream per prompt, each already past its first event (so refusals and
        bad options are status codes, not mid-stream errors)."""
        seed = body.seed if body.seed is not None else secrets.randbits(62)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        started: list[tuple[AsyncIterator, dict]] = []
        try:
            for row in ids:
                events = service.generate(
                    row, temperature=body.temperature, top_k=body.top_k,
                    top_p=None if body.top_p == 1.0 else body.top_p, seed=seed,
                    max_new_tokens=body.max_tokens or context - len(row) + 1,
                )  # fmt: skip
                started.append((events, None))
                started[-1] = (events, await anext(events))
        except BaseException:
            for events, _ in started:
                await events.aclose()
            raise
        return [_choice(events, first, stops) for events, first in started]

    errors = {
        **{code: {"model": OpenAIError, "description": why} for code, why in (
            (400, "The body is not valid: param names the first field at fault"),
            (404, "A capability this model lacks"),
            (415, "The body is not application/json"),
            (504, "The request took longer than the server's time budget"))},
        **{code: {"model": schemas.Error, "description": why} for code, why in (
            (405, "The path was called with a method it does not serve (see Allow)"),
            (408, "The body did not arrive in time"),
            (413, "The body is over the size limit"))},
        503: {"description": "Overloaded: retry after Retry-After s", "headers": _RETRY,
              "content": {"application/json": {"schema": {"anyOf": [
                  {"$ref": "#/components/schemas/OpenAIError"},
                  {"$ref": "#/components/schemas/Error"}]}}}},
    }  # fmt: skip

    def documented(cls: type) -> dict:
        ref = {"$ref": f"#/components/schemas/{cls.__name__}"}
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}

    # Each server-sent event's `data`: a chunk (one choice's new text), an error after a
    # failure mid-stream, or the last one, `[DONE]`.
    chunk_data = {
        "anyOf": [
            {"type": "string", "const": "[DONE]"},
            {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {
                    "anyOf": [
                        {"$ref": "#/components/schemas/CompletionAnswer"},
                        {"$ref": "#/components/schemas/OpenAIError"},
                    ]
                },
            },
        ]
    }
    streamed = {
        "description": "the answer, or with `stream`: server-sent events, one chunk a token "
        "(its text empty while held back: a character incomplete, a stop string possible), "
        "then `data: [DONE]`",
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {"data": chunk_data},
                }
            }
        },
    }

    @app.post("/v1/completions", summary="OpenAI-compatible text completion",
              openapi_extra=documented(models_of.Completion), response_model=CompletionAnswer,
              responses={200: streamed, **errors})  # fmt: skip
    async def completions(request: Request):
        try:
            service.require_generate()
            if model.tokenize is None:
                raise NotServed(f"model {model.name!r} does not generate text")
            body, ids = await parse(request, models_of.Completion, prompt_ids)
            choices = await start(body, ids)
        except Exception as e:
            return refused(_refusal(e, service.timeout))
        ident, made = created()
        if body.stream:
            return StreamingResponse(stream(body, ids, choices, ident, made),
                                     media_type="text/event-stream")  # fmt: skip
        texts, ends = [""] * len(ids), [None] * len(ids)
        try:
            await asyncio.gather(*(collect(c, i, texts, ends) for i, c in enumerate(choices)))
        except Exception as e:
            return refused(_refusal(e, service.timeout))
        finally:  # also on a client that went away: stop every generation now
            for choice in choices:
                await choice.aclose()
        made_tokens = sum(n for _, n in ends)
        return JSONResponse({
            "id": ident, "object": "text_completion", "created": made, "model": model.name,
            "choices": [{"text": t, "index": i, "finish_reason": r, "logprobs": None}
                        for i, (t, (r, _)) in enumerate(zip(texts, ends))],
            "usage": usage(ids, made_tokens),
        })  # fmt: skip

    async def collect(choice: AsyncIterator, i: int, texts: list, ends: list) -> None:
        async for item in choice:
            if item[0] == "text":
                texts[i] += item[1]
            else:
                ends[i] = item[1:]

    def usage(ids: list[list[int]], completion: int) -> dict:
        prompt = sum(len(row) for row in ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}  # fmt: skip

    async def stream(body, ids, choices, ident: str, made: int) -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, choice: AsyncIterator) -> None:
            try:
                async for item in choice:
                    await queue.put((i, item))
            except Exception as e:
                await queue.put((i, ("error", e)))

        tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(choices)]
        left, made_tokens = len(tasks), 0
        try:
            while left:
                i, item = await queue.get()
                if item[0] == "text":  # one chunk a token, its text empty if held back
                    yield chunk(ident, made, [{"text": item[1], "index": i,
                                               "finish_reason": None, "logprobs": None}])  # fmt: skip
                elif item[0] == "end":
                    left, made_tokens = left - 1, made_tokens + item[2]
                    yield chunk(ident, made, [{"text": "", "index": i, "finish_reason": item[1],
                                               "logprobs": None}])  # fmt: skip
                elif item[0] == "error":  # the status line is sent: say so in-band, then end
                    e = item[1]
                    yield f"data: {json.dumps(error_body(f'{type(e).__name__}: {e}', kind='server_error'))}\n\n"
                    return
            if body.stream_options is not None and body.stream_options.include_usage:
                yield chunk(ident, made, [], usage=usage(ids, made_tokens))
            yield "data: [DONE]\n\n"
        finally:  # also on a client that went away: stop every generation now
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for choice in choices:
                await choice.aclose()

    @app.post("/v1/embeddings", summary="OpenAI-compatible text embeddings (unit norm)",
              openapi_extra=documented(models_of.Embedding), response_model=EmbeddingAnswer,
              responses=errors)  # fmt: skip
    async def embeddings(request: Request):
        try:
            service.require("text")
            body, counts = await parse(request, models_of.Embedding, input_tokens)
            texts = [body.input] if isinstance(body.input, str) else body.input
            vectors, _ = await service.embed_text(texts)
        except Exception as e:
            return refused(_refusal(e, service.timeout))
        rows = vectors.to("cpu").float().numpy()
        as_base64 = body.encoding_format == "base64"
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode()
                 if as_base64 else row.tolist()} for i, row in enumerate(rows)]  # fmt: skip
        return JSONResponse({"object": "list", "data": data, "model": model.name,
                             "usage": {"prompt_tokens": counts, "total_tokens": counts}})  # fmt: skip

    def input_tokens(body: Any) -> int:
        texts = [body.input] if isinstance(body.input, str) else body.input
        return sum(map(len, model.tokenize(texts))) if model.tokenize is not None else 0

    @app.get("/v1/models", summary="OpenAI-compatible list of the served model",
             responses={405: errors[405]})  # fmt: skip
    async def models():
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": 0,
                                            "owned_by": "fmm"}]}  # fmt: skip

    _declare(app, [models_of.Completion, models_of.Embedding, OpenAIError])


def _declare(app: Any, classes: list[type]) -> None:
    # The routes read raw bodies: add their schemas to the OpenAPI document's components.
    from pydantic.json_schema import models_json_schema

    build = app.openapi

    def openapi() -> dict:
        document = build()
        _, defs = models_json_schema(
            [(cls, "validation") for cls in classes], ref_template="#/components/schemas/{model}"
        )
        document.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        return document

    app.openapi = openapi
