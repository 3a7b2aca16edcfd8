"""An optional LRU response cache keyed by model, version, requested outputs and the input bytes.

Off by default (``response_cache_size = 0``). Only deterministic models should be cached; the key
covers every byte of every input (hashed with BLAKE2b), its dtype and shape.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["ResponseCache"]

CacheKey = tuple[str, str, tuple[str, ...] | None, bytes]


class ResponseCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[CacheKey, dict[str, np.ndarray]] = OrderedDict()

    def key(self, model: str, version: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None) -> CacheKey:
        h = hashlib.blake2b(digest_size=20)
        for name in sorted(inputs):
            arr = inputs[name]
            h.update(f"{name}\0{arr.dtype.str}\0{arr.shape}\0".encode())
            if arr.dtype.kind == "O":
                for v in arr.reshape(-1):
                    h.update(len(v).to_bytes(8, "little"))
                    h.update(v)
            else:
                h.update(np.ascontiguousarray(arr).data)
        return model, version, tuple(outputs) if outputs is not None else None, h.digest()

    def get(self, key: CacheKey) -> dict[str, np.ndarray] | None:
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
        return hit

    def put(self, key: CacheKey, outputs: dict[str, np.ndarray]) -> None:
        # Own copies: the outputs may be views into a batch buffer that is otherwise freed.
        self._entries[key] = {k: np.array(v, copy=True) for k, v in outputs.items()}
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
