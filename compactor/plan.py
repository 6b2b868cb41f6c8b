"""Decide which channels go, per coupled group; what is folded; the report.

The planner works on a baked copy of the model (``masks.bake``): masks applied,
hooks gone. A channel can go when every layer that computes it has an all-zero
weight row for it. It then still carries a constant (its bias, passed through
BatchNorm, activations and pooling); that constant is read off the baked model at
the input of every layer that consumes the channel, checked to be constant over
batch and positions, and folded into that consumer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from . import graph
from .errors import CompactionError
from .tensors import flatten_outputs

__all__ = ["LayerRow", "GroupNote", "Report", "Decision", "decide", "count_macs", "count_params"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


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


@dataclass
class GroupNote:
    """What happened to one coupled group whose channels were (partly) masked."""

    layers: list[str]
    channels: list[int]
    status: str  # "removed", "kept", "partial"
    reason: str


@dataclass
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
        for g in self.groups:
            if g.status != "removed":
                chans = _short(g.channels)
                out.append(f"{g.status}: {', '.join(g.layers)} channels {chans}: {g.reason}")
        for f in self.folded:
            out.append(f"folded: {f}")
        for key, frac in self.sparsity.items():
            out.append(f"sparsity left: {key} is {frac:.1%} zeros inside the kept channels "
                       "(unstructured masks remove only whole rows)")
        if self.max_abs_diff is not None:
            out.append(f"verified on {self.verified_inputs} input(s): max |compact - masked| = "
                       f"{self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g})")
        return "\n".join(out)


def _short(idxs: Sequence[int], limit: int = 12) -> str:
    idxs = list(idxs)
    s = ",".join(map(str, idxs[:limit]))
    return f"[{s}{',…' if len(idxs) > limit else ''}]"


@dataclass
class _Fold:
    """Constants of removed input channels, accumulated per consumer."""

    bias: Optional[torch.Tensor] = None  # (out,)
    border: Optional[torch.Tensor] = None  # (out, *k) for zero-padded convs
    sources: list[str] = field(default_factory=list)


@dataclass
class Decision:
    """The outcome of planning: what to slice and fold, and the notes for the report."""

    remove_out: dict[str, set[int]]
    remove_in: dict[str, set[int]]
    remove_param: dict[str, tuple[int, set[int]]]
    folds: dict[str, _Fold]
    notes: list[GroupNote]
    why: dict[str, str]
    zero_inputs: dict[str, set[int]]  # mode="drop": consumer inputs the reference zeroes
    any_masked: bool
    reference_outputs: list  # the baked model's outputs per batch (drop: with those inputs zeroed)
    macs: dict[str, int]  # per conv / linear, per sample, before compaction
    bn_after: dict[str, str]  # conv -> the BatchNorm that alone reads its output


def dead_rows(module: Any) -> torch.Tensor:
    """Boolean per output channel: True where the layer's weights for it are all zero."""
    if isinstance(module, nn.Embedding):
        return module.weight.detach().eq(0).all(0)
    w = module.weight.detach()
    return torch.count_nonzero(w.reshape(w.shape[0], -1), dim=1) == 0


def zero_columns(module: Any) -> torch.Tensor:
    """Boolean per input channel of a conv (groups=1) / linear: True where no output reads it."""
    w = module.weight.detach()
    return ~w.reshape(w.shape[0], w.shape[1], -1).any(2).any(0)


def _hook_inputs(model: nn.Module, names: set[str], fn) -> list:
    modules = dict(model.named_modules())
    return [modules[n].register_forward_pre_hook(lambda mod, args, _n=n: fn(_n, mod, args)) for n in names]


