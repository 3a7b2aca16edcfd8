"""LitServe serving the same ONNX model with its dynamic batching on (the bench's framework baseline).

LitServe is installed only in the bench environment (``pip install litserve``), never a Tandem
dependency. Requests are LitServe's usual JSON: ``POST /predict {"input": [one sample, flattened]}``
-> ``{"output": [...]}``.

    python bench/litserve_server.py MODEL.onnx --port 8200 [--max-batch-size 32] [--batch-timeout 0.001]
"""

from __future__ import annotations

import argparse
import inspect
import os
from typing import Any

import litserve as ls
import numpy as np


class OnnxAPI(ls.LitAPI):
    """Module level (not nested): LitServe pickles the API into its worker processes."""

    def __init__(self, model_path: str, threads: int, **batching: Any) -> None:
        super().__init__(**batching)
        self.model_path, self.threads = model_path, threads

    def setup(self, device: str) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.model_path, opts, providers=["CPUExecutionProvider"])
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.sample_shape = [d if isinstance(d, int) else -1 for d in first.shape[1:]]

    # Unannotated on purpose: LitServe builds its FastAPI endpoint from this signature, and a
    # (string, under __future__ annotations) type turns the body into a query parameter.
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        return np.asarray(request["input"], dtype=np.float32).reshape(self.sample_shape)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict[str, Any]:
        return {"output": output.tolist()}


def build_server(model_path: str, max_batch_size: int, batch_timeout: float, threads: int) -> Any:
    # LitServe moved the batching options from LitServer to LitAPI in 0.2.x; support both.
    batching = {"max_batch_size": max_batch_size, "batch_timeout": batch_timeout}
    if "max_batch_size" in inspect.signature(ls.LitAPI.__init__).parameters:
        return ls.LitServer(OnnxAPI(model_path, threads, **batching), accelerator="cpu", workers_per_device=1)
    return ls.LitServer(OnnxAPI(model_path, threads), accelerator="cpu", workers_per_device=1, **batching)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--port", type=int, default=8200)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-timeout", type=float, default=0.001)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = p.parse_args()
    server = build_server(a.model, a.max_batch_size, a.batch_timeout, a.threads)
    server.run(host="127.0.0.1", port=a.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
