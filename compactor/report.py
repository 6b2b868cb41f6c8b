"""What a compaction did (or, as a dry run, will do), built in one place from the plan and the shapes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from .kinds import kind_of
from .planner import GroupNote, Plan

__all__ = ["LayerRow", "GroupNote", "Report", "Layout", "layout", "build", "report_of"]



@dataclass
class LayerRow:
    """One layer of the report: shapes, channels removed and why, params and MACs."""

    name: str
    op: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    removed_out: list[int]
    removed_in: list[int]
    why: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int


@dataclass(frozen=True)
class Report:
    """What ``compact`` / ``plan`` did, printable as a table."""

    mode: str
    layers: list[LayerRow] = field(default_factory=list)
    groups: list[GroupNote] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)
    sparsity: dict[str, float] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    max_abs_diff: Optional[float] = None
    tolerance: Optional[float] = None
    verified_inputs: int = 0
    #: the fp32 difference exceeded the tolerance, and the compact model was judged against the masked model
    #: run in float64 instead: it is as close to that as the masked model's own fp32 outputs
    judged_in_float64: bool = False
    #: torch parametrizations (weight_norm, ...) frozen to the tensors they compute, in words
    frozen: list[str] = field(default_factory=list)
    #: a Hugging Face model's config: the keys updated to the compact widths, or why it still gives the old ones
    config: str = ""

    def __reduce__(self):
        """Pickled as plain data (a dict): a compact model saved whole with ``torch.save(model)`` (as ultralytics'
        ``YOLO.save`` does) unpickles where compactor is not installed; ``report_of`` then says it has no report."""
        return (dict, (dataclasses.asdict(self),))

    def __copy__(self) -> "Report":
        return self  # frozen: a copy of a model shares its report

    def __deepcopy__(self, memo: dict) -> "Report":
        return self

    def table(self) -> str:
        head = ("layer", "op", "shape before", "shape after", "removed", "params", "MACs", "why")
        rows = [head]
        for r in self.layers:
            removed = []
            if r.removed_out:
                removed.append(f"out {len(r.removed_out)}")
            if r.removed_in:
                removed.append(f"in {len(r.removed_in)}")
            rows.append((
                r.name, r.op, "x".join(map(str, r.shape_before)), "x".join(map(str, r.shape_after)),
                ", ".join(removed) or "-", f"{r.params_before:,} -> {r.params_after:,}",
                f"{r.macs_before:,} -> {r.macs_after:,}", r.why or "-",
            ))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        out = [self.table(), ""]
        pr = self.params_after / self.params_before if self.params_before else 1.0
        mr = self.macs_after / self.macs_before if self.macs_before else 1.0
        out.append(f"params {self.params_before:,} -> {self.params_after:,} ({pr:.1%}); "
                   f"MACs {self.macs_before:,} -> {self.macs_after:,} ({mr:.1%}); mode={self.mode}")
        kept = [g for g in self.groups if g.status != "removed"]
        for g in kept:
            chans = _short(g.channels)
            out.append(f"{g.status}: {', '.join(g.layers)} {g.unit} {chans}: {g.reason}")
        if kept:
            out.append(f"{sum(len(g.channels) for g in kept)} masked channel(s) kept; "
                       "compactor.prune_channels(model, inputs, amount) makes masks that compaction removes entirely")
        for f in self.folded:
            out.append(f"folded: {f}")
        for key, frac in self.sparsity.items():
            out.append(f"sparsity left: {key} is {frac:.1%} zeros inside the kept channels "
                       "(unstructured masks remove only whole rows)")
        for what in self.frozen:
            out.append(f"parametrization: {what} (a plain layer now)")
        if self.config:
            out.append(f"config: {self.config}")
        if self.max_abs_diff is not None and self.judged_in_float64:
            out.append(f"verified on {self.verified_inputs} input(s): max |compact - masked| = "
                       f"{self.max_abs_diff:.3g} in fp32 (summation order); against the masked model in float64 "
                       "the compact model is as close as the masked model's own fp32 outputs")
        elif self.max_abs_diff is not None:
            out.append(f"verified on {self.verified_inputs} input(s): max |compact - masked| = "
                       f"{self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g})")
        return "\n".join(out)


def _short(idxs: Sequence[int], limit: int = 12) -> str:
    idxs = list(idxs)
    s = ",".join(map(str, idxs[:limit]))
    return f"[{s}{',…' if len(idxs) > limit else ''}]"


@dataclass(frozen=True)
class Layout:
    """What a report needs of a model: its reported layers (name -> op) and every parameter's shape."""

    layers: dict[str, str]
    shapes: dict[str, tuple[int, ...]]  # keyed like model.named_parameters(remove_duplicate=False)
    aliases: frozenset[str]  # keys naming a parameter already listed under another key (tied weights)

    def params(self, shapes: Optional[Mapping[str, tuple[int, ...]]] = None) -> int:
        """Parameters of this model (or of ``shapes``, keyed alike), each shared tensor counted once."""
        return sum(math.prod(s) for k, s in (self.shapes if shapes is None else shapes).items()
                   if k not in self.aliases)


