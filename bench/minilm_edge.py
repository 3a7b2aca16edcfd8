"""Which MiniLM edge model? Quality and speed of teacher slices, without a full build.

Two parts, each a side-by-side comparison in one run:

* ``--speed``: every slice in ``--slices`` (untrained: speed does not depend on the weights) is
  exported, pre-processed and quantized as the build does (dynamic int8 over MatMul, Gemm and
  Gather), then timed as the build times variants (batch 1 over the held-out sentences, each at its
  own length; 1 intra-op thread; the variants in turns of 10 runs) against the cloud variant of a
  built bundle (``--bundle``). Prints the median latency, the speed-up over the cloud variant and
  the int8 file size.
* ``--train``: one slice is distilled exactly as ``tandem build examples/minilm`` does (the same
  data, teacher targets, losses, bf16, one thread, learning rate) for ``--epochs`` epochs; after
  each, the fp32 slice's mean cosine and top-10 retrieval overlaps with the teacher on the
  validation and the held-out test sentences (an index of its own; its queries in the teacher's
  index, see ``quantize/quality.py``). Fewer epochs than the build's 9 compare candidates
  at a fraction of a build's time; the test figures at 9 epochs are the build's.

    HF_HUB_OFFLINE=1 python bench/minilm_edge.py --speed --bundle REPO/minilm/1 \\
        --slices 0,5:512 0,5:768 0,3,5:256 0,3,5:512
    HF_HUB_OFFLINE=1 python bench/minilm_edge.py --train --slices 0,3,5:512 --epochs 3

A slice is written ``LAYERS:FFN[:RANK]`` (teacher layers kept, feed-forward units kept per layer,
rank of the factorised token table; 128 by default), see ``teacher_slice`` in
``examples/minilm/models.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "minilm"


def _slice(text: str) -> tuple[tuple[int, ...], int, int]:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"a slice is LAYERS:FFN[:RANK], e.g. 0,5:512, not {text!r}")
    layers = tuple(int(v) for v in parts[0].split(","))
    return layers, int(parts[1]), int(parts[2]) if len(parts) == 3 else 128


def _spec() -> Any:
    from tandem.quantize.spec import load_spec

    return load_spec(EXAMPLE / "spec.py")


def speed(bundle: Path, slices: list[str], runs: int) -> None:
    from tandem.quantize.export import export_onnx
    from tandem.quantize.quantize import preprocess, quantize_dynamic_int8
    from tandem.quantize.spec import QuantConfig

    spec = _spec()
    teacher_slice = spec.student.__globals__["teacher_slice"]
    cfg = QuantConfig(name="int8-dyn-emb", format="dynamic", op_types=["MatMul", "Gemm", "Gather"])
    rng = np.random.default_rng(0)
    decls = [SimpleNamespace(name=n, shape=["batch", "sequence"]) for n in ("input_ids", "attention_mask")]
    example = {"input_ids": rng.integers(1000, 20000, (4, 16)), "attention_mask": np.ones((4, 16), np.int64)}
    cloud = bundle / "cloud-int8-dyn-emb.onnx"
    if not cloud.is_file():
        sys.exit(f"{cloud} not found: --bundle is a built minilm bundle's directory")
    paths = {"cloud-int8-dyn-emb": cloud}
    with tempfile.TemporaryDirectory(prefix="tandem-minilm-edge-") as tmp:
        for text in slices:
            layers, ffn, rank = _slice(text)
            fp32 = Path(tmp) / f"{text.replace(',', '-').replace(':', '_')}.onnx"
            export_onnx(teacher_slice(layers=layers, ffn=ffn, rank=rank).eval(), example, fp32, inputs=decls,
                        output_names=["embedding"])
            pre, _ = preprocess(fp32, fp32.with_suffix(".pre.onnx"))
            quantize_dynamic_int8(pre, fp32.with_suffix(".int8.onnx"), cfg)
            paths[text] = fp32.with_suffix(".int8.onnx")
        from tandem.quantize.evaluate import Padding, measure_timings
        from tandem.quantize.spec import load_dataset

        data = load_dataset(spec, 0)
        timings = measure_timings(paths, data.test.x, runs=runs, warmup=20, throughput_runs=1,
                                  padding=Padding(data.inputs))
        base = float(np.median(timings["cloud-int8-dyn-emb"].latencies_ms))
        print(f"{'variant':20} {'p50 ms':>7} {'faster':>7} {'MB':>6}  (batch 1, held-out sentences, {runs} runs, 1 thread)")
        for k, t in timings.items():
            p50 = float(np.median(t.latencies_ms))
            print(f"{k:20} {p50:7.3f} {base / p50:6.2f}x {os.path.getsize(paths[k]) / 1e6:6.2f}")


def train(text: str, epochs: int) -> None:
    from tandem.quantize.distill import fit, predict, predict_hidden
    from tandem.quantize.evaluate import Padding
    from tandem.quantize.pipeline import _concat_padded
    from tandem.quantize.quality import measure
    from tandem.quantize.spec import load_dataset

    t0 = time.perf_counter()
    spec = _spec()
    tr = spec.training
    data = load_dataset(spec, 0)
    names = [d.name for d in data.inputs]
    pad = Padding(data.inputs)
    teacher = spec.teacher()
    x = data.train.x
    if data.unlabelled:
        x = {k: _concat_padded(v, data.unlabelled[k], data.pads().get(k)) for k, v in x.items()}
    hidden, targets = predict_hidden(teacher, x, names, padding=pad, precision=tr.precision)
    refs = {s: predict(teacher, getattr(data, s).x, names, padding=pad) for s in ("val", "test")}
    print(f"[{time.perf_counter() - t0:5.0f}s] {len(x[names[0]])} training texts, teacher targets ready", flush=True)
    layers, ffn, rank = _slice(text)
    student = spec.student.__globals__["teacher_slice"](layers=layers, ffn=ffn, rank=rank)
    epoch = [0]

    def score(model: Any) -> float:
        epoch[0] += 1
        line, val = [], 0.0
        for s, ref in refs.items():
            # The build's own measure: cosine and both top-k overlaps, as its report shows them.
            q = measure(spec.task, predict(model, getattr(data, s).x, names, padding=pad), ref, None)
            k = spec.task.top_k
            val = q.value if s == "val" else val
            line.append(f"{s} cosine {q.value:.4f} top-{k} {q.extra[f'top{k}_overlap']:.3f} "
                        f"(queries {q.extra[f'top{k}_query_overlap']:.3f})")
        print(f"[{time.perf_counter() - t0:5.0f}s] {text} epoch {epoch[0]}: " + " | ".join(line), flush=True)
        return val

    fit(student, x, names, loss="cosine", targets=targets, labels=None, val_score=score, epochs=epochs,
        lr=tr.student_lr, batch_size=tr.batch_size, seed=0, padding=pad, threads=tr.threads, hidden=hidden,
        hidden_weight=tr.hidden_weight, precision=tr.precision, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--bundle", type=Path, help="a built minilm bundle directory (for --speed)")
    ap.add_argument("--slices", nargs="+", default=["0,5:512"], type=str)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--runs", type=int, default=400)
    args = ap.parse_args()
    for s in args.slices:
        _slice(s)  # a bad slice fails before minutes of work
    if args.speed == args.train:
        ap.error("give one of --speed or --train")
    if args.speed:
        if args.bundle is None:
            ap.error("--speed needs --bundle")
        speed(args.bundle, args.slices, args.runs)
    else:
        if len(args.slices) != 1:
            ap.error("--train takes one slice (run several side by side to compare them)")
        train(args.slices[0], args.epochs)


if __name__ == "__main__":
    main()
