"""The HTTP face of a :class:`~train.serve.service.Service`: a FastAPI app behind a front door.

Routes (OpenAPI document at ``/openapi.json``, interactive docs at ``/docs``)::

    POST /v1/embed/text   {"texts": [...]}                       -> {"embeddings", "cached", ...}
    POST /v1/embed/image  {"images": [b64 PNG/JPEG or [C][H][W]]} -> {"embeddings", "cached", ...}
    POST /v1/zeroshot     {"image", "labels": [...], "template"} -> {"ranking": [{label, prob, logit}]}
    POST /v1/items        {"texts": [...], "images": [...]}      -> {"keys": [...]}
    POST /v1/search       {"text" | "vector", "k"}               -> {"results": [{key, score, meta}]}
    POST /v1/generate     {"prompt", ...}                        -> server-sent events, one per token
    GET  /healthz, GET /metrics

Every error is ``{"detail": str}``: 422 for a body that is not valid (not JSON, not UTF-8,
wrong types, out of range, an image that does not decode; the first few errors, each naming
its field, never the input), 415 for a body that is not ``application/json``, 413 for one
over the size limit, 408 for one too slow to arrive, 404 for a capability the model lacks or
an unknown path, 405 for a wrong method, 503 (``Retry-After``) when the queue, the buffered
bodies or the connections are full, 504 past the time budget. Malformed HTTP (400), headers
too slow (408) or too large (431) are answered before any route (:mod:`train.serve.server`).

Routes read the raw body (the front door has buffered it, bounded) and validate it in a
worker thread with the model's own request schemas (:mod:`train.serve.schemas`), which the
OpenAPI document declares. fastapi is imported here only, so ``import fmm`` never needs it.

Example::

    app = create_app(service, limits=HttpLimits())
    make_server(app, host="127.0.0.1", port=8000, limits=HttpLimits()).run()
"""

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
from typing import Any

from train.serve import bodies, images, openai_routes, schemas, server
from train.serve.engine import Overloaded
from train.serve.front_door import FrontDoor, HttpLimits
from train.serve.openmp import releasing
from train.serve.service import NotServed, Service

_log = logging.getLogger(__name__)

_WHY = {
    404: "The model lacks the capability (or the server a store)",
    405: "The path was called with a method it does not serve (see Allow)",
    408: "The body did not arrive in time",
    413: "The body is over the size limit",
    415: "The body is not application/json",
    422: "The body is not valid: the detail names the first fields at fault",
    503: "Overloaded (queue, buffered bodies or connections full): retry after Retry-After s",
    504: "The request took longer than the server's time budget",
}
_RETRY = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
_POSTED = (405, 408, 413, 415, 422, 503)
# Each server-sent event's `data` is one GenerationEvent as JSON.
_EVENTS = {
    "description": "one event per token, then a last one (`done`), or `error` after a failure "
    "mid-stream. A text model also refuses (422) a prompt whose tokens plus max_new_tokens "
    "pass its context, which no schema can state",
    "content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "contentMediaType": "application/json",
                                "contentSchema": {"$ref": "#/components/schemas/GenerationEvent"}}},
    }}},
}  # fmt: skip


def _errors(*codes: int) -> dict:
    return {
        code: {"model": schemas.Error, "description": _WHY[code]}
        | ({"headers": _RETRY} if code == 503 else {})
        for code in sorted(codes)
    }