def layout(model: nn.Module) -> Layout:
    """The :class:`Layout` of ``model``; its ``shapes`` are what :func:`compactor.fold.new_shapes` predicts."""
    layers = {name: type(m).__name__ for name, m in model.named_modules()
              if kind_of(m) is not None and isinstance(getattr(m, "weight", None), torch.Tensor)}
    first = {k for k, _ in model.named_parameters()}
    shapes = {k: tuple(p.shape) for k, p in model.named_parameters(remove_duplicate=False)}
    return Layout(layers, shapes, frozenset(shapes) - first)


def _key(layer: str, tensor: str) -> str:
    return f"{layer}.{tensor}" if layer else tensor


def _own_params(shapes: Mapping[str, tuple[int, ...]], layer: str) -> int:
    prefix = f"{layer}." if layer else ""
    return sum(math.prod(s) for k, s in shapes.items() if k.startswith(prefix) and "." not in k[len(prefix):])


def _rows(plan: Plan, before: Layout, after: Mapping[str, tuple[int, ...]],
          macs: Mapping[str, int]) -> list[LayerRow]:
    kept = _kept_reasons(plan)
    rows = [_row(name, op, _key(name, "weight"), before.shapes, after, macs, plan, kept)
            for name, op in before.layers.items()]
    for name, cut in plan.cuts.items():
        if cut.parameter_dim is not None:  # a bare nn.Parameter sliced along (a layer scale)
            rows.append(_row(name, "Parameter", name, before.shapes, after, macs, plan, kept))
    for ex in plan.experts:  # fused mixture-of-experts tensors: the same number of neurons left in every expert
        for pname, _, _ in ex.tensors:
            name = f"{ex.name}.{pname}"
            row = _row(name, "Experts", name, before.shapes, after, macs, plan, kept)
            left = f"{len(ex.keep[0])} neurons left per expert"
            rows.append(dataclasses.replace(row, why=f"{left}; {row.why}" if row.why else left))
    return rows


def _kept_reasons(plan: Plan) -> dict[str, str]:
    """Per layer, why masked channels of it were kept (the first note that names it)."""
    out: dict[str, str] = {}
    for note in plan.notes:
        if note.status != "removed":
            for layer in note.layers:
                out.setdefault(layer, f"{len(note.channels)} {note.status}: {note.reason}")
    return out