@dataclass
class _Stats:
    """Per watched input channel of one consumer: its first value and whether it ever varied."""

    idxs: list[int]
    first: Optional[torch.Tensor] = None
    varying: Optional[torch.Tensor] = None

    def update(self, module: nn.Module, x: torch.Tensor) -> None:
        index = torch.tensor(self.idxs, dtype=torch.long, device=x.device)
        v = _channel_view(module, x.detach()).index_select(0, index).double()
        if self.first is None:
            self.first = v[:, 0].clone()
            self.varying = torch.zeros(len(self.idxs), dtype=torch.bool, device=x.device)
        dev = (v - self.first[:, None]).abs().amax(1)
        # a few ulps of the activation's dtype: pooling may round a constant differently at borders
        ulp = torch.finfo(x.dtype).eps if x.is_floating_point() else 0.0
        self.varying |= dev > 16 * ulp * self.first.abs()

    def query(self, local: list[int]) -> tuple[torch.Tensor, list[int]]:
        pos = {c: i for i, c in enumerate(self.idxs)}
        sel = torch.tensor([pos[c] for c in local], dtype=torch.long, device=self.first.device)
        varying = [c for c, v in zip(local, self.varying.index_select(0, sel).tolist()) if v]
        return self.first.index_select(0, sel), varying


def _capture(model: nn.Module, watch: dict[str, list[int]], batches: Sequence[tuple],
             bn_after: Optional[dict[str, str]] = None) -> tuple[dict[str, _Stats], list, dict[str, int], dict[str, str]]:
    """One forward per batch: watched consumer-input channels, the outputs, MACs (first batch), and
    which traced conv -> BatchNorm pairs really hand the BN the conv's output and nothing else."""
    stats = {n: _Stats(sorted(set(idxs))) for n, idxs in watch.items() if idxs}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda mod, args, _s=st: _s.update(mod, args[0]))
             for n, st in stats.items()]
    macs: dict[str, int] = {}
    first = [True]
    for name, m in modules.items():
        if isinstance(m, (nn.Linear,) + _CONV):
            hooks.append(m.register_forward_hook(
                lambda mod, args, out, _n=name: _count(macs, _n, mod, out) if first[0] else None))
    pairs = dict(bn_after or {})
    conv_out: dict[str, Any] = {}
    handed: dict[str, bool] = {}
    for conv, bn in pairs.items():
        hooks.append(modules[conv].register_forward_hook(
            lambda mod, args, out, _c=conv: conv_out.__setitem__(_c, out) if first[0] else None))
        hooks.append(modules[bn].register_forward_pre_hook(
            lambda mod, args, _c=conv: handed.__setitem__(_c, handed.get(_c, True) and args[0] is conv_out.get(_c))
            if first[0] else None))
    outputs = []
    try:
        with torch.no_grad():
            for b in batches:
                outputs.append(model(*b))
                first[0] = False
    finally:
        for h in hooks:
            h.remove()
    returned = {id(t) for t in flatten_outputs(outputs[0])} if outputs else set()
    checked = {c: bn for c, bn in pairs.items() if handed.get(c) and id(conv_out.get(c)) not in returned}
    return stats, outputs, macs, checked


def _count(macs: dict[str, int], name: str, mod: nn.Module, out: torch.Tensor) -> None:
    n = out.shape[0] if out.dim() > 1 else 1
    if isinstance(mod, nn.Linear):
        per = out.numel() // n * mod.in_features
    else:
        k = 1
        for d in mod.kernel_size:
            k *= d
        per = out.numel() // n * (mod.in_channels // mod.groups) * k
    macs[name] = macs.get(name, 0) + per


def _filled(module: nn.Module, x: torch.Tensor, idxs: set[int], value: float) -> torch.Tensor:
    """A copy of ``x`` with channels ``idxs`` (as ``module`` reads or writes them) set to ``value``."""
    index = torch.tensor(sorted(idxs), dtype=torch.long, device=x.device)
    return x.clone().index_fill_(1 if isinstance(module, _CONV) else x.dim() - 1, index, value)


