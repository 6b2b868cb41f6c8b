"""Mixture-of-experts MLPs stored as fused 3-D parameters: expert neurons removed by rule.

Hugging Face stores the experts of a sparse MoE block (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek
and kin) as two parameters of one module, ``gate_up_proj`` (experts, 2 x neurons, hidden:
each expert's gate rows, then its up rows) and ``down_proj`` (experts, hidden, neurons), and
computes for the tokens routed to expert ``e``::

    gate, up = linear(x, gate_up_proj[e]).chunk(2, -1)
    out = linear(act(gate) * up, down_proj[e])

The traced graph cannot follow the routing (tokens gathered per expert, scattered back with
``index_add_``). But neuron ``j`` of expert ``e`` contributes nothing when its gate and up
rows are zero (``act(0) * 0 = 0``, with no bias) or when its ``down_proj`` column is zero:
then it goes, whatever the router does. One tensor holds every expert, so every expert keeps
the same number of neurons (different ones): the expert with the fewest removable neurons
sets the count, and the others keep their extra masked ones, said in the report.

The layout assumed (gate first, then up, neurons on those dimensions) is checked before
anything is cut: the experts module is run on the input it received in the first example
batch, once as it is and once cut, and must give the same output; otherwise nothing goes.

Whole experts are never removed: a masked expert still takes part in the router's top-k
choice (its softmax weight goes to no other expert), so removing it changes which experts
the others' tokens reach. The router is left as it is.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from . import probe
from .kinds import replace_tensor
from .plans import ExpertCut, GroupNote

__all__ = ["Experts", "ExpertPlan", "find", "plan_experts", "slice_experts", "neuron_tensors"]

#: Attributes of an experts module holding its neuron count (updated after a cut).
WIDTH_ATTRIBUTES = ("intermediate_dim", "intermediate_size", "expert_dim", "moe_intermediate_size")


@dataclass(frozen=True)
class Experts:
    """One experts module: its fused parameters and where the neurons lie in them."""

    name: str
    experts: int
    neurons: int
    neurons_last: bool  # gate_up (E, H, 2I) and down (E, I, H) instead of (E, 2I, H) and (E, H, I)

    def tensors(self, module: nn.Module) -> list[tuple[str, int, int]]:
        """(parameter name, dimension of the neurons, 2 for gate-and-up halves else 1) of each tensor a cut slices."""
        gu_dim, down_dim = (2, 1) if self.neurons_last else (1, 2)
        out = [("gate_up_proj", gu_dim, 2), ("down_proj", down_dim, 1)]
        bias = getattr(module, "gate_up_proj_bias", None)
        if isinstance(bias, torch.Tensor) and tuple(bias.shape) == (self.experts, 2 * self.neurons):
            out.append(("gate_up_proj_bias", 1, 2))
        return out


@dataclass
class ExpertPlan:
    """What the experts rule decided, in the planner's vocabulary (:mod:`compactor.plans`)."""

    cuts: list[ExpertCut] = field(default_factory=list)
    notes: list[GroupNote] = field(default_factory=list)
    attributes: dict[str, dict[str, int]] = field(default_factory=dict)
    any_masked: bool = False


def find(model: nn.Module) -> list[Experts]:
    """The experts modules of ``model`` this rule understands (3-D ``gate_up_proj`` and ``down_proj`` parameters)."""
    out = []
    for name, m in model.named_modules():
        gu, down = m._parameters.get("gate_up_proj"), m._parameters.get("down_proj")
        if gu is None or down is None or gu.dim() != 3 or down.dim() != 3 or gu.shape[0] != down.shape[0]:
            continue
        rows = gu.shape[1] == 2 * down.shape[2] and gu.shape[2] == down.shape[1]  # (E, 2I, H), (E, H, I)
        last = gu.shape[2] == 2 * down.shape[1] and gu.shape[1] == down.shape[2]  # (E, H, 2I), (E, I, H)
        if not (rows or last):  # (both cannot hold: that would take hidden == 0)
            continue
        neurons = down.shape[2] if rows else down.shape[1]
        out.append(Experts(name, gu.shape[0], neurons, neurons_last=last))
    return out


def neuron_tensors(module: nn.Module, ex: Experts) -> dict[str, torch.Tensor]:
    """Per expert and neuron, what it reads and writes: {"gate", "up", "down"} of shape (E, I, hidden), and
    "bias" (E, I, 2) where gate_up has one."""
    gu = module.gate_up_proj.detach()
    down = module.down_proj.detach()
    if ex.neurons_last:
        gu, down = gu.transpose(1, 2), down  # (E, 2I, H); down (E, I, H)
    else:
        down = down.transpose(1, 2)  # (E, I, H)
    out = {"gate": gu[:, :ex.neurons], "up": gu[:, ex.neurons:], "down": down}
    bias = getattr(module, "gate_up_proj_bias", None)
    if isinstance(bias, torch.Tensor) and tuple(bias.shape) == (ex.experts, 2 * ex.neurons):
        out["bias"] = torch.stack([bias[:, :ex.neurons], bias[:, ex.neurons:]], -1).detach()
    return out


