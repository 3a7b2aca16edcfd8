"""spec -> signed bundle in ``REPO/<name>/<version>/`` plus its build report beside it.

Steps (Olive's vocabulary: passes, then one evaluator): train the teacher, distill the student (and
train the same student without distillation as a baseline), export both to ONNX and check them
against torch, quantize (the config search) and convert to fp16, measure every variant in one
interleaved run, accept or reject each quantized variant against its fp32 parent, check the edge
variant against the cloud variant, calibrate the edge confidence on the validation split, record
samples, seal and sign, write the report.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tandem.shared.bundle import (
    MANIFEST_NAME,
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
from tandem.shared.errors import ManifestError

from . import report
from .calibration import calibrate
from .distill import TrainResult, predict_logits, train
from .errors import BudgetError, BuildError, SpecError
from .evaluate import evaluate_variants, hardware_info, make_session, run_batched, tool_versions
from .export import export_onnx, verify_export
from .quantize import Candidate, best, convert_fp16, judge, make_candidates, summary
from .spec import NAME_PATTERN, BuildSpec, Dataset, load_dataset

log = logging.getLogger(__name__)

CLOUD_FP32 = "cloud-fp32"
CLOUD_FP16 = "cloud-fp16"
EDGE_FP32 = "edge-fp32"
#: Tolerance a device gets when it replays the recorded samples: int8 kernels may round differently
#: on another CPU (VNNI or not), by far more than fp32 reordering does.
SAMPLES_ATOL = 5e-3


@dataclass
class BuildResult:
    bundle_path: Path
    manifest: Manifest
    report_md: Path
    report_png: Path
    candidates: list[Candidate]
    seconds: float
    steps: dict[str, float] = field(default_factory=dict)


def next_version(model_dir: Path) -> str:
    """One more than the largest integer version under ``model_dir`` ("1" when there is none)."""
    numbers = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] if model_dir.is_dir() else []
    return str(max(numbers, default=0) + 1)


def _call_factory(factory: Callable[[], Any], what: str, source: str) -> Any:
    try:
        model = factory()
    except Exception as e:
        raise SpecError(f"the {what} factory in {source} failed: {type(e).__name__}: {e}") from None
    import torch

    if not isinstance(model, torch.nn.Module):
        raise SpecError(f"the {what} factory in {source} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build(
    spec: BuildSpec,
    repository: str | Path,
    private_key: Ed25519PrivateKey,
    *,
    version: str | None = None,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> BuildResult:
    """Build, sign and write the bundle; raise a :class:`~tandem.quantize.errors.BuildError` subclass
    naming the reason when the spec is bad or no variant meets the budgets for a required role."""
    import torch

    started = time.perf_counter()
    steps: dict[str, float] = {}
    mark = [time.perf_counter()]

    def step(name: str) -> None:
        now = time.perf_counter()
        steps[name] = now - mark[0]
        mark[0] = now
        echo(f"[{now - started:6.1f}s] {name} done")

    training = spec.effective_training(quick)
    search = spec.effective_search(quick)
    ev = spec.effective_evaluation(quick)
    data = load_dataset(spec, seed)
    n_classes = len(data.labels)

    model_dir = Path(repository).resolve() / spec.name
    version = version or next_version(model_dir)
    if not re.match(NAME_PATTERN, version):
        raise BuildError(f"version {version!r} must match {NAME_PATTERN} (it becomes a directory name)")
    final = model_dir / version
    if (final / MANIFEST_NAME).exists() or (final.exists() and any(final.iterdir())):
        raise BuildError(f"{final} already exists; pick another --version or remove it")
    model_dir.mkdir(parents=True, exist_ok=True)
    work = model_dir / f".{version}.building-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        torch.manual_seed(seed)
        np.random.seed(seed)
        torch.set_num_threads(training.threads)
        echo(f"building {spec.name}:{version} from {spec.source} ({'quick' if quick else 'full'}, seed {seed}); "
             f"data: {len(data.x_train)} train / {len(data.x_val)} val / {len(data.x_test)} test")

        # 1. teacher
        teacher = _call_factory(spec.teacher, "teacher", spec.source)
        histories: dict[str, TrainResult] = {}
        if spec.train_teacher and training.teacher_epochs > 0:
            histories["teacher"] = train(
                teacher, data.x_train, data.y_train, data.x_val, data.y_val, epochs=training.teacher_epochs,
                lr=training.teacher_lr, batch_size=training.batch_size, weight_decay=training.weight_decay,
                seed=seed, augment=spec.augment, threads=training.threads, desc="teacher", progress=progress,
            )
        step("train teacher")

        # 2. student: distilled, and the same student without distillation as the honest baseline
        common = dict(epochs=training.student_epochs, lr=training.student_lr, batch_size=training.batch_size,
                      weight_decay=training.weight_decay, seed=seed, augment=spec.augment, progress=progress)
        histories["student (baseline, no distillation)"] = base = train(
            _call_factory(spec.student, "student", spec.source), data.x_train, data.y_train, data.x_val, data.y_val,
            desc="student baseline", **common,  # type: ignore[arg-type]
        )
        histories["student (distilled)"] = dist = train(
            _call_factory(spec.student, "student", spec.source), data.x_train, data.y_train, data.x_val, data.y_val,
            teacher=teacher, temperature=training.temperature, alpha=training.alpha,
            desc="student distilled", **common,  # type: ignore[arg-type]
        )
        # Chosen on validation, never on test, so the test numbers in the report stay honest.
        distilled_wins = dist.best_val_accuracy >= base.best_val_accuracy
        student = dist.model if distilled_wins else base.model
        student_test = {
            "teacher (torch)": float((predict_logits(teacher, data.x_test).argmax(1) == data.y_test).mean()),
            "student baseline (torch)": float((predict_logits(base.model, data.x_test).argmax(1) == data.y_test).mean()),
            "student distilled (torch)": float((predict_logits(dist.model, data.x_test).argmax(1) == data.y_test).mean()),
        }
        choice = (
            f"shipped the {'distilled' if distilled_wins else 'baseline (no distillation)'} student: "
            f"validation accuracy distilled {dist.best_val_accuracy:.4f} vs baseline {base.best_val_accuracy:.4f} "
            f"(T={training.temperature}, alpha={training.alpha})"
        )
        echo(choice)
        step("train students")

        # 3. export and check against torch
        cand_dir = work / "candidates"
        teacher_path = export_onnx(teacher, data.x_test, work / f"{CLOUD_FP32}.onnx",
                                   input_name=spec.input_name, output_name=spec.output_name)
        verify_export(teacher, teacher_path, data.x_test[:64])
        edge_path = export_onnx(student, data.x_test, work / f"{EDGE_FP32}.onnx",
                                input_name=spec.input_name, output_name=spec.output_name)
        verify_export(student, edge_path, data.x_test[:64])
        step("export + check")

        # 4. quantize: fp16 for GPUs, the int8 search for both models
        fp16_path = work / f"{CLOUD_FP16}.onnx"
        convert_fp16(teacher_path, fp16_path)
        calib = data.x_train[: ev.calibration_samples]
        cloud_cands = make_candidates(teacher_path, CLOUD_FP32, search, spec.input_name, calib, cand_dir)
        edge_cands = make_candidates(edge_path, EDGE_FP32, search, spec.input_name, calib, cand_dir)
        step("quantize")

        # 5. measure every variant the same way, in one interleaved run
        base_rows = [
            Candidate(CLOUD_FP32, None, teacher_path, parent="", precision="fp32", accepted=True, reason="fp32 parent"),
            Candidate(CLOUD_FP16, None, fp16_path, parent=CLOUD_FP32, precision="fp16", accepted=True,
                      reason="GPU variant; its latency here is on CPUExecutionProvider (no GPU on the build machine)"),
            Candidate(EDGE_FP32, None, edge_path, parent="", precision="fp32", accepted=True, reason="fp32 parent"),
        ]
        rows = base_rows + [c for c in cloud_cands + edge_cands if not c.reason]
        paths = {c.name: c.path for c in rows}
        echo(f"measuring {len(paths)} variants ({ev.latency_runs} runs at batch 1, {ev.throughput_runs} at batch "
             f"{ev.throughput_batch_size}, {ev.intra_op_threads} intra-op thread(s))")
        metrics, _ = evaluate_variants(
            paths, data.x_test, data.y_test, reference=CLOUD_FP32, runs=ev.latency_runs, warmup=ev.warmup_runs,
            throughput_batch_size=ev.throughput_batch_size, throughput_runs=ev.throughput_runs,
            intra_op_threads=ev.intra_op_threads,
        )
        for c in rows:
            c.metrics = metrics[c.name]
            c.size_bytes = c.path.stat().st_size
        step("evaluate")

        # 6. accept/reject and pick the roles
        for c in cloud_cands:
            judge(c, metrics[CLOUD_FP32], spec.budgets)
        for c in edge_cands:
            judge(c, metrics[EDGE_FP32], spec.budgets)
        all_rows = [base_rows[0], base_rows[1], *cloud_cands, base_rows[2], *edge_cands]
        cloud = best(cloud_cands) or base_rows[0]
        edge = best(edge_cands) or base_rows[2]
        cloud.role, edge.role = "cloud", "edge"
        base_rows[1].role = "cloud-gpu"
        if cloud is not base_rows[0]:
            base_rows[0].role = "reference"
        edge_checks = _edge_checks(edge, cloud, spec)
        failed = [f"{what} {value:.3f} < required {need:.3f}" for what, value, need, ok in edge_checks if not ok]
        if failed:
            raise BudgetError(
                f"no edge variant meets the budgets against the cloud variant {cloud.name}: " + "; ".join(failed)
                + " (edge candidates: " + ", ".join(f"{c.name}: {c.reason}" for c in [base_rows[2], *edge_cands]) + ")"
            )

        # 7. calibration (validation split), samples, manifest, signature
        cal = calibrate(
            run_batched(make_session(edge.path), data.x_val), run_batched(make_session(cloud.path), data.x_val),
            data.y_val, edge_variant=edge.name, cloud_variant=cloud.name,
        )
        # The fp32 teacher is either the cloud variant itself or its reference: never listed twice.
        shipped = list({id(c): c for c in [cloud, base_rows[0], base_rows[1], edge] if c.role}.values())
        for c in shipped:
            if c.path.parent != work:
                c.path = c.path.replace(work / c.path.name)
        sample_x = data.x_test[: ev.n_samples]
        write_samples(
            work / SAMPLES_NAME, {spec.input_name: sample_x},
            {c.name: {spec.output_name: make_session(c.path).run(None, {spec.input_name: sample_x})[0]} for c in shipped},
        )
        shutil.rmtree(cand_dir, ignore_errors=True)
        manifest = _manifest(spec, version, data, n_classes, teacher_path, shipped, cal, ev.n_samples,
                             quick=quick, seed=seed, training=training.model_dump(), choice=choice,
                             candidates=[summary(c) for c in cloud_cands + edge_cands])
        try:
            manifest = seal_bundle(work, manifest, private_key)
        except ManifestError as e:
            raise BuildError(f"the bundle manifest is invalid: {e.message}") from None
        try:
            os.replace(work, final)
        except OSError as e:
            raise BuildError(f"cannot move the finished bundle to {final} (another build of this version?): {e}") from None
        step("calibrate + seal")

        md, png = model_dir / f"{version}.report.md", model_dir / f"{version}.report.png"
        report.write(
            md, png, manifest=manifest, rows=all_rows, histories=histories,
            test_accuracy=student_test, choice=choice, edge_checks=edge_checks, steps=steps,
            total_seconds=time.perf_counter() - started, calibration=cal,
        )
        return BuildResult(final, manifest, md, png, all_rows,
                           time.perf_counter() - started, steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _edge_checks(edge: Candidate, cloud: Candidate, spec: BuildSpec) -> list[tuple[str, float, float, bool]]:
    """(what, measured, required, ok) for the edge variant against the cloud variant."""
    e, c, b = edge.metrics, cloud.metrics, spec.budgets
    assert e is not None and c is not None
    rel_acc = (e.accuracy or 0.0) / (c.accuracy or 1.0)
    speedup = c.latency_p50_ms / e.latency_p50_ms
    size_ratio = cloud.size_bytes / edge.size_bytes
    return [
        ("edge/cloud accuracy", rel_acc, b.edge_min_relative_accuracy, rel_acc >= b.edge_min_relative_accuracy),
        ("edge speedup (p50)", speedup, b.edge_min_speedup, speedup >= b.edge_min_speedup),
        ("edge size ratio", size_ratio, b.edge_min_size_ratio, size_ratio >= b.edge_min_size_ratio),
    ]


def _io_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The exported graph's real signature (symbolic dims as their names)."""
    sess = make_session(path)
    dtype = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(int64)": "INT64", "tensor(int32)": "INT32"}

    def spec_of(arg: Any) -> TensorSpec:
        if arg.type not in dtype:
            raise BuildError(f"{path.name}: {arg.name} has type {arg.type}, which Tandem does not serve")
        return TensorSpec(name=arg.name, datatype=dtype[arg.type],
                          shape=[d if isinstance(d, int) else str(d or "batch") for d in arg.shape])

    return [spec_of(a) for a in sess.get_inputs()], [spec_of(a) for a in sess.get_outputs()]


