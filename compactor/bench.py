"""Benchmark cases: build a model, prune it like a scenario says, compact it, check it, time it.

One case is (model, scenario, backend, batch). :func:`prepare` builds every variant of a
(model, scenario) once - ``dense`` (never pruned), ``masked`` (live
``torch.nn.utils.prune`` hooks), ``masked-baked`` (``prune.remove``: same shapes, zeros
inside), ``compact`` (``mode="exact"``), ``compact-drop`` (``mode="drop"``) and
``compact-round8`` (``round_to=8``) - and :func:`time_case` first checks them (compact
against masked, ONNX against torch, with :func:`compactor.verify.compare`) and then times
them interleaved with :func:`compactor.timing.measure`, one row per variant.
:func:`run_case` does both for one case and is what ``compactor bench`` calls;
``benchmarks/`` drives sweeps of it. Nothing here imports matplotlib.

Example:
    >>> from compactor import bench
    >>> rows = bench.run_case("lenet", "seeds-50", "torch-cpu-1t", 2, repeats=3, progress=None, variants=["compact"])
    >>> [r["variant"] for r in rows]
    ['dense', 'masked', 'compact']
    >>> rows[2]["params"], rows[2]["macs"], rows[2]["check_max_abs_diff"] <= rows[2]["check_tolerance"]
    (15306, 59328, True)
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from . import export, masks, timing, verify
from .api import compact
from .errors import ExportError, VerificationError
from .tensors import first_line, random_like
from .timing import torch_threads
from .verify import full_precision

__all__ = [
    "MODELS",
    "VARIANTS",
    "BACKENDS",
    "CHECK_RTOL",
    "ONNX_RTOL",
    "Prepared",
    "default_scenario",
    "parse_scenario",
    "build_dense",
    "apply_scenario",
    "prepare",
    "available_backends",
    "time_case",
    "run_case",
    "count_macs_per_sample",
    "make_inputs",
    "torch_threads",
    "backend_threads",
    "export_onnx",
    "progress_bar",
]

MODELS = ("lenet", "resnet50", "vit")
VARIANTS = ("dense", "masked", "masked-baked", "compact", "compact-drop", "compact-round8")
BACKENDS = ("torch-cpu-1t", "torch-cpu", "ort-cpu-1t", "ort-cpu", "torch-cuda", "torch-cuda-compile", "ort-cuda")

#: compact vs masked may differ by at most this times the output scale (max |masked|);
#: 10x compactor.verify's own bound, since benchmark inputs, batch sizes, thread counts
#: and backends differ from the ones compact() verified on.
CHECK_RTOL = 1e-4
#: onnxruntime vs torch (same variant): fused / reordered fp32 kernels, relative to the output scale.
ONNX_RTOL = verify.RUNTIME_RELATIVE_TOLERANCE

Progress = Optional[Callable[[int, int, str], None]]


# --------------------------------------------------------------------------- progress


def progress_bar(done: int, total: int, label: str = "", *, width: int = 24, stream: Any = None) -> None:
    """Print ``[######..........] 3/8 label`` on one line, ending it when ``done == total``."""
    stream = stream or sys.stderr
    total = max(total, 1)
    n = int(width * min(done, total) / total)
    end = "\n" if done >= total else ""
    print(f"\r[{'#' * n}{'.' * (width - n)}] {done}/{total} {label}"[:160].ljust(100), end=end, file=stream, flush=True)


# --------------------------------------------------------------------------- models and scenarios


class ViTBench(nn.Module):
    """A ViT-S/16-style encoder built from the zoo's :class:`~compactor.testing.zoo.ViTBlock`:
    16x16 patch-embedding conv, ``depth`` pre-norm blocks (dim 384, 6 heads, MLP x4),
    final LayerNorm, mean over tokens, Linear head. 3x224x224 input (196 tokens)."""

    def __init__(self, dim: int = 384, depth: int = 4, heads: int = 6, mlp_ratio: int = 4,
                 patch: int = 16, classes: int = 1000) -> None:
        super().__init__()
        from .testing.zoo import ViTBlock

        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(1))


_SCENARIO_KINDS = {
    "lenet": ("seeds",),
    "resnet50": ("bottleneck-inner", "all"),
    "vit": ("mlp",),
}


def default_scenario(model_name: str) -> str:
    """The first scenario of ``model_name`` at 50 %, e.g. ``"seeds-50"``."""
    _check_model(model_name)
    return f"{_SCENARIO_KINDS[model_name][0]}-50"


