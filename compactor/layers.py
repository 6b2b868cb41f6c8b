"""The layers ``compact(..., border="layers")`` adds: border-corrected convs and BatchNorms (opt-in)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx._symbolic_trace as _fx
import torch.nn.functional as F
from torch import nn

__all__ = ["BorderCorrectedConv1d", "BorderCorrectedConv2d", "BorderCorrectedConv3d", "with_border_correction",
           "BorderCorrectedBatchNorm1d", "BorderCorrectedBatchNorm2d", "BorderCorrectedBatchNorm3d",
           "with_border_correction_bn", "set_module"]


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``root.get_submodule(name)`` is."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)



def _capturing() -> bool:
    """Inside a captured graph: jit tracing (and the TorchScript ONNX exporter), or torch.compile / torch.export
    (and the dynamo ONNX exporter), all of which report ``is_compiling``."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


#: Inside ``torch.fx.symbolic_trace``: shapes are proxies, and no Python branch may read them.
_fx_tracing = getattr(_fx, "is_fx_symbolic_tracing", None) or _fx.is_fx_tracing


def _eager_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A border-corrected layer's forward, as one opaque call in a ``torch.fx`` graph: at run time it reads
    the module's mode and caches as the module itself does (a traced graph must not fix train or eval)."""
    return module.forward(x)


torch.fx.wrap("_eager_forward")


def _stamp(tensors: tuple) -> tuple:
    """What identifies the current contents of some tensors: storage address and in-place version. Inference
    tensors have no version counter (RuntimeError): nothing derived from them is cached."""
    return tuple([None if t is None else (t.data_ptr(), t._version) for t in tensors])


def _fast_key(x: torch.Tensor, sources: tuple, extra: Any) -> tuple:
    """What a remembered per-input value depends on: ``x``'s type (a fake tensor's constants are fake), shape,
    strides, dtype and device, the grad and inference modes, ``extra``, and each source's :func:`_stamp`."""
    return (type(x), x.shape, x.stride(), x.dtype, x.device, torch.is_inference_mode_enabled(),
            torch.is_grad_enabled(), extra, _stamp(sources))


def _cache_names(d: dict) -> list:
    """The per-input constants a border-corrected layer keeps in its ``__dict__``."""
    return [n for n in d if n == "_border_cache" or n.startswith("_memo_")]


