"""Serving: an asyncio engine with dynamic batching in front of a model, and an HTTP app.

- :mod:`train.serve.engine`: :class:`Batcher` / :class:`Engine` (max batch, max wait, bounded
  queue refusing with :class:`Overloaded`, timeouts and cancellation, store lookups).
- :mod:`train.serve.service`: :class:`ServedModel` (a model's functions) and :class:`Service`
  (every endpoint's logic, HTTP-free).
- :mod:`train.serve.app`: ``create_app(service, limits=...)``, the FastAPI app behind the
  front door (imports fastapi lazily); :mod:`train.serve.schemas` its bodies, built per
  model; :mod:`train.serve.bodies` raw bytes to validated bodies, work bounded first;
  :mod:`train.serve.images` PNG/JPEG and pixel lists to tensors, sizes checked first.
- :mod:`train.serve.front_door`: :class:`~train.serve.front_door.HttpLimits` and the ASGI
  middleware bounding every body in bytes and time; :mod:`train.serve.server`: uvicorn with a
  header deadline and size and a connection cap (``make_server``), the kernel's counters.

``python -m train serve --ckpt DIR`` wires a trained checkpoint to all of it.
"""

from train.serve.engine import Batcher, Engine, EngineClosed, Overloaded
from train.serve.metrics import Metrics, percentile
from train.serve.service import NotServed, ServedModel, Service

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
