"""The HTTP face of a :class:`~fmm.serve.service.Service`: a FastAPI app (uvicorn runs it).

Routes (OpenAPI schema at ``/openapi.json``, interactive docs at ``/docs``)::

    POST /v1/embed/text   {"texts": [...]}                       -> {"embeddings", "cached", ...}
    POST /v1/embed/image  {"images": [b64 PNG or [C][H][W]]}     -> {"embeddings", "cached", ...}
    POST /v1/zeroshot     {"image", "labels": [...], "template"} -> {"ranking": [{label, prob, logit}]}
    POST /v1/items        {"texts": [...], "images": [...]}      -> {"keys": [...]}
    POST /v1/search       {"text" | "vector", "k"}               -> {"results": [{key, score}]}
    POST /v1/generate     {"prompt", ...}                        -> server-sent events, one per token
    GET  /healthz, GET /metrics

Bad input is a 4xx with a ``detail`` message, never a 500: malformed JSON and wrong types
422, a body over ``max_body_bytes`` 413, a capability the model lacks 404; a full queue is
503 (with ``Retry-After``), a request past its time budget 504.

fastapi is imported here only, so ``import fmm`` never needs it. Example::

    app = create_app(service)
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

import json
import time
from typing import Any

from fmm.serve.engine import Overloaded
from fmm.serve.metrics import Metrics
from fmm.serve.service import NotServed, Service

DEFAULT_MAX_BODY_BYTES = 8 * 2**20


def _front_door(app: Any, max_bytes: int, metrics: Metrics) -> Any:
    """ASGI middleware: answer 413 to a body over ``max_bytes`` (read no further), and count
    every response's status and latency. Plain ASGI, as Starlette's ``BaseHTTPMiddleware``
    costs a task and a stream per request."""

    async def too_large(send: Any, got: str) -> None:
        body = json.dumps(
            {"detail": f"request body is {got} bytes; this server accepts at most {max_bytes}"}
        ).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def read_body(scope: dict, receive: Any, send: Any) -> Any:
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return await too_large(send, length.decode())
        chunks, size, more = [], 0, True
        while more:  # chunked bodies have no length up front: count as they arrive
            message = await receive()
            if message["type"] != "http.request":
                return await app(scope, receive, send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > max_bytes:
                return await too_large(send, f"more than {size}")
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await app(scope, replay, send)

    async def middleware(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_and_watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await read_body(scope, receive, send_and_watch)
        finally:
            route = scope.get("route")  # set by the router; None: unknown path (bounded labels)
            metrics.count(f"http {status}")
            path = route.path if route is not None else "unmatched"
            metrics.observe_latency(path, time.perf_counter() - started)

    return middleware


def create_app(service: Service, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Any:
    """A FastAPI app serving ``service``; closing the app (uvicorn's shutdown) closes it."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    from fmm.serve import schemas

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await service.aclose()

    model = service.model
    app = FastAPI(
        title=f"fmm serve: {model.name}",
        description="Embeddings, zero-shot labels, search and generation from an fmm model.",
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

    def images_of(payloads: list, name: str) -> list:
        return [
            service.check_image(schemas.decode_image(p, model.image_shape, f"{name}[{i}]"))
            for i, p in enumerate(payloads)
        ]

    def embedded(vectors: Any, hits: list[bool]) -> JSONResponse:
        # Returned as a response so FastAPI skips walking the float lists to encode them.
        return JSONResponse(
            {
                "model": model.name,
                "fingerprint": model.fingerprint,
                "dim": vectors.shape[1],
                "embeddings": vectors.tolist(),
                "cached": hits,
            }
        )

    @app.post("/v1/embed/text", summary="Unit-norm text embeddings [n, dim]")
    async def embed_text(body: schemas.EmbedText):
        return embedded(*await service.embed_text(body.texts))

    @app.post("/v1/embed/image", summary="Unit-norm image embeddings [n, dim]")
    async def embed_image(body: schemas.EmbedImage):
        service.require("image")
        return embedded(*await service.embed_image(images_of(body.images, "images")))

    @app.post("/v1/zeroshot", summary="Labels ranked by probability for one image")
    async def zeroshot(body: schemas.ZeroShot):
        service.require("image")
        (image,) = images_of([body.image], "image")
        return {"ranking": await service.zeroshot(image, body.labels, template=body.template)}

    @app.post("/v1/items", summary="Embed and store items for search")
    async def items(body: schemas.Items):
        if not body.texts and not body.images:
            raise ValueError("items needs at least one of 'texts' or 'images'")
        images = images_of(body.images, "images") if body.images else []
        return {"keys": await service.add_items(body.texts, images)}

    @app.post("/v1/search", summary="Top-k stored items by cosine similarity")
    async def search(body: schemas.Search):
        return {"results": await service.search(k=body.k, text=body.text, vector=body.vector)}

    @app.post(
        "/v1/generate",
        summary="Generated tokens as server-sent events",
        response_class=StreamingResponse,
    )
    async def generate(body: schemas.Generate):
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

    @app.get("/healthz", summary="Liveness and what this server serves")
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

    @app.get("/metrics", summary="Request counts, batch sizes, queue depth, hit rate, latency")
    async def metrics():
        return service.snapshot()

    return _front_door(app, max_body_bytes, service.metrics)
