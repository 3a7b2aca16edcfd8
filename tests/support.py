"""Test support: real ONNX models and signed bundles built without torch (fast, deterministic).

``make_bundle`` writes a classification bundle whose cloud variant is a wider MLP than its edge
variant, both real ONNX graphs that onnxruntime runs. Labels are the cloud variant's argmax on
generated data, so calibration numbers are real (edge vs cloud), just not meaningful as accuracy.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from aiohttp import web
from onnx import TensorProto, helper, numpy_helper

from tandem.quantize.calibration import calibrate
from tandem.shared import signing
from tandem.shared.bundle import (
    SAMPLES_NAME,
    Manifest,
    Provenance,
    Samples,
    Task,
    TensorSpec,
    Variant,
    seal_bundle,
    write_samples,
)

IN_DIM = 64
N_CLASSES = 10


def make_mlp_onnx(
    path: Path,
    hidden: tuple[int, ...] = (32,),
    in_dim: int = IN_DIM,
    n_classes: int = N_CLASSES,
    seed: int = 0,
    input_name: str = "input",
    output_name: str = "logits",
) -> Path:
    """An MLP (Gemm/Relu) with a dynamic batch dimension, FP32 in and out."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev, prev_dim = input_name, in_dim
    dims = list(hidden) + [n_classes]
    for i, d in enumerate(dims):
        w = (rng.standard_normal((prev_dim, d)) / np.sqrt(prev_dim)).astype(np.float32)
        b = (rng.standard_normal(d) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = output_name if i == len(dims) - 1 else f"h{i}"
        gemm_out = out if i == len(dims) - 1 else f"g{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [gemm_out]))
        if i < len(dims) - 1:
            nodes.append(helper.make_node("Relu", [gemm_out], [out]))
        prev, prev_dim = out, d
    return _save_classifier(path, "mlp", nodes, inits, input_name, in_dim, output_name, n_classes)


def make_conv_onnx(path: Path, channels: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A CNN over the 64 inputs seen as an 8x8 image (3x3 Conv/Relu x ``layers``, global average
    pool, Gemm to 10 logits), FP32 with a dynamic batch dimension, named like make_mlp_onnx's.
    Compute grows with channels**2 per sample while the weights stay small, so its cost per
    sample hardly depends on the batch size."""
    rng = np.random.default_rng(seed)
    in_dim, n_classes, input_name, output_name = IN_DIM, N_CLASSES, "input", "logits"
    side = int(round(in_dim**0.5))
    if side * side != in_dim:
        raise ValueError(f"in_dim {in_dim} is not a square")
    inits = [numpy_helper.from_array(np.array([-1, 1, side, side], np.int64), "image_shape")]
    nodes = [helper.make_node("Reshape", [input_name, "image_shape"], ["image"])]
    prev, cin = "image", 1
    for i in range(layers):
        w = (rng.standard_normal((channels, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"cw{i}"), numpy_helper.from_array(np.zeros(channels, np.float32), f"cb{i}")]
        nodes.append(helper.make_node("Conv", [prev, f"cw{i}", f"cb{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev, cin = f"r{i}", channels
    w = (rng.standard_normal((channels, n_classes)) / np.sqrt(channels)).astype(np.float32)
    inits += [numpy_helper.from_array(w, "fw"), numpy_helper.from_array(np.zeros(n_classes, np.float32), "fb")]
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"]),
        helper.make_node("Gemm", ["features", "fw", "fb"], [output_name]),
    ]
    return _save_classifier(path, "cnn", nodes, inits, input_name, in_dim, output_name, n_classes)


def _save_classifier(
    path: Path, name: str, nodes: list[Any], inits: list[Any], input_name: str, in_dim: int, output_name: str, n_classes: int
) -> Path:
    """Save a graph from FP32 [batch, in_dim] to FP32 [batch, n_classes]."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", in_dim])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", n_classes])],
        inits,
    )
    return save_onnx(graph, path)


def save_onnx(graph: onnx.GraphProto, path: Path) -> Path:
    """Wrap a graph in an opset-17 model, check it and save it (parents created)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[int]:
    """Serve an aiohttp app on a free 127.0.0.1 port for the block; yields the port."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def make_keys(directory: Path) -> tuple[Path, Path]:
    """(private key path, public key path), made fresh for the test."""
    return signing.generate_keypair(directory)


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def make_bundle(
    directory: Path,
    private_key: Path,
    name: str = "toy",
    version: str = "1",
    cloud_hidden: tuple[int, ...] = (128, 128),
    edge_hidden: tuple[int, ...] = (16,),
    seed: int = 0,
    cloud_conv: tuple[int, int] | None = None,
) -> Path:
    """Build and sign a two-variant classification bundle in ``directory``; returns it. The cloud
    variant is an MLP with ``cloud_hidden`` layers, or a CNN of ``cloud_conv`` (channels, layers)."""
    directory.mkdir(parents=True, exist_ok=True)
    if cloud_conv is not None:
        cloud = make_conv_onnx(directory / "cloud-fp32.onnx", *cloud_conv, seed=seed)
    else:
        cloud = make_mlp_onnx(directory / "cloud-fp32.onnx", cloud_hidden, seed=seed)
    edge = make_mlp_onnx(directory / "edge-fp32.onnx", edge_hidden, seed=seed + 1)

    rng = np.random.default_rng(seed + 2)
    x = rng.standard_normal((512, IN_DIM)).astype(np.float32)
    cloud_logits, edge_logits = run_onnx(cloud, x), run_onnx(edge, x)
    # Labels are the cloud's answers, so the cascade's accuracy is the edge's agreement with it.
    labels = cloud_logits.argmax(1)
    calibration = calibrate(edge_logits, cloud_logits, labels, edge_variant="edge-fp32",
                            cloud_variant="cloud-fp32", thresholds=np.linspace(0.0, 1.0, 21))

    sx = x[:4]
    write_samples(
        directory / SAMPLES_NAME,
        {"input": sx},
        {"cloud-fp32": {"logits": run_onnx(cloud, sx)}, "edge-fp32": {"logits": run_onnx(edge, sx)}},
    )
    manifest = Manifest(
        name=name,
        version=version,
        task=Task(kind="classification", labels=[str(i) for i in range(N_CLASSES)], output="logits"),
        inputs=[TensorSpec(name="input", datatype="FP32", shape=["batch", IN_DIM])],
        outputs=[TensorSpec(name="logits", datatype="FP32", shape=["batch", N_CLASSES])],
        variants=[
            Variant(name="cloud-fp32", role="cloud", file=cloud.name, sha256="", size_bytes=0, precision="fp32"),
            Variant(name="edge-fp32", role="edge", file=edge.name, sha256="", size_bytes=0, precision="fp32"),
        ],
        calibration=calibration,
        samples=Samples(file=SAMPLES_NAME, sha256="", size_bytes=0, count=len(sx)),
        provenance=Provenance(source="tests/support.py", build_config={"seed": seed}),
    )
    seal_bundle(directory, manifest, signing.load_private_key(private_key))
    return directory
