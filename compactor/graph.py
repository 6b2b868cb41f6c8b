"""The dependency graph: the one seam over torch-pruning's ``DependencyGraph``.

Nothing outside this module imports ``torch_pruning``. It answers one question:
which channels of which tensors are coupled, and through which operations. Each
coupled set of channels is a :class:`Group`; each place the group touches is an
:class:`Item` whose ``role`` tells the planner what it must do there:

``out``      a conv / linear / embedding that computes the channel (a producer);
``dw``       a depthwise conv: computes the channel from the same input channel;
``in``       a conv / linear that reads the channel (a consumer: constants fold here);
``gout``     a grouped conv (1 < groups < channels) computing the channel: only whole groups go;
``gin``      a grouped conv reading the channel: only whole groups go, with their outputs;
``slice``    a per-channel layer (BatchNorm, PReLU, a bare ``nn.Parameter``) that is sliced along;
``pass``     an operation that maps each channel on its own (ReLU, pooling, add, concat, flatten);
``blocked``  anything else: its channels are kept, and the reason is reported.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

import torch_pruning as tp
from torch_pruning import ops as tp_ops
from torch_pruning._helpers import _HybridIndex
from torch_pruning.dependency import index_mapping, shape_infer

from .kinds import BATCHNORM, CONV, is_linear_like, is_transposed_linear, kind_of
from . import probe
from .errors import CompactionError
from .tensors import Kwargs, first_line, flatten_outputs

__all__ = ["Item", "Group", "TraceError", "trace"]

# Autograd functions that act on each channel on its own, so a channel that is
# constant over batch and positions stays constant through them (up to zero-padded
# borders, which the planner checks numerically).
_CHANNELWISE_GRAD_FNS = {
    "Relu", "Relu6", "Hardtanh", "Clamp", "ClampMin", "ClampMax", "Sigmoid", "Tanh", "Gelu",
    "Silu", "Hardswish", "Hardsigmoid", "LeakyRelu", "Elu", "Selu", "Celu", "Softplus", "Mish",
    "MaxPool1DWithIndices", "MaxPool2DWithIndices", "MaxPool3DWithIndices", "MaxPool2D",
    "AvgPool1D", "AvgPool2D", "AvgPool3D", "AdaptiveAvgPool1D", "AdaptiveAvgPool2D",
    "AdaptiveAvgPool3D", "AdaptiveMaxPool1D", "AdaptiveMaxPool2D", "AdaptiveMaxPool3D",
    "Mean", "Add", "Sub", "Mul", "Div", "Neg", "Clone", "View", "Reshape", "UnsafeView",
    "Flatten", "Expand", "Squeeze", "Unsqueeze", "T", "Permute", "Transpose", "Cat", "Split",
    "SplitWithSizes", "Unbind", "Dropout", "NativeDropout", "Alias",
    "ToCopy", "Contiguous", "Upsample", "UpsampleNearest2D", "UpsampleBilinear2D",
    "UpsampleNearest1D", "UpsampleNearest3D", "Exp", "Abs", "Sqrt", "Pow", "Rsqrt",
    # spatial padding (a zero pad's border shows up in the numeric constancy check)
    "ConstantPadNd", "ReflectionPad1D", "ReflectionPad2D", "ReflectionPad3D",
    "ReplicationPad1D", "ReplicationPad2D", "ReplicationPad3D",
}

# Of those, the ones that keep every channel at its index (no view, permute, split or concat).
_IN_PLACE_GRAD_FNS = _CHANNELWISE_GRAD_FNS - {
    "View", "Reshape", "UnsafeView", "Flatten", "Expand", "Squeeze", "Unsqueeze", "T", "Permute", "Transpose",
    "Cat", "Split", "SplitWithSizes", "Unbind", "Alias",
}

# BatchNorm computed by a module that also applies an activation (timm's BatchNormAct2d): per channel.
_PER_CHANNEL_NORMS = {"NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm"}



@dataclass
class Item:
    """One place a group of coupled channels touches."""

    name: str
    module: Optional[Union[nn.Module, nn.Parameter]]
    role: str
    idxs: list[int]
    root_idxs: list[int]
    op: str
    reason: str = ""
    dim: int = 0  # for role "slice" on an nn.Parameter: the channel dimension

    @functools.cached_property
    def positions(self) -> dict[int, list[int]]:
        """Per root channel, the positions in ``idxs`` / ``root_idxs`` it reaches (a wide layer has tens of
        thousands: looked up, not scanned, per unit)."""
        out: dict[int, list[int]] = {}
        for p, r in enumerate(self.root_idxs):
            out.setdefault(r, []).append(p)
        return out


@dataclass
class Group:
    """Channels coupled across layers: removing root channel r removes ``idxs`` where ``root_idxs == r`` in every item."""

    root: str
    size: int
    items: list[Item] = field(default_factory=list)
    reaches_output: bool = False
    unclear: str = ""  # why the traced mapping of this group is not understood (then nothing in it goes)
    factors: tuple[str, ...] = ()  # a gated product f(a(x)) * b(x) of two producers, f(0) = 0: (a, b)

    def mapping_is_plain(self) -> bool:
        """True when the channels only pass through convs, BatchNorm, PReLU and per-channel ops that keep
        each channel at its index: the traced mapping is the identity and needs no check on the model."""
        for it in self.items:
            if it.role == "pass":
                if it.op not in _IN_PLACE_GRAD_FNS:
                    return False
            elif getattr(kind_of(it.module), "channel_axis", None) != 1:  # convs, BatchNorm, PReLU
                return False
        return True

    def layers(self) -> list[str]:
        seen: list[str] = []
        for it in self.items:
            if it.role in ("out", "dw", "gout", "in", "gin", "slice") and it.name not in seen:
                seen.append(it.name)
        return seen


def _grad_fn_name(node) -> str:
    fn = getattr(node, "grad_fn", None)
    name = type(fn).__name__ if fn is not None else type(node.module).__name__
    for suffix in ("Backward0", "Backward1", "Backward2", "Backward"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _classify(node, handler, DG) -> tuple[str, str, str, int]:
    """Return (role, op, reason, dim) for one group item."""
    module = node.module
    t = node.type
    O = tp_ops.OPTYPE
    if t in (O.CONV, O.DEPTHWISE_CONV):
        op = type(module).__name__
        kind = kind_of(module)
        if kind is not None and kind.name == "ConvTranspose":
            return ("out" if DG.is_out_channel_pruning_fn(handler) else "in"), op, "", 0
        if not isinstance(module, CONV):
            return "blocked", op, f"{op} is not supported (only Conv1d/2d/3d, ConvTranspose1d/2d/3d with groups=1)", 0
        if module.groups == 1:
            return ("out" if DG.is_out_channel_pruning_fn(handler) else "in"), op, "", 0
        if module.groups == module.in_channels == module.out_channels:
            return "dw", op, "", 0
        return ("gout" if DG.is_out_channel_pruning_fn(handler) else "gin"), op, "", 0
    if t == O.LINEAR:
        return ("out" if DG.is_out_channel_pruning_fn(handler) else "in"), "Linear", "", 0
    if t == O.EMBED:
        return "out", "Embedding", "", 0
    if t == O.BN:
        if isinstance(module, BATCHNORM):
            return "slice", type(module).__name__, "", 0
        return "blocked", type(module).__name__, f"{type(module).__name__} is not supported", 0
    if t == O.PRELU:
        return ("slice" if module.num_parameters > 1 else "pass"), "PReLU", "", 0
    if t == O.PARAMETER:
        dim = next((up.pruning_dim for up in DG.unwrapped_parameters if up.parameters is module), 0)
        return "slice", "Parameter", "", dim
    if t == O.SLICE:  # fixed bounds (h[:, :4]) cannot be renumbered when channels go
        return "blocked", "slice", "a fixed slice of the channels keeps them", 0
    if t in (O.CONCAT, O.SPLIT, O.RESHAPE, O.UNBIND, O.EXPAND):
        return "pass", t.name.lower(), "", 0
    if t == O.ELEMENTWISE:
        op = _grad_fn_name(node)
        if op in _CHANNELWISE_GRAD_FNS or (op in _PER_CHANNEL_NORMS and any(
                o.type == O.BN and isinstance(o.module, BATCHNORM) for o in node.outputs)):
            return "pass", op, "", 0
        if op in ("Slice", "Select"):
            return "blocked", op, f"a fixed '{op.lower()}' of the tensor keeps these channels", 0
        if op in ("Addmm", "Mm") and node.outputs and all(
                o.type == O.LINEAR or is_transposed_linear(o.module) for o in node.outputs):
            return "pass", op, "", 0  # the matmul inside an nn.Linear (or a Conv1D) applied to a (N, L, F) input
        return "blocked", op, f"operation '{op}' may mix channels", 0
    if t == O.CUSTOMIZED and is_transposed_linear(module):
        return ("out" if DG.is_out_channel_pruning_fn(handler) else "in"), "Conv1D", "", 0
    op = type(module).__name__ if isinstance(module, nn.Module) else t.name
    what = {O.LN: "normalizes across channels", O.GN: "normalizes across channels",
            O.IN: "is not supported", O.MHA: "attention heads are not sliced",
            O.LSTM: "is not supported", O.CUSTOMIZED: "is not supported"}.get(t, "is not supported")
    return "blocked", op, f"{op} {what}", 0


_PAIR_BUDGET = 150_000  # (index, root) pairs one group may reach (~150 bytes each) before it counts as not understood


class _TransposedLinearPruner(tp.pruner.function.BasePruningFunc):
    """Tells torch-pruning the widths of Hugging Face's Conv1D (weight (in, out)); compactor slices it itself."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise NotImplementedError("compactor slices layers itself")

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise NotImplementedError("compactor slices layers itself")

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[1]

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[0]