def _row(name: str, op: str, key: str, before, after, macs, plan: Plan, kept: Mapping[str, str]) -> LayerRow:
    shape_b, shape_a = before[key], after[key]
    own = op not in ("Parameter", "Experts")
    p_b = _own_params(before, name) if own else math.prod(shape_b)
    p_a = _own_params(after, name) if own else math.prod(shape_a)
    mb = macs.get(name, 0)
    ma = int(round(mb * math.prod(shape_a) / math.prod(shape_b))) if mb else 0
    cut = plan.cuts.get(name)
    why = "; ".join(w for w in (cut.why if cut else "", kept.get(name, "")) if w)
    return LayerRow(name, op, shape_b, shape_a, list(cut.out) if cut else [], list(cut.inputs) if cut else [],
                    why, p_b, p_a, mb, ma)


def _folded(plan: Plan) -> list[str]:
    """What was folded where, in words."""
    out = []
    by_layer: dict[str, list] = {}
    for f in plan.folds:
        by_layer.setdefault(f.layer, []).append(f)
    for name, folds in by_layer.items():
        bn = next((f.bn for f in folds if f.bn), None)
        where = f"into the mean of '{bn}'" if bn else "into its bias"
        how = []
        if any(f.target in ("bias", "bn_mean") for f in folds):
            how.append(where + (" (created: the layer had none, a tensor its family's config may not describe)"
                                if any(f.creates_bias for f in folds) else ""))
        for f in folds:
            if f.target == "carrier":
                how.append(f"into the column of its input channel {f.channel}, a kept channel that emits {f.scale:.4g} "
                           "(the conv's own zero padding makes it exact at the border)")
        if any(f.target == "border" for f in folds):
            how.append(f"{where}, plus an exact correction on the zero-padded border")
        if any(f.target == "bn_border" for f in folds):
            how.append(f"{where}, plus an exact correction on the zero-padded border made by '{bn}'")
        sources = dict.fromkeys(s for f in folds for s in f.sources)
        out.append(f"constants of removed channels from {', '.join(sources)} -> '{name}' {' and '.join(how)}")
    return out


@dataclass(frozen=True)
class Verification:
    """What verification found: the largest difference, the tolerance, on how many inputs."""

    max_abs_diff: float
    tolerance: float
    inputs: int
    judged_in_float64: bool = False


def build(plan: Plan, before: Layout, after: Mapping[str, tuple[int, ...]], macs: Mapping[str, int], *,
          sparsity: Optional[Mapping[str, float]] = None, frozen: Sequence[str] = (),
          verification: Optional[Verification] = None, config: str = "") -> Report:
    """The finished report of ``plan``: ``before`` is the baked model's :func:`layout` before compaction.

    ``after`` holds the compact model's parameter shapes: measured on the built model
    (``layout(compact_model).shapes``) by ``compact()``, predicted by ``fold.new_shapes``
    in ``plan()``; ``verification`` is what ``compact()`` checked (None for the dry run).
    """
    rows = _rows(plan, before, after, macs)
    macs_before = sum(macs.values())
    v = verification
    return Report(
        mode=plan.mode, layers=rows, groups=list(plan.notes), folded=_folded(plan),
        sparsity=dict(sparsity or {}), params_before=before.params(), params_after=before.params(after),
        macs_before=macs_before, macs_after=macs_before - sum(r.macs_before - r.macs_after for r in rows),
        max_abs_diff=v.max_abs_diff if v else None, tolerance=v.tolerance if v else None,
        verified_inputs=v.inputs if v else 0, judged_in_float64=v.judged_in_float64 if v else False,
        frozen=list(frozen), config=config,
    )


def report_of(model: nn.Module) -> Report:
    """The :class:`Report` of a model returned by :func:`compactor.compact`.

    Raises:
        TypeError: ``model`` was not made by ``compact()`` (or lost its report, e.g. by a reload).
    """
    report = model.__dict__.get("compaction_report") if isinstance(model, nn.Module) else None
    if not isinstance(report, Report):
        raise TypeError(f"{type(model).__name__} carries no compaction report: report_of() takes a model returned "
                        "by compactor.compact(); compactor.plan(model, inputs) reports on a masked model")
    return report
