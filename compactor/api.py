"""compact() and plan(): the pipeline masks -> graph -> plan -> fold/slice -> verify."""

from __future__ import annotations

import math

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from . import fold, masks
from . import verify as _verify
from .errors import CompactionError, NoPruningFoundError, VerificationError
from .tensors import flatten_outputs, make_batches
from .plan import Decision, LayerRow, Report, count_params, decide

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
    return ", ".join(f"of shape {tuple(x.shape)} ({str(x.dtype).replace('torch.', '')}, {x.device})"
                     if isinstance(x, torch.Tensor) else type(x).__name__ for x in batch)


def _check_finite(model: nn.Module) -> None:
    for name, module in model.named_modules():
        for pname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CompactionError(
                    f"layer '{name or type(model).__name__}': {pname} contains NaN or inf; "
                    "fix or retrain these weights before compacting"
                )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _run(model: nn.Module, batch: tuple) -> Any:
    try:
        with torch.no_grad():
            return model(*batch)
    except Exception as exc:
        raise CompactionError(
            f"{type(model).__name__} rejected the example input(s) {_shapes(batch)}: {_first_line(exc)}; "
            "pass inputs of the shape, dtype and device its forward() expects (model.to(x.device) if they differ)"
        ) from None


def _run_masked(model: nn.Module, batch: tuple) -> Any:
    """Run the user's masked model in eval mode; its training flags are restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            return model(*batch)
    finally:
        for m, flag in flags:
            m.training = flag


def _prepare(model: nn.Module, example_inputs: Inputs, mode: str, round_to: Optional[int], extra: int):
    if not isinstance(model, nn.Module):
        raise TypeError(f"compactor expects a torch.nn.Module, got {type(model).__name__}")
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r} should be one of {', '.join(map(repr, _MODES))}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to={round_to!r} should be a positive integer or None")
    if not isinstance(extra, int) or extra < 0:
        raise ValueError(f"random_inputs={extra!r} should be a non-negative integer")
    example = _as_tuple(example_inputs)
    pruned = masks.pruned_tensors(model)
    work = masks.bake(model).eval()
    _check_finite(work)
    batches = make_batches(example, extra)
    try:
        decision = decide(work, batches, mode=mode, round_to=round_to)
    except CompactionError:
        raise
    except Exception as exc:
        list(flatten_outputs(_run(work, example)))  # a rejected input or an output type, said clearly
        raise CompactionError(
            f"could not trace {type(model).__name__} to find its channel dependencies: {_first_line(exc)}"
        ) from exc
    if not pruned and not decision.any_masked:
        raise NoPruningFoundError(
            f"no pruning found in {type(model).__name__}: no layer carries torch.nn.utils.prune masks and none "
            "has all-zero output channels. Prune it first, e.g. prune.ln_structured(model.conv1, 'weight', "
            "amount=0.5, n=2, dim=0), or load a pruned state_dict with compactor.load_pruned(Model, path)"
        )
    return example, batches, work, decision, [t.key for t in pruned]


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


def _layers(model: nn.Module) -> dict[str, tuple[str, tuple, int]]:
    """Per reported layer: (op, weight shape, params)."""
    layers = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, _REPORTED) and isinstance(w, torch.Tensor):
            layers[name] = (type(m).__name__, tuple(w.shape), sum(p.numel() for p in m.parameters(recurse=False)))
    return layers


def _planned(model: nn.Module, decision: Decision) -> dict[str, tuple[str, tuple, int]]:
    """What :func:`_layers` would say of the compact model, derived from the plan alone."""
    out = {}
    modules = dict(model.named_modules())
    for name, (op, shape, params) in _layers(model).items():
        s = list(shape)
        rm_out = len(decision.remove_out.get(name, ()))
        rm_in = len(decision.remove_in.get(name, ()))
        if op == "Embedding":
            s[1] -= rm_out
        else:
            s[0] -= rm_out
            if len(s) > 1 and getattr(modules[name], "groups", 1) == 1:
                s[1] -= rm_in
        bias = getattr(modules[name], "bias", None)
        n_bias = bias.numel() - rm_out if isinstance(bias, torch.Tensor) else 0
        folded = decision.folds.get(name)
        if folded is not None and folded.bias is not None and fold.absorbing_bn(name, modules, decision) is None \
                and not isinstance(bias, torch.Tensor):
            n_bias = s[0]  # folding creates the bias
        others = params - math.prod(shape) - (bias.numel() if isinstance(bias, torch.Tensor) else 0)
        out[name] = (op, tuple(s), math.prod(s) + n_bias + max(others, 0))
    return out


def _rows(before, after, macs_b: dict[str, int], decision: Decision) -> list[LayerRow]:
    rows = []
    for name, (op, shape_b, p_b) in before.items():
        _, shape_a, p_a = after[name]
        mb = macs_b.get(name, 0)
        ma = int(round(mb * math.prod(shape_a) / math.prod(shape_b))) if mb else 0
        rows.append(LayerRow(name, op, shape_b, shape_a, sorted(decision.remove_out.get(name, ())),
                             sorted(decision.remove_in.get(name, ())), decision.why.get(name, ""), p_b, p_a, mb, ma))
    return rows


def _report(mode: str, decision: Decision, before, after, params_before: int, params_after: int,
            folded: list[str]) -> Report:
    report = Report(mode=mode, groups=decision.notes, folded=folded)
    report.layers = _rows(before, after, decision.macs, decision)
    report.params_before, report.params_after = params_before, params_after
    report.macs_before = sum(decision.macs.values())
    report.macs_after = report.macs_before - sum(r.macs_before - r.macs_after for r in report.layers)
    return report


def plan(model: nn.Module, example_inputs: Inputs, *, mode: str = "exact", round_to: Optional[int] = None,
         random_inputs: int = 2) -> Report:
    """Dry run: what :func:`compact` would remove, per layer, and why. Nothing is built or modified.

    Args:
        model: a model pruned with ``torch.nn.utils.prune`` (live masks or baked zeros).
        example_inputs: a tensor or tuple of positional inputs for ``model``.
        mode: ``"exact"`` (fold constants of removed channels) or ``"drop"`` (discard them).
        round_to: keep extra masked channels so every width is a multiple of this.
        random_inputs: random batches besides the example on which constants are checked
            (as in :func:`compact`; the same value gives the same plan).

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
    with _verify.full_precision():
        _, _, work, decision, _ = _prepare(model, example_inputs, mode, round_to, extra=random_inputs)
    before, after = _layers(work), _planned(work, decision)
    params_before = count_params(work)
    params_after = params_before - sum(before[n][2] - after[n][2] for n in before)
    return _report(mode, decision, before, after, params_before, params_after, _folded(work, decision))