def _check_model(model_name: str) -> None:
    if model_name not in MODELS:
        raise ValueError(f"model={model_name!r} should be one of {', '.join(MODELS)}")


def parse_scenario(model_name: str, scenario: str) -> tuple[str, float]:
    """``"bottleneck-inner-50"`` -> ``("bottleneck-inner", 0.5)``; checks it fits ``model_name``.

    Scenarios: lenet ``seeds-<pct>`` (the seeds' ``prune_like_the_seeds``); resnet50
    ``bottleneck-inner-<pct>`` (ln_structured on conv1 and conv2 of every Bottleneck) and
    ``all-<pct>`` (every group, residual streams included, masks consistent per stage);
    vit ``mlp-<pct>`` (ln_structured on fc1 of every block: the MLP hidden channels).
    """
    _check_model(model_name)
    m = re.fullmatch(r"([a-z-]+?)-(\d{1,2})", scenario or "")
    kinds = _SCENARIO_KINDS[model_name]
    if not m or m.group(1) not in kinds or not 0 < int(m.group(2)) < 100:
        raise ValueError(
            f"scenario={scenario!r} does not fit model {model_name!r}; use one of "
            f"{', '.join(k + '-<percent 1..99>' for k in kinds)}, e.g. {kinds[0]}-50"
        )
    return m.group(1), int(m.group(2)) / 100


def build_dense(model_name: str, *, small: bool = False, vit_depth: int = 4, seed: int = 0) -> tuple[nn.Module, tuple[int, ...], str]:
    """The unpruned model (eval mode, deterministic weights), its per-sample input shape and where it came from.

    ``small`` gives the tiny sizes the smoke tests use (the zoo's ``resnet50`` at width
    1/16 and 64x64 input; a 1-block, dim-32 ViT at 32x32).
    """
    from .demo import LeNet
    from .testing import zoo

    _check_model(model_name)
    torch.manual_seed(seed)
    if model_name == "lenet":
        return LeNet().eval(), (1, 28, 28), "compactor.demo.LeNet (the seeds' LeNet)"
    if model_name == "resnet50":
        if small:
            return zoo.build("resnet50")[0].eval(), (3, 64, 64), "compactor.testing.zoo resnet50_like(1/16)"
        try:
            import torchvision  # noqa: F401

            model = torchvision.models.resnet50(weights=None)
            source = f"torchvision.models.resnet50 (torchvision {torchvision.__version__})"
        except Exception:
            model = zoo.resnet50_like(1.0)
            source = "compactor.testing.zoo.resnet50_like(1.0)"
        zoo.randomize_(model)
        return model.eval(), (3, 224, 224), source
    if small:
        model = ViTBench(dim=32, depth=1, heads=2, mlp_ratio=4, patch=8, classes=10)
        zoo.randomize_(model)
        return model.eval(), (3, 32, 32), "ViTBench(dim=32, depth=1) from zoo.ViTBlock"
    model = ViTBench(depth=vit_depth)
    zoo.randomize_(model)
    return model.eval(), (3, 224, 224), f"ViTBench(dim=384, heads=6, mlp x4, depth={vit_depth}) from zoo.ViTBlock"


def _row_mask(conv: nn.Module, keep: torch.Tensor) -> torch.Tensor:
    w = conv.weight
    return keep.to(w.dtype).view(-1, *([1] * (w.dim() - 1))).expand_as(w).clone()


def _bottlenecks(stage: nn.Module) -> list[nn.Module]:
    return [b for b in stage if all(hasattr(b, a) for a in ("conv1", "conv2", "conv3"))]


