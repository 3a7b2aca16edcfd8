"""What does batching requests of different lengths cost, and what does padding them server-side buy?

In one run, on the same cores, requests of mixed lengths (``--min-len`` to ``--max-len`` tokens,
uniform) from ``--concurrency`` connections:

* **a** ``tandem serve`` batching them itself: requests that differ only in length share a batch,
  padded to the longest with the manifest's pad values (cloud/batcher.py);
* **b** the same server, every request padded by the client to ``--max-len`` (what a server that
  batches only equal shapes needs: all requests then share one shape);
* **c** raw onnxruntime in this process: the same requests sorted by length, in batches of
  ``max_batch_size`` padded to their longest (the best a batcher could do knowing every request
  in advance; nothing else running).

The server's answers are checked against onnxruntime for each request alone before any load.
Prints req/s (median of ``--repeat`` runs per row, a and b alternating), the ratios a/b (target
>= 1.5) and a/c (target >= 0.75), and the padding waste: 1 - elements sent / elements computed,
from the server's /metrics for a (and its padded/real ratio per batch), from the lengths for b, c.

The load comes from this process (asyncio, one connection per ``--concurrency``, pre-encoded
native msgpack bodies): its CPU is shared with the server's, as wrk's is in bench/serve.py.

    python bench/padding.py [--bundle DIR] [--duration 10] [--repeat 3] [--concurrency 64]

``--bundle``: a bundle whose inputs are INT64 [batch, sequence] with pad values (e.g. a MiniLM
sentence-embedding bundle; its signature is not checked); default: a synthetic encoder built here
(token embedding, one masked self-attention layer and two 256-1024-256 feed-forward layers,
masked mean pooling; ~1 M multiply-adds per token).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # support.py: keys and ONNX helpers
sys.path.insert(0, str(ROOT / "bench"))  # serve.py: the server process wrapper

from serve import Server, _free_port  # noqa: E402
from tandem.shared.bundle import load_bundle  # noqa: E402
from tandem.shared.protocol import CONTENT_TYPE, InferRequest, InferResponse, infer_path  # noqa: E402


@dataclass
class Workload:
    name: str
    bundle: Path
    onnx_path: Path
    inputs: list[str]
    pads: dict[str, float]
    outputs: list[str]  # the outputs asked for (those without the sequence axis)
    lengths: list[int]
    requests: list[dict[str, np.ndarray]]
    #: Dynamic int8: activations are quantized with one scale per batch, so an answer depends on
    #: what shares its batch (padding included) and is checked by cosine, not element by element.
    batch_dependent: bool = False
    results: dict[str, list[float]] = field(default_factory=dict)


# --- the synthetic model ------------------------------------------------------------------------


def make_encoder_onnx(path: Path, vocab: int = 1000, width: int = 256, ffn: int = 1024, layers: int = 2) -> Path:
    """input_ids, attention_mask INT64 [batch, sequence] -> embedding FP32 [batch, width]: token
    embedding, one single-head self-attention over the tokens the mask keeps, ``layers``
    feed-forward blocks (width -> ffn -> width, residual), mean over the kept tokens."""
    from onnx import TensorProto, helper, numpy_helper

    from support import save_onnx

    rng = np.random.default_rng(0)

    def weight(name: str, rows: int, cols: int) -> object:
        return numpy_helper.from_array((rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32), name)

    inits = [
        numpy_helper.from_array(rng.standard_normal((vocab, width)).astype(np.float32), "table"),
        weight("wq", width, width), weight("wk", width, width), weight("wv", width, width),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(-1e4, np.float32), "neg"),
        numpy_helper.from_array(np.array(1 / np.sqrt(width), np.float32), "scale"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["h0"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        # Keys the mask drops get -1e4 before the softmax: padding never reaches a kept token.
        helper.make_node("Sub", ["one", "maskf"], ["dropped"]),
        helper.make_node("Mul", ["dropped", "neg"], ["bias2"]),
        helper.make_node("Unsqueeze", ["bias2", "axis1"], ["bias"]),  # [b, 1, s]
        helper.make_node("MatMul", ["h0", "wq"], ["q"]),
        helper.make_node("MatMul", ["h0", "wk"], ["k"]),
        helper.make_node("MatMul", ["h0", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores0"]),
        helper.make_node("Mul", ["scores0", "scale"], ["scores1"]),
        helper.make_node("Add", ["scores1", "bias"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["attn"], axis=-1),
        helper.make_node("MatMul", ["attn", "v"], ["ctx"]),
        helper.make_node("Add", ["h0", "ctx"], ["h1"]),
    ]
    h = "h1"
    for i in range(layers):
        inits += [weight(f"w{i}a", width, ffn), weight(f"w{i}b", ffn, width)]
        nodes += [
            helper.make_node("MatMul", [h, f"w{i}a"], [f"f{i}a"]),
            helper.make_node("Relu", [f"f{i}a"], [f"f{i}r"]),
            helper.make_node("MatMul", [f"f{i}r", f"w{i}b"], [f"f{i}b"]),
            helper.make_node("Add", [h, f"f{i}b"], [f"h{i + 2}"]),
        ]
        h = f"h{i + 2}"
    nodes += [
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", [h, "mask3"], ["kept"]),
        helper.make_node("ReduceSum", ["kept", "axis1"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Max", ["count", "one"], ["safe"]),
        helper.make_node("Div", ["total", "safe"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    return save_onnx(graph, path)


def synthetic_bundle(directory: Path, private_key: Path) -> Path:
    from cloud_support import make_onnx_bundle
    from tandem.shared.bundle import TensorSpec

    onnx_path = make_encoder_onnx(directory / "model.onnx")
    return make_onnx_bundle(
        directory, private_key, onnx_path, "encoder", "1",
        [
            TensorSpec(name="input_ids", datatype="INT64", shape=["batch", "sequence"], pad=0),
            TensorSpec(name="attention_mask", datatype="INT64", shape=["batch", "sequence"], pad=0),
        ],
        [TensorSpec(name="embedding", datatype="FP32", shape=["batch", 256])],
    )


# --- the workload -------------------------------------------------------------------------------


def workload(bundle_dir: Path, args: argparse.Namespace) -> Workload:
    bundle = load_bundle(bundle_dir, verify_signature=False)
    m = bundle.manifest
    names = [t.name for t in m.inputs]
    bad = [t.name for t in m.inputs if t.datatype != "INT64" or len(t.shape) != 2 or t.pad is None]
    if bad:
        raise SystemExit(f"{bundle_dir}: inputs {bad} are not INT64 [batch, sequence] with a pad value")
    outputs = [t.name for t in m.outputs if len(t.shape) < 3] or [t.name for t in m.outputs]
    rng = np.random.default_rng(args.seed)
    lengths = [int(n) for n in rng.integers(args.min_len, args.max_len + 1, args.requests)]
    requests = []
    for n in lengths:
        inputs = {}
        for name in names:
            if "mask" in name:
                inputs[name] = np.ones((1, n), np.int64)
            elif "type" in name:
                inputs[name] = np.zeros((1, n), np.int64)
            else:  # token ids: within any vocabulary of 1000 or more, none of them a pad id
                inputs[name] = rng.integers(1, 1000, (1, n), dtype=np.int64)
        requests.append(inputs)
    return Workload(m.name, bundle_dir, bundle.variant_path("cloud"), names, {t.name: float(t.pad or 0) for t in m.inputs},
                    outputs, lengths, requests, batch_dependent=bundle.variant("cloud").precision == "int8-dynamic")


def pad_to(inputs: dict[str, np.ndarray], length: int, pads: dict[str, float]) -> dict[str, np.ndarray]:
    out = {}
    for name, arr in inputs.items():
        full = np.full((len(arr), length), pads[name], arr.dtype)
        full[:, : arr.shape[1]] = arr
        out[name] = full
    return out


def _session(path: Path, threads: int):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def raw_sorted(w: Workload, threads: int, batch: int, seconds: float) -> tuple[float, float]:
    """(requests/s, padding waste) of session.run over the requests sorted by length, in batches
    of ``batch`` padded to their longest, repeated for about ``seconds``."""
    sess = _session(w.onnx_path, threads)
    order = sorted(range(len(w.requests)), key=lambda i: w.lengths[i])
    feeds = []
    sent = computed = 0
    for start in range(0, len(order), batch):
        group = [w.requests[i] for i in order[start : start + batch]]
        longest = max(r[w.inputs[0]].shape[1] for r in group)
        feed = {name: np.concatenate([pad_to({name: r[name]}, longest, w.pads)[name] for r in group]) for name in w.inputs}
        feeds.append(feed)
        sent += sum(r[name].size for r in group for name in w.inputs)
        computed += sum(a.size for a in feed.values())
    for feed in feeds[:3]:
        sess.run(w.outputs, feed)  # warm-up
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for feed in feeds:
            sess.run(w.outputs, feed)
        done += len(w.requests)
    return done / (time.perf_counter() - start), 1 - sent / computed


# --- the load -----------------------------------------------------------------------------------


def bodies(w: Workload, padded: int | None) -> list[bytes]:
    out = []
    for inputs in w.requests:
        x = pad_to(inputs, padded, w.pads) if padded else inputs
        out.append(InferRequest(x, outputs=w.outputs).to_wire())
    return out


def http_request(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {CONTENT_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _connection(port: int, requests: list[bytes], counter: list[int], stop_at: float, errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            i = counter[0]
            counter[0] += 1
            writer.write(requests[i % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                errors[0] += 1
    finally:
        writer.close()


def load(port: int, requests: list[bytes], connections: int, seconds: float) -> tuple[float, int]:
    """(answered requests/s, non-200 answers) of ``connections`` closed-loop clients for ``seconds``."""

    async def run() -> tuple[float, int]:
        counter, errors = [0], [0]
        start = time.perf_counter()
        await asyncio.gather(*(_connection(port, requests, counter, start + seconds, errors) for _ in range(connections)))
        return counter[0] / (time.perf_counter() - start), errors[0]

    return asyncio.run(run())


def metrics(port: int, model: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("model") == model:
                key = s.name + ("{le=" + s.labels["le"] + "}" if "le" in s.labels else "")
                values[key] = values.get(key, 0.0) + s.value
    return values


def check_answers(w: Workload, port: int, sess, count: int = 24) -> None:  # type: ignore[no-untyped-def]
    """Every checked request, sent alone and padded to --max-len, answers what onnxruntime gives alone."""
    for inputs, padded in zip(w.requests[:count], bodies(w, max(w.lengths))[:count]):
        want = dict(zip(w.outputs, sess.run(w.outputs, inputs)))
        for body in (InferRequest(inputs, outputs=w.outputs).to_wire(), padded):
            req = urllib.request.Request(f"http://127.0.0.1:{port}{infer_path(w.name)}", data=body,
                                         headers={"Content-Type": CONTENT_TYPE})
            with urllib.request.urlopen(req, timeout=30) as r:
                got = InferResponse.from_wire(r.read()).outputs
            for name in w.outputs:
                if not _same(w, got[name], want[name]):
                    raise RuntimeError(f"{name}: the server answered {got[name].ravel()[:4]}, onnxruntime {want[name].ravel()[:4]}")


def _same(w: Workload, got: np.ndarray, want: np.ndarray) -> bool:
    if w.batch_dependent:
        # Measured on MiniLM int8: alone vs padded to 64 tokens or in a batch of 40, cosine >= 0.977
        # (mean 0.991), with the same cosine to fp32 (0.993) every way.
        a, b = got.ravel().astype(np.float64), want.ravel().astype(np.float64)
        return float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12) >= 0.95
    return bool(np.allclose(got, want, rtol=1e-3, atol=1e-4))


async def _concurrent_check(port: int, w: Workload, sess) -> None:  # type: ignore[no-untyped-def]
    """The same under load: 64 requests at once, so they are padded together."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async def one(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            async with http.post(f"http://127.0.0.1:{port}{infer_path(w.name)}", data=InferRequest(inputs, outputs=w.outputs).to_wire()) as r:
                return InferResponse.from_wire(await r.read()).outputs

        got = await asyncio.gather(*(one(x) for x in w.requests[:64]))
    for inputs, out in zip(w.requests[:64], got):
        for name, want in zip(w.outputs, sess.run(w.outputs, inputs)):
            if not _same(w, out[name], want):
                raise RuntimeError(f"{name}: a batched answer differs from onnxruntime alone")


