"""The edge runtime: one ONNX Runtime session over a bundle's edge variant.

It picks the best execution provider the device really has (CPU always last), keeps intra-op
threads low so that it never oversubscribes a small device, warms the session up, and records every
run's latency into the router's per-batch-size profile. ``providers`` reports what onnxruntime
actually uses (``session.get_providers()``), never what was asked for.

It also scores its own answers for the cascade (:meth:`EdgeRuntime.confidence`): max-softmax or
margin over a classifier's scores, the bundle's confidence head, or a function the application
passes (:data:`ConfidenceFn`), which wins over the bundle's for any task.
"""

from __future__ import annotations

import heapq
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tandem.shared.bundle import Bundle
from tandem.shared.errors import InferenceFailed, InvalidInput, NoConfidence, TandemError
from tandem.shared.tensors import DATATYPE_TO_DTYPE

from .estimates import Estimates, confidence_source, no_confidence_message

__all__ = ["ConfidenceFn", "EdgeRuntime", "run_error", "select_providers"]

_log = logging.getLogger(__name__)
_perf = time.perf_counter

#: Accelerators first, in the order they are usually worth it; CPU is always appended.
PREFERRED_PROVIDERS = (
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "CoreMLExecutionProvider",
    "NNAPIExecutionProvider",
    "QNNExecutionProvider",
    "DmlExecutionProvider",
    "XnnpackExecutionProvider",
    "CPUExecutionProvider",
)


#: An application's confidence function: the edge outputs by name (numpy arrays, batch first) →
#: a confidence per row (array or sequence) or one for the whole call; higher means the edge answer
#: is more likely good enough. The call's confidence is the lowest row's; NaN counts as unsure.
ConfidenceFn = Callable[[dict[str, np.ndarray]], "float | np.ndarray | Sequence[float]"]


def select_providers(available: Sequence[str], requested: Sequence[str] | None = None) -> list[str]:
    """The providers to ask for: ``requested`` (or the preferred order) ∩ ``available``, CPU last."""
    wanted = list(requested) if requested else list(PREFERRED_PROVIDERS)
    missing = [p for p in wanted if p not in available and p != "CPUExecutionProvider"]
    if requested and missing:
        _log.warning("execution provider(s) %s not available here (have %s)", missing, list(available))
    chosen = [p for p in wanted if p in available and p != "CPUExecutionProvider"]
    return chosen + ["CPUExecutionProvider"]


