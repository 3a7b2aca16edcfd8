"""The build report beside the bundle: Markdown (every variant, shipped or rejected and why; the
training runs; the edge-vs-cloud checks; calibration) and a PNG of accuracy vs latency vs size."""

from __future__ import annotations

from pathlib import Path

from tandem.shared.bundle import Calibration, Manifest, describe

from .distill import TrainResult
from .quantize import Candidate, quality


def write(
    md_path: Path,
    png_path: Path,
    *,
    manifest: Manifest,
    rows: list[Candidate],
    histories: dict[str, TrainResult],
    test_accuracy: dict[str, float],
    choice: str,
    edge_checks: list[tuple[str, float, float, bool]],
    steps: dict[str, float],
    total_seconds: float,
    calibration: Calibration,
) -> None:
    plot(png_path, rows, f"{manifest.name}:{manifest.version}", manifest.task.metric)
    md_path.write_text(_markdown(manifest, rows, histories, test_accuracy, choice, edge_checks, steps,
                                 total_seconds, calibration, png_path.name))


def plot(path: Path, rows: list[Candidate], title: str, metric: str = "accuracy") -> None:
    """Three aligned bar panels per variant (accuracy, p50 latency, size), coloured by verdict: one
    row per variant stays readable where a scatter of near-identical points does not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [c for c in rows if c.metrics is not None]
    names = [f"{c.name} [{c.role}]" if c.role else c.name for c in measured]
    colors = ["tab:green" if c.role else ("tab:blue" if c.accepted else "tab:red") for c in measured]
    acc = [(quality(c.metrics) or 0.0) * 100 for c in measured]
    p50 = [c.metrics.latency_p50_ms for c in measured]  # type: ignore[union-attr]
    size = [c.size_bytes / 1e6 for c in measured]
    y = list(range(len(measured)))[::-1]
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.45 * len(measured) + 1.8), sharey=True, dpi=110)
    panels = [(acc, f"test {metric} (%)", False, "{:.2f}"), (p50, "latency p50, batch 1 (ms, log)", True, "{:.3f}"),
              (size, "file size (MB, log)", True, "{:.3f}")]
    for ax, (values, label, log, fmt) in zip(axes, panels):
        ax.barh(y, values, color=colors, alpha=0.75)
        for yi, v in zip(y, values):
            ax.text(v, yi, " " + fmt.format(v), va="center", fontsize=7)
        if log:
            ax.set_xscale("log")
        else:
            lo = min(values, default=0.0)
            ax.set_xlim(max(0.0, lo - 2.0), 100.5)
        ax.set_xlabel(label)
        ax.grid(True, axis="x", which="both", alpha=0.3)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(names, fontsize=8)
    fig.suptitle(f"{title}: every variant measured the same way on this CPU "
                 "(green = shipped, blue = accepted but not shipped, red = rejected)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _markdown(
    manifest: Manifest, rows: list[Candidate], histories: dict[str, TrainResult], test_accuracy: dict[str, float],
    choice: str, edge_checks: list[tuple[str, float, float, bool]], steps: dict[str, float], total_seconds: float,
    cal: Calibration, png_name: str,
) -> str:
    metric = manifest.task.metric
    ref = next((c for c in rows if c.name == "cloud-fp32"), None)
    ref_m = ref.metrics if ref else None
    hw = ref_m.hardware if ref_m else None
    out: list[str] = [f"# Build report: {manifest.name}:{manifest.version}", ""]
    if manifest.description:
        out += [manifest.description, ""]
    out += [f"Built {manifest.provenance.created_at} from `{manifest.provenance.source}` in {total_seconds:.1f} s "
            f"({'quick' if manifest.provenance.build_config.get('quick') else 'full'} build, seed "
            f"{manifest.provenance.build_config.get('seed')}).", ""]
    if hw and ref_m:
        out += [f"Measured on **{hw.cpu}** ({hw.cores} cores, {hw.machine}, {hw.system}); provider really used: "
                f"`{ref_m.provider}`; {ref_m.intra_op_threads} intra-op thread(s) per session; latency at batch "
                f"{ref_m.latency_batch_size}, throughput at batch {ref_m.throughput_batch_size}; all variants measured "
                f"in one interleaved run. CPU flags: {' '.join(hw.flags) or '-'}.", ""]
        out += ["Tool versions: " + ", ".join(f"{k} {v}" for k, v in ref_m.tool_versions.items()), ""]
    out += [f"![accuracy vs latency vs size]({png_name})", "", "## Variants", "",
            f"| variant | shipped as | precision | size MB | {metric} | other measures | p50 ms | p99 ms | "
            "throughput/s | speedup vs fp32 teacher | smaller than fp32 teacher | verdict |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    ref_size = ref.size_bytes if ref else 0
    for c in rows:
        m = c.metrics
        size = c.size_bytes
        verdict = f"**rejected**: {c.reason}" if c.config is not None and not c.accepted else c.reason
        if c.notes:  # e.g. why ONNX Runtime's pre-processing was skipped or reduced
            verdict += " (" + "; ".join(c.notes) + ")"
        if m is None:
            out.append(f"| {c.name} | - | {c.precision} | - | - | - | - | - | - | - | - | **rejected**: {c.reason} |")
            continue
        speed = f"{ref_m.latency_p50_ms / m.latency_p50_ms:.2f}x" if ref_m else "-"
        ratio = f"{ref_size / size:.1f}x" if size and ref_size else "-"
        q = quality(m)
        others = {"agreement": m.agreement} if m.agreement is not None and m.accuracy is not None else {}
        others.update(m.metrics)
        other = ", ".join(f"{k} {v:.4f}" for k, v in others.items()) or "-"
        out.append(
            f"| {c.name} | {c.role or '-'} | {c.precision} | {size / 1e6:.3f} | {q if q is None else format(q, '.4f')} | "
            f"{other} | {m.latency_p50_ms:.3f} | {m.latency_p99_ms:.3f} | {m.throughput_per_s:.0f} | "
            f"{speed} | {ratio} | {verdict} |"
        )
    out += ["", f"Quality is {metric} on the test split"
            + (" against the fp32 teacher's outputs" if metric != "accuracy" else "") + ". "
            "The quantized candidates are judged against their own fp32 parent (quality drop within "
            f"{manifest.provenance.build_config.get('budgets', {}).get('max_accuracy_drop')} and p50 speedup of at "
            f"least {manifest.provenance.build_config.get('budgets', {}).get('min_speedup')}x with no loss of "
            "throughput); rejected candidates are not shipped. The fp16 variant is for GPUs: its latency above was "
            "measured on the CPU provider because this machine has no GPU, and says nothing about GPU speed.", ""]
    out += ["## Edge vs cloud", "", "| check | measured | required | |", "|---|---:|---:|---|"]
    for what, value, need, ok in edge_checks:
        out.append(f"| {what} | {value:.3f} | {need:.3f} | {'pass' if ok else 'FAIL'} |")
    out += ["", "## Training and distillation", "", choice + ".", "",
            f"| model | test {metric} (torch) |", "|---|---:|"]
    out += [f"| {k} | {v:.4f} |" for k, v in test_accuracy.items()]
    gain = test_accuracy.get("student distilled (torch)", 0.0) - test_accuracy.get("student baseline (torch)", 0.0)
    if "student baseline (torch)" in test_accuracy:
        out += ["", f"Distillation gain on the test split: {gain * 100:+.2f} points "
            f"({'a gain' if gain > 0 else 'no gain'} on this run; one seed, {manifest.variants[0].metrics.n_eval if manifest.variants[0].metrics else '?'} test inputs, "
            "so differences of one or two inputs are noise).", ""]
    out += ["", f"| run | epochs | best epoch | best val {metric} | final loss | seconds |", "|---|---:|---:|---:|---:|---:|"]
    for k, h in histories.items():
        last = h.history[-1] if h.history else None
        out.append(f"| {k} | {len(h.history)} | {h.best_epoch} | {h.best_val_accuracy:.4f} | "
                   f"{last.loss if last else float('nan'):.4f} | {h.seconds:.1f} |")
    out += ["", "<details><summary>per-epoch metrics</summary>", ""]
    for k, h in histories.items():
        out += [f"**{k}**", "", f"| epoch | loss | train acc | val {metric} |", "|---:|---:|---:|---:|"]
        out += [f"| {e.epoch} | {e.loss:.4f} | {e.train_accuracy:.4f} | {e.val_accuracy:.4f} |" for e in h.history]
        out.append("")
    out += ["</details>", "", f"## Calibration ({cal.variant} vs {cal.reference}, {cal.n} {cal.split} inputs)", "",
            f"Edge confidence: {cal.confidence}; a row counts as good by {cal.metric}.", "",
            f"| threshold | keep on edge | edge {cal.metric} on kept | cascade {cal.metric} |", "|---:|---:|---:|---:|"]
    for p in cal.points:
        kept = f"{p.edge_accuracy_kept:.4f}" if p.edge_accuracy_kept is not None else "-"
        out.append(f"| {p.threshold:.3f} | {p.keep_share:.3f} | {kept} | {p.cascade_accuracy:.4f} |")
    out += ["", "## Steps", "", "| step | seconds |", "|---|---:|"]
    out += [f"| {k} | {v:.1f} |" for k, v in steps.items()]
    out += ["", "## Manifest summary", "", "```", describe(manifest).rstrip(), "```", ""]
    return "\n".join(out)
