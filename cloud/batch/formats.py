"""The files ``tandem batch`` reads: the format by suffix, and a source per format that reads
any range of rows (arrays from ``.npy``/``.npz``, tables from JSONL and Parquet), checked against
the model's inputs and converted to their dtypes."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tandem.shared.errors import InvalidInput, TensorCodecError
from tandem.shared.tensors import datatype_of

__all__ = ["ARRAY_FORMATS", "TABLE_FORMATS", "Rows", "Source", "check_names", "format_of", "open_source", "pyarrow_module"]


ARRAY_FORMATS = ("npy", "npz")
TABLE_FORMATS = ("jsonl", "parquet")
SUFFIXES = {".npy": "npy", ".npz": "npz", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}



#: A chunk's rows: one array per input (rows of equal shape), or one dict per row (a ragged table).
Rows = dict[str, np.ndarray] | list[dict[str, np.ndarray]]


def format_of(path: Path) -> str:
    """``npy``, ``npz``, ``jsonl`` or ``parquet`` by the file's suffix; InvalidInput for anything else."""
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InvalidInput(
            f"{path}: unknown format {path.suffix or '(no suffix)'!r}; tandem batch reads and writes "
            ".npy, .npz, .jsonl (.ndjson) and .parquet (.pq)"
        )
    return fmt


def pyarrow_module() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise InvalidInput("Parquet files need pyarrow: pip install pyarrow") from None
    return pyarrow



# --- reading ------------------------------------------------------------------------------------


def coerce(name: str, arr: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
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


def check_names(found: Sequence[str], wanted: Sequence[str], where: str, what: str) -> None:
    missing = [n for n in wanted if n not in found]
    extra = [n for n in found if n not in wanted]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"unknown {', '.join(map(repr, extra))}")
        raise InvalidInput(f"{where}: the model's inputs are [{', '.join(wanted)}]; the {what} has {' and '.join(parts)}")


class Source(Protocol):
    rows: int

    def read(self, start: int, stop: int) -> Rows: ...

    def close(self) -> None: ...


class ArraySource:
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
                    check_names(list(z.files), names, str(path), ".npz")
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
        return {n: coerce(n, np.ascontiguousarray(a[start:stop]), self._dtypes[n], where) for n, a in self.arrays.items()}

    def close(self) -> None:
        self.arrays = {}


def stack_rows(values: list[dict[str, Any]], inputs: list[tuple[str, np.dtype, int]], first: int, where: str) -> Rows:
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
            out[name] = coerce(name, arr, dtype, at)
        per_row.append(out)
    shapes = {tuple((k, a.shape) for k, a in row.items()) for row in per_row}
    if len(shapes) == 1:
        return {name: np.stack([row[name] for row in per_row]) for name, _, _ in inputs}
    return per_row


#: A JSONL source remembers the byte offset of every this many rows (to seek to a chunk).
_SEEK_EVERY = 1024


class JsonlSource:
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
                check_names(list(obj), self._names, f"{self.path} row {start + len(values)}", "line")
            values.append(obj)
        return stack_rows(values, self._inputs, start, str(self.path))

    def close(self) -> None:
        self._f.close()


class ParquetSource:
    """One column per input; read forward in record batches (a resumed run skips what is done)."""

    def __init__(self, path: Path, inputs: list[tuple[str, np.dtype, int]]) -> None:
        pa = pyarrow_module()
        self.path, self._inputs = path, inputs
        self._names = [n for n, _, _ in inputs]
        if not path.is_file():
            raise InvalidInput(f"INPUT {path} does not exist")
        try:
            self._file = pa.parquet.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise InvalidInput(f"{path} is not a readable Parquet file: {e}") from None
        check_names(self._file.schema_arrow.names, self._names, str(path), "Parquet file")
        self.rows = self._file.metadata.num_rows
        self._iter: Iterator[Any] | None = None
        self._pos = 0  # rows consumed from _iter
        self._buf: list[Any] = []  # record batches read but not yet returned

    def read(self, start: int, stop: int) -> Rows:
        pa = pyarrow_module()
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
        return stack_rows(values, self._inputs, start, str(self.path))

    def close(self) -> None:
        self._iter = None
        self._buf = []


def open_source(path: Path, fmt: str, inputs: list[tuple[str, np.dtype, int]]) -> Source:
    if fmt in ARRAY_FORMATS:
        return ArraySource(path, fmt, inputs)
    if fmt == "jsonl":
        return JsonlSource(path, inputs)
    return ParquetSource(path, inputs)
