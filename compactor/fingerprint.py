"""A compact model's fingerprint: what it computes on one small probe input, layer by layer.

:func:`take` runs the model once on the probe and records, for every module call in
execution order, a few numbers per output tensor (shape, sum, sum of magnitudes and
16 sampled values). :func:`check` runs a rebuilt model on the same probe and names the
first module whose output differs. :func:`compactor.save` writes the fingerprint beside
the weights and :func:`compactor.load` checks it, so a reload that rebuilt a layer
differently (other constructor arguments, another library version, another class) raises
instead of returning a silently wrong model. A fingerprint is the probe input (the example inputs ``compact()`` was given, their first
row when larger than 4 MiB; none when even that exceeds 16 MiB) plus a few kB whatever the
model. Both runs use full fp32 precision (no TF32), so a model saved on a GPU checks on a CPU.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import torch
from torch import nn

from . import probe
from .errors import LoadError
from .tensors import Kwargs, call
from .verify import full_precision

__all__ = ["probe_inputs", "probe_batch", "take", "check"]

#: Above this many bytes, the probe keeps the first row of the example inputs only; above the second, nothing.
MAX_PROBE_BYTES = 4 << 20
MAX_ROW_BYTES = 16 << 20
_SAMPLES = 16
_TENSORS_PER_CALL = 4


def _tensors(x: Any) -> list[torch.Tensor]:
    """The tensors in an input or output (nested tuples / lists / dicts), anything else skipped."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for k in x for t in _tensors(x[k])]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def _floats(x: Any) -> list[torch.Tensor]:
    """The floating-point tensors among :func:`_tensors`: integer outputs (an argmax, the indices NMS keeps)
    can flip on the last bit of a float and are not compared."""
    return [t for t in _tensors(x) if t.is_floating_point() or t.is_complex()]


def probe_inputs(example: tuple) -> Optional[dict[str, Any]]:
    """``example`` (as :func:`compactor.tensors.as_inputs` reads it) as plain data on the CPU: its first row
    when it is bigger than :data:`MAX_PROBE_BYTES`. None if it holds something other than tensors."""
    kwargs = example[0] if len(example) == 1 and isinstance(example[0], Kwargs) else None
    items = list(kwargs.values()) if kwargs is not None else list(example)
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        return None
    rows = items[0].shape[0] if items[0].dim() else None
    if _bytes(items) > MAX_PROBE_BYTES and rows:
        items = [t[:1] if t.dim() and t.shape[0] == rows else t for t in items]
    if _bytes(items) > MAX_ROW_BYTES:
        return None
    items = [t.detach().cpu().clone() for t in items]
    if kwargs is not None:
        return {"args": [], "kwargs": dict(zip(kwargs, items))}
    return {"args": items, "kwargs": {}}


def _bytes(items: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in items)


def probe_batch(inputs: Mapping[str, Any], device: torch.device) -> tuple:
    """The probe ``inputs`` (from :func:`probe_inputs`) as a batch for :func:`compactor.tensors.call`."""
    if inputs["kwargs"]:
        return (Kwargs({k: v.to(device) for k, v in inputs["kwargs"].items()}),)
    return tuple(t.to(device) for t in inputs["args"])


def _stats(t: torch.Tensor) -> dict[str, Any]:
    flat = t.detach().reshape(-1)
    flat = flat.abs().double() if flat.is_complex() else flat.double()
    idx = torch.linspace(0, max(flat.numel() - 1, 0), min(_SAMPLES, flat.numel())).round().long().to(flat.device)
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "sum": float(flat.sum()),
            "abs": float(flat.abs().sum()), "samples": flat.index_select(0, idx).cpu()}


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _record(model: nn.Module, inputs: Mapping[str, Any]) -> tuple[list[list], list[dict[str, Any]]]:
    """(per module call in execution order: [name, type, stats of its output tensors]; stats of the outputs)."""
    calls: list[list] = []

    def hook(name: str, module: nn.Module, args: tuple, out: Any) -> None:
        calls.append([name, type(module).__name__, [_stats(t) for t in _floats(out)[:_TENSORS_PER_CALL]]])

    every = {name: functools.partial(hook, name) for name, _ in model.named_modules() if name}
    with probe.hooked(model, post=every), probe.evaluating(model), torch.no_grad(), full_precision():
        out = call(model, probe_batch(inputs, _device(model)))
    return calls, [_stats(t) for t in _floats(out)]