class EdgeRuntime:
    """An inference session over ``bundle``'s ``variant`` (default: the ``edge`` role).

    ``confidence``: the application's :data:`ConfidenceFn`, used instead of the bundle's confidence
    (needed for a bundle whose confidence is ``custom``, or a non-classifier without a head).
    """

    def __init__(
        self,
        bundle: Bundle,
        variant: str = "edge",
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 1,
        warmup_runs: int = 3,
        estimates: Estimates | None = None,
        confidence: ConfidenceFn | None = None,
    ) -> None:
        import onnxruntime as ort

        if confidence is not None and not callable(confidence):
            raise InvalidInput(
                f"confidence must be a function of the edge outputs (dict name -> array), got {type(confidence).__name__}"
            )

        self.bundle = bundle
        self.variant = bundle.variant(variant)
        path = bundle.variant_path(variant)
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, int(intra_op_threads))
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        chosen = select_providers(ort.get_available_providers(), providers)
        try:
            self.session = ort.InferenceSession(str(path), so, providers=chosen)
        except Exception as e:  # an accelerator that is listed but cannot initialise: CPU still works
            if chosen == ["CPUExecutionProvider"]:
                raise InferenceFailed(f"cannot load edge variant {path.name}: {e}") from None
            _log.warning("providers %s failed (%s); falling back to CPU", chosen, e)
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        #: The providers onnxruntime really uses, best first.
        self.providers: list[str] = self.session.get_providers()
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        self.input_names: list[str] = [i.name for i in ins]
        self.output_names: list[str] = [o.name for o in outs]
        self._first_input = self.input_names[0]
        #: The dtype object a single-input model's array must be (identity-tested) to take the fast
        #: path; None for multi-input models. Any other array takes the checked path (same errors).
        self.fast_dtype: np.dtype | None = np.dtype(_numpy_dtype(ins[0].type)) if len(ins) == 1 else None
        self._input_dtypes = {i.name: _numpy_dtype(i.type) for i in ins}
        self._input_shapes = {i.name: i.shape for i in ins}
        self.estimates = estimates if estimates is not None else Estimates(bundle)
        # The public InferenceSession.run re-validates the feed names on every call (~1 µs, a fifth
        # of a small edge model's run time); feeds() (or the client's fast path) has already checked
        # them, so call the bound C++ session directly when this onnxruntime has one, and the public
        # method otherwise (a private attribute may go away in any release).
        inner = getattr(self.session, "_sess", None)
        #: The fastest way to run the session: ``session_run(output_names, feeds, run_options)``.
        self.session_run: Callable[..., list[np.ndarray]] = (
            inner.run if inner is not None and callable(getattr(inner, "run", None)) else self.session.run
        )
        self._run = self.session_run
        self._windows = self.estimates.edge
        task = bundle.manifest.task
        self._score_index = self.output_names.index(task.output) if task.output in self.output_names else 0
        self._scores_are_logits = task.output_is_logits
        kind, why = confidence_source(bundle.manifest, self.output_names, confidence is not None)
        self.estimates.use_confidence(kind, why)
        self._app_confidence = confidence
        cal = bundle.manifest.calibration
        self._head = cal.head if kind == "head" and cal is not None else None
        self._head_index = self.output_names.index(self._head.output) if self._head is not None else 0
        #: The function :meth:`confidence` is (the client's fast path calls it directly): chosen once,
        #: so the common max-softmax call pays nothing for the other kinds.
        self.scorer: Callable[[list[np.ndarray]], float] = {
            "head": self._head_confidence,
            "custom": self._custom_confidence,
            None: self._no_confidence,
        }.get(kind, self._softmax_confidence)
        self._warmup(warmup_runs)

    # --- calls --------------------------------------------------------------------------------

    def feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        """Check the caller's inputs (dict name → array, or one array) against the model."""
        if isinstance(inputs, np.ndarray):
            if len(self.input_names) != 1:
                raise InvalidInput(f"the model takes {len(self.input_names)} inputs {self.input_names}: pass a dict")
            feeds = {self.input_names[0]: inputs}
        elif isinstance(inputs, Mapping):
            feeds = inputs if isinstance(inputs, dict) else dict(inputs)
            if len(feeds) != len(self.input_names) or any(n not in feeds for n in self.input_names):
                missing = [n for n in self.input_names if n not in feeds]
                unknown = [n for n in feeds if n not in self._input_dtypes]
                raise InvalidInput(f"inputs do not match the model: missing {missing}, unknown {unknown}")
        else:
            raise InvalidInput(f"inputs must be a numpy array or a dict name -> array, got {type(inputs).__name__}")
        for name, arr in feeds.items():
            want = self._input_dtypes[name]
            if not isinstance(arr, np.ndarray):
                raise InvalidInput(f"input {name!r} must be a numpy array, got {type(arr).__name__}")
            if arr.dtype != want:
                raise InvalidInput(f"input {name!r} has dtype {arr.dtype}; the model expects {want}")
        return feeds

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the session on checked feeds; returns outputs in ``output_names`` order."""
        t0 = _perf()
        try:
            outs = self._run(self.output_names, feeds, None)
        except Exception as e:
            raise run_error(e, feeds, self._input_shapes) from None
        self.record(feeds[self._first_input].shape, (_perf() - t0) * 1000.0)
        return outs

    def record(self, shape: tuple[int, ...], ms: float) -> None:
        """Add one run's latency to the profile of its batch size (the first input's first dim)."""
        batch = shape[0] if shape else 1
        w = self._windows.get(batch)
        if w is None:
            w = self.estimates.edge_window(batch)
        w.add(ms)

    def confidence(self, outputs: list[np.ndarray]) -> float:
        """The edge's confidence on this call (outputs in ``output_names`` order): the lowest row's
        max softmax or margin, confidence-head score, or application function value. Raises
        :class:`~tandem.shared.errors.NoConfidence` when there is none."""
        return self.scorer(outputs)

    def _softmax_confidence(self, outputs: list[np.ndarray]) -> float:
        z = outputs[self._score_index]
        margin = self.estimates.confidence_kind == "margin"  # read per call: it may be changed at run time
        if z.size <= 64:  # small rows (the common edge call): plain floats beat numpy's per-op cost
            if z.ndim <= 1 or z.shape[0] == 1:
                return _row_confidence(z.ravel().tolist(), self._scores_are_logits, margin)
            return min([_row_confidence(r, self._scores_are_logits, margin) for r in z.reshape(z.shape[0], -1).tolist()])
        z = z.reshape(z.shape[0], -1) if z.ndim > 1 else z.reshape(1, -1)
        if self._scores_are_logits:
            e = np.exp(z - z.max(axis=1, keepdims=True))
            p = e / e.sum(axis=1, keepdims=True)
        else:
            p = z
        if margin and p.shape[1] > 1:
            top2 = np.partition(p, -2, axis=1)[:, -2:]
            c = top2[:, 1] - top2[:, 0]
        else:
            c = p.max(axis=1)
        return float(c.min())

    def _head_confidence(self, outputs: list[np.ndarray]) -> float:
        assert self._head is not None
        try:
            return _lowest(self._head.score(outputs[self._head_index]), "the confidence head")
        except ValueError as e:  # the head's features do not fit this output
            raise InferenceFailed(f"the bundle's confidence head cannot score the edge output: {e}") from None

    def _custom_confidence(self, outputs: list[np.ndarray]) -> float:
        assert self._app_confidence is not None
        try:
            got = self._app_confidence(dict(zip(self.output_names, outputs)))
        except TandemError:
            raise
        except Exception as e:
            raise InferenceFailed(f"the confidence function raised {type(e).__name__}: {e}") from e
        return _lowest(got, "the confidence function")

    def _no_confidence(self, outputs: list[np.ndarray]) -> float:
        raise NoConfidence(no_confidence_message(self.estimates.no_confidence or "no confidence is defined"))

    def _warmup(self, runs: int) -> None:
        if runs <= 0:
            return
        feeds = {}
        for name in self.input_names:
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in self._input_shapes[name]]
            feeds[name] = np.zeros(shape, dtype=self._input_dtypes[name])
        for _ in range(runs):
            self._run(self.output_names, feeds, None)


def run_error(
    e: BaseException, feeds: Mapping[str, np.ndarray] | None = None, declared: Mapping[str, Sequence[Any]] | None = None
) -> Exception:
    """onnxruntime's exception as Tandem's: the caller's fault (shape, rank, type) or the model's.

    With the ``feeds`` and the model's ``declared`` input shapes, a wrong shape is named as such
    (input, shape given, shape expected); otherwise onnxruntime's whole message, on one line.
    """
    text = _ort_message(e)
    if type(e).__name__ in ("InvalidArgument", "Fail") or "Invalid" in text[:200]:
        mismatch = _shape_mismatch(feeds, declared) if feeds is not None and declared is not None else None
        return InvalidInput(f"edge model rejected the inputs: {mismatch or text}")
    return InferenceFailed(f"edge inference failed: {text}")


def _shape_mismatch(feeds: Mapping[str, np.ndarray], declared: Mapping[str, Sequence[Any]]) -> str | None:
    """``input 'x' has shape [1, 63]; the model expects [N, 64]`` for the first input that does not fit."""
    for name, arr in feeds.items():
        want = declared.get(name)
        if want is None:
            continue
        fits = len(want) == arr.ndim and all(not isinstance(w, int) or w <= 0 or w == g for w, g in zip(want, arr.shape))
        if not fits:
            shown = ", ".join(str(w) if isinstance(w, int) and w > 0 else (w if isinstance(w, str) and w else "?") for w in want)
            return f"input {name!r} has shape {list(arr.shape)}; the model expects [{shown}]"
    return None


def _lowest(value: Any, what: str) -> float:
    """The lowest of one confidence or one per row, as a float (NaN stays NaN: never ≥ a threshold)."""
    if value.__class__ is float:
        return value  # type: ignore[no-any-return]
    try:
        c = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InferenceFailed(f"{what} returned {type(value).__name__}; expected a number or one per row") from None
    if c.size == 0:
        raise InferenceFailed(f"{what} returned no confidence")
    return float(c.min())


def _row_confidence(row: list[float], logits: bool, margin: bool) -> float:
    if margin and len(row) > 1:
        a, b = heapq.nlargest(2, row)
        if logits:  # p1 - p2 of the softmax, without building it
            return (1.0 - math.exp(b - a)) / sum([math.exp(v - a) for v in row])
        return a - b
    if logits:
        m = max(row)
        if -80.0 < m < 80.0:  # exp() of every logit stays finite and > 0: one C-level pass
            return math.exp(m) / sum(map(math.exp, row))
        return 1.0 / sum([math.exp(v - m) for v in row])
    return max(row)


def _numpy_dtype(onnx_type: str) -> np.dtype:
    from tandem.shared.tensors import ONNX_TYPE_TO_DATATYPE

    dt = ONNX_TYPE_TO_DATATYPE.get(onnx_type)
    if dt is None:
        raise InferenceFailed(f"edge model input type {onnx_type} is not supported")
    return DATATYPE_TO_DTYPE[dt]


#: onnxruntime's prefix ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ") and closing advice carry nothing.
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")
_ORT_ADVICE = " Please fix either the inputs/outputs or the model."


def _ort_message(e: BaseException) -> str:
    """onnxruntime's message on one line: the details it puts on later lines (which index, got what,
    expected what) are the useful part."""
    text = " ".join(str(e).split()) or type(e).__name__
    return _ORT_PREFIX.sub("", text).replace(_ORT_ADVICE, "").strip()[:500]