def apply_scenario(model: nn.Module, model_name: str, scenario: str) -> nn.Module:
    """Prune ``model`` in place as ``scenario`` says (see :func:`parse_scenario`); returns it."""
    kind, amount = parse_scenario(model_name, scenario)
    if kind == "seeds":
        from .demo import prune_like_the_seeds

        return prune_like_the_seeds(model, amount)
    if kind == "mlp":
        for block in model.blocks:
            prune.ln_structured(block.fc1, "weight", amount=amount, n=2, dim=0)
        return model
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    for stage in stages:
        for b in _bottlenecks(stage):
            prune.ln_structured(b.conv1, "weight", amount=amount, n=2, dim=0)
            prune.ln_structured(b.conv2, "weight", amount=amount, n=2, dim=0)
    if kind == "all":
        prune.ln_structured(model.conv1, "weight", amount=amount, n=2, dim=0)
        for stage in stages:
            # One channel set per residual stream, masked in every conv that writes into it.
            writers = [b.conv3 for b in _bottlenecks(stage)]
            down = getattr(stage[0], "downsample", None)
            if down is not None:
                writers.append(down[0])
            score = sum(w.weight.detach().flatten(1).norm(dim=1) for w in writers)
            n_drop = int(round(amount * score.numel()))
            keep = torch.ones(score.numel())
            keep[torch.argsort(score)[:n_drop]] = 0
            for w in writers:
                prune.custom_from_mask(w, "weight", _row_mask(w, keep))
    return model


# --------------------------------------------------------------------------- measuring models