_TRANSPOSED_LINEAR = _TransposedLinearPruner()


def _build(model: nn.Module, example_inputs: Sequence) -> tuple[Any, dict[Any, str], set]:
    """torch-pruning's ``build_dependency``, one step at a time: a node whose index mapping
    cannot be worked out is recorded (node -> why) instead of failing the whole trace.
    Also returns the nodes whose tensors the model returns (used further inside or not)."""
    DG = tp.DependencyGraph()
    DG.verbose = False
    DG.model = model
    DG._module2name = {m: n for n, m in model.named_modules()}
    DG.ignored_params = []
    for cls in {type(m) for m in model.modules() if is_transposed_linear(m)}:
        DG.register_customized_layer(cls, _TRANSPOSED_LINEAR)
    DG._param_to_name, DG.unwrapped_parameters = DG._detect_unwrapped_parameters(None)
    returned: set = set()

    def outputs(mod: nn.Module, args: tuple, out: Any) -> None:
        returned.update(t.grad_fn for t in flatten_outputs(out) if t.grad_fn is not None)

    inputs = example_inputs[0] if len(example_inputs) == 1 and isinstance(example_inputs[0], Kwargs) \
        else tuple(example_inputs)  # torch-pruning calls model(**inputs) for a dict
    with probe.hooked(model, post={"": outputs}):
        DG.module2node = DG._trace(model, inputs, None, output_transform=lambda out: [
            t for t in flatten_outputs(out) if t.grad_fn is not None])  # ModelOutput, caches skipped
    DG._build_dependency(DG.module2node)
    output_nodes = {n for n in DG.module2node.values() if n.grad_fn in returned}
    broken: dict[Any, str] = {}
    try:
        shape_infer.init_shape_information(DG)
    except Exception as exc:  # a split whose sizes cannot be read: its mappings stay unknown
        broken.update({n: f"channel sizes not understood ({type(exc).__name__})" for n in DG.module2node.values()
                       if n.type == tp_ops.OPTYPE.SPLIT})
    updates = {tp_ops.OPTYPE.CONCAT: index_mapping.update_concat_index_mapping,
               tp_ops.OPTYPE.SPLIT: index_mapping.update_split_index_mapping,
               tp_ops.OPTYPE.RESHAPE: index_mapping.update_reshape_index_mapping,
               tp_ops.OPTYPE.UNBIND: index_mapping.update_unbind_index_mapping,
               tp_ops.OPTYPE.EXPAND: index_mapping.update_expand_index_mapping,
               tp_ops.OPTYPE.SLICE: index_mapping.update_slice_index_mapping}
    for node in DG.module2node.values():
        update = updates.get(node.type)
        if update is not None and node not in broken:
            try:
                update(DG, node)
            except Exception as exc:
                broken[node] = f"channel mapping not understood ({type(exc).__name__}: {exc})"
    return DG, broken, output_nodes


