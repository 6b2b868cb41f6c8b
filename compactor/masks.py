"""Read ``torch.nn.utils.prune`` state: live hooks, saved ``*_orig``/``*_mask`` state_dicts, baked zeros.

Everything here works on copies; the user's model is never modified.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from torch.overrides import TorchFunctionMode

from . import files, probe
from .errors import MaskLoadError
from .kinds import CONV
from .tensors import call

__all__ = ["PrunedTensor", "pruned_tensors", "clone", "bake", "bake_", "load_pruned", "dense_from_masked"]


@dataclass(frozen=True)
class PrunedTensor:
    """One tensor under ``torch.nn.utils.prune`` reparametrization."""

    module_name: str
    tensor_name: str
    methods: tuple[str, ...]
    mask: torch.Tensor

    @property
    def key(self) -> str:
        return f"{self.module_name}.{self.tensor_name}" if self.module_name else self.tensor_name


def _pruning_hooks(module: nn.Module) -> Iterator[prune.BasePruningMethod]:
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod):
            yield hook


def pruned_tensors(model: nn.Module) -> list[PrunedTensor]:
    """List every tensor of ``model`` that carries a live pruning mask.

    Stacked prunings on one tensor (a ``PruningContainer``) appear once, with the
    combined mask and the names of every method applied.
    """
    found = []
    for name, module in model.named_modules():
        for hook in _pruning_hooks(module):
            tname = hook._tensor_name
            mask = getattr(module, tname + "_mask", None)
            if mask is None or not hasattr(module, tname + "_orig"):
                raise MaskLoadError(
                    f"layer '{name}' has a pruning hook for '{tname}' but no "
                    f"'{tname}_orig'/'{tname}_mask'; re-apply the pruning or call prune.remove first"
                )
            if isinstance(hook, prune.PruningContainer):
                methods = tuple(type(m).__name__ for m in hook._pruning_methods)
            else:
                methods = (type(hook).__name__,)
            found.append(PrunedTensor(name, tname, methods, mask.detach()))
    return found


def _seed_computed_tensors(model: nn.Module, memo: dict) -> None:
    """Pre-seed a deepcopy memo with detached clones of tensors a forward computed and left on the modules
    (prune's masked weights, caches such as timm's attention-bias cache): ``copy.deepcopy`` refuses non-leaf
    tensors."""
    def seed(obj: Any, depth: int = 0) -> None:
        if isinstance(obj, torch.Tensor):
            if not obj.is_leaf and id(obj) not in memo:
                memo[id(obj)] = obj.detach().clone()
        elif depth < 3 and isinstance(obj, dict):
            for v in obj.values():
                seed(v, depth + 1)
        elif depth < 3 and isinstance(obj, (list, tuple)):
            for v in obj:
                seed(v, depth + 1)

    for module in model.modules():
        for key, value in module.__dict__.items():
            if not key.startswith("_"):
                seed(value)


def clone(model: nn.Module) -> nn.Module:
    """Deep-copy ``model``, masks and hooks included.

    ``copy.deepcopy`` refuses a live-masked module because the masked ``weight``
    is a non-leaf tensor; its copy is pre-seeded here with a detached clone (the
    hook recomputes it on every forward anyway), as is any other tensor a forward
    left on a module (a cache).
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for hook in _pruning_hooks(module):
            t = getattr(module, hook._tensor_name, None)
            if isinstance(t, torch.Tensor):
                memo[id(t)] = t.detach().clone()
    _seed_computed_tensors(model, memo)
    return copy.deepcopy(model, memo)


def bake(model: nn.Module) -> nn.Module:
    """Return a copy of ``model`` with every mask made permanent, as ``prune.remove`` would.

    The copy computes exactly what the masked model computes, without hooks. Masks
    and ``*_orig`` tensors are never copied: only the masked product is, so the copy
    costs one model's worth of memory.
    """
    memo: dict[int, Any] = {}
    todo: list[tuple[str, str]] = []
    for mname, module in model.named_modules():
        for hook in _pruning_hooks(module):
            t = hook._tensor_name
            orig, mask = getattr(module, t + "_orig"), getattr(module, t + "_mask")
            memo[id(orig)] = nn.Parameter((orig.detach() * mask).detach(), requires_grad=orig.requires_grad)
            memo[id(mask)] = None
            memo[id(hook)] = None
            if isinstance(getattr(module, t, None), torch.Tensor):
                memo[id(getattr(module, t))] = None
            todo.append((mname, t))
    _seed_computed_tensors(model, memo)
    baked = copy.deepcopy(model, memo)
    for mname, t in todo:
        module = baked.get_submodule(mname) if mname else baked
        module.__dict__.pop(t, None)
        param = module._parameters.pop(t + "_orig")
        module._buffers.pop(t + "_mask")
        module.register_parameter(t, param)
        for key in [k for k, h in module._forward_pre_hooks.items() if h is None]:
            del module._forward_pre_hooks[key]
    return baked


