"""Benchmark cases: build a model, prune it like a scenario says, compact it, check it, time it.

One case is (model, scenario, backend, batch). :func:`prepare` builds every variant of a
(model, scenario) once - ``dense`` (never pruned), ``masked`` (live
``torch.nn.utils.prune`` hooks), ``masked-baked`` (``prune.remove``: same shapes, zeros
inside), ``native`` (the same architecture *designed* at the compact widths, fresh
weights: the yardstick for what those widths can run at), ``compact`` (``mode="exact"``),
``compact-drop`` (``mode="drop"``) and ``compact-round8`` (``round_to=8``) - and
:func:`time_case` first checks them (compact against masked, ONNX against torch, each
runtime's outputs against masked in that runtime, with :func:`compactor.verify.compare`;
native's layer shapes against compact's) and then times them interleaved with
:func:`compactor.timing.measure`, one row per variant. :func:`prepare_models` does the
same for any (dense, masked) pair, e.g. a user's own model (``compactor bench --model
mypkg.nets:Net``), and :func:`time_backends` times them on several backends, skipping
one that cannot run the model. :func:`run_case` does both for one built-in case and is
what ``compactor bench --model lenet`` calls; ``benchmarks/`` drives sweeps of it. The
models are the zoo's (:mod:`compactor.testing.zoo`, torchvision's ResNet-50 where it
imports); :func:`case_table`, :func:`summary` and :func:`verdict` are what ``compactor
bench`` prints. Nothing here imports matplotlib.

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
import copy
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from . import export, masks, timing, verify
from .api import compact
from .errors import CompactionError, ExportError, VerificationError
from .tensors import first_line, random_like
from .testing import zoo
from .timing import cpu_threads, torch_threads
from .verify import full_precision

__all__ = [
    "MODELS",
    "VARIANTS",
    "BACKENDS",
    "CHECK_RTOL",
    "ONNX_RTOL",
    "Backend",
    "RuntimeMismatch",
    "Prepared",
    "default_scenario",
    "parse_scenario",
    "build_dense",
    "build_native",
    "apply_scenario",
    "layer_shapes",
    "prepare",
    "prepare_models",
    "available_backends",
    "backend_spec",
    "time_case",
    "time_backends",
    "run_case",
    "fastest",
    "verdict",
    "case_table",
    "summary",
    "count_macs_per_sample",
    "make_inputs",
    "backend_threads",
    "export_onnx",
    "progress_bar",
]

MODELS = ("lenet", "resnet50", "vit")
VARIANTS = ("dense", "masked", "masked-baked", "native", "compact", "compact-layers", "compact-drop", "compact-round8")

#: compact vs masked may differ by at most this times the output scale (max |masked|);
#: 10x compactor.verify's own bound, since benchmark inputs, batch sizes, thread counts
#: and backends differ from the ones compact() verified on. fp16 / bf16 runtimes get
#: verify's floor of 16 ulps of their dtype.
CHECK_RTOL = 1e-4
#: onnxruntime vs torch (same variant): fused / reordered fp32 kernels, relative to the output scale.
ONNX_RTOL = verify.RUNTIME_RELATIVE_TOLERANCE

Progress = Optional[Callable[[int, int, str], None]]


@dataclass(frozen=True)
class Backend:
    """How a backend runs a model: engine, device, threads, dtype, memory format, graph capture, compiler."""

    name: str
    engine: str  # "torch" or "ort"
    device: str  # "cpu" or "cuda"
    label: str
    one_thread: bool = False
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    cuda_graph: bool = False  # the forward captured once into a CUDA graph and replayed
    compiled: bool = False  # torch.compile(mode="reduce-overhead") with inductor freezing

    @property
    def converts(self) -> bool:
        """True when the runtime needs its own copy of each model (another dtype or memory format)."""
        return self.dtype is not torch.float32 or self.channels_last


_LOW = {"dtype": torch.float16, "channels_last": True}
_BACKENDS = {b.name: b for b in (
    Backend("torch-cpu-1t", "torch", "cpu", "torch eager CPU, 1 thread", one_thread=True),
    Backend("torch-cpu", "torch", "cpu", "torch eager CPU, all threads"),
    Backend("ort-cpu-1t", "ort", "cpu", "onnxruntime CPU, 1 thread", one_thread=True),
    Backend("ort-cpu", "ort", "cpu", "onnxruntime CPU, all threads"),
    Backend("torch-cuda", "torch", "cuda", "torch eager CUDA fp32 (TF32 convs)"),
    Backend("torch-cuda-fp16", "torch", "cuda", "torch eager CUDA fp16 channels_last", **_LOW),
    Backend("torch-cuda-bf16", "torch", "cuda", "torch eager CUDA bf16 channels_last", dtype=torch.bfloat16,
            channels_last=True),
    Backend("torch-cuda-graph", "torch", "cuda", "CUDA graph fp16 channels_last", cuda_graph=True, **_LOW),
    Backend("torch-cuda-compile", "torch", "cuda",
            "torch.compile reduce-overhead + inductor freezing, fp16 channels_last", compiled=True, **_LOW),
    Backend("ort-cuda", "ort", "cuda", "onnxruntime CUDA"),
)}
BACKENDS = tuple(_BACKENDS)


def backend_spec(backend: str) -> Backend:
    """The :class:`Backend` named ``backend``; ValueError naming the valid ones otherwise."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} should be one of {', '.join(BACKENDS)}")
    return _BACKENDS[backend]


