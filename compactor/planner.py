"""Which channels go, per coupled group, and where the constant of each removed channel goes.

The planner works on a baked copy of the model (``masks.bake``): masks applied,
hooks gone. A channel can go when every layer that computes it has an all-zero
weight row for it (or every layer that reads it has an all-zero column). It then
still carries a constant (its bias, passed through BatchNorm, activations and
pooling); that constant is read off the baked model at the input of every layer
that consumes the channel, checked to be constant over batch and positions, and
folded into that consumer.

The stages, each a function over one :class:`Ledger` of candidate channels:

1. :func:`select` — candidates per group from the masks; notes for what cannot go;
2. :func:`settle` — the NaN mapping probe, constancy, ``round_to`` and the
   grouped-conv rule, repeated until nothing changes;
3. :func:`place_folds` — where each removed channel's constant goes;
4. :func:`cut_layers` — the indices every layer loses.

:func:`make_plan` runs them and returns a frozen :class:`Plan`, the single source
of truth for :mod:`compactor.fold` (which executes it) and :mod:`compactor.report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import torch
from torch import nn

from . import experts, graph, heads, probe
from .errors import CompactionError
from .kinds import BATCHNORM, dead_rows, kind_of, out_major, zero_columns
from .plans import Cut, ExpertCut, Fold, GroupNote
from .progress import Progress

__all__ = ["Mode", "Border", "Cut", "Fold", "GroupNote", "Plan", "Ledger", "make_plan", "select", "settle",
           "place_folds", "why_blocked", "cut_layers", "dead_rows", "zero_columns"]

#: ``"exact"`` folds the constants of removed channels; ``"drop"`` discards them, as other tools do.
Mode = Literal["exact", "drop"]

#: How exact mode carries removed channels' constants into a zero-padded conv: ``"carrier"`` keeps one of
#: them as a plain channel whose consumer column carries them all (the compact model is made of the user's
#: own layer classes); ``"layers"`` removes every one and makes the conv (or its BatchNorm) border-corrected.
Border = Literal["carrier", "layers"]

#: Roles of the layers that compute a group's channels (see :mod:`compactor.graph`).
PRODUCER_ROLES = ("out", "dw", "gout")
_PRODUCERS = PRODUCER_ROLES
_READERS = ("in", "gin")


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything compaction will do, decided before anything is built."""

    mode: Mode
    round_to: Optional[int]
    border: Border
    cuts: Mapping[str, Cut]  # per layer or bare parameter, by name
    folds: tuple[Fold, ...]
    notes: tuple[GroupNote, ...]
    dropped: Mapping[str, tuple[int, ...]]  # mode="drop": consumer inputs whose constants are discarded
    any_masked: bool  # some layer had a masked row or column (removed or not)
    attributes: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # module -> width attribute -> value
    experts: tuple[ExpertCut, ...] = ()  # neurons kept per expert in fused mixture-of-experts modules


@dataclass
class Ledger:
    """The planner's working state: candidate root channels per group and the notes so far."""

    groups: list[graph.Group]
    cand: dict[int, set[int]] = field(default_factory=dict)  # group index -> candidate root channels
    silent: dict[int, set[int]] = field(default_factory=dict)  # roots no consumer reads: nothing to fold
    carriers: dict[int, set[int]] = field(default_factory=dict)  # masked roots kept to carry constants
    notes: list[GroupNote] = field(default_factory=list)
    any_masked: bool = False
    unclear: list[tuple[str, list[int], str]] = field(default_factory=list)  # (root layer, masked rows, why)

    def note(self, gi: int, roots: set[int], status: str, reason: str) -> None:
        self.notes.append(GroupNote(layers=self.groups[gi].layers(), channels=sorted(roots), status=status,
                                    reason=reason))

    def keep(self, gi: int, roots: set[int], reason: str, status: str = "kept") -> None:
        """Take ``roots`` out of group ``gi``'s candidates, noting why."""
        roots = roots & self.cand[gi]
        if roots:
            self.note(gi, roots, status, reason)
            self.cand[gi] -= roots

    def sizes(self) -> dict[int, int]:
        return {gi: len(r) for gi, r in self.cand.items()}

    def accepted(self) -> list[tuple[int, set[int]]]:
        return [(gi, r) for gi, r in self.cand.items() if r]


