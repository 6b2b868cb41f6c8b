"""ONNX export checked in onnxruntime, and ``torch.export`` programs checked after reloading.

Each file is written to a temporary file, checked against PyTorch at two batch sizes
(:data:`compactor.verify.RUNTIME_RELATIVE_TOLERANCE`), and only then renamed into place.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from . import files, masks, verify
from .errors import ExportError, VerificationError
from .tensors import as_inputs, first_line, flatten_outputs, random_like

__all__ = ["ExportReport", "export_onnx", "export_program", "ort_session"]

#: ``"auto"`` tries the TorchScript exporter, then dynamo; or name one.
Exporter = Literal["auto", "torchscript", "dynamo"]
_EXPORTERS = ("auto", "torchscript", "dynamo")


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how well onnxruntime matched PyTorch."""

    path: str
    exporter: str
    opset: int
    size_bytes: int
    input_names: list[str]
    output_names: list[str]
    dynamic_batch: bool
    batch_sizes: list[int]
    max_abs_diff: float
    tolerance: float
    seconds: float
    fallback_reason: Optional[str] = None
    diffs: dict[int, float] = field(default_factory=dict)

    def __str__(self) -> str:
        sizes = ", ".join(map(str, self.batch_sizes))
        batch = "dynamic batch" if self.dynamic_batch else "fixed batch"
        text = (f"{self.path}: {self.size_bytes / 1000:.1f} kB, opset {self.opset}, {self.exporter} exporter, {batch}; "
                f"onnxruntime vs PyTorch max |diff| {self.max_abs_diff:.2g} (tolerance {self.tolerance:.2g}) "
                f"at batch size{'s' if len(self.batch_sizes) > 1 else ''} {sizes}")
        if self.fallback_reason:
            text += f" (torchscript exporter failed: {self.fallback_reason})"
        return text


# --------------------------------------------------------------------------- shared by both exports


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Swallow exporter chatter: Python warnings, prints, and log records below CRITICAL.

    Not thread-safe: it changes the process-wide logging switch for its duration.
    """
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    buf = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        logging.disable(previous)


def _outputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t.detach() for t in flatten_outputs(model(*inputs))]


def _shapes(tensors: Sequence[torch.Tensor]) -> str:
    return ", ".join(str(tuple(t.shape)) for t in tensors)


def _batch(example: tuple[torch.Tensor, ...]) -> int:
    return int(example[0].shape[0]) if example[0].dim() > 0 else 1


def _other_batch(example: tuple[torch.Tensor, ...]) -> tuple[int, tuple[torch.Tensor, ...]]:
    """A second batch size (1, or 3 when the example has 1 row) and random inputs like the example at it."""
    other = 1 if _batch(example) > 1 else 3
    return other, random_like(example, batch=other, seed=other)


def _trace_inputs(example: tuple[torch.Tensor, ...], dynamic_batch: bool) -> tuple[torch.Tensor, ...]:
    """Trace at batch >= 2 so that no exporter can mistake the batch dimension for a constant 1."""
    if not dynamic_batch or _batch(example) >= 2:
        return example
    return tuple(torch.cat([x, x]) for x in example)


# --------------------------------------------------------------------------- ONNX


def ort_session(path: str, *, threads: int = 1, cuda: bool = False, profile_prefix: Optional[str] = None):
    """An onnxruntime ``InferenceSession`` on ``path``: every graph optimization, errors-only logging.

    The one place compactor (its export check, ``compactor bench``, ``benchmarks/``) opens an
    ONNX file in onnxruntime.

    Args:
        threads: intra-op threads; 1 (the default) for a correctness check, so that no thread
            pool spins against PyTorch's; 0 lets onnxruntime choose. One inter-op thread always.
        cuda: CUDAExecutionProvider first, CPUExecutionProvider for what it cannot run.
        profile_prefix: write onnxruntime's per-node profile to files starting with this path.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: keep "initializer not used" notes off the terminal
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    return ort.InferenceSession(path, sess_options=options, providers=providers)