# --------------------------------------------------------------------------- progress


def progress_bar(done: int, total: int, label: str = "", *, width: int = 24, stream: Any = None) -> None:
    """Print ``[######..........] 3/8 label`` on one line, ending it when ``done == total``."""
    stream = stream or sys.stderr
    total = max(total, 1)
    n = int(width * min(done, total) / total)
    end = "\n" if done >= total else ""
    print(f"\r[{'#' * n}{'.' * (width - n)}] {done}/{total} {label}"[:160].ljust(100), end=end, file=stream, flush=True)


# --------------------------------------------------------------------------- scenarios and their models


def _kept(n: int, amount: float) -> int:
    """Channels ``prune.ln_structured(amount=amount)`` leaves of ``n`` (it prunes round(amount * n))."""
    return n - int(round(amount * n))


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
    _check_model(model_name)
    torch.manual_seed(seed)
    if model_name == "lenet":
        return zoo.LeNet().eval(), (1, 28, 28), "compactor.demo.LeNet (the seeds' LeNet)"
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
    model, shape, source = _vit(small, vit_depth)
    zoo.randomize_(model)
    return model.eval(), shape, source


def _vit(small: bool, depth: int, mlp_hidden: Optional[int] = None) -> tuple[nn.Module, tuple[int, ...], str]:
    """The zoo's ViTSmall at the benchmark's sizes (ViT-S/16 style, or the tiny one), its input shape, its name."""
    if small:
        model = zoo.ViTSmall(10, 32, 2, 8, depth=1, mlp_ratio=4, mlp_hidden=mlp_hidden)
        return model, (3, 32, 32), "compactor.testing.zoo.ViTSmall(dim=32, depth=1)"
    model = zoo.ViTSmall(1000, 384, 6, 16, depth=depth, mlp_ratio=4, mlp_hidden=mlp_hidden)
    return model, (3, 224, 224), f"compactor.testing.zoo.ViTSmall(dim=384, heads=6, mlp x4, depth={depth})"


def build_native(model_name: str, scenario: Optional[str] = None, *, small: bool = False, vit_depth: int = 4,
                 seed: int = 1) -> tuple[nn.Module, str]:
    """The same architecture *designed* at the widths ``scenario`` leaves, with fresh weights; and where it came from.

    What a model of those widths runs at, written by its own code rather than cut down:
    lenet ``seeds-<p>``: the zoo's ``LeNet(widths)`` at the kept widths; resnet50
    ``bottleneck-inner-<p>``: ``torchvision.models.resnet50(width_per_group=...)`` where
    :func:`build_dense` used torchvision, else the zoo's ResNet-50 with every Bottleneck's
    inner layers built at the kept width; resnet50 ``all-<p>``: the zoo's ResNet-50 at width
    ``1 - p`` (stem, residual streams and inner widths alike); vit ``mlp-<p>``: the zoo's
    ``ViTSmall`` with ``mlp_hidden`` at the kept width. :func:`prepare` checks that its
    parameters have the compact model's names and shapes.

    Raises:
        ValueError: no such model for this scenario (e.g. an MLP width that is not a multiple of dim).
    """
    scenario = scenario or default_scenario(model_name)
    kind, amount = parse_scenario(model_name, scenario)
    torch.manual_seed(seed)
    if kind == "seeds":
        widths = tuple(_kept(n, amount) for n in (6, 16, 120, 84))
        return zoo.LeNet(widths).eval(), f"LeNet(widths={widths})"
    if kind == "mlp":
        hidden = _kept((32 if small else 384) * 4, amount)
        model, _, _ = _vit(small, vit_depth, mlp_hidden=hidden)
        zoo.randomize_(model, seed)
        return model.eval(), f"ViTSmall(mlp_hidden={hidden})"
    width = 1 / 16 if small else 1.0
    if kind == "all":
        model = zoo.resnet50_like(width * (1 - amount))
        zoo.randomize_(model, seed)
        return model.eval(), f"compactor.testing.zoo.resnet50_like({width * (1 - amount):g})"
    if not small:
        try:
            import torchvision

            per_group = _kept(64, amount)
            model = torchvision.models.resnet50(weights=None, width_per_group=per_group)
            zoo.randomize_(model, seed)
            return model.eval(), f"torchvision.models.resnet50(width_per_group={per_group})"
        except ImportError:
            pass
    inner = [_kept(planes, amount) for planes in zoo.ResNet50Like.stage_widths(width)]
    model = zoo.ResNet50Like(width, inner_widths=inner)
    zoo.randomize_(model, seed)
    return model.eval(), f"compactor.testing.zoo.resnet50_like({width:g}), Bottleneck inner width x{1 - amount:g}"


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


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, e.g. ``{"conv1.weight": (3, 1, 3, 3), ...}``."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _shape_difference(native: nn.Module, other: nn.Module) -> Optional[str]:
    """None when ``native`` has ``other``'s parameter names and shapes; else the first difference, in words."""
    a, b = layer_shapes(native), layer_shapes(other)
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            return f"{name}: native {a.get(name, 'missing')}, compact {b.get(name, 'missing')}"
    return None


