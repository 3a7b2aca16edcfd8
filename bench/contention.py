"""What does a busy event loop cost onnxruntime on the same cores?

``tandem serve`` runs its event loop beside the model's session on the same cores. On the 2-core
box the onnxruntime session's batch took ~3.2 ms in the server against ~2.3 ms alone, while the machine sat
~13% idle: onnxruntime splits each operator between its threads and waits for the slowest, so a
thread sharing its core with the loop holds the other one up. This script measures that in
isolation: one session with ``--threads`` intra-op threads runs a fixed batch while a plain
Python thread is busy for a share (the duty) of every millisecond (it sleeps the rest, releasing
the GIL, as the loop waits in epoll). Prints the batch's median time per duty and the slowdown
against the ideal, which is the session getting every cycle the busy thread leaves free.

    python bench/contention.py --model R/digits/1/cloud-fp32.onnx [--batch 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import numpy as np


def _session(path: str, threads: int):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as tandem serve runs it
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def batch_ms(sess, feeds: dict[str, np.ndarray], duty: float, runs: int) -> float:  # type: ignore[no-untyped-def]
    """Median time of one run while a thread is busy ``duty`` of each millisecond."""
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            while time.perf_counter() - t < duty * 1e-3:
                pass
            time.sleep((1 - duty) * 1e-3)

    hog = threading.Thread(target=busy, daemon=True) if duty > 0 else None
    if hog is not None:
        hog.start()
    try:
        for _ in range(10):
            sess.run(None, feeds)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - t)
    finally:
        stop.set()
        if hog is not None:
            hog.join()
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an ONNX file whose inputs are float32 with a batch dimension")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--duties", default="0,0.2,0.4,0.6", type=lambda s: [float(x) for x in s.split(",")])
    p.add_argument("--runs", type=int, default=300)
    args = p.parse_args()
    sess = _session(args.model, args.threads)
    feeds = {
        i.name: np.random.default_rng(0).standard_normal([args.batch, *[d if isinstance(d, int) else 1 for d in i.shape[1:]]]).astype(np.float32)
        for i in sess.get_inputs()
    }
    cores = os.cpu_count() or 1
    print(f"{args.model}: batch {args.batch}, {args.threads} intra-op threads, {cores} cores, {args.runs} runs per duty")
    base = None
    for duty in args.duties:
        ms = batch_ms(sess, feeds, duty, args.runs)
        base = base or ms
        # The busy thread takes duty of one core out of `cores`: the onnxruntime session's fair share is the rest.
        ideal = base * cores / (cores - duty) if args.threads >= cores else base
        print(f"  busy thread {duty:4.0%} of a core: {ms:6.2f} ms per batch  {ms / base:4.2f}x alone  {ms / ideal:4.2f}x ideal")


if __name__ == "__main__":
    main()
