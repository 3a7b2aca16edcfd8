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
from tandem.shared.profile import ReferenceProfile

from . import report
from .calibration import calibrate, calibrate_task
from .distill import TrainResult, bf16_supported, fit, predict, predict_hidden, predict_logits, train, truncate
from .errors import BudgetError, BuildError, SpecError
from .evaluate import Padding, evaluate_variants, hardware_info, make_session, n_rows, run_batched, tool_versions
from .export import export_onnx, verify_export
from .profile import reference_profile
from .quality import measure, verdict_name
from .quantize import Candidate, best, convert_fp16, judge, make_candidates, quality, summary
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
    data = load_dataset(spec, seed, quick) if spec.load_data is not None else generated_dataset(spec, seed)

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
        np.random.seed(seed)
        echo(f"building {spec.name}:{version} from {spec.source} ({'quick' if quick else 'full'}, seed {seed}); "
             f"data: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test"
             + (f" + {len(next(iter(data.unlabelled.values())))} unlabelled" if data.unlabelled else ""))
        models = _make_models(spec, data, work, training, quick=quick, seed=seed, progress=progress, echo=echo, step=step)
        teacher_path, edge_path = models.teacher_path, models.edge_path
        return _finish(spec, data, work, final, model_dir, version, teacher_path, edge_path, models, search, ev,
                       private_key, quick=quick, seed=seed, training=training, steps=steps, step=step, started=started, echo=echo)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class _Models:
    teacher_path: Path
    edge_path: Path | None
    histories: dict[str, Any]
    test_scores: dict[str, float]
    choice: str


def _names(data: Dataset) -> list[str]:
    return [d.name for d in data.inputs]