def make_inputs(shape: tuple[int, ...], batch: int, seed: int = 1234, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Deterministic inputs of ``(batch, *shape)``: N(0, 1) floats, 0/1 integers; the same batch size gives the same tensor."""
    return random_like((torch.zeros((1, *shape), dtype=dtype),), batch=batch, seed=seed + batch)[0]


@dataclass
class Prepared:
    """Every variant of one (model, scenario), built, compacted and verified once."""

    model_name: str
    scenario: str
    sparsity: Optional[float]
    small: bool
    source: str
    input_shape: tuple[int, ...]
    variants: dict[str, nn.Module]
    macs: dict[str, int]
    params: dict[str, int]
    compact_s: dict[str, float]
    reports: dict[str, Any]
    input_dtype: torch.dtype = torch.float32
    native_source: Optional[str] = None
    #: the compact variants whose parameter names and shapes ``native`` was checked to have
    native_checked: list[str] = field(default_factory=list)
    onnx: dict[str, str] = field(default_factory=dict)
    onnx_s: dict[str, float] = field(default_factory=dict)
    exporter: Optional[str] = None
    _tmp: Optional[tempfile.TemporaryDirectory] = None

    def inputs(self, batch: int, seed: int = 1234) -> torch.Tensor:
        """Deterministic inputs of this case at ``batch`` (see :func:`make_inputs`)."""
        return make_inputs(self.input_shape, batch, seed, self.input_dtype)

    def onnx_path(self, variant: str) -> str:
        """Export ``variant`` to ONNX once (opset 17, dynamic batch axis); return the file path."""
        if variant not in self.onnx:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="compactor-bench-")
            name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self.model_name}-{self.scenario}-{variant}")
            path = os.path.join(self._tmp.name, name + ".onnx")
            t0 = time.perf_counter()
            self.exporter = export_onnx(self.variants[variant], self.inputs(2), path)
            self.onnx_s[variant] = time.perf_counter() - t0
            self.onnx[variant] = path
        return self.onnx[variant]


def export_onnx(model: nn.Module, example: torch.Tensor, path: str) -> str:
    """ONNX export by :func:`compactor.export_onnx` (opset 17, dynamic batch axis, onnxruntime checked
    against torch at two batch sizes); returns which exporter wrote ``path``.

    Raises:
        ExportError: neither exporter wrote a file that onnxruntime runs as torch does.
    """
    # a failing exporter prints the whole Torch IR graph to stdout: the reason is in the exception
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        report = export.export_onnx(model, example, path, opset=17, force=True)
    return f"compactor.export_onnx ({report.exporter})"


def _compact_kwargs(variant: str) -> Optional[dict[str, Any]]:
    """compact()'s arguments for a compact variant (``compact-round<N>``: ``round_to=N``); None for the others."""
    if variant == "compact":
        return {}
    if variant == "compact-drop":
        return {"mode": "drop"}
    if variant == "compact-layers":
        return {"border": "layers"}
    m = re.fullmatch(r"compact-round([1-9]\d*)", variant)
    return {"round_to": int(m.group(1))} if m else None


def _check_variants(variants: Sequence[str]) -> None:
    unknown = [v for v in variants if v not in VARIANTS and _compact_kwargs(v) is None]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)} "
                         "(or compact-round<N> for round_to=N)")


def prepare(model_name: str, scenario: Optional[str] = None, *, small: bool = False,
            variants: Sequence[str] = VARIANTS, vit_depth: int = 4, progress: Progress = None) -> Prepared:
    """Build the dense model, prune a copy as ``scenario`` says, and build the other variants.

    Each compact variant is built by :func:`compactor.compact` with ``verify=True``
    (it raises if the compact model differs from the masked one); ``native`` by
    :func:`build_native`, checked to have the compact model's parameter names and shapes.
    """
    scenario = scenario or default_scenario(model_name)
    _, amount = parse_scenario(model_name, scenario)
    _check_variants(variants)
    dense, shape, source = build_dense(model_name, small=small, vit_depth=vit_depth)
    masked = apply_scenario(masks.clone(dense), model_name, scenario).eval()
    native = build_native(model_name, scenario, small=small, vit_depth=vit_depth) if "native" in variants else None
    return prepare_models(dense, masked, make_inputs(shape, 2, seed=99), model_name=model_name, scenario=scenario,
                          sparsity=amount, source=source, variants=variants, native=native, small=small,
                          progress=progress)