def _manifest(
    spec: BuildSpec, version: str, data: Dataset, n_classes: int, teacher_path: Path, shipped: list[Candidate],
    cal: Any, n_samples: int, *, quick: bool, seed: int, training: dict[str, Any], choice: str,
    candidates: list[dict[str, Any]],
) -> Manifest:
    inputs, outputs = _io_specs(teacher_path)
    variants = []
    for c in shipped:
        notes = c.reason
        if c.config is not None:
            notes = f"{c.config.model_dump_json()}; {c.reason}" + (f"; {'; '.join(c.notes)}" if c.notes else "")
        variants.append(Variant(
            name=c.name, role=c.role or "candidate", file=c.path.name, sha256="", size_bytes=0,
            precision=c.precision,  # type: ignore[arg-type]
            providers=["CUDAExecutionProvider", "CPUExecutionProvider"] if c.precision == "fp16" else ["CPUExecutionProvider"],
            parent=c.parent or None, metrics=c.metrics, notes=notes,
        ))
    return Manifest(
        name=spec.name,
        version=version,
        description=spec.description,
        task=Task(kind="classification", labels=data.labels[:n_classes], output=spec.output_name, output_is_logits=True),
        inputs=inputs,
        outputs=outputs,
        variants=variants,
        calibration=cal,
        samples=Samples(file=SAMPLES_NAME, sha256="", size_bytes=0, count=n_samples, atol=SAMPLES_ATOL),
        provenance=Provenance(
            source=spec.source,
            build_config={**spec.config_dict(), "quick": quick, "seed": seed, "effective_training": training,
                          "student_choice": choice, "candidates": candidates},
            tool_versions=tool_versions(),
            hardware=hardware_info(),
        ),
    )


__all__ = ["BuildResult", "build", "next_version"]
