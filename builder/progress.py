"""Progress for long work: a redrawn bar on a terminal, a few plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from builder.supervisor.common import human_bytes  # one formatter for host and image


class Progress:
    """Report `done` of `total` bytes for `label`.

    On a terminal the line is redrawn at most ten times a second; elsewhere
    only the start and the end are printed, so logs stay line-oriented.
    """

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None, start: int = 0):
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.done = start
        self._last = 0.0
        self._began = time.monotonic()
        size = f" ({human_bytes(total)})" if total else ""
        resumed = f", resuming at {human_bytes(start)}" if start else ""
        if not self.tty:
            print(f"{label}: started{size}{resumed}", file=self.stream, flush=True)

    def advance(self, count: int) -> None:
        self.done += count
        if not self.tty:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        if self.total:
            share = min(1.0, self.done / self.total)
            bar = "#" * int(share * 30)
            text = f"\r{self.label} [{bar:<30}] {share * 100:5.1f}% {human_bytes(self.done)}/{human_bytes(self.total)}"
        else:
            text = f"\r{self.label} {human_bytes(self.done)}"
        self.stream.write(text)
        self.stream.flush()

    def finish(self, note: str = "done") -> None:
        seconds = time.monotonic() - self._began
        line = f"{self.label}: {note} ({human_bytes(self.done)} in {seconds:.1f} s)"
        if self.tty:
            self.stream.write("\r\033[K" + line + "\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
