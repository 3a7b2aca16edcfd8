"""``tandem batch``: run a model over a file of inputs offline, resumably, with progress.

Inputs and outputs (chosen by the file's suffix):

- arrays: ``.npy`` (one array: the input of a one-input model) or ``.npz`` (one array per model input,
  named like the inputs). Output ``.npy`` (a model with one output) or ``.npz`` (every output, by name).
- tables: JSONL (``.jsonl``/``.ndjson``: one JSON object per line, the input names as keys, each value
  a number or a nested list for one row) or Parquet (``.parquet``/``.pq``: one column per input,
  scalars or lists; ``pyarrow`` needed). Output JSONL or Parquet, one row per input row in the same
  order, the output names as keys/columns.

Arrays go to arrays and tables to tables. Rows of a table may differ in shape (token lists of any
length): rows of equal shapes are batched together. Values convert to the model's dtype when numpy
calls the conversion ``same_kind`` (ints to floats, float64 to float32); anything else (floats for an
integer input, strings for a number) is refused with the input's name.

Resumable: rows are cut into fixed chunks (``chunk_rows``; by default about two seconds of compute,
measured on the first rows and recorded for the run). Each computed chunk is written to the work
directory (``.OUTPUT.tandem-batch/`` beside OUTPUT) and fsynced, then named in an append-only, fsynced
journal; a chunk counts as done only once the journal says so. A run stopped at any point (SIGINT,
SIGKILL, power) and started again with the same arguments computes only the chunks the journal lacks,
then assembles OUTPUT from the chunks in row order through a temporary file and one rename: OUTPUT
holds each input row's result exactly once, or does not exist yet. The work directory records what it
was made from (model, variant digest, input size and time, chunking); a run with other arguments is
refused rather than mixed in (``restart=True`` discards it).

Compute runs on :class:`tandem.cloud.engine.ModelEngine` (one onnxruntime session, ``threads``
intra-op threads, ``batch_size`` rows per run) while a writer thread persists the previous chunk, so
disk waits overlap compute. With a ``queue`` it submits the batches as jobs to a ``tandem serve``
instead (:class:`QueueCompute`: one job per batch, keyed so that a resumed run finds its jobs again).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tandem.shared.bundle import MANIFEST_NAME, Bundle, load_bundle, read_manifest, version_key
from tandem.shared.errors import BundleError, InferenceFailed, InvalidInput, ModelNotFound, TandemError, TensorCodecError
from tandem.shared.tensors import datatype_of, dtype_of

__all__ = ["BatchOptions", "BatchReport", "Compute", "EngineCompute", "QueueCompute", "format_of", "load_model", "main", "run_batch"]

_log = logging.getLogger(__name__)

ARRAY_FORMATS = ("npy", "npz")
TABLE_FORMATS = ("jsonl", "parquet")
_SUFFIXES = {".npy": "npy", ".npz": "npz", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
PLAN_NAME = "plan.json"
JOURNAL_NAME = "journal"
#: Bumped when the work directory's layout changes: an old one is then refused, not misread.
_WORK_FORMAT = 1

#: A chunk's rows: one array per input (rows of equal shape), or one dict per row (a ragged table).
Rows = dict[str, np.ndarray] | list[dict[str, np.ndarray]]


def format_of(path: Path) -> str:
    """``npy``, ``npz``, ``jsonl`` or ``parquet`` by the file's suffix; InvalidInput for anything else."""
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InvalidInput(
            f"{path}: unknown format {path.suffix or '(no suffix)'!r}; tandem batch reads and writes "
            ".npy, .npz, .jsonl (.ndjson) and .parquet (.pq)"
        )
    return fmt


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise InvalidInput("Parquet files need pyarrow: pip install pyarrow") from None
    return pyarrow


# --- the model ----------------------------------------------------------------------------------


def load_model(
    model: str,
    *,
    repository: str | os.PathLike[str] | None = None,
    trusted_keys: Sequence[str | os.PathLike[str]] = (),
    verify_signature: bool = True,
    variant: str = "cloud",
) -> Bundle:
    """The bundle ``model`` names: a bundle directory, or with ``repository`` ``name`` (its latest
    version) or ``name:version`` in it. Its signature is checked against ``trusted_keys`` (unless
    ``verify_signature=False``) and the hashes of ``variant``'s files always."""
    if verify_signature and not trusted_keys:
        raise InvalidInput("give --trusted-key PUB.pem (or --insecure-skip-signature to load unsigned bundles knowingly)")
    path = Path(model)
    if (path / MANIFEST_NAME).is_file():
        directory = path
    elif repository is not None:
        name, _, version = model.partition(":")
        for part, what in ((name, "model name"), (version, "version")):
            if part and (part in (".", "..") or "/" in part or "\\" in part or "\0" in part):
                raise InvalidInput(f"MODEL {model!r}: the {what} {part!r} is not a plain name")
        if not name:
            raise InvalidInput(f"MODEL {model!r}: give name or name:version")
        mdir = Path(repository) / name
        versions = sorted(
            (v.name for v in mdir.iterdir() if (v / MANIFEST_NAME).is_file()) if mdir.is_dir() else [], key=version_key
        )
        if not versions:
            raise ModelNotFound(f"no model {name!r} in the repository {repository} (no {name}/<version>/{MANIFEST_NAME})")
        if version and version not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version!r} in {repository} (it has {', '.join(versions)})")
        directory = mdir / (version or versions[-1])
    elif path.exists():
        raise InvalidInput(f"MODEL {model}: not a bundle directory (no {MANIFEST_NAME}); give a bundle directory, "
                           "or --repository REPO with MODEL as name or name:version")
    else:
        raise InvalidInput(f"MODEL {model}: no such bundle directory (with --repository REPO, MODEL is name or name:version)")
    try:
        bundle = load_bundle(directory, list(trusted_keys), verify_signature=verify_signature, variants=[variant])
        bundle.variant(variant)
    except KeyError as e:  # no such variant or role
        names = ", ".join(f"{v.name} ({v.role})" for v in read_manifest(directory)[1].variants)
        raise BundleError(f"{e.args[0] if e.args else e}; it has {names}") from None
    return bundle