def _folded(work: nn.Module, decision: Decision) -> list[str]:
    """What was folded where, in words; ``work`` as it is before folding."""
    out = []
    modules = dict(work.named_modules())
    for name, f in decision.folds.items():
        bn = fold.absorbing_bn(name, modules, decision)
        where = f"into the mean of '{decision.bn_after[name]}'" if bn is not None else "into its bias"
        how = []
        if f.bias is not None:
            how.append(where)
        if f.border is not None:
            how.append(f"{where}, plus an exact correction on the zero-padded border")
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
    with _verify.full_precision():
        return _compact(model, example_inputs, verify, mode, round_to, random_inputs)


def _compact(model: nn.Module, example_inputs: Inputs, verify: bool, mode: str, round_to: Optional[int],
             random_inputs: int) -> nn.Module:
    example, batches, work, decision, pruned = _prepare(model, example_inputs, mode, round_to, extra=random_inputs)
    params_before = count_params(work)
    before = _layers(work)
    folded = _folded(work, decision)
    compact_model = fold.apply(work, decision).eval()
    report = _report(mode, decision, before, _layers(compact_model), params_before, count_params(compact_model), folded)
    report.sparsity = _sparsity(compact_model, pruned)
    if verify:
        try:
            with torch.no_grad():
                got = [compact_model(*b) for b in batches]
        except Exception as exc:
            raise VerificationError(
                f"the compact model failed to run on the example input(s): {_first_line(exc)}; this is a bug in "
                "compactor: please report it with the model (compact(..., mode='drop') or keeping the layer unpruned "
                "may work around it)"
            ) from None
        what = "masked" if mode == "exact" else "masked (dropped constants zeroed)"
        c = _verify.check(decision.reference_outputs, got, what)
        diff, tol = c.max_abs_diff, c.tolerance
        if mode == "exact":  # and against the user's own masked model, hooks and all
            c2 = _verify.check([_run_masked(model, example)], got[:1], what)
            diff, tol = max(diff, c2.max_abs_diff), min(tol, c2.tolerance)
        report.max_abs_diff, report.tolerance = diff, tol
        report.verified_inputs = len(batches)
    compact_model.compaction_report = report
    return compact_model
