"""Small caches of what a training step rebuilds otherwise: plans and index tensors.

Gradients keep their shapes from step to step, so plans derived from shapes are built once
and looked up afterwards; index tensors are cached on their device, because building one
per step is a host-to-device copy that blocks the host on accelerators (and cannot happen
inside a captured CUDA graph). Every cache is a bounded :class:`LRU`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch
from torch import Tensor

from gradclip import _foreach

__all__ = ["LRU", "index_tensor"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A thread-safe mapping that keeps the ``size`` most recently used entries.

    Example:
        >>> cache = LRU(2)
        >>> cache.get_or_build("a", lambda: 1), cache.get_or_build("a", lambda: 2)
        (1, 1)
    """

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        """The entry for ``key`` (now the most recent), or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> V:
        """Store ``value`` under ``key``, evicting the least recently used beyond ``size``."""
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value

    def get_or_build(self, key: K, build: Callable[[], V]) -> V:
        """The entry for ``key``, built by ``build()`` (outside the lock) when missing.

        While ``torch.compile`` traces, ``build()`` runs at trace time and nothing is cached:
        the lock would break the graph, and the result becomes part of the compiled code.
        """
        if _foreach.is_compiling():
            return build()
        value = self.get(key)
        return self.put(key, build()) if value is None else value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_INDEX_TENSORS: LRU[tuple, Tensor] = LRU(64)


def index_tensor(positions: tuple[int, ...], device: torch.device) -> Tensor:
    """``positions`` as an int64 tensor on ``device``, built once per (positions, device).

    While ``torch.compile`` traces, the tensor is a constant of the graph instead (the
    cache's lock and mutation would break the graph).

    Example:
        >>> index_tensor((2, 0, 1), torch.device("cpu"))
        tensor([2, 0, 1])
    """
    if _foreach.is_compiling():
        return torch.tensor(positions, dtype=torch.long, device=device)
    key = (positions, device)
    if _foreach.capturing() and _INDEX_TENSORS.get(key) is None:
        raise RuntimeError(
            "gradclip needs an index tensor it has not built yet inside a CUDA graph capture "
            "(building it is a host-to-device copy, which a capture cannot contain): run the "
            "captured step once before capturing it, with the same parameters"
        )
    return _INDEX_TENSORS.get_or_build(
        key, lambda: torch.tensor(positions, dtype=torch.long, device=device)
    )
