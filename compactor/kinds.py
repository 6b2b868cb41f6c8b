"""What each supported layer kind is: one object per kind, found by :func:`kind_of`.

Every question the pipeline asks about a layer because of its type is answered here:
which dimension of the weight holds output rows and which input channels, which axis of
its input and output holds channels, how a cut slices each of its tensors, which
attributes hold its widths, its MACs, whether a constant input folds into a bias, how a
row mask is written. Adding a layer kind is one class here and one line of the graph's
classification (:func:`compactor.graph._classify`).

Subclasses count as their base kind (timm's ``BatchNormAct2d`` is a BatchNorm, compactor's
``BorderCorrectedConv2d`` a conv); per-output-channel tensors they add (a border kernel, a
timm ``gain``) are sliced with the rows when their first dimension is the output width.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["Kind", "kind_of", "CONV", "CONV_TRANSPOSE", "BATCHNORM", "is_transposed_linear", "is_linear_like",
           "out_major", "dead_rows", "zero_columns", "Slicing", "sliced", "replace_tensor", "add_to_bias"]

#: The conv types compactor slices (channels on dim 1 of the input) and the per-channel norms beside them.
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

#: tensor name -> ((dimension, removed indices), ...)
Slicing = dict[str, tuple[tuple[int, tuple[int, ...]], ...]]

#: Per-output-channel tensors a subclass may add beside its weight (sliced with the rows along dim 0).
_PER_CHANNEL_EXTRAS = ("gain", "border_kernel", "border_offset")


def _broadcast(t: torch.Tensor, dim: int, flags: torch.Tensor) -> torch.Tensor:
    """Ones shaped like ``t``, zero where ``flags`` (along ``dim``) hold: a view of one value per index."""
    keep = flags.logical_not().to(device=t.device, dtype=t.dtype)
    shape = [1] * t.dim()
    shape[dim] = t.shape[dim]
    return keep.reshape(shape).expand_as(t)


def sliced(t: torch.Tensor, dims: tuple[tuple[int, tuple[int, ...]], ...]) -> torch.Tensor:
    """``t`` (detached) without the ``removed`` indices along each ``dim`` of ``dims``."""
    t = t.detach()
    for dim, removed in dims:
        if removed:
            gone = set(removed)
            keep = torch.tensor([i for i in range(t.shape[dim]) if i not in gone], dtype=torch.long, device=t.device)
            t = t.index_select(dim, keep)
    return t.contiguous()


def add_to_bias(module: nn.Module, delta: torch.Tensor) -> None:
    """Add ``delta`` (one value per output channel) to ``module``'s bias, summed in float64; a layer without one
    gets ``delta`` as its bias."""
    delta = delta.to(module.weight.dtype)
    if module.bias is None:
        module.bias = nn.Parameter(delta.clone(), requires_grad=module.weight.requires_grad)
    else:
        module.bias.data = (module.bias.detach().double() + delta.double()).to(module.bias.dtype)


def replace_tensor(owner: nn.Module, attr: str, value: torch.Tensor, like: torch.Tensor) -> None:
    """Set ``owner.attr`` to ``value``, a Parameter (with ``like``'s requires_grad) where ``like`` is one."""
    if isinstance(like, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=like.requires_grad))
    else:
        setattr(owner, attr, value)