def prepare_models(dense: nn.Module, masked: nn.Module, example: torch.Tensor, *, model_name: str, scenario: str,
                   source: str, sparsity: Optional[float] = None, variants: Sequence[str] = VARIANTS,
                   native: Optional[tuple[nn.Module, str]] = None, small: bool = False,
                   progress: Progress = None) -> Prepared:
    """Build the variants of any (dense, masked) pair: :func:`prepare` for a user's own model.

    Args:
        dense: the model before masking (see :func:`compactor.masks.dense_from_masked`).
        masked: the same model with live ``torch.nn.utils.prune`` masks.
        example: an example input (batch first); the timed inputs are random tensors of its
            per-sample shape and dtype.
        model_name, scenario, source, sparsity: how rows and reports name the case.
        variants: which of :data:`VARIANTS` (or ``compact-round<N>``) to build; ``native``
            needs ``native``.
        native: (model, where it came from): the architecture designed at the compact widths.

    Raises:
        ValueError: an unknown variant, or ``native`` asked for without a model.
        AssertionError: ``native``'s parameters differ in name or shape from a compact variant's.
    """
    _check_variants(variants)
    if "native" in variants and native is None:
        raise ValueError("variant 'native' needs a native model (the architecture designed at the compact widths)")
    out: dict[str, nn.Module] = {}
    compact_s: dict[str, float] = {}
    reports: dict[str, Any] = {}
    todo = list(dict.fromkeys(["dense", "masked", *variants]))
    for i, v in enumerate(todo):
        if progress:
            progress(i, len(todo), f"{model_name} {scenario}: building {v}")
        if v == "dense":
            out[v] = dense.eval()
        elif v == "masked":
            out[v] = masked.eval()
        elif v == "masked-baked":
            out[v] = masks.bake(masked).eval()
        elif v == "native":
            out[v] = native[0].eval()
        else:
            t0 = time.perf_counter()
            out[v] = compact(masked, example, **_compact_kwargs(v))
            compact_s[v] = time.perf_counter() - t0
            reports[v] = out[v].compaction_report
    if progress:
        progress(len(todo), len(todo), f"{model_name} {scenario}: built {len(todo)} variants")
    checked = []
    if "native" in out:
        for v in ("compact", "compact-layers", "compact-drop"):
            if v in out:
                diff = _shape_difference(out["native"], out[v])
                if diff is not None and v == "compact" and any(g.status == "carrier" for g in reports[v].groups):
                    continue  # a carrier channel wider than native where it needs one; compact-layers is checked
                if diff is not None:
                    raise AssertionError(f"{model_name} {scenario}: native ({native[1]}) is not shaped like {v}: {diff}")
                checked.append(v)
    shape, dtype = tuple(example.shape[1:]), example.dtype
    x = make_inputs(shape, 1, dtype=dtype)
    macs = {v: count_macs_per_sample(m, x) for v, m in out.items() if v not in ("masked", "masked-baked")}
    macs.update({v: macs["dense"] for v in ("masked", "masked-baked") if v in out})  # same shapes, same work
    params = {v: _params(m) for v, m in out.items()}
    return Prepared(model_name, scenario, sparsity, small, source, shape, out, macs, params, compact_s, reports,
                    input_dtype=dtype, native_source=native[1] if native else None, native_checked=checked)


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
        out += [b.name for b in _BACKENDS.values() if b.engine == "torch" and b.device == "cuda"]
        if ort is not None and "CUDAExecutionProvider" in ort.get_available_providers():
            out.append("ort-cuda")
    return out


def backend_threads(backend: str) -> int:
    """Threads a backend runs with: 1 for ``*-1t``, every CPU this process may use for the others."""
    if backend.endswith("-1t"):
        return 1
    if "cuda" in backend:
        return torch.get_num_threads()
    return cpu_threads()


class RuntimeMismatch(AssertionError):
    """A runtime (onnxruntime, fp16 / bf16, a CUDA graph, torch.compile) gave other outputs than the
    eager fp32 model it runs; a compact model that differs from the masked one in eager fp32 raises
    a plain AssertionError instead."""


def _assert_agree(got: Any, ref: Any, rel: float, what: str,
                  error: type[AssertionError] = AssertionError) -> tuple[float, float]:
    """(max |got - ref|, tolerance) by :func:`compactor.verify.compare`; ``error`` when they differ."""
    try:
        result = verify.compare([ref], [got], rel=rel)
    except VerificationError as exc:  # another shape
        raise error(f"{what}: {first_line(exc)}") from None
    if not result.ok:
        raise error(f"{what}: max |diff| {result.max_abs_diff:.3g} > tolerance {result.tolerance:.3g} "
                    f"(output scale {result.scale:.3g})")
    return result.max_abs_diff, result.tolerance


def _equals_masked(variant: str) -> bool:
    """Variants that compute what the masked model computes (compact-drop drops constants; native is another model)."""
    return variant in ("compact", "compact-layers", "masked-baked") or variant.startswith("compact-round")


_DROP_CHECK = "masked with dropped constants zeroed (compact()'s own check)"


# --------------------------------------------------------------------------- runtimes


def _to_runtime(obj: Any, spec: Backend, device: str, channels_last: bool) -> Any:
    """A model (copied) or an input on ``device`` in ``spec``'s dtype, channels_last if asked."""
    if isinstance(obj, nn.Module):
        obj = copy.deepcopy(obj).to(device=device, dtype=spec.dtype)
        return obj.to(memory_format=torch.channels_last) if channels_last else obj
    obj = obj.to(device)
    if obj.is_floating_point():
        obj = obj.to(spec.dtype)
    return obj.contiguous(memory_format=torch.channels_last) if channels_last and obj.dim() == 4 else obj


