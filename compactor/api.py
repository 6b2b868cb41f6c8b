"""compact() and plan(): the pipeline masks -> graph -> planner -> fold -> report -> verify."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from . import fingerprint, fold, graph, hfconfig, masks, probe, report as _report
from . import verify as _verify
from .errors import CompactionError, NoPruningFoundError, VerificationError
from .planner import Border, Mode, Plan, make_plan
from .progress import Progress
from .report import Report
from .tensors import Inputs, as_inputs, call, describe, first_line, flatten_outputs, give_back_memory, make_batches

__all__ = ["compact", "plan"]

_MODES = ("exact", "drop")
_BORDERS = ("carrier", "layers")


def _check_finite(model: nn.Module) -> None:
    for name, module in model.named_modules():
        for pname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            # a finite sum (one fast pass) proves every entry finite; else look closer (a large sum may overflow)
            if t.is_floating_point() and not bool(torch.isfinite(t.detach().sum())) and not bool(torch.isfinite(t).all()):
                raise CompactionError(
                    f"layer '{name or type(model).__name__}': {pname} contains NaN or inf; "
                    "fix or retrain these weights before compacting"
                )


def _rejected(model: nn.Module, batch: tuple, exc: BaseException) -> CompactionError:
    return CompactionError(
        f"{type(model).__name__} rejected the example input(s) {describe(batch)}: {first_line(exc)}; "
        "pass inputs of the shape, dtype and device its forward() expects (model.to(x.device) if they differ)"
    )


def _run(model: nn.Module, batch: tuple) -> Any:
    try:
        with torch.no_grad():
            return call(model, batch)
    except Exception as exc:
        raise _rejected(model, batch, exc) from None


def _run_masked(model: nn.Module, batch: tuple) -> Any:
    """Run the user's masked model in eval mode; its training flags are restored afterwards."""
    with probe.evaluating(model):
        return _run(model, batch)


@dataclass
class _Prepared:
    """What :func:`_prepare` hands the builders: the inputs, the baked copy and its plan."""

    example: tuple
    batches: list
    work: nn.Module  # the baked copy (the user's model itself with inplace=True)
    plan: Plan
    measured: probe.Measurements
    pruned: list[str]  # the keys of the tensors that carried masks
    masked_output: Any  # the user's masked model on the example (exact mode)
    frozen: list[str]  # parametrizations frozen to the tensors they compute


def _prepare(model: nn.Module, example_inputs: Inputs, mode: str, round_to: Optional[int], extra: int,
             progress: Progress, inplace: bool = False, border: str = "carrier"):
    if not isinstance(model, nn.Module):
        raise TypeError(f"compactor expects a torch.nn.Module, got {type(model).__name__}")
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r} should be one of {', '.join(map(repr, _MODES))}")
    if border not in _BORDERS:
        raise ValueError(f"border={border!r} should be one of {', '.join(map(repr, _BORDERS))}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to={round_to!r} should be a positive integer or None")
    if not isinstance(extra, int) or extra < 0:
        raise ValueError(f"random_inputs={extra!r} should be a non-negative integer")
    example = as_inputs(example_inputs)
    with progress.stage("reading the masks"):
        pruned = masks.pruned_tensors(model)
        # the user's own masked model, hooks and all: what the compact model must compute
        masked_output = _run_masked(model, example) if mode == "exact" else None
        work = (masks.bake_(model) if inplace else masks.bake(model)).eval()
        frozen = masks.freeze_parametrizations_(work)
        _check_finite(work)
    with progress.stage("freezing weight-standardized convs"):
        try:
            frozen += masks.freeze_weight_transforms_(work, example)
        except Exception as exc:
            raise _rejected(model, example, exc) from None
    batches = make_batches(example, extra)
    failure: Optional[BaseException] = None
    try:
        the_plan, measured = make_plan(work, batches, mode=mode, round_to=round_to, border=border,
                                       progress=progress)
    except CompactionError:
        raise
    except MemoryError:
        raise CompactionError(
            f"ran out of memory while {progress.current} for {type(model).__name__}; free memory, pass a smaller "
            "example input (a batch of 1 is enough), or compact with inplace=True to save a copy of the model"
        ) from None
    except Exception as exc:
        failure = exc.with_traceback(None)  # drop the failed trace's frames (and memory) before running again
    if failure is not None:
        list(flatten_outputs(_run(work, example)))  # a rejected input or an output type, said clearly
        if isinstance(failure, graph.TraceError):
            raise CompactionError(
                f"could not trace {type(model).__name__} to find its channel dependencies: {first_line(failure)}"
            ) from failure
        raise CompactionError(
            f"{type(model).__name__} failed while {progress.current}: {first_line(failure)}; the random inputs are "
            "drawn like the example's values: if the model accepts only the example's exact values, pass "
            "random_inputs=0"
        ) from failure
    if not pruned and not the_plan.any_masked:
        raise NoPruningFoundError(
            f"no pruning found in {type(model).__name__}: no layer carries torch.nn.utils.prune masks and none "
            "has all-zero output channels. Prune it first: compactor.prune_channels(model, inputs, 0.5) masks "
            "channels compaction removes entirely (or prune.ln_structured(model.conv1, 'weight', amount=0.5, n=2, "
            "dim=0) per layer), or load a pruned state_dict with compactor.load_pruned(Model, path)"
        )
    return _Prepared(example, batches, work, the_plan, measured, [t.key for t in pruned], masked_output, frozen)


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


