"""What an embedding store keeps in memory: the hottest vectors, and hits not yet written.

:class:`VectorLRU` serves repeated keys without SQLite; :class:`PendingUses` collects the
hits on cached rows so that their recency reaches the file in one batched write (with the
next put, or when enough piled up) instead of one UPDATE per hit. Both are thread-safe.
Used by ``train.store.EmbeddingStore``.

Example::

    lru = VectorLRU(size=2)
    lru.remember([("a", torch.ones(3), True), ("b", torch.zeros(3), False)])
    lru.lookup(["a", "c"])       # {"a": (tensor([1., 1., 1.]), True)}; "a" is now freshest
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterable

import torch

__all__ = ["PendingUses", "VectorLRU"]


class VectorLRU:
    """Up to ``size`` vectors ``[dim]`` by key, each with its row's ``pinned`` flag (whether
    a hit needs its recency written), least recently used first. ``size=0`` keeps none."""

    def __init__(self, size: int):
        self.size = size
        self._entries: collections.OrderedDict[str, tuple[torch.Tensor, bool]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def lookup(self, keys: list[str]) -> dict[str, tuple[torch.Tensor, bool]]:
        """``{key: (vector, pinned)}`` for the keys held (not copies); each hit, in request
        order, becomes the most recently used."""
        hits = {}
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    hits[key] = entry
        return hits

    def remember(self, items: Iterable[tuple[str, torch.Tensor, bool]]) -> None:
        """Hold ``(key, vector, pinned)`` items as the most recently used, dropping the least
        recently used beyond ``size``."""
        if not self.size:
            return
        with self._lock:
            for key, vec, pinned in items:
                self._entries[key] = (vec, pinned)
                self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def forget(self, keys: Iterable[str]) -> None:
        """Drop ``keys`` (absent ones are ignored)."""
        with self._lock:
            for key in keys:
                self._entries.pop(key, None)

    def keys(self) -> list[str]:
        """The keys held, least recently used first."""
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            self._entries.clear()


class PendingUses:
    """Keys hit but not yet marked used in the file, oldest use first (a repeated hit moves
    its key last). :meth:`note` says when a write is due: ``max_keys`` keys, or the oldest
    waiting ``max_age_s`` seconds."""

    def __init__(self, *, max_keys: int, max_age_s: float):
        self.max_keys, self.max_age_s = max_keys, max_age_s
        self._keys: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._since = 0.0
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._keys)

    def note(self, keys: list[str]) -> bool:
        """Record hits on ``keys``, in order; whether a write is now due."""
        if not keys:
            return False
        with self._lock:
            if not self._keys:
                self._since = time.monotonic()
            for key in keys:
                self._keys[key] = None
                self._keys.move_to_end(key)
            return (
                len(self._keys) >= self.max_keys or time.monotonic() - self._since >= self.max_age_s
            )

    def take(self) -> list[str]:
        """Every pending key, oldest use first, leaving none pending."""
        with self._lock:
            keys = list(self._keys)
            self._keys.clear()
        return keys

    def drop(self, keys: Iterable[str]) -> None:
        """Forget pending hits on ``keys`` (rows that no longer exist)."""
        with self._lock:
            for key in keys:
                self._keys.pop(key, None)
