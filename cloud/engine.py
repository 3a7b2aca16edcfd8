"""ONNX Runtime sessions for one model version: providers, thread counts, instances, warm-up.

A :class:`ModelEngine` holds N sessions (instances) of the same ONNX file. Each session is used by
one batcher worker at a time, so sessions never contend. Thread counts are set explicitly:
``intra_op_num_threads`` per session (the config chooses cores // instances) and
``inter_op_num_threads=1``, so N instances together use about the machine's cores and leave the
event loop room. Everything here is blocking; callers run it in an executor.

The threads that compute (onnxruntime's, and the batcher's that call ``run``) may run at a lower
CPU priority than the event loop (``nice``, see :func:`lower_thread_priority`): the loop feeds
them, and when it waits behind them for a core, they soon wait for work.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tandem.shared.errors import InferenceFailed, InvalidInput, TensorCodecError
from tandem.shared.tensors import ONNX_TYPE_TO_DATATYPE, dtype_of

__all__ = ["Declared", "TensorInfo", "ModelEngine", "resolve_providers", "lower_thread_priority"]

_log = logging.getLogger(__name__)

#: Input signatures a model remembers as checked (see ModelEngine.check_inputs).
_MAX_ACCEPTED = 1024


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    datatype: str
    #: ints for fixed dims, None for symbolic/unknown ones (reported as -1)
    shape: tuple[int | None, ...]
    #: The name of each dynamic dim that has one (the bundle manifest's, else the ONNX graph's
    #: dim_param), else None. Inputs that share a name must agree on its length in a request,
    #: and an output axis named like a padded input axis is cut back to each request's length.
    symbols: tuple[str | None, ...] = ()
    #: The value a dynamic non-batch axis may be filled with to batch requests of different
    #: lengths together (the manifest's ``pad``); None: never padded.
    pad: float | None = None

    @property
    def wire_shape(self) -> list[int]:
        return [-1 if d is None else d for d in self.shape]

    def symbol(self, axis: int) -> str | None:
        return self.symbols[axis] if axis < len(self.symbols) else None

    @property
    def declared(self) -> str:
        """The shape for messages: ``[-1, -1, 384] = [batch, sequence, 384]`` (the names when it has some)."""
        wire = str(self.wire_shape)
        if not any(self.symbols):
            return wire
        return wire + " = [" + ", ".join(str(d) if d is not None else self.symbol(i) or "-1" for i, d in enumerate(self.shape)) + "]"


class Declared(Protocol):
    """What the engine reads of a bundle manifest's tensor (:class:`tandem.shared.bundle.TensorSpec`)."""

    name: str
    shape: list[int | str]
    pad: float | None


def _symbol_axes(t: TensorInfo, index: dict[str, int]) -> tuple[tuple[int, int], ...]:
    # (axis, position of its symbol in index) for each of t's non-batch axes whose symbol index holds.
    return tuple((axis, index[sym]) for axis in range(1, len(t.shape)) if (sym := t.symbol(axis)) is not None and sym in index)


def resolve_providers(requested: Sequence[str]) -> list[str]:
    """The requested providers this onnxruntime build has, in order; CPU is always last resort."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen = [p for p in requested if p in available]
    missing = [p for p in requested if p not in available]
    if missing:
        _log.warning("execution providers not available in this onnxruntime build, skipped: %s", ", ".join(missing))
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def lower_thread_priority(nice: int) -> None:
    """Make the calling thread ``nice`` steps less favoured by the OS scheduler (threads it starts
    later inherit that). Linux only, where a thread has its own nice value; elsewhere a no-op.

    Why: the event loop sleeps until a batch is done, then must run at once to answer and re-queue
    requests. Beside compute threads of equal priority, the kernel let it wait ~1 ms for a core
    (measured: two single-thread instances on 2 cores sat idle ~28% of the time waiting for work
    the loop had not yet handed them)."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as e:
        _log.warning("cannot lower the CPU priority of compute thread %d: %s", tid, e)