def _export_torchscript(model, trace, path, input_names, output_names, dynamic_axes, opset) -> None:
    kwargs: dict[str, Any] = dict(input_names=input_names, output_names=output_names, opset_version=opset,
                                  dynamic_axes=dynamic_axes or None, do_constant_folding=True)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    torch.onnx.export(model, trace, path, **kwargs)


def _export_dynamo(model, trace, path, input_names, output_names, dynamic_axes, opset) -> None:
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise ExportError(f"torch {torch.__version__} has no dynamo ONNX exporter (it needs torch >= 2.5)")
    dynamic_shapes = None
    if dynamic_axes:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in trace)
    torch.onnx.export(model, trace, path, dynamo=True, input_names=input_names, output_names=output_names,
                      opset_version=opset, dynamic_shapes=dynamic_shapes, external_data=False, verbose=False)


_EXPORT_FNS = {"torchscript": _export_torchscript, "dynamo": _export_dynamo}


def _export(exporter: str, model: nn.Module, trace, path: str, input_names, output_names, dynamic_axes, opset) -> None:
    with _quiet():
        try:
            _EXPORT_FNS[exporter](model, trace, path, input_names, output_names, dynamic_axes, opset)
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"torch.onnx.export ({exporter}) failed: {first_line(exc)}") from None


class _Checked(NamedTuple):
    """What :func:`_check_file` found in an exported file."""

    opset: int
    output_names: list[str]
    comparison: verify.Comparison
    diffs: dict[int, float]


Check = tuple[int, tuple[torch.Tensor, ...], list[torch.Tensor]]  # (batch size, inputs, PyTorch's outputs)


def _check_file(path: str, input_names: list[str], checks: Sequence[Check]) -> _Checked:
    """Run ``onnx.checker`` on ``path``, then onnxruntime on every check; raise unless it matches PyTorch."""
    import onnx

    try:
        onnx.checker.check_model(path)
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected the exported file: {first_line(exc)}") from None
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    try:
        session = ort_session(path)
    except Exception as exc:
        raise ExportError(f"onnxruntime could not load the exported file: {first_line(exc)}") from None
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(input_names):
        raise ExportError(f"the ONNX model takes {len(names)} inputs, the example has {len(input_names)}")
    got_all, diffs = [], {}
    for b, xs, expected in checks:
        feed = {n: x.detach().cpu().numpy() for n, x in zip(names, xs)}
        try:
            got = [torch.from_numpy(g) for g in session.run(None, feed)]
        except Exception as exc:
            raise ExportError(f"onnxruntime failed on a batch of {b}: {first_line(exc)}") from None
        try:
            diffs[b] = verify.max_abs_diff([expected], [got])[0]
        except VerificationError:  # another number of outputs, or another shape
            raise ExportError(
                f"at batch {b} the ONNX model returns shapes {_shapes(got)}, PyTorch {_shapes(expected)}: the "
                "exporter fixed a dimension the model computes from its input; export with dynamic_batch=False"
            ) from None
        got_all.append(got)
    result = verify.compare([e for _, _, e in checks], got_all, rel=verify.RUNTIME_RELATIVE_TOLERANCE)
    if not result.ok:
        at = ", ".join(f"batch {b}: {d:.3g}" for b, d in diffs.items())
        raise ExportError(
            f"onnxruntime's outputs differ from PyTorch's by up to {result.max_abs_diff:.3g} (tolerance "
            f"{result.tolerance:.3g}, output scale {result.scale:.3g}; {at})"
        )
    return _Checked(opset, [o.name for o in session.get_outputs()], result, diffs)