def _cuda_graph(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Capture ``fn`` (a forward on a static input) into a CUDA graph; the returned callable replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the default stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> Any:
        graph.replay()
        return out

    replay.graph = graph  # type: ignore[attr-defined]  # keeps the graph (and its memory pool) alive
    return replay


def _compiled(model: nn.Module, x: torch.Tensor, cuda: bool) -> Callable[[], Any]:
    """``torch.compile(model, mode="reduce-overhead")`` (freezing is set by :func:`_runtime`) on CUDA;
    off CUDA (a dry run) dynamo's capture with the eager backend: the same path, no code generation."""
    if not cuda:
        dry = torch.compile(model, backend="eager")
        return lambda: dry(x)
    fast = torch.compile(model, mode="reduce-overhead")
    step = getattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)

    def run() -> Any:
        step()  # each call is a new iteration: earlier outputs may be overwritten
        return fast(x)

    return run


@contextlib.contextmanager
def _runtime(spec: Backend, device: str) -> Iterator[None]:
    """Threads, grad mode and compiler settings for building, checking and timing on ``spec``."""
    with contextlib.ExitStack() as stack:
        if spec.engine == "torch":
            stack.enter_context(torch_threads(backend_threads(spec.name)))
        stack.enter_context(torch.no_grad() if spec.compiled else torch.inference_mode())
        if spec.compiled:
            import torch._dynamo.config as dynamo_config

            # every variant is a new module instance: allow their recompiles instead of falling back to eager
            limits = {k: 64 for k in ("cache_size_limit", "recompile_limit") if hasattr(dynamo_config, k)}
            stack.enter_context(dynamo_config.patch(**limits))
            if device == "cuda":
                import torch._inductor.config as inductor_config

                stack.enter_context(inductor_config.patch(freezing=True))
        yield


@contextlib.contextmanager
def _normal_tensors() -> Iterator[None]:
    """Move / convert models outside inference mode: parameters and buffers made inside it are
    inference tensors, which have no version counter (BorderCorrectedConv's cache reads it)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def _detached(out: Any) -> Any:
    """A copy of a forward's output(s) that later runs (a replayed graph) cannot overwrite."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, (list, tuple)):
        return type(out)(_detached(o) for o in out)
    if isinstance(out, dict):
        return {k: _detached(v) for k, v in out.items()}
    return out


def time_case(prep: Prepared, backend: str, batch: int, *, repeats: int = 20, variants: Optional[Sequence[str]] = None,
              warmup: Optional[int] = None, target_s: float = 0.01, progress: Progress = None,
              device: Optional[str] = None) -> list[dict]:
    """Check, then time every variant of ``prep`` on ``backend`` at ``batch``, interleaved.

    Before timing: compact / compact-round<N> / masked-baked against masked
    (:func:`compactor.verify.compare`, ``CHECK_RTOL`` x output scale) in fp32 on this
    backend's device at this batch; for a runtime in another dtype or memory format, with
    a CUDA graph or ``torch.compile``, also the timed callable's outputs against masked
    run eagerly in that dtype and format (verify's tolerance floor for fp16 / bf16); for
    onnxruntime each ONNX model against its torch original (``ONNX_RTOL``; the export checked
    it already, see :func:`export_onnx`) and against masked. ``native`` was checked by
    :func:`prepare_models`.

    Args:
        device: run ``backend``'s code path on another device: ``"cpu"`` for a dry run of a
            CUDA backend (its dtype and memory format, no graph capture, ``torch.compile``
            with the eager backend). Default: the backend's own.

    Returns:
        One row per variant (see ``benchmarks/README.md``).

    Raises:
        ValueError: an unknown backend, or one this machine lacks.
        RuntimeMismatch: ONNX, fp16 / bf16, a CUDA graph or torch.compile changed a variant's outputs.
        ExportError: an onnxruntime backend, and no exporter wrote an ONNX file that runs as torch does.
        AssertionError: a compact variant differs from masked in eager fp32 (a bug in compactor).
    """
    spec = backend_spec(backend)
    device = device or spec.device
    if device == spec.device and backend not in available_backends():
        raise ValueError(f"backend {backend!r} is not available here; available: {', '.join(available_backends())}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available here")
    if spec.engine == "ort" and device != spec.device:
        raise ValueError(f"backend {backend!r} runs on {spec.device} only")
    names = [v for v in (variants or prep.variants) if v in prep.variants]
    cuda = device == "cuda"
    x_cpu = prep.inputs(batch)
    steps = len(names) + 2
    say = progress or (lambda *a: None)
    label = f"{prep.model_name} {prep.scenario} {backend}{'' if device == spec.device else ' on ' + device} b{batch}"

    checks: dict[str, dict[str, Any]] = {}
    fns: dict[str, Callable[[], object]] = {}
    onnx_bytes: dict[str, int] = {}
    onnx_check: dict[str, tuple[float, float]] = {}
    runtime_check: dict[str, tuple[float, float]] = {}
    keep_alive: list[Any] = []

    layout = "contiguous"
    with _runtime(spec, device):
        if spec.engine == "torch":
            layout = _torch_runners(prep, names, spec, device, x_cpu, label, say, fns, checks, runtime_check)
        else:
            _ort_runners(prep, names, spec, x_cpu, label, say, fns, checks, onnx_bytes, onnx_check, keep_alive)
        for v in names:
            if v == "compact-drop" and v in prep.reports:
                r = prep.reports[v]
                checks[v] = {"check_ref": _DROP_CHECK, "check_max_abs_diff": r.max_abs_diff,
                             "check_tolerance": r.tolerance}
            elif v == "native" and prep.native_checked:
                checks[v] = {"check_ref": "parameter names and shapes of " + " and ".join(prep.native_checked)}

        say(len(names), steps, f"{label}: timing {len(names)} variants x {repeats} repeats")
        slow = (prep.macs.get("dense", 0) * batch) > 2e8
        w = warmup if warmup is not None else (1 if slow and not cuda else 3)
        t = timing.measure(fns, repeats=repeats, warmup=w, cuda=cuda, target_s=target_s)
    del keep_alive
    fns.clear()
    if spec.compiled:
        torch._dynamo.reset()  # drop the compiled variants (and their CUDA graphs)
    if cuda:
        with _normal_tensors():
            for v in dict.fromkeys(["masked", *names]):
                prep.variants[v].to("cpu")
        torch.cuda.empty_cache()
    say(steps, steps, f"{label}: done")
    return _rows(prep, spec, device, layout, batch, names, t, checks, onnx_bytes, onnx_check, runtime_check)


