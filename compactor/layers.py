"""Layers the compact model may contain beyond plain torch ones."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BorderCorrectedConv1d", "BorderCorrectedConv2d", "BorderCorrectedConv3d", "with_border_correction"]


class _BorderCorrected:
    """Adds back what removed constant input channels contributed, border included.

    A removed input channel that held the constant ``v`` contributed
    ``v * sum(W[:, c])`` inside the image but less where the kernel overlaps the zero
    padding. ``border_kernel`` (out, 1, *k) is ``sum_c v_c W[:, c]``; convolving it over
    a one-channel tensor of ones the size of the input (batch 1, broadcast over the
    batch) reproduces that contribution exactly, for any input size.
    """

    border_kernel: torch.Tensor
    _fn = staticmethod(F.conv2d)

    def border_map(self, x: torch.Tensor) -> torch.Tensor:
        """The removed channels' contribution for an input shaped like ``x``: (1, out, *spatial)."""
        ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
        return self._fn(ones, self.border_kernel.to(x.dtype), None, self.stride, self.padding, self.dilation)

    def _cached_map(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            # Exported graphs get the map for the traced spatial size as a constant, so the
            # runtime folds it away instead of rebuilding it from the input's shape on every call.
            # (Exports fix H and W; only the batch axis is dynamic.)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                size = tuple(int(d) for d in x.shape[2:])
            with torch.no_grad():
                ones = torch.ones((1, 1) + size, dtype=x.dtype, device=x.device)
                return self._fn(ones, self.border_kernel.to(x.dtype), None, self.stride, self.padding, self.dilation)
        if torch.jit.is_scripting() or torch.compiler.is_compiling():
            return self.border_map(x)
        k = self.border_kernel
        key = (tuple(x.shape[2:]), x.dtype, x.device, k.data_ptr(), k._version)
        cache = self.__dict__.setdefault("_border_cache", {})
        hit = cache.get(key)
        if hit is None:
            if len(cache) > 8:
                cache.clear()
            with torch.no_grad():
                hit = cache[key] = self.border_map(x)
        return hit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(x, self.weight, self.bias)
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return y + self._cached_map(x)
        return y.add_(self._cached_map(x))  # the conv's fresh output: no extra buffer

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_border_cache", None)
        return state


class BorderCorrectedConv1d(_BorderCorrected, nn.Conv1d):
    _fn = staticmethod(F.conv1d)


class BorderCorrectedConv2d(_BorderCorrected, nn.Conv2d):
    _fn = staticmethod(F.conv2d)


class BorderCorrectedConv3d(_BorderCorrected, nn.Conv3d):
    _fn = staticmethod(F.conv3d)


_CLASSES = {nn.Conv1d: BorderCorrectedConv1d, nn.Conv2d: BorderCorrectedConv2d, nn.Conv3d: BorderCorrectedConv3d}


def with_border_correction(conv: nn.Module, kernel: torch.Tensor) -> nn.Module:
    """Return a border-corrected copy of ``conv`` (groups=1, zero padding) carrying ``kernel``."""
    base = next(b for b in _CLASSES if isinstance(conv, b))
    new = _CLASSES[base].__new__(_CLASSES[base])
    new.__dict__.update(conv.__dict__)
    new._parameters = dict(conv._parameters)
    new._buffers = dict(conv._buffers)
    new._modules = dict(conv._modules)
    new.register_buffer("border_kernel", kernel.detach().to(conv.weight.dtype).unsqueeze(1).contiguous())
    return new