def plan(model: nn.Module, example_inputs: Inputs, *, mode: Mode = "exact", round_to: Optional[int] = None,
         border: Border = "carrier", random_inputs: int = 2, progress: Optional[bool] = None, time_limit: Optional[float] = None) -> Report:
    """Dry run: what :func:`compact` would remove, per layer, and why. Nothing is built or modified.

    Args:
        model: a model pruned with ``torch.nn.utils.prune`` (live masks or baked zeros).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs
            (a tokenizer's output) for ``model``.
        mode: ``"exact"`` (fold constants of removed channels) or ``"drop"`` (discard them).
        round_to: keep extra masked channels so every width is a multiple of this.
        border: as in :func:`compact`.
        random_inputs: random batches besides the example on which constants are checked
            (as in :func:`compact`; the same value gives the same plan).
        progress, time_limit: as in :func:`compact`.

    Returns:
        A :class:`~compactor.report.Report`; ``print(report)`` shows the table.

    Example:
        >>> import torch, compactor
        >>> from torch.nn.utils import prune
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
        >>> _ = prune.custom_from_mask(net[0], "weight", torch.tensor([0., 1, 1, 0, 1, 1])[:, None].expand(6, 4))
        >>> compactor.plan(net, torch.randn(1, 4)).layers[0].removed_out
        [0, 3]
    """
    with _verify.full_precision():
        p = _prepare(model, example_inputs, mode, round_to, random_inputs, Progress(progress, time_limit),
                     border=border)
    return _report.build(p.plan, _report.layout(p.work), fold.new_shapes(p.work, p.plan), p.measured.macs,
                         frozen=p.frozen)