def _failure(model: nn.Module, order: list[str], failures: list[tuple[str, str]], exporter: str,
             dynamic_batch: bool) -> ExportError:
    """One error for every exporter that failed, with what to try next."""
    reasons = [reason for _, reason in failures]
    if len(failures) > 1 and len(set(reasons)) == 1:
        said = f"{' and '.join(order)} exporters: {reasons[0]}"
    else:
        said = " | ".join(f"{name}: {reason}" for name, reason in failures)
    fix = "try another opset" + (" or exporter='auto'" if exporter != "auto" else "")
    if dynamic_batch:
        fix = f"if the model only works at one batch size, pass dynamic_batch=False (--no-dynamic-batch); otherwise {fix}"
    return ExportError(f"could not export {type(model).__name__} to ONNX: {said}; {fix}")


class _Keywords(nn.Module):
    """``model(**dict(zip(keys, inputs)))`` as a module of positional tensors (ONNX inputs are positional);
    a Hugging Face model's key/value cache is turned off (``use_cache=False``) and its ``ModelOutput`` returned
    as the tuple of its tensors."""

    def __init__(self, model: nn.Module, keys: Sequence[str]) -> None:
        super().__init__()
        self.model, self.keys = model, list(keys)
        try:
            self.cache_flag = "use_cache" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
            self.cache_flag = False

    def forward(self, *inputs: torch.Tensor) -> tuple:
        kwargs: dict[str, Any] = dict(zip(self.keys, inputs))
        if self.cache_flag:
            kwargs["use_cache"] = False
        return tuple(flatten_outputs(self.model(**kwargs)))


def _cache_keyword(model: nn.Module) -> str:
    """The keyword a Hugging Face model takes its key/value cache by (``cache`` in newer transformers)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        params = {}
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out: Any) -> Any:
    """The key/value cache in a Hugging Face output (``cache``, ``past_key_values`` in older transformers)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    """A Hugging Face cache's tensors: layer 0's keys and values, layer 1's, ..."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [t for layer in layers for t in (layer.keys, layer.values)]
    return [t for kv in zip(cache.key_cache, cache.value_cache) for t in kv]  # older transformers


class _DecodeStep(nn.Module):
    """One step of a Hugging Face causal LM with its key/value cache as tensors: ``(input_ids, attention_mask,
    position_ids, past.0.key, past.0.value, ...) -> (logits, present.0.key, present.0.value, ...)``; the
    attention mask covers the past and the new tokens."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model, self.layers, self.keyword = model, layers, _cache_keyword(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple:
        from transformers.cache_utils import DynamicCache

        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # older transformers
            cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.keyword: cache})
        return (out.logits, *_cache_tensors(_returned_cache(out)))