@contextlib.contextmanager
def _mha_slow_path() -> Iterator[None]:
    """Run nn.MultiheadAttention through its decomposed path so its matmuls are visible."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def count_macs_per_sample(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates per sample of every matmul, conv and attention op (torch's FlopCounterMode / 2).

    Unlike :func:`compactor.probe.count_macs` (conv and Linear modules only) this also
    sees attention and ``nn.MultiheadAttention``'s projections.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if not any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        from .probe import count_macs  # module hooks: much faster, and the same count without attention

        return int(sum(count_macs(model, (x,)).values()))
    with _mha_slow_path(), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(round(counter.get_total_flops() / 2 / x.shape[0]))


def _params(model: nn.Module) -> int:
    """Parameters a deployment stores: for a masked model, its ``*_orig`` tensors (masks are buffers)."""
    return sum(p.numel() for p in model.parameters())


def make_inputs(shape: tuple[int, ...], batch: int, seed: int = 1234) -> torch.Tensor:
    """Deterministic N(0, 1) inputs of ``(batch, *shape)``; the same batch size gives the same tensor."""
    return random_like((torch.zeros((1, *shape)),), batch=batch, seed=seed + batch)[0]


@dataclass
class Prepared:
    """Every variant of one (model, scenario), built, compacted and verified once."""

    model_name: str
    scenario: str
    sparsity: float
    small: bool
    source: str
    input_shape: tuple[int, ...]
    variants: dict[str, nn.Module]
    macs: dict[str, int]
    params: dict[str, int]
    compact_s: dict[str, float]
    reports: dict[str, Any]
    onnx: dict[str, str] = field(default_factory=dict)
    onnx_s: dict[str, float] = field(default_factory=dict)
    exporter: Optional[str] = None
    _tmp: Optional[tempfile.TemporaryDirectory] = None

    def onnx_path(self, variant: str) -> str:
        """Export ``variant`` to ONNX once (opset 17, dynamic batch axis); return the file path."""
        if variant not in self.onnx:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="compactor-bench-")
            path = os.path.join(self._tmp.name, f"{self.model_name}-{self.scenario}-{variant}.onnx")
            t0 = time.perf_counter()
            self.exporter = export_onnx(self.variants[variant], make_inputs(self.input_shape, 2), path)
            self.onnx_s[variant] = time.perf_counter() - t0
            self.onnx[variant] = path
        return self.onnx[variant]


def export_onnx(model: nn.Module, example: torch.Tensor, path: str) -> str:
    """ONNX export, opset 17, dynamic batch axis; returns which exporter wrote ``path``.

    Uses :func:`compactor.export_onnx` (which also checks onnxruntime against torch);
    if that fails, falls back to ``torch.onnx.export(..., dynamo=False, opset_version=17)``,
    which checks nothing: :func:`time_case` compares every ONNX model's outputs with
    torch's before timing it, whichever path wrote the file.
    """
    try:
        report = export.export_onnx(model, example, path, opset=17, force=True)
        return f"compactor.export_onnx ({report.exporter})"
    except ExportError as exc:
        reason = first_line(exc)
    model = model.eval()
    with torch.no_grad(), open(os.devnull, "w") as null, contextlib.redirect_stdout(null), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's deprecation and TracerWarnings
        torch.onnx.export(
            model, (example,), path, dynamo=False, opset_version=17, do_constant_folding=True,
            input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    return f"torch.onnx.export (dynamo=False; compactor.export_onnx failed: {reason})"


def prepare(model_name: str, scenario: Optional[str] = None, *, small: bool = False,
            variants: Sequence[str] = VARIANTS, vit_depth: int = 4, progress: Progress = None) -> Prepared:
    """Build the dense model, prune a copy as ``scenario`` says, and build the other variants.

    Each compact variant is built by :func:`compactor.compact` with ``verify=True``
    (it raises if the compact model differs from the masked one).
    """
    scenario = scenario or default_scenario(model_name)
    _, amount = parse_scenario(model_name, scenario)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    dense, shape, source = build_dense(model_name, small=small, vit_depth=vit_depth)
    masked = apply_scenario(masks.clone(dense), model_name, scenario).eval()
    example = make_inputs(shape, 2, seed=99)
    out: dict[str, nn.Module] = {}
    compact_s: dict[str, float] = {}
    reports: dict[str, Any] = {}
    todo = list(dict.fromkeys(["dense", "masked", *variants]))
    for i, v in enumerate(todo):
        if progress:
            progress(i, len(todo), f"{model_name} {scenario}: building {v}")
        if v == "dense":
            out[v] = dense
        elif v == "masked":
            out[v] = masked
        elif v == "masked-baked":
            out[v] = masks.bake(masked).eval()
        else:
            kw = {"compact": {}, "compact-drop": {"mode": "drop"}, "compact-round8": {"round_to": 8}}[v]
            t0 = time.perf_counter()
            out[v] = compact(masked, example, **kw)
            compact_s[v] = time.perf_counter() - t0
            reports[v] = out[v].compaction_report
    if progress:
        progress(len(todo), len(todo), f"{model_name} {scenario}: built {len(todo)} variants")
    x = make_inputs(shape, 1)
    macs = {v: count_macs_per_sample(m, x) for v, m in out.items() if v not in ("masked", "masked-baked")}
    macs.update({v: macs["dense"] for v in ("masked", "masked-baked") if v in out})  # same shapes, same work
    params = {v: _params(m) for v, m in out.items()}
    return Prepared(model_name, scenario, amount, small, source, shape, out, macs, params, compact_s, reports)


# --------------------------------------------------------------------------- backends


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return ort


def available_backends() -> list[str]:
    """The backends this machine can run: torch CPU always; onnxruntime and CUDA where present."""
    out = ["torch-cpu-1t", "torch-cpu"]
    ort = _ort()
    if ort is not None:
        out += ["ort-cpu-1t", "ort-cpu"]
    if torch.cuda.is_available():
        out += ["torch-cuda", "torch-cuda-compile"]
        if ort is not None and "CUDAExecutionProvider" in ort.get_available_providers():
            out.append("ort-cuda")
    return out


def _cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def backend_threads(backend: str) -> int:
    """Threads a backend runs with: 1 for ``*-1t``, every CPU this process may use for the others."""
    if backend.endswith("-1t"):
        return 1
    if "cuda" in backend:
        return torch.get_num_threads()
    return _cpu_threads()


def _ort_session(path: str, backend: str):
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = backend_threads(backend) if backend.startswith("ort-cpu") else 0
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if backend == "ort-cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(path, so, providers=providers)


def _assert_agree(got: torch.Tensor, ref: torch.Tensor, rel: float, what: str) -> tuple[float, float]:
    """(max |got - ref|, tolerance) by :func:`compactor.verify.compare`; AssertionError when they differ."""
    try:
        result = verify.compare([ref], [got], rel=rel)
    except VerificationError as exc:  # another shape
        raise AssertionError(f"{what}: {first_line(exc)}") from None
    if not result.ok:
        raise AssertionError(f"{what}: max |diff| {result.max_abs_diff:.3g} > tolerance {result.tolerance:.3g} "
                             f"(output scale {result.scale:.3g})")
    return result.max_abs_diff, result.tolerance


_CHECKED_AGAINST = {
    "masked-baked": "masked",
    "compact": "masked",
    "compact-round8": "masked",
    "compact-drop": "masked with dropped constants zeroed (compact()'s own check)",
}


def time_case(prep: Prepared, backend: str, batch: int, *, repeats: int = 20, variants: Optional[Sequence[str]] = None,
              warmup: Optional[int] = None, target_s: float = 0.01, progress: Progress = None) -> list[dict]:
    """Check, then time every variant of ``prep`` on ``backend`` at ``batch``, interleaved.

    Before timing: compact / compact-round8 / masked-baked against masked
    (:func:`compactor.verify.compare`, ``CHECK_RTOL`` x output scale) on this
    backend's device at this batch; for onnxruntime also each ONNX model against its
    torch original (``ONNX_RTOL``), whichever path exported it (see :func:`export_onnx`).
    Returns one row per variant (see ``benchmarks/README.md``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} should be one of {', '.join(BACKENDS)}")
    if backend not in available_backends():
        raise ValueError(f"backend {backend!r} is not available here; available: {', '.join(available_backends())}")
    names = [v for v in (variants or prep.variants) if v in prep.variants]
    cuda = "cuda" in backend
    device = "cuda" if cuda else "cpu"
    threads = backend_threads(backend)
    x_cpu = make_inputs(prep.input_shape, batch)
    steps = len(names) + 2
    say = progress or (lambda *a: None)
    label = f"{prep.model_name} {prep.scenario} {backend} b{batch}"

    cpu_out: dict[str, torch.Tensor] = {}
    if backend.startswith("ort"):  # torch CPU outputs: what each ONNX model must reproduce
        with torch.inference_mode():
            cpu_out = {v: prep.variants[v](x_cpu) for v in dict.fromkeys(["masked", *names]) if v in prep.variants}
    checks: dict[str, dict[str, Any]] = {}
    fns: dict[str, Callable[[], object]] = {}
    onnx_bytes: dict[str, int] = {}
    onnx_check: dict[str, tuple[float, float]] = {}
    keep_alive: list[Any] = []

    if backend.startswith("torch"):
        mods = {v: (prep.variants[v].to(device) if cuda else prep.variants[v]) for v in names}
        x = x_cpu.to(device)
        with torch.inference_mode(), full_precision(), torch_threads(threads):
            outs = {v: mods[v](x) for v in names if v != "dense"}
        if "masked" in outs:
            for v in names:
                if v in ("compact", "compact-round8", "masked-baked"):
                    diff, tol = _assert_agree(outs[v], outs["masked"], CHECK_RTOL, f"{label}: {v} vs masked")
                    checks[v] = {"check_ref": "masked", "check_max_abs_diff": diff, "check_tolerance": tol}
        if backend == "torch-cuda-compile":
            for i, v in enumerate(names):
                say(i, steps, f"{label}: torch.compile {v}")
                mods[v] = torch.compile(mods[v])
        for v in names:
            m = mods[v]
            fns[v] = (lambda m=m: m(x))
    else:
        for i, v in enumerate(names):
            say(i, steps, f"{label}: ONNX export + check {v}")
            path = prep.onnx_path(v)
            onnx_bytes[v] = os.path.getsize(path)
            sess = _ort_session(path, backend)
            feed_name = sess.get_inputs()[0].name
            got = torch.from_numpy(sess.run(None, {feed_name: x_cpu.numpy()})[0])
            onnx_check[v] = _assert_agree(got, cpu_out[v], ONNX_RTOL, f"{label}: ONNX {v} vs torch")
            if v in ("compact", "compact-round8", "masked-baked"):
                diff, tol = _assert_agree(got, cpu_out["masked"], CHECK_RTOL + ONNX_RTOL, f"{label}: ONNX {v} vs masked")
                checks[v] = {"check_ref": "masked", "check_max_abs_diff": diff, "check_tolerance": tol}
            if cuda:
                xt = x_cpu.to("cuda")
                binding = sess.io_binding()
                binding.bind_input(feed_name, "cuda", 0, _np_dtype(), tuple(xt.shape), xt.data_ptr())
                binding.bind_output(sess.get_outputs()[0].name, "cuda")
                keep_alive += [xt, binding]
                fns[v] = (lambda s=sess, b=binding: s.run_with_iobinding(b))
            else:
                feed = {feed_name: x_cpu.numpy()}
                fns[v] = (lambda s=sess, f=feed: s.run(None, f))
            keep_alive.append(sess)
    for v in names:
        if v == "compact-drop" and v in prep.reports:
            r = prep.reports[v]
            checks[v] = {"check_ref": _CHECKED_AGAINST[v], "check_max_abs_diff": r.max_abs_diff,
                         "check_tolerance": r.tolerance}

    say(len(names), steps, f"{label}: timing {len(names)} variants x {repeats} repeats")
    slow = (prep.macs.get("dense", 0) * batch) > 2e8
    w = warmup if warmup is not None else (1 if slow and not cuda else 3)
    ctx = torch_threads(threads) if backend.startswith("torch") else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        t = timing.measure(fns, repeats=repeats, warmup=w, cuda=cuda, target_s=target_s)
    del keep_alive
    if cuda:
        for v in names:
            prep.variants[v].to("cpu")
        torch.cuda.empty_cache()
    say(steps, steps, f"{label}: done")
    return _rows(prep, backend, batch, threads, names, t, checks, onnx_bytes, onnx_check)