class Compute(Protocol):
    """What runs the rows: the embedded engine, or a job queue."""

    #: What the results depend on (model, version, variant digest or queue URL): part of the plan.
    identity: dict[str, Any]
    #: (name, numpy dtype, rank) of each model input, in the model's order.
    inputs: list[tuple[str, np.dtype, int]]
    output_names: list[str]

    def check(self, rows: dict[str, np.ndarray], where: str) -> None:
        """Raise InvalidInput (naming ``where``) if these rows do not fit the model."""

    def begin(self, run_id: str) -> None:
        """Called once per run with an id unique to the run's plan (stable across resumes)."""

    def run(self, chunk: int, rows: Rows, where: str) -> list[dict[str, np.ndarray]] | dict[str, np.ndarray]:
        """The outputs of ``rows``: stacked arrays by output name, or one dict per row."""

    def close(self) -> None: ...


class EngineCompute:
    """Rows through one onnxruntime session of the bundle's variant, ``batch_size`` rows per run."""

    def __init__(self, bundle: Bundle, variant: str, *, threads: int, batch_size: int) -> None:
        from .engine import ModelEngine

        self.engine = ModelEngine(
            bundle.variant_path(variant),
            intra_op_threads=threads,
            declared_inputs=bundle.manifest.inputs,
            declared_outputs=bundle.manifest.outputs,
        )
        if not self.engine.batchable:
            raise InvalidInput(
                f"model {bundle.name}: tandem batch needs a dynamic batch (first) axis on every input and output; "
                f"this model's inputs are {[t.declared for t in self.engine.inputs]}"
            )
        self.batch_size = batch_size
        v = bundle.variant(variant)
        self.identity = {"model": bundle.name, "version": bundle.version, "variant": v.name, "variant_sha256": v.sha256}
        self.inputs = [(t.name, dtype_of(t.datatype), len(t.shape)) for t in self.engine.inputs]
        self.output_names = list(self.engine.output_names)

    def check(self, rows: dict[str, np.ndarray], where: str) -> None:
        try:
            self.engine.check_inputs(rows)
        except TandemError as e:
            raise type(e)(f"{where}: {e.message}") from None

    def begin(self, run_id: str) -> None:
        pass

    def run(self, chunk: int, rows: Rows, where: str) -> list[dict[str, np.ndarray]] | dict[str, np.ndarray]:
        if isinstance(rows, dict):
            return self._run_stacked(rows, where)
        batches, idx = _batches(rows, self.batch_size)
        results = []
        for feeds in batches:
            self.check(feeds, where)
            results.append(self.engine.run(0, feeds))
        return _scatter(results, idx, len(rows), self.output_names)

    def _run_stacked(self, rows: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
        """Rows of one shape: checked once (the batches differ only in length), then straight
        through the session, which for a small model is most of the cost of a batch."""
        self.check(rows, where)
        run, names, bs = self.engine.sessions[0].run, self.output_names, self.batch_size
        items = list(rows.items())
        n = len(items[0][1])
        parts: list[list[np.ndarray]] = [[] for _ in names]
        try:
            for s in range(0, n, bs):
                for part, out in zip(parts, run(names, {k: v[s : s + bs] for k, v in items})):
                    part.append(out)
        except Exception as e:  # onnxruntime's errors are not a public hierarchy
            raise InferenceFailed(f"{where}: inference failed: {e}") from None
        return {k: np.concatenate(part) for k, part in zip(names, parts)}

    def close(self) -> None:
        pass


def _batches(rows: Rows, batch_size: int) -> tuple[list[dict[str, np.ndarray]], list[list[int]] | None]:
    """The model calls for a chunk's rows: consecutive slices of ``batch_size`` rows, or for rows of
    differing shapes, each window of ``batch_size`` rows grouped by shape (with the rows' indices)."""
    if isinstance(rows, dict):
        n = len(next(iter(rows.values())))
        return [{k: v[s : s + batch_size] for k, v in rows.items()} for s in range(0, n, batch_size)], None
    batches, idx = [], []
    for s in range(0, len(rows), batch_size):
        for group, feeds in _groups(rows, range(s, min(s + batch_size, len(rows)))):
            batches.append(feeds)
            idx.append(group)
    return batches, idx


def _scatter(results: Sequence[Mapping[str, np.ndarray]], idx: list[list[int]] | None, n: int,
             names: list[str]) -> list[dict[str, np.ndarray]] | dict[str, np.ndarray]:
    """The outputs of :func:`_batches`' calls back in row order."""
    if idx is None:
        return {k: np.concatenate([r[k] for r in results]) for k in names}
    out: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
    for res, group in zip(results, idx):
        for j, i in enumerate(group):
            out[i] = {k: res[k][j] for k in names}
    return out


def _groups(rows: list[dict[str, np.ndarray]], window: range) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
    """Rows of ``window`` grouped by shape (first appearance order), each group stacked."""
    by_shape: dict[tuple[Any, ...], list[int]] = {}
    for i in window:
        key = tuple((k, v.shape) for k, v in rows[i].items())
        by_shape.setdefault(key, []).append(i)
    for idx in by_shape.values():
        yield idx, {k: np.stack([rows[i][k] for i in idx]) for k in rows[idx[0]]}


# --- reading ------------------------------------------------------------------------------------


def _coerce(name: str, arr: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    if arr.dtype == dtype:
        return arr
    if dtype.kind == "O" and arr.dtype.kind in "USO":
        return arr.astype(object)
    if arr.dtype.kind not in "OUSV" and np.can_cast(arr.dtype, dtype, "same_kind"):
        return arr.astype(dtype)
    try:
        got = datatype_of(arr.dtype) if arr.dtype.kind != "U" else "strings"
    except TensorCodecError:
        got = str(arr.dtype)
    raise TensorCodecError(f"{where}: input {name!r} must be {datatype_of(dtype)}; got {got}")


def _check_names(found: Sequence[str], wanted: Sequence[str], where: str, what: str) -> None:
    missing = [n for n in wanted if n not in found]
    extra = [n for n in found if n not in wanted]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"unknown {', '.join(map(repr, extra))}")
        raise InvalidInput(f"{where}: the model's inputs are [{', '.join(wanted)}]; the {what} has {' and '.join(parts)}")


class _Source(Protocol):
    rows: int

    def read(self, start: int, stop: int) -> Rows: ...

    def close(self) -> None: ...


class _ArraySource:
    """``.npy`` (memory-mapped) or ``.npz`` (each array loaded once)."""

    def __init__(self, path: Path, fmt: str, inputs: list[tuple[str, np.dtype, int]]) -> None:
        names = [n for n, _, _ in inputs]
        self._dtypes = {n: d for n, d, _ in inputs}
        self.path = path
        try:
            if fmt == "npy":
                if len(inputs) != 1:
                    raise InvalidInput(
                        f"{path}: a .npy file holds one array; the model has inputs [{', '.join(names)}]: "
                        "give an .npz with one array per input name"
                    )
                self.arrays = {names[0]: np.load(path, mmap_mode="r", allow_pickle=False)}
            else:
                with np.load(path, allow_pickle=False) as z:
                    _check_names(list(z.files), names, str(path), ".npz")
                    self.arrays = {n: z[n] for n in names}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            if isinstance(e, FileNotFoundError):
                raise InvalidInput(f"INPUT {path} does not exist") from None
            raise InvalidInput(f"{path} is not a readable {fmt} file: {e}") from None
        rows = set()
        for n, a in self.arrays.items():
            if a.ndim == 0:
                raise InvalidInput(f"{path}: input {n!r} is a scalar; it needs a first axis of rows")
            rows.add(a.shape[0])
        if len(rows) != 1:
            raise InvalidInput(f"{path}: the arrays have different numbers of rows: "
                               + ", ".join(f"{n} {a.shape[0]}" for n, a in self.arrays.items()))
        self.rows = rows.pop()

    def read(self, start: int, stop: int) -> Rows:
        where = f"{self.path} rows {start}-{stop - 1}"
        return {n: _coerce(n, np.ascontiguousarray(a[start:stop]), self._dtypes[n], where) for n, a in self.arrays.items()}

    def close(self) -> None:
        self.arrays = {}


def _stack(values: list[dict[str, Any]], inputs: list[tuple[str, np.dtype, int]], first: int, where: str) -> Rows:
    """Table rows (python values) as arrays: stacked when every row has the same shapes, else per row."""
    per_row: list[dict[str, np.ndarray]] = []
    for r, row in enumerate(values):
        out = {}
        for name, dtype, rank in inputs:
            v = row[name]
            at = f"{where} row {first + r}"
            if v is None:
                raise InvalidInput(f"{at}: input {name!r} is null")
            try:
                arr = np.asarray(v)
            except ValueError:
                raise InvalidInput(f"{at}: input {name!r} is not a rectangular array (nested lists of unequal lengths)") from None
            if arr.dtype.kind == "O" and dtype.kind != "O":
                raise InvalidInput(f"{at}: input {name!r} is not a rectangular array of numbers")
            if arr.ndim != rank - 1:
                raise InvalidInput(f"{at}: input {name!r} must have {rank - 1} dimension(s) per row, got {arr.ndim}: {list(arr.shape)}")
            out[name] = _coerce(name, arr, dtype, at)
        per_row.append(out)
    shapes = {tuple((k, a.shape) for k, a in row.items()) for row in per_row}
    if len(shapes) == 1:
        return {name: np.stack([row[name] for row in per_row]) for name, _, _ in inputs}
    return per_row


#: A JSONL source remembers the byte offset of every this many rows (to seek to a chunk).
_SEEK_EVERY = 1024


class _JsonlSource:
    """One JSON object per line; blank lines are skipped. The file is scanned once for the row count
    and the byte offset of every ``_SEEK_EVERY``-th row, so a resumed run seeks close to its chunk."""

    def __init__(self, path: Path, inputs: list[tuple[str, np.dtype, int]]) -> None:
        self.path, self._inputs = path, inputs
        self._names = [n for n, _, _ in inputs]
        self._offsets: list[int] = []
        rows = 0
        try:
            self._f = open(path, "rb")
        except FileNotFoundError:
            raise InvalidInput(f"INPUT {path} does not exist") from None
        pos = 0
        for line in self._f:
            if line.strip():
                if rows % _SEEK_EVERY == 0:
                    self._offsets.append(pos)
                rows += 1
            pos += len(line)
        self.rows = rows

    def read(self, start: int, stop: int) -> Rows:
        self._f.seek(self._offsets[start // _SEEK_EVERY])
        skip = start % _SEEK_EVERY
        while skip:
            line = self._f.readline()
            if not line:
                break
            if line.strip():
                skip -= 1
        values: list[dict[str, Any]] = []
        line_no = 0
        while len(values) < stop - start:
            line = self._f.readline()
            if not line:
                break
            line_no += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, UnicodeDecodeError) as e:
                raise InvalidInput(f"{self.path} row {start + len(values)}: not a JSON object: {e}") from None
            if not isinstance(obj, dict):
                raise InvalidInput(f"{self.path} row {start + len(values)}: each line must be a JSON object keyed by input name")
            if obj.keys() != set(self._names):
                _check_names(list(obj), self._names, f"{self.path} row {start + len(values)}", "line")
            values.append(obj)
        return _stack(values, self._inputs, start, str(self.path))

    def close(self) -> None:
        self._f.close()


class _ParquetSource:
    """One column per input; read forward in record batches (a resumed run skips what is done)."""

    def __init__(self, path: Path, inputs: list[tuple[str, np.dtype, int]]) -> None:
        pa = _pyarrow()
        self.path, self._inputs = path, inputs
        self._names = [n for n, _, _ in inputs]
        if not path.is_file():
            raise InvalidInput(f"INPUT {path} does not exist")
        try:
            self._file = pa.parquet.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise InvalidInput(f"{path} is not a readable Parquet file: {e}") from None
        _check_names(self._file.schema_arrow.names, self._names, str(path), "Parquet file")
        self.rows = self._file.metadata.num_rows
        self._iter: Iterator[Any] | None = None
        self._pos = 0  # rows consumed from _iter
        self._buf: list[Any] = []  # record batches read but not yet returned

    def read(self, start: int, stop: int) -> Rows:
        pa = _pyarrow()
        first = self._pos - sum(b.num_rows for b in self._buf)  # row index of the buffer's first row
        if self._iter is None or start < first:
            self._iter = self._file.iter_batches(batch_size=max(1024, stop - start), columns=self._names)
            self._pos, self._buf, first = 0, [], 0
        while self._pos < stop:
            try:
                b = next(self._iter)
            except StopIteration:
                break
            self._buf.append(b)
            self._pos += b.num_rows
            while self._buf and first + self._buf[0].num_rows <= start:  # rows a resumed run has done
                first += self._buf.pop(0).num_rows
        if not self._buf:
            raise InvalidInput(f"{self.path}: rows {start}-{stop - 1} are missing (the file changed while read?)")
        table = pa.Table.from_batches(self._buf)
        part = table.slice(start - first, stop - start)
        rest = table.slice(stop - first)
        self._buf = rest.to_batches() if rest.num_rows else []
        cols = {n: part.column(n).to_pylist() for n in self._names}
        values = [{n: cols[n][i] for n in self._names} for i in range(part.num_rows)]
        return _stack(values, self._inputs, start, str(self.path))

    def close(self) -> None:
        self._iter = None
        self._buf = []


def _open_source(path: Path, fmt: str, inputs: list[tuple[str, np.dtype, int]]) -> _Source:
    if fmt in ARRAY_FORMATS:
        return _ArraySource(path, fmt, inputs)
    if fmt == "jsonl":
        return _JsonlSource(path, inputs)
    return _ParquetSource(path, inputs)


# --- chunks and the journal ---------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _chunk_path(work: Path, chunk: int) -> Path:
    return work / f"chunk-{chunk:08d}.npz"


def _save_chunk(work: Path, chunk: int, outs: list[dict[str, np.ndarray]] | dict[str, np.ndarray], names: list[str]) -> int:
    """Write one chunk's outputs durably; returns the file's size. Stacked outputs are stored as
    ``o{j}``, rows of differing shapes as ``o{j}_{i}`` (never a pickle)."""
    if isinstance(outs, dict):
        arrays = {f"o{j}": outs[n] for j, n in enumerate(names)}
    else:
        first = outs[0] if outs else {}
        if outs and all(all(r[n].shape == first[n].shape for n in names) for r in outs):
            arrays = {f"o{j}": np.stack([r[n] for r in outs]) for j, n in enumerate(names)}
        else:
            arrays = {f"o{j}_{i}": r[n] for i, r in enumerate(outs) for j, n in enumerate(names)}
    final = _chunk_path(work, chunk)
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub reads ** as its allow_pickle
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final.stat().st_size


def _load_chunk(work: Path, chunk: int, names: list[str]) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
    with np.load(_chunk_path(work, chunk), allow_pickle=False) as z:
        if "o0" in z.files:
            return {n: z[f"o{j}"] for j, n in enumerate(names)}
        rows = len(z.files) // max(1, len(names))
        return [{n: z[f"o{j}_{i}"] for j, n in enumerate(names)} for i in range(rows)]


class _ArraySink:
    """Array outputs written in place: one memory-mapped ``.npy`` per output in the work directory,
    of the final size; a chunk's rows are written at their offset and flushed to disk before its
    journal line. OUTPUT is then that file renamed (``.npy``) or the files stored in a zip
    (``.npz``): the outputs are written once, never copied from chunk files."""

    def __init__(self, work: Path, names: list[str], rows: int) -> None:
        self.names, self.rows = names, rows
        self.paths = [work / f"out-{j}.npy" for j in range(len(names))]
        self._maps: list[np.memmap] | None = None

    def intact(self) -> bool:
        """Whether every output file is there, whole: else what the journal says is done is not."""
        try:
            return all(np.lib.format.open_memmap(p, mode="r").shape[:1] == (self.rows,) for p in self.paths)
        except (OSError, ValueError):
            return False

    def write(self, start: int, outs: list[dict[str, np.ndarray]] | dict[str, np.ndarray]) -> int:
        if not isinstance(outs, dict):
            raise InvalidInput("the outputs differ in shape from row to row; write .jsonl or .parquet")
        if self._maps is None:
            if self.intact():
                self._maps = [np.lib.format.open_memmap(p, mode="r+") for p in self.paths]
            else:
                self._maps = [np.lib.format.open_memmap(p, mode="w+", dtype=outs[n].dtype, shape=(self.rows, *outs[n].shape[1:]))
                              for p, n in zip(self.paths, self.names)]
        for m, n in zip(self._maps, self.names):
            a = outs[n]
            if a.dtype != m.dtype or a.shape[1:] != m.shape[1:]:
                raise InvalidInput(f"output {n!r} is {a.dtype}{list(a.shape[1:])} in rows {start}-{start + len(a) - 1} but "
                                   f"{m.dtype}{list(m.shape[1:])} before; write .jsonl or .parquet")
            m[start : start + len(a)] = a
            m.flush()  # msync: these rows are on disk before the journal names them
        return 0

    def close(self) -> None:
        self._maps = None


class _Journal:
    """Append-only lines ``{"chunk", "rows", "bytes"}``, each fsynced: the record of finished chunks.
    A torn last line (a kill mid-write) is ignored, and so is an entry whose file is missing or of
    another size: that chunk is computed again and replaces its file."""

    def __init__(self, work: Path, sink: _ArraySink | None = None) -> None:
        self.path = work / JOURNAL_NAME
        self.work = work
        self.sink = sink

    def done(self) -> dict[int, int]:
        """{chunk: rows} of the chunks finished and intact."""
        out: dict[int, int] = {}
        if not self.path.exists():
            return out
        if self.sink is not None and not self.sink.intact():
            return out  # the output files are gone or broken: nothing can be trusted as done
        for line in self.path.read_bytes().split(b"\n"):
            try:
                e = json.loads(line)
                chunk, rows, size = int(e["chunk"]), int(e["rows"]), int(e["bytes"])
            except (ValueError, KeyError, TypeError):
                continue  # the torn end of a killed run
            if self.sink is not None:
                out[chunk] = rows
                continue
            p = _chunk_path(self.work, chunk)
            if p.is_file() and p.stat().st_size == size:
                out[chunk] = rows
        return out

    def add(self, chunk: int, rows: int, size: int) -> None:
        # One write of one line ending in "\n": a later line is never glued to a torn one.
        line = b"\n" + json.dumps({"chunk": chunk, "rows": rows, "bytes": size}).encode() + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


# --- writing OUTPUT -----------------------------------------------------------------------------


def _arrow_type(pa: Any, dtype: np.dtype, rank: int) -> Any:
    t = pa.string() if dtype.kind in "OU" else pa.binary() if dtype.kind == "S" else pa.from_numpy_dtype(dtype)
    for _ in range(rank):
        t = pa.list_(t)
    return t


def _plain(a: np.ndarray) -> Any:
    if a.dtype.kind == "O":
        return [_plain(x) if isinstance(x, np.ndarray) else (x.decode("utf-8", "replace") if isinstance(x, bytes) else x) for x in a]
    return a.tolist()


def _iter_rows(chunk: dict[str, np.ndarray] | list[dict[str, np.ndarray]], names: list[str]) -> Iterator[dict[str, np.ndarray]]:
    if isinstance(chunk, dict):
        n = len(chunk[names[0]]) if names else 0
        for i in range(n):
            yield {k: chunk[k][i] for k in names}
    else:
        yield from chunk


def _assemble(work: Path, output: Path, fmt: str, n_chunks: int, names: list[str], sink: _ArraySink | None) -> None:
    """Write OUTPUT from the chunks in order, through a temporary file renamed over it at the end."""
    tmp = output.with_name(f".{output.name}.tmp")
    chunks = (_load_chunk(work, c, names) for c in range(n_chunks))
    if sink is not None:
        sink.close()
        if fmt == "npy":
            try:
                os.replace(sink.paths[0], tmp)
            except OSError:  # --work-dir on another file system
                shutil.copyfile(sink.paths[0], tmp)
        else:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                for path, n in zip(sink.paths, names):
                    z.write(path, arcname=f"{n}.npy")
    elif fmt == "jsonl":
        with open(tmp, "w", encoding="utf-8") as f:
            for c in chunks:
                for row in _iter_rows(c, names):
                    f.write(json.dumps({k: _plain(np.asarray(v)) for k, v in row.items()}, separators=(",", ":")))
                    f.write("\n")
    else:
        pa = _pyarrow()
        writer = None
        try:
            for c in chunks:
                rows_ = list(_iter_rows(c, names))
                if not rows_:
                    continue
                if writer is None:
                    schema = pa.schema([(n, _arrow_type(pa, rows_[0][n].dtype, rows_[0][n].ndim)) for n in names])
                    writer = pa.parquet.ParquetWriter(tmp, schema)
                cols = [pa.array([_plain(np.asarray(r[n])) for r in rows_], type=schema.field(n).type) for n in names]
                writer.write_table(pa.Table.from_arrays(cols, schema=schema))
        finally:
            if writer is not None:
                writer.close()
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, output)
    _fsync_dir(output.parent)


# --- progress -----------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar on a terminal; elsewhere (logs, CI) a line every ``every_s`` seconds. Both say rows
    done, throughput and the time left."""

    def __init__(self, total: int, initial: int, enabled: bool, every_s: float = 5.0, stream: Any = None) -> None:
        self.total, self.done, self.enabled = total, initial, enabled
        self._stream = stream or sys.stderr
        self._start, self._start_rows = time.monotonic(), initial
        self._every, self._last = every_s, time.monotonic()
        self._bar = None
        if enabled and getattr(self._stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm
            except ImportError:  # the lines below say the same, less prettily
                return
            self._bar = tqdm(total=total, initial=initial, unit="rows", unit_scale=True, file=self._stream,
                             dynamic_ncols=True, smoothing=0.1)

    def rate(self) -> float:
        dt = time.monotonic() - self._start
        return (self.done - self._start_rows) / dt if dt > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        if math.isnan(left):
            eta = "?"
        else:
            h, rest = divmod(int(left), 3600)
            eta = f"{h}:{rest // 60:02d}:{rest % 60:02d}"  # hours past 24 too
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return f"{self.done}/{self.total} rows ({pct:.1f}%), {rate:,.0f} rows/s, ETA {eta}"

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= self._every:
            self._last = time.monotonic()
            print(self.line(), file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# --- the run ------------------------------------------------------------------------------------


@dataclass(slots=True)
class BatchOptions:
    """How to run; everything but ``restart``/``overwrite``/``progress`` is part of the run's identity
    only where it changes what is computed (the chunking, the model, the input, the output)."""

    batch_size: int = 64
    #: Rows per saved chunk. None: about ``chunk_seconds`` of compute, measured on the first rows
    #: (8192 rows for a queue) and recorded in the plan, so that a resumed run cuts the same chunks.
    chunk_rows: int | None = None
    chunk_seconds: float = 2.0
    threads: int = 1
    variant: str = "cloud"
    work_dir: Path | None = None
    restart: bool = False
    overwrite: bool = False
    progress: bool = True
    #: Stops the run after this many chunks computed in this run (tests of interruption), None: all.
    stop_after: int | None = None


@dataclass(slots=True)
class BatchReport:
    rows: int
    chunks: int
    resumed_rows: int
    computed_rows: int
    seconds: float
    output: Path
    complete: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.computed_rows / self.seconds if self.seconds > 0 else 0.0


def _work_dir(output: Path, opts: BatchOptions) -> Path:
    return opts.work_dir if opts.work_dir is not None else output.with_name(f".{output.name}.tandem-batch")


def _plan(identity: dict[str, Any], source_path: Path, rows: int, output: Path, chunk_rows: int) -> dict[str, Any]:
    st = source_path.stat()
    return {
        "format": _WORK_FORMAT,
        **identity,
        "input": str(source_path.resolve()),
        "input_bytes": st.st_size,
        "input_mtime_ns": st.st_mtime_ns,
        "rows": rows,
        "chunk_rows": chunk_rows,
        "output": str(output.resolve()),
    }


def _planned_chunk_rows(work: Path, opts: BatchOptions) -> int | None:
    """The chunk size of the unfinished run in ``work`` (None: no usable one)."""
    if opts.restart:
        return None
    try:
        n = json.loads((work / PLAN_NAME).read_text()).get("chunk_rows")
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and n > 0 else None


#: Bounds of a measured chunk size: small enough that a chunk's rows and outputs fit in memory.
_MIN_CHUNK_ROWS, _MAX_CHUNK_ROWS = 256, 1 << 18


def _measure_chunk_rows(compute: Compute, source: _Source, rows: int, opts: BatchOptions, where: str) -> int:
    """Rows that take about ``opts.chunk_seconds`` to compute, a multiple of the batch size: big
    enough that saving a chunk (an fsync or two) costs little beside computing it, small enough
    that an interrupted run loses little."""
    bs = opts.batch_size
    if not isinstance(compute, EngineCompute):
        return max(bs, 8192 // bs * bs)
    n = min(rows, bs * 8)
    sample = source.read(0, n)
    compute.run(-1, source.read(0, min(rows, bs)), f"{where} rows 0-{min(rows, bs) - 1}")  # first-run allocations
    t0 = time.perf_counter()
    compute.run(-1, sample, f"{where} rows 0-{n - 1}")
    rate = n / max(time.perf_counter() - t0, 1e-6)
    want = min(max(int(rate * opts.chunk_seconds), _MIN_CHUNK_ROWS), _MAX_CHUNK_ROWS)
    return max(bs, want // bs * bs)


LOCK_NAME = ".lock"


def _lock(work: Path) -> Any:
    """An exclusive lock on the work directory (held by the open file returned), or InvalidInput
    when another ``tandem batch`` holds it: two runs writing the same chunks would waste the work."""
    f = open(work / LOCK_NAME, "a+")
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise InvalidInput(f"another tandem batch is running with the work directory {work}; wait for it or stop it") from None
    return f


def _open_work(work: Path, plan: dict[str, Any], restart: bool) -> Any:
    """Make or reopen the work directory for ``plan``; returns the lock to hold while running."""
    plan_path = work / PLAN_NAME
    if work.exists() and not plan_path.is_file() and any(e.name != LOCK_NAME for e in work.iterdir()):
        # Not ours (no plan): never cleared, not even with --restart.
        raise InvalidInput(f"work directory {work} exists, is not empty and is not a tandem batch run; "
                           "remove it or choose --work-dir")
    work.mkdir(parents=True, exist_ok=True)
    lock = _lock(work)
    try:
        if restart:
            for e in work.iterdir():
                if e.name != LOCK_NAME:
                    shutil.rmtree(e) if e.is_dir() and not e.is_symlink() else e.unlink()
        if plan_path.is_file():
            try:
                old = json.loads(plan_path.read_text())
            except ValueError:
                old = None
            if old != plan:
                diff = sorted(k for k in set(plan) | set(old or {}) if (old or {}).get(k) != plan.get(k))
                raise InvalidInput(
                    f"{work} holds an unfinished run of other arguments or inputs (differs in: {', '.join(diff)}); "
                    "rerun that command to finish it, or pass --restart to discard it"
                )
            return lock
        tmp = work / (PLAN_NAME + ".tmp")
        with open(tmp, "w") as f:
            json.dump(plan, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, plan_path)
        _fsync_dir(work)
        return lock
    except BaseException:
        lock.close()
        raise


def run_batch(
    model: Bundle | Compute,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    options: BatchOptions | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> BatchReport:
    """Run ``model`` over INPUT into OUTPUT (see the module's docstring). ``model``: a loaded bundle
    (run on the embedded engine with ``options.threads`` and ``options.batch_size``) or any
    :class:`Compute` (a job queue: :class:`QueueCompute`).

    Returns a report; ``complete`` is False when ``options.stop_after`` stopped it early. Bad input
    raises an InvalidInput naming the file, row and input; an interrupted run (KeyboardInterrupt)
    keeps every chunk it finished for the next run."""
    opts = options or BatchOptions()
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if opts.batch_size < 1 or (opts.chunk_rows is not None and opts.chunk_rows < 1) or opts.threads < 1:
        raise InvalidInput("--batch-size, --chunk-rows and --threads must be at least 1")
    src_path, output = Path(input_path), Path(output_path)
    in_fmt, out_fmt = format_of(src_path), format_of(output)
    if (in_fmt in ARRAY_FORMATS) != (out_fmt in ARRAY_FORMATS):
        want = " or ".join(f".{f}" for f in (ARRAY_FORMATS if in_fmt in ARRAY_FORMATS else TABLE_FORMATS))
        raise InvalidInput(f"OUTPUT {output}: a {in_fmt} input is written as {want} (arrays to arrays, tables to tables)")
    if not src_path.is_file():
        raise InvalidInput(f"INPUT {src_path} does not exist" if not src_path.exists() else f"INPUT {src_path} is not a file")
    if src_path.resolve() == output.resolve():
        raise InvalidInput("OUTPUT must not be INPUT")
    if not output.parent.is_dir():
        raise InvalidInput(f"OUTPUT {output}: the directory {output.parent} does not exist")
    work = _work_dir(output, opts)
    if output.exists() and not opts.overwrite and not (work / PLAN_NAME).is_file():
        raise InvalidInput(f"OUTPUT {output} exists; pass --overwrite to replace it")

    own_compute = isinstance(model, Bundle)
    compute = EngineCompute(model, opts.variant, threads=opts.threads, batch_size=opts.batch_size) if isinstance(model, Bundle) else model
    try:
        names = compute.output_names
        if out_fmt == "npy" and len(names) != 1:
            raise InvalidInput(f"OUTPUT {output}: a .npy file holds one array; the model has outputs [{', '.join(names)}]: write .npz")
        source = _open_source(src_path, in_fmt, compute.inputs)
        try:
            return _run(compute, source, src_path, output, out_fmt, work, names, opts, say)
        finally:
            source.close()
    finally:
        if own_compute:
            compute.close()


def _run(compute: Compute, source: _Source, src_path: Path, output: Path, out_fmt: str,
         work: Path, names: list[str], opts: BatchOptions, say: Callable[[str], None]) -> BatchReport:
    rows = source.rows
    if rows == 0:
        raise InvalidInput(f"INPUT {src_path} has no rows")
    # The first row is checked before anything is written: a wrong file fails at once, cleanly.
    first = source.read(0, 1)
    compute.check(first if isinstance(first, dict) else {k: v[None] for k, v in first[0].items()}, f"{src_path} row 0")

    chunk_rows = opts.chunk_rows or _planned_chunk_rows(work, opts) or _measure_chunk_rows(compute, source, rows, opts, str(src_path))
    n_chunks = -(-rows // chunk_rows)
    plan = _plan(compute.identity, src_path, rows, output, chunk_rows)
    lock = _open_work(work, plan, opts.restart)
    try:
        compute.begin(hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:24])
        return _run_chunks(compute, source, src_path, output, out_fmt, work, names, opts, say, rows, chunk_rows, n_chunks)
    finally:
        lock.close()


def _run_chunks(compute: Compute, source: _Source, src_path: Path, output: Path, out_fmt: str, work: Path,
                names: list[str], opts: BatchOptions, say: Callable[[str], None], rows: int, chunk_rows: int,
                n_chunks: int) -> BatchReport:
    sink = _ArraySink(work, names, rows) if out_fmt in ARRAY_FORMATS else None
    journal = _Journal(work, sink)
    done = {c: r for c, r in journal.done().items() if c < n_chunks}
    resumed = sum(done.values())
    if resumed:
        say(f"resuming: {len(done)}/{n_chunks} chunks ({resumed} rows) already done in {work}")
    todo = [c for c in range(n_chunks) if c not in done]
    progress = _Progress(rows, resumed, opts.progress)
    t0 = time.monotonic()
    computed = 0
    complete = True
    # One writer thread: chunk i is persisted while chunk i+1 computes. At most two chunks wait.
    pending: deque[Future[None]] = deque()

    def persist(chunk: int, outs: Any, n: int) -> None:
        size = sink.write(chunk * chunk_rows, outs) if sink is not None else _save_chunk(work, chunk, outs, names)
        journal.add(chunk, n, size)

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="tandem-batch-writer") as writer:
            for i, chunk in enumerate(todo):
                if opts.stop_after is not None and i >= opts.stop_after:
                    complete = False
                    break
                start, stop = chunk * chunk_rows, min((chunk + 1) * chunk_rows, rows)
                where = f"{src_path} rows {start}-{stop - 1}"
                outs = compute.run(chunk, source.read(start, stop), where)
                pending.append(writer.submit(persist, chunk, outs, stop - start))
                while len(pending) > 1:
                    pending.popleft().result()
                computed += stop - start
                progress.update(stop - start)
            while pending:
                pending.popleft().result()
    except TandemError:
        if not journal.done():
            # Nothing finished: a bad row must not leave a run behind that the fixed file would be refused by.
            shutil.rmtree(work, ignore_errors=True)
        raise
    except KeyboardInterrupt:
        progress.close()
        done_now = sum(journal.done().values())
        say(f"interrupted: {done_now}/{rows} rows are saved in {work}; run the same command again to continue")
        raise
    finally:
        progress.close()
    seconds = time.monotonic() - t0
    if not complete:
        if sink is not None:
            sink.close()
        return BatchReport(rows, n_chunks, resumed, computed, seconds, output, complete=False)
    _assemble(work, output, out_fmt, n_chunks, names, sink)
    shutil.rmtree(work, ignore_errors=True)
    return BatchReport(rows, n_chunks, resumed, computed, time.monotonic() - t0, output)


# --- rows as jobs on a server ------------------------------------------------------------------

_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class QueueCompute:
    """Rows as jobs on a ``tandem serve``'s job API (:mod:`tandem.shared.jobs`): one job per batch,
    submitted with ``Prefer: respond-async`` and an ``Idempotency-Key`` made of the run's id, the
    chunk and the batch, so a resumed run (or a retried submit) finds the same jobs instead of making
    new ones. The model's signature comes from the server's v2 metadata; rows are checked against it
    before anything is sent. A run without a version is pinned to the latest version served when it
    starts, so every chunk of it is computed by the same one."""

    def __init__(self, url: str, model: str, *, batch_size: int = 64, api_key: str | None = None,
                 priority: int | None = None, concurrency: int = 8, request_timeout_s: float = 60.0,
                 give_up_s: float = 600.0) -> None:
        from tandem.shared.jobs import MAX_PRIORITY, MIN_PRIORITY

        if not url.startswith(("http://", "https://")):
            raise InvalidInput(f"--queue must be the http(s) URL of a tandem serve, got {url!r}")
        name, _, version = model.partition(":")
        for part in (name, version):
            if part and (set(part) - _NAME_OK or part in (".", "..")):
                raise InvalidInput(f"MODEL {model!r}: with --queue, MODEL is the served model's name or name:version")
        if not name:
            raise InvalidInput("MODEL: give the served model's name or name:version")
        if priority is not None and not MIN_PRIORITY <= priority <= MAX_PRIORITY:
            raise InvalidInput(f"--priority must be within {MIN_PRIORITY}..{MAX_PRIORITY}, got {priority}")
        self.url, self.name, self.batch_size = url.rstrip("/"), name, batch_size
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._priority, self._concurrency = priority, concurrency
        self._timeout_s, self._give_up_s = request_timeout_s, give_up_s
        self._run_id = "run"
        self._loop = asyncio.new_event_loop()
        self._session: Any = None
        try:
            meta = self._loop.run_until_complete(self._metadata(version or None))
        except BaseException:
            self.close()
            raise
        versions = [str(v) for v in meta.get("versions") or []]
        self.version = version or (max(versions, key=version_key) if versions else None)
        try:
            self.inputs = [(t["name"], dtype_of(t["datatype"]), len(t["shape"])) for t in meta["inputs"]]
            self._shapes = {t["name"]: [None if d < 0 else d for d in t["shape"]] for t in meta["inputs"]}
            self.output_names = [t["name"] for t in meta["outputs"]]
        except (KeyError, TypeError) as e:
            self.close()
            raise TandemError(f"{self.url} answered the metadata of {name} without {e}") from None
        # A job carries one request: no more rows than the server takes in one.
        try:
            config = self._loop.run_until_complete(self._metadata(self.version, "/config"))
            most = int((config.get("parameters") or {}).get("max_request_rows") or 0)
        except (TandemError, TypeError, ValueError):
            most = 0
        if 0 < most < batch_size:
            _log.info("%s takes at most %d rows per request: jobs of %d rows", self.url, most, most)
            self.batch_size = most
        # The batch size is part of the identity: the jobs' keys name batches by their index.
        self.identity = {"model": name, "version": self.version, "queue": self.url, "job_rows": self.batch_size}

    def begin(self, run_id: str) -> None:
        self._run_id = run_id

    def check(self, rows: dict[str, np.ndarray], where: str) -> None:
        _check_names(list(rows), [n for n, _, _ in self.inputs], where, "rows")
        for name, dtype, rank in self.inputs:
            arr, want = rows[name], self._shapes[name]
            if arr.dtype != dtype:
                raise TensorCodecError(f"{where}: input {name!r} must be {datatype_of(dtype)}, got {datatype_of(arr.dtype)}")
            if arr.ndim != rank or any(w is not None and w != g for w, g in zip(want, arr.shape)):
                raise InvalidInput(f"{where}: input {name!r} must have shape {[-1 if d is None else d for d in want]}, got {list(arr.shape)}")

    def run(self, chunk: int, rows: Rows, where: str) -> list[dict[str, np.ndarray]] | dict[str, np.ndarray]:
        batches, idx = _batches(rows, self.batch_size)
        for feeds in batches:
            self.check(feeds, where)
        results = self._loop.run_until_complete(self._run_jobs(chunk, batches, where))
        return _scatter(results, idx, len(rows), self.output_names)

    def close(self) -> None:
        if self._session is not None:
            self._loop.run_until_complete(self._session.close())
            self._session = None
        self._loop.close()

    # --- HTTP ---------------------------------------------------------------------------------

    def _http(self) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        return self._session

    async def _request(self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None,
                       retry: tuple[int, ...] = (429, 503), give_up_s: float | None = None) -> tuple[int, Mapping[str, str], bytes]:
        """One request, retried while the server is unreachable or answers a ``retry`` status (overloaded),
        for up to ``give_up_s`` (default: the client's)."""
        import aiohttp

        from tandem.shared.errors import Unavailable

        end = time.monotonic() + (self._give_up_s if give_up_s is None else give_up_s)
        delay = 0.2
        while True:
            try:
                async with self._http().request(method, self.url + path, data=body,
                                                 headers={**self._headers, **(headers or {})}) as r:
                    raw = await r.read()
                    status, rh = r.status, r.headers
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                if time.monotonic() > end:
                    raise Unavailable(f"the queue at {self.url} is unreachable: {type(e).__name__}: {e}") from None
                status, rh, raw = 0, {}, b""
            if status != 0 and status not in retry:
                return status, rh, raw
            if time.monotonic() > end:
                raise _server_error(status, raw, f"the queue at {self.url}")
            try:
                wait = float(rh.get("Retry-After", delay))
            except ValueError:
                wait = delay
            await asyncio.sleep(min(max(wait, 0.05), 5.0))
            delay = min(delay * 2, 5.0)

    async def _metadata(self, version: str | None, what: str = "") -> dict[str, Any]:
        path = f"/v2/models/{self.name}" + (f"/versions/{version}" if version else "") + what
        # Asked before any work: a server that is not there is reported within seconds, not minutes.
        status, _, raw = await self._request("GET", path, give_up_s=min(self._give_up_s, 10.0))
        if status != 200:
            raise _server_error(status, raw, f"model {self.name} at {self.url}")
        try:
            doc = json.loads(raw)
        except ValueError:
            raise TandemError(f"{self.url}{path} did not answer JSON model metadata") from None
        if not isinstance(doc, dict):
            raise TandemError(f"{self.url}{path} did not answer a JSON object")
        return doc

    async def _run_jobs(self, chunk: int, batches: list[dict[str, np.ndarray]], where: str) -> list[dict[str, np.ndarray]]:
        sem = asyncio.Semaphore(self._concurrency)

        async def one(j: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            key = f"tandem-batch:{self._run_id}:{chunk}:{j}"
            async with sem:
                return await self._job(key, feeds, where)

        try:
            async with asyncio.TaskGroup() as tg:  # the first failure cancels the rest
                tasks = [tg.create_task(one(j, f)) for j, f in enumerate(batches)]
        except BaseExceptionGroup as eg:
            raise eg.exceptions[0] from None
        return [t.result() for t in tasks]

    async def _job(self, key: str, feeds: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
        from tandem.shared.jobs import IDEMPOTENCY_KEY_HEADER, PREFER_HEADER, PRIORITY_HEADER, RESPOND_ASYNC, result_path
        from tandem.shared.protocol import CONTENT_TYPE, InferRequest, InferResponse, infer_path

        body = InferRequest(feeds).to_wire()
        headers = {"Content-Type": CONTENT_TYPE, PREFER_HEADER: RESPOND_ASYNC, IDEMPOTENCY_KEY_HEADER: key}
        if self._priority is not None:
            headers[PRIORITY_HEADER] = str(self._priority)
        for _ in range(3):  # a job forgotten (expired) between submit and result is submitted again
            status, _, raw = await self._request("POST", infer_path(self.name, self.version), body, headers)
            if status not in (200, 202):
                raise _server_error(status, raw, where)
            try:
                job_id = str(json.loads(raw)["id"])
            except (ValueError, KeyError, TypeError):
                raise TandemError(f"{self.url} answered a job submit without a job id") from None
            delay = 0.02
            while True:
                # A failed job answers its own error status (503 too): only an unreachable server is retried.
                status, _, raw = await self._request("GET", result_path(job_id), retry=())
                if status == 200:
                    return InferResponse.from_wire(raw).outputs
                if status == 404:
                    break
                if status != 202:
                    raise _server_error(status, raw, where)
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 1.0)
        raise TandemError(f"{where}: the queue at {self.url} kept forgetting the job {key}")


def _server_error(status: int, raw: bytes, where: str) -> TandemError:
    from tandem.shared.protocol import error_from_reply

    err = error_from_reply(status or 503, raw)
    err.message = f"{where}: {err.message}"
    err.args = (err.message,)
    return err


# --- the command --------------------------------------------------------------------------------


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def main(args: Any) -> int:
    """``tandem batch`` (arguments from cloud/cli.py). Exit 0 when OUTPUT is complete; errors are
    TandemErrors (one line, exit 1, no traceback); Ctrl-C keeps the finished chunks (exit 130)."""
    opts = BatchOptions(
        batch_size=args.batch_size,
        chunk_rows=args.chunk_rows,
        threads=args.threads if args.threads is not None else _default_threads(),
        variant=args.variant,
        work_dir=Path(args.work_dir) if args.work_dir else None,
        restart=args.restart,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    try:
        model: Bundle | Compute
        if args.queue:
            model = QueueCompute(args.queue, args.model, batch_size=opts.batch_size, api_key=args.api_key,
                                 priority=args.priority)
        else:
            model = load_model(args.model, repository=args.repository, trusted_keys=args.trusted_keys,
                               verify_signature=not args.insecure_skip_signature, variant=args.variant)
        try:
            report = run_batch(model, args.input, args.output, opts)
        finally:
            if isinstance(model, QueueCompute):
                model.close()
    except OSError as e:
        # A file that cannot be read or written is the user's to fix: say which, without a traceback.
        where = f"{e.filename}: " if e.filename else ""
        raise InvalidInput(f"{where}{e.strerror or e}") from None
    how = f"; {report.resumed_rows} were done by an earlier run" if report.resumed_rows else ""
    print(f"{report.rows} rows -> {report.output}: computed {report.computed_rows} in {report.seconds:.1f} s "
          f"({report.rows_per_s:,.0f} rows/s){how}")
    return 0
