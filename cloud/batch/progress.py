"""Progress of a run: a tqdm bar on a terminal, a throughput/ETA line elsewhere."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

__all__ = ["Progress"]


# --- progress -----------------------------------------------------------------------------------


class Progress:
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