# --------------------------------------------------------------------------- reading masks


def local_indices(item: graph.Item, roots: set[int]) -> list[int]:
    """The indices of ``item``'s tensor that the root channels ``roots`` reach, in ``item.idxs``' order."""
    where = item.positions
    found = sorted(p for r in roots for p in where.get(r, ()))
    return [item.idxs[p] for p in found]


def _roots_where(item: graph.Item, flags: torch.Tensor) -> set[int]:
    """Roots all of whose local indices in ``item`` are flagged."""
    ok: dict[int, bool] = {}
    flag = flags.tolist()
    for i, r in zip(item.idxs, item.root_idxs):
        ok[r] = ok.get(r, True) and flag[i]
    return {r for r, v in ok.items() if v}


def tied_layers(model: nn.Module) -> set[str]:
    """Modules that share a parameter with another module."""
    owners: dict[int, set[str]] = {}
    for mname, m in model.named_modules():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(mname)
    return {n for names in owners.values() if len(names) > 1 for n in names}


# --------------------------------------------------------------------------- stage 1: select


def select(groups: list[graph.Group], tied: set[str], owned: frozenset[str] = frozenset()) -> Ledger:
    """Candidates per group: roots masked in every producer, or unread by every consumer.

    Notes what is masked only in part of a group, and keeps (with a note) groups that
    reach the model's output, hold tied weights or pass a blocked operation.

    Groups rooted at a layer in ``owned`` (attention projections the head rule answers
    for, :mod:`compactor.heads`) are left to that rule.

    Raises:
        CompactionError: the masks would remove every output channel of a layer.
    """
    ledger = Ledger(groups)
    rows: dict[int, torch.Tensor] = {}  # a layer's dead rows / zero columns, read once however many groups touch it
    cols: dict[int, torch.Tensor] = {}

    def dead(it: graph.Item) -> set[int]:
        return _roots_where(it, rows[id(it.module)] if id(it.module) in rows
                            else rows.setdefault(id(it.module), dead_rows(it.module)))

    def unread_by(it: graph.Item) -> set[int]:
        return _roots_where(it, cols[id(it.module)] if id(it.module) in cols
                            else cols.setdefault(id(it.module), zero_columns(it.module)))

    for gi, g in enumerate(groups):
        if g.root in owned:
            continue
        if g.unclear:
            _note_unclear(ledger, g)
            continue
        producers = [it for it in g.items if it.role in _PRODUCERS]
        readers = [it for it in g.items if it.role in _READERS]
        if not producers:
            continue
        dead_sets = [dead(it) for it in producers]
        every = set.intersection(*dead_sets)
        some = set.union(*dead_sets)
        if g.factors:  # f(a(x)) * b(x): a row masked (and bias-free) in either factor is zero after the product
            every |= set.union(*(_zero_rows(it) for it in producers if it.name in g.factors))
        unread: set[int] = set()
        if readers and all(it.role == "in" for it in readers):
            unread_sets = [unread_by(it) for it in readers]
            unread = set.intersection(*unread_sets)
            some |= set.union(*unread_sets)
        if not some:
            continue
        ledger.any_masked = True
        removable = every | unread
        if some - removable:
            ledger.note(gi, some - removable, "partial",
                        "masked in some but not all of the layers that compute or read them; kept")
        if not removable:
            continue
        reason = why_blocked(g, tied)
        if reason:
            ledger.note(gi, removable, "kept", reason)
            continue
        if len(removable) == g.size:
            names = ", ".join(sorted({it.name for it in producers}))
            raise CompactionError(
                f"layer '{names}': the masks remove all {g.size} of its output channels (every weight row is "
                "zero: masked, or zero as computed, e.g. a zero-initialized gain), which would leave a zero-width "
                "layer; prune a smaller amount of this layer (or remove it from the model)"
            )
        ledger.cand[gi] = removable
        ledger.silent[gi] = unread
    return ledger