def create_app(
    service: Service, *, limits: HttpLimits | None = None, parse_workers: int = 2
) -> Any:
    """The ASGI app serving ``service`` (a FastAPI app behind a
    :class:`~train.serve.front_door.FrontDoor` enforcing ``limits``). Closing it (uvicorn's
    shutdown) closes the service. ``parse_workers``: threads validating bodies."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import HTTPException
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or HttpLimits()
    model = service.model
    bodies_of = schemas.request_models(model.image_shape, model.dim, model.generate_limits)
    budgets = {name: bodies.json_budget(getattr(bodies_of, name)) for name in
               ("EmbedText", "EmbedImage", "ZeroShot", "Items", "Search", "Generate")}  # fmt: skip
    parse_pool = concurrent.futures.ThreadPoolExecutor(parse_workers, "fmm-parse")
    tcp_at_start = server.tcp_counters()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        parse_pool.shutdown(wait=False, cancel_futures=True)
        await service.aclose()

    app = FastAPI(
        title=f"fmm serve: {model.name}",
        description="Embeddings, zero-shot labels, search and generation from an fmm model. "
        f"Images: base64 {' or '.join(images.ACCEPTED_FORMATS)} (at most "
        f"{images.MAX_IMAGE_SIDE} pixels a side), or nested lists [C][H][W] of floats in "
        "[0, 1]. Before any route: 400 for malformed HTTP, 408 for headers too slow, 431 for "
        "headers too large, 503 when the connections are full.",
        version=model.fingerprint[:12],
        lifespan=lifespan,
    )

    def error(status: int, detail: str, **headers: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)

    @app.exception_handler(ValueError)
    async def _bad_value(_request: Request, e: ValueError) -> JSONResponse:
        return error(422, str(e))

    @app.exception_handler(NotServed)
    async def _not_served(_request: Request, e: NotServed) -> JSONResponse:
        return error(404, str(e))

    @app.exception_handler(Overloaded)
    async def _overloaded(_request: Request, e: Overloaded) -> JSONResponse:
        return error(503, str(e), **{"Retry-After": "1"})

    @app.exception_handler(TimeoutError)
    async def _timeout(_request: Request, _e: TimeoutError) -> JSONResponse:
        return error(504, f"the request took longer than the server's {service.timeout}s budget")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, e: HTTPException) -> JSONResponse:  # 404, 405
        return error(e.status_code, str(e.detail), **(e.headers or {}))

    @app.exception_handler(_NotJson)
    async def _not_json(_request: Request, e: _NotJson) -> JSONResponse:
        return error(415, str(e))

    @app.exception_handler(Exception)
    async def _bug(_request: Request, e: Exception) -> JSONResponse:
        _log.exception("unexpected error")
        return error(500, f"internal error ({type(e).__name__}); see the server's log")

    def documented(name: str) -> dict:
        # The route reads its body itself; the OpenAPI document still declares its schema.
        ref = {"$ref": f"#/components/schemas/{name}"}
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}

    async def parse(request: Request, name: str, images_in: dict[str, bool] | None = None):
        """``(body, {field: decoded images})``; ``images_in``: {field: holds a list}."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise _NotJson(f"send the body as application/json, not {kind[:60]!r}")
        raw = await request.body()
        cls, budget = getattr(bodies_of, name), budgets[name]

        def work() -> tuple[Any, dict]:
            body = bodies.parse_body(cls, raw, budget)
            decoded = {}
            for field, many in (images_in or {}).items():
                value = getattr(body, field)
                if many:
                    decoded[field] = [decode(p, f"{field}[{i}]") for i, p in enumerate(value)]
                else:
                    decoded[field] = decode(value, field)
            return body, decoded

        return await asyncio.get_running_loop().run_in_executor(parse_pool, releasing(work))

    def decode(payload: str | list, name: str) -> Any:
        if isinstance(payload, str):
            image = images.decode_image(payload, model.image_shape, name)
        else:
            image = images.image_from_lists(payload, name)
        return service.check_image(image, name)

    def embedded(vectors: Any, hits: list[bool]) -> JSONResponse:
        # Returned as a response so FastAPI skips walking the float lists to encode them.
        return JSONResponse({"model": model.name, "fingerprint": model.fingerprint,
                             "dim": vectors.shape[1], "embeddings": vectors.tolist(),
                             "cached": hits})  # fmt: skip

    def post(path: str, name: str, summary: str, answer: Any, *codes: int, **kw: Any) -> Any:
        return app.post(path, summary=summary, openapi_extra=documented(name),
                        responses=_errors(*_POSTED, *codes), response_model=answer, **kw)  # fmt: skip

    @post("/v1/embed/text", "EmbedText", "Unit-norm text embeddings [n, dim]",
          schemas.Embeddings, 404, 504)  # fmt: skip
    async def embed_text(request: Request):
        service.require("text")
        body, _ = await parse(request, "EmbedText")
        return embedded(*await service.embed_text(body.texts))

    @post("/v1/embed/image", "EmbedImage", "Unit-norm image embeddings [n, dim]",
          schemas.Embeddings, 404, 504)  # fmt: skip
    async def embed_image(request: Request):
        service.require("image")
        _, decoded = await parse(request, "EmbedImage", {"images": True})
        return embedded(*await service.embed_image(decoded["images"]))

    @post("/v1/zeroshot", "ZeroShot", "Labels ranked by probability for one image",
          schemas.Ranking, 404, 504)  # fmt: skip
    async def zeroshot(request: Request):
        service.require("image")
        service.require("text")
        body, decoded = await parse(request, "ZeroShot", {"image": False})
        ranking = await service.zeroshot(decoded["image"], body.labels, template=body.template)
        return {"ranking": ranking}

    @post("/v1/items", "Items", "Embed and store items for search", schemas.StoredKeys, 404, 504)
    async def items(request: Request):
        service.require_store("keep items")
        body, decoded = await parse(request, "Items", {"images": True})
        return {"keys": await service.add_items(body.texts, decoded["images"])}

    @post("/v1/search", "Search", "Top-k stored items by cosine similarity",
          schemas.SearchResults, 404, 504)  # fmt: skip
    async def search(request: Request):
        service.require_store("search items")
        body, _ = await parse(request, "Search")
        return {"results": await service.search(k=body.k, text=body.text, vector=body.vector)}

    @app.post("/v1/generate", summary="Generated tokens as server-sent events",
              openapi_extra=documented("Generate"), response_class=StreamingResponse,
              responses={200: _EVENTS, **_errors(*_POSTED, 404)})  # fmt: skip
    async def generate(request: Request):
        service.require_generate()
        body, _ = await parse(request, "Generate")
        events = service.generate(
            body.prompt, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
            guidance=body.guidance, seed=body.seed, max_new_tokens=body.max_new_tokens,
        )  # fmt: skip
        # The first event is awaited here, so refusals and bad options become status codes.
        first = await anext(events)

        async def stream():
            yield f"data: {json.dumps(first)}\n\n"
            try:
                async for event in events:
                    yield f"data: {json.dumps(event)}\n\n"
            except Exception as e:  # the status line is sent: report in-band, end the stream
                yield f"data: {json.dumps({'error': f'{type(e).__name__}: {e}'})}\n\n"
            finally:  # also on a client that went away: stop the model now, not at GC
                await events.aclose()

        return StreamingResponse(stream(), media_type="text/event-stream")

    openai_routes.mount(app, service, parse_pool)  # /v1/completions, /v1/embeddings, /v1/models

    @app.get("/healthz", summary="Liveness and what this server serves",
             response_model=schemas.Health, responses=_errors(405, 503))  # fmt: skip
    async def healthz():
        engine = service.engine
        return {
            "status": "ok",
            "model": model.name,
            "fingerprint": model.fingerprint,
            "serves": {
                "text": engine is not None and "text" in engine.batchers,
                "image": engine is not None and "image" in engine.batchers,
                "generate": model.generate is not None,
                "store": service.store is not None,
            },
            "info": model.info,
        }

    @app.get("/metrics", summary="Request counts, batches, queue depth, hit rate, latency, store",
             response_model=dict[str, Any], responses=_errors(405, 503))  # fmt: skip
    async def metrics():
        return {
            **service.snapshot(),
            **door.gauges(),
            "store": await service.store_stats(),
            "tcp": _tcp_report(tcp_at_start, limits.backlog),
        }

    _declare_bodies(app, bodies_of)
    door = FrontDoor(app, limits, service.metrics)
    return door


class _NotJson(Exception):
    """A body sent as something other than ``application/json`` (answered 415)."""


def _declare_bodies(app: Any, bodies_of: schemas.RequestModels) -> None:
    # The routes read raw bodies, so FastAPI does not know their models: add their schemas
    # to the OpenAPI document's components, where the routes' requestBody refer to them.
    from pydantic.json_schema import models_json_schema

    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = build()
            classes = [getattr(bodies_of, f.name) for f in dataclasses.fields(bodies_of)]
            classes.append(schemas.GenerationEvent)
            _, defs = models_json_schema(
                [(cls, "validation") for cls in classes],
                ref_template="#/components/schemas/{model}",
            )
            document.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        return app.openapi_schema

    app.openapi = openapi


def _tcp_report(at_start: dict | None, backlog: int) -> dict:
    """The listen queue's size and the kernel's drops and resets since the app started."""
    cap, now = server.somaxconn(), server.tcp_counters()
    since = {k: now[k] - at_start[k] for k in now} if now and at_start else {}
    return {
        "backlog": backlog if cap is None else min(backlog, cap),
        "counted_for": "the whole network namespace (other servers' count too)",
        **{k: since.get(k) for k in server.tcp_counter_names()},
    }