def _torch_runners(prep: Prepared, names: list[str], spec: Backend, device: str, x_cpu: torch.Tensor, label: str,
                   say: Callable, fns: dict, checks: dict, runtime_check: dict) -> str:
    """Check the variants on ``device`` and build their timed callables in ``spec``'s runtime; returns the
    memory format used (channels_last falls back to contiguous where the model cannot take it)."""
    cuda = device == "cuda"
    with _normal_tensors():
        mods = {v: (prep.variants[v].to(device) if cuda else prep.variants[v]) for v in dict.fromkeys(["masked", *names])}
    x = x_cpu.to(device)
    with full_precision():  # exactness first: fp32, TF32 off
        outs = {v: mods[v](x) for v in mods if v == "masked" or _equals_masked(v)}
    for v in names:
        if _equals_masked(v):
            diff, tol = _assert_agree(outs[v], outs["masked"], CHECK_RTOL, f"{label}: {v} vs masked")
            checks[v] = {"check_ref": "masked", "check_max_abs_diff": diff, "check_tolerance": tol}
    del outs
    plain = not (spec.converts or spec.cuda_graph or spec.compiled)
    layout = "channels_last" if spec.channels_last else "contiguous"
    if plain:
        fns.update({v: (lambda m=mods[v]: m(x)) for v in names})
        return layout

    def runtime(obj: Any) -> Any:
        if not spec.converts:
            return obj
        with _normal_tensors():
            return _to_runtime(obj, spec, device, layout == "channels_last")

    try:  # the reference: masked, run eagerly in this dtype and memory format
        ref = _detached(runtime(mods["masked"])(runtime(x)))
    except RuntimeError as exc:  # e.g. x.view() on a channels_last tensor (LeNet's flatten)
        if layout != "channels_last":
            raise
        layout = f"contiguous (channels_last fails: {first_line(exc)[:60]})"
        ref = _detached(runtime(mods["masked"])(runtime(x)))
    xr = runtime(x)
    for i, v in enumerate(names):
        m = runtime(mods[v])
        if spec.compiled:
            say(i, len(names) + 2, f"{label}: torch.compile {v}")
            fn = _compiled(m, xr, cuda)
        else:
            fn = (lambda m=m: m(xr))
            if spec.cuda_graph and cuda:
                say(i, len(names) + 2, f"{label}: CUDA graph capture {v}")
                fn = _cuda_graph(fn)
        got = _detached(fn())  # compiles / warms up, and is what will be timed
        if _equals_masked(v):
            runtime_check[v] = _assert_agree(got, ref, CHECK_RTOL, f"{label}: {v} vs masked in {spec.label}",
                                             RuntimeMismatch)
        fns[v] = fn
    return layout


