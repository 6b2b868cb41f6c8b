"""``prune_channels``: torch.nn.utils.prune masks that compaction then removes entirely.

Per-layer masks (``prune.ln_structured`` on each layer) rarely agree across coupled
layers, so compaction must keep most of them. This pruner picks channels per *coupled
group*, as the dependency graph sees it, and masks every layer that computes them:

- a unit is one channel of a group (every producer's row for it), or, where grouped
  convs join two groups, one whole conv group: its input channels and its output
  channels together;
- a unit's importance is the norm of all its rows over every producer (``"l2"``,
  ``"l1"``, or a callable);
- groups compaction must keep are never masked: the model's outputs, tied weights,
  operations that mix or normalize channels (LayerNorm, attention, fixed slices),
  mappings compactor does not understand, and the layers in ``ignore``;
- before touching the model, the chosen masks are checked with a dry run of
  :func:`compactor.plan`: a unit the planner would keep is left unmasked.

The masks go through ``prune.custom_from_mask``, so they stack with earlier ones,
survive ``prune.remove``, and save as ``*_orig`` / ``*_mask`` state_dicts.
"""

from __future__ import annotations

import contextlib
import gc
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.utils import prune

from . import experts as experts_rule
from . import importance as importance_rule
from . import graph, hfconfig, masks, planner, probe
from .api import _check_finite
from . import heads as heads_rule
from .errors import CompactionError
from .kinds import BATCHNORM, kind_of, out_major
from .tensors import Inputs, as_inputs, give_back_memory, make_batches

__all__ = ["Importance", "GroupPruning", "PruneReport", "prune_channels"]

#: ``"l2"`` / ``"l1"``: the norm of a unit's rows over every producer; ``"activation"`` / ``"taylor"``: measured on
#: calibration data (:mod:`compactor.importance`); or a callable taking a unit's rows (one tensor per producer,
#: shape (rows, ...)) and returning a score (lower goes first).
Importance = Union[Literal["l1", "l2", "activation", "taylor"], Callable[[list[torch.Tensor]], float]]
_MEASURED = ("activation", "taylor")

_PRODUCERS = planner.PRODUCER_ROLES
Unit = tuple[int, int]  # (group index, root channel)


@dataclass(frozen=True)
class GroupPruning:
    """What :func:`prune_channels` did to one coupled group (or groups joined by grouped convs)."""

    layers: tuple[str, ...]  # the layers whose rows were masked
    units: int  # channels (or whole conv groups) in the group
    masked: int  # of them masked now (already-masked ones included when chosen again)
    channels: int  # output channels masked, summed over the group's producers
    score: float  # mean importance of the masked units (before masking)