def _zero_rows(item: graph.Item) -> set[int]:
    """Roots whose rows of ``item`` are all zero and whose bias is zero (or absent): the output is exactly 0."""
    flags = dead_rows(item.module)
    bias = getattr(item.module, "bias", None)
    if isinstance(bias, torch.Tensor):
        flags = flags & (bias.detach() == 0)
    return _roots_where(item, flags)


def _note_unclear(ledger: Ledger, g: graph.Group) -> None:
    """A group whose traced mapping is not understood keeps everything; say so if its root is masked."""
    root = next((it.module for it in g.items if it.name == g.root and isinstance(it.module, nn.Module)), None)
    if root is None or not hasattr(root, "weight"):
        return
    dead = torch.nonzero(dead_rows(root)).flatten().tolist()
    if dead:  # noted once the cuts are known: another group may still remove these rows
        ledger.any_masked = True
        ledger.unclear.append((g.root, dead, g.unclear))


def why_blocked(g: graph.Group, tied: set[str]) -> str:
    """Why no channel of group ``g`` can go at all, or '' (the planner's rule; the pruner asks it too)."""
    if g.reaches_output:
        return "these channels are the model's output"
    shared = sorted({it.name for it in g.items if it.name in tied})
    if shared:
        return f"{', '.join(shared)}: weights tied with another layer; slicing would untie them"
    by_reason: dict[str, list[str]] = {}  # one reason once, with the first place it holds and how many more
    for it in g.items:
        if it.role == "blocked":
            reason = it.reason[len(it.name) + 2:] if it.reason.startswith(f"{it.name}: ") else it.reason
            by_reason.setdefault(reason, []).append(it.name)
    parts = [f"{min(names)}: {reason}" + (f" (and {len(set(names)) - 1} more)" if len(set(names)) > 1 else "")
             for reason, names in sorted(by_reason.items())]
    return "; ".join(parts[:3]) + (f"; {len(parts) - 3} more reason(s)" if len(parts) > 3 else "")


# --------------------------------------------------------------------------- stage 2: settle


