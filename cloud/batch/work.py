"""The work directory that makes a run resumable: its plan and lock, the fsynced chunk files
and journal, and the assembly of OUTPUT from them in row order."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tandem.shared.errors import InvalidInput

from .formats import pyarrow_module

__all__ = ["JOURNAL_NAME", "LOCK_NAME", "PLAN_NAME", "ArraySink", "Journal", "assemble", "make_plan", "open_work", "save_chunk"]


PLAN_NAME = "plan.json"
JOURNAL_NAME = "journal"
#: Bumped when the work directory's layout changes: an old one is then refused, not misread.
WORK_FORMAT = 1


# --- chunks and the journal ---------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def chunk_path(work: Path, chunk: int) -> Path:
    return work / f"chunk-{chunk:08d}.npz"


def save_chunk(work: Path, chunk: int, outs: list[dict[str, np.ndarray]] | dict[str, np.ndarray], names: list[str]) -> int:
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
    final = chunk_path(work, chunk)
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stub reads ** as its allow_pickle
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final.stat().st_size


def load_chunk(work: Path, chunk: int, names: list[str]) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
    with np.load(chunk_path(work, chunk), allow_pickle=False) as z:
        if "o0" in z.files:
            return {n: z[f"o{j}"] for j, n in enumerate(names)}
        rows = len(z.files) // max(1, len(names))
        return [{n: z[f"o{j}_{i}"] for j, n in enumerate(names)} for i in range(rows)]


class ArraySink:
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


class Journal:
    """Append-only lines ``{"chunk", "rows", "bytes"}``, each fsynced: the record of finished chunks.
    A torn last line (a kill mid-write) is ignored, and so is an entry whose file is missing or of
    another size: that chunk is computed again and replaces its file."""

    def __init__(self, work: Path, sink: ArraySink | None = None) -> None:
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
            p = chunk_path(self.work, chunk)
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


def assemble(work: Path, output: Path, fmt: str, n_chunks: int, names: list[str], sink: ArraySink | None) -> None:
    """Write OUTPUT from the chunks in order, through a temporary file renamed over it at the end."""
    tmp = output.with_name(f".{output.name}.tmp")
    chunks = (load_chunk(work, c, names) for c in range(n_chunks))
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
        pa = pyarrow_module()
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
    fsync_dir(output.parent)



def make_plan(identity: dict[str, Any], source_path: Path, rows: int, output: Path, chunk_rows: int) -> dict[str, Any]:
    st = source_path.stat()
    return {
        "format": WORK_FORMAT,
        **identity,
        "input": str(source_path.resolve()),
        "input_bytes": st.st_size,
        "input_mtime_ns": st.st_mtime_ns,
        "rows": rows,
        "chunk_rows": chunk_rows,
        "output": str(output.resolve()),
    }



LOCK_NAME = ".lock"


def lock_work(work: Path) -> Any:
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


def open_work(work: Path, plan: dict[str, Any], restart: bool) -> Any:
    """Make or reopen the work directory for ``plan``; returns the lock to hold while running."""
    plan_path = work / PLAN_NAME
    if work.exists() and not plan_path.is_file() and any(e.name != LOCK_NAME for e in work.iterdir()):
        # Not ours (no plan): never cleared, not even with --restart.
        raise InvalidInput(f"work directory {work} exists, is not empty and is not a tandem batch run; "
                           "remove it or choose --work-dir")
    work.mkdir(parents=True, exist_ok=True)
    lock = lock_work(work)
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
        fsync_dir(work)
        return lock
    except BaseException:
        lock.close()
        raise
