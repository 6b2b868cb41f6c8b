"""compact() and plan(): the pipeline masks -> graph -> plan -> fold/slice -> verify."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from . import fold, masks
from . import verify as _verify
from .errors import CompactionError, NoPruningFoundError
from .plan import Decision, LayerRow, Report, count_macs, count_params, decide

__all__ = ["compact", "plan"]

Inputs = Union[torch.Tensor, Sequence[Any]]
_MODES = ("exact", "drop")


def _as_tuple(example_inputs: Inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)) and len(example_inputs) > 0:
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a non-empty tuple of the model's positional inputs, "
        f"got {type(example_inputs).__name__}"
    )


def _shapes(batch: tuple) -> str:
    return ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__ for x in batch)


def _check_finite(model: nn.Module) -> None:
    for name, module in model.named_modules():
        for pname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CompactionError(
                    f"layer '{name or type(model).__name__}': {pname} contains NaN or inf; "
                    "fix or retrain these weights before compacting"
                )


def _run(model: nn.Module, batch: tuple) -> Any:
    try:
        with torch.no_grad():
            return model(*batch)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompactionError(
            f"{type(model).__name__} rejected the example input(s) of shape {_shapes(batch)}: {msg}; "
            "pass inputs shaped as its forward() expects (the seeds' LeNet takes (N, 1, 28, 28))"
        ) from None


def _prepare(model: nn.Module, example_inputs: Inputs, mode: str, round_to: Optional[int], extra: int):
    if not isinstance(model, nn.Module):
        raise TypeError(f"compactor expects a torch.nn.Module, got {type(model).__name__}")
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r} should be one of {', '.join(map(repr, _MODES))}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to={round_to!r} should be a positive integer or None")
    example = _as_tuple(example_inputs)
    pruned = masks.pruned_tensors(model)
    reference = masks.clone(model).eval()
    work = masks.bake(model).eval()
    _check_finite(work)
    _run(reference, example)
    batches = _verify.make_batches(example, extra)
    decision = decide(work, batches, mode=mode, round_to=round_to)
    if not pruned and not decision.any_masked:
        raise NoPruningFoundError(
            f"no pruning found in {type(model).__name__}: no layer carries torch.nn.utils.prune masks and none "
            "has all-zero output channels. Prune it first, e.g. prune.ln_structured(model.conv1, 'weight', "
            "amount=0.5, n=2, dim=0), or load a pruned state_dict with compactor.load_pruned(Model, path)"
        )
    return example, batches, reference, work, decision, [t.key for t in pruned]


def _sparsity(model: nn.Module, keys: list[str]) -> dict[str, float]:
    """Share of zeros left in each pruned tensor of the compact model."""
    out = {}
    tensors = dict(model.named_parameters())
    for key in keys:
        t = tensors.get(key)
        if t is not None and t.numel():
            frac = float(t.detach().eq(0).sum()) / t.numel()
            if frac > 0:
                out[key] = frac
    return out


_REPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
             nn.Embedding, nn.PReLU, nn.LayerNorm)


def _snapshot(model: nn.Module, example: tuple) -> tuple[dict[str, tuple[str, tuple, int]], dict[str, int]]:
    """Per reported layer: (op, weight shape, params); and MACs per layer."""
    layers = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, _REPORTED) and isinstance(w, torch.Tensor):
            layers[name] = (type(m).__name__, tuple(w.shape), sum(p.numel() for p in m.parameters(recurse=False)))
    return layers, count_macs(model, example)


def _planned_shape(op: str, shape: tuple, rm_out: int, rm_in: int, depthwise: bool) -> tuple:
    s = list(shape)
    if op == "Embedding":
        s[1] -= rm_out
    else:
        s[0] -= rm_out
        if len(s) > 1 and not depthwise:
            s[1] -= rm_in
    return tuple(s)


def _rows(before, macs_b, after, macs_a, decision: Decision, depthwise: set[str]) -> list[LayerRow]:
    rows = []
    for name, (op, shape_b, p_b) in before.items():
        rm_out = sorted(decision.remove_out.get(name, ()))
        rm_in = sorted(decision.remove_in.get(name, ()))
        if after is not None:
            _, shape_a, p_a = after[name]
            ma = macs_a.get(name, 0)
        else:
            shape_a = _planned_shape(op, shape_b, len(rm_out), len(rm_in), name in depthwise)
            ratio = 1.0
            for a, b in zip(shape_a, shape_b):
                ratio *= a / b if b else 1.0
            p_a = p_b - (int(round(_prod(shape_b) * (1 - ratio))) + (len(rm_out) if p_b > _prod(shape_b) else 0))
            ma = int(round(macs_b.get(name, 0) * ratio))
        rows.append(LayerRow(name, op, shape_b, shape_a, rm_out, rm_in, decision.why.get(name, ""),
                             p_b, p_a, macs_b.get(name, 0), ma))
    return rows


def _prod(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _depthwise(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups > 1}


def plan(model: nn.Module, example_inputs: Inputs, *, mode: str = "exact", round_to: Optional[int] = None) -> Report:
    """Dry run: what :func:`compact` would remove, per layer, and why. Nothing is built or modified.

    Args:
        model: a model pruned with ``torch.nn.utils.prune`` (live masks or baked zeros).
        example_inputs: a tensor or tuple of positional inputs for ``model``.
        mode: ``"exact"`` (fold constants of removed channels) or ``"drop"`` (discard them).
        round_to: keep extra masked channels so every width is a multiple of this.

    Returns:
        A :class:`~compactor.plan.Report`; ``print(report)`` shows the table.

    Example:
        >>> import torch, compactor
        >>> from torch.nn.utils import prune
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
        >>> _ = prune.custom_from_mask(net[0], "weight", torch.tensor([0., 1, 1, 0, 1, 1])[:, None].expand(6, 4))
        >>> compactor.plan(net, torch.randn(1, 4)).layers[0].removed_out
        [0, 3]
    """
    example, _, _, work, decision, _ = _prepare(model, example_inputs, mode, round_to, extra=2)
    before, macs_b = _snapshot(work, example)
    report = Report(mode=mode, groups=decision.notes, folded=_folded(decision))
    report.layers = _rows(before, macs_b, None, None, decision, _depthwise(work))
    report.params_before = count_params(work)
    report.params_after = report.params_before - sum(r.params_before - r.params_after for r in report.layers)
    report.macs_before = sum(macs_b.values())
    report.macs_after = report.macs_before - sum(r.macs_before - r.macs_after for r in report.layers)
    return report


def _folded(decision: Decision) -> list[str]:
    out = []
    for name, f in decision.folds.items():
        how = []
        if f.bias is not None:
            how.append("into its bias")
        if f.border is not None:
            how.append("as an exact border-corrected constant (zero padding)")
        out.append(f"constants of removed channels from {', '.join(dict.fromkeys(f.sources))} -> '{name}' {' and '.join(how)}")
    return out


def compact(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    verify: bool = True,
    mode: str = "exact",
    round_to: Optional[int] = None,
    random_inputs: int = 2,
) -> nn.Module:
    """Return a smaller dense model that computes what the masked ``model`` computes.

    Masked channels are removed from every layer they couple (through BatchNorm,
    activations, pooling, flatten, residual adds, concat); the constant a masked
    channel still emits (its bias, its BatchNorm shift) is folded into the layers
    that consume it. ``model`` is not modified: not its parameters, buffers,
    masks, hooks or training flag.

    Args:
        model: a model pruned with ``torch.nn.utils.prune`` (live masks, masks
            loaded with :func:`compactor.load_pruned`, or zeros baked by ``prune.remove``).
        example_inputs: a tensor or tuple of positional inputs for ``model``.
        verify: compare compact and masked outputs on the example inputs and
            ``random_inputs`` random ones of the same shape; raise if they differ.
        mode: ``"exact"`` or ``"drop"`` (discard removed channels' constants, as
            other tools do; verified against the masked model with them zeroed).
        round_to: keep extra masked channels so each width is a multiple of this.
        random_inputs: how many random batches to verify on besides the example.

    Returns:
        The compact model, in eval mode; ``.compaction_report`` holds the
        :class:`~compactor.plan.Report` with the measured difference.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        NoPruningFoundError: nothing is masked.
        CompactionError: a layer would lose every channel, weights are NaN/inf,
            or the model rejects ``example_inputs``.
        VerificationError: the outputs differ beyond tolerance.

    Example:
        >>> import torch, compactor
        >>> from torch.nn.utils import prune
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
        >>> _ = prune.ln_structured(net[0], "weight", amount=0.5, n=2, dim=0)
        >>> small = compactor.compact(net, torch.randn(3, 4))
        >>> small[0].out_features, small[2].in_features
        (3, 3)
        >>> torch.testing.assert_close(small(torch.ones(1, 4)), net(torch.ones(1, 4)))
    """
    example, batches, reference, work, decision, pruned = _prepare(
        model, example_inputs, mode, round_to, extra=random_inputs
    )
    params_before = count_params(work)
    before, macs_b = _snapshot(work, example)
    compact_model = fold.apply(work, decision).eval()
    after, macs_a = _snapshot(compact_model, example)
    report = Report(mode=mode, groups=decision.notes, folded=_folded(decision))
    report.layers = _rows(before, macs_b, after, macs_a, decision, set())
    report.params_before, report.params_after = params_before, count_params(compact_model)
    report.macs_before, report.macs_after = sum(macs_b.values()), sum(macs_a.values())
    report.sparsity = _sparsity(compact_model, pruned)
    if verify:
        if mode == "drop":
            reference = _zeroed_reference(model, decision)
        report.max_abs_diff, report.tolerance = _verify.check(
            reference, compact_model, batches, "masked" if mode == "exact" else "masked (dropped constants zeroed)"
        )
        report.verified_inputs = len(batches)
    compact_model.compaction_report = report
    return compact_model



def _zeroed_reference(model: nn.Module, decision: Decision) -> nn.Module:
    """The masked model with removed channels zeroed where their consumers read them."""
    ref = masks.clone(model).eval()
    modules = dict(ref.named_modules())
    for name, idxs in decision.zero_inputs.items():
        index = torch.tensor(sorted(idxs), dtype=torch.long)
        conv = isinstance(modules[name], (nn.Conv1d, nn.Conv2d, nn.Conv3d))

        def hook(mod, args, _i=index, _conv=conv):
            x = args[0].clone()
            if _conv:
                x[:, _i.to(x.device)] = 0
            else:
                x[..., _i.to(x.device)] = 0
            return (x,) + tuple(args[1:])

        modules[name].register_forward_pre_hook(hook)
    return ref