def _channel_view(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Put the channel axis the module reads first, everything else flattened after it."""
    if isinstance(module, _CONV):
        return x.transpose(0, 1).reshape(x.shape[1], -1)
    return x.reshape(-1, x.shape[-1]).t()


_PRODUCERS = ("out", "dw", "gout")
_READERS = ("in", "gin")


def _local(item: graph.Item, roots: set[int]) -> list[int]:
    return [i for i, r in zip(item.idxs, item.root_idxs) if r in roots]


def _roots_where(item: graph.Item, flags: torch.Tensor) -> set[int]:
    """Roots all of whose local indices in ``item`` are flagged."""
    ok: dict[int, bool] = {}
    flag = flags.tolist()
    for i, r in zip(item.idxs, item.root_idxs):
        ok[r] = ok.get(r, True) and flag[i]
    return {r for r, v in ok.items() if v}


def _restrict_grouped(groups: list[graph.Group], cand: dict[int, set[int]]) -> None:
    """A grouped conv loses a whole group of inputs only together with that group's outputs (and vice versa)."""
    changed = True
    while changed:
        changed = False
        convs: dict[str, nn.Module] = {}
        ins: dict[str, set[int]] = {}
        outs: dict[str, set[int]] = {}
        for gi, g in enumerate(groups):
            for it in g.items:
                if it.role in ("gin", "gout"):
                    convs[it.name] = it.module
                    local = set(_local(it, cand.get(gi, set())))
                    (ins if it.role == "gin" else outs).setdefault(it.name, set()).update(local)
        for name, conv in convs.items():
            cin, cout = conv.in_channels // conv.groups, conv.out_channels // conv.groups
            whole = {b for b in range(conv.groups)
                     if set(range(b * cin, (b + 1) * cin)) <= ins.get(name, set())
                     and set(range(b * cout, (b + 1) * cout)) <= outs.get(name, set())}
            for gi, g in enumerate(groups):
                if gi not in cand:
                    continue
                for it in g.items:
                    if it.name != name or it.role not in ("gin", "gout"):
                        continue
                    per = cin if it.role == "gin" else cout
                    bad = {r for i, r in zip(it.idxs, it.root_idxs) if r in cand[gi] and i // per not in whole}
                    if bad:
                        cand[gi] -= bad
                        changed = True


def _probe(work: nn.Module, groups: list[graph.Group], cand: dict[int, set[int]], batch: tuple) -> set[int]:
    """Check the traced channel mapping by running the model once with the candidate channels set to NaN.

    Every layer that reads a candidate channel must see NaN exactly where the trace
    says; NaN is then cleared before it mixes. Returns the groups whose mapping held.
    """
    def run(active: dict[int, set[int]]) -> tuple[set[str], bool]:
        modules = dict(work.named_modules())
        produce: dict[str, set[int]] = {}
        expect: dict[str, set[int]] = {}
        for gi, roots in active.items():
            for it in groups[gi].items:
                if it.role in _PRODUCERS:
                    produce.setdefault(it.name, set()).update(_local(it, roots))
                if it.role in _READERS or it.role == "dw":
                    expect.setdefault(it.name, set()).update(_local(it, roots))
        bad: set[str] = set()

        def pre(name, mod, args):
            x = args[0]
            v = _channel_view(mod, x)
            nan = set(torch.nonzero(torch.isnan(v).any(1)).flatten().tolist())
            if nan != expect.get(name, set()):
                bad.add(name)
            if nan:
                return (torch.nan_to_num(x, nan=0.0),) + tuple(args[1:])
            return None

        readers = set(expect) | {n for n, m in modules.items() if isinstance(m, _CONV + (nn.Linear,))}
        hooks = _hook_inputs(work, readers, pre)
        hooks += [modules[n].register_forward_hook(lambda m, a, o, _i=idx: _filled(m, o, _i, float("nan")))
                  for n, idx in produce.items() if idx]
        try:
            with torch.no_grad():
                out = work(*batch)
        finally:
            for h in hooks:
                h.remove()
            leaked = any(bool(torch.isnan(o).any()) for o in flatten_outputs(out) if o.is_floating_point())
        return bad, leaked

    active = {gi: r for gi, r in cand.items() if r}
    if not active:
        return set()
    bad, leaked = run(active)
    if not bad and not leaked:
        return set(active)
    good = set()
    for gi, roots in active.items():  # find the culprits one group at a time
        b, l = run({gi: roots})
        if not b and not l:
            good.add(gi)
    return good


def decide(
    work: nn.Module,
    batches: Sequence[tuple],
    *,
    mode: str = "exact",
    round_to: Optional[int] = None,
) -> Decision:
    """Plan the compaction of ``work`` (a baked copy in eval mode) and compute the folds."""
    groups, bn_after = graph.trace(work, batches[0])
    modules = dict(work.named_modules())
    notes: list[GroupNote] = []
    why: dict[str, str] = {}
    cand: dict[int, set[int]] = {}
    silent: dict[int, set[int]] = {}  # roots no consumer reads: nothing to fold
    any_masked = False

    owners: dict[int, set[str]] = {}
    for mname, m in modules.items():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(mname)
    tied = {n for names in owners.values() if len(names) > 1 for n in names}

    for gi, g in enumerate(groups):
        producers = [it for it in g.items if it.role in _PRODUCERS]
        readers = [it for it in g.items if it.role in _READERS]
        if not producers:
            continue
        dead_sets = [_roots_where(it, dead_rows(it.module)) for it in producers]
        every = set.intersection(*dead_sets)
        some = set.union(*dead_sets)
        unread: set[int] = set()
        if readers and all(it.role == "in" for it in readers):
            unread_sets = [_roots_where(it, zero_columns(it.module)) for it in readers]
            unread = set.intersection(*unread_sets)
            some |= set.union(*unread_sets)
        if not some:
            continue
        any_masked = True
        layers = g.layers()
        removable = every | unread
        if some - removable:
            notes.append(GroupNote(layers, sorted(some - removable), "partial",
                                   "masked in some but not all of the layers that compute or read them; kept"))
        if not removable:
            continue
        if g.reaches_output:
            notes.append(GroupNote(layers, sorted(removable), "kept", "these channels are the model's output"))
            continue
        shared = sorted({it.name for it in g.items if it.name in tied})
        if shared:
            notes.append(GroupNote(layers, sorted(removable), "kept",
                                   f"{', '.join(shared)}: weights tied with another layer; slicing would untie them"))
            continue
        blocked = [it for it in g.items if it.role == "blocked"]
        if blocked:
            notes.append(GroupNote(layers, sorted(removable), "kept",
                                   "; ".join(sorted({f"{it.name}: {it.reason}" for it in blocked}))))
            continue
        if len(removable) == g.size:
            names = ", ".join(sorted({it.name for it in producers}))
            raise CompactionError(
                f"layer '{names}': the masks remove all {g.size} of its output channels, which would leave "
                "a zero-width layer; prune a smaller amount of this layer (or remove it from the model)"
            )
        cand[gi] = removable
        silent[gi] = unread

    def restrict() -> None:
        before = {gi: set(r) for gi, r in cand.items()}
        _restrict_grouped(groups, cand)
        for gi in before:
            if before[gi] - cand[gi]:
                names = sorted({it.name for it in groups[gi].items if it.role in ("gin", "gout")})
                notes.append(GroupNote(groups[gi].layers(), sorted(before[gi] - cand[gi]), "kept",
                                       f"grouped conv {', '.join(names)}: only whole groups (inputs and outputs) can go"))

    def reject(gi: int, roots: set[int], reason: str) -> None:
        roots = roots & cand[gi]
        if roots:
            notes.append(GroupNote(groups[gi].layers(), sorted(roots), "kept", reason))
            cand[gi] -= roots

    restrict()
    probed: set[int] = set()
    watch: dict[str, list[int]] = {}
    if mode == "exact":
        for gi, roots in cand.items():
            for it in groups[gi].items:
                if it.role == "in":
                    watch.setdefault(it.name, []).extend(_local(it, roots - silent[gi]))
    stats, outputs, macs, bn_after = _capture(work, watch, batches, bn_after)
    while True:
        snapshot = {gi: len(r) for gi, r in cand.items()}
        unprobed = {gi: r for gi, r in cand.items() if r and gi not in probed}
        good = _probe(work, groups, unprobed, batches[0])
        for gi in unprobed:
            probed.add(gi)
            if gi not in good:
                reject(gi, set(cand[gi]), "the traced channel mapping did not hold when checked on the model "
                                          "(e.g. a channel shuffle or a reshape that moves channels)")
        if mode == "exact":
            for gi, rset in cand.items():
                for it in groups[gi].items:
                    local = _local(it, rset - silent[gi]) if it.role == "in" else []
                    if not local:
                        continue
                    _, varying = stats[it.name].query(local)
                    if varying:
                        roots = {r for i, r in zip(it.idxs, it.root_idxs) if i in set(varying)}
                        reject(gi, roots, f"not constant where '{it.name}' reads them (e.g. gated by another "
                                          "tensor, or pooled over zero padding)")
        if round_to:
            for gi, roots in cand.items():
                size = groups[gi].size
                keep = size - len(roots)
                extra = min(len(roots), min(size, -(-keep // round_to) * round_to) - keep)
                if extra > 0:
                    reject(gi, set(sorted(roots)[-extra:]), f"round_to={round_to}: widths kept at a multiple")
        restrict()
        if snapshot == {gi: len(r) for gi, r in cand.items()}:
            break

    folds: dict[str, _Fold] = {}
    zero_inputs: dict[str, set[int]] = {}
    accepted: list[tuple[graph.Group, set[int]]] = []
    for gi, rset in cand.items():
        if not rset:
            continue
        g = groups[gi]
        accepted.append((g, rset))
        for it in g.items:
            local = _local(it, rset - silent[gi]) if it.role == "in" else []
            if not local:
                continue
            if mode == "drop":
                zero_inputs.setdefault(it.name, set()).update(local)
            else:
                values, _ = stats[it.name].query(local)
                _add_fold(folds.setdefault(it.name, _Fold()), modules[it.name], local, values, g.root)

    remove_out: dict[str, set[int]] = {}
    remove_in: dict[str, set[int]] = {}
    remove_param: dict[str, tuple[int, set[int]]] = {}
    for g, rset in accepted:
        notes.append(GroupNote(g.layers(), sorted(rset), "removed", "masked in every layer that computes or reads them"))
        for it in g.items:
            local = set(_local(it, rset))
            if it.role in _PRODUCERS:
                remove_out.setdefault(it.name, set()).update(local)
                why.setdefault(it.name, "weight rows all zero")
            if it.role in ("dw", "in", "gin"):
                remove_in.setdefault(it.name, set()).update(local)
                if it.role == "in":
                    why.setdefault(it.name, f"follows {g.root}")
            elif it.role == "slice":
                if isinstance(it.module, nn.Parameter):
                    remove_param.setdefault(it.name, (it.dim, set()))[1].update(local)
                else:
                    remove_out.setdefault(it.name, set()).update(local)
                    why.setdefault(it.name, f"follows {g.root}")
    if mode == "drop" and zero_inputs:
        outputs = _zeroed_outputs(work, zero_inputs, batches)
    return Decision(remove_out, remove_in, remove_param, folds, notes, why, zero_inputs, any_masked, outputs, macs,
                    bn_after)


def _zeroed_outputs(work: nn.Module, zero_inputs: dict[str, set[int]], batches: Sequence[tuple]) -> list:
    """Outputs of the masked model with removed channels zeroed where consumers read them ("drop" semantics)."""
    modules = dict(work.named_modules())

    hooks = [modules[n].register_forward_pre_hook(lambda m, a, _i=idx: (_filled(m, a[0], _i, 0.0),) + tuple(a[1:]))
             for n, idx in zero_inputs.items()]
    try:
        with torch.no_grad():
            return [work(*b) for b in batches]
    finally:
        for h in hooks:
            h.remove()


def _add_fold(fold: _Fold, module: nn.Module, local: list[int], values: torch.Tensor, source: str) -> None:
    weight = module.weight.detach()
    index = torch.tensor(local, dtype=torch.long, device=weight.device)
    w = weight.index_select(1, index).double()  # only the removed columns, in float64
    v = values.to(w.device)
    fold.sources.append(source)
    if isinstance(module, nn.Linear):
        delta = w @ v
        fold.bias = delta if fold.bias is None else fold.bias + delta
        return
    kernel = torch.einsum("oc...,c->o...", w, v)
    zero_padded = module.padding_mode == "zeros" and (
        module.padding == "same" or (not isinstance(module.padding, str) and any(module.padding))
    )
    if zero_padded:
        fold.border = kernel if fold.border is None else fold.border + kernel
    else:
        delta = kernel.reshape(kernel.shape[0], -1).sum(1)
        fold.bias = delta if fold.bias is None else fold.bias + delta


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, inputs: tuple) -> dict[str, int]:
    """Multiply-accumulates per conv / linear layer for one forward of ``inputs``, per sample."""
    return _capture(model, {}, [inputs])[2]
