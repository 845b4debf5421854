"""Serving: an asyncio engine with dynamic batching in front of a model, and an HTTP app.

- :mod:`fmm.serve.engine`: :class:`Batcher` / :class:`Engine` (max batch, max wait, bounded
  queue refusing with :class:`Overloaded`, timeouts and cancellation, store lookups).
- :mod:`fmm.serve.service`: :class:`ServedModel` (a model's functions) and :class:`Service`
  (every endpoint's logic, HTTP-free).
- :mod:`fmm.serve.app`: ``create_app(service, limits=...)``, the FastAPI app behind the
  front door (imports fastapi lazily); :mod:`fmm.serve.schemas` its bodies, built per
  model; :mod:`fmm.serve.bodies` raw bytes to validated bodies, work bounded first;
  :mod:`fmm.serve.images` PNG/JPEG and pixel lists to tensors, sizes checked first.
- :mod:`fmm.serve.front_door`: :class:`~fmm.serve.front_door.HttpLimits` and the ASGI
  middleware bounding every body in bytes and time; :mod:`fmm.serve.server`: uvicorn with a
  header deadline and size and a connection cap (``make_server``), the kernel's counters.

``python -m train serve --ckpt DIR`` wires a trained checkpoint to all of it.
"""

from fmm.serve.engine import Batcher, Engine, EngineClosed, Overloaded
from fmm.serve.metrics import Metrics, percentile
from fmm.serve.service import NotServed, ServedModel, Service

__all__ = [
    "Batcher",
    "Engine",
    "EngineClosed",
    "Metrics",
    "NotServed",
    "Overloaded",
    "ServedModel",
    "Service",
    "percentile",
]