def bake_(model: nn.Module) -> nn.Module:
    """Make every mask of ``model`` permanent in place, as ``prune.remove`` does; returns ``model``.

    Each masked tensor becomes ``orig * mask`` and its ``*_orig``, ``*_mask`` and hook go,
    one tensor at a time, so the model never holds more than it did.
    """
    for module in model.modules():
        for hook in list(_pruning_hooks(module)):
            prune.remove(module, hook._tensor_name)
    return model


def freeze_parametrizations_(model: nn.Module) -> list[str]:
    """Replace every torch parametrization (``weight_norm``, ``spectral_norm``, ...) in ``model`` by the plain
    tensor it computes now, in place; returns what was frozen, in words.

    A parametrized layer's weight is computed from other tensors on every call, so it cannot
    be sliced row by row; frozen, the layer is the plain layer it computes (in eval mode, where
    compaction is verified) and compacts like any other.
    """
    from torch.nn.utils import parametrize

    frozen = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            # torch puts the parametrized properties on a class every copy of the module shares, and removing
            # one deletes it from that class: give this copy a class of its own first
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__,
                                    {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")})
            for tensor in list(module.parametrizations.keys()):
                kinds = ", ".join(type(p).__name__ for p in module.parametrizations[tensor])
                # (not under no_grad: the computed tensor must require grad to come back as a Parameter)
                parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
                frozen.append(f"'{name}'.{tensor} ({kinds}) frozen to the tensor it computes")
    return frozen


def _plain_conv_forward(module: nn.Module) -> bool:
    return any(type(module).forward is base.forward for base in CONV)


def freeze_weight_transforms_(model: nn.Module, batch: tuple) -> list[str]:
    """Replace, in place, every conv subclass whose forward convolves with a weight computed from its own (a
    weight-standardized conv: timm's ``StdConv2d`` / ``ScaledStdConv2d`` standardize each row over all its
    input columns, so removing columns would change every row) by the plain conv it computes now, in eval
    mode; returns what was frozen, in words.

    Found in one forward of ``batch``: a conv call whose weight differs from the module's. A subclass that
    also transforms its input (``...Same`` classes pad it in forward) is left alone, as anything else is.
    """
    candidates = {name: m for name, m in model.named_modules() if isinstance(m, CONV) and not _plain_conv_forward(m)}
    if not candidates:
        return []
    stack: list[tuple[str, torch.Tensor]] = []
    calls: dict[str, tuple[bool, torch.Tensor, Any]] = {}
    conv_fns = (F.conv1d, F.conv2d, F.conv3d)

    class Capture(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if stack and func in conv_fns and stack[-1][0] not in calls:
                name, x = stack[-1]
                weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
                bias = kwargs.get("bias", args[2] if len(args) > 2 else None)
                calls[name] = (args[0] is x, weight.detach().clone(), None if bias is None else bias.detach().clone())
            return func(*args, **kwargs)

    enter = {name: (lambda mod, args, _n=name: stack.append((_n, args[0]))) for name in candidates}
    leave = {name: (lambda mod, args, out: stack.pop() and None) for name in candidates}  # output unchanged
    with probe.hooked(model, enter, leave), torch.no_grad(), Capture():
        call(model, batch)
    frozen = []
    for name, (same_input, weight, bias) in calls.items():
        m = candidates[name]
        if not same_input or weight.shape != m.weight.shape or torch.equal(weight, m.weight.detach()):
            continue
        base = next(b for b in CONV if isinstance(m, b))
        plain = base(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                     dilation=m.dilation, groups=m.groups, bias=bias is not None, padding_mode=m.padding_mode,
                     device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if bias is not None:
                plain.bias.copy_(bias)
        plain.train(m.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, plain)
        frozen.append(f"'{name}' ({type(m).__name__}) frozen to the plain {base.__name__} with the weight it "
                      "computes (it standardizes each row over its input columns)")
    return frozen


StateSource = Union[str, os.PathLike, Mapping[str, torch.Tensor]]


def _read_state_dict(source: StateSource) -> Mapping[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return source
    path = os.fspath(source)
    obj = files.read_weights(
        path, error=MaskLoadError, name=f"weights file '{path}'", written_by="torch.save(model.state_dict(), path)",
        pickled=" (a whole model saved with torch.save(model)?), which compactor never unpickles; save the weights "
                "instead: torch.save(model.state_dict(), path)")
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MaskLoadError(
            f"weights file '{path}' does not hold a state_dict (got {type(obj).__name__}); "
            "save it with torch.save(model.state_dict(), path)"
        )
    return obj


def load_pruned(
    model: Union[nn.Module, Callable[[], nn.Module]],
    source: StateSource,
) -> nn.Module:
    """Load a state_dict saved from a pruned model into a fresh instance of its class.

    ``source`` is a path or a mapping. Keys ``<layer>.<name>_orig`` / ``<layer>.<name>_mask``
    (what ``torch.save(model.state_dict(), 'pruned_model.pth')`` writes after
    ``torch.nn.utils.prune``) become live masks again via ``prune.custom_from_mask``;
    plain keys load as they are (weights baked by ``prune.remove`` keep their zeros).

    Args:
        model: an instance (it is copied, never modified) or a class / zero-argument
            callable returning one.
        source: path to the file written by ``torch.save``, or the state_dict itself.

    Returns:
        A new model carrying the saved weights and masks.

    Raises:
        MaskLoadError: missing or unreadable file, keys or shapes that do not match the model.

    Example:
        >>> import torch, compactor
        >>> from torch.nn.utils import prune
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> _ = prune.ln_structured(net[0], "weight", amount=1, n=2, dim=0)
        >>> again = compactor.load_pruned(torch.nn.Sequential(torch.nn.Linear(4, 3)), net.state_dict())
        >>> bool((again[0].weight_mask == net[0].weight_mask).all())
        True
    """
    state = _read_state_dict(source)
    if isinstance(model, nn.Module):
        target = clone(model)
    elif callable(model):
        target = model()
        if not isinstance(target, nn.Module):
            raise TypeError(f"load_pruned: the factory returned {type(target).__name__}, expected an nn.Module")
    else:
        raise TypeError(f"load_pruned: model must be an nn.Module or a callable returning one, got {type(model).__name__}")

    modules = dict(target.named_modules())
    for key in state:
        if key.endswith("_orig") and key[: -len("_orig")] + "_mask" not in state:
            raise MaskLoadError(
                f"key '{key}' has no matching '{key[:-len('_orig')]}_mask'; the file is not a complete pruned state_dict"
            )
        if not key.endswith("_mask"):
            continue
        base = key[: -len("_mask")]
        if base + "_orig" not in state:
            raise MaskLoadError(f"key '{key}' has no matching '{base}_orig'; the file is not a complete pruned state_dict")
        mod_name, _, tname = base.rpartition(".")
        module = modules.get(mod_name)
        if module is None or not isinstance(getattr(module, tname, None), torch.Tensor):
            raise MaskLoadError(
                f"key '{key}' names '{base}', which {type(target).__name__} does not have; "
                "pass the same model class the file was saved from"
            )
        current = getattr(module, tname)
        mask = state[key]
        if tuple(mask.shape) != tuple(current.shape):
            raise MaskLoadError(
                f"key '{key}' has shape {tuple(mask.shape)} but '{base}' is {tuple(current.shape)}; "
                "the file was saved from a model with different layer sizes"
            )
        for hook in _pruning_hooks(module):
            if hook._tensor_name == tname:
                prune.remove(module, tname)
        prune.custom_from_mask(module, tname, mask.to(current.device))

    files.check_keys(target.state_dict(), state, error=MaskLoadError, model=type(target).__name__,
                     source="the state_dict", fix="pass the model class the file was saved from",
                     shape_fix="the file was saved from a model with different layer sizes")
    target.load_state_dict(state, strict=True)
    return target


def dense_from_masked(model: Union[nn.Module, Callable[[], nn.Module]], masked: nn.Module) -> nn.Module:
    """The weights before masking: a fresh ``model`` loaded with ``masked``'s ``*_orig`` tensors, masks dropped.

    What the model computed before ``torch.nn.utils.prune`` masked it (not
    ``prune.remove``, which keeps the zeros). ``model`` is a class / zero-argument factory
    or an instance of ``masked``'s architecture (copied, never modified). A model without
    masks (weights baked by ``prune.remove``) comes back with those weights.

    Example:
        >>> masked = nn.Sequential(nn.Linear(4, 6))
        >>> _ = prune.ln_structured(masked[0], "weight", amount=0.5, n=2, dim=0)
        >>> dense = dense_from_masked(nn.Sequential(nn.Linear(4, 6)), masked)
        >>> bool((dense[0].weight == masked[0].weight_orig).all()), int((masked[0].weight == 0).all(1).sum())
        (True, 3)
    """
    state = masked.state_dict()
    pruned = {k[: -len("_mask")] for k in state if k.endswith("_mask") and k[: -len("_mask")] + "_orig" in state}
    weights = {}
    for key, value in state.items():
        if key.endswith("_mask") and key[: -len("_mask")] in pruned:
            continue
        base = key[: -len("_orig")] if key.endswith("_orig") else None
        weights[base if base in pruned else key] = value
    dense = clone(model) if isinstance(model, nn.Module) else model()
    dense.load_state_dict(weights, strict=True)
    return dense.eval()
