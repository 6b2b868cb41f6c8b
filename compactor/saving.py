"""The compactor file format: a compact model's weights, a manifest of its layer shapes, and its fingerprint.

:func:`save` writes ``{"format": "compactor/1", "manifest": ..., "state_dict": ...,
"fingerprint": ...}``, readable with ``torch.load(path, weights_only=True)``: no pickled
code, so :func:`load` never runs anything from the file. The manifest lists the widths of
every Conv / Linear / BatchNorm / Embedding / PReLU / LayerNorm (and which layers are
border-corrected); :func:`load` rebuilds each smaller layer as a copy of the original
architecture's own instance with its tensors resized (never by calling a constructor with
guessed arguments), then runs the fingerprint's probe and raises, naming the first layer
that differs, unless the rebuilt model computes what the saved one did.
:func:`save_pickle` writes a full pickle for those who ask.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from . import files, fingerprint, masks
from .errors import LoadError
from .heads import COUNT_ATTRIBUTES, set_count
from .heads import find as find_attention
from .hfconfig import WIDTH_KEYS
from .tensors import as_inputs
from .kinds import BATCHNORM, CONV, CONV_TRANSPOSE, is_transposed_linear, kind_of
from .layers import (BorderCorrectedBatchNorm1d, BorderCorrectedBatchNorm2d, BorderCorrectedBatchNorm3d,
                     BorderCorrectedConv1d, BorderCorrectedConv2d, BorderCorrectedConv3d, set_module)

__all__ = ["FORMAT", "save", "save_pickle", "load"]

#: The ``format`` tag :func:`save` writes and :func:`load` accepts.
FORMAT = "compactor/1"

ModelOrFactory = Union[nn.Module, Callable[[], nn.Module]]


# --------------------------------------------------------------------------- the manifest

_BORDER = {"BorderCorrectedConv1d": BorderCorrectedConv1d, "BorderCorrectedConv2d": BorderCorrectedConv2d,
           "BorderCorrectedConv3d": BorderCorrectedConv3d, "BorderCorrectedBatchNorm1d": BorderCorrectedBatchNorm1d,
           "BorderCorrectedBatchNorm2d": BorderCorrectedBatchNorm2d,
           "BorderCorrectedBatchNorm3d": BorderCorrectedBatchNorm3d}
# The manifest names a layer by its torch base class; most specific first: a BorderCorrectedConv2d is a Conv2d.
_LAYERS: dict[str, type] = {
    **_BORDER, **{cls.__name__: cls for cls in (*CONV, *CONV_TRANSPOSE, *BATCHNORM)},
    "Linear": nn.Linear, "Embedding": nn.Embedding, "PReLU": nn.PReLU, "LayerNorm": nn.LayerNorm,
}
_BASE = {name: next(b for b in (*CONV, *BATCHNORM) if issubclass(cls, b)) for name, cls in _BORDER.items()}


def _kind(module: nn.Module) -> Optional[str]:
    """The manifest's name for ``module``'s class, or None for a layer the manifest does not list."""
    kind = kind_of(module)
    if kind is None:
        return None
    if kind.name == "Conv1D":
        return "Conv1D"
    return next(name for name, cls in _LAYERS.items() if isinstance(module, cls))


def _dtype_name(module: nn.Module) -> Optional[str]:
    w = getattr(module, "weight", None)
    return str(w.dtype).replace("torch.", "") if isinstance(w, torch.Tensor) else None


def _describe(module: nn.Module, kind: str) -> dict[str, Any]:
    """``module``'s class, dtype and widths (what :func:`load` sets on a resized copy of the architecture's
    layer); for compactor's border-corrected layers, also the constructor arguments that rebuild them."""
    m: Any = module
    entry: dict[str, Any] = {"class": kind, "type": f"{type(m).__module__}.{type(m).__qualname__}",
                             "dtype": _dtype_name(m), **kind_of(m).describe(m)}
    if kind in _BORDER and isinstance(m, CONV):
        entry.update(kernel_size=list(m.kernel_size), stride=list(m.stride),
                     padding=m.padding if isinstance(m.padding, str) else list(m.padding),
                     dilation=list(m.dilation), bias=m.bias is not None, padding_mode=m.padding_mode,
                     border_kernel=list(m.border_kernel.shape))
    elif kind in _BORDER:  # a BatchNorm, and the stride-1 conv geometry its border map follows
        entry.update(eps=m.eps, momentum=m.momentum, affine=m.affine, track_running_stats=m.track_running_stats,
                     border_kernel=list(m.border_kernel.shape), border_dilation=list(m.border_dilation),
                     border_padding=m.border_padding if isinstance(m.border_padding, str)
                     else list(m.border_padding))
    return entry


