"""The transport-free core of one server process, built once: what both HTTP stacks adapt.

The front door (:mod:`.front`) and aiohttp's routes (:mod:`.app`) are thin adapters over it: each
frames requests its own way, then hands them to the same gate (ids, auth, error answers, access
log), the same inference pipeline (resolve, check, cache, batch) through one wire-protocol
interface (:mod:`.wire`), and the same metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

from .config import ServerConfig
from .gate import Gate
from .inference import Inference
from .metrics import Metrics
from .repository import ModelRepository

__all__ = ["Core"]


@dataclass
class Core:
    config: ServerConfig
    metrics: Metrics
    repository: ModelRepository
    inference: Inference
    gate: Gate

    @classmethod
    def build(cls, config: ServerConfig) -> Self:
        """The core of a server serving ``config`` (models load when the repository starts)."""
        metrics = Metrics()
        repository = ModelRepository(config, metrics)
        inference = Inference(repository, config)
        return cls(config, metrics, repository, inference, Gate(config, inference))