def take(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint of ``model`` on the probe ``inputs`` (from :func:`probe_inputs`), in eval mode; the
    model's training flags are restored."""
    calls, outputs = _record(model, inputs)
    return {"inputs": dict(inputs), "layers": calls, "outputs": outputs}


def _rtol(dtype: str) -> float:
    """What two runs of the same layers may differ by (other kernels, other machines), relative to the values'
    scale; a wrong rebuild differs by far more."""
    return 3e-2 if dtype in ("float16", "bfloat16") else 5e-3


def _difference(want: Mapping[str, Any], got: Mapping[str, Any]) -> Optional[str]:
    """Why ``got`` is not the output ``want`` recorded, or None."""
    if list(want["shape"]) != list(got["shape"]):
        return f"shape {tuple(got['shape'])} where the saved model gave {tuple(want['shape'])}"
    n = max(1, int(torch.tensor(want["shape"]).prod()) if want["shape"] else 1)
    a, b = want["samples"].double(), got["samples"].double()
    finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(finite_a, finite_b) or not torch.equal(a[~finite_a], b[~finite_b]):
        return f"non-finite values (NaN / inf) where the saved model gave {a[finite_a != finite_b][:4].tolist()}"
    if (want["sum"] == want["sum"]) != (got["sum"] == got["sum"]):  # NaN somewhere outside the samples
        return f"sum {got['sum']} where the saved model gave {want['sum']}"
    a, b = torch.where(finite_a, a, 0.0), torch.where(finite_b, b, 0.0)
    scale = max(float(a.abs().max()) if a.numel() else 0.0, want["abs"] / n)
    tol = _rtol(want["dtype"]) * scale + 1e-6
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    sum_diff = abs(want["sum"] - got["sum"])
    if diff > tol or sum_diff > _rtol(want["dtype"]) * want["abs"] + 1e-6 * n:
        return (f"values differ by up to {max(diff, sum_diff / n):.3g} on values of about {scale:.3g} "
                f"(sum {got['sum']:.6g} where the saved model gave {want['sum']:.6g})")
    return None


def check(model: nn.Module, fingerprint: Mapping[str, Any], *, path: str = "the file") -> None:
    """Run ``model`` on the fingerprint's probe and compare, layer by layer in execution order.

    Raises:
        LoadError: naming the first layer whose output differs from the saved model's (or that did
            not run), with what differs.
    """
    try:
        calls, outputs = _record(model, fingerprint["inputs"])
    except Exception as exc:
        raise LoadError(f"the model rebuilt from {path} fails on the probe input saved with it: "
                        f"{type(exc).__name__}: {exc}; pass the architecture the model was saved from") from None
    got: dict[tuple[str, int], list] = {}
    seen: dict[str, int] = {}
    for name, kind, stats in calls:
        got[(name, seen.get(name, 0))] = [kind, stats]
        seen[name] = seen.get(name, 0) + 1
    seen = {}
    for name, kind, stats in fingerprint["layers"]:
        key = (name, seen.get(name, 0))
        seen[name] = key[1] + 1
        if key not in got:
            raise LoadError(f"layer '{name}' ({kind}) ran in the saved model but not in the one rebuilt from "
                            f"{path}; pass the architecture the model was saved from")
        if len(stats) != len(got[key][1]):
            raise LoadError(f"the model rebuilt from {path} does not compute what was saved: layer '{name}' "
                            f"({got[key][0]}) returns {len(got[key][1])} tensor(s) where the saved model's "
                            f"returned {len(stats)}; pass the architecture the model was saved from")
        for want, have in zip(stats, got[key][1]):
            why = _difference(want, have)
            if why:
                raise LoadError(
                    f"the model rebuilt from {path} does not compute what was saved: layer '{name}' "
                    f"({got[key][0]}) is the first whose output differs ({why}). Its class or constructor "
                    "arguments differ from the saved model's (another library version, another class, a layer "
                    "built with other arguments); pass the architecture the model was saved from")
    if len(fingerprint["outputs"]) != len(outputs):
        raise LoadError(f"the model rebuilt from {path} returns {len(outputs)} tensor(s) where the saved model "
                        f"returned {len(fingerprint['outputs'])}; pass the architecture the model was saved from")
    for want, have in zip(fingerprint["outputs"], outputs):
        why = _difference(want, have)
        if why:
            raise LoadError(f"the model rebuilt from {path} does not compute what was saved: its output "
                            f"differs ({why}); pass the architecture the model was saved from")