def compact(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    verify: bool = True,
    mode: Mode = "exact",
    round_to: Optional[int] = None,
    border: Border = "carrier",
    random_inputs: int = 2,
    inplace: bool = False,
    progress: Optional[bool] = None,
    time_limit: Optional[float] = None,
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
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs
            (a tokenizer's output) for ``model``.
        verify: compare compact and masked outputs on the example inputs and
            ``random_inputs`` random ones of the same shape; raise if they differ.
        mode: ``"exact"`` or ``"drop"`` (discard removed channels' constants, as
            other tools do; verified against the masked model with them zeroed).
        round_to: keep extra masked channels so each width is a multiple of this.
        border: where a zero-padded conv receives removed channels' constants (exact mode):
            ``"carrier"`` keeps one masked channel per such group whose column in the conv carries
            them all, so the compact model holds only the model's own layer classes (plain
            ``nn.Conv2d``, ``nn.BatchNorm2d``, a library's own subclasses) and stays exact under any
            tool that fuses, converts or reloads them; ``"layers"`` removes that channel too and
            makes the conv or its BatchNorm a compactor ``BorderCorrected*`` layer (opt-in: one
            channel narrower, but only compactor's own code runs it exactly).
        random_inputs: how many random batches to verify on besides the example.
        inplace: turn ``model`` itself into the compact model instead of copying it: its masks
            are made permanent (as ``prune.remove`` does), its parametrizations frozen and its layers sliced. Saves one copy
            of the model's memory, for models near the machine's limit. An error raised before
            slicing leaves ``model`` with its masks made permanent, computing what it computed.
        progress: print each stage's time to standard error: ``None`` once the run has taken
            2 s, ``True`` always, ``False`` never.
        time_limit: stop with :class:`CompactionError` once this many seconds have passed
            (checked between stages and inside the long loops).

    Returns:
        The compact model, in eval mode; ``.compaction_report`` holds the
        :class:`~compactor.report.Report` with the measured difference
        (also :func:`compactor.report_of`).

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
        return _compact(model, example_inputs, verify, mode, round_to, random_inputs, inplace,
                        Progress(progress, time_limit), border)


def _compact(model: nn.Module, example_inputs: Inputs, verify: bool, mode: Mode, round_to: Optional[int],
             random_inputs: int, inplace: bool, progress: Progress, border: Border = "carrier") -> nn.Module:
    p = _prepare(model, example_inputs, mode, round_to, random_inputs, progress, inplace, border)
    example, batches, work, the_plan, measured, masked_output = (p.example, p.batches, p.work, p.plan, p.measured,
                                                                 p.masked_output)
    reference = measured.outputs
    if mode == "drop" and the_plan.dropped:
        reference = probe.zeroed_outputs(work, the_plan.dropped, batches)
    before = _report.layout(work)
    with progress.stage("building the compact model"):
        compact_model = fold.apply(work, the_plan).eval()
        old_config, config_said = hfconfig.describe_widths_(compact_model)
        if inplace:  # the removed rows' memory goes back before the verifying forwards take theirs
            give_back_memory()
    checked = None
    if verify:
        with progress.stage("verifying"):
            masked = None if inplace or mode != "exact" else model
            try:
                checked = _verify_compact(compact_model, batches, reference, masked_output, mode, masked)
            except VerificationError:
                if not old_config:
                    raise
                for key, value in old_config.items():  # the forward reads the config: give it the old values
                    setattr(compact_model.config, key, value)
                checked = _verify_compact(compact_model, batches, reference, masked_output, mode, masked)
                config_said = ("model.config still gives the original widths: the model computes otherwise with "
                               "the compact ones (its forward reads them)")
    compact_model.compaction_report = _report.build(  # built once, finished
        the_plan, before, _report.layout(compact_model).shapes, measured.macs,
        sparsity=_sparsity(compact_model, p.pruned), frozen=p.frozen, verification=checked, config=config_said)
    compact_model.__dict__["compaction_probe"] = fingerprint.probe_inputs(example)  # save()'s fingerprint input
    return compact_model


def _verify_compact(compact_model: nn.Module, batches: list, reference: list, masked_output: Any, mode: str,
                    masked: Optional[nn.Module] = None) -> _report.Verification:
    """Compare the compact model with the reference outputs; return what was found (raise if they differ).

    When the fp32 comparison fails and the user's masked model is at hand (``masked``), both are
    judged against the masked model run in float64: a compact model no farther from that than the
    masked model's own fp32 error is exact (large outputs, long sums: the two sum in another order).
    """
    try:
        with torch.no_grad():
            got = [call(compact_model, b) for b in batches]
    except Exception as exc:
        raise VerificationError(
            f"the compact model failed to run on the example input(s): {first_line(exc)}; this is a bug in "
            "compactor: please report it with the model (compact(..., mode='drop') or keeping the layer unpruned "
            "may work around it)"
        ) from None
    what = "masked" if mode == "exact" else "masked (dropped constants zeroed)"
    try:
        c = _verify.check(reference, got, what)
        diff, tol = c.max_abs_diff, c.tolerance
        if mode == "exact":  # and against the user's own masked model, hooks and all
            c2 = _verify.check([masked_output], got[:1], what)
            diff, tol = max(diff, c2.max_abs_diff), min(tol, c2.tolerance)
    except VerificationError:
        if masked is None or not _verify.within_float32_error(masked, batches, reference, got):
            raise
        return _report.Verification(_verify.compare(reference, got).max_abs_diff, float("nan"), len(batches),
                                    judged_in_float64=True)
    return _report.Verification(diff, tol, len(batches))
