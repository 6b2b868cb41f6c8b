"""Latency measurement shared by the demo, the CLI and benchmarks/: warm-up, interleaved, medians; and the
machine a measurement ran on."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

__all__ = ["Timing", "measure", "torch_threads", "cpu_threads", "machine_info"]


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


def cpu_threads() -> int:
    """The CPUs this process may run on (its affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    """CPU model and cores, torch / onnx / onnxruntime versions, threads, GPU name if any."""
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_cores": cpu_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": getattr(ort, "__version__", None),
        "ort_providers": ort.get_available_providers() if ort else [],
        "gpu": None,
    }
    try:
        import onnx

        info["onnx"] = onnx.__version__
    except ImportError:
        info["onnx"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
        info["matmul_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info