def _constructor_args(entry: Mapping[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """The constructor arguments of a border-corrected layer (compactor's own class) from its manifest entry."""
    e = entry
    base = _BASE[e["class"]]
    kw: dict[str, Any] = {"dtype": getattr(torch, e["dtype"])} if e.get("dtype") else {}
    if issubclass(base, CONV):
        padding = e["padding"] if isinstance(e["padding"], str) else tuple(e["padding"])
        return (e["in_channels"], e["out_channels"], tuple(e["kernel_size"])), dict(
            kw, stride=tuple(e["stride"]), padding=padding, dilation=tuple(e["dilation"]), groups=e["groups"],
            bias=e["bias"], padding_mode=e["padding_mode"])
    return (e["num_features"],), dict(kw, eps=e["eps"], momentum=e["momentum"], affine=e["affine"],
                                      track_running_stats=e["track_running_stats"])


# --------------------------------------------------------------------------- save


def _report_summary(model: nn.Module) -> Optional[dict[str, Any]]:
    r = getattr(model, "compaction_report", None)
    if r is None:
        return None
    keys = ("mode", "params_before", "params_after", "macs_before", "macs_after", "max_abs_diff", "tolerance",
            "verified_inputs")
    out: dict[str, Any] = {}
    for k in keys:
        v = getattr(r, k, None)
        out[k] = v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
    return out


def _refuse_unresizable(model: nn.Module) -> None:
    """Layers :func:`load` could not rebuild by resizing a copy of the architecture's instance."""
    from torch.nn.utils import parametrize

    for name, module in model.named_modules():
        if parametrize.is_parametrized(module) and _kind(module) is not None:
            tensors = ", ".join(sorted(module.parametrizations.keys()))
            raise ValueError(
                f"layer '{name}' ({type(module).__name__}) computes its {tensors} through a torch parametrization "
                "(weight_norm, spectral_norm, ...), which compactor.save cannot write as resizable tensors; "
                "call torch.nn.utils.parametrize.remove_parametrizations(layer, name) before saving"
            )


def _fingerprint(model: nn.Module, probe: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    if probe is None:
        return None
    try:
        return fingerprint.take(model, probe)
    except Exception as exc:  # the model's own error on the probe: write the weights all the same, and say so
        warnings.warn(f"save: {type(model).__name__} failed on the fingerprint's probe input ({type(exc).__name__}: "
                      f"{exc}); the file gets no fingerprint, so load cannot check what it rebuilds; pass "
                      "example_inputs= the model accepts", stacklevel=3)
        return None


def save(model: nn.Module, path: files.PathLike, *, example_inputs: Any = None, force: bool = False) -> str:
    """Write ``model``'s weights and a manifest of its layer shapes to one ``torch.load(weights_only=True)`` file.

    The file holds ``{"format": "compactor/1", "manifest": {"layers": {name: {...}}},
    "state_dict": {...}, "fingerprint": {...}, ...}``: only tensors, numbers and strings,
    no pickled code. Read it back with :func:`load` and the original architecture; the
    fingerprint (a small probe input and a few numbers per layer output, a few kB) lets
    :func:`load` check that the rebuilt model computes what ``model`` computes. Live
    ``torch.nn.utils.prune`` masks are made permanent in what is written (the
    model itself is not modified). For a full pickle of the module object, see
    :func:`save_pickle`.

    Args:
        model: usually the result of :func:`compactor.compact`.
        path: the file to write (atomically).
        example_inputs: the probe of the fingerprint (as :func:`compactor.compact` takes them);
            by default the example inputs ``compact()`` was given (their first row if large).
            A model that has neither is written without a fingerprint, with a warning.
        force: replace an existing file.

    Returns:
        ``path``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a layer :func:`load` could not rebuild by resizing (a torch parametrization).
        FileExistsError: ``path`` exists and ``force`` is false.

    Example:
        >>> import os, tempfile, torch, compactor
        >>> from torch.nn.utils import prune
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
        >>> _ = prune.ln_structured(net[0], "weight", amount=0.5, n=2, dim=0)
        >>> small = compactor.compact(net, torch.randn(3, 4))
        >>> path = compactor.save(small, os.path.join(tempfile.mkdtemp(), "small.pt"))
        >>> arch = lambda: torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
        >>> again = compactor.load(arch, path)
        >>> again[0].out_features, again[2].in_features
        (3, 3)
        >>> x = torch.randn(5, 4)
        >>> torch.testing.assert_close(again(x), small(x))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects a torch.nn.Module, got {type(model).__name__}")
    plain = masks.bake(model) if masks.pruned_tensors(model) else model
    _refuse_unresizable(plain)
    probe = (fingerprint.probe_inputs(as_inputs(example_inputs, who="save")) if example_inputs is not None
             else model.__dict__.get("compaction_probe"))
    if probe is None:
        warnings.warn(f"save: {type(model).__name__} carries no example inputs (it was not made by "
                      "compactor.compact, or they are not tensors): the file gets no fingerprint, so load cannot "
                      "check what it rebuilds; pass example_inputs=", stacklevel=2)
    layers: dict[str, dict[str, Any]] = {}
    counts: dict[str, dict[str, int]] = {}  # head counts stored on attention modules
    heads_read_config = {att.name: att.config_counts for att in find_attention(plain) if att.config_counts}
    for name, module in plain.named_modules():
        kind = _kind(module)
        if kind is not None and name:
            layers[name] = _describe(module, kind)
        own = {a: module.__dict__[a] for a in COUNT_ATTRIBUTES if isinstance(module.__dict__.get(a), int)}
        if name in heads_read_config:  # a config the forward reads its head counts from (Phi-3)
            own.update({f"config.{a}": getattr(module.config, a) for a in heads_read_config[name]})
        if own:
            counts[name] = own
    from . import __version__

    payload = {
        "format": FORMAT,
        "compactor_version": __version__,
        "torch_version": str(torch.__version__),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "manifest": {"layers": layers, "attributes": counts, "config": _config_widths(plain)},
        "state_dict": {k: v.detach().cpu() for k, v in plain.state_dict().items()},
        "report": _report_summary(model),
        "fingerprint": _fingerprint(plain, probe),
    }
    return files.atomic_save(payload, path, force=force)


def save_pickle(model: nn.Module, path: files.PathLike, *, force: bool = False) -> str:
    """Pickle the whole module object with ``torch.save`` (atomically), for those who ask for it.

    Prefer :func:`save`. A pickle stores references to your model's classes, so
    loading it needs the same code importable, and ``torch.load(path,
    weights_only=False)`` executes whatever the file says: load only files you
    trust. :func:`load` refuses such files.

    Returns:
        ``path``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        FileExistsError: ``path`` exists and ``force`` is false.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_pickle expects a torch.nn.Module, got {type(model).__name__}")
    return files.atomic_save(model, path, force=force)


# --------------------------------------------------------------------------- load


def _read(path: str) -> dict[str, Any]:
    """The file's contents, checked: the format tag, a manifest of known layers, a state_dict of tensors."""
    obj = files.read_weights(
        path, error=LoadError, name=f"'{path}'", written_by="compactor.save(model, path)",
        pickled=", not a compactor.save file, and compactor.load never unpickles code; re-save the model with "
                "compactor.save, or if you wrote it with compactor.save_pickle and trust it, use "
                "torch.load(path, weights_only=False)")
    if not isinstance(obj, Mapping) or "format" not in obj:
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise LoadError(
                f"'{path}' is a plain state_dict, not a compactor file; for weights of a model pruned with "
                "torch.nn.utils.prune use compactor.load_pruned(Model, path) or `compactor compact`"
            )
        raise LoadError(f"'{path}' is not a compactor file (it holds a {type(obj).__name__} without a 'format' "
                        "key); write compact models with compactor.save")
    fmt = obj["format"]
    if fmt != FORMAT:
        if isinstance(fmt, str) and fmt.startswith("compactor/"):
            raise LoadError(f"'{path}' has format {fmt!r}; this compactor reads {FORMAT!r}: upgrade compactor")
        raise LoadError(f"'{path}' is not a compactor file (format {fmt!r}); write compact models with compactor.save")
    manifest, state = obj.get("manifest"), obj.get("state_dict")
    if (not isinstance(manifest, Mapping) or not isinstance(manifest.get("layers"), Mapping)
            or not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values())):
        raise LoadError(f"'{path}' is damaged: its manifest or state_dict is missing or malformed; "
                        "write it again with compactor.save")
    for name, entry in manifest["layers"].items():
        if not isinstance(entry, Mapping) or entry.get("class") not in (*_LAYERS, "Conv1D"):
            raise LoadError(f"'{path}' is damaged: manifest entry for layer '{name}' is malformed; "
                            "write it again with compactor.save")
    return dict(obj)


def _architecture(model_or_factory: ModelOrFactory) -> nn.Module:
    if isinstance(model_or_factory, nn.Module):
        return masks.bake(model_or_factory)  # a copy, with any prune masks made permanent
    if callable(model_or_factory):
        target = model_or_factory()
        if not isinstance(target, nn.Module):
            raise TypeError(f"load: the factory returned {type(target).__name__}, expected an nn.Module")
        return masks.bake(target) if masks.pruned_tensors(target) else target
    raise TypeError(
        f"load: model_or_factory must be an nn.Module or a class / callable returning one, "
        f"got {type(model_or_factory).__name__}"
    )


def _rebuild(current: nn.Module, entry: Mapping[str, Any], state: Mapping[str, torch.Tensor], prefix: str) -> nn.Module:
    kind = entry["class"]
    if kind in _BORDER:  # compactor's own classes: their constructor arguments are all in the manifest
        args, kwargs = _constructor_args(entry)
        new = _BORDER[kind](*args, **kwargs)
        shape = tuple(state[prefix + "border_kernel"].shape) if prefix + "border_kernel" in state else tuple(
            entry["border_kernel"])
        dtype = new.weight.dtype if new.weight is not None else new.running_mean.dtype
        new.register_buffer("border_kernel", torch.zeros(shape, dtype=dtype))
        new.register_buffer("border_offset", torch.zeros(shape[0], dtype=dtype))
        if "border_padding" in entry:
            padding = entry["border_padding"]
            new.border_padding = padding if isinstance(padding, str) else tuple(padding)
            new.border_dilation = tuple(entry["border_dilation"])
        return new
    return _resized(current, entry, state, prefix)


def _resize_slot(module: nn.Module, attr: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
    """Put zeros of ``shape`` in ``module``'s parameter or buffer slot ``attr`` (still a Parameter or a buffer,
    with the dtype, device and requires_grad of the tensor it held, if any); ``load_state_dict`` fills them."""
    for table in (module._parameters, module._buffers):
        if attr in table:
            old = table[attr]
            fresh = torch.zeros(shape, dtype=old.dtype if old is not None else dtype,
                                device=old.device if old is not None else device)
            table[attr] = nn.Parameter(fresh, requires_grad=old.requires_grad if old is not None else True) \
                if table is module._parameters else fresh
            return


def _resized(current: nn.Module, entry: Mapping[str, Any], state: Mapping[str, torch.Tensor],
             prefix: str) -> nn.Module:
    """A copy of the architecture's own ``current`` (its class, activation, eps...: everything it was built
    with) whose tensors take the file's shapes and whose width attributes the manifest's values."""
    new = copy.deepcopy(current)
    device = next((t.device for t in (*new._parameters.values(), *new._buffers.values()) if t is not None),
                  torch.device("cpu"))
    for key, t in state.items():
        attr = key[len(prefix):]
        if not key.startswith(prefix) or "." in attr:
            continue
        old = new._parameters.get(attr, new._buffers.get(attr))
        if old is None or tuple(old.shape) != tuple(t.shape):
            _resize_slot(new, attr, t.shape, t.dtype, device)
    for attr in kind_of(new).widths:
        if attr in entry and hasattr(new, attr):
            value = entry[attr]
            setattr(new, attr, tuple(value) if isinstance(value, list) else value)
    return new


def _swapped(first: Any, second: Any) -> bool:
    """``load(path, Model)``: the argument order compactor.load had before it became model-first."""
    return isinstance(first, (str, os.PathLike)) and (isinstance(second, nn.Module) or callable(second))


def _replace_layers(target: nn.Module, layers: Mapping[str, Mapping[str, Any]], state: Mapping[str, torch.Tensor],
                    saved_from: str) -> None:
    """Swap every manifest layer of ``target`` for a fresh one at the saved shape (shared layers stay shared)."""
    arch = type(target).__name__
    named = dict(target.named_modules(remove_duplicate=False))
    replaced: dict[int, nn.Module] = {}
    for name, entry in layers.items():
        current = named.get(name)
        if current is None:
            raise LoadError(
                f"the file has a layer '{name}' ({entry['class']}) that {arch} lacks; pass the architecture the "
                f"model was saved from (the file says {saved_from})"
            )
        fits = is_transposed_linear(current) if entry["class"] == "Conv1D" else isinstance(
            current, _BASE.get(entry["class"], _LAYERS[entry["class"]]))
        if not fits:
            raise LoadError(
                f"layer '{name}' is a {entry['class']} in the file but a {type(current).__name__} in {arch}; "
                f"pass the architecture the model was saved from (the file says {saved_from})"
            )
        if id(current) not in replaced:
            replaced[id(current)] = _rebuild(current, entry, state, name + ".")
    for name, current in list(named.items()):
        if name and id(current) in replaced:
            set_module(target, name, replaced[id(current)])


def _resize_bare_tensors(target: nn.Module, layers: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """Resize parameters and buffers outside manifest layers (e.g. a layer-scale nn.Parameter) to the file's shape."""
    expected = target.state_dict()
    in_layers = tuple(n + "." for n in layers)
    for key, tensor in state.items():
        have = expected.get(key)
        if have is None or tuple(have.shape) == tuple(tensor.shape) or key.startswith(in_layers):
            continue
        if have.dim() != tensor.dim() or any(s > h for s, h in zip(tensor.shape, have.shape)):
            raise LoadError(
                f"key '{key}' has shape {tuple(tensor.shape)} in the file but {tuple(have.shape)} in "
                f"{type(target).__name__}; pass the architecture the model was saved from"
            )
        owner_name, _, attr = key.rpartition(".")
        owner = target.get_submodule(owner_name) if owner_name else target
        if owner._parameters.get(attr, owner._buffers.get(attr)) is not None:
            _resize_slot(owner, attr, tensor.shape, tensor.dtype, tensor.device)


def _config_widths(model: nn.Module) -> dict[str, Any]:
    """The width keys (:data:`compactor.hfconfig.WIDTH_KEYS`) of a Hugging Face model's config, as they are."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    return {k: getattr(config, k) for k in WIDTH_KEYS if isinstance(getattr(config, k, None), int)}


def load(model_or_factory: ModelOrFactory, path: files.PathLike, *, verify: bool = True) -> nn.Module:
    """Rebuild a model written by :func:`save` inside its original architecture.

    Model first, like safetensors' ``load_model(model, filename)``. Every layer in
    the file's manifest replaces the architecture's layer of the same name with a
    copy of that layer, its tensors resized to the saved (smaller) shapes -- a
    ``BorderCorrected*`` layer where the manifest says so -- then the weights load
    strictly, and the rebuilt model runs the fingerprint's probe input: it must
    compute what the saved model computed, layer by layer. The file is read with
    ``torch.load(weights_only=True)``: nothing in it is executed.

    Args:
        model_or_factory: the original (dense) architecture: an instance (copied,
            never modified) or a class / zero-argument callable returning one.
        path: a file written by :func:`compactor.save`.
        verify: check the rebuilt model against the file's fingerprint (files written
            without one load with a warning).

    Returns:
        The compact model, in eval mode.

    Raises:
        LoadError: missing, truncated or foreign file; a manifest layer the
            architecture lacks or holds as another kind of layer; state_dict keys
            or shapes that do not fit; a rebuilt model that does not compute what
            the saved one did (the message names the first layer that differs).
        TypeError: the arguments are in the old order ``load(path, model)``, or
            ``model_or_factory`` is neither a module nor a callable returning one.

    Example: see :func:`save`.
    """
    if _swapped(model_or_factory, path):
        raise TypeError(
            f"load(model_or_factory, path) takes the model first; you passed the path {os.fspath(model_or_factory)!r} "
            f"first: swap them, e.g. compactor.load(Model, {os.fspath(model_or_factory)!r})"
        )
    path = os.fspath(path)
    obj = _read(path)
    layers: Mapping[str, Mapping[str, Any]] = obj["manifest"]["layers"]
    state: Mapping[str, torch.Tensor] = obj["state_dict"]
    saved_from = obj.get("model_class", "?")
    target = _architecture(model_or_factory)
    _replace_layers(target, layers, state, saved_from)
    _resize_bare_tensors(target, layers, state)
    config = getattr(target, "config", None)
    for key, value in obj["manifest"].get("config", {}).items():  # a Hugging Face config's widths
        if config is not None and hasattr(config, key):
            setattr(config, key, value)
    modules = dict(target.named_modules())
    for name, values in obj["manifest"].get("attributes", {}).items():  # head counts of attention modules
        module = modules.get(name)
        if module is not None:
            for attr, value in values.items():
                set_count(module, attr, int(value))
    files.check_keys(target.state_dict(), state, error=LoadError, model=type(target).__name__, source="the file",
                     fix=f"pass the architecture the model was saved from (the file says {saved_from})",
                     shape_fix="the file's manifest and weights disagree: write it again with compactor.save",
                     name_sides=True)
    target.load_state_dict(state, strict=True)
    target.eval()
    fp = obj.get("fingerprint")
    if isinstance(fp, Mapping):
        if verify:
            fingerprint.check(target, fp, path=f"'{path}'")
        target.__dict__["compaction_probe"] = fp["inputs"]  # saving it again keeps the fingerprint
    elif verify:
        warnings.warn(f"'{path}' has no fingerprint (written by an older compactor, or saved without example "
                      "inputs): the rebuilt model is not checked; save it again with compactor.save to have "
                      "loads checked", stacklevel=2)
    return target