def _make_models(
    spec: BuildSpec, data: Dataset, work: Path, training: Any, *, quick: bool, seed: int, progress: bool,
    echo: Callable[[str], None], step: Callable[[str], None],
) -> _Models:
    """The fp32 teacher and edge graphs in ``work``: exported from torch (checked by onnxruntime at
    two sizes of every dynamic axis before any training), or the user's own ONNX files."""
    teacher_path = work / f"{CLOUD_FP32}.onnx"
    edge_target = work / f"{EDGE_FP32}.onnx"
    if spec.onnx_teacher is not None:
        shutil.copyfile(spec.onnx_teacher, teacher_path)
        check_onnx(teacher_path, data, "teacher")
        edge_path: Path | None = None
        if spec.edge.kind == "onnx":
            assert spec.edge.path is not None
            src = Path(spec.edge.path)
            if not src.is_absolute():
                src = Path(spec.source).parent / src
            if not src.is_file():
                raise SpecError(f"edge.path {src} does not exist")
            shutil.copyfile(src, edge_target)
            check_onnx(edge_target, data, "edge model")
            edge_path = edge_target
        step("check ONNX models")
        return _Models(teacher_path, edge_path, {}, {}, "the edge variant is " + (
            "the user's edge model" if edge_path else "the teacher at lower precision"))
    if not spec.typed:
        return _legacy_models(spec, data, work, training, seed=seed, progress=progress, echo=echo, step=step)

    import torch

    torch.manual_seed(seed)
    names, outputs = _names(data), spec.output_names()
    out_index = outputs.index(spec.task_output())
    pad = Padding(data.inputs)
    example = data.test.x

    def export(model: Any, path: Path) -> Path:
        export_onnx(model, example, path, inputs=data.inputs, output_names=outputs)
        verify_export(model, path, {k: v[:64] for k, v in example.items()}, decls=data.inputs,
                      rtol=spec.evaluation.export_rtol, atol=spec.evaluation.export_atol)
        return path

    teacher = _call_factory(spec.teacher, "teacher", spec.source)  # type: ignore[arg-type]
    export(teacher, teacher_path)
    student = None
    late_student = spec.edge.kind == "student" and bool(_factory_wants(spec.student))
    if spec.edge.kind == "student" and not late_student:
        student = _call_factory(spec.student, "student", spec.source)  # type: ignore[arg-type]
    elif spec.edge.kind == "truncate":
        try:
            student = truncate(teacher, spec.edge.layers)
        except ValueError as e:
            raise SpecError(str(e)) from None
    if student is not None:
        export(student, edge_target)  # untrained: only proves it exports before minutes of training
    step("export check")

    task = spec.task
    histories: dict[str, Any] = {}
    val_labels = data.val.y if task.kind == "classification" else None

    def scorer(ref: np.ndarray | None, labels: np.ndarray | None) -> Callable[[Any], float]:
        def score(model: Any) -> float:
            out = predict(model, data.val.x, names, output_index=out_index, padding=pad)
            return measure(task, out, ref, labels).value
        return score

    if spec.should_train_teacher():
        if data.train.y is None:
            raise SpecError("train_teacher needs labels in the train split")
        loss = "ce" if task.kind == "classification" else "mse"
        if loss == "mse" and task.kind != "regression":
            raise SpecError(f"train_teacher: a {task.kind} teacher cannot be trained from labels; give a trained one")
        histories["teacher"] = fit(
            teacher, data.train.x, names, loss=loss, targets=None if loss == "ce" else data.train.y, labels=data.train.y if loss == "ce" else None,
            val_score=scorer(None if loss == "ce" else data.val.y, val_labels),  # type: ignore[arg-type]
            epochs=training.teacher_epochs, lr=training.teacher_lr, batch_size=training.batch_size,
            weight_decay=training.weight_decay, seed=seed, padding=pad, output_index=out_index,
            threads=training.threads, desc="teacher", progress=progress)
        export(teacher, teacher_path)
    step("teacher")

    test_scores: dict[str, float] = {}
    choice = "the edge variant is the teacher at lower precision"
    edge_path = None
    train_x = data.train.x
    if data.unlabelled:
        train_x = {k: _concat_padded(v, data.unlabelled[k], data.pads().get(k)) for k, v in train_x.items()}
    hidden: list[np.ndarray] | None = None
    targets: np.ndarray | None = None
    precision = training.precision
    if precision == "bf16" and not bf16_supported():
        echo("training.precision bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX); training in fp32")
        precision = "fp32"
    wants = _factory_wants(spec.student) if late_student else set()
    if (training.hidden_weight > 0 or "teacher_hidden" in wants) and hasattr(teacher, "hidden_states"):
        hidden, targets = predict_hidden(teacher, train_x, names, padding=pad, output_index=out_index,
                                         precision=precision)
    if late_student:
        # The factory builds the student from the trained teacher (and its states on the training
        # inputs); its export is checked now, still before the student's training.
        offered = {"teacher": teacher, "inputs": train_x, "teacher_hidden": hidden}
        student = _call_factory(lambda: spec.student(**{k: offered[k] for k in wants}), "student", spec.source)  # type: ignore[misc]
        export(student, edge_target)
    if student is not None:
        if targets is None:
            targets = predict(teacher, train_x, names, output_index=out_index, padding=pad, precision=precision)
        val_ref = predict(teacher, data.val.x, names, output_index=out_index, padding=pad)
        labels = data.train.y if task.kind == "classification" and not data.unlabelled else None
        loss = {"classification": "kd", "embedding": "cosine"}.get(task.kind, "mse")
        histories[f"edge ({spec.edge.kind}, distilled)"] = fit(
            student, train_x, names, loss=loss, targets=targets, labels=labels,
            val_score=scorer(val_ref, val_labels), epochs=training.student_epochs, lr=training.student_lr,
            batch_size=training.batch_size, weight_decay=training.weight_decay, seed=seed,
            temperature=training.temperature, alpha=training.alpha if labels is not None else 1.0, padding=pad,
            output_index=out_index, threads=training.threads, desc="edge", progress=progress,
            hidden=hidden if training.hidden_weight > 0 and hasattr(student, "hidden_states") else None,
            hidden_weight=training.hidden_weight, relation_weight=training.relation_weight,
            relation_temperature=training.relation_temperature, precision=precision)
        test_ref = predict(teacher, data.test.x, names, output_index=out_index, padding=pad)
        test_labels = data.test.y if task.kind == "classification" else None
        for what, model in (("teacher (torch)", teacher), (f"edge {spec.edge.kind} (torch)", student)):
            test_scores[what] = measure(task, predict(model, data.test.x, names, output_index=out_index, padding=pad),
                                        test_ref, test_labels).value
        edge_path = export(student, edge_target)
        choice = (f"the edge variant is a {'distilled student' if spec.edge.kind == 'student' else f'copy of the teacher cut to its first {spec.edge.layers} blocks, distilled'}"
                  f" (loss: {loss}); test {task.quality_name()} {test_scores[f'edge {spec.edge.kind} (torch)']:.4f}")
        echo(choice)
        step("train edge model")
    return _Models(teacher_path, edge_path, histories, test_scores, choice)


