"""The instrumented forwards the planner needs: channel constancy, the NaN mapping probe, MACs, reference outputs.

Every function here runs the (baked) model with temporary hooks and removes them
before returning; none changes the model. Measurements are returned, never stored
in the plan.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from .kinds import BATCHNORM, kind_of
from .tensors import _is_cache, call, flatten_outputs

__all__ = ["ChannelStats", "Measurements", "Recording", "recording", "measure", "nan_probe", "zeroed_outputs", "count_macs", "channel_view"]



Hook = Callable[..., Any]


@contextlib.contextmanager
def hooked(model: nn.Module, pre: Mapping[str, Hook] = MappingProxyType({}),
           post: Mapping[str, Hook] = MappingProxyType({}), *, with_kwargs: bool = False) -> Iterator[None]:
    """Forward pre-hooks ``pre[name](module, args)`` and hooks ``post[name](module, args, output)`` on the named
    modules of ``model`` ("" names ``model`` itself) inside the block; all removed on exit, whatever happens.
    A hook that returns a value replaces the input (pre) or the output (post), as torch's hooks do; a list
    registers several on one module, in order. With ``with_kwargs``, pre-hooks also get the keyword inputs:
    ``pre[name](module, args, kwargs)``."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, fns in pre.items():
            for fn in fns if isinstance(fns, (list, tuple)) else [fns]:
                handles.append(modules[name].register_forward_pre_hook(fn, with_kwargs=with_kwargs))
        for name, fns in post.items():
            for fn in fns if isinstance(fns, (list, tuple)) else [fns]:
                handles.append(modules[name].register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def first_inputs(model: nn.Module, names: set[str], batch: tuple, *, copied: bool = False) -> dict[str, tuple]:
    """The (args, kwargs) each module in ``names`` received on its first call in one forward of ``batch`` (no
    grad); with ``copied``, deep copies taken before the module ran (it may update a cache it was given)."""
    seen: dict[str, tuple] = {}

    def keep(name: str) -> Callable:
        def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:  # (returning the inputs would replace them)
            if name not in seen:
                seen[name] = copy.deepcopy((args, kwargs)) if copied else (args, kwargs)
        return hook

    with hooked(model, {n: keep(n) for n in names}, with_kwargs=True), torch.no_grad():
        call(model, batch)
    return seen


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block; every module's training flag restored on exit, whatever happens."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def channel_view(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Put the channel axis ``module`` reads first, everything else flattened after it."""
    return kind_of(module).channel_view(x)


def _filled(module: nn.Module, x: torch.Tensor, idxs: set[int], value: float) -> torch.Tensor:
    """A copy of ``x`` with channels ``idxs`` (as ``module`` reads or writes them) set to ``value``."""
    index = torch.tensor(sorted(idxs), dtype=torch.long, device=x.device)
    axis = kind_of(module).channel_axis
    return x.clone().index_fill_(1 if axis == 1 else x.dim() - 1, index, value)


@dataclass
class ChannelStats:
    """Per watched input channel of one consumer: its first value and whether it ever varied."""

    idxs: list[int]
    first: Optional[torch.Tensor] = None
    varying: Optional[torch.Tensor] = None

    def update(self, module: nn.Module, x: torch.Tensor) -> None:
        index = torch.tensor(self.idxs, dtype=torch.long, device=x.device)
        v = channel_view(module, x.detach()).index_select(0, index).double()
        if self.first is None:
            self.first = v[:, 0].clone()
            self.varying = torch.zeros(len(self.idxs), dtype=torch.bool, device=x.device)
        dev = (v - self.first[:, None]).abs().amax(1)
        # a few ulps of the activation's dtype: pooling may round a constant differently at borders
        ulp = torch.finfo(x.dtype).eps if x.is_floating_point() else 0.0
        self.varying |= dev > 16 * ulp * self.first.abs()

    def query(self, local: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        """The values of channels ``local`` (float64) and those of them that varied."""
        pos = {c: i for i, c in enumerate(self.idxs)}
        sel = torch.tensor([pos[c] for c in local], dtype=torch.long, device=self.first.device)
        varying = [c for c, v in zip(local, self.varying.index_select(0, sel).tolist()) if v]
        return self.first.index_select(0, sel), varying


@dataclass
class Measurements:
    """What one instrumented pass over the batches saw."""

    stats: dict[str, ChannelStats] = field(default_factory=dict)  # per watched consumer
    outputs: list = field(default_factory=list)  # the model's outputs, one per batch
    macs: dict[str, int] = field(default_factory=dict)  # per conv / linear, per sample
    bn_pairs: dict[str, str] = field(default_factory=dict)  # conv -> the BatchNorm that alone reads its output


def _reads_channels(module: nn.Module) -> bool:
    """A conv / linear kind: it reads channels through a weight (where constants are measured and MACs counted)."""
    kind = kind_of(module)
    return kind is not None and kind.reads


def _count(macs: dict[str, int], name: str, mod: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
    macs[name] = macs.get(name, 0) + kind_of(mod).macs(mod, x, out)


@dataclass
class Recording:
    """What one forward saw of every conv / linear / BatchNorm: recorded while the graph is
    traced, so the first batch runs once for both."""

    inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # conv / linear: first input, per call
    outputs_of: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # conv: output, per call
    bn_inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # BatchNorm: input, per call
    macs: dict[str, int] = field(default_factory=dict)  # per conv / linear, per sample
    output: Any = None  # the model's output (detached)
    returned: set[int] = field(default_factory=set)  # ids of the tensors the model returned


def _detached(out: Any) -> Any:
    """The output with every tensor detached (its autograd graph released); containers become plain ones
    (a ``ModelOutput`` a dict), which compare the same way. A key/value cache, which no comparison reads,
    becomes None: recorded in a traced forward, its tensors would keep that forward's graph, and with it
    every weight it read, alive (after ``compact(inplace=True)`` has sliced them, a second model's worth)."""
    if _is_cache(out):
        return None
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, (list, tuple)):
        return [_detached(o) for o in out] if isinstance(out, list) else tuple(_detached(o) for o in out)
    if isinstance(out, Mapping):
        return {k: _detached(v) for k, v in out.items()}
    return out


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[Recording]:
    """Record the next forward of ``model`` (see :class:`Recording`); the hooks go on exit."""
    rec = Recording()

    def layer_in(name: str, mod: nn.Module, args: tuple) -> None:  # hooks return None: nothing is replaced
        rec.inputs.setdefault(name, []).append(args[0].detach())

    def layer_out(name: str, mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        _count(rec.macs, name, mod, args[0], out)
        rec.outputs_of.setdefault(name, []).append(out)

    def bn_in(name: str, mod: nn.Module, args: tuple) -> None:
        rec.bn_inputs.setdefault(name, []).append(args[0])

    def model_out(mod: nn.Module, args: tuple, out: Any) -> None:
        rec.returned = {id(t) for t in flatten_outputs(out)}
        rec.output = _detached(out)

    readers = [n for n, m in model.named_modules() if _reads_channels(m)]
    norms = [n for n, m in model.named_modules() if isinstance(m, BATCHNORM) and n not in readers]
    pre = {**{n: functools.partial(layer_in, n) for n in readers}, **{n: functools.partial(bn_in, n) for n in norms}}
    post: dict[str, Any] = {n: functools.partial(layer_out, n) for n in readers}
    post[""] = [post[""], model_out] if "" in post else model_out  # the model may itself be one layer
    with hooked(model, pre, post):
        yield rec


def _handed(rec: Recording, bn_pairs: Mapping[str, str]) -> dict[str, str]:
    """The traced conv -> BatchNorm pairs where the BN really read the conv's output, and only that,
    and the conv's output is not also returned by the model."""
    returned = rec.returned
    checked = {}
    for conv, bn in bn_pairs.items():
        outs, ins = rec.outputs_of.get(conv, []), rec.bn_inputs.get(bn, [])
        if outs and len(outs) == len(ins) and all(i is o for i, o in zip(ins, outs)) \
                and not any(id(o) in returned for o in outs):
            checked[conv] = bn
    return checked


def measure(model: nn.Module, watch: Mapping[str, Sequence[int]], batches: Sequence[tuple],
            bn_pairs: Optional[Mapping[str, str]] = None, first: Optional[Recording] = None) -> Measurements:
    """One forward per batch (``first``: the first batch was already recorded; its tensors are released), measuring:

    - for each consumer in ``watch``, the listed input channels (first value, varied or not);
    - the outputs;
    - MACs per conv / linear (first batch);
    - which traced conv -> BatchNorm pairs really hand the BN the conv's output and nothing else.
    """
    if first is None:
        with recording(model) as first, torch.no_grad():
            call(model, batches[0])
    stats = {n: ChannelStats(sorted(set(idxs))) for n, idxs in watch.items() if idxs}
    modules = dict(model.named_modules())
    for n, st in stats.items():
        for x in first.inputs.get(n, []):
            st.update(modules[n], x)
    bn_checked = _handed(first, bn_pairs or {})
    first.inputs.clear()  # the first batch's activations are no longer needed: free them before the next forward
    first.outputs_of.clear()
    first.bn_inputs.clear()
    outputs = [first.output]
    with hooked(model, {n: (lambda mod, args, _s=st: _s.update(mod, args[0])) for n, st in stats.items()}), \
            torch.no_grad():
        for b in batches[1:]:
            outputs.append(call(model, b))
    return Measurements(stats, outputs, dict(first.macs), bn_checked)


def count_macs(model: nn.Module, inputs: tuple) -> dict[str, int]:
    """Multiply-accumulates per conv / linear layer for one forward of ``inputs``, per sample."""
    with recording(model) as rec, torch.no_grad():
        call(model, inputs)
    return rec.macs


def nan_probe(model: nn.Module, produce: Mapping[str, set[int]], expect: Mapping[str, set[int]],
              batch: tuple) -> tuple[set[str], bool]:
    """Run ``model`` once with output channels ``produce[layer]`` set to NaN.

    Every conv / linear (and every layer in ``expect``) must then see NaN on exactly the
    input channels ``expect[layer]``; NaN is cleared at each reader's input before it
    mixes. Returns the layers where the NaN pattern differed, and whether NaN reached
    the model's outputs.
    """
    modules = dict(model.named_modules())
    bad: set[str] = set()

    def pre(name, mod, args):
        x = args[0]
        v = channel_view(mod, x)
        nan = set(torch.nonzero(torch.isnan(v).any(1)).flatten().tolist())
        if nan != expect.get(name, set()):
            bad.add(name)
        if nan:
            return (torch.nan_to_num(x, nan=0.0),) + tuple(args[1:])
        return None

    readers = set(expect) | {n for n, m in modules.items() if _reads_channels(m)}
    fill = {n: (lambda m, a, o, _i=idx: _filled(m, o, _i, float("nan"))) for n, idx in produce.items() if idx}
    with hooked(model, {n: functools.partial(pre, n) for n in readers}, fill), torch.no_grad():
        out = call(model, batch)
    leaked = any(bool(torch.isnan(o).any()) for o in flatten_outputs(out) if o.is_floating_point())
    return bad, leaked


def zeroed_outputs(model: nn.Module, zero_inputs: Mapping[str, Sequence[int]], batches: Sequence[tuple]) -> list:
    """Outputs of ``model`` with the listed input channels of each consumer zeroed ("drop" semantics)."""
    zero = {n: (lambda m, a, _i=set(idx): (_filled(m, a[0], _i, 0.0),) + tuple(a[1:])) for n, idx in zero_inputs.items()}
    with hooked(model, zero), torch.no_grad():
        return [call(model, b) for b in batches]