def _closure(DG: Any, module: nn.Module, fn: Any, n: int, names: dict) -> tuple[dict[tuple, tuple[Any, set]], str]:
    """Every (node, handler) that pruning output channels ``0..n-1`` of ``module`` reaches, with the
    (index, root index) pairs it reaches them at; and why the walk stopped short, or ''.

    torch-pruning's ``get_pruning_group`` re-walks a node each time it arrives with another
    index list, which explodes on expand / repeat and windowed reshapes; this walks each
    (node, handler, index, root) once. Index mappings act index by index, so walking only
    the new pairs reaches the same closure.
    """
    root = DG.module2node[module]
    start = tp.Dependency(fn, fn, source=root, target=root)
    first = [_HybridIndex(idx=i, root_idx=i) for i in range(n)]
    reached: dict[tuple, tuple[Any, set]] = {(root, fn): (start, set(first))}  # _HybridIndex is an (idx, root) tuple
    stack = [(start, first)]
    total = n
    while stack:
        dep, idxs = stack.pop()
        for nxt in dep.target.dependencies:
            if not nxt.is_triggered_by(dep.handler):
                continue
            new = idxs
            try:
                for mapping in nxt.index_mapping:
                    if mapping is not None:
                        new = _mapped(mapping, new)
            except Exception as exc:  # a mapping built from shapes it misread
                where = names.get(nxt.target.module) or _where(nxt.target, names)
                return reached, f"{_NOT_UNDERSTOOD} through {where} failed ({type(exc).__name__})"
            if not new:
                continue
            _, seen = reached.setdefault((nxt.target, nxt.handler), (nxt, set()))
            fresh = set(new)
            fresh -= seen
            if fresh:
                seen |= fresh
                total += len(fresh)
                if total > _PAIR_BUDGET:
                    return reached, (f"{_NOT_UNDERSTOOD} reaches too many channels to follow (e.g. a repeat / "
                                     "expand of heads, or windows reshaped into the batch)")
                stack.append((nxt, list(fresh)))
    return reached, ""