def _info(arg, declared: Declared | None = None) -> TensorInfo:  # type: ignore[no-untyped-def]
    """What onnxruntime says of a tensor, with the names and pad value its manifest declares.

    A dim the graph fixes stays fixed; a dynamic one takes the manifest's size (a fixed int) or
    name (a str), else keeps the graph's dim_param. A manifest shape of another rank is ignored."""
    datatype = ONNX_TYPE_TO_DATATYPE.get(arg.type)
    if datatype is None:
        raise InvalidInput(f"tensor {arg.name!r} has type {arg.type}, which Tandem cannot serve")
    dims = list(arg.shape or [])
    shape = [d if isinstance(d, int) and d >= 0 else None for d in dims]
    symbols = [d if isinstance(d, str) and d else None for d in dims]
    pad = None
    if declared is not None:
        pad = declared.pad
        if len(declared.shape) != len(shape):
            _log.warning(
                "tensor %r: the manifest declares shape %s, the ONNX graph has rank %d; the graph's shape is used",
                arg.name, declared.shape, len(shape),
            )
        else:
            for i, d in enumerate(declared.shape):
                if shape[i] is not None:
                    continue
                if isinstance(d, int) and d >= 0:
                    shape[i], symbols[i] = d, None
                elif isinstance(d, str) and d:
                    symbols[i] = d
    symbols = [None if d is not None else sym for d, sym in zip(shape, symbols)]  # only dynamic dims have names
    return TensorInfo(arg.name, datatype, tuple(shape), tuple(symbols), pad)


