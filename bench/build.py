"""Re-measure every variant of the digits bundle in one run: size, accuracy, latency p50/p99,
throughput, and ratios to the fp32 teacher.

    python bench/build.py                      # build a fresh digits bundle (full) into a temp repo, then measure
    python bench/build.py --quick              # same with a quick build
    python bench/build.py --bundle artifacts/repository/digits/1 --key artifacts/keys/tandem.pub

All variants are measured interleaved (round-robin in blocks) in one process, so the ratios hold even
when the machine is busy; the absolute numbers move with the load. The dynamic-int8 teacher (rejected
by the build because ConvInteger is slow on CPU) is re-made from the fp32 teacher and measured too.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"


def _load_digits_test(seed: int):  # type: ignore[no-untyped-def]
    s = importlib.util.spec_from_file_location("bench_digits_spec", DIGITS / "spec.py")
    assert s is not None and s.loader is not None
    module = importlib.util.module_from_spec(s)
    s.loader.exec_module(module)
    return module.load_data(seed)["test"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="an existing digits bundle directory (default: build one)")
    ap.add_argument("--key", type=Path, help="public key to verify --bundle with (default: skip verification)")
    ap.add_argument("--quick", action="store_true", help="quick build when building")
    ap.add_argument("--runs", type=int, default=1000, help="latency runs at batch 1 per variant (default 1000)")
    ap.add_argument("--batch", type=int, default=64, help="throughput batch size (default 64)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per session (default 1)")
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.ERROR)  # ORT's quantizer warns about pre-processing on the root logger
    from tandem.quantize.evaluate import evaluate_variants, hardware_info
    from tandem.quantize.quantize import quantize_dynamic_int8
    from tandem.quantize.spec import QuantConfig
    from tandem.shared.bundle import load_bundle

    tmp = tempfile.TemporaryDirectory(prefix="tandem-bench-build-")
    if args.bundle is None:
        from tandem.quantize.pipeline import build
        from tandem.quantize.spec import load_spec
        from tandem.shared import signing

        priv, pub = signing.generate_keypair(Path(tmp.name) / "keys")
        t0 = time.perf_counter()
        result = build(load_spec(DIGITS), Path(tmp.name) / "repo", signing.load_private_key(priv), quick=args.quick,
                       progress=False, echo=lambda _: None)
        print(f"built {result.bundle_path} ({'quick' if args.quick else 'full'}) in {time.perf_counter() - t0:.1f} s")
        bundle = load_bundle(result.bundle_path, pub)
    else:
        bundle = load_bundle(args.bundle, args.key, verify_signature=args.key is not None)
    m = bundle.manifest
    seed = int(m.provenance.build_config.get("seed", 0))
    x, y = _load_digits_test(seed)

    paths = {v.name: bundle.path / v.file for v in m.variants}
    rejected = Path(tmp.name) / "cloud-int8-dyn.onnx"
    quantize_dynamic_int8(bundle.variant_path("cloud-fp32"), rejected, QuantConfig(name="int8-dyn", format="dynamic"))
    paths["cloud-int8-dyn (rejected)"] = rejected
    roles = {v.name: v.role for v in m.variants} | {"cloud-int8-dyn (rejected)": "-"}
    precision = {v.name: v.precision for v in m.variants} | {"cloud-int8-dyn (rejected)": "int8-dynamic"}

    hw = hardware_info()
    print(f"{hw.cpu}, {hw.cores} cores; flags: {' '.join(f for f in hw.flags if 'vnni' in f or 'amx' in f or f == 'avx512f')}")
    print(f"measuring {len(paths)} variants interleaved: {args.runs} runs at batch 1, throughput at batch {args.batch}, "
          f"{args.threads} intra-op thread(s), {len(x)} test inputs")
    t0 = time.perf_counter()
    metrics, _ = evaluate_variants(paths, x, y, reference="cloud-fp32", runs=args.runs, warmup=max(20, args.runs // 10),
                                   throughput_batch_size=args.batch, throughput_runs=max(10, args.runs // 20),
                                   intra_op_threads=args.threads)
    print(f"measured in {time.perf_counter() - t0:.1f} s; provider {metrics['cloud-fp32'].provider}")
    ref = metrics["cloud-fp32"]
    ref_size = paths["cloud-fp32"].stat().st_size
    header = (f"{'variant':<26}{'role':<11}{'precision':<14}{'size MB':>9}{'acc':>8}{'p50 ms':>9}{'p99 ms':>9}"
              f"{'thr/s':>10}{'p50 x':>8}{'thr x':>8}{'size x':>9}{'acc x':>8}")
    print(header)
    print("-" * len(header))
    for name, mm in metrics.items():
        size = paths[name].stat().st_size
        print(f"{name:<26}{roles[name]:<11}{precision[name]:<14}{size / 1e6:>9.3f}{mm.accuracy:>8.4f}"
              f"{mm.latency_p50_ms:>9.3f}{mm.latency_p99_ms:>9.3f}{mm.throughput_per_s:>10.0f}"
              f"{ref.latency_p50_ms / mm.latency_p50_ms:>8.2f}{mm.throughput_per_s / ref.throughput_per_s:>8.2f}"
              f"{ref_size / size:>9.1f}{(mm.accuracy or 0) / (ref.accuracy or 1):>8.3f}")
    print("ratios are to the fp32 teacher (cloud-fp32): p50 x = its p50 / this p50 (higher = faster), thr x = this "
          "throughput / its throughput, size x = its size / this size; cloud-fp16 is a GPU variant measured on CPU.")
    cloud, edge = m.variant("cloud"), m.variant("edge")
    cm, em = metrics[cloud.name], metrics[edge.name]
    print(f"edge ({edge.name}) vs cloud ({cloud.name}): {cm.latency_p50_ms / em.latency_p50_ms:.1f}x faster (p50), "
          f"{paths[cloud.name].stat().st_size / paths[edge.name].stat().st_size:.0f}x smaller, "
          f"{(em.accuracy or 0) / (cm.accuracy or 1) * 100:.1f}% of its accuracy")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