def conv_group_blocks(groups: Sequence[graph.Group]) -> dict[tuple[str, int], dict]:
    """Per (grouped conv, conv group): the (group index, root channel) pairs that reach its input channels
    ("gin") and output channels ("gout") in that conv group, and how many channels each side has there. The
    "whole conv groups" rule: such a block goes only whole, inputs and outputs together."""
    blocks: dict[tuple[str, int], dict] = {}
    for gi, g in enumerate(groups):
        for it in g.items:
            if it.role not in ("gin", "gout"):
                continue
            conv = it.module
            per = (conv.in_channels if it.role == "gin" else conv.out_channels) // conv.groups
            for i, r in zip(it.idxs, it.root_idxs):
                block = blocks.setdefault((it.name, i // per), {
                    "gin": {}, "gout": {}, "size": {"gin": conv.in_channels // conv.groups,
                                                   "gout": conv.out_channels // conv.groups}})
                block[it.role].setdefault(i, set()).add((gi, r))
    return blocks


def restrict_grouped(ledger: Ledger) -> None:
    """A grouped conv loses a whole group of inputs only together with that group's outputs (and vice versa)."""
    groups, cand = ledger.groups, ledger.cand
    before = {gi: set(r) for gi, r in cand.items()}
    blocks = conv_group_blocks(groups)
    changed = True
    while changed:
        changed = False
        for block in blocks.values():
            pairs = [p for side in ("gin", "gout") for ps in block[side].values() for p in ps]
            whole = all(len(block[side]) == block["size"][side] for side in ("gin", "gout")) and all(
                r in cand.get(gi, ()) for gi, r in pairs)
            if whole:
                continue
            for gi, r in pairs:
                if r in cand.get(gi, ()):
                    cand[gi].discard(r)
                    changed = True
    for gi in before:
        if before[gi] - cand[gi]:
            names = sorted({it.name for it in groups[gi].items if it.role in ("gin", "gout")})
            ledger.note(gi, before[gi] - cand[gi], "kept",
                        f"grouped conv {', '.join(names)}: only whole groups (inputs and outputs) can go")


def check_mapping(ledger: Ledger, work: nn.Module, batch: tuple, probed: set[int],
                  check: Callable[[], None] = lambda: None) -> None:
    """Keep the channels of every group (not yet probed) whose traced mapping does not hold on the model.

    Groups whose channels pass only through convs, BatchNorm and per-channel ops that keep
    each channel at its index (:meth:`graph.Group.mapping_is_plain`) need no probe forward.
    """
    active = {gi: r for gi, r in ledger.cand.items()
              if r and gi not in probed and not ledger.groups[gi].mapping_is_plain()}
    if not active:
        return
    why: dict[int, str] = {}
    if _probe_fails(ledger.groups, work, active, batch):
        for gi, roots in active.items():  # find the culprits one group at a time
            check()
            failed = _probe_fails(ledger.groups, work, {gi: roots}, batch)
            if failed:
                why[gi] = failed
    for gi in active:
        probed.add(gi)
        if gi in why:
            ledger.keep(gi, set(ledger.cand[gi]), f"the traced channel mapping did not hold when checked on the "
                                                  f"model ({why[gi]}; e.g. a channel shuffle or a reshape that "
                                                  "moves channels)")


def _probe_fails(groups: list[graph.Group], work: nn.Module, active: dict[int, set[int]], batch: tuple) -> str:
    """'' when the NaN probe finds the traced mapping of the ``active`` groups right; else where it went wrong."""
    produce: dict[str, set[int]] = {}
    expect: dict[str, set[int]] = {}
    for gi, roots in active.items():
        for it in groups[gi].items:
            if it.role in _PRODUCERS:
                produce.setdefault(it.name, set()).update(local_indices(it, roots))
            if it.role in _READERS or it.role == "dw":
                expect.setdefault(it.name, set()).update(local_indices(it, roots))
    bad, leaked = probe.nan_probe(work, produce, expect, batch)
    if bad:
        return f"'{sorted(bad)[0]}' read them elsewhere" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
    return "they reached the model's output" if leaked else ""


def _folded_inputs(ledger: Ledger, gi: int, rset: set[int]) -> list[tuple[graph.Item, list[int]]]:
    """(consumer item, its local input channels) that carry a constant to fold, for group ``gi``."""
    out = []
    for it in ledger.groups[gi].items:
        if it.role == "in":
            local = local_indices(it, rset - ledger.silent[gi])
            if local:
                out.append((it, local))
    return out


def check_constant(ledger: Ledger, stats: Mapping[str, probe.ChannelStats]) -> None:
    """Keep channels that are not constant where a consumer reads them (nothing could be folded)."""
    for gi, rset in ledger.cand.items():
        for it, local in _folded_inputs(ledger, gi, rset):
            _, varying = stats[it.name].query(local)
            if varying:
                roots = {r for i, r in zip(it.idxs, it.root_idxs) if i in set(varying)}
                ledger.keep(gi, roots, f"not constant where '{it.name}' reads them (e.g. gated by another "
                                       "tensor, or pooled over zero padding)")


def round_widths(ledger: Ledger, round_to: int) -> None:
    """Keep the highest-numbered candidates of each group until its width is a multiple of ``round_to``."""
    for gi, roots in ledger.cand.items():
        size = ledger.groups[gi].size
        keep = size - len(roots)
        extra = min(len(roots), min(size, -(-keep // round_to) * round_to) - keep)
        if extra > 0:
            ledger.keep(gi, set(sorted(roots)[-extra:]), f"round_to={round_to}: widths kept at a multiple")


def _constants(it: graph.Item, roots: set[int],
               stats: Mapping[str, probe.ChannelStats]) -> dict[int, tuple[int, float]]:
    """Per root in ``roots``: (local input channel of ``it``, constant it carries there) with the largest
    magnitude; roots whose constant is 0 at every local channel are left out."""
    local = local_indices(it, roots)
    if not local:
        return {}
    values, _ = stats[it.name].query(local)
    root_of = dict(zip(it.idxs, it.root_idxs))
    best: dict[int, tuple[int, float]] = {}
    for i, v in zip(local, values.tolist()):
        r = root_of[i]
        if v != 0 and (r not in best or abs(v) > abs(best[r][1])):
            best[r] = (i, v)
    return best


def choose_carriers(ledger: Ledger, modules: Mapping[str, nn.Module],
                    stats: Mapping[str, probe.ChannelStats]) -> None:
    """Keep, per group, masked channels that carry the removed ones' constants into zero-padded convs.

    A removed channel that emits a constant ``c_k`` reaches a zero-padded conv as ``c_k`` inside
    the image and 0 in the padding, so its contribution is not a constant (less of it at the
    border) and no bias can take it. One kept masked channel ``k0`` emitting ``c_k0 != 0`` does
    exactly that through the conv's own padding: its column ``W[:, k0] + sum_k c_k W[:, k] / c_k0``
    computes what all of them did. Each zero-padded consumer needs one such channel; greedy
    choice: the channel nonzero at most consumers still uncovered, then the largest constant.
    """
    covered = set(_carrier_columns(ledger, stats))  # consumers a carrier of any group already reaches
    for gi, rset in ledger.cand.items():
        loud = rset - ledger.silent[gi]  # read by some consumer (measured there)
        if not loud:
            continue
        carriers = ledger.carriers.setdefault(gi, set())
        uncovered: list[tuple[str, dict[int, tuple[int, float]]]] = []
        for it, local in _folded_inputs(ledger, gi, rset):
            module = modules[it.name]
            if not _zero_padded(module) or it.name in covered:
                continue
            if not bool(_fold_kernel(module, local, stats[it.name]).ne(0).any()):
                continue  # constants of 0, or columns of 0: nothing reaches it
            options = _constants(it, loud, stats)
            if options:
                uncovered.append((it.name, options))
        while uncovered:
            scores: dict[int, tuple[int, float]] = {}
            for _, options in uncovered:
                for r, (_, v) in options.items():
                    n, low = scores.get(r, (0, float("inf")))
                    scores[r] = (n + 1, min(low, abs(v)))
            root = max(sorted(scores), key=lambda r: scores[r])
            names = sorted({name for name, options in uncovered if root in options})
            carriers.add(root)
            covered.update(names)
            ledger.keep(gi, {root}, f"kept to carry the removed channels' constants into zero-padded "
                                    f"{', '.join(repr(n) for n in names)} (its own zero padding makes that exact "
                                    "at the border; border='layers' removes it with a border-corrected layer "
                                    "instead)", status="carrier")
            uncovered = [(name, options) for name, options in uncovered if root not in options]


def _fold_kernel(module: nn.Module, local: Sequence[int], stats: probe.ChannelStats) -> torch.Tensor:
    """What input channels ``local`` of ``module``, each emitting its measured constant, add to its output
    before padding: ``sum_c v_c W[:, c]`` (float64), (out,) for a linear, (out, *k) for a conv."""
    values, _ = stats.query(local)
    w = out_major(module).index_select(1, torch.tensor(local, dtype=torch.long, device=module.weight.device))
    return torch.einsum("oc...,c->o...", w.double(), values.to(w.device))


def check_correctable(ledger: Ledger, modules: Mapping[str, nn.Module],
                      stats: Mapping[str, probe.ChannelStats]) -> None:
    """``border="layers"``: keep channels whose nonzero constant reaches a layer no border correction models
    (a transposed conv spreads a constant input unevenly: strides, borders, output padding)."""
    for gi, rset in ledger.cand.items():
        for it, local in _folded_inputs(ledger, gi, rset):
            module = modules[it.name]
            if kind_of(module).border_correctable(module):
                continue
            loud = _constants(it, rset - ledger.silent[gi], stats)
            if not loud:
                continue
            ledger.keep(gi, set(loud),
                        f"{type(module).__name__} '{it.name}' spreads a constant input unevenly (strides, borders) "
                        "and border='layers' has no correction for it (the default border='carrier' removes them)")


def settle(ledger: Ledger, work: nn.Module, batch: tuple, stats: Mapping[str, probe.ChannelStats], *,
           mode: Mode, round_to: Optional[int], border: Border = "carrier",
           check: Callable[[], None] = lambda: None) -> None:
    """Apply the checks until none of them takes another channel out (``check`` may stop a long run)."""
    restrict_grouped(ledger)
    probed: set[int] = set()
    modules = dict(work.named_modules())
    while True:
        check()
        before = ledger.sizes()
        check_mapping(ledger, work, batch, probed, check)
        if mode == "exact":
            check_constant(ledger, stats)
            if border == "carrier":  # before rounding: a channel rounding keeps anyway can be the carrier
                choose_carriers(ledger, modules, stats)
            else:
                check_correctable(ledger, modules, stats)
        if round_to:
            round_widths(ledger, round_to)
        restrict_grouped(ledger)
        if ledger.sizes() == before:
            return


# --------------------------------------------------------------------------- stage 3: folds


def _zero_padded(module: nn.Module) -> bool:
    """Whether a constant input reaches ``module``'s output unevenly (zero padding, a transposed conv's
    strides and borders): no bias can take it, a carrier channel or a border correction must."""
    return not kind_of(module).constant_folds_into_bias(module)


def place_folds(ledger: Ledger, modules: Mapping[str, nn.Module], stats: Mapping[str, probe.ChannelStats],
                bn_pairs: Mapping[str, str], mode: Mode,
                border: Border = "carrier") -> tuple[tuple[Fold, ...], dict[str, tuple[int, ...]]]:
    """The folds of the accepted channels (exact mode), or the consumer inputs dropped (drop mode)."""
    sums: dict[str, dict[str, Any]] = {}  # consumer -> {"bias": (out,), "border": (out, *k), "sources": [...]}
    carried = _carrier_columns(ledger, stats) if border == "carrier" else {}
    dropped: dict[str, set[int]] = {}
    for gi, rset in ledger.accepted():
        for it, local in _folded_inputs(ledger, gi, rset):
            if mode == "drop":
                dropped.setdefault(it.name, set()).update(local)
                continue
            acc = sums.setdefault(it.name, {"bias": None, "border": None, "sources": []})
            acc["sources"].append(ledger.groups[gi].root)
            module = modules[it.name]
            kernel = _fold_kernel(module, local, stats[it.name])
            key, delta = ("border", kernel) if _zero_padded(module) else ("bias", kernel.reshape(len(kernel), -1).sum(1))
            acc[key] = delta if acc[key] is None else acc[key] + delta
    folds: list[Fold] = []
    for name, acc in sums.items():
        bn = _absorbing_bn(name, modules, bn_pairs)
        sources = tuple(dict.fromkeys(acc["sources"]))
        if acc["bias"] is not None and bool(acc["bias"].ne(0).any()):  # a fold of zeros creates no bias
            folds.append(Fold(layer=name, target="bn_mean" if bn else "bias", values=acc["bias"], bn=bn,
                              sources=sources, creates_bias=not bn and modules[name].bias is None))
        if acc["border"] is not None and not bool(acc["border"].ne(0).any()):
            pass  # constants of 0: nothing reaches the conv, border or not
        elif acc["border"] is not None and name in carried:
            channel, c = carried[name]
            folds.append(Fold(layer=name, target="carrier", values=acc["border"] / c, channel=channel, scale=c,
                              sources=sources))
        elif acc["border"] is not None and (border == "carrier" or not kind_of(modules[name]).border_correctable(
                modules[name])):  # choose_carriers / check_correctable cover every layer a nonzero constant reaches
            raise AssertionError(f"no carrier channel or border correction for '{name}'")
        elif acc["border"] is not None:
            kernel = acc["border"]
            offset = kernel.flatten(1).sum(1) if bn else None
            target = "bn_border" if bn and _frame_fits_bn(modules[name], modules[bn]) else "border"
            folds.append(Fold(layer=name, target=target, values=kernel, bn=bn, offset=offset, sources=sources))
    return tuple(folds), {n: tuple(sorted(i)) for n, i in dropped.items()}


def _carrier_columns(ledger: Ledger, stats: Mapping[str, probe.ChannelStats]) -> dict[str, tuple[int, float]]:
    """Per consumer that reads a carrier (:func:`choose_carriers`): its input channel with the largest constant."""
    out: dict[str, tuple[int, float]] = {}
    for gi, roots in ledger.carriers.items():
        for it in ledger.groups[gi].items:
            if it.role == "in" and it.name in stats:
                for channel, c in _constants(it, roots, stats).values():
                    if it.name not in out or abs(c) > abs(out[it.name][1]):
                        out[it.name] = (channel, c)
    return out


def _frame_fits_bn(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether the border correction can ride on ``bn`` (see :class:`compactor.layers.BorderCorrectedBatchNorm2d`).

    The conv must be stride 1 (its input size then follows from its output's) and the
    BatchNorm torch's own class (a subclass such as timm's ``BatchNormAct2d`` has a forward
    of its own to keep), so the correction costs no pass of its own: the conv stays plain.
    """
    return all(s == 1 for s in conv.stride) and type(bn) in BATCHNORM


def _absorbing_bn(name: str, modules: Mapping[str, nn.Module], bn_pairs: Mapping[str, str]) -> Optional[str]:
    """The BatchNorm that takes ``name``'s folded constants in its mean, or None (they go into a bias).

    Only for a bias-free conv whose output feeds that BatchNorm alone (checked on the
    model by :func:`probe.measure`): the conv then stays bias-free (on a GPU a conv bias
    costs a whole extra pass over the output).
    """
    bn = bn_pairs.get(name)
    if bn is None or modules[name].bias is not None or getattr(modules[bn], "running_mean", None) is None:
        return None
    return bn


# --------------------------------------------------------------------------- stage 4: cuts


def cut_layers(ledger: Ledger) -> dict[str, Cut]:
    """The indices each layer and bare parameter loses; notes every accepted group as removed."""
    out: dict[str, set[int]] = {}
    ins: dict[str, set[int]] = {}
    why: dict[str, str] = {}
    pdim: dict[str, int] = {}
    for gi, rset in ledger.accepted():
        g = ledger.groups[gi]
        ledger.note(gi, rset, "removed", "masked in every layer that computes or reads them")
        made = "no layer reads them (weight columns all zero)" if rset <= ledger.silent[gi] else "weight rows all zero"
        for it in g.items:
            local = set(local_indices(it, rset))
            if it.role in _PRODUCERS:
                out.setdefault(it.name, set()).update(local)
                why.setdefault(it.name, made)
            if it.role in ("dw", "in", "gin"):
                ins.setdefault(it.name, set()).update(local)
                if it.role == "in":
                    why.setdefault(it.name, f"follows {g.root}")
            elif it.role == "slice":
                out.setdefault(it.name, set()).update(local)
                why.setdefault(it.name, f"follows {g.root}")
                if isinstance(it.module, nn.Parameter):
                    pdim[it.name] = it.dim
    return {name: Cut(name=name, out=tuple(sorted(out.get(name, ()))), inputs=tuple(sorted(ins.get(name, ()))),
                      why=why.get(name, ""), parameter_dim=pdim.get(name))
            for name in sorted(set(out) | set(ins))}


def _with_heads(cuts: dict[str, Cut], folds: tuple[Fold, ...], dropped: dict[str, tuple[int, ...]],
                by_rule: heads.HeadPlan, ledger: Ledger, mode: Mode) -> tuple[dict[str, Cut], tuple[Fold, ...]]:
    """Merge what the attention-head rule decided (in the same vocabulary) into the cuts, folds and notes."""
    ledger.notes.extend(by_rule.notes)
    for name, cut in by_rule.cuts.items():
        old = cuts.get(name, Cut(name=name))
        cuts[name] = Cut(name=name, out=tuple(sorted(set(old.out) | set(cut.out))),
                         inputs=tuple(sorted(set(old.inputs) | set(cut.inputs))), why=old.why or cut.why,
                         parameter_dim=old.parameter_dim)
    if mode == "exact":
        folds = folds + tuple(by_rule.folds)
    else:  # drop: the reference reads zeros where the removed heads' V bias was
        for f in by_rule.folds:
            dropped[f.layer] = tuple(sorted(set(dropped.get(f.layer, ())) | set(by_rule.cuts[f.layer].inputs)))
    return dict(sorted(cuts.items())), folds


# --------------------------------------------------------------------------- all stages


def make_plan(work: nn.Module, batches: Sequence[tuple], *, mode: Mode = "exact", round_to: Optional[int] = None,
              border: Border = "carrier", progress: Optional[Progress] = None) -> tuple[Plan, probe.Measurements]:
    """Plan the compaction of ``work`` (a baked copy in eval mode).

    Returns the plan and what the instrumented forwards measured (outputs of the baked
    model per batch, MACs per layer).
    """
    progress = progress or Progress(enabled=False)
    with progress.stage("tracing the channel dependencies"):
        with probe.recording(work) as first:  # the trace's forward is the first batch's measurement too
            groups, bn_pairs = graph.trace(work, batches[0], check=progress.check)
        tied = tied_layers(work)
        by_rule = heads.plan_heads(work, tied, batches[0], fold_batches=batches if mode == "exact" else ())
        by_experts = experts.plan_experts(work, tied, batches[0])
        ledger = select(groups, tied, frozenset(by_rule.owned))
    with progress.stage(f"measuring channels on {len(batches)} input(s)"):
        watch: dict[str, list[int]] = {}
        if mode == "exact":
            for gi, rset in ledger.cand.items():
                for it, local in _folded_inputs(ledger, gi, rset):
                    watch.setdefault(it.name, []).extend(local)
        measured = probe.measure(work, watch, batches, bn_pairs, first=first)
        del first
    with progress.stage("checking the candidate channels"):
        settle(ledger, work, batches[0], measured.stats, mode=mode, round_to=round_to, border=border,
               check=progress.check)
    modules = dict(work.named_modules())
    with progress.stage("planning folds and cuts"):
        folds, dropped = place_folds(ledger, modules, measured.stats, measured.bn_pairs, mode, border)
        cuts = cut_layers(ledger)
        cuts, folds = _with_heads(cuts, folds, dropped, by_rule, ledger, mode)
        for root, dead, why in ledger.unclear:  # masked rows of a group not understood that nothing else removes
            left = [r for r in dead if r not in set(cuts[root].out if root in cuts else ())]
            if left:
                ledger.notes.append(GroupNote(layers=[root], channels=left, status="kept", reason=why))
    plan = Plan(mode=mode, round_to=round_to, border=border, cuts=MappingProxyType(cuts), folds=folds,
                notes=tuple(ledger.notes) + tuple(by_experts.notes), dropped=MappingProxyType(dropped),
                any_masked=ledger.any_masked or by_rule.any_masked or by_experts.any_masked,
                attributes=MappingProxyType({k: MappingProxyType(v) for k, v in by_rule.attributes.items()}),
                experts=tuple(by_experts.cuts))
    return plan, measured
