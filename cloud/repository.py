"""The models a server holds: scan ``REPO/<name>/<version>/``, load, reload, unload, pick a version.

Each version is a bundle directory; the server loads its ``cloud``-role variant after
:func:`tandem.shared.bundle.load_bundle` has checked the signature and every hash. A load builds
the whole new version (sessions, warm-up, batcher) before anything is swapped, so a reload never
fails a request in flight (the old version drains its queue in the background) and a failed load
keeps the old version serving. States feed the v2 repository index (READY / UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.shared.bundle import MANIFEST_NAME, Bundle, load_bundle, version_key
from tandem.shared.errors import BundleError, ModelNotFound, TandemError, Unavailable

from .batcher import Batcher
from .config import ServerConfig
from .engine import ModelEngine
from .metrics import Metrics, ModelMetrics

__all__ = ["ServedModel", "ModelRepository"]

_log = logging.getLogger(__name__)

_TRITON_TYPES = {
    "BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64", "BYTES": "TYPE_STRING",
}


@dataclass(slots=True)
class ServedModel:
    """One loaded model version: bundle, sessions, batcher, metrics."""

    name: str
    version: str
    bundle: Bundle
    engine: ModelEngine
    batcher: Batcher
    metrics: ModelMetrics
    warmup_s: float

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        """v2 model metadata."""
        return {
            "name": self.name,
            "versions": versions,
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": t.wire_shape} for t in self.engine.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": t.wire_shape} for t in self.engine.outputs],
            "parameters": {"providers": list(self.engine.providers), "instances": self.engine.instances},
        }

    def model_config(self) -> dict[str, Any]:
        """A Triton-style model configuration (what this server really runs)."""
        batching = self.batcher.config
        batched = self.engine.batchable

        def tensors(infos: list[Any]) -> list[dict[str, Any]]:
            return [
                {
                    "name": t.name,
                    "data_type": _TRITON_TYPES[t.datatype],
                    "dims": [-1 if d is None else d for d in (t.shape[1:] if batched else t.shape)],
                }
                for t in infos
            ]

        gpu = any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in self.engine.providers[:1])
        return {
            "name": self.name,
            "version": self.version,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "max_batch_size": batching.max_batch_size if batched else 0,
            "input": tensors(self.engine.inputs),
            "output": tensors(self.engine.outputs),
            "dynamic_batching": {
                "preferred_batch_size": list(batching.preferred_batch_sizes),
                "max_queue_delay_microseconds": batching.max_queue_delay_us,
                "priority_levels": batching.priority_levels,
                "default_priority_level": batching.default_priority_level,
                "default_queue_policy": {
                    "max_queue_size": batching.max_queue_size,
                    "default_timeout_microseconds": int(batching.default_timeout_ms * 1000) if batching.default_timeout_ms else 0,
                },
            },
            "instance_group": [{"count": self.engine.instances, "kind": "KIND_GPU" if gpu else "KIND_CPU"}],
            "parameters": {
                "providers": list(self.engine.providers),
                "intra_op_threads": self.engine.intra_op_threads,
                # Admission limits beyond Triton's fields (see BatchingConfig).
                "max_request_rows": batching.request_rows if batched else 1,
                "max_queue_rows": batching.max_queue_rows,
                "max_queue_wait_ms": batching.max_queue_wait_ms,
                "variant": self.bundle.variant("cloud").name,
                "precision": self.bundle.variant("cloud").precision,
            },
        }


@dataclass(slots=True)
class _State:
    state: str  # READY | UNAVAILABLE | LOADING
    reason: str = ""


class ModelRepository:
    """Loads and holds every model version of ``config.repository``. Use inside the event loop."""

    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        self.config = config
        self.root = Path(config.repository)
        self._metrics = metrics
        self._models: dict[str, dict[str, ServedModel]] = {}
        self._states: dict[tuple[str, str], _State] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._latest: dict[str, str] = {}

    # --- queries ----------------------------------------------------------------------------------

    def scan(self) -> dict[str, list[str]]:
        """{model: [versions]} of the bundle directories on disk (entries without manifest.json ignored)."""
        found: dict[str, list[str]] = {}
        if not self.root.is_dir():
            return found
        for mdir in sorted(self.root.iterdir()):
            if not mdir.is_dir() or mdir.name.startswith("."):
                continue
            versions = [v.name for v in mdir.iterdir() if v.is_dir() and (v / MANIFEST_NAME).is_file()]
            if versions:
                found[mdir.name] = sorted(versions, key=version_key)
        return found

    def strays(self) -> list[str]:
        """Why each entry of the repository that is not a bundle is not served: a model directory
        must hold ``<version>/manifest.json``. One line per entry, with the fix."""
        out: list[str] = []
        if not self.root.is_dir():
            return out
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                hint = f"; bundle it with `tandem build {entry}`" if entry.suffix == ".onnx" else ""
                out.append(f"{entry} is a file, not a model directory (<name>/<version>/manifest.json){hint}")
                continue
            children = [c for c in entry.iterdir() if not c.name.startswith(".")]
            if any((c / MANIFEST_NAME).is_file() for c in children if c.is_dir()):
                continue
            if (entry / MANIFEST_NAME).is_file():
                out.append(f"{entry} holds a bundle directly; a bundle must sit in a version directory: "
                           f"{entry}/1/{MANIFEST_NAME}")
                continue
            onnx_files = [c for c in children if c.suffix == ".onnx"]
            if onnx_files:
                out.append(f"{entry} holds ONNX files but no bundle; make one with `tandem build {onnx_files[0]} "
                           f"--repository {self.root}`")
            else:
                out.append(f"{entry} is not a model: no <version>/{MANIFEST_NAME} in it")
        return out

    def loaded(self) -> list[ServedModel]:
        return [m for versions in self._models.values() for m in versions.values()]

    def versions(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=version_key)

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The version to serve; without a version: the canary split if configured, else the latest."""
        versions = self._models.get(name)
        if not versions:
            # Known from an earlier load attempt (no disk scan here: this runs per request).
            if any(n == name for n, _ in self._states):
                raise Unavailable(f"model {name!r} is not loaded (load it with POST /v2/repository/models/{name}/load)")
            raise ModelNotFound(f"unknown model {name!r}")
        if version:
            served = versions.get(version)
            if served is None:
                raise ModelNotFound(f"model {name!r} has no loaded version {version!r} (loaded: {', '.join(self.versions(name))})")
            return served
        split = self.config.canary.get(name)
        if split:
            live = [(v, w) for v, w in split.items() if v in versions and w > 0]
            if live:
                pick = random.random() * sum(w for _, w in live)
                for v, w in live:
                    pick -= w
                    if pick < 0:
                        return versions[v]
                return versions[live[-1][0]]
        return versions[self._latest[name]]

    def index(self) -> list[dict[str, Any]]:
        """The v2 repository index: every model version on disk or loaded, with its state."""
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for name, versions in self.scan().items():
            for v in versions:
                rows[(name, v)] = {"name": name, "version": v, "state": "UNAVAILABLE", "reason": "not loaded"}
        for (name, v), st in self._states.items():
            rows[(name, v)] = {"name": name, "version": v, "state": st.state, "reason": st.reason}
        for m in self.loaded():
            known = self._states.get((m.name, m.version))
            rows[(m.name, m.version)] = {"name": m.name, "version": m.version, "state": "READY",
                                         "reason": known.reason if known else ""}
        return [rows[k] for k in sorted(rows, key=lambda k: (k[0], version_key(k[1])))]

    def pending(self) -> int:
        return sum(m.batcher.pending for m in self.loaded())

    # --- control ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every model on disk; failures are logged and leave that version UNAVAILABLE."""
        for stray in self.strays():
            _log.error("not served: %s", stray)
        for name in self.scan():
            try:
                await self.load(name)
            except TandemError as e:
                _log.error("model %s not (fully) loaded: %s", name, e.message)

    async def load(self, name: str) -> list[str]:
        """(Re)load every version of ``name`` found on disk. Returns the versions now READY.

        New sessions are built and warmed before the swap; on failure the old version of that
        version number keeps serving and the error is raised after the successful ones are swapped.
        """
        async with self._lock(name):
            on_disk = self.scan().get(name)
            if not on_disk:
                if name in self._models:
                    raise BundleError(f"model {name!r} has no bundle left in {self.root}; unload it instead")
                raise ModelNotFound(f"no model {name!r} in the repository {self.root}")
            old = self._models.get(name, {})
            new: dict[str, ServedModel] = {}
            errors: list[TandemError] = []
            for version in on_disk:
                self._states[(name, version)] = _State("LOADING")
                try:
                    new[version] = await self._build(name, version)
                    self._states[(name, version)] = _State("READY")
                except TandemError as e:
                    errors.append(e)
                    reason = f"load failed: {e.message}"
                    self._states[(name, version)] = _State("READY" if version in old else "UNAVAILABLE", reason)
                    if version in old:
                        new[version] = old[version]  # a failed load keeps the old one serving
                    _log.error("model %s version %s: %s", name, version, reason)
            self._swap(name, new)
            for version, served in old.items():
                if new.get(version) is not served:
                    self._retire(served)
            if errors:
                first = errors[0]
                raise type(first)(f"model {name!r}: {first.message}") if len(errors) == 1 else BundleError(
                    f"model {name!r}: {len(errors)} version(s) failed to load; first: {first.message}"
                )
            return self.versions(name)

    async def unload(self, name: str) -> None:
        """Stop serving every version of ``name`` (requests already accepted are still answered)."""
        async with self._lock(name):
            old = self._models.pop(name, None)
            self._latest.pop(name, None)
            if old is None:
                if name not in self.scan():
                    raise ModelNotFound(f"unknown model {name!r}")
                return
            for served in old.values():
                self._states[(name, served.version)] = _State("UNAVAILABLE", "unloaded")
                self._retire(served)

    async def close(self, timeout: float | None = None) -> None:
        """Drain and stop everything (graceful shutdown)."""
        for served in self.loaded():
            self._retire(served, timeout)
        self._models.clear()
        self._latest.clear()
        if self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)

    async def wait_retired(self) -> None:
        """Wait until every replaced or unloaded version has drained (tests, shutdown)."""
        if self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)

    # --- internals --------------------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _swap(self, name: str, versions: dict[str, ServedModel]) -> None:
        if versions:
            self._models[name] = versions
            self._latest[name] = max(versions, key=version_key)
        else:
            self._models.pop(name, None)
            self._latest.pop(name, None)

    def _retire(self, served: ServedModel, timeout: float | None = None) -> None:
        async def retire() -> None:
            await served.batcher.close(timeout if timeout is not None else self.config.shutdown_timeout_s)
            served.metrics.detach()
            _log.info("model %s version %s retired", served.name, served.version)

        task = asyncio.get_running_loop().create_task(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _build(self, name: str, version: str) -> ServedModel:
        directory = self.root / name / version
        batching = self.config.batching_for(name)
        bundle, engine, warmup_s = await asyncio.get_running_loop().run_in_executor(
            None, self._build_blocking, directory, name, version, batching.max_batch_size
        )
        metrics = self._metrics.for_model(name, version)
        batcher = Batcher(engine, batching, name=f"{name}:{version}", observer=metrics)
        metrics.attach(lambda: batcher.pending, engine.providers, engine.instances)
        _log.info(
            "model %s version %s ready: %d instance(s) on %s, %d intra-op thread(s) each, warm-up %.2fs",
            name, version, engine.instances, ",".join(engine.providers), engine.intra_op_threads, warmup_s,
        )
        return ServedModel(name, version, bundle, engine, batcher, metrics, warmup_s)

    def _build_blocking(self, directory: Path, name: str, version: str, max_batch: int) -> tuple[Bundle, ModelEngine, float]:
        cfg = self.config
        bundle = load_bundle(
            directory,
            cfg.trusted_keys,
            verify_signature=not cfg.insecure_skip_signature,
            variants=["cloud"],
        )
        if bundle.name != name or bundle.version != version:
            raise BundleError(
                f"{directory} holds {bundle.name}:{bundle.version}; it must sit at <repository>/{bundle.name}/{bundle.version}"
            )
        try:
            onnx_path = bundle.variant_path("cloud")
        except KeyError as e:
            raise BundleError(str(e)) from None
        t0 = time.perf_counter()
        engine = ModelEngine(
            onnx_path,
            providers=cfg.providers,
            instances=cfg.instances,
            intra_op_threads=cfg.threads_per_session(),
            spinning=cfg.ort_spinning,
            nice=cfg.compute_nice,
            declared_inputs=bundle.manifest.inputs,
            declared_outputs=bundle.manifest.outputs,
        )
        if engine.pad_symbols:
            _log.info("model %s version %s: requests of different lengths along %s share batches, padded",
                      name, version, ", ".join(map(repr, engine.pad_symbols)))
        elif engine.padding_off:
            _log.info("model %s version %s: requests are batched by exact shape: %s", name, version, engine.padding_off)
        try:
            samples = bundle.load_samples()[0]
        except TandemError:
            samples = {}
        sizes = [s for s in cfg.warmup_batch_sizes if s <= max_batch] + [max_batch]
        engine.warm_up(sizes, samples)
        return bundle, engine, time.perf_counter() - t0