class ModelEngine:
    """N onnxruntime sessions of one ONNX file plus its input/output signature."""

    def __init__(
        self,
        onnx_path: Path,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        instances: int = 1,
        intra_op_threads: int = 1,
        spinning: str = "never",
        nice: int = 0,
        declared_inputs: Sequence[Declared] = (),
        declared_outputs: Sequence[Declared] = (),
    ) -> None:
        """``declared_inputs``/``declared_outputs``: the bundle manifest's tensors (symbolic dim
        names, pad values); tensors it does not name keep what the ONNX graph says."""
        wanted = resolve_providers(providers)
        #: How much lower than the event loop the compute threads run (see lower_thread_priority).
        self.nice = nice
        # onnxruntime starts its intra-op threads with the session: build the sessions in a thread
        # of lowered priority so that those threads inherit it (and the caller's stays as it is).
        built: list[BaseException | None] = [None]

        def build() -> None:
            lower_thread_priority(nice)
            try:
                self._make_sessions(onnx_path, wanted, instances, intra_op_threads, spinning)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                built[0] = e

        t = threading.Thread(target=build, name="tandem-session-builder")
        t.start()
        t.join()
        if built[0] is not None:
            raise built[0]
        first = self.sessions[0]
        #: What onnxruntime really uses (never what was merely asked for).
        self.providers: list[str] = list(first.get_providers())
        self.intra_op_threads = intra_op_threads
        declared = {d.name: d for d in declared_inputs}
        self.inputs = [_info(a, declared.get(a.name)) for a in first.get_inputs()]
        declared = {d.name: d for d in declared_outputs}
        self.outputs = [_info(a, declared.get(a.name)) for a in first.get_outputs()]
        self.input_by_name = {t.name: t for t in self.inputs}
        self.output_names = [t.name for t in self.outputs]
        self._dtypes = {t.name: dtype_of(t.datatype) for t in self.inputs}
        self._accepted: dict[tuple[Any, ...], int] = {}  # input signatures check_inputs accepted -> rows
        #: Batchable when every input and output has a variable leading dimension.
        self.batchable = all(t.shape and t.shape[0] is None for t in self.inputs + self.outputs)
        self._plan_padding()

    def _plan_padding(self) -> None:
        """Which axes inputs must agree on, and which requests may be padded along to share a batch.

        An axis name may be padded when every input axis of that name has a pad value (numeric
        tensors only) and every dynamic non-batch output axis is named after an input axis: an
        output axis of unknown meaning might grow with the padding, and could not be cut back."""
        first = 1 if self.batchable else 0  # the batch axis is checked on its own
        carriers: dict[str, list[tuple[TensorInfo, int]]] = {}
        for t in self.inputs:
            for axis in range(first, len(t.shape)):
                sym = t.symbol(axis)
                if sym is not None:
                    carriers.setdefault(sym, []).append((t, axis))
        #: Axis names several inputs carry: (input, axis) of each, checked per request.
        self._shared = [(sym, [(t.name, axis) for t, axis in c]) for sym, c in carriers.items() if len(c) > 1]
        #: Names of the axes requests may be padded along (their index is the one in ``pad_axes``).
        self.pad_symbols: tuple[str, ...] = ()
        #: Why requests are not padded, when the model has dynamic axes but they cannot be.
        self.padding_off = ""
        #: input name -> ((axis, symbol index), ...) of its axes that may be padded
        self.pad_axes: dict[str, tuple[tuple[int, int], ...]] = {}
        #: input name -> its pad value, for the inputs that have axes to pad
        self.pad_values: dict[str, float] = {}
        #: output name -> ((axis, symbol index), ...) of the axes cut back to each request's length
        self.unpad_axes: dict[str, tuple[tuple[int, int], ...]] = {}
        if not self.batchable or not carriers:
            return
        batch_names = {t.symbol(0) for t in self.inputs + self.outputs} - {None}
        symbols = [
            sym for sym, c in carriers.items()
            if sym not in batch_names and all(t.pad is not None and self._dtypes[t.name].kind in "biuf" for t, _ in c)
        ]
        for o in self.outputs:
            for axis in range(1, len(o.shape)):
                if o.shape[axis] is None and o.symbol(axis) not in carriers:
                    self.padding_off = f"output {o.name!r} has a dynamic axis {axis} named after no input axis"
                    return
        if not symbols:
            self.padding_off = "no dynamic input axis has a pad value"
            return
        index = {sym: i for i, sym in enumerate(symbols)}
        self.pad_symbols = tuple(symbols)
        self.pad_axes = {t.name: _symbol_axes(t, index) for t in self.inputs}
        self.pad_values = {t.name: t.pad for t in self.inputs if self.pad_axes[t.name] and t.pad is not None}
        self.unpad_axes = {o.name: axes for o in self.outputs if (axes := _symbol_axes(o, index))}

    def batch_key(self, inputs: Mapping[str, np.ndarray]) -> tuple[tuple[Any, ...], tuple[int, ...], int]:
        """(what requests must share to be padded into one batch, their lengths along each padded
        axis, their input elements), for a checked request of a model with ``pad_symbols``."""
        key = []
        lens = [0] * len(self.pad_symbols)
        size = 0
        for t in self.inputs:
            arr = inputs[t.name]
            size += arr.size
            axes = self.pad_axes[t.name]
            if axes:
                shape = list(arr.shape[1:])
                for axis, s in axes:
                    lens[s] = shape[axis - 1]
                    shape[axis - 1] = -1
                key.append((arr.dtype.str, tuple(shape)))
            else:
                key.append((arr.dtype.str, arr.shape[1:]))
        return tuple(key), tuple(lens), size

    def _make_sessions(
        self, onnx_path: Path, wanted: list[str], instances: int, intra_op_threads: int, spinning: str
    ) -> None:
        import onnxruntime as ort

        self.sessions = []
        self._shrink = ort.RunOptions()
        arenas = "cpu:0;gpu:0" if "CUDAExecutionProvider" in wanted else "cpu:0"
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", arenas)
        for _ in range(instances):
            so = ort.SessionOptions()
            so.intra_op_num_threads = intra_op_threads
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # Spinning worker threads burn the cores the event loop and other instances need
            # (see ServerConfig.ort_spinning).
            so.add_session_config_entry("session.intra_op.allow_spinning", "0" if spinning == "never" else "1")
            if spinning == "run":
                so.add_session_config_entry("session.force_spinning_stop", "1")
            try:
                sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=wanted)
            except Exception as e:  # onnxruntime raises its own exception types
                raise InferenceFailed(f"onnxruntime cannot load {onnx_path.name}: {e}") from None
            self.sessions.append(sess)

    @property
    def instances(self) -> int:
        return len(self.sessions)

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> int:
        """Validate names, datatypes and shapes against the model; returns the batch rows (1 if unbatched)."""
        # Requests repeat a few signatures: one dict lookup answers for a signature checked before.
        key = tuple([(name, arr.dtype, arr.shape) for name, arr in inputs.items()])
        rows = self._accepted.get(key)
        if rows is None:
            rows = self._check_inputs(inputs)
            if len(self._accepted) >= _MAX_ACCEPTED:
                self._accepted.clear()  # dynamic dimensions: never grow without bound
            self._accepted[key] = rows
        return rows

    def _check_inputs(self, inputs: Mapping[str, np.ndarray]) -> int:
        if len(inputs) != len(self.inputs) or any(name not in self.input_by_name for name in inputs):
            want = ", ".join(t.name for t in self.inputs)
            got = ", ".join(inputs) or "none"
            raise InvalidInput(f"model inputs are [{want}]; the request has [{got}]")
        rows = None
        for name, arr in inputs.items():
            spec = self.input_by_name[name]
            if arr.dtype != self._dtypes[name]:
                raise TensorCodecError(f"input {name!r} must be {spec.datatype}, got {_datatype_name(arr)}")
            if arr.ndim != len(spec.shape):
                raise InvalidInput(
                    f"input {name!r} must have {len(spec.shape)} dimensions {spec.declared}, got {arr.ndim}: {list(arr.shape)}"
                )
            if any(want is not None and want != got for want, got in zip(spec.shape, arr.shape)):
                raise InvalidInput(f"input {name!r} must have shape {spec.declared}, got {list(arr.shape)}")
            if self.batchable:
                if rows is None:
                    rows = arr.shape[0]
                elif arr.shape[0] != rows:
                    raise InvalidInput("all inputs must have the same batch (first) dimension")
        if self.batchable and rows == 0:
            raise InvalidInput("the batch dimension must be at least 1")
        for sym, where in self._shared:
            (first, axis), *others = where
            for other, other_axis in others:
                a, b = inputs[first].shape[axis], inputs[other].shape[other_axis]
                if a != b:
                    raise InvalidInput(
                        f"inputs {first!r} and {other!r} share the axis {sym!r} but have lengths {a} and {b}"
                    )
        return rows if self.batchable and rows is not None else 1

    def run(self, instance: int, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run one (batched) call on session ``instance``. Blocking."""
        names = list(outputs) if outputs is not None else self.output_names
        try:
            result = self.sessions[instance].run(names, dict(feeds))
        except Exception as e:  # onnxruntime's errors are not a public hierarchy
            raise InferenceFailed(f"inference failed: {e}") from None
        return dict(zip(names, result))

    def release_memory(self, instance: int) -> None:
        """Shrink session ``instance``'s memory arena to what it holds in use. Blocking.

        onnxruntime's CPU arena keeps every block it ever allocated: after one large batch the
        process stays as large as that batch made it. A run with arena shrinkage frees the
        arena's unused regions when it ends; once nothing refers to the large batch's outputs
        (numpy views into the arena), a one-row run frees everything that batch took (a small
        CNN: 58 MB warm, 871 MB after 100,000 rows, 58 MB after this; shrinking in the large run
        itself still left 465 MB, its outputs being in use then). Other runs keep the arena as
        it is, as fast as before."""
        try:
            self.sessions[instance].run(None, self.example_inputs(1), self._shrink)
        except Exception as e:  # noqa: BLE001 - only memory is at stake
            _log.warning("could not shrink the memory arena of instance %d: %s", instance, e)

    def example_inputs(self, rows: int, samples: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Inputs of ``rows`` rows for warm-up: the bundle's samples when they fit, else zeros."""
        feeds = {}
        for t in self.inputs:
            dtype = self._dtypes[t.name]
            sample = samples.get(t.name) if samples else None
            if sample is not None and sample.dtype == dtype and sample.ndim == len(t.shape) and len(sample):
                base = sample
            else:
                base = np.zeros([1 if d is None else d for d in t.shape], dtype=dtype)
                if dtype.kind == "O":
                    base[...] = b""
            if self.batchable:
                reps = -(-rows // len(base))
                base = np.concatenate([base] * reps)[:rows]
            feeds[t.name] = np.ascontiguousarray(base)
        return feeds

    def warm_up(self, batch_sizes: Sequence[int], samples: Mapping[str, np.ndarray] | None = None) -> float:
        """Run every instance once per batch size so no request pays for first-run allocations.

        Returns the seconds spent. A model that fails here is not served.
        """
        start = time.perf_counter()
        sizes = sorted(set(batch_sizes)) if self.batchable else [1]
        for size in sizes:
            feeds = self.example_inputs(size, samples)
            for i in range(self.instances):
                self.run(i, feeds)
        return time.perf_counter() - start


def _datatype_name(arr: np.ndarray) -> str:
    from tandem.shared.tensors import datatype_of

    try:
        return datatype_of(arr.dtype)
    except TensorCodecError:
        return str(arr.dtype)
