"""Stage-by-stage progress and a time limit for long compactions."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator, Optional, TextIO

from .errors import CompactionError

__all__ = ["Progress"]


class Progress:
    """Says what each stage took once a compaction has run for ``after_s`` seconds, and stops it past ``time_limit``.

    Args:
        enabled: ``True`` always prints, ``False`` never, ``None`` prints once the run has taken ``after_s``.
        time_limit: seconds; :meth:`check` raises :class:`CompactionError` once they have passed.
        stream: where lines go (standard error by default).
    """

    def __init__(self, enabled: Optional[bool] = None, time_limit: Optional[float] = None,
                 stream: Optional[TextIO] = None, after_s: float = 2.0) -> None:
        if time_limit is not None and not (isinstance(time_limit, (int, float)) and time_limit > 0):
            raise ValueError(f"time_limit={time_limit!r} should be a positive number of seconds or None")
        self.enabled, self.time_limit, self.after_s = enabled, time_limit, after_s
        self.stream = stream
        self.start = time.perf_counter()
        self.current = "starting"

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def check(self) -> None:
        """Raise if the time limit has passed (called between stages and inside long loops)."""
        if self.time_limit is not None and self.elapsed() > self.time_limit:
            raise CompactionError(
                f"compaction stopped after {self.elapsed():.1f} s while {self.current} "
                f"(time_limit={self.time_limit:g} s); raise time_limit, or pass a smaller example input"
            )

    @contextlib.contextmanager
    def stage(self, what: str) -> Iterator[None]:
        """Run one stage: check the limit before, report its time after (when reporting)."""
        self.current = what
        self.check()
        t0 = time.perf_counter()
        yield
        took = time.perf_counter() - t0
        if self.enabled or (self.enabled is None and self.elapsed() >= self.after_s):
            print(f"compactor: {what}: {took:.1f} s (total {self.elapsed():.1f} s)",
                  file=self.stream or sys.stderr, flush=True)
        self.check()
