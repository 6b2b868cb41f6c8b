"""Latency measurement shared by the demo, the CLI and benchmarks/: warm-up, interleaved, medians."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

import torch

__all__ = ["Timing", "measure", "torch_threads"]


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median, 25th and 75th percentile over repeats."""

    median: float
    p25: float
    p75: float
    repeats: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.p75 - self.p25) / self.median if self.median else 0.0


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) < 4:
        m = statistics.median(xs)
        return m, xs[0], xs[-1]
    q = statistics.quantiles(xs, n=4)
    return q[1], q[0], q[2]


def measure(
    fns: Mapping[str, Callable[[], object]],
    *,
    repeats: int = 30,
    inner: Optional[int] = None,
    warmup: int = 3,
    cuda: bool = False,
    target_s: float = 0.002,
) -> dict[str, Timing]:
    """Time each callable, interleaving them repeat by repeat so drift hits all alike.

    Each repeat times ``inner`` calls back to back (chosen so one repeat takes about
    ``target_s``) and records the mean per call.
    """
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    if inner is None:
        t0 = time.perf_counter()
        for fn in fns.values():
            fn()
        sync()
        one = max((time.perf_counter() - t0) / max(len(fns), 1), 1e-7)
        inner = max(1, min(1000, int(target_s / one)))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            sync()
            samples[k].append((time.perf_counter() - t0) / inner)
    out = {}
    for k, xs in samples.items():
        m, lo, hi = _quantiles(xs)
        out[k] = Timing(m, lo, hi, repeats)
    return out


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(n)``, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