_pair = tuple.__new__  # _pair(_HybridIndex, (idx, root)): a _HybridIndex without its keyword-parsing __new__


def _mapped(mapping: Any, idxs: list) -> list:
    """torch-pruning's index ``mapping`` applied to (idx, root) pairs: the same pairs its ``__call__`` returns,
    made several times faster for the kinds a flatten / concat / split / slice builds (a flatten of a
    64-channel 16x16 map makes 16 384 pairs per channel set); any other kind through its own ``__call__``."""
    kind, rev, H = type(mapping), getattr(mapping, "reverse", False), _HybridIndex
    if kind is index_mapping._FlattenIndexMapping:
        s = mapping._stride
        if rev:
            return list({_pair(H, (i // s, r)) for i, r in idxs})
        out: list = []
        make = functools.partial(_pair, H)  # called from C by map: no Python frame per pair
        for i, r in idxs:
            out.extend(map(make, zip(range(i * s, (i + 1) * s), itertools.repeat(r))))
        return out
    if kind in (index_mapping._ConcatIndexMapping, index_mapping._SplitIndexMapping):
        lo, hi = mapping.offset[0], mapping.offset[1]
        if rev == (kind is index_mapping._ConcatIndexMapping):  # back through a concat, forward through a split
            return [_pair(H, (i - lo, r)) for i, r in idxs if lo <= i < hi]
        return [_pair(H, (i + lo, r)) for i, r in idxs]
    if kind is index_mapping._SliceIndexMapping:
        start, step, end = mapping.start, mapping.step, mapping.end
        if rev:
            return [_pair(H, (i * step + start, r)) for i, r in idxs]
        return [_pair(H, ((i - start) // step, r)) for i, r in idxs if start <= i < end and (i - start) % step == 0]
    return mapping(idxs)


def _width(DG: Any, node: Any, handler: Any) -> Optional[int]:
    """How many channels the tensor an item indexes has, or None if unknown."""
    try:
        if DG.is_out_channel_pruning_fn(handler):
            return DG.get_out_channels(node)
        return DG.get_in_channels(node)
    except Exception:
        return None


def _near(node: Any, names: dict, direction: str, limit: int = 64) -> Optional[str]:
    """The name of the nearest module-backed node upstream ("inputs") or downstream ("outputs")."""
    todo, seen = list(getattr(node, direction)), set()
    while todo and len(seen) < limit:
        n = todo.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.module in names:
            return names[n.module]
        todo.extend(getattr(n, direction))
    return None


def _where(node: Any, names: dict) -> str:
    """An operation inside the model in the user's terms: "'cumsum' in 'blocks.0.attn'"."""
    up, down = _near(node, names, "inputs"), _near(node, names, "outputs")
    op = _op_words(_grad_fn_name(node)) if node.type == tp_ops.OPTYPE.ELEMENTWISE else node.type.name.lower()
    if up and down:
        common = []
        for a, b in zip(up.split("."), down.split(".")):
            if a != b:
                break
            common.append(a)
        if common:
            return f"'{op}' in '{'.'.join(common)}'"
        return f"'{op}' between '{up}' and '{down}'"
    return f"'{op}' after '{up}'" if up else (f"'{op}' before '{down}'" if down else f"'{op}'")


def _op_words(name: str) -> str:
    if name.startswith("ScaledDotProduct"):
        return "scaled_dot_product_attention"
    out = []
    for ch in name:
        if ch.isupper() and out and not out[-1].isupper():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def trace(model: nn.Module, example_inputs: Sequence[torch.Tensor],
          check: Callable[[], None] = lambda: None) -> tuple[list[Group], dict[str, str]]:
    """Trace ``model`` (a copy the caller owns: tracing switches it to eval) and list its channel groups.

    Every conv, linear and embedding output starts a group; a layer already
    covered by an earlier (understood) group does not start another. An item whose
    traced indices do not fit its tensor, or that maps one channel to two roots, is
    "blocked" (its group is kept and reported), never an error. Also returns, for each
    conv whose output feeds one BatchNorm and nothing else, that BatchNorm's name.
    ``check`` is called before each group (it may raise to stop a long trace).

    Raises:
        TraceError: torch-pruning could not trace the model (the message says why).
    """
    try:
        return _trace(model, example_inputs, check)
    except (MemoryError, CompactionError):
        raise
    except Exception as exc:
        raise TraceError(first_line(exc)) from exc


def _trace(model: nn.Module, example_inputs: Sequence[torch.Tensor],
           check: Callable[[], None]) -> tuple[list[Group], dict[str, str]]:
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")
        DG, broken, output_nodes = _build(model, example_inputs)
    names = {m: n for n, m in model.named_modules()}
    names.update({p: n for n, p in model.named_parameters()})
    groups = []
    roots = ("Conv", "ConvTranspose", "Linear", "Embedding", "Conv1D")  # kinds that compute channels
    visited: set = set()
    ignored = set(DG.IGNORED_LAYERS_IN_TRACING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in list(DG.module2node):
            if getattr(kind_of(m), "name", None) not in roots or m in visited or m in ignored:
                continue
            check()
            pruner = DG.get_pruner_of_module(m)
            n = pruner.get_out_channels(m) if pruner is not None else None
            if not n:
                continue
            fn = pruner.prune_out_channels
            if isinstance(m, CONV) and m.groups == m.out_channels and m.out_channels > 1:
                fn = tp.function.prune_depthwise_conv_out_channels  # as torch-pruning does for a depthwise root
            group = _group(DG, m, fn, n, names, broken, output_nodes)
            groups.append(group)
            if not group.unclear:  # else its layers may still start groups of their own
                visited.update(it.module for it in group.items if it.role in ("out", "dw", "gout"))
    bn_after = {}
    O = tp_ops.OPTYPE
    for module, node in DG.module2node.items():
        if node.type == O.CONV and len(node.outputs) == 1:
            nxt = node.outputs[0]
            if nxt.type == O.BN and isinstance(nxt.module, BATCHNORM) and [i.module for i in nxt.inputs] == [module]:
                bn_after[names[module]] = names[nxt.module]
    return groups, bn_after


_NOT_UNDERSTOOD = "the traced channel mapping"


class TraceError(Exception):
    """The model could not be traced (torch-pruning's ``DependencyGraph`` failed on it)."""


def _mean_mixes(node: Any, channels_last: bool) -> bool:
    """Whether a traced mean reduces over the channel dimension (the last one for linear layers' tensors, dim 1
    for convs'): an RMSNorm or LayerNorm written by hand. A mean of everything counts too."""
    fn = getattr(node, "grad_fn", None)
    sizes = getattr(fn, "_saved_self_sym_sizes", None)
    if sizes is None:
        return False
    dims = getattr(fn, "_saved_dim", None)
    if dims is None:  # mean of every element
        return True
    ndim = len(sizes)
    reduced = {(d if d < 2**63 else d - 2**64) % ndim for d in dims}
    return (ndim - 1 if channels_last else min(1, ndim - 1)) in reduced


def _group(DG: Any, module: nn.Module, fn: Any, n: int, names: dict, broken: dict, output_nodes: set) -> Group:
    group = Group(root=names.get(module, DG.module2node[module].name), size=n)
    reached, problem = _closure(DG, module, fn, n, names)
    if problem:
        root = DG.module2node[module]
        group.unclear = f"{problem}; kept"
        group.items.append(Item(group.root, module, "blocked", list(range(n)), list(range(n)),
                                _classify(root, fn, DG)[1], problem))
        return group
    channels_last = kind_of(module).channel_axis == -1  # Linear / Embedding / Conv1D groups: channels last
    reached, group.size = _merged(reached, n)
    for (node, handler), (dep, pairs) in reached.items():
        if isinstance(node.module, nn.Parameter) and any(node.module is p for p in DG.ignored_params):
            continue
        try:
            pairs = sorted(pairs)
        except TypeError:  # a root index None (torch-pruning's GQA mapping): sorted anyway, then refused below
            pairs = sorted(pairs, key=lambda p: (p[0], -1 if p[1] is None else p[1]))
        idxs, root_idxs = [p[0] for p in pairs], [p[1] for p in pairs]
        role, op, reason, dim = _classify(node, handler, DG)
        name = names.get(node.module) or _where(node, names)
        width = _width(DG, node, handler) if role not in ("pass", "blocked") else None
        unclear = ""
        if node in broken:
            unclear = f"{name}: {broken[node]}"
        elif None in root_idxs or len(set(idxs)) != len(idxs):
            unclear = f"{_NOT_UNDERSTOOD} through {name} is ambiguous (a channel with two sources)"
        elif width is not None and idxs and (idxs[0] < 0 or idxs[-1] >= width):
            unclear = (f"{_NOT_UNDERSTOOD} does not fit {name} (it reaches channel index {idxs[-1]} of a tensor "
                       f"with {width} channels)")
        if role == "pass" and op == "Mean" and _mean_mixes(node, channels_last):
            role, reason = "blocked", f"{name}: a mean over the channels (a norm computed by hand) mixes them"
        if unclear:
            role, reason = "blocked", unclear
            group.unclear = group.unclear or f"{unclear}; kept"
        if role != "in" and (not node.outputs or node in output_nodes):  # returned, maybe also used further
            group.reaches_output = True
        group.items.append(Item(name, node.module, role, idxs, root_idxs, op, reason, dim))
    group.factors = _factors({node for node, _ in reached}, names, group)
    return group


def _merged(reached: dict[tuple, tuple[Any, set]], n: int) -> tuple[dict[tuple, tuple[Any, set]], int]:
    """Root channels that reach one index of the same tensor together (a fused gate-and-up layer's two halves
    multiplied, ``a[:, :C] + a[:, C:]``) can only go together: each such set becomes one root channel,
    numbered by its lowest member, densely. Returns the pairs re-rooted and the number of roots left."""
    parent = list(range(n))

    def find(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for _, pairs in reached.values():
        first: dict[int, int] = {}
        for i, r in pairs:
            if r is None or not 0 <= r < n:
                return reached, n  # refused by the caller (a root index torch-pruning could not tell)
            other = first.setdefault(i, r)
            a, b = find(other), find(r)
            if a != b:
                parent[max(a, b)] = min(a, b)
    roots = sorted({find(r) for r in range(n)})
    if len(roots) == n:
        return reached, n
    number = {r: k for k, r in enumerate(roots)}
    H = _HybridIndex
    out = {key: (dep, {_pair(H, (i, number[find(r)])) for i, r in pairs}) for key, (dep, pairs) in reached.items()}
    return out, len(roots)


# f(0) = 0 and one input: a channel that is zero before stays zero after
_ZERO_KEEPING = {"Relu", "Relu6", "Silu", "Gelu", "Tanh", "LeakyRelu", "Elu", "Selu", "Celu", "Mish", "Hardswish",
                 "Hardtanh", "Dropout", "NativeDropout", "Clone", "Alias", "ToCopy", "Contiguous"}


def _factors(nodes: set, names: dict, group: Group) -> tuple[str, ...]:
    """(a, b) when the group's channels are ``f(a(x)) * b(x)`` -- one product of exactly two producers, each
    reaching it alone through ops with f(0) = 0 -- so a row masked in either factor (without bias) is zero
    after the product: a GLU MLP's gate and up projections. Else ()."""
    producers = {it.module for it in group.items if it.role in ("out", "dw", "gout")}
    muls = [n for n in nodes if n.type == tp_ops.OPTYPE.ELEMENTWISE and _grad_fn_name(n) == "Mul"]
    if len(muls) != 1 or len(muls[0].inputs) != 2 or len(producers) != 2:
        return ()
    sides = []
    for n in muls[0].inputs:
        while n.module not in producers:
            if not (n.type == tp_ops.OPTYPE.ELEMENTWISE and _grad_fn_name(n) in _ZERO_KEEPING
                    and len(n.inputs) == 1 and len(n.outputs) == 1):
                return ()
            n = n.inputs[0]
        if len(n.outputs) != 1 or not isinstance(n.module, nn.Module) or not is_linear_like(n.module):
            return ()  # the factor is also used elsewhere, or not a linear layer
        sides.append(names.get(n.module))
    if None in sides or sides[0] == sides[1]:
        return ()
    return tuple(sides)