def is_transposed_linear(module: object) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2 and kin): ``x @ weight + bias`` with ``weight`` stored (in, out)."""
    return isinstance(module, nn.Module) and type(module).__name__ == "Conv1D" and hasattr(module, "nf") \
        and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2


class Kind:
    """One layer kind. The defaults describe a layer with weight (out, in, ...) and channels last."""

    name = ""
    #: the attributes that hold its widths: all its forward reads of its shape
    widths: tuple[str, ...] = ()
    #: the axis of its input and output that holds channels: 1 (N, C, ...) or -1 (..., C)
    channel_axis = -1
    #: computes each output from input channels through its weight: a consumer where constants fold, MACs counted
    reads = False

    #: the module types of this kind (subclasses included)
    types: tuple[type, ...] = ()

    def matches(self, module: object) -> bool:
        return isinstance(module, self.types)

    # ---- the weight
    def out_major(self, module: nn.Module) -> torch.Tensor:
        """The weight, detached, with output channels first and input channels second (a view)."""
        return module.weight.detach()

    def out_rows(self, module: nn.Module) -> int:
        return self.out_major(module).shape[0]

    # ---- slicing
    def slicing(self, module: nn.Module, out: tuple[int, ...], inputs: tuple[int, ...]) -> Slicing:
        """Which tensors lose which indices along which dimensions when ``out`` rows / ``inputs`` go."""
        spec: Slicing = {"weight": ((0, out), (1, inputs)), "bias": ((0, out),)}
        return self._with_extras(module, spec, out)

    def _with_extras(self, module: nn.Module, spec: Slicing, out: tuple[int, ...]) -> Slicing:
        n = self.out_rows(module)
        for name in _PER_CHANNEL_EXTRAS:
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n:
                spec[name] = ((0, out),)
        return spec

    def sync_widths(self, module: nn.Module, out: tuple[int, ...], inputs: tuple[int, ...]) -> None:
        """Set the width attributes from the sliced tensors (what its forward reads)."""

    def cut(self, module: nn.Module, out: tuple[int, ...], inputs: tuple[int, ...]) -> None:
        """Remove output rows ``out`` and input channels ``inputs`` from ``module`` in place."""
        for tname, dims in self.slicing(module, out, inputs).items():
            t = getattr(module, tname, None)
            if isinstance(t, torch.Tensor):
                replace_tensor(module, tname, sliced(t, dims), t)
        self.sync_widths(module, out, inputs)

    def describe(self, module: nn.Module) -> dict:
        """Its widths, by attribute name (what :func:`compactor.load` sets on a resized copy)."""
        out = {}
        for attr in self.widths:
            v = getattr(module, attr)
            out[attr] = list(v) if isinstance(v, tuple) else v
        return out

    # ---- what it computes
    def channel_view(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the channel axis first, everything else flattened after it."""
        if self.channel_axis == 1:
            return x.transpose(0, 1).reshape(x.shape[1], -1)
        return x.reshape(-1, x.shape[-1]).t()

    def macs(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
        """Multiply-accumulates per sample of one call with input ``x`` and output ``out``."""
        n = out.shape[0] if out.dim() > 1 else 1
        return out.numel() // n * self.out_major(module).shape[1]

    def constant_folds_into_bias(self, module: nn.Module) -> bool:
        """Whether a constant input channel adds the same to every output position (a bias can take it)."""
        return True

    def border_correctable(self, module: nn.Module) -> bool:
        """Whether ``border="layers"`` models what a constant input adds where no bias can take it."""
        return self.constant_folds_into_bias(module)

    # ---- masks
    def row_mask(self, module: nn.Module, flags: torch.Tensor, tensor: str = "weight") -> torch.Tensor:
        """A mask like ``module.<tensor>`` with the rows in ``flags`` zero (for torch's prune API): a broadcast
        view of one value per row, since torch's pruning hook keeps the mask it is given for good."""
        t = getattr(module, tensor)
        return _broadcast(t, self.out_dim_of("weight") if tensor == "weight" else 0, flags)

    def column_mask(self, module: nn.Module, flags: torch.Tensor) -> torch.Tensor:
        """A mask like ``module.weight`` with the input columns in ``flags`` zero (a broadcast view)."""
        return _broadcast(module.weight, 1 - self.out_dim_of("weight"), flags)

    def _major(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (or a tensor shaped like it) viewed as :meth:`out_major` views the weight."""
        dim = self.out_dim_of("weight")
        return weight.movedim(dim, 0) if dim else weight

    def out_dim_of(self, tensor: str) -> int:
        return 0


class _Linear(Kind):
    types = (nn.Linear,)
    name = "Linear"
    widths = ("in_features", "out_features")
    reads = True

    def sync_widths(self, module, out, inputs):
        module.out_features, module.in_features = module.weight.shape


class _TransposedLinear(Kind):
    """Hugging Face's ``Conv1D``: weight (in, out)."""

    name = "Conv1D"
    widths = ("nx", "nf")
    reads = True

    def matches(self, module: object) -> bool:
        return is_transposed_linear(module)

    def out_major(self, module):
        return module.weight.detach().t()

    def out_dim_of(self, tensor: str) -> int:
        return 1 if tensor == "weight" else 0

    def slicing(self, module, out, inputs):
        return {"weight": ((1, out), (0, inputs)), "bias": ((0, out),)}

    def sync_widths(self, module, out, inputs):
        module.nf = module.weight.shape[1]
        if hasattr(module, "nx"):
            module.nx = module.weight.shape[0]


class _Conv(Kind):
    types = CONV
    name = "Conv"
    widths = ("in_channels", "out_channels", "groups")
    channel_axis = 1
    reads = True

    def slicing(self, module, out, inputs):
        # a grouped conv loses whole groups: its per-group input width (weight dim 1) stays
        spec: Slicing = {"weight": ((0, out),) + (((1, inputs),) if module.groups == 1 else ()), "bias": ((0, out),)}
        return self._with_extras(module, spec, out)

    def sync_widths(self, module, out, inputs):
        if module.groups > 1:  # whole groups went
            module.groups -= len(inputs) // (module.in_channels // module.groups)
        module.out_channels = module.weight.shape[0]
        module.in_channels -= len(inputs)

    def macs(self, module, x, out):
        n = out.shape[0] if out.dim() > 1 else 1
        return out.numel() // n * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    def zero_padded(self, module: nn.Module) -> bool:
        return module.padding_mode == "zeros" and (
            module.padding == "same" or (not isinstance(module.padding, str) and any(module.padding)))

    def constant_folds_into_bias(self, module):
        return not self.zero_padded(module)

    def border_correctable(self, module):
        return True  # BorderCorrectedConv*


class _ConvTranspose(Kind):
    """``nn.ConvTranspose1d/2d/3d``: weight (in, out / groups, *k), output rows on dim 1. A constant input
    reaches the output unevenly (stride, borders, output padding), so no bias can take it."""

    name = "ConvTranspose"
    widths = ("in_channels", "out_channels")
    channel_axis = 1
    reads = True

    def matches(self, module: object) -> bool:
        return isinstance(module, CONV_TRANSPOSE) and module.groups == 1

    def out_major(self, module):
        return module.weight.detach().transpose(0, 1)

    def out_dim_of(self, tensor: str) -> int:
        return 1 if tensor == "weight" else 0

    def slicing(self, module, out, inputs):
        return self._with_extras(module, {"weight": ((1, out), (0, inputs)), "bias": ((0, out),)}, out)

    def sync_widths(self, module, out, inputs):
        module.in_channels, module.out_channels = module.weight.shape[0], module.weight.shape[1]

    def macs(self, module, x, out):
        n = x.shape[0] if x.dim() > 1 else 1
        return x.numel() // n * module.out_channels * math.prod(module.kernel_size)

    def constant_folds_into_bias(self, module):
        return False


class _BatchNorm(Kind):
    types = BATCHNORM
    name = "BatchNorm"
    widths = ("num_features",)
    channel_axis = 1

    def out_rows(self, module):
        return module.num_features

    def slicing(self, module, out, inputs):
        spec: Slicing = {t: ((0, out),) for t in ("weight", "bias", "running_mean", "running_var")}
        return self._with_extras(module, spec, out)

    def sync_widths(self, module, out, inputs):
        module.num_features -= len(out)


class _SlicedWeight(Kind):
    """A layer whose only sliced tensor is its weight, along ``weight_dim``; ``width`` holds that size."""

    weight_dim = 0
    width = ""

    def out_major(self, module):
        return module.weight.detach().t() if self.weight_dim == 1 else module.weight.detach()

    def out_dim_of(self, tensor: str) -> int:
        return self.weight_dim

    def slicing(self, module, out, inputs):
        return {"weight": ((self.weight_dim, out),)}

    def sync_widths(self, module, out, inputs):
        setattr(module, self.width, module.weight.shape[self.weight_dim])


class _PReLU(_SlicedWeight):
    """Its per-channel slopes."""

    types = (nn.PReLU,)
    name = "PReLU"
    widths = ("num_parameters",)
    width = "num_parameters"
    channel_axis = 1


class _Embedding(_SlicedWeight):
    """Rows are the embedding's features (weight dim 1): the channels it writes."""

    types = (nn.Embedding,)
    name = "Embedding"
    widths = ("num_embeddings", "embedding_dim")
    width = "embedding_dim"
    weight_dim = 1


class _LayerNorm(Kind):
    """Never sliced (it normalizes across channels); :func:`compactor.load` resizes it when a head rule did."""

    types = (nn.LayerNorm,)
    name = "LayerNorm"
    widths = ("normalized_shape",)


#: Tried in order, first match wins.
KINDS: tuple[Kind, ...] = (_TransposedLinear(), _Linear(), _Conv(), _ConvTranspose(), _BatchNorm(), _PReLU(),
                           _Embedding(), _LayerNorm())
_BY_NAME = {k.name: k for k in KINDS}


def kind_of(module: object) -> Optional[Kind]:
    """The :class:`Kind` of ``module``, or None for a layer compactor does not slice."""
    for kind in KINDS:
        if kind.matches(module):
            return kind
    return None


def by_name(name: str) -> Kind:
    return _BY_NAME[name]


def is_linear_like(module: object) -> bool:
    """``nn.Linear`` or a transposed one: reads and writes the last dimension."""
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


def out_major(module: nn.Module) -> torch.Tensor:
    """The layer's weight, detached, with output channels first and input channels second (a view)."""
    kind = kind_of(module)
    return kind.out_major(module) if kind is not None else module.weight.detach()


def dead_rows(module: nn.Module) -> torch.Tensor:
    """Boolean per output channel: True where the layer's weights for it are all zero."""
    w = out_major(module)
    w = w.reshape(w.shape[0], -1)
    return (w.amax(1) == 0) & (w.amin(1) == 0)  # weights are finite (checked): faster than counting nonzeros


def zero_columns(module: nn.Module) -> torch.Tensor:
    """Boolean per input channel of a conv (groups=1) / linear: True where no output reads it."""
    w = out_major(module)
    flat = w.reshape(w.shape[0], -1)
    zero = (flat.amax(0) == 0) & (flat.amin(0) == 0)  # per (input, kernel position)
    return zero.reshape(w.shape[1], -1).all(1)
