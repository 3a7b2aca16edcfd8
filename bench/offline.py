"""Offline throughput: ``tandem batch``'s engine path against raw onnxruntime, side by side in one run.

    python bench/offline.py --bundle R/digits/1 --key K/tandem.pub [--rows 50000] [--threads 1] [--runs 5] [--variant edge]

Both run the bundle's cloud variant over the same rows, 64 rows per ``session.run`` (``--batch``),
with the same intra-op thread count:

- **raw**: one ``onnxruntime.InferenceSession`` (``intra_op_num_threads=T``), the rows already in
  memory, outputs collected in a list and concatenated: the floor of what any offline runner can do.
- **batch**: :func:`tandem.cloud.batch.run_batch` from an ``.npy`` file on disk to an ``.npy`` file:
  reading (memory-mapped), the engine's checks, chunks written and fsynced with their journal
  entries (the resumability), and OUTPUT assembled and renamed. The engine (its session) is built
  once, outside the timing, like raw's session.
- **batch+load**: the same plus loading and verifying the bundle and building the session each run
  (what one ``tandem batch`` command costs, less the interpreter's start).

Runs alternate (raw, batch, batch+load, raw, ...) so a loaded machine slows all alike; the medians
and the ratios to raw are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="a bundle directory (the digits bundle of tandem build examples/digits)")
    ap.add_argument("--key", type=Path, required=True, help="public key that signed it")
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--chunk-rows", type=int, default=None, help="rows per saved chunk (default: measured, as tandem batch does)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--variant", default="cloud")
    args = ap.parse_args()

    import onnxruntime as ort

    from tandem.cloud.batch import BatchOptions, EngineCompute, load_model, run_batch

    bundle = load_model(str(args.bundle), trusted_keys=[args.key], variant=args.variant)
    onnx_path = bundle.variant_path(args.variant)
    # The bundle's sample inputs, tiled with a little noise: real-looking rows of the model's shape.
    samples = bundle.load_samples()[0]
    name = bundle.manifest.inputs[0].name
    base = samples[name].astype(np.float32)
    rng = np.random.default_rng(0)
    x = base[rng.integers(0, len(base), args.rows)] + rng.normal(0, 0.01, (args.rows, *base.shape[1:])).astype(np.float32)

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    raw_sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    engine = EngineCompute(bundle, args.variant, threads=args.threads, batch_size=args.batch)
    opts = BatchOptions(batch_size=args.batch, chunk_rows=args.chunk_rows, threads=args.threads, variant=args.variant,
                        progress=False, overwrite=True)

    def raw() -> float:
        t0 = time.perf_counter()
        outs = [raw_sess.run(None, {name: x[s : s + args.batch]})[0] for s in range(0, args.rows, args.batch)]
        np.concatenate(outs)
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="tandem-offline-", dir=os.environ.get("TMPDIR")) as tmp:
        src, out = Path(tmp) / "x.npy", Path(tmp) / "y.npy"
        np.save(src, x)

        def batch() -> float:
            t0 = time.perf_counter()
            run_batch(engine, src, out, opts, log=lambda s: None)
            return time.perf_counter() - t0

        def batch_load() -> float:
            t0 = time.perf_counter()
            b = load_model(str(args.bundle), trusted_keys=[args.key], variant=args.variant)
            run_batch(b, src, out, opts, log=lambda s: None)
            return time.perf_counter() - t0

        # Warm-up (first-run allocations, page cache) and a check that both compute the same thing.
        raw(), batch()
        want = raw_sess.run(None, {name: x[: args.batch * 4]})[0]
        np.testing.assert_allclose(np.load(out)[: args.batch * 4], want, rtol=1e-5, atol=1e-5)
        times: dict[str, list[float]] = {"raw": [], "batch": [], "batch+load": []}
        load0 = f"{os.getloadavg()[0]:.1f}"
        for _ in range(args.runs):
            times["raw"].append(raw())
            times["batch"].append(batch())
            times["batch+load"].append(batch_load())

    med = {k: statistics.median(v) for k, v in times.items()}
    v = bundle.variant(args.variant)
    chunks = f"chunks of {args.chunk_rows} rows" if args.chunk_rows else "measured chunks (~2 s of compute)"
    print(f"model {bundle.name}:{bundle.version} variant {v.name} ({v.precision}); {args.rows} rows, batch {args.batch}, "
          f"{chunks}, {args.threads} intra-op thread(s), {args.runs} alternating runs, medians; load average before: "
          f"{load0}, after: {os.getloadavg()[0]:.1f}")
    print()
    print("| path | median s | min s | rows/s (median) | vs raw onnxruntime (medians) |")
    print("|---|---:|---:|---:|---:|")
    for k in ("raw", "batch", "batch+load"):
        print(f"| {k} | {med[k]:.3f} | {min(times[k]):.3f} | {args.rows / med[k]:,.0f} | {med['raw'] / med[k]:.1%} |")
    print()
    print("every run (s): " + "; ".join(f"{k} " + " ".join(f"{t:.3f}" for t in v) for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