def _removable(module: nn.Module, ex: Experts) -> torch.Tensor:
    """(E, I) booleans: neurons whose gate and up rows (and biases) are zero, or whose down column is zero."""
    t = neuron_tensors(module, ex)
    silent = (t["gate"] == 0).all(-1) & (t["up"] == 0).all(-1)
    if "bias" in t:
        silent &= (t["bias"] == 0).all(-1)
    return silent | (t["down"] == 0).all(-1)


def slice_experts(module: nn.Module, cut: ExpertCut) -> None:
    """Keep neurons ``cut.keep[e]`` of every expert ``e`` in ``module``'s fused tensors (in place)."""
    neurons = None
    for pname, dim, halves in cut.tensors:
        t = getattr(module, pname)
        width = t.shape[dim] // halves
        neurons = width
        parts = []
        for e, keep in enumerate(cut.keep):
            idx = torch.tensor(keep, dtype=torch.long, device=t.device)
            if halves == 2:
                idx = torch.cat([idx, idx + width])
            parts.append(t[e].index_select(dim - 1, idx))
        replace_tensor(module, pname, torch.stack(parts).contiguous(), t)
    left = len(cut.keep[0])
    for attr in WIDTH_ATTRIBUTES:
        if module.__dict__.get(attr) == neurons and not isinstance(module.__dict__.get(attr), bool):
            setattr(module, attr, left)


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return False
        scale = float(a.detach().abs().max()) if a.numel() else 0.0
        return bool(torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6 * max(scale, 1.0)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b or a == b


def plan_experts(model: nn.Module, tied: set[str], batch: Optional[tuple] = None) -> ExpertPlan:
    """Which neurons go in every experts module of ``model`` (see the module); with ``batch``, each cut is
    checked by running the module on what it received there."""
    out = ExpertPlan()
    cands = []
    for ex in find(model):
        module = model.get_submodule(ex.name)
        removable = _removable(module, ex)
        if not bool(removable.any()):
            continue
        out.any_masked = True
        layers = [f"{ex.name}.gate_up_proj", f"{ex.name}.down_proj"]
        per_expert = removable.sum(1)
        flat = torch.nonzero(removable.flatten()).flatten().tolist()  # expert e's neuron j is e * neurons + j
        count = int(per_expert.min())
        note = dict(layers=layers, unit="expert neurons")
        if ex.name in tied or any(n in tied for n in layers):
            out.notes.append(GroupNote(channels=flat, status="kept",
                                       reason="weights tied with another layer", **note))
            continue
        if count == 0:
            out.notes.append(GroupNote(channels=flat, status="kept", reason=(
                "one tensor holds every expert, so every expert keeps the same number of neurons, and expert "
                f"{int(per_expert.argmin())} has none masked; mask the same number in every expert "
                "(prune_channels does)"), **note))
            continue
        if count == ex.neurons:
            out.notes.append(GroupNote(channels=flat, status="kept", reason=(
                "every neuron of every expert is masked: the experts would be empty; prune fewer"), **note))
            continue
        keep = tuple(tuple(sorted(set(range(ex.neurons)) - set(torch.nonzero(r).flatten().tolist()[:count])))
                     for r in removable)
        cut = ExpertCut(name=ex.name, keep=keep, tensors=tuple(ex.tensors(module)))
        cands.append((ex, cut, flat, count, note))
    seen = probe.first_inputs(model, {ex.name for ex, *_ in cands}, batch) if batch is not None and cands else {}
    for ex, cut, flat, count, note in cands:
        module = model.get_submodule(ex.name)
        if batch is not None:
            args, kwargs = seen.get(ex.name, (None, None))
            trial = copy.deepcopy(module)
            try:
                slice_experts(trial, cut)
                with torch.no_grad():
                    holds = args is not None and _same(trial(*args, **kwargs), module(*args, **kwargs))
            except Exception:  # the forward does not take the cut: its layout is not the one assumed
                holds = False
            if not holds:
                out.notes.append(GroupNote(channels=flat, status="kept", reason=(
                    f"cut as gate rows, then up rows (the layout assumed), '{ex.name}' did not compute the same "
                    "on the example input (e.g. gate and up interleaved)"), **note))
                continue
        out.cuts.append(cut)
        gone = [e * ex.neurons + j for e, keep in enumerate(cut.keep) for j in sorted(set(range(ex.neurons)) - set(keep))]
        out.notes.append(GroupNote(channels=gone, status="removed", reason=(
            f"{count} of {ex.neurons} neurons per expert with zero gate and up rows (or down column), in each of "
            f"{ex.experts} experts"), **note))
        extra = sorted(set(flat) - set(gone))
        if extra:
            out.notes.append(GroupNote(channels=extra, status="kept", reason=(
                "one tensor holds every expert, so every expert keeps the same number of neurons: these masked "
                "neurons of experts with more than the fewest masked stay (they compute zero)"), **note))
    return out