def _ort_runners(prep: Prepared, names: list[str], spec: Backend, x_cpu: torch.Tensor, label: str, say: Callable,
                 fns: dict, checks: dict, onnx_bytes: dict, onnx_check: dict, keep_alive: list) -> None:
    """Export, check (ONNX against torch, and against masked) and build an onnxruntime session per variant."""
    with torch.inference_mode():  # torch CPU outputs: what each ONNX model must reproduce
        cpu_out = {v: prep.variants[v](x_cpu) for v in dict.fromkeys(["masked", *names]) if v in prep.variants}
    for i, v in enumerate(names):
        say(i, len(names) + 2, f"{label}: ONNX export + check {v}")
        with _normal_tensors():  # tracing in inference mode fails on BorderCorrectedConv
            path = prep.onnx_path(v)
        onnx_bytes[v] = os.path.getsize(path)
        sess = export.ort_session(path, threads=backend_threads(spec.name) if spec.device == "cpu" else 0,
                                  cuda=spec.device == "cuda")
        feed_name = sess.get_inputs()[0].name
        got = torch.from_numpy(sess.run(None, {feed_name: x_cpu.numpy()})[0])
        onnx_check[v] = _assert_agree(got, cpu_out[v], ONNX_RTOL, f"{label}: ONNX {v} vs torch", RuntimeMismatch)
        if _equals_masked(v):
            diff, tol = _assert_agree(got, cpu_out["masked"], CHECK_RTOL + ONNX_RTOL, f"{label}: ONNX {v} vs masked")
            checks[v] = {"check_ref": "masked", "check_max_abs_diff": diff, "check_tolerance": tol}
        if spec.device == "cuda":
            xt = x_cpu.to("cuda")
            binding = sess.io_binding()
            binding.bind_input(feed_name, "cuda", 0, x_cpu.numpy().dtype, tuple(xt.shape), xt.data_ptr())
            binding.bind_output(sess.get_outputs()[0].name, "cuda")
            keep_alive += [xt, binding]
            fns[v] = (lambda s=sess, b=binding: s.run_with_iobinding(b))
        else:
            feed = {feed_name: x_cpu.numpy()}
            fns[v] = (lambda s=sess, f=feed: s.run(None, f))
        keep_alive.append(sess)


def _rows(prep: Prepared, spec: Backend, device: str, layout: str, batch: int, names: list[str], t: dict[str, timing.Timing],
          checks: dict, onnx_bytes: dict, onnx_check: dict, runtime_check: dict) -> list[dict]:
    rows = []
    for v in names:
        tm = t[v]
        row: dict[str, Any] = {
            "model": prep.model_name,
            "scenario": prep.scenario,
            "sparsity": prep.sparsity,
            "backend": spec.name,
            "runtime": spec.label,
            "run_on": device,  # another device than the backend's: a dry run of its code path
            "dtype": str(spec.dtype).replace("torch.", "") if spec.engine == "torch" else "float32",
            "memory_format": layout,
            "threads": backend_threads(spec.name),
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
            "runtime_max_abs_diff": runtime_check[v][0] if v in runtime_check else None,
            "runtime_tolerance": runtime_check[v][1] if v in runtime_check else None,
        }
        row.update(checks.get(v, {}))
        for ref in ("masked", "dense", "native"):
            row[f"speedup_vs_{ref}"] = t[ref].median / tm.median if ref in t and tm.median else None
        dm, m = prep.macs.get("dense"), prep.macs.get(v)
        row["mac_ratio"] = dm / m if dm and m else None
        row["efficiency"] = (row["speedup_vs_dense"] / row["mac_ratio"]
                             if row["speedup_vs_dense"] and row["mac_ratio"] else None)
        rows.append(row)
    return rows


def time_backends(prep: Prepared, backends: Sequence[str], batches: Sequence[int], *, repeats: int = 20,
                  progress: Progress = progress_bar) -> tuple[list[dict], dict[str, str]]:
    """:func:`time_case` on every backend at every batch; a backend that cannot run the model is skipped.

    A backend is skipped (with the reason) when its runtime changes the outputs
    (:class:`RuntimeMismatch`), its ONNX export fails (:class:`~compactor.errors.ExportError`)
    or it raises otherwise (a compiler that cannot take the model); the rows it timed
    before stay.

    Returns:
        The rows of every backend that ran, and ``{backend: why}`` for those skipped.

    Raises:
        AssertionError: a compact variant differs from masked in eager fp32 (a bug in compactor).
        VerificationError, CompactionError: likewise a bug, or a model compactor cannot take.
    """
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    for backend in backends:
        try:
            for batch in batches:
                rows += time_case(prep, backend, batch, repeats=repeats, progress=progress)
        except AssertionError as exc:
            if not isinstance(exc, RuntimeMismatch):
                raise
            skipped[backend] = first_line(exc)
        except Exception as exc:  # an export or a compiler that cannot take this model: time the others
            if isinstance(exc, (VerificationError, CompactionError)) and not isinstance(exc, ExportError):
                raise
            skipped[backend] = f"{type(exc).__name__}: {first_line(exc)}"
    return rows, skipped


# --------------------------------------------------------------------------- what compactor bench prints


def fastest(rows: Sequence[dict], variant: str = "compact") -> Optional[str]:
    """The backend that runs ``variant`` fastest over the batch sizes in ``rows``.

    Each backend's latency at each batch is divided by the best at that batch; the lowest
    geometric mean over batches wins (a backend missing a batch does not compete). None
    when ``rows`` hold no ``variant``.
    """
    mine = [r for r in rows if r["variant"] == variant]
    batches = {r["batch"] for r in mine}
    best = {b: min(r["median_s"] for r in mine if r["batch"] == b) for b in batches}
    score: dict[str, list[float]] = {}
    for r in mine:
        score.setdefault(r["backend"], []).append(math.log(r["median_s"] / best[r["batch"]]))
    full = {b: sum(s) / len(s) for b, s in score.items() if len(s) == len(batches)}
    return min(full, key=full.get) if full else None