@dataclass
class PruneReport:
    """Per coupled group, what was masked; and what was left alone, with why."""

    amount: Union[float, int]
    scope: str
    groups: list[GroupPruning] = field(default_factory=list)
    skipped: list[tuple[tuple[str, ...], str]] = field(default_factory=list)  # (layers, why)
    dropped: int = 0  # units tried, then left unmasked because compaction would keep them
    calibration: Optional[tuple[int, float]] = None  # (batches, seconds) measured for a data-aware importance
    adjusted: list[str] = field(default_factory=list)  # counts changed from what was asked (uniform=True), why

    def __str__(self) -> str:
        head = ("group (layers masked)", "units", "masked", "rows masked", "mean score")
        rows = [head] + [(", ".join(g.layers[:3]) + (" …" if len(g.layers) > 3 else ""), str(g.units),
                          str(g.masked), str(g.channels), f"{g.score:.3g}") for g in self.groups]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        units = sum(g.units for g in self.groups)
        masked = sum(g.masked for g in self.groups)
        lines.append("")
        if masked:
            lines.append(f"masked {masked} of {units} units in {len(self.groups)} groups (amount={self.amount}, "
                         f"scope={self.scope}); compact() removes all of them")
        else:
            lines.append(f"masked nothing (amount={self.amount}, scope={self.scope}): no group could be pruned")
        if self.dropped:
            lines.append(f"{self.dropped} unit(s) left unmasked: the dry run showed compaction would keep them "
                         "(others of their group were masked instead where there were any)")
        if self.calibration:
            lines.append(f"scored on {self.calibration[0]} calibration batch(es) in {self.calibration[1]:.1f} s")
        lines.extend(self.adjusted)
        for layers, why in self.skipped:
            lines.append(f"not pruned: {', '.join(layers[:4])}{' …' if len(layers) > 4 else ''}: {why}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- units


class _Units:
    """Union-find over (group, root) pairs: grouped convs join a conv group's inputs and outputs."""

    def __init__(self) -> None:
        self.parent: dict[Unit, Unit] = {}

    def find(self, u: Unit) -> Unit:
        self.parent.setdefault(u, u)
        while self.parent[u] != u:
            self.parent[u] = self.parent[self.parent[u]]
            u = self.parent[u]
        return u

    def union(self, a: Unit, b: Unit) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def components(self) -> dict[Unit, list[Unit]]:
        out: dict[Unit, list[Unit]] = {}
        for u in list(self.parent):
            out.setdefault(self.find(u), []).append(u)
        return out


def _why_not(g: graph.Group, tied: set[str], ignored: set[str]) -> str:
    """Why group ``g`` gets no mask: the planner's own reasons (:func:`compactor.planner.why_blocked`: the
    model's output, tied weights, a blocked operation), plus what only masking has (a mapping not understood,
    no producer, ``ignore``)."""
    if g.unclear:
        return g.unclear
    if not any(it.role in _PRODUCERS for it in g.items):
        return "no layer computes these channels"
    names = {it.name for it in g.items}
    if names & ignored and not g.reaches_output:
        return f"{', '.join(sorted(names & ignored))}: in ignore"
    return planner.why_blocked(g, tied)


def _units(groups: list[graph.Group], ok: set[int]) -> tuple[list[list[Unit]], set[int]]:
    """The units (lists of (group, root)) of the eligible groups, and the groups a grouped conv made ineligible."""
    uf = _Units()
    for gi in ok:
        for r in range(groups[gi].size):
            uf.find((gi, r))
    for block in planner.conv_group_blocks(groups).values():  # a conv group's inputs and outputs: one unit
        members = [p for side in ("gin", "gout") for pairs in block[side].values() for p in sorted(pairs)]
        for u in members[1:]:
            uf.union(members[0], u)
    bad = set()
    units = []
    for comp in uf.components().values():
        if any(gi not in ok for gi, _ in comp):
            bad.update(gi for gi, _ in comp)
            continue
        units.append(sorted(comp))
    return [u for u in units if not any(gi in bad for gi, _ in u)], bad


def _rows(item: graph.Item, roots: set[int], scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The weight rows (Embedding: columns) of ``item`` that belong to ``roots``, each times ``scale`` of its
    channel where given (the BatchNorm after it)."""
    local = planner.local_indices(item, roots)
    w = out_major(item.module)
    index = torch.tensor(local, dtype=torch.long, device=w.device)
    rows = w.index_select(0, index)
    if scale is None:
        return rows
    return rows * scale.to(rows.device, rows.dtype).index_select(0, index).reshape(-1, *[1] * (rows.dim() - 1))


def _bn_scales(work: nn.Module, bn_after: dict[str, str]) -> dict[str, torch.Tensor]:
    """Per conv that a BatchNorm alone reads, that BatchNorm's per-channel scale |weight| / sqrt(var + eps) in
    eval mode: what a row's output is multiplied by before anything else reads it."""
    modules = dict(work.named_modules())
    out = {}
    for conv, name in bn_after.items():
        bn = modules[name]
        if getattr(bn, "running_var", None) is None:
            continue
        scale = (bn.running_var.detach().double() + bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.detach().double().abs()
        out[conv] = scale
    return out


def _taylor_parts(name: str, module: nn.Module, local: list[int]) -> list[tuple[str, int, list[int]]]:
    """The parameter entries a unit's masks zero in layer ``name`` (a producer's rows and bias, a BatchNorm's
    weight and bias): (parameter name, dimension, indices)."""
    parts = [(f"{name}.weight", kind_of(module).out_dim_of("weight"), local)]
    if isinstance(getattr(module, "bias", None), torch.Tensor):
        parts.append((f"{name}.bias", 0, local))
    return parts


def _measured_score(groups: list[graph.Group], unit: list[Unit], evidence: importance_rule.Evidence,
                    params: dict[str, torch.Tensor]) -> Optional[float]:
    """A unit's "activation" or "taylor" score (:mod:`compactor.importance`); None when nothing measured it."""
    reads, parts = [], []
    for gi in sorted({gi for gi, _ in unit}):
        roots = {r for g, r in unit if g == gi}
        for it in groups[gi].items:
            if not isinstance(it.module, nn.Module):
                continue
            local = planner.local_indices(it, roots)
            if it.role == "in":
                reads.append((it.name, it.module, local))
            elif it.role in _PRODUCERS or (it.role == "slice" and isinstance(it.module, BATCHNORM)):
                parts += _taylor_parts(it.name, it.module, local)
    if evidence.kind == "activation":
        return importance_rule.activation_score(evidence, reads)
    return importance_rule.taylor_score(evidence, params, parts)


def _score(groups: list[graph.Group], unit: list[Unit], importance: Importance,
           scales: Optional[dict[str, torch.Tensor]] = None) -> float:
    rows = []
    scales = {} if callable(importance) else (scales or {})  # a callable sees the plain weight rows
    for gi in sorted({gi for gi, _ in unit}):
        roots = {r for g, r in unit if g == gi}
        rows += [_rows(it, roots, scales.get(it.name)) for it in groups[gi].items if it.role in _PRODUCERS]
    return _norm(rows, importance)


def _norm(rows: list[torch.Tensor], importance: Importance) -> float:
    """A unit's score from its rows over every producer: l2, l1, or the user's callable."""
    if callable(importance):
        return float(importance(rows))
    if importance == "l1":
        return float(sum(r.double().abs().sum() for r in rows))
    return math.sqrt(float(sum(r.double().pow(2).sum() for r in rows)))


# --------------------------------------------------------------------------- selection


def _quota(amount: Union[float, int], n: int) -> int:
    return int(round(amount * n)) if isinstance(amount, float) else int(amount)


def _keep_enough(n: int, k: int, round_to: Optional[int], cap: Optional[float]) -> int:
    """How many of ``n`` units to mask when asked for ``k``: at least one stays, widths a multiple of round_to."""
    k = min(k, n - 1)
    if cap is not None:
        k = min(k, int(math.floor(cap * n)))
    if round_to and k > 0:
        k = n - min(n, -(-(n - k) // round_to) * round_to)
    return max(k, 0)


def _select(clusters: list[list[list[Unit]]], scores: list[list[float]], amount: Union[float, int], scope: str,
            round_to: Optional[int], cap: Optional[float]) -> list[set[int]]:
    """Per cluster, the indices of the units to mask (lowest scores first)."""
    if scope == "local":
        out = []
        for units, sc in zip(clusters, scores):
            k = _keep_enough(len(units), _quota(amount, len(units)), round_to, cap)
            out.append(set(sorted(range(len(units)), key=lambda i: (sc[i], i))[:k]))
        return out
    # global: scores normalized by each cluster's mean, so a layer of small weights is not emptied
    ranked = []
    for c, sc in enumerate(scores):
        mean = sum(sc) / len(sc) if sc else 1.0
        ranked += [(s / mean if mean > 0 else 0.0, c, i) for i, s in enumerate(sc)]
    ranked.sort()
    total = _quota(amount, len(ranked))
    limit = [_keep_enough(len(u), len(u), round_to, cap if cap is not None else 0.9) for u in clusters]
    taken: list[set[int]] = [set() for _ in clusters]
    for _, c, i in ranked:
        if sum(map(len, taken)) >= total:
            break
        if len(taken[c]) < limit[c]:
            taken[c].add(i)
    if round_to:  # widths of each cluster a multiple of round_to: give back the highest-scored extras
        for c, chosen in enumerate(taken):
            k = _keep_enough(len(clusters[c]), len(chosen), round_to, None)
            for i in sorted(chosen, key=lambda i: -scores[c][i])[:len(chosen) - k]:
                chosen.discard(i)
    return taken


# --------------------------------------------------------------------------- masks


def _masks(groups: list[graph.Group], units: Iterable[list[Unit]], norms: bool = True) -> dict[str, torch.Tensor]:
    """Per producer layer, the boolean rows (Embedding: columns) to mask; with ``norms``, also the channels of
    the BatchNorms sliced along (their weight and bias masked too, so a masked channel emits exactly 0 and
    compaction has no constant to carry)."""
    rows: dict[str, torch.Tensor] = {}
    for unit in units:
        for gi in {gi for gi, _ in unit}:
            roots = {r for g, r in unit if g == gi}
            for it in groups[gi].items:
                if not (it.role in _PRODUCERS or (norms and it.role == "slice" and isinstance(it.module, BATCHNORM))):
                    continue
                n = kind_of(it.module).out_rows(it.module)
                flags = rows.setdefault(it.name, torch.zeros(n, dtype=torch.bool))
                local = planner.local_indices(it, roots)
                if local:
                    flags[torch.tensor(local, dtype=torch.long)] = True
    return rows


def _mask(module: nn.Module, flags: torch.Tensor, name: str = "weight") -> torch.Tensor:
    return kind_of(module).row_mask(module, flags, name)


def _masked_tensors(module: nn.Module) -> list[str]:
    """The tensors a masked row zeroes: the weight, and the bias where there is one (not an Embedding's)."""
    return ["weight"] + (["bias"] if isinstance(getattr(module, "bias", None), torch.Tensor) else [])


#: A mask to add once every choice is made: ("rows", layer, flags), ("columns", layer, flags) or
#: ("experts", module, ((experts, neurons) flags, its Experts)).
Pending = tuple[str, str, Any]


def _row_masks(rows: dict[str, torch.Tensor]) -> list[Pending]:
    return [("rows", name, flags) for name, flags in rows.items()]


def _zero_(t: torch.Tensor, dim: int, flags: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Zero the flagged entries of ``t`` along ``dim``; returns (their indices, their old values), or None."""
    idx = torch.nonzero(flags).flatten().to(t.device)
    if not idx.numel():
        return None
    old = t.index_select(dim, idx)
    t.index_fill_(dim, idx, 0)
    return idx, old


def _expert_keep(t: torch.Tensor, flags: torch.Tensor, ex: Any, dim: int, halves: int) -> torch.Tensor:
    """The 0/1 keep mask of an experts tensor ``t`` from (experts, neurons) ``flags``, broadcastable to ``t``: gate
    neurons, then up neurons where ``halves`` is 2."""
    shape = [ex.experts] + [1] * (t.dim() - 1)
    shape[dim] = flags.shape[1] * halves
    return flags.repeat(1, halves).logical_not().to(t.dtype).reshape(shape)


def _bake_into(model: nn.Module, pending: Sequence[Pending]) -> None:
    """Zero what the masks would zero in ``model``'s tensors themselves, as ``prune.remove`` leaves them: no mask
    buffer, no second copy. A tensor under an earlier live mask has its ``*_orig`` zeroed too (and its computed
    tensor, until the next forward recomputes it)."""

    def targets(module: nn.Module, tname: str) -> list[torch.Tensor]:
        found = [getattr(module, tname + "_orig", None), getattr(module, tname, None)]
        return [t for t in found if isinstance(t, torch.Tensor)]

    with torch.no_grad():
        for what, name, flags in pending:
            module = model.get_submodule(name)
            if what == "rows":
                for tname in _masked_tensors(module):
                    for t in targets(module, tname):
                        _zero_(t, kind_of(module).out_dim_of(tname), flags)
            elif what == "columns":
                for t in targets(module, "weight"):
                    _zero_(t, 1 - kind_of(module).out_dim_of("weight"), flags)
            else:
                flags, ex = flags
                for pname, dim, halves in ex.tensors(module):
                    for t in targets(module, pname):
                        t.mul_(_expert_keep(t, flags, ex, dim, halves))


def _apply(model: nn.Module, pending: Sequence[Pending]) -> None:
    """Add the masks to ``model`` through torch's own prune API (stacking with earlier masks), each built from
    its flags only now, one layer at a time."""
    for what, name, flags in pending:
        module = model.get_submodule(name)
        if what == "rows":
            for tname in _masked_tensors(module):
                if isinstance(getattr(module, tname, None), torch.Tensor):
                    prune.custom_from_mask(module, tname, _mask(module, flags, tname))
        elif what == "columns":
            prune.custom_from_mask(module, "weight", _o_mask(module, flags))
        else:
            flags, ex = flags
            for pname, dim, halves in ex.tensors(module):
                t = getattr(module, pname)  # the mask is a view (the hook keeps it)
                prune.custom_from_mask(module, pname, _expert_keep(t, flags, ex, dim, halves).expand_as(t))


@contextlib.contextmanager
def _zeroed(work: nn.Module, rows: dict[str, torch.Tensor],
            columns: Optional[dict[str, torch.Tensor]] = None) -> Iterator[None]:
    """``work`` (a baked copy) with the ``rows`` zeroed (weight and bias, as prune.remove would leave them) and the
    input ``columns`` of some layers, inside the block; only those entries are saved and put back after, so
    the dry runs need no second copy of the model."""
    saved = []

    def zero(t: torch.Tensor, dim: int, flags: torch.Tensor) -> None:
        done = _zero_(t, dim, flags)
        if done is not None:
            saved.append((t, dim, *done))

    try:
        with torch.no_grad():
            for name, flags in rows.items():
                module = work.get_submodule(name)
                for tname in _masked_tensors(module):
                    t = getattr(module, tname, None)
                    if isinstance(t, torch.Tensor):
                        zero(t, kind_of(module).out_dim_of(tname), flags)
            for name, flags in (columns or {}).items():
                module = work.get_submodule(name)
                zero(module.weight, 1 - kind_of(module).out_dim_of("weight"), flags)
        yield
    finally:
        with torch.no_grad():
            for t, dim, idx, old in reversed(saved):
                t.index_copy_(dim, idx, old)


def _removed(groups: list[graph.Group], unit: list[Unit], gone: dict[str, set[int]]) -> bool:
    """Whether the dry run removes every producer row of ``unit`` (``gone``: per layer, the rows its plan cuts)."""
    for gi in {gi for gi, _ in unit}:
        roots = {r for g, r in unit if g == gi}
        for it in groups[gi].items:
            if it.role in _PRODUCERS:
                cut = gone.get(it.name, set())
                if any(i not in cut for i in planner.local_indices(it, roots)):
                    return False
    return True


def _dry_run(work: nn.Module, groups: list[graph.Group], clusters: list[list[list[Unit]]], scores: list[list[float]],
             chosen: list[set[int]], example: tuple, report: PruneReport, rounds: int = 3) -> set[tuple[int, int]]:
    """Zero the chosen rows (in place, put back after) and plan; a unit the planner would keep is replaced by the next
    lowest-scored one of its cluster, for a few rounds. Returns the (cluster, unit) pairs that all go."""
    wanted = [len(c) for c in chosen]
    accepted: set[tuple[int, int]] = set()
    tried: set[tuple[int, int]] = set()
    todo = {(c, i) for c, idx in enumerate(chosen) for i in idx}
    batches = make_batches(example, 2)
    for _ in range(rounds):
        if not todo:
            break
        tried |= todo
        try:
            with _zeroed(work, _masks(groups, [clusters[c][i] for c, i in accepted | todo])):
                the_plan, _ = planner.make_plan(work, batches)
        except CompactionError as exc:
            raise CompactionError(f"prune_channels: the chosen masks could not be planned ({exc}); "
                                  "lower amount, or pass the failing layers in ignore") from None
        gone = {name: set(cut.out) for name, cut in the_plan.cuts.items()}
        for c, i in accepted | todo:
            (accepted.add if _removed(groups, clusters[c][i], gone) else accepted.discard)((c, i))
        todo = set()
        for c, want in enumerate(wanted):
            have = sum(1 for cc, _ in accepted if cc == c)
            spare = sorted((i for i in range(len(clusters[c])) if (c, i) not in tried), key=lambda i: (scores[c][i], i))
            todo |= {(c, i) for i in spare[:want - have]}
    report.dropped = len(tried - accepted)
    return accepted


def _o_mask(o_mod: nn.Module, cols: torch.Tensor) -> torch.Tensor:
    """A mask of the O projection's weight zeroing the input columns ``cols`` (booleans)."""
    return kind_of(o_mod).column_mask(o_mod, cols)


def _block_pattern(names: Sequence[str]) -> str:
    """Layer names with their block numbers left out: the same for the same layers of every repeated block."""
    return ",".join(sorted(re.sub(r"\.\d+(\.|$)", r".#\1", n) for n in names))


def _equalize(clusters: list[list[list[Unit]]], scores: list[list[float]], chosen: list[set[int]],
              groups: list[graph.Group], keys: list[tuple[int, ...]], round_to: Optional[int]) -> None:
    """``uniform``: clusters of the same layers in different blocks (same width) mask the same number of units,
    the mean of what the selection gave them, each its own lowest-scored."""
    by_pattern: dict[tuple, list[int]] = {}
    for c, k in enumerate(keys):
        names = {it.name for gi in k for it in groups[gi].items if it.role in _PRODUCERS}
        by_pattern.setdefault((_block_pattern(sorted(names)), len(clusters[c])), []).append(c)
    for (_, n), members in by_pattern.items():
        want = _keep_enough(n, int(round(sum(len(chosen[c]) for c in members) / len(members))), round_to, None)
        for c in members:
            chosen[c] = set(sorted(range(n), key=lambda i: (scores[c][i], i))[:want])


def _describable(model: nn.Module, att: heads_rule.Attention, wanted: int, cache: dict) -> tuple[int, str]:
    """How many of ``att``'s key/value heads to remove, nearest ``wanted``, so that ``model``'s Hugging Face
    config can describe what is left: the family's class built (on the meta device) from the compact config
    must have those head counts. Returns (count, what was adjusted, in words, or '')."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not wanted:
        return wanted, ""

    def builds(gone: int) -> bool:
        key = (att.heads, att.kv_heads, att.head_dim, gone)
        if key not in cache:
            left_kv = att.kv_heads - gone
            left = left_kv * att.group
            try:
                new = hfconfig.validated(config, heads_rule.config_updates(config, left, left_kv, att.head_dim))
                found = heads_rule.find(hfconfig.built_on_meta(model, new))
                cache[key] = bool(found) and all((a.heads, a.kv_heads, a.head_dim) == (left, left_kv, att.head_dim)
                                                 for a in found)
            except Exception:  # the config class rejects the counts, or the model cannot be built from them
                cache[key] = False
        return cache[key]

    for gone in sorted(range(1, att.kv_heads), key=lambda g: (abs(g - wanted), g)):
        if builds(gone):
            if gone == wanted:
                return gone, ""
            return gone, (f"heads: {gone} of {att.kv_heads} key/value heads per attention module instead of "
                          f"{wanted}: {type(config).__name__} describes {att.heads - gone * att.group} query heads, "
                          f"not {att.heads - wanted * att.group}")
    return 0, (f"heads: none removed: {type(config).__name__} cannot describe fewer heads (its class, built from "
               "the compact config, has other attention shapes)")


def _prune_heads(model: nn.Module, work: nn.Module, example: tuple, amount: Union[float, int], ignored: set[str],
                 tied: set[str], importance: Importance, report: PruneReport, describable: bool = False,
                 evidence: Optional[importance_rule.Evidence] = None) -> list[Pending]:
    """Mask whole key/value heads (with their query heads) in each attention module the head rule understands.

    The chosen heads are zeroed in a copy first and planned by the head rule (layout checked on the model);
    a module where the rule would keep them is left unmasked, with the reason. With ``describable``, the count
    is one the model's Hugging Face config can describe (:func:`_describable`).
    """
    modules = dict(work.named_modules())
    built: dict = {}
    chosen = []  # (attention, KV heads, row flags per q/k/v layer, O column flags, scores)
    for att in heads_rule.find(work):
        layers = tuple(dict.fromkeys((att.q, att.k, att.v, att.o)))
        if set(layers) & (ignored | tied) or att.name in ignored:
            report.skipped.append((layers, "in ignore" if set(layers) & ignored else "weights tied with another layer"))
            continue
        q, k, v, o = (out_major(modules[n]) for n in (att.q, att.k, att.v, att.o))
        scores = []
        params = dict(work.named_parameters())
        for j in range(att.kv_heads):
            rows = {which: torch.tensor(att.rows(which, [j])) for which in "qkv"}
            if evidence is not None and evidence.kind == "activation":
                scores.append(importance_rule.activation_score(evidence, [(att.o, modules[att.o], att.q_rows([j]))])
                              or 0.0)
            elif evidence is not None:
                o_dim = 1 - kind_of(modules[att.o]).out_dim_of("weight")  # O's input columns
                parts = [p for which, name in (("q", att.q), ("k", att.k), ("v", att.v))
                         for p in _taylor_parts(name, modules[name], att.rows(which, [j]))]
                scores.append(importance_rule.taylor_score(evidence, params,
                                                           parts + [(f"{att.o}.weight", o_dim, att.q_rows([j]))]))
            else:
                scores.append(_norm([q[rows["q"]], k[rows["k"]], v[rows["v"]],
                                     o[:, torch.tensor(att.q_rows([j]))].t()], importance))
        n = _keep_enough(att.kv_heads, _quota(amount, att.kv_heads), None, None)
        if describable:
            n, adjusted = _describable(model, att, n, built)
            if adjusted and adjusted not in report.adjusted:
                report.adjusted.append(adjusted)
        gone = sorted(sorted(range(att.kv_heads), key=lambda j: (scores[j], j))[:n])
        if not gone:
            continue
        flags: dict[str, torch.Tensor] = {}
        for name, which in ((att.q, "q"), (att.k, "k"), (att.v, "v")):
            f = flags.setdefault(name, torch.zeros(out_major(modules[name]).shape[0], dtype=torch.bool))
            f[torch.tensor(att.rows(which, gone))] = True
        cols = torch.zeros(att.heads * att.head_dim, dtype=torch.bool)
        cols[att.q_rows(gone)] = True
        chosen.append((att, gone, flags, cols, scores))
    if not chosen:
        return []
    rows: dict[str, torch.Tensor] = {}
    columns: dict[str, torch.Tensor] = {}
    for att, _, flags, cols, _ in chosen:
        for name, f in flags.items():
            rows[name] = rows[name] | f if name in rows else f
        columns[att.o] = columns[att.o] | cols if att.o in columns else cols
    with _zeroed(work, rows, columns):  # the dry run
        planned = heads_rule.plan_heads(work, tied, example)
    pending: list[Pending] = []
    for att, gone, flags, cols, scores in chosen:
        layers = tuple(dict.fromkeys((att.q, att.k, att.v, att.o)))
        v_rows = set(planned.cuts[att.v].out) if att.v in planned.cuts else set()
        if not all(flags[att.v][r] <= (r in v_rows) for r in range(len(flags[att.v]))):
            why = next((n.reason for n in planned.notes if att.v in n.layers and n.status != "removed"),
                       "kept by the head rule")
            report.skipped.append((layers, why))
            report.dropped += len(gone)
            continue
        pending += _row_masks(flags) + [("columns", att.o, cols)]
        report.groups.append(GroupPruning(layers=layers, units=att.kv_heads, masked=len(gone),
                                          channels=int(sum(int(f.sum()) for f in flags.values())),
                                          score=sum(scores[j] for j in gone) / len(gone)))
    return pending


class _GradView(nn.Module):
    """An experts module's gradients where its tensors are (what :func:`compactor.experts.neuron_tensors` reads)."""

    def __init__(self, evidence: importance_rule.Evidence, name: str) -> None:
        super().__init__()
        for pname in ("gate_up_proj", "down_proj", "gate_up_proj_bias"):
            grad = evidence.grads.get(f"{name}.{pname}")
            if grad is not None:
                self.register_buffer(pname, grad)


def _prune_experts(work: nn.Module, amount: Union[float, int], ignored: set[str], tied: set[str],
                   importance: Importance, round_to: Optional[int], report: PruneReport,
                   evidence: Optional[importance_rule.Evidence] = None) -> list[Pending]:
    """Mask the same number of neurons in every expert of each fused mixture-of-experts module
    (:mod:`compactor.experts`), lowest score first in each expert: both their gate and up rows and their down
    column. Whole experts are never masked (removing one changes the router's top-k choice)."""
    pending: list[Pending] = []
    for ex in experts_rule.find(work):
        layers = (f"{ex.name}.gate_up_proj", f"{ex.name}.down_proj")
        if ex.name in ignored or ex.name in tied:
            report.skipped.append((layers, "in ignore" if ex.name in ignored else "weights tied with another layer"))
            continue
        t = experts_rule.neuron_tensors(work.get_submodule(ex.name), ex)
        k = _keep_enough(ex.neurons, _quota(amount, ex.neurons), round_to, None)
        if not k:
            continue
        gone = torch.zeros(ex.experts, ex.neurons, dtype=torch.bool)
        total = 0.0
        parts = [t["gate"].double(), t["up"].double(), t["down"].double()]
        if evidence is not None and evidence.kind == "taylor" and f"{ex.name}.gate_up_proj" in evidence.grads:
            g = experts_rule.neuron_tensors(_GradView(evidence, ex.name), ex)
            all_scores = sum((a.double() * b).sum(-1) for a, b in zip((g["gate"], g["up"], g["down"]), parts)).abs()
        elif importance in ("l2", *_MEASURED):  # every neuron of every expert at once: (E, I); activation: weights
            all_scores = sum(p.pow(2).sum(-1) for p in parts).sqrt()
        elif importance == "l1":
            all_scores = sum(p.abs().sum(-1) for p in parts)
        else:
            all_scores = torch.tensor([[_norm([p[e, j:j + 1] for p in parts], importance) for j in range(ex.neurons)]
                                       for e in range(ex.experts)], dtype=torch.float64)
        for e in range(ex.experts):
            scores = all_scores[e].tolist()
            chosen = sorted(range(ex.neurons), key=lambda j: (scores[j], j))[:k]
            gone[e, chosen] = True
            total += sum(scores[j] for j in chosen)
        pending.append(("experts", ex.name, (gone, ex)))
        report.groups.append(GroupPruning(layers=layers, units=ex.experts * ex.neurons, masked=ex.experts * k,
                                          channels=ex.experts * k * 3, score=total / (ex.experts * k)))
    return pending


# --------------------------------------------------------------------------- the function


def _check_args(amount, importance, scope, round_to, max_amount, what: str = "amount") -> None:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or (
            isinstance(amount, float) and not 0.0 <= amount < 1.0) or (isinstance(amount, int) and amount < 0):
        raise ValueError(f"prune_channels: {what}={amount!r} should be a float in [0, 1) or a non-negative integer")
    if not (callable(importance) or importance in ("l1", "l2", *_MEASURED)):
        raise ValueError(f"prune_channels: importance={importance!r} should be 'l2', 'l1', 'activation', 'taylor' "
                         "or a callable")
    if scope not in ("local", "global"):
        raise ValueError(f"prune_channels: scope={scope!r} should be 'local' or 'global'")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"prune_channels: round_to={round_to!r} should be a positive integer or None")
    if max_amount is not None and not (isinstance(max_amount, (int, float)) and 0 < max_amount <= 1):
        raise ValueError(f"prune_channels: max_amount={max_amount!r} should be a fraction in (0, 1] or None")


def _names(model: nn.Module, ignore: Sequence[Union[str, nn.Module]]) -> set[str]:
    by_module = {m: n for n, m in model.named_modules()}
    out = set()
    for x in ignore:
        if isinstance(x, nn.Module):
            if x not in by_module:
                raise ValueError(f"prune_channels: ignore holds a {type(x).__name__} that is not part of the model")
            prefix = by_module[x]
        elif isinstance(x, str):
            if x not in dict(model.named_modules()):
                raise ValueError(f"prune_channels: ignore names '{x}', which the model does not have")
            prefix = x
        else:
            raise TypeError(f"prune_channels: ignore takes layer names or modules, got {type(x).__name__}")
        out.update(n for n in by_module.values() if n == prefix or n.startswith(prefix + ".") or not prefix)
    return out


def prune_channels(
    model: nn.Module,
    example_inputs: Inputs,
    amount: Union[float, int],
    *,
    importance: Importance = "l2",
    scope: Literal["local", "global"] = "local",
    round_to: Optional[int] = None,
    ignore: Sequence[Union[str, nn.Module]] = (),
    max_amount: Optional[float] = None,
    heads: Optional[Union[float, int]] = None,
    uniform: bool = False,
    calibration: Optional[Iterable] = None,
    max_batches: Optional[int] = None,
    loss_fn: Optional[importance_rule.LossFn] = None,
    bake: bool = False,
) -> PruneReport:
    """Mask whole coupled channel groups of ``model`` in place, so that :func:`compactor.compact` removes them all.

    Like torch's own prune functions, this adds ``torch.nn.utils.prune`` masks (stacking with
    earlier ones); fine-tune with them on, then compact.

    Args:
        model: the model to prune (modified in place: masks added).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs, to trace the model.
        amount: a fraction in [0, 1) of each group's units (``scope="local"``) or of all units
            (``"global"``), or a count, as in torch's prune functions. In fused mixture-of-experts
            tensors (:mod:`compactor.experts`) this share of every expert's neurons, the same count in each.
        importance: ``"l2"`` / ``"l1"`` norm of a unit's rows over all its producers (a conv's rows times the
            scale of the BatchNorm that alone reads it, ``|weight| / sqrt(running_var + eps)``, as its output
            is); ``"activation"`` (what its readers use of it on the calibration data: rms of the channel
            times the reading weight column's norm) or ``"taylor"`` (``|sum(grad * weight)|`` over what its
            masks zero), both in :mod:`compactor.importance`; or a callable taking the plain rows (a list of
            tensors) and returning a score; low scores go first.
        scope: ``"local"`` masks ``amount`` of every group; ``"global"`` ranks units across groups,
            each group's scores divided by their mean so no group of small weights is emptied.
        round_to: leave each group's width a multiple of this.
        ignore: layers (names or modules; a module covers its children) never to mask, nor
            anything coupled with them.
        max_amount: at most this fraction of any one group (default for ``"global"``: 0.9).
            Every group keeps at least one unit.
        heads: in attention modules the head rule understands (LLaMA, Mistral, Qwen2, BERT-style,
            ViT, GPT-2, Phi-3, GPT-NeoX, Falcon: :mod:`compactor.heads`), this fraction (or count)
            of key/value heads per module, each with its query heads: their Q, K, V rows and O
            columns are masked, lowest norm first; at least one stays (``round_to`` does not apply
            to heads). ``None`` leaves attention alone.
        calibration: for ``importance="activation"`` / ``"taylor"``, an iterable of batches: model inputs of
            the kinds ``example_inputs`` takes (with ``loss_fn``, whatever it takes); default: the example
            alone. Read once, up to ``max_batches``.
        max_batches: at most this many calibration batches.
        loss_fn: for ``"taylor"``, ``loss_fn(model, batch) -> loss`` (a scalar tensor); default: a Hugging
            Face causal LM's own loss with its input ids as labels.
        uniform: the same number of units from every repeated block (layers whose names differ only
            by their block number; each layer still chooses its own by importance), and, for a Hugging
            Face model, head counts its config can describe (the nearest count to ``heads`` for which
            the family's own class, built from the compact config, has those shapes; said in the
            report): the compact model then saves with :func:`compactor.save_pretrained`.
        bake: zero the chosen rows in the tensors themselves, as ``prune.remove`` leaves them, instead of adding
            masks: no mask buffer and no second copy of each masked tensor, and (for ``"l2"``, ``"l1"``,
            ``"activation"`` on a model without live masks) no working copy either: the choice is made on
            ``model`` itself, its tensors put back after each trial. For models near the machine's memory;
            :func:`compactor.compact` (``inplace=True``) removes the zeros. Nothing is left to fine-tune with.

    Returns:
        A :class:`PruneReport`: per group, its units, how many were masked and their score.

    Example:
        >>> import torch, compactor
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(8, 4, 3)).eval()
        >>> report = compactor.prune_channels(net, torch.randn(2, 3, 8, 8), 0.5)
        >>> int(net[0].weight_mask.flatten(1).any(1).sum())  # 4 of conv0's 8 rows masked
        4
        >>> compactor.compact(net, torch.randn(2, 3, 8, 8))[0].out_channels
        4
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune_channels expects a torch.nn.Module, got {type(model).__name__}")
    _check_args(amount, importance, scope, round_to, max_amount)
    if heads is not None:
        _check_args(heads, importance, scope, round_to, max_amount, what="heads")
    example = as_inputs(example_inputs, who="prune_channels")
    ignored = _names(model, ignore)
    _check_finite(model)  # NaN weights would make every trial fail, each for a reason that is not the real one
    in_place = bake and importance != "taylor" and not masks.pruned_tensors(model) and not _parametrized(model)
    # bake=True on a model without live masks: scored and tried on the model itself (eval mode inside, every
    # module's training flag restored after; each trial's rows put back); otherwise on a baked copy
    with probe.evaluating(model) if in_place else contextlib.nullcontext():
        report = _choose(model, in_place, example, amount, importance, scope, round_to, ignored, max_amount, heads,
                         uniform, calibration, max_batches, loss_fn, bake)
    give_back_memory()
    return report


def _parametrized(model: nn.Module) -> bool:
    from torch.nn.utils import parametrize

    return any(parametrize.is_parametrized(m) for m in model.modules())


def _choose(model: nn.Module, in_place: bool, example: tuple, amount, importance, scope, round_to,
            ignored: set[str], max_amount, heads, uniform: bool, calibration, max_batches, loss_fn,
            bake: bool) -> PruneReport:
    """Choose the units on a baked copy of ``model`` (on ``model`` itself when ``in_place``), then mask (or zero)
    them in ``model``. The copy is made and dropped here, so nothing else holds it when the masks are made."""
    work = model if in_place else masks.bake(model).eval()
    groups, bn_after = graph.trace(work, example)
    scales = _bn_scales(work, bn_after)
    tied = planner.tied_layers(work)
    report = PruneReport(amount=amount, scope=scope)
    ok = set()
    attentions = heads_rule.find(work)
    if heads and not attentions:
        raise CompactionError(
            f"heads={heads!r}, but {type(model).__name__} has no attention module the head rule recognizes (q/k/v/o "
            "projections as in LLaMA, Mistral, Qwen2, BERT, DistilBERT, ViT, GPT-2, Phi-3, GPT-NeoX or Falcon); the "
            "model is unchanged; leave heads out to prune channels only")
    owned = {n for att in attentions for n in (att.q, att.k, att.v)}  # left to the head rule
    for gi, g in enumerate(groups):
        if g.root in owned:
            continue
        why = _why_not(g, tied, ignored)
        if why:
            if any(it.role in _PRODUCERS for it in g.items) and not g.reaches_output:
                report.skipped.append((tuple(g.layers()), why))
        else:
            ok.add(gi)
    units, spoiled = _units(groups, ok)
    for gi in sorted(spoiled & ok):
        report.skipped.append((tuple(groups[gi].layers()),
                               "its grouped convs also read or write channels that cannot be pruned"))
    # clusters: units of the same group(s) compete with each other
    by_groups: dict[tuple[int, ...], list[list[Unit]]] = {}
    for unit in units:
        by_groups.setdefault(tuple(sorted({gi for gi, _ in unit})), []).append(unit)
    keys = sorted(by_groups)
    clusters = [by_groups[k] for k in keys]
    evidence = None
    if importance in _MEASURED:
        readers = {it.name for gi in ok for it in groups[gi].items if it.role == "in"} | {a.o for a in attentions}
        evidence = importance_rule.gather(work, importance, calibration, example, readers, loss_fn=loss_fn,
                                          max_batches=max_batches)
        report.calibration = (evidence.batches, evidence.seconds)
    params = dict(work.named_parameters())
    scores = []
    for c in clusters:
        measured = [_measured_score(groups, u, evidence, params) for u in c] if evidence is not None else []
        if measured and None not in measured:
            scores.append([float(v) for v in measured])
        else:  # nothing measured these (no layer reads them directly): their weights
            scores.append([_score(groups, u, "l2" if evidence is not None else importance, scales) for u in c])
    chosen = _select(clusters, scores, amount, scope, round_to, max_amount)
    if uniform:
        _equalize(clusters, scores, chosen, groups, keys, round_to)
    picked = _dry_run(work, groups, clusters, scores, chosen, example, report)
    pending = _row_masks(_masks(groups, [clusters[c][i] for c, i in picked]))
    if heads is not None:
        pending += _prune_heads(model, work, example, heads, ignored, tied, importance, report, describable=uniform,
                                evidence=evidence)
    pending += _prune_experts(work, amount, ignored, tied, importance, round_to, report, evidence=evidence)
    for c, (k, units_c) in enumerate(zip(keys, clusters)):
        idx = sorted(i for cc, i in picked if cc == c)
        rows = _masks(groups, [units_c[i] for i in idx], norms=False)
        report.groups.append(GroupPruning(
            layers=tuple(sorted({it.name for gi in k for it in groups[gi].items if it.role in _PRODUCERS})),
            units=len(units_c), masked=len(idx), channels=int(sum(int(f.sum()) for f in rows.values())),
            score=sum(scores[c][i] for i in idx) / len(idx) if idx else 0.0))
    if not any(g.masked for g in report.groups) and (report.dropped or not any(g.units for g in report.groups)) \
            and (amount or heads):  # nothing could be masked (not: the amounts round to no unit)
        raise CompactionError(_nothing_masked(model, report))
    del work, groups, evidence, params, scales  # the copy goes before the masks (a weight-sized mask and
    gc.collect()  # product per masked tensor) are made: one model's worth of memory less at the peak
    (_bake_into if bake else _apply)(model, pending)
    return report


def _nothing_masked(model: nn.Module, report: PruneReport) -> str:
    """Why prune_channels masked nothing (the model is left as it was), group by group."""
    why = "; ".join(f"{', '.join(layers[:3])}{' …' if len(layers) > 3 else ''}: {reason}"
                    for layers, reason in report.skipped[:8])
    more = f" (and {len(report.skipped) - 8} more)" if len(report.skipped) > 8 else ""
    tried = (f"{report.dropped} unit(s) tried, each of which compaction would have kept (the dry run); "
             if report.dropped else "")
    return (f"prune_channels found nothing it can mask in {type(model).__name__}; the model is unchanged. {tried}"
            + (f"Not pruned: {why}{more}" if why else "No other group computes channels another layer reads")
            + ". Mask what you can by hand with torch.nn.utils.prune and compact() keeps what it cannot remove, "
            "with the reason")