_FACTORY_ARGS = ("teacher", "inputs", "teacher_hidden")


def _factory_wants(factory: Any) -> set[str]:
    """Which of the build's offerings a student factory takes by name: ``teacher`` (the trained
    teacher module), ``inputs`` (the training inputs) and ``teacher_hidden`` (the teacher's
    ``hidden_states`` per training row, when it has that method)."""
    import inspect

    if factory is None:
        return set()
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return set()
    return {n for n in _FACTORY_ARGS if n in params}


def _concat_padded(a: np.ndarray, b: np.ndarray, pad: float | None) -> np.ndarray:
    """Rows of ``a`` then ``b``, padded to a common length along the other axes with ``pad``."""
    if a.shape[1:] == b.shape[1:]:
        return np.concatenate([a, b])
    if pad is None:
        raise SpecError("unlabelled inputs have a different shape from the train split and no pad value")
    shape = np.maximum(a.shape[1:], b.shape[1:])
    fit_ = [np.pad(m, [(0, 0)] + [(0, int(w - s)) for w, s in zip(shape, m.shape[1:])], constant_values=pad) for m in (a, b)]
    return np.concatenate(fit_)


def _legacy_models(
    spec: BuildSpec, data: Dataset, work: Path, training: Any, *, seed: int, progress: bool,
    echo: Callable[[str], None], step: Callable[[str], None],
) -> _Models:
    """A spec without declared inputs: one float32 input, a classifier teacher trained on the labels
    (unless told otherwise), and two students, distilled and not, the better one on validation shipped."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(training.threads)
    name = spec.input_name
    x_train, y_train = data.train.x[name], data.train.y
    x_val, y_val = data.val.x[name], data.val.y
    x_test, y_test = data.test.x[name], data.test.y
    assert y_train is not None and y_val is not None and y_test is not None
    teacher = _call_factory(spec.teacher, "teacher", spec.source)  # type: ignore[arg-type]
    student_factory = spec.student
    assert student_factory is not None
    # Export the untrained models first: a graph onnxruntime cannot run is reported before training.
    for what, model in (("teacher", teacher), ("student", _call_factory(student_factory, "student", spec.source))):
        probe = export_onnx(model, x_test, work / f"probe-{what}.onnx", input_name=name, output_name=spec.output_name)
        verify_export(model, probe, x_test[:64])
        probe.unlink()
    histories: dict[str, TrainResult] = {}
    if spec.should_train_teacher() and training.teacher_epochs > 0:
        histories["teacher"] = train(
            teacher, x_train, y_train, x_val, y_val, epochs=training.teacher_epochs,
            lr=training.teacher_lr, batch_size=training.batch_size, weight_decay=training.weight_decay,
            seed=seed, augment=spec.augment, threads=training.threads, desc="teacher", progress=progress,
        )
    step("train teacher")

    # The same student without distillation is the honest baseline.
    common = dict(epochs=training.student_epochs, lr=training.student_lr, batch_size=training.batch_size,
                  weight_decay=training.weight_decay, seed=seed, augment=spec.augment, progress=progress)
    histories["student (baseline, no distillation)"] = base = train(
        _call_factory(student_factory, "student", spec.source), x_train, y_train, x_val, y_val,
        desc="student baseline", **common,  # type: ignore[arg-type]
    )
    histories["student (distilled)"] = dist = train(
        _call_factory(student_factory, "student", spec.source), x_train, y_train, x_val, y_val,
        teacher=teacher, temperature=training.temperature, alpha=training.alpha,
        desc="student distilled", **common,  # type: ignore[arg-type]
    )
    # Chosen on validation, never on test, so the test numbers in the report stay honest.
    distilled_wins = dist.best_val_accuracy >= base.best_val_accuracy
    student = dist.model if distilled_wins else base.model
    test_scores = {
        "teacher (torch)": float((predict_logits(teacher, x_test).argmax(1) == y_test).mean()),
        "student baseline (torch)": float((predict_logits(base.model, x_test).argmax(1) == y_test).mean()),
        "student distilled (torch)": float((predict_logits(dist.model, x_test).argmax(1) == y_test).mean()),
    }
    choice = (
        f"shipped the {'distilled' if distilled_wins else 'baseline (no distillation)'} student: "
        f"validation accuracy distilled {dist.best_val_accuracy:.4f} vs baseline {base.best_val_accuracy:.4f} "
        f"(T={training.temperature}, alpha={training.alpha})"
    )
    echo(choice)
    step("train students")
    teacher_path = export_onnx(teacher, x_test, work / f"{CLOUD_FP32}.onnx", input_name=name, output_name=spec.output_name)
    verify_export(teacher, teacher_path, x_test[:64])
    edge_path = export_onnx(student, x_test, work / f"{EDGE_FP32}.onnx", input_name=name, output_name=spec.output_name)
    verify_export(student, edge_path, x_test[:64])
    step("export + check")
    return _Models(teacher_path, edge_path, histories, test_scores, choice)


def check_onnx(path: Path, data: Dataset, what: str) -> None:
    """A user's ONNX file: onnxruntime loads it, its inputs are the declared ones, and it runs on a
    few rows at two sizes of every padded axis."""
    from .export import check_cases

    try:
        sess = make_session(path)
    except Exception as e:
        raise BuildError(f"the {what} {path.name}: ONNX Runtime cannot load it: {_first_line(e)}") from None
    graph_inputs = [i.name for i in sess.get_inputs()]
    if sorted(graph_inputs) != sorted(_names(data)):
        raise BuildError(f"the {what} {path.name} takes inputs {graph_inputs}; the spec declares {_names(data)}")
    for desc, feeds in check_cases(data.test.x, data.inputs):
        try:
            sess.run(None, feeds)
        except Exception as e:
            raise BuildError(f"the {what} {path.name} cannot run at {desc}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def _finish(
    spec: BuildSpec, data: Dataset, work: Path, final: Path, model_dir: Path, version: str, teacher_path: Path,
    edge_path: Path | None, models: _Models, search: list[Any], ev: Any, private_key: Ed25519PrivateKey, *, quick: bool, seed: int, training: Any,
    steps: dict[str, float], step: Callable[[str], None], started: float, echo: Callable[[str], None],
) -> BuildResult:
    """Quantize, measure, judge, calibrate, seal: everything after the fp32 graphs exist (no torch)."""
    task = spec.task
    output = _task_output(spec, teacher_path) if spec.typed or spec.onnx_teacher else None
    metric_name = task.quality_name() if spec.typed or spec.onnx_teacher else "accuracy"
    pad = Padding(data.inputs)
    names = _names(data)
    input_name = names[0]
    cand_dir = work / "candidates"

    # Quantize: fp16 for GPUs, the int8 search for both models.
    base_rows = [Candidate(CLOUD_FP32, None, teacher_path, parent="", precision="fp32", accepted=True, reason="fp32 parent")]
    fp16_row = None
    if spec.fp16:
        fp16_path = work / f"{CLOUD_FP16}.onnx"
        fp16_row = Candidate(CLOUD_FP16, None, fp16_path, parent=CLOUD_FP32, precision="fp16")
        try:
            convert_fp16(teacher_path, fp16_path)
            make_session(fp16_path)
        except Exception as e:
            fp16_row.reason = f"fp16 conversion failed: {type(e).__name__}: {_first_line(e)}"
            echo(f"warning: {fp16_row.reason}; no GPU variant in this bundle")
        base_rows.append(fp16_row)
    calib_rows = min(len(data.train), ev.calibration_samples)
    calib = {k: v[:calib_rows] for k, v in data.train.x.items()}
    if not (spec.typed or spec.onnx_teacher):
        calib = calib[input_name]  # type: ignore[assignment]
    cloud_cands = make_candidates(teacher_path, CLOUD_FP32, search, input_name, calib, cand_dir, padding=pad)
    edge_row = None
    edge_cands: list[Candidate] = []
    if edge_path is not None:
        edge_row = Candidate(EDGE_FP32, None, edge_path, parent="", precision="fp32", accepted=True, reason="fp32 parent")
        base_rows.append(edge_row)
        edge_cands = make_candidates(edge_path, EDGE_FP32, search, input_name, calib, cand_dir, padding=pad)
    step("quantize")

    # Measure every variant the same way, in one interleaved run.
    rows = [c for c in base_rows if not c.reason or c.accepted] + [c for c in cloud_cands + edge_cands if not c.reason]
    paths = {c.name: c.path for c in rows}
    echo(f"measuring {len(paths)} variants ({ev.latency_runs} runs at batch 1, {ev.throughput_runs} at batch "
         f"{ev.throughput_batch_size}, {ev.intra_op_threads} intra-op thread(s))")
    test_x = data.test.x if (spec.typed or spec.onnx_teacher) else data.test.x[input_name]
    test_y = data.test.y if task.kind == "classification" else None
    metrics, test_out = evaluate_variants(
        paths, test_x, test_y, reference=CLOUD_FP32, task=task, output=output, padding=pad, runs=ev.latency_runs,
        warmup=ev.warmup_runs, throughput_batch_size=ev.throughput_batch_size, throughput_runs=ev.throughput_runs,
        intra_op_threads=ev.intra_op_threads,
    )
    for c in rows:
        c.metrics = metrics[c.name]
        c.size_bytes = c.path.stat().st_size
    step("evaluate")

    # Accept/reject and pick the roles.
    budgets = spec.effective_budgets(quick)
    if fp16_row is not None and fp16_row.metrics is not None:
        judge(fp16_row, metrics[CLOUD_FP32], budgets, metric_name, gpu=True)
    for c in cloud_cands:
        judge(c, metrics[CLOUD_FP32], budgets, metric_name)
    for c in edge_cands:
        judge(c, metrics[EDGE_FP32], budgets, metric_name)
    all_rows = [*base_rows[: 2 if fp16_row else 1], *cloud_cands] + ([edge_row, *edge_cands] if edge_row else [])
    if edge_row is None:
        # The edge is the teacher at lower precision: the cloud keeps the fp32 teacher and the edge
        # gets the best int8 variant of it.
        cloud = base_rows[0]
        edge = best(cloud_cands, quality_tie=budgets.quality_tie)
        if edge is None:
            raise BudgetError("no int8 variant of the teacher meets the budgets for the edge: "
                              + "; ".join(f"{c.name}: {c.reason}" for c in cloud_cands))
    else:
        cloud = best(cloud_cands, quality_tie=budgets.quality_tie) or base_rows[0]
        edge = best(edge_cands, quality_tie=budgets.quality_tie) or edge_row
    cloud.role, edge.role = "cloud", "edge"
    if fp16_row is not None and fp16_row.accepted and fp16_row.metrics is not None:
        fp16_row.role = "cloud-gpu"
    if cloud is not base_rows[0]:
        base_rows[0].role = "reference"
    edge_checks = _edge_checks(edge, cloud, budgets)
    failed = [f"{what} {value:.3f} < required {need:.3f}" for what, value, need, ok in edge_checks if not ok]
    if failed:
        pool = [edge_row, *edge_cands] if edge_row else cloud_cands
        raise BudgetError(
            f"no edge variant meets the budgets against the cloud variant {cloud.name}: " + "; ".join(failed)
            + " (edge candidates: " + ", ".join(f"{c.name}: {c.reason}" for c in pool if c is not None) + ")"
        )

    # Calibration on the validation split, against the fp32 teacher, by the task's per-row verdict.
    val_x = data.val.x if (spec.typed or spec.onnx_teacher) else data.val.x[input_name]
    edge_sess, cloud_sess = make_session(edge.path), make_session(cloud.path)
    if spec.typed or spec.onnx_teacher:
        ref_val = run_batched(make_session(teacher_path), val_x, output=output, padding=pad)
        edge_val = run_batched(edge_sess, val_x, output=output, padding=pad)
        cloud_val = run_batched(cloud_sess, val_x, output=output, padding=pad)
        val_y = data.val.y if task.kind == "classification" else None
        edge_q, cloud_q = measure(task, edge_val, ref_val, val_y), measure(task, cloud_val, ref_val, val_y)
        cal = calibrate_task(edge_val, edge_q.ok, cloud_q.ok, edge_variant=edge.name, cloud_variant=cloud.name,
                             metric=verdict_name(task, val_y is not None), kind=task.kind, output=output or "",
                             confidence=spec.confidence, seed=seed)
        edge_ok, cloud_ok = edge_q.ok, cloud_q.ok
    else:
        assert data.val.y is not None
        edge_val, cloud_val, val_y, edge_ok, cloud_ok = run_batched(edge_sess, val_x), run_batched(cloud_sess, val_x), data.val.y, None, None
        cal = calibrate(edge_val, cloud_val, val_y, edge_variant=edge.name, cloud_variant=cloud.name)
    profile = _reference_profile(spec, data, val_x, input_name, output, edge_val, cloud_val, val_y, edge_ok, cloud_ok, echo)
    # The fp32 teacher is either the cloud variant itself or its reference: never listed twice.
    shipped = list({id(c): c for c in [cloud, base_rows[0], *([fp16_row] if fp16_row else []), edge] if c.role}.values())
    for c in shipped:
        if c.path.parent != work:
            c.path = c.path.replace(work / c.path.name)
    sample_x = _samples(data, ev.n_samples, pad)
    write_samples(work / SAMPLES_NAME, sample_x, {c.name: _outputs(c.path, sample_x) for c in shipped})
    shutil.rmtree(cand_dir, ignore_errors=True)
    manifest = _manifest(spec, version, data, teacher_path, shipped, cal, n_rows(sample_x),
                         quick=quick, seed=seed, training=training.model_dump(), choice=models.choice,
                         candidates=[summary(c) for c in cloud_cands + edge_cands], profile=profile)
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
        md, png, manifest=manifest, rows=[r for r in all_rows if r is not None], histories=models.histories,
        test_accuracy=models.test_scores, choice=models.choice, edge_checks=edge_checks, steps=steps,
        total_seconds=time.perf_counter() - started, calibration=cal,
    )
    return BuildResult(final, manifest, md, png, [r for r in all_rows if r is not None], time.perf_counter() - started, steps)


def _reference_profile(
    spec: BuildSpec, data: Dataset, val_x: Any, input_name: str, output: str | None, edge_val: np.ndarray,
    cloud_val: np.ndarray, val_y: np.ndarray | None, edge_ok: Any, cloud_ok: Any, echo: Callable[[str], None],
) -> ReferenceProfile | None:
    """The validation split's reference profile for the manifest; a bundle without one still
    serves (its tiers then monitor nothing), so a failure here is a warning, not a failed build."""
    try:
        return reference_profile(
            val_x if isinstance(val_x, dict) else {input_name: val_x},
            {"cloud": {output or spec.output_name: cloud_val}, "edge": {output or spec.output_name: edge_val}},
            task_kind=spec.task.kind, output_is_logits=spec.task.output_is_logits, labels=val_y,
            edge_ok=edge_ok, cloud_ok=cloud_ok, decls=data.inputs,
        )
    except Exception as e:  # noqa: BLE001 - monitoring is optional; the bundle is not
        echo(f"warning: no reference profile in this bundle: {type(e).__name__}: {_first_line(e)}")
        return None


def _task_output(spec: BuildSpec, teacher_path: Path) -> str:
    """The output the task reads: declared, else (for a user's ONNX file) the graph's first."""
    if spec.task.output or spec.outputs is not None or spec.onnx_teacher is None:
        return spec.task_output()
    names = [o.name for o in make_session(teacher_path).get_outputs()]
    return names[0]


def _samples(data: Dataset, n: int, pad: Padding) -> dict[str, np.ndarray]:
    """The first test rows, cut to their longest real row so a device replays real lengths."""
    x = {k: v[:n] for k, v in data.test.x.items()}
    return pad.trim(x) if pad else x


def _outputs(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = make_session(path)
    return dict(zip((o.name for o in sess.get_outputs()), sess.run(None, feeds)))


def generated_dataset(spec: BuildSpec, seed: int, rows: int = 256) -> Dataset:
    """Inputs made up from an ONNX teacher's signature, for a user who brings a model and no data:
    floats from a standard normal, integers in [0, 100) (ones for inputs named like masks),
    booleans true; dynamic non-batch axes at 16."""
    from .spec import Split, graph_inputs

    assert spec.onnx_teacher is not None
    declared = {d.name: d for d in spec.inputs or []}
    decls = [declared.get(d.name, d) for d in graph_inputs(spec.onnx_teacher)]
    rng = np.random.default_rng(seed)

    def make(n: int) -> dict[str, np.ndarray]:
        out = {}
        for d in decls:
            dims = [n] + [s if isinstance(s, int) else 16 for s in (d.shape or ["batch"])[1:]]
            if d.dtype in ("float32", "float16"):
                out[d.name] = rng.standard_normal(dims).astype(d.dtype)
            elif d.dtype == "bool":
                out[d.name] = np.ones(dims, dtype=bool)
            elif "mask" in d.name.lower():
                out[d.name] = np.ones(dims, dtype=d.dtype)
            else:
                out[d.name] = rng.integers(0 if d.pad is None else 1, 100, size=dims).astype(d.dtype)
        return out

    return Dataset(Split(make(rows), None), Split(make(rows), None), Split(make(rows), None), None, None, decls)


def _edge_checks(edge: Candidate, cloud: Candidate, b: Any) -> list[tuple[str, float, float, bool]]:
    """(what, measured, required, ok) for the edge variant against the cloud variant."""
    e, c = edge.metrics, cloud.metrics
    assert e is not None and c is not None
    rel_acc = (quality(e) or 0.0) / (quality(c) or 1.0)
    speedup = c.latency_p50_ms / e.latency_p50_ms
    size_ratio = cloud.size_bytes / edge.size_bytes
    return [
        ("edge/cloud quality", rel_acc, b.edge_min_relative_accuracy, rel_acc >= b.edge_min_relative_accuracy),
        ("edge speedup (p50)", speedup, b.edge_min_speedup, speedup >= b.edge_min_speedup),
        ("edge size ratio", size_ratio, b.edge_min_size_ratio, size_ratio >= b.edge_min_size_ratio),
    ]


def _io_specs(path: Path, decls: list[Any]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The exported graph's real signature (symbolic dims as their names), with the declared pads."""
    sess = make_session(path)
    dtype = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(int64)": "INT64", "tensor(int32)": "INT32",
             "tensor(bool)": "BOOL"}
    pads = {d.name: d.pad for d in decls}
    declared_shape = {d.name: d.shape for d in decls}

    def spec_of(arg: Any, is_input: bool) -> TensorSpec:
        if arg.type not in dtype:
            raise BuildError(f"{path.name}: {arg.name} has type {arg.type}, which Tandem does not serve")
        shape = [d if isinstance(d, int) else str(d or "batch") for d in arg.shape]
        want = declared_shape.get(arg.name) if is_input else None
        if want and len(want) == len(shape):
            # The graph may name an axis after torch's symbol; the declared name is the contract.
            shape = [w if isinstance(w, str) and not isinstance(g, int) else g for g, w in zip(shape, want)]
        return TensorSpec(name=arg.name, datatype=dtype[arg.type], shape=shape, pad=pads.get(arg.name) if is_input else None)

    return [spec_of(a, True) for a in sess.get_inputs()], [spec_of(a, False) for a in sess.get_outputs()]


def _manifest(
    spec: BuildSpec, version: str, data: Dataset, teacher_path: Path, shipped: list[Candidate],
    cal: Any, n_samples: int, *, quick: bool, seed: int, training: dict[str, Any], choice: str,
    candidates: list[dict[str, Any]], profile: ReferenceProfile | None = None,
) -> Manifest:
    inputs, outputs = _io_specs(teacher_path, data.inputs)
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
    generic = spec.typed or spec.onnx_teacher is not None
    task = spec.task
    return Manifest(
        name=spec.name,
        version=version,
        description=spec.description,
        task=Task(kind=task.kind, labels=data.labels, output=_task_output(spec, teacher_path) if generic else spec.output_name,
                  output_is_logits=task.output_is_logits, metric=task.quality_name() if generic else "accuracy",
                  tolerance=task.effective_tolerance() if task.kind != "classification" else None),
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
        profile=profile,
    )


__all__ = ["BuildResult", "build", "next_version"]