def _np_dtype():
    import numpy as np

    return np.float32


def _rows(prep: Prepared, backend: str, batch: int, threads: int, names: list[str], t: dict[str, timing.Timing],
          checks: dict, onnx_bytes: dict, onnx_check: dict) -> list[dict]:
    rows = []
    for v in names:
        tm = t[v]
        row: dict[str, Any] = {
            "model": prep.model_name,
            "scenario": prep.scenario,
            "sparsity": prep.sparsity,
            "backend": backend,
            "threads": threads,
            "batch": batch,
            "variant": v,
            "median_s": tm.median,
            "p25_s": tm.p25,
            "p75_s": tm.p75,
            "spread": tm.spread,
            "repeats": tm.repeats,
            "throughput": batch / tm.median if tm.median else None,
            "params": prep.params.get(v),
            "macs": prep.macs.get(v),
            "onnx_bytes": onnx_bytes.get(v),
            "compact_s": prep.compact_s.get(v),
            "check_ref": None,
            "check_max_abs_diff": None,
            "check_tolerance": None,
            "onnx_max_abs_diff": onnx_check[v][0] if v in onnx_check else None,
            "onnx_tolerance": onnx_check[v][1] if v in onnx_check else None,
        }
        row.update(checks.get(v, {}))
        for ref in ("masked", "dense"):
            row[f"speedup_vs_{ref}"] = t[ref].median / tm.median if ref in t and tm.median else None
        dm, m = prep.macs.get("dense"), prep.macs.get(v)
        row["mac_ratio"] = dm / m if dm and m else None
        row["efficiency"] = (row["speedup_vs_dense"] / row["mac_ratio"]
                             if row["speedup_vs_dense"] and row["mac_ratio"] else None)
        rows.append(row)
    return rows