def _decode_case(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int) -> tuple[torch.Tensor, ...]:
    """Step inputs: the prompt ``ids`` run through ``model`` as the past, then ``new`` tokens."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    past = _cache_tensors(_returned_cache(out))
    b, p = ids.shape
    gen = torch.Generator().manual_seed(p)
    step_ids = torch.randint(0, int(ids.max()) + 1, (b, new), generator=gen, dtype=ids.dtype)
    step_mask = torch.cat([mask, torch.ones(b, new, dtype=mask.dtype)], 1)
    positions = (step_mask.cumsum(1) - 1).clamp(min=0)[:, -new:]
    return (step_ids, step_mask, positions, *[t.detach() for t in past])


def _export_decoder(model: nn.Module, example: dict, path: str, opset: Optional[int], force: bool) -> ExportReport:
    """:func:`export_onnx` with ``cache=True``: one decoding step with the key/value cache as inputs and outputs,
    checked in onnxruntime at two batch sizes, past lengths and step lengths."""
    if "input_ids" not in example or not hasattr(getattr(model, "config", None), "to_dict"):
        raise ExportError(f"cache=True exports a Hugging Face causal LM from its tokenizer's output (a dict with "
                          f"input_ids); got {type(model).__name__} with {sorted(example)}")
    t0 = time.perf_counter()
    work = masks.clone(model).eval()
    ids = example["input_ids"]
    mask = example.get("attention_mask", torch.ones_like(ids))
    try:
        first = _decode_case(work, ids, mask, 2)
    except Exception as exc:
        raise ExportError(f"{type(model).__name__} did not run with its cache on: {first_line(exc)}") from None
    layers = (len(first) - 3) // 2
    step = _DecodeStep(work, layers).eval()
    second = _decode_case(work, ids[:1, :max(1, ids.shape[1] - 1)], mask[:1, :max(1, ids.shape[1] - 1)], 1)
    checks: list[Check] = []
    for case in (first, second):
        with torch.no_grad():
            checks.append((int(case[0].shape[0]), case, list(step(*case))))
    past = [f"past.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    input_names = ["input_ids", "attention_mask", "position_ids", *past]
    output_names = ["logits", *present]
    dynamic_axes = {"input_ids": {0: "batch", 1: "new"}, "position_ids": {0: "batch", 1: "new"},
                    "attention_mask": {0: "batch", 1: "total"}, "logits": {0: "batch", 1: "new"},
                    **{n: {0: "batch", 2: "past"} for n in past}, **{n: {0: "batch", 2: "total"} for n in present}}
    with files.atomic_write(path, force=force) as tmp:
        _export("torchscript", step, first, tmp, input_names, output_names, dynamic_axes, opset)
        checked = _check_file(tmp, input_names, checks)
    return ExportReport(
        path=path, exporter="torchscript", opset=checked.opset, size_bytes=os.path.getsize(path),
        input_names=input_names, output_names=checked.output_names, dynamic_batch=True,
        batch_sizes=[b for b, _, _ in checks], max_abs_diff=checked.comparison.max_abs_diff,
        tolerance=checked.comparison.tolerance, seconds=time.perf_counter() - t0, diffs=checked.diffs)


def _output_names(model: nn.Module, example: tuple, count: int) -> list[str]:
    """The names of a dict-like output's tensors (a ModelOutput: "logits", ...), else output / output_<i>."""
    inner = model.model if isinstance(model, _Keywords) else None
    if inner is not None:
        with torch.no_grad():
            out = inner(**dict(zip(model.keys, example)), **({"use_cache": False} if model.cache_flag else {}))
        if isinstance(out, dict):
            names = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
            if len(names) == count:
                return names
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def export_onnx(
    model: nn.Module,
    example_inputs: Union[torch.Tensor, Sequence[torch.Tensor], dict],
    path: Union[str, os.PathLike],
    *,
    dynamic_batch: bool = True,
    opset: Optional[int] = None,
    force: bool = False,
    exporter: Exporter = "auto",
    cache: bool = False,
) -> ExportReport:
    """Export ``model`` to ONNX, check the file, and prove onnxruntime computes what PyTorch computes.

    The file is checked with ``onnx.checker.check_model``, loaded in onnxruntime
    (CPUExecutionProvider) and run on ``example_inputs`` and, with ``dynamic_batch``,
    on random inputs of a second batch size; only then is it moved to ``path``.
    ``model`` is not modified (a copy in eval mode is exported).

    Which exporter: ``"auto"`` tries torch's TorchScript tracer first (``dynamo=False``),
    then the dynamo exporter (``torch.export`` + onnxscript) if the tracer is missing,
    raises, or its file fails the parity check. Both exported every model this project
    tests (compacted LeNet, conv+BN+residual, depthwise, attention, border-corrected
    convs, the zoo) and matched PyTorch to <= 4e-7; measured on torch 2.13 CPU the
    tracer took 0.1-0.5 s per model against 1.5-5 s, wrote smaller files for small
    models, printed nothing, and exists on every supported torch (dynamo needs
    torch >= 2.5). Dynamo traced at batch 1 gave wrong outputs at batch 3 without an
    error, so every export here is traced at batch >= 2 and checked at a second size.

    Args:
        model: the model to export (e.g. the result of :func:`compactor.compact`).
        example_inputs: a tensor or tuple of tensors, batch first; or, as :func:`compactor.compact`
            takes them, a dict of keyword inputs (a tokenizer's output): they become ONNX inputs of the
            same names, and a Hugging Face model is exported without its cache (``use_cache=False``), its
            outputs named as in its ``ModelOutput`` ("logits").
        path: where to write the ``.onnx`` file (atomically).
        dynamic_batch: make dimension 0 of every input and output symbolic ("batch").
        opset: ONNX opset version; ``None`` lets the exporter choose.
        force: replace an existing ``path``.
        exporter: ``"auto"`` (TorchScript tracer, then dynamo), ``"torchscript"`` or ``"dynamo"``.
        cache: for a Hugging Face causal LM given its tokenizer's output: export one decoding step with
            the key/value cache as inputs and outputs (inputs ``input_ids``, ``attention_mask`` over the
            past and new tokens, ``position_ids``, ``past.<layer>.key`` / ``.value``; outputs ``logits``,
            ``present.<layer>.key`` / ``.value``), checked at two batch sizes, past lengths and step
            lengths. ``export/run_onnx.py --generate N`` runs a greedy loop on it. Off: the logits of
            a whole sequence, the cache turned off.

    Returns:
        An :class:`ExportReport`: exporter used, opset, file size, max |diff|, batch sizes checked.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or an input is not a tensor.
        ValueError: unknown ``exporter``.
        FileExistsError: ``path`` exists and ``force`` is false.
        ExportError: the model rejects the inputs, the export or the check fails, or
            onnxruntime's outputs differ from PyTorch's by more than
            :data:`compactor.verify.RUNTIME_RELATIVE_TOLERANCE` times the output scale
            (the message gives the difference).

    Example:
        >>> import os, tempfile, torch, compactor
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
        >>> path = os.path.join(tempfile.mkdtemp(), "net.onnx")
        >>> report = compactor.export_onnx(net, torch.randn(2, 4), path)
        >>> report.batch_sizes, report.max_abs_diff < report.tolerance
        ([2, 1], True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects a torch.nn.Module, got {type(model).__name__}")
    if exporter not in _EXPORTERS:
        raise ValueError(f"exporter={exporter!r} should be one of {', '.join(map(repr, _EXPORTERS))}")
    path = os.fspath(path)
    files.refuse_overwrite(path, force=force)
    if cache:
        if not isinstance(example_inputs, dict):
            raise ExportError("cache=True takes the tokenizer's output, a dict with input_ids (and attention_mask)")
        return _export_decoder(model, example_inputs, path, opset, force)
    keys = list(example_inputs) if isinstance(example_inputs, dict) else None
    if keys is not None:
        example_inputs = tuple(example_inputs[k] for k in keys)
    example = as_inputs(example_inputs, tensors_only=True, who="export_onnx")
    t0 = time.perf_counter()
    work = masks.clone(model).eval()
    if keys is not None:
        work = _Keywords(work, keys).eval()

    try:
        expected = _outputs(work, example)
    except Exception as exc:
        raise ExportError(
            f"{type(model).__name__} rejected the example input(s) of shape {_shapes(example)}: {first_line(exc)}; "
            "pass inputs shaped as its forward() expects"
        ) from None
    batch = _batch(example)
    checks: list[Check] = [(batch, example, expected)]
    if dynamic_batch:
        for x in example:
            if x.dim() == 0 or int(x.shape[0]) != batch:
                raise ExportError(
                    f"dynamic_batch=True needs every input to have the batch as dimension 0, got shapes "
                    f"{_shapes(example)}; pass dynamic_batch=False (--no-dynamic-batch)"
                )
        other, xs = _other_batch(example)
        try:
            checks.append((other, xs, _outputs(work, xs)))
        except Exception as exc:
            raise ExportError(
                f"{type(model).__name__} rejected a batch of {other} ({first_line(exc)}); it does not take "
                "any batch size, so export it with dynamic_batch=False (--no-dynamic-batch)"
            ) from None

    input_names = keys or (["input"] if len(example) == 1 else [f"input_{i}" for i in range(len(example))])
    output_names = _output_names(work, example, len(expected))
    dynamic_axes: dict[str, dict[int, str]] = {}
    if dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n in input_names}
        for n, e in zip(output_names, expected):
            if e.dim() > 0 and e.shape[0] == batch:
                dynamic_axes[n] = {0: "batch"}

    trace = _trace_inputs(example, dynamic_batch)
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    failures: list[tuple[str, str]] = []
    for name in order:
        try:
            with files.atomic_write(path, force=force) as tmp:
                _export(name, work, trace, tmp, input_names, output_names, dynamic_axes, opset)
                checked = _check_file(tmp, input_names, checks)
        except ExportError as exc:
            failures.append((name, str(exc)))
            continue
        return ExportReport(
            path=path, exporter=name, opset=checked.opset, size_bytes=os.path.getsize(path),
            input_names=list(input_names), output_names=checked.output_names, dynamic_batch=dynamic_batch,
            batch_sizes=[b for b, _, _ in checks], max_abs_diff=checked.comparison.max_abs_diff,
            tolerance=checked.comparison.tolerance, seconds=time.perf_counter() - t0,
            fallback_reason=failures[0][1] if failures else None, diffs=checked.diffs,
        )
    raise _failure(model, order, failures, exporter, dynamic_batch)


# --------------------------------------------------------------------------- torch.export program


def export_program(
    model: nn.Module,
    example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]],
    path: Union[str, os.PathLike],
    *,
    dynamic_batch: bool = True,
    force: bool = False,
) -> str:
    """Write ``model`` as a ``torch.export`` program (.pt2) and check it reloads to the same outputs.

    The program is exported at batch >= 2 (dimension 0 symbolic with ``dynamic_batch``),
    saved atomically, loaded back with ``torch.export.load`` and compared with
    ``model`` on the example inputs and, with ``dynamic_batch``, a second batch size
    (:data:`compactor.verify.RUNTIME_RELATIVE_TOLERANCE`). Load it with
    ``torch.export.load(path).module()``; the model's class is not needed. It worked
    unchanged on the compacted LeNet, conv+BN+residual, depthwise, attention and
    border-corrected models (0.6-5 s each on torch 2.13 CPU).

    Returns:
        ``path``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or an input is not a tensor.
        FileExistsError: ``path`` exists and ``force`` is false.
        ExportError: the model rejects the inputs, ``torch.export`` fails, or the
            reloaded program's outputs differ from the model's.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_program expects a torch.nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    files.refuse_overwrite(path, force=force)
    example = as_inputs(example_inputs, tensors_only=True, who="export_program")
    work = masks.clone(model).eval()
    checks = [example] + ([_other_batch(example)[1]] if dynamic_batch else [])
    try:
        expected = [_outputs(work, xs) for xs in checks]
    except Exception as exc:
        raise ExportError(f"{type(model).__name__} rejected the example input(s): {first_line(exc)}; "
                          "pass inputs shaped as its forward() expects (for another batch size too, or "
                          "dynamic_batch=False)") from None
    trace = _trace_inputs(example, dynamic_batch)

    with files.atomic_write(path, force=force) as tmp:
        with _quiet():
            try:
                dims = tuple({0: torch.export.Dim("batch")} for _ in trace) if dynamic_batch else None
                program = torch.export.export(work, trace, dynamic_shapes=dims)
                with open(tmp, "wb") as f:
                    torch.export.save(program, f)
                with open(tmp, "rb") as f:
                    reloaded = torch.export.load(f).module()
            except Exception as exc:
                raise ExportError(f"torch.export could not export {type(model).__name__}: {first_line(exc)}; "
                                  "use export_onnx, or dynamic_batch=False") from None
        for xs, want in zip(checks, expected):
            try:
                ok = verify.compare([want], [_outputs(reloaded, xs)], rel=verify.RUNTIME_RELATIVE_TOLERANCE).ok
            except VerificationError:  # another number of outputs, or another shape
                ok = False
            if not ok:
                raise ExportError(f"the reloaded program differs from {type(model).__name__} at batch "
                                  f"{_batch(xs)}; use export_onnx, or dynamic_batch=False")
    return path