def _ratio_text(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}x" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}x"


def verdict(rows: Sequence[dict], variant: str = "compact") -> str:
    """One line: which runtime runs ``variant`` fastest, its latency per batch, and its speed-ups there.

    Example:
        >>> rows = [{"variant": "compact", "backend": b, "batch": 1, "median_s": s, "speedup_vs_masked": m,
        ...          "speedup_vs_dense": d} for b, s, m, d in (("torch-cpu-1t", 2e-4, 2.0, 1.2), ("ort-cpu-1t", 5e-5, 3.1, 1.9))]
        >>> verdict(rows)
        'verdict: the compact model runs fastest on onnxruntime CPU, 1 thread (ort-cpu-1t): 0.050 ms at batch 1; 3.10x the masked model and 1.90x dense on that runtime'
    """
    backend = fastest(rows, variant)
    if backend is None:
        return f"verdict: no {variant} rows were timed"
    mine = sorted((r for r in rows if r["variant"] == variant and r["backend"] == backend), key=lambda r: r["batch"])
    times = ", ".join(f"{r['median_s'] * 1e3:.3f} ms at batch {r['batch']}" for r in mine)
    ratios = []
    for ref, what in (("masked", "the masked model"), ("dense", "dense")):
        values = [r[f"speedup_vs_{ref}"] for r in mine if r.get(f"speedup_vs_{ref}")]
        if values:
            ratios.append(f"{_ratio_text(values)} {what}")
    tail = f"; {' and '.join(ratios)} on that runtime" if ratios else ""
    return f"verdict: the {variant} model runs fastest on {backend_spec(backend).label} ({backend}): {times}{tail}"


def case_table(rows: Sequence[dict], repeats: int) -> str:
    """One built-in case (one backend and batch, as :func:`run_case` returns it): a title line, then a row per variant."""
    r0 = rows[0]
    lines = [f"{r0['model']} {r0['scenario']} - {r0['backend']} - batch {r0['batch']} "
             f"(median of {repeats}; efficiency = speed-up vs dense / MAC ratio)",
             f"{'variant':15s} {'median':>11s} {'IQR/med':>8s} {'params':>11s} {'MACs':>13s} {'x masked':>9s} "
             f"{'x dense':>8s} {'eff.':>5s} {'x native':>8s}"]
    for r in rows:
        native = f"{r['speedup_vs_native']:8.2f}" if r.get("speedup_vs_native") else ""
        lines.append(f"{r['variant']:15s} {r['median_s'] * 1e3:9.3f}ms {r['spread']:8.0%} {r['params']:11,} "
                     f"{r['macs']:13,} {r['speedup_vs_masked']:9.2f} {r['speedup_vs_dense']:8.2f} "
                     f"{r['efficiency']:5.2f} {native}")
    return "\n".join(lines)


def summary(prep: Prepared, rows: Sequence[dict], skipped: Mapping[str, str], repeats: int) -> str:
    """A user's model timed by :func:`time_backends`: what was timed, a row per (backend, batch, variant)
    ending with what was checked before timing, and the backends skipped with why."""
    shape = "x".join(map(str, prep.input_shape))
    lines = [f"{prep.source}, input (batch)x{shape} {str(prep.input_dtype).replace('torch.', '')}: median of "
             f"{repeats} interleaved repeats; x masked, x dense: speed-up on the same backend and batch",
             f"{'backend':18s} {'batch':>5s}  {'variant':15s} {'median':>10s} {'IQR/med':>7s} {'params':>11s} "
             f"{'MACs/sample':>13s} {'x masked':>8s} {'x dense':>7s}  checked before timing"]
    for r in rows:
        lines.append(f"{r['backend']:18s} {r['batch']:5d}  {r['variant']:15s} {r['median_s'] * 1e3:8.3f}ms "
                     f"{r['spread']:7.0%} {r['params']:11,} {r['macs']:13,} {r['speedup_vs_masked']:8.2f} "
                     f"{r['speedup_vs_dense']:7.2f}  {_checked(r)}")
    lines += [f"skipped {backend}: {why}" for backend, why in skipped.items()]
    return "\n".join(lines)


def _checked(row: dict) -> str:
    """What a row was checked against before it was timed, and by how much it differed."""
    if row.get("check_max_abs_diff") is not None:
        ref = "masked" if row["check_ref"] == "masked" else "masked, dropped constants zeroed"
        text = f"= {ref}: |diff| {row['check_max_abs_diff']:.1e} <= {row['check_tolerance']:.1e}"
        if row.get("runtime_max_abs_diff") is not None:
            text += f"; {row['dtype']} run {row['runtime_max_abs_diff']:.1e} <= {row['runtime_tolerance']:.1e}"
        return text
    if row.get("onnx_max_abs_diff") is not None:
        return f"ONNX = torch: |diff| {row['onnx_max_abs_diff']:.1e} <= {row['onnx_tolerance']:.1e}"
    return "-"


# --------------------------------------------------------------------------- one case, start to end


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
        AssertionError: a check failed (compact differs from masked, or a runtime from torch).
        ExportError: an onnxruntime backend, and no exporter wrote an ONNX file that runs as torch does.
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
