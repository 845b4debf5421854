"""What the embedding store files a vector under: a content key and a model fingerprint.

A vector is identified by the sha256 of what was embedded (:func:`content_key`) and the
sha256 of the model that embedded it (:func:`model_fingerprint`: config and every weight),
so a retrained, requantized or reconfigured model never reads another model's vectors.
``train.store`` re-exports both.

Example::

    fp = model_fingerprint(cfg.to_dict(), params)      # 64 hex digits
    key = content_key("text", "a red circle")          # 64 hex digits
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch

from fmm import tree
from fmm.quant import QuantizedWeight

__all__ = ["content_key", "model_fingerprint", "tensor_bytes"]


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of ``t`` (any shape), C order, on the CPU: ``t.numel() * t.element_size()``
    of them. Example: ``tensor_bytes(torch.ones(3))`` -> 12 bytes."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def model_fingerprint(config: Mapping[str, Any], params: Any) -> str:
    """A sha256 hex digest of ``config`` (canonical JSON: sorted keys) and every weight of
    ``params`` (dotted name, dtype, shape and raw bytes, in name order).

    Any change to a config field or to one bit of one weight changes the fingerprint;
    quantized leaves hash their int8 values and scales.

    Example: ``model_fingerprint(cfg.to_dict(), params) -> "3f1c...e9"`` (64 hex digits).
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"model_fingerprint: config must be a dict, got {type(config).__name__}")
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":"), default=str).encode())
    for name, leaf in sorted(tree.flatten(params).items()):
        parts = (leaf.values, leaf.scale) if isinstance(leaf, QuantizedWeight) else (leaf,)
        for t in parts:
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"model_fingerprint: leaf {name!r} is a {type(t).__name__}, not a tensor"
                )
            h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
            h.update(tensor_bytes(t))
    return h.hexdigest()


def content_key(kind: str, payload: bytes | str) -> str:
    """sha256 hex digest of ``kind`` and ``payload`` (``str`` is hashed as UTF-8).

    ``kind`` (``"text"``, ``"image"``, ...) separates namespaces, so a text and an image
    with the same bytes get different keys.

    Example: ``content_key("text", "a red circle")`` -> 64 hex digits.
    """
    if not isinstance(kind, str) or not kind or "\0" in kind:
        raise ValueError(f"content_key: kind must be a non-empty string without NUL, got {kind!r}")
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    elif not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"content_key: payload must be bytes or str, got {type(payload).__name__}")
    return hashlib.sha256(kind.encode() + b"\0" + bytes(payload)).hexdigest()
