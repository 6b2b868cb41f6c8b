"""Layer kinds compactor slices beyond torch's own, and the layers a compact model may contain beyond plain torch ones."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BorderCorrectedConv1d", "BorderCorrectedConv2d", "BorderCorrectedConv3d", "with_border_correction",
           "is_transposed_linear", "out_major", "is_linear_like", "dead_rows", "zero_columns", "CONV", "BATCHNORM",
           "set_module"]


#: The layer types compactor slices along channel dimension 1 (convs) and the per-channel norms beside them.
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``root.get_submodule(name)`` is."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def is_transposed_linear(module: object) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2 and kin): ``x @ weight + bias`` with ``weight`` stored (in, out)."""
    return isinstance(module, nn.Module) and type(module).__name__ == "Conv1D" and hasattr(module, "nf") \
        and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2


def is_linear_like(module: object) -> bool:
    """``nn.Linear`` or a transposed one: reads and writes the last dimension."""
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


def out_major(module: nn.Module) -> torch.Tensor:
    """The layer's weight, detached, with output channels first and input channels second (a view)."""
    w = module.weight.detach()
    return w.t() if is_transposed_linear(module) or isinstance(module, nn.Embedding) else w


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



class _BorderCorrected:
    """Adds back what removed constant input channels contributed, border included.

    A removed input channel that held the constant ``v`` contributed
    ``v * sum(W[:, c])`` inside the image but less where the kernel overlaps the zero
    padding. ``border_kernel`` (out, 1, *k) is ``sum_c v_c W[:, c]``; convolving it over
    a one-channel tensor of ones the size of the input (batch 1, broadcast over the
    batch) reproduces that contribution exactly, for any input size.
    """

    border_kernel: torch.Tensor
    border_offset: torch.Tensor  # (out,): part of the contribution already folded elsewhere (a BatchNorm's mean)
    _fn = staticmethod(F.conv2d)

    def _map(self, size: tuple, x: torch.Tensor) -> torch.Tensor:
        ones = torch.ones((1, 1) + size, dtype=x.dtype, device=x.device)
        m = self._fn(ones, self.border_kernel.to(x.dtype), None, self.stride, self.padding, self.dilation)
        return m - self.border_offset.to(x.dtype).reshape((1, -1) + (1,) * (m.dim() - 2))

    def border_map(self, x: torch.Tensor) -> torch.Tensor:
        """The removed channels' contribution for an input shaped like ``x``: (1, out, *spatial)."""
        return self._map(tuple(x.shape[2:]), x)

    def _graph_map(self, x: torch.Tensor) -> torch.Tensor:
        """The map inside a captured graph (tracing, ONNX export, scripting, torch.compile)."""
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            # Exported graphs get the map for the traced spatial size as a constant, so the
            # runtime folds it away instead of rebuilding it from the input's shape on every call.
            # (Exports fix H and W; only the batch axis is dynamic.)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                size = tuple(int(d) for d in x.shape[2:])
            with torch.no_grad():
                return self._map(size, x)
        return self.border_map(x)

    def _entry(self, x: torch.Tensor) -> tuple:
        """Cached per input size: (the interior constant, frame patches, full map)."""
        k, o = self.border_kernel, self.border_offset
        key = (tuple(x.shape[2:]), x.dtype, x.device, k.data_ptr(), _version(k), o.data_ptr(), _version(o))
        cache = self.__dict__.setdefault("_border_cache", {})
        hit = cache.get(key)
        if hit is None:
            if len(cache) > 8:
                cache.clear()
            with torch.no_grad():
                hit = cache[key] = self._build_entry(x)
        return hit

    def _build_entry(self, x: torch.Tensor) -> tuple:
        full = self.border_map(x)
        if full.dim() != 4:
            return None, None, full
        # Inside the image the map equals sum(kernel): fold that into the bias and add the
        # remainder only on the frame where the kernel overlapped the zero padding.
        inner = self.border_kernel.to(x.dtype).flatten(1).sum(1) - self.border_offset.to(x.dtype)
        rest = full - inner[None, :, None, None]
        h, w = rest.shape[2:]
        rows = rest.abs().amax(dim=(0, 1, 3)) > 0
        cols = rest.abs().amax(dim=(0, 1, 2)) > 0
        rows, cols = rows.tolist(), cols.tolist()
        top, bottom = _run_length(rows), _run_length(rows[::-1])
        left, right = _run_length(cols), _run_length(cols[::-1])
        if top + bottom >= h or left + right >= w or bool(rest[:, :, top:h - bottom, left:w - right].any()):
            return None, None, full
        patches = []
        for region in ((slice(0, top), slice(None)), (slice(h - bottom, h), slice(None)),
                       (slice(top, h - bottom), slice(0, left)), (slice(top, h - bottom), slice(w - right, w))):
            patch = rest[(slice(None), slice(None)) + region]
            if patch.numel():
                patches.append((region, patch.contiguous()))
        return (inner if bool(inner.any()) else None), patches, full

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.jit.is_scripting() \
                or torch.compiler.is_compiling():
            return self._conv_forward(x, self.weight, self.bias) + self._graph_map(x)
        inner, patches, full = self._entry(x)
        if patches is None:  # 1-d / 3-d, or no plain interior: add the whole map
            return self._conv_forward(x, self.weight, self.bias).add_(full)
        bias = self.bias if inner is None else (inner if self.bias is None else self.bias + inner)
        y = self._conv_forward(x, self.weight, bias)
        for region, patch in patches:  # only the frame: a few rows and columns
            y[(slice(None), slice(None)) + region] += patch
        return y

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_border_cache", None)
        return state


def _version(t: torch.Tensor) -> int:
    """A tensor's in-place version counter; inference tensors (made under torch.inference_mode) have none,
    and cannot be changed in place outside it either."""
    return -1 if t.is_inference() else t._version


def _run_length(flags: list) -> int:
    """How many leading entries are True."""
    n = 0
    for f in flags:
        if not f:
            break
        n += 1
    return n


class BorderCorrectedConv1d(_BorderCorrected, nn.Conv1d):
    _fn = staticmethod(F.conv1d)


class BorderCorrectedConv2d(_BorderCorrected, nn.Conv2d):
    _fn = staticmethod(F.conv2d)


class BorderCorrectedConv3d(_BorderCorrected, nn.Conv3d):
    _fn = staticmethod(F.conv3d)


_CLASSES = {nn.Conv1d: BorderCorrectedConv1d, nn.Conv2d: BorderCorrectedConv2d, nn.Conv3d: BorderCorrectedConv3d}


def with_border_correction(conv: nn.Module, kernel: torch.Tensor, offset: "torch.Tensor | None" = None) -> nn.Module:
    """Return a border-corrected copy of ``conv`` (groups=1, zero padding) carrying ``kernel``.

    ``offset`` (out,) is the share of the contribution already folded elsewhere, e.g.
    ``kernel.sum()`` per output channel subtracted from the following BatchNorm's mean.
    """
    base = next(b for b in _CLASSES if isinstance(conv, b))
    new = _CLASSES[base].__new__(_CLASSES[base])
    new.__dict__.update(conv.__dict__)
    new._parameters = dict(conv._parameters)
    new._buffers = dict(conv._buffers)
    new._modules = dict(conv._modules)
    new.register_buffer("border_kernel", kernel.detach().to(conv.weight.dtype).unsqueeze(1).contiguous())
    off = torch.zeros(kernel.shape[0]) if offset is None else offset.detach()
    new.register_buffer("border_offset", off.to(device=conv.weight.device, dtype=conv.weight.dtype).contiguous())
    return new
