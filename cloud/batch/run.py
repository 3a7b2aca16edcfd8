"""One run of ``tandem batch``: options, report, and the loop that computes the missing chunks
while a writer thread persists the previous one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.shared.bundle import Bundle
from tandem.shared.errors import InvalidInput, TandemError

from .compute import Compute, EngineCompute
from .formats import ARRAY_FORMATS, TABLE_FORMATS, Source, format_of, open_source
from .progress import Progress
from .work import PLAN_NAME, ArraySink, Journal, assemble, make_plan, open_work, save_chunk

__all__ = ["BatchOptions", "BatchReport", "run_batch"]


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


def _measure_chunk_rows(compute: Compute, source: Source, rows: int, opts: BatchOptions, where: str) -> int:
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
        source = open_source(src_path, in_fmt, compute.inputs)
        try:
            return _run(compute, source, src_path, output, out_fmt, work, names, opts, say)
        finally:
            source.close()
    finally:
        if own_compute:
            compute.close()


def _run(compute: Compute, source: Source, src_path: Path, output: Path, out_fmt: str,
         work: Path, names: list[str], opts: BatchOptions, say: Callable[[str], None]) -> BatchReport:
    rows = source.rows
    if rows == 0:
        raise InvalidInput(f"INPUT {src_path} has no rows")
    # The first row is checked before anything is written: a wrong file fails at once, cleanly.
    first = source.read(0, 1)
    compute.check(first if isinstance(first, dict) else {k: v[None] for k, v in first[0].items()}, f"{src_path} row 0")

    chunk_rows = opts.chunk_rows or _planned_chunk_rows(work, opts) or _measure_chunk_rows(compute, source, rows, opts, str(src_path))
    n_chunks = -(-rows // chunk_rows)
    plan = make_plan(compute.identity, src_path, rows, output, chunk_rows)
    lock = open_work(work, plan, opts.restart)
    try:
        compute.begin(hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:24])
        return _run_chunks(compute, source, src_path, output, out_fmt, work, names, opts, say, rows, chunk_rows, n_chunks)
    finally:
        lock.close()


def _run_chunks(compute: Compute, source: Source, src_path: Path, output: Path, out_fmt: str, work: Path,
                names: list[str], opts: BatchOptions, say: Callable[[str], None], rows: int, chunk_rows: int,
                n_chunks: int) -> BatchReport:
    sink = ArraySink(work, names, rows) if out_fmt in ARRAY_FORMATS else None
    journal = Journal(work, sink)
    done = {c: r for c, r in journal.done().items() if c < n_chunks}
    resumed = sum(done.values())
    if resumed:
        say(f"resuming: {len(done)}/{n_chunks} chunks ({resumed} rows) already done in {work}")
    todo = [c for c in range(n_chunks) if c not in done]
    progress = Progress(rows, resumed, opts.progress)
    t0 = time.monotonic()
    computed = 0
    complete = True
    # One writer thread: chunk i is persisted while chunk i+1 computes. At most two chunks wait.
    pending: deque[Future[None]] = deque()

    def persist(chunk: int, outs: Any, n: int) -> None:
        size = sink.write(chunk * chunk_rows, outs) if sink is not None else save_chunk(work, chunk, outs, names)
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
    assemble(work, output, out_fmt, n_chunks, names, sink)
    shutil.rmtree(work, ignore_errors=True)
    return BatchReport(rows, n_chunks, resumed, computed, time.monotonic() - t0, output)