# --- main ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="bundle directory with INT64 [batch, sequence] inputs (default: synthetic)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row (a and b alternate); rows report the median")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=512, help="distinct requests cycled through")
    ap.add_argument("--min-len", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads of the raw session (c)")
    ap.add_argument("--max-batch", type=int, default=32, help="the server's batching.max_batch_size, and c's batch size")
    ap.add_argument("--padding-ratio", type=float, default=None,
                    help="serve with this bound on elements computed per element sent (default: the server's)")
    ap.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE", help="environment for tandem serve (repeat)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (other work on the machine skews every number)")
    with tempfile.TemporaryDirectory(prefix="tandem-padding-") as t:
        tmp = Path(t)
        if args.bundle:
            bundle = load_bundle(args.bundle, verify_signature=False)
            repo = tmp / "repo"
            (repo / bundle.name).mkdir(parents=True)
            bundle_dir = repo / bundle.name / bundle.version
            bundle_dir.symlink_to(args.bundle.resolve())
            trust = ["--insecure-skip-signature"]
        else:
            from support import make_keys

            private, public = make_keys(tmp / "keys")
            repo = tmp / "repo"
            bundle_dir = synthetic_bundle(repo / "encoder" / "1", private)
            trust = ["--trusted-key", str(public)]
        w = workload(bundle_dir, args)
        mean_len = statistics.mean(w.lengths)
        print(f"== {w.name}: inputs {', '.join(w.inputs)} (pad {w.pads}), outputs asked {', '.join(w.outputs)}; "
              f"{len(w.requests)} requests of {args.min_len}-{args.max_len} tokens (mean {mean_len:.1f}), "
              f"{args.concurrency} connections, {args.duration:g} s x {args.repeat} per row", flush=True)

        c_runs: list[tuple[float, float]] = [raw_sorted(w, args.threads, args.max_batch, min(args.duration, 5.0))]
        print(f"  c raw sorted      {c_runs[0][0]:9.0f} req/s  (waste {100 * c_runs[0][1]:.1f}%)", flush=True)

        port = _free_port()
        env = {"TANDEM_ACCESS_LOG": "false", "TANDEM_BATCHING__MAX_BATCH_SIZE": str(args.max_batch),
               **({"TANDEM_BATCHING__MAX_PADDING_RATIO": str(args.padding_ratio)} if args.padding_ratio is not None else {}),
               **dict(kv.split("=", 1) for kv in args.serve_env)}
        serve_args = ["--repository", str(repo), "--port", str(port), *trust]
        cmd = ["tandem", "serve", *serve_args]
        server = Server("tandem", cmd, port, "/v2/health/ready", tmp / "tandem.log", env)
        a_runs: list[float] = []
        b_runs: list[float] = []
        a_stats: list[dict[str, float]] = []
        try:
            sess = _session(w.onnx_path, 1)
            check_answers(w, port, sess)
            asyncio.run(_concurrent_check(port, w, sess))
            plain, padded = bodies(w, None), bodies(w, args.max_len)
            path = infer_path(w.name)
            plain = [http_request(path, b) for b in plain]
            padded = [http_request(path, b) for b in padded]
            load(port, plain, args.concurrency, min(2.0, args.duration))  # warm-up: every length once
            for _ in range(args.repeat):
                before = metrics(port, w.name)
                rps, errors = load(port, plain, args.concurrency, args.duration)
                after = metrics(port, w.name)
                d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
                a_runs.append(rps)
                a_stats.append(d)
                sent, computed = d.get("tandem_inference_input_elements_total", 0), d.get("tandem_inference_padded_input_elements_total", 0)
                execs = d.get("tandem_inference_exec_count_total", 0)
                batch = d.get("tandem_inference_count_total", 0) / execs if execs else 0
                ratio_n = d.get("tandem_inference_batch_padding_ratio_count", 0)
                within = "/".join(
                    f"{100 * d.get('tandem_inference_batch_padding_ratio_bucket{le=' + le + '}', 0) / ratio_n:.0f}%" if ratio_n else "-"
                    for le in ("1.0", "1.1", "1.25")
                )
                print(f"  a server pads     {rps:9.0f} req/s  mean batch {batch:5.1f}  waste {100 * (1 - sent / computed) if computed else 0:.1f}%"
                      f"  batches padded <= 1x/1.1x/1.25x: {within}" + (f"  ERRORS {errors}" if errors else ""), flush=True)
                rps, errors = load(port, padded, args.concurrency, args.duration)
                b_runs.append(rps)
                print(f"  b client pads     {rps:9.0f} req/s  (waste {100 * (1 - mean_len / args.max_len):.1f}%)"
                      + (f"  ERRORS {errors}" if errors else ""), flush=True)
        finally:
            server.stop()
        c_runs.append(raw_sorted(w, args.threads, args.max_batch, min(args.duration, 5.0)))
        print(f"  c raw sorted      {c_runs[1][0]:9.0f} req/s  (again after the server; best kept)", flush=True)

        a, b = statistics.median(a_runs), statistics.median(b_runs)
        c, c_waste = max(c_runs)
        total = {k: sum(s.get(k, 0.0) for s in a_stats) for k in a_stats[0]} if a_stats else {}
        sent, computed = total.get("tandem_inference_input_elements_total", 0), total.get("tandem_inference_padded_input_elements_total", 0)
        print("\n" + "=" * 100)
        print(f"{w.name}: mixed lengths {args.min_len}-{args.max_len}, {args.concurrency} connections, max batch {args.max_batch}"
              + (f", padding bound {args.padding_ratio:g}" if args.padding_ratio is not None else ""))
        print(f"  a  server pads to the longest in each batch   {a:9.0f} req/s   waste {100 * (1 - sent / computed) if computed else 0:5.1f}%"
              f"  (runs {', '.join(f'{r:.0f}' for r in a_runs)})")
        print(f"  b  every request padded to {args.max_len} by the client  {b:9.0f} req/s   waste {100 * (1 - mean_len / args.max_len):5.1f}%"
              f"  (runs {', '.join(f'{r:.0f}' for r in b_runs)})")
        print(f"  c  raw onnxruntime, sorted batches of {args.max_batch:<3}     {c:9.0f} req/s   waste {100 * c_waste:5.1f}%")
        print(f"  a/b = {a / b:.2f} (target >= 1.5)   a/c = {a / c:.2f} (target >= 0.75)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
