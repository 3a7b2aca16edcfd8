"""Test support for the cloud server: extra real ONNX models, bundles of them, a server in a thread.

``ServerThread`` runs ``create_app(config)`` on its own event loop in a background thread bound to
127.0.0.1 on a free port, so sync clients (tritonclient, http.client) and async clients on the
test's loop both talk to it over real sockets.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from support import free_port, make_bundle, save_onnx
from tandem.shared import signing
from tandem.shared.bundle import Manifest, Provenance, Task, TensorSpec, Variant, seal_bundle


def make_varlen_onnx(path: Path) -> Path:
    """x FP32 [batch, n] -> mean FP32 [batch, 1]: the second dimension varies per request."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1], keepdims=1)],
        "varlen",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch", 1])],
    )
    return save_onnx(graph, path)


def make_slow_onnx(path: Path, size: int = 256) -> Path:
    """x FP32 [batch, 8], work INT64 [batch, 1] -> y = x * 2, after max(work) rounds of real work.

    Each round is a [size, size] MatMul + Tanh inside an ONNX Loop whose trip count comes from the
    request, so a test can make one request hold an instance for a while (work=200, ~0.3 s here)
    and others cheap (work=1). The work depends on the input (no constant folding) and enters y
    multiplied by zero.
    """
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["a_in", "w"], ["m"]),
            helper.make_node("Tanh", ["m"], ["a_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "round",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("a_in", TensorProto.FLOAT, [size, size]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("a_out", TensorProto.FLOAT, [size, size]),
        ],
    )
    nodes = [
        helper.make_node("ReduceMax", ["work"], ["trips"], keepdims=0),
        helper.make_node("ReduceMean", ["x"], ["s"], keepdims=0),
        helper.make_node("Tanh", ["s"], ["st"]),
        helper.make_node("Mul", ["w", "st"], ["a0"]),
        helper.make_node("Loop", ["trips", "true", "a0"], ["a_final"], body=body),
        helper.make_node("ReduceMean", ["a_final"], ["t"], keepdims=0),
        helper.make_node("Mul", ["t", "zero"], ["tz"]),
        helper.make_node("Mul", ["x", "two"], ["x2"]),
        helper.make_node("Add", ["x2", "tz"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("work", TensorProto.INT64, ["batch", 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array(2.0, np.float32), "two"),
            numpy_helper.from_array(np.array(True), "true"),
        ],
    )
    return save_onnx(graph, path)


def slow_inputs(work: int, rows: int = 1, value: float = 1.0) -> dict[str, np.ndarray]:
    """Inputs for the slow model: ``work`` rounds (see make_slow_onnx)."""
    return {"x": np.full((rows, 8), value, np.float32), "work": np.full((rows, 1), work, np.int64)}


def make_onnx_bundle(
    directory: Path,
    private_key: Path,
    onnx_path: Path,
    name: str,
    version: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
) -> Path:
    """A signed bundle whose cloud and edge variants are both ``onnx_path`` (copied in)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "model.onnx"
    if onnx_path != target:
        target.write_bytes(onnx_path.read_bytes())
    manifest = Manifest(
        name=name,
        version=version,
        task=Task(kind="other"),
        inputs=inputs,
        outputs=outputs,
        variants=[
            Variant(name="cloud-fp32", role="cloud", file="model.onnx", sha256="", size_bytes=0, precision="fp32"),
            Variant(name="edge-fp32", role="edge", file="model.onnx", sha256="", size_bytes=0, precision="fp32"),
        ],
        provenance=Provenance(source="tests/cloud_support.py"),
    )
    seal_bundle(directory, manifest, signing.load_private_key(private_key))
    return directory


def make_repository(root: Path, private_key: Path, *, toy_versions: tuple[str, ...] = ("1", "2"), slow: bool = True, varlen: bool = True) -> Path:
    """REPO/toy/<v> (MLP bundles from support.make_bundle), REPO/slow/1, REPO/varlen/1."""
    for i, v in enumerate(toy_versions):
        make_bundle(root / "toy" / v, private_key, name="toy", version=v, seed=10 * i)
    if slow:
        d = root / "slow" / "1"
        make_onnx_bundle(
            d, private_key, make_slow_onnx(d / "model.onnx"), "slow", "1",
            [TensorSpec(name="x", datatype="FP32", shape=["batch", 8]), TensorSpec(name="work", datatype="INT64", shape=["batch", 1])],
            [TensorSpec(name="y", datatype="FP32", shape=["batch", 8])],
        )
    if varlen:
        d = root / "varlen" / "1"
        make_onnx_bundle(
            d, private_key, make_varlen_onnx(d / "model.onnx"), "varlen", "1",
            [TensorSpec(name="x", datatype="FP32", shape=["batch", "n"])],
            [TensorSpec(name="mean", datatype="FP32", shape=["batch", 1])],
        )
    return root


class ServerThread:
    """A real server (create_app + AppRunner + the front door on 127.0.0.1, exactly as ``tandem
    serve`` listens) on its own loop and thread."""

    def __init__(self, config: Any) -> None:
        from tandem.cloud.app import create_app

        self.config = config
        self.port = config.port if config.port else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.app = create_app(config)
        self._runner: Any = None
        self.door: Any = None  # the FrontDoor (or aiohttp-only site) listening
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def state(self) -> Any:
        from tandem.cloud.app import STATE

        return self.app[STATE]

    def start(self) -> ServerThread:

        from tandem.cloud.app import make_runner
        from tandem.cloud.front import listen

        self._thread.start()

        async def start() -> None:
            self._runner = make_runner(self.app)
            await self._runner.setup()
            self.door = await listen(self._runner, "127.0.0.1", self.port)

        self.call(start(), timeout=60)
        return self

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self._runner is not None:
            if self.door is not None:
                self.call(self.door.close(10), timeout=30)
            self.call(self._runner.cleanup(), timeout=30)
            self._runner = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def request(
    url: str, method: str = "GET", path: str = "/", body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with the stdlib client: (status, headers, body)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()