def _spatial(x: torch.Tensor) -> tuple[int, ...]:
    """``x``'s spatial size as ints (traced: a constant of the graph; exports fix H and W, only the batch varies)."""
    if not torch.jit.is_tracing():  # (torch.compile cannot trace the warnings filter: no graph break here)
        return tuple(int(d) for d in x.shape[2:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tuple(int(d) for d in x.shape[2:])


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format


def _one_launch_preferred(x: torch.Tensor) -> bool:
    """Whether one add of the whole map beats a few adds on the frame: on a GPU each add is a kernel launch, and
    eager PyTorch at moderate batch is bound by launches, not by the pass over the output."""
    return x.device.type != "cpu"


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _MapCache:
    """Per-input-size constants, rebuilt when a tensor they derive from is replaced or edited in place.

    An entry is keyed by the storage address and in-place version of every tensor it was
    built from, and keeps those storages alive, so a later tensor cannot reuse an address
    and pass for the old one. Inference tensors have no version counter: with any of them
    among the sources nothing is cached. Changing the mode (``train()`` / ``eval()``) or
    converting the module (``to``, ``half``, ...) empties the cache; so call ``eval()``
    again after editing parameters through ``.data``, which PyTorch's version counters
    do not see.
    """

    def _memo(self, tag: str, x: torch.Tensor, sources: tuple, key, build, extra: Any = None) -> Any:
        """:meth:`_cached`, remembered for the input seen last (see :meth:`_hit`)."""
        hit = self._hit(tag, x, sources, extra)
        if hit is not None:
            return hit
        value = self._cached(key() + (type(x),), sources, build)
        live = [t for t in sources if t is not None]
        if not any(t.is_inference() for t in live):  # keeps the storages: their addresses cannot be reused
            self.__dict__["_memo_" + tag] = (_fast_key(x, sources, extra), value,
                                             [t.untyped_storage() for t in live])
        return value

    def _hit(self, tag: str, x: torch.Tensor, sources: tuple, extra: Any = None) -> Any:
        """The value remembered under ``tag`` if ``x`` and ``sources`` are as they were, else None: one tuple
        built and compared, no function object made. The layers' forwards write it out for their hottest path."""
        memo = self.__dict__.get("_memo_" + tag)
        if memo is None:
            return None
        try:
            return memo[1] if memo[0] == _fast_key(x, sources, extra) else None
        except RuntimeError:  # a source is now an inference tensor (no version counter)
            return None

    def _forget(self) -> None:
        for name in _cache_names(self.__dict__):
            del self.__dict__[name]

    def _cached(self, key: tuple, sources: tuple, build) -> Any:
        live = [t for t in sources if t is not None]
        if any(t.is_inference() for t in live):  # no version counter: edits would go unseen
            with torch.no_grad():
                return build()
        key = key + (torch.is_inference_mode_enabled(), _stamp(sources))
        cache = self.__dict__.setdefault("_border_cache", {})
        hit = cache.get(key)
        if hit is None:
            if len(cache) > 16:
                cache.clear()
            with torch.no_grad():
                value = build()
            hit = cache[key] = (value, [t.untyped_storage() for t in live])
        return hit[0]

    def train(self, mode: bool = True):
        self._forget()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._forget()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        for name in _cache_names(state):
            state.pop(name)
        return state


class _BorderCorrected(_MapCache):
    """Adds back what removed constant input channels contributed, border included.

    A removed input channel that held the constant ``v`` contributed
    ``v * sum(W[:, c])`` inside the image but less where the kernel overlaps the zero
    padding. ``border_kernel`` (out, 1, *k) is ``sum_c v_c W[:, c]``; convolving it over
    a one-channel tensor of ones the size of the input (batch 1, broadcast over the
    batch) reproduces that contribution exactly, for any input size.

    The correction is a constant: where gradients are recorded it is added in place
    without recording it, so the layer's output is still the convolution's (what a graph
    tracer reads) and its gradients are a plain conv's.
    """

    border_kernel: torch.Tensor
    border_offset: torch.Tensor  # (out,): part of the contribution already folded elsewhere (a BatchNorm's mean)

    def _map(self, size: tuple, x: torch.Tensor) -> torch.Tensor:
        ones = torch.ones((1, 1) + size, dtype=x.dtype, device=x.device)
        m = _CONV_FN[len(size)](ones, self.border_kernel.to(x.dtype), None, self.stride, self.padding, self.dilation)
        return m - self.border_offset.to(x.dtype).reshape((1, -1) + (1,) * (m.dim() - 2))

    def border_map(self, x: torch.Tensor) -> torch.Tensor:
        """The removed channels' contribution for an input shaped like ``x``: (1, out, *spatial)."""
        return self._map(_spatial(x), x)

    def _entry(self, x: torch.Tensor, sources: tuple) -> tuple:
        """Cached per input size: (the interior constant, frame patches, full map, full map plus the bias)."""
        return self._memo("entry", x, sources, lambda: (_spatial(x), x.dtype, x.device),
                          lambda: self._build_entry(x))

    def _build_entry(self, x: torch.Tensor) -> tuple:
        full = self.border_map(x)
        with_bias = full if self.bias is None else full + self.bias.detach().to(x.dtype).reshape(
            (1, -1) + (1,) * (full.dim() - 2))
        if full.dim() != 4:
            return None, None, full, with_bias
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
            return None, None, full, with_bias
        patches = []
        for region in ((slice(0, top), slice(None)), (slice(h - bottom, h), slice(None)),
                       (slice(top, h - bottom), slice(0, left)), (slice(top, h - bottom), slice(w - right, w))):
            patch = rest[(slice(None), slice(None)) + region]
            if patch.numel():
                patches.append((region, patch.contiguous()))
        return (inner if bool(inner.any()) else None), patches, full, with_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fx_tracing():
            return _eager_forward(self, x)
        memo = self.__dict__.get("_memo_entry")
        if memo is not None and not (_capturing() or torch.is_grad_enabled()) and _one_launch_preferred(x):
            # The GPU path as on the last call: _hit("entry", _sources()) written out, as in
            # _BorderCorrectedNorm.forward.
            try:
                key = (type(x), x.shape, x.stride(), x.dtype, x.device, torch.is_inference_mode_enabled(), False, None,
                       tuple([None if t is None else (t.data_ptr(), t._version)
                              for t in (self._buffers["border_kernel"], self._buffers["border_offset"],
                                        self._parameters["bias"])]))
            except RuntimeError:
                key = None
            if memo[0] == key:
                return self._conv_forward(x, self.weight, None).add_(memo[1][3])
        return self._forward(x)

    def _sources(self) -> tuple:
        """The tensors the cached map and bias derive from."""
        return self._buffers["border_kernel"], self._buffers["border_offset"], self._parameters["bias"]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if _capturing():  # exported graphs get the map as a constant the runtime folds away
            with torch.no_grad():
                m = self.border_map(x)
            return self._conv_forward(x, self.weight, self.bias) + m
        inner, patches, full, with_bias = self._entry(x, self._sources())
        if torch.is_grad_enabled():  # one add the gradients do not see: the output is the convolution's
            y = self._conv_forward(x, self.weight, self.bias)
            with torch.no_grad():
                y.add_(full)
            return y
        if patches is None or _one_launch_preferred(x):
            # 1-d / 3-d, no plain interior, or a GPU: one add, of the map and the bias together (on a GPU
            # a conv's bias is an add of its own; here it costs nothing more)
            return self._conv_forward(x, self.weight, None).add_(with_bias)
        bias = self.bias if inner is None else (inner if self.bias is None else self.bias + inner)
        y = self._conv_forward(x, self.weight, bias)
        for region, patch in patches:  # only the frame: a few rows and columns
            y[(slice(None), slice(None)) + region] += patch
        return y


def _run_length(flags: list) -> int:
    """How many leading entries are True."""
    n = 0
    for f in flags:
        if not f:
            break
        n += 1
    return n


class BorderCorrectedConv1d(_BorderCorrected, nn.Conv1d):
    pass


class BorderCorrectedConv2d(_BorderCorrected, nn.Conv2d):
    pass


class BorderCorrectedConv3d(_BorderCorrected, nn.Conv3d):
    pass


class _BorderCorrectedNorm(_MapCache):
    """A BatchNorm that also adds the border correction of the stride-1 conv feeding it.

    ``BN(conv(x) + m)`` where ``m`` (1, C, *spatial) is the removed constant channels'
    contribution minus the part already in the running mean: zero inside the image, nonzero
    on the frame where the conv's kernel overlapped its zero padding. In eval mode this is
    ``x * scale + (shift + m * scale)``: one ``addcmul`` with a precomputed map, the same
    single pass over the tensor a plain BatchNorm makes, so the correction launches no
    kernel of its own (on a GPU in eager mode, one kernel saved per layer counts). The conv
    before it stays a plain conv.

    The conv is stride 1, so the map follows from this layer's own input size:
    ``in = out - 2 * padding + dilation * (k - 1)`` (``padding="same"``: ``in = out``).
    In training mode (batch statistics) the map is added before normalizing, as the masked
    model computes it.
    """

    border_kernel: torch.Tensor  # (C, 1, *k): sum_c v_c W[:, c] of the conv before
    border_offset: torch.Tensor  # (C,): the interior share, already subtracted from running_mean
    border_padding: "tuple[int, ...] | str"
    border_dilation: tuple[int, ...]

    def border_map(self, x: torch.Tensor) -> torch.Tensor:
        """What the removed channels add before this BatchNorm, for an input shaped like ``x``: (1, C, *spatial)."""
        k = self.border_kernel
        dims = k.dim() - 2
        out = _spatial(x)
        if len(out) != dims:
            raise ValueError(f"{type(self).__name__} corrects a {dims}-d conv's output; got input of shape "
                             f"{tuple(x.shape)}")
        size = tuple(o + g for o, g in zip(out, self._grow()))
        ones = torch.ones((1, 1) + size, dtype=x.dtype, device=x.device)
        m = _CONV_FN[dims](ones, k.to(x.dtype), None, 1, self.border_padding, self.border_dilation)
        return m - self.border_offset.to(x.dtype).reshape((1, -1) + (1,) * dims)

    def _affine(self) -> tuple:
        """Eval-mode ``scale`` and ``shift`` (C,) in float64: ``BN(y) = y * scale + shift``."""
        scale = (self.running_var.double() + self.eps).rsqrt()
        shift = -self.running_mean.double() * scale
        if self.weight is not None:
            scale = scale * self.weight.detach().double()
            shift = shift * self.weight.detach().double()
        if self.bias is not None:
            shift = shift + self.bias.detach().double()
        return scale, shift

    def _uses_batch_stats(self) -> bool:
        return self.training or self.running_mean is None or self.running_var is None

    def _unscaled(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`border_map` in ``x``'s dtype and layout, cached per input size."""
        return self._memo("map", x, (self._buffers["border_kernel"], self._buffers["border_offset"]),
                          lambda: ("map", _spatial(x), x.dtype, x.device, _layout(x)),
                          lambda: self.border_map(x).contiguous(memory_format=_layout(x)))

    def _folded(self, x: torch.Tensor, sources: tuple, extra: tuple) -> tuple:
        """Eval mode, cached: ``scale`` (1, C, 1...) and ``shift + map * scale`` (1, C, *spatial)."""
        def build() -> tuple:
            scale, shift = self._affine()
            view = (1, -1) + (1,) * (x.dim() - 2)
            m = self.border_map(torch.empty((1, 1) + _spatial(x), dtype=torch.float64, device=x.device))
            full = shift.view(view) + m * scale.view(view)
            return scale.to(x.dtype).view(view), full.to(x.dtype).contiguous(memory_format=_layout(x))
        return self._memo("eval", x, sources,
                          lambda: ("eval", _spatial(x), x.dtype, x.device, _layout(x), self.eps), build, extra)

    def _grow(self) -> tuple[int, ...]:
        """Per spatial dimension, the conv's input size minus its output size (stride 1)."""
        if self.border_padding == "same":
            return (0,) * (self.border_kernel.dim() - 2)
        return tuple(d * (n - 1) - 2 * p for p, d, n in
                     zip(self.border_padding, self.border_dilation, self.border_kernel.shape[2:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fx_tracing():
            return _eager_forward(self, x)
        memo = self.__dict__.get("_memo_eval")
        if memo is not None and not _capturing():
            # Eval mode as on the last call: one addcmul. _hit("eval", _eval_sources(), _eval_extra()) written out,
            # as this path is the layer's whole host cost (the calls cost ~3 us a layer in a model on a slow
            # host, where eager PyTorch on a GPU waits for it); tests/test_layers.py checks that it hits.
            p, b = self._parameters, self._buffers
            w, bias = p["weight"], p["bias"]
            try:
                key = (type(x), x.shape, x.stride(), x.dtype, x.device, torch.is_inference_mode_enabled(),
                       torch.is_grad_enabled(), (self.training, self.eps, w is not None and w.requires_grad,
                                                 bias is not None and bias.requires_grad),
                       tuple([None if t is None else (t.data_ptr(), t._version)
                              for t in (w, bias, b["running_mean"], b["running_var"], b.get("num_batches_tracked"),
                                        b["border_kernel"], b["border_offset"])]))
            except RuntimeError:  # a source is now an inference tensor (no version counter)
                key = None
            if memo[0] == key:
                scale, full = memo[1]
                return torch.addcmul(full, x, scale)
        return self._forward(x)

    def _eval_sources(self) -> tuple:
        """The tensors the eval constants derive from. num_batches_tracked: a training forward updates the
        running statistics without bumping their version counters, but counts itself in place (which does)."""
        p, b = self._parameters, self._buffers
        return (p["weight"], p["bias"], b["running_mean"], b["running_var"], b.get("num_batches_tracked"),
                b["border_kernel"], b["border_offset"])

    def _eval_extra(self) -> tuple:
        """What else decides the eval path and its constants: the mode, eps, and whether gamma and beta want grads."""
        w, bias = self._parameters["weight"], self._parameters["bias"]
        return (self.training, self.eps, w is not None and w.requires_grad, bias is not None and bias.requires_grad)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if _capturing():
            # A plain BatchNorm, which runtimes fold into the conv before it, then one add of the
            # scaled map (a constant of an exported graph).
            with torch.no_grad():
                m = self.border_map(x)
            if self._uses_batch_stats():
                return super().forward(x + m)
            scale = (self.running_var + self.eps).rsqrt()
            if self.weight is not None:
                scale = scale * self.weight
            return super().forward(x) + m * scale.to(x.dtype).reshape((1, -1) + (1,) * (x.dim() - 2))
        w, bias = self._parameters["weight"], self._parameters["bias"]
        if self._uses_batch_stats() or (torch.is_grad_enabled() and (
                (w is not None and w.requires_grad) or (bias is not None and bias.requires_grad))):
            # Training, or gradients for gamma and beta (fine-tuning with frozen statistics, a graph tracer):
            # the map goes in before normalizing, as in the masked model, and the output is the BatchNorm's.
            return super().forward(x + self._unscaled(x))
        scale, full = self._folded(x, self._eval_sources(), self._eval_extra())
        return torch.addcmul(full, x, scale)


class BorderCorrectedBatchNorm1d(_BorderCorrectedNorm, nn.BatchNorm1d):
    pass


class BorderCorrectedBatchNorm2d(_BorderCorrectedNorm, nn.BatchNorm2d):
    pass


class BorderCorrectedBatchNorm3d(_BorderCorrectedNorm, nn.BatchNorm3d):
    pass


_BN_CLASSES = {nn.BatchNorm1d: BorderCorrectedBatchNorm1d, nn.BatchNorm2d: BorderCorrectedBatchNorm2d,
               nn.BatchNorm3d: BorderCorrectedBatchNorm3d}


def _retyped(module: nn.Module, classes: dict) -> nn.Module:
    """A shallow copy of ``module`` as the class ``classes`` maps its base class to (same tensors, same attributes)."""
    base = next(b for b in classes if isinstance(module, b))
    new = classes[base].__new__(classes[base])
    new.__dict__.update(module.__dict__)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    for name in _cache_names(new.__dict__):
        del new.__dict__[name]
    return new


def with_border_correction_bn(bn: nn.Module, conv: nn.Module, kernel: torch.Tensor,
                              offset: torch.Tensor) -> nn.Module:
    """Return a copy of BatchNorm ``bn`` that adds the border correction of stride-1 ``conv`` (which alone feeds it).

    ``kernel`` (out, *k) is ``sum_c v_c W[:, c]`` over the conv's removed constant input
    channels; ``offset`` (out,) its interior share, already subtracted from ``bn``'s
    running mean.
    """
    if any(s != 1 for s in conv.stride):
        raise ValueError(f"the border correction moves into a BatchNorm only after a stride-1 conv, got stride "
                         f"{conv.stride}")
    new = _retyped(bn, _BN_CLASSES)
    device, dtype = bn.running_mean.device, bn.running_mean.dtype
    new.register_buffer("border_kernel", kernel.detach().to(device=device, dtype=dtype).unsqueeze(1).contiguous())
    new.register_buffer("border_offset", offset.detach().to(device=device, dtype=dtype).contiguous())
    new.border_padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    new.border_dilation = tuple(conv.dilation)
    return new


_CLASSES = {nn.Conv1d: BorderCorrectedConv1d, nn.Conv2d: BorderCorrectedConv2d, nn.Conv3d: BorderCorrectedConv3d}


def with_border_correction(conv: nn.Module, kernel: torch.Tensor, offset: "torch.Tensor | None" = None) -> nn.Module:
    """Return a border-corrected copy of ``conv`` (groups=1, zero padding) carrying ``kernel``.

    ``offset`` (out,) is the share of the contribution already folded elsewhere, e.g.
    ``kernel.sum()`` per output channel subtracted from the following BatchNorm's mean.
    """
    new = _retyped(conv, _CLASSES)
    kernel = kernel.detach().to(device=conv.weight.device, dtype=torch.float64)
    off = torch.zeros(kernel.shape[0], dtype=torch.float64, device=conv.weight.device) if offset is None \
        else offset.detach().to(device=conv.weight.device, dtype=torch.float64)
    if isinstance(conv, _BorderCorrected):  # compacted before: both corrections add up
        kernel = kernel + conv.border_kernel.squeeze(1).double()
        off = off + conv.border_offset.double()
    new.register_buffer("border_kernel", kernel.to(conv.weight.dtype).unsqueeze(1).contiguous())
    new.register_buffer("border_offset", off.to(conv.weight.dtype).contiguous())
    return new
