"""``tandem batch`` on the command line (arguments parsed by cloud/cli.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tandem.shared.bundle import Bundle
from tandem.shared.errors import InvalidInput

from .compute import Compute, load_model
from .remote import QueueCompute
from .run import BatchOptions, run_batch

__all__ = ["main"]


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