_CACHE: dict[tuple, Prepared] = {}


def run_case(model_name: str, scenario: Optional[str], backend: str, batch: int, repeats: int = 20, *,
             progress: Progress = progress_bar, small: bool = False, variants: Sequence[str] = VARIANTS) -> list[dict]:
    """Build (once per process, cached), check and time one case; return one row per variant.

    Args:
        model_name: ``"lenet"``, ``"resnet50"`` or ``"vit"``.
        scenario: e.g. ``"seeds-50"``, ``"bottleneck-inner-50"``, ``"all-50"``, ``"mlp-50"``;
            ``None`` for the model's default.
        backend: one of :data:`BACKENDS` that :func:`available_backends` lists.
        batch: samples per forward.
        repeats: timed repeats per variant (medians and quartiles over these).
        progress: called as ``progress(done, total, label)``; :func:`progress_bar` prints
            a text bar to stderr, ``None`` is silent.
        small: tiny model sizes (seconds, for tests).
        variants: which of :data:`VARIANTS` to build and time (``dense`` and ``masked``
            are always built: speedups are measured against them).

    Returns:
        One dict per variant: latency (``median_s``, ``p25_s``, ``p75_s``, ``spread``),
        ``throughput``, ``params``, ``macs``, speedups, ``efficiency`` and the checks.

    Raises:
        ValueError: unknown model, scenario, backend or variant, or a backend this machine lacks.
        AssertionError: a check failed (compact differs from masked, or ONNX from torch).
    """
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} should be a positive integer")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} should be a positive integer")
    if backend not in available_backends():
        raise ValueError(f"backend={backend!r} is not available here; available: {', '.join(available_backends())}")
    scenario = scenario or default_scenario(model_name)
    parse_scenario(model_name, scenario)
    wanted = list(dict.fromkeys(["dense", "masked", *variants]))
    key = (model_name, scenario, small, tuple(wanted))
    prep = _CACHE.get(key)
    if prep is None:
        if len(_CACHE) >= 2:
            _CACHE.pop(next(iter(_CACHE)))
        prep = _CACHE[key] = prepare(model_name, scenario, small=small, variants=wanted, progress=progress)
    return time_case(prep, backend, batch, repeats=repeats, progress=progress)
