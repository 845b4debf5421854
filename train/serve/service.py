"""What a server serves: a model's functions (:class:`ServedModel`) behind an engine and a store.

:class:`Service` is the HTTP-free core of ``train.serve.app``: every endpoint is one of its
coroutines, so it can be tested and embedded without a web framework. It knows no model by
name; ``train/recipes/serve.py`` builds a :class:`ServedModel` from a checkpoint.

Example::

    service = Service(ServedModel(name="clip", fingerprint=fp, dim=64, embed_text=f), store=store)
    vectors, hits = await service.embed_text(["a red circle"])   # [1, 64], [False]
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from fmm.templates import check_template, fill_template
from train.serve.engine import Engine, Overloaded
from train.serve.metrics import Metrics
from train.serve.openmp import releasing


class NotServed(LookupError):
    """The served model (or the server's configuration) has no such capability."""


@dataclass(frozen=True, kw_only=True)
class ServedModel:
    """A model as a server sees it. Any capability may be ``None`` (its endpoints say so).

    - ``embed_text(texts: list[str]) -> [n, dim]`` unit-norm embeddings.
    - ``embed_image(images: list[[C, H, W] float in [0, 1]]) -> [n, dim]`` unit-norm.
    - ``image_shape``: ``(C, H, W)`` the image encoder takes.
    - ``logit_scale``: zero-shot logits are ``logit_scale * image @ text.T``.
    - ``generate(prompt, *, stop, **options) -> Iterator[dict]``: events, one per generated
      token (``{"index", "token"}``), then a last one; it returns early once ``stop`` is set.
    - ``generate_limits``: ``{"max_new_tokens" | "guidance": (low, high)}``, the ranges of
      ``generate``'s options the model takes (an mmgpt image's fixed code count), so that
      the OpenAPI document states them.
    - ``tokenize(texts: list[str]) -> list[list[int]]``: the token ids the model reads for
      each text (the OpenAI-compatible routes' ``usage`` counts them); a text model's
      ``generate`` also takes a prompt as such ids, each in ``[0, vocab_size)``.
    - ``fingerprint``: identifies config and weights (``train.store.model_fingerprint``).
    """

    name: str
    fingerprint: str
    dim: int | None = None
    embed_text: Callable[[list[str]], torch.Tensor] | None = None
    embed_image: Callable[[list[torch.Tensor]], torch.Tensor] | None = None
    image_shape: tuple[int, int, int] | None = None
    logit_scale: float = 1.0
    generate: Callable[..., Iterator[dict]] | None = None
    generate_limits: dict[str, tuple[float, float]] = field(default_factory=dict)
    tokenize: Callable[[list[str]], list[list[int]]] | None = None
    vocab_size: int | None = None
    info: dict = field(default_factory=dict)


def _pixel_key(image: torch.Tensor) -> bytes:
    # Same pixels, same key, whether they arrived as PNG or as nested lists.
    return image.to(torch.float32).contiguous().numpy().tobytes()


class Service:
    """Endpoints' logic: embeddings through the batching engine and the store, zero-shot
    ranking, top-k search, streamed generation, metrics.

    ``timeout_s``: per-request budget for embeddings (``TimeoutError`` past it);
    ``max_generations``: concurrent generations before :class:`Overloaded`. Other
    arguments go to :class:`~train.serve.engine.Engine`.
    """

    def __init__(
        self,
        model: ServedModel,
        *,
        store: Any = None,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        timeout_s: float | None = 30.0,
        max_generations: int = 2,
    ):
        self.model, self.store, self.timeout = model, store, timeout_s
        self.metrics = Metrics()
        fns = {}
        if model.embed_text is not None:
            fns["text"] = model.embed_text
        if model.embed_image is not None:
            fns["image"] = lambda images: model.embed_image(list(images))
        self.engine = (
            Engine(
                fns,
                store=store,
                max_batch=max_batch,
                max_wait_ms=max_wait_ms,
                max_queue=max_queue,
                metrics=self.metrics,
            )
            if fns
            else None
        )
        self.max_generations = max_generations
        self._generating = 0
        self._gen_pool = concurrent.futures.ThreadPoolExecutor(
            max(1, max_generations), thread_name_prefix="fmm-generate"
        )

    def require(self, kind: str) -> None:
        """:class:`NotServed` unless the model has a ``kind`` (``"text"``/``"image"``) encoder."""
        if self.engine is None or kind not in self.engine.batchers:
            raise NotServed(f"model {self.model.name!r} has no {kind} encoder")

    def require_store(self, to: str) -> None:
        """:class:`NotServed` unless the server has a store (``to``: what it is needed for)."""
        if self.store is None:
            raise NotServed(f"no store: start the server with --store PATH to {to}")

    def require_generate(self) -> None:
        """:class:`NotServed` unless the model generates."""
        if self.model.generate is None:
            raise NotServed(f"model {self.model.name!r} does not generate")

    def _keys(self, kind: str, payloads: list) -> list[str] | None:
        if self.store is None:
            return None
        from train.store import content_key

        return [content_key(kind, p) for p in payloads]

    async def embed_text(self, texts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """``(embeddings [n, dim], store hit per text)``."""
        self.require("text")
        keys = self._keys("text", texts)
        meta = list(texts)
        return await self.engine.embed("text", texts, keys=keys, meta=meta, timeout=self.timeout)

    def check_image(self, image: torch.Tensor, name: str = "image") -> torch.Tensor:
        """``image`` as float32 ``[C, H, W]`` in ``[0, 1]``, or ``ValueError`` naming the shape."""
        self.require("image")
        want = self.model.image_shape
        if image.ndim != 3 or (want is not None and tuple(image.shape) != tuple(want)):
            raise ValueError(f"{name} must have shape {list(want)}, got {list(image.shape)}")
        if not bool(torch.isfinite(image).all()) or image.min() < 0 or image.max() > 1:
            raise ValueError(f"{name} pixels must be finite and lie in [0, 1]")
        return image.to(torch.float32)

    async def embed_image(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[bool]]:
        """``(embeddings [n, dim], store hit per image)`` of ``[C, H, W]`` images in [0, 1]."""
        images = [self.check_image(im, f"images[{i}]") for i, im in enumerate(images)]
        keys = self._keys("image", [_pixel_key(im) for im in images])
        meta = ["image"] * len(images)
        return await self.engine.embed("image", images, keys=keys, meta=meta, timeout=self.timeout)

    async def zeroshot(
        self, image: torch.Tensor, labels: list[str], *, template: str = "{}"
    ) -> list[dict]:
        """Labels ranked by probability for one image: ``[{"label", "prob", "logit"}]``.

        Each label is embedded as ``fmm.templates.fill_template(template, label)`` (exactly
        one ``{}``; ``{{``/``}}`` for literal braces); logits are ``logit_scale * cosine``,
        probabilities their softmax over the labels.
        """
        self.require("text")
        check_template(template)
        img, _ = await self.embed_image([image])
        txt, _ = await self.embed_text([fill_template(template, label) for label in labels])
        logits = self.model.logit_scale * (img @ txt.T)[0]
        probs = logits.softmax(-1)
        order = probs.argsort(descending=True).tolist()
        return [
            {"label": labels[i], "prob": probs[i].item(), "logit": logits[i].item()} for i in order
        ]

    async def add_items(self, texts: list[str], images: list[torch.Tensor]) -> list[str]:
        """Embed ``texts`` then ``images`` and store them as pinned rows (kept, searchable,
        never evicted: only this route grows the store's pinned part); their keys, in order.
        No items: no keys."""
        self.require_store("keep items")
        checked = [self.check_image(im, f"images[{i}]") for i, im in enumerate(images)]
        batches = [("text", texts, texts, texts), ("image", checked, ["image"] * len(checked),
                   [_pixel_key(im) for im in checked])]  # fmt: skip
        order: list[str] = []
        vectors: dict[str, torch.Tensor] = {}
        meta: dict[str, str] = {}
        for kind, items, labels, payloads in batches:
            if not items:
                continue
            self.require(kind)
            keys = self._keys(kind, payloads)
            # keep=False: the engine would store them as cached rows; they are pinned below.
            got, _ = await self.engine.embed(
                kind, items, keys=keys, timeout=self.timeout, keep=False
            )
            order += keys
            vectors.update(zip(keys, got))
            meta.update(zip(keys, labels))
        if vectors:
            await self.engine.in_store_thread(self.store.put_many, vectors, meta=meta, pinned=True)
        return order

    async def search(
        self, *, k: int, text: str | None = None, vector: list[float] | None = None
    ) -> list[dict]:
        """Top-``k`` stored items by cosine to a text's embedding or a given vector:
        ``[{"key", "score", "meta"}]``, best first (``meta``: the text, or ``"image"``).
        A query text is looked up in the store but not added to it."""
        self.require_store("search items")
        if (text is None) == (vector is None):
            raise ValueError("search needs exactly one of 'text' or 'vector'")
        if text is not None:
            self.require("text")
            keys = self._keys("text", [text])
            vectors, _ = await self.engine.embed(
                "text", [text], keys=keys, timeout=self.timeout, keep=False
            )
            query = vectors[0]
        else:
            query = torch.tensor(vector, dtype=torch.float64)
            if self.model.dim is not None and query.shape != (self.model.dim,):
                raise ValueError(
                    f"vector must have {self.model.dim} numbers, got {list(query.shape)}"
                )
            if not bool(query.isfinite().all()):
                raise ValueError("vector: every number must be finite")
            # Cosine ignores scale: bring the largest to 1 so float32 neither overflows nor
            # flushes to zero (1e300 or 1e-300 entries are a valid query).
            peak = query.abs().max()
            query = (query / peak if peak > 0 else query).to(torch.float32)
        loop = asyncio.get_running_loop()

        def top_k() -> list[dict]:
            scores, keys = self.store.search(query, k)
            meta = self.store.meta_many(keys[0]) if keys[0] else {}
            return [
                {"key": key, "score": s, "meta": meta.get(key)}
                for key, s in zip(keys[0], scores[0].tolist())
            ]

        return await loop.run_in_executor(None, top_k)

    async def generate(self, prompt: str | list[int], **options: Any) -> AsyncIterator[dict]:
        """Events of one generation as they are produced (see :class:`ServedModel`).

        The model runs in a generation thread; closing the iterator (a client that went
        away) stops it at the next token and frees its slot.
        """
        self.require_generate()
        if self._generating >= self.max_generations:
            self.metrics.count("refused_overloaded")
            raise Overloaded(
                f"{self._generating} generations running (max {self.max_generations}); retry later"
            )
        self._generating += 1
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        end = object()

        def produce() -> None:
            try:
                with torch.inference_mode():
                    for event in self.model.generate(prompt, stop=stop, **options):
                        if stop.is_set():
                            break
                        loop.call_soon_threadsafe(events.put_nowait, event)
            except Exception as e:  # handed to the consumer, raised there
                loop.call_soon_threadsafe(events.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(events.put_nowait, end)

        worker = loop.run_in_executor(self._gen_pool, releasing(produce))
        try:
            while (event := await events.get()) is not end:
                if isinstance(event, Exception):
                    raise event
                yield event
        finally:
            stop.set()
            self._generating -= 1
            await asyncio.shield(worker)

    def snapshot(self) -> dict:
        """The ``GET /metrics`` figures: counters, batches, hit rate, latencies, queue depth."""
        depth = self.engine.depth if self.engine is not None else 0
        return self.metrics.snapshot(queue_depth=depth, generations_running=self._generating)

    async def store_stats(self) -> dict | None:
        """The store's ``stats()`` (``{"pinned", "cached", "cached_bytes", "evicted"}``), read
        in the store's thread; ``None`` without a store."""
        if self.store is None:
            return None
        if self.engine is None:
            return await asyncio.get_running_loop().run_in_executor(None, self.store.stats)
        return await self.engine.in_store_thread(self.store.stats)

    async def aclose(self) -> None:
        """Stop the engine and the generation threads."""
        if self.engine is not None:
            await self.engine.aclose()
        self._gen_pool.shutdown(wait=False, cancel_futures=True)
