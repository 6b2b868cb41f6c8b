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

import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn

import torch_pruning as tp
from torch_pruning import ops as tp_ops

__all__ = ["Item", "Group", "trace"]

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

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


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


@dataclass
class Group:
    """Channels coupled across layers: removing root channel r removes ``idxs`` where ``root_idxs == r`` in every item."""

    root: str
    size: int
    items: list[Item] = field(default_factory=list)
    reaches_output: bool = False

    def layers(self) -> list[str]:
        seen: list[str] = []
        for it in self.items:
            if it.role in ("out", "dw", "in", "slice") and it.name not in seen:
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
        if not isinstance(module, _CONV):
            return "blocked", op, f"{op} is not supported (only Conv1d/2d/3d)", 0
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
        if isinstance(module, _BN):
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
        if op in _CHANNELWISE_GRAD_FNS:
            return "pass", op, "", 0
        if op in ("Slice", "Select"):
            return "blocked", op, f"a fixed '{op.lower()}' of the tensor keeps these channels", 0
        if op in ("Addmm", "Mm") and node.outputs and all(o.type == O.LINEAR for o in node.outputs):
            return "pass", op, "", 0  # the matmul inside an nn.Linear applied to a (N, L, F) input
        return "blocked", op, f"operation '{op}' may mix channels", 0
    op = type(module).__name__ if isinstance(module, nn.Module) else t.name
    what = {O.LN: "normalizes across channels", O.GN: "normalizes across channels",
            O.IN: "is not supported", O.MHA: "attention heads are not sliced",
            O.LSTM: "is not supported", O.CUSTOMIZED: "is not supported"}.get(t, "is not supported")
    return "blocked", op, f"{op} {what}", 0


def trace(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> tuple[list[Group], dict[str, str]]:
    """Trace ``model`` (a copy the caller owns: tracing switches it to eval) and list its channel groups.

    Every conv, linear and embedding output starts a group; a layer already
    covered by an earlier group does not start another. Also returns, for each conv
    whose output feeds one BatchNorm and nothing else, that BatchNorm's name.
    """
    DG = tp.DependencyGraph()
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")
        DG.build_dependency(model, example_inputs=tuple(example_inputs), verbose=False)
    names = {m: n for n, m in model.named_modules()}
    names.update({p: n for n, p in model.named_parameters()})
    groups = []
    roots = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for g in DG.get_all_groups(root_module_types=roots):
            first = g[0]
            root_module = first.dep.target.module
            group = Group(root=names.get(root_module, first.dep.target.name), size=len(first.idxs))
            for it in g:
                node, handler = it.dep.target, it.dep.handler
                role, op, reason, dim = _classify(node, handler, DG)
                name = names.get(node.module, node.name)
                if not node.outputs and role != "in":
                    group.reaches_output = True
                group.items.append(Item(name, node.module, role, list(it.idxs), list(it.root_idxs), op, reason, dim))
            groups.append(group)
    bn_after = {}
    O = tp_ops.OPTYPE
    for module, node in DG.module2node.items():
        if node.type == O.CONV and len(node.outputs) == 1:
            nxt = node.outputs[0]
            if nxt.type == O.BN and isinstance(nxt.module, _BN) and [i.module for i in nxt.inputs] == [module]:
                bn_after[names[module]] = names[nxt.module]
    return groups, bn_after
