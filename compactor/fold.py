"""Execute a plan: fold the constants of removed channels into their consumers, then slice every layer.

Asks no planning question: every decision is in the :class:`~compactor.planner.Plan`.
:func:`new_shapes` gives the compact model's parameter shapes from the same slicing
rules (:func:`_slicing`) that :func:`apply` executes, so a dry run predicts exactly
what is built.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from .experts import slice_experts
from .heads import set_count
from .kinds import Slicing, add_to_bias, kind_of, out_major, replace_tensor, sliced
from .layers import set_module, with_border_correction, with_border_correction_bn
from .planner import Cut, Fold, Plan

__all__ = ["apply", "new_shapes"]


def _slicing(layer: Union[nn.Module, nn.Parameter], cut: Cut) -> Slicing:
    """Which tensors of ``layer`` lose which indices along which dimensions ("" names a bare parameter)."""
    if isinstance(layer, nn.Parameter):
        return {"": ((cut.parameter_dim or 0, cut.out),)}
    kind = kind_of(layer)
    if kind is None:  # the planner slices the kinds compactor knows only
        raise TypeError(f"cannot slice {type(layer).__name__} '{cut.name}'")
    return kind.slicing(layer, cut.out, cut.inputs)


def _shape(shape: tuple[int, ...], dims: tuple[tuple[int, tuple[int, ...]], ...]) -> tuple[int, ...]:
    s = list(shape)
    for dim, removed in dims:
        s[dim] -= len(removed)
    return tuple(s)


def _layers(model: nn.Module) -> dict[str, Union[nn.Module, nn.Parameter]]:
    found: dict[str, Union[nn.Module, nn.Parameter]] = dict(model.named_modules())
    found.update(model.named_parameters())
    return found


def new_shapes(model: nn.Module, plan: Plan) -> dict[str, tuple[int, ...]]:
    """The shape of every parameter of the compact model, keyed like ``model.named_parameters(remove_duplicate=False)``.

    ``model`` is the baked model the plan was made for; nothing is built or changed.
    """
    shapes = {k: tuple(p.shape) for k, p in model.named_parameters(remove_duplicate=False)}
    layers = _layers(model)
    for name, cut in plan.cuts.items():
        for tname, dims in _slicing(layers[name], cut).items():
            key = name if not tname else (f"{name}.{tname}" if name else tname)
            if key in shapes:
                shapes[key] = _shape(shapes[key], dims)
    for cut in plan.experts:
        for pname, dim, halves in cut.tensors:
            key = f"{cut.name}.{pname}"
            shapes[key] = tuple(len(cut.keep[0]) * halves if d == dim else n for d, n in enumerate(shapes[key]))
    for f in plan.folds:
        module = layers[f.layer]
        key = f"{f.layer}.bias" if f.layer else "bias"
        if f.target == "bias" and module.bias is None:
            cut = plan.cuts.get(f.layer)
            shapes[key] = (out_major(module).shape[0] - (len(cut.out) if cut else 0),)  # folding creates the bias
    return shapes


def _slice(layer: nn.Module, cut: Cut) -> None:
    kind = kind_of(layer)
    if kind is None:  # the planner slices the kinds compactor knows only
        raise TypeError(f"cannot slice {type(layer).__name__} '{cut.name}'")
    kind.cut(layer, cut.out, cut.inputs)


def _shift_mean(bn: nn.Module, delta: torch.Tensor) -> None:
    """BN(y + delta) == BN'(y) with running_mean' = running_mean - delta (eval); training mode subtracts the batch mean anyway."""
    bn.running_mean.copy_((bn.running_mean.double() - delta.to(bn.running_mean.device).double()).to(bn.running_mean.dtype))


def _execute(work: nn.Module, modules: dict[str, nn.Module], f: Fold) -> None:
    if f.target == "bias":
        add_to_bias(modules[f.layer], f.values)
    elif f.target == "bn_mean":
        _shift_mean(modules[f.bn], f.values)
    elif f.target == "carrier":
        column = out_major(modules[f.layer])[:, f.channel]  # a view of the weight
        with torch.no_grad():
            column.copy_((column.double() + f.values.to(column.device)).to(column.dtype))
    else:  # "border" / "bn_border": the conv or its BatchNorm becomes border-corrected
        if f.bn is not None:
            _shift_mean(modules[f.bn], f.offset)
        if f.target == "bn_border":
            carrier, new = f.bn, with_border_correction_bn(modules[f.bn], modules[f.layer], f.values, f.offset)
        else:
            carrier, new = f.layer, with_border_correction(modules[f.layer], f.values, f.offset)
        set_module(work, carrier, new)
        modules[carrier] = new


def apply(work: nn.Module, plan: Plan) -> nn.Module:
    """Fold the planned constants, then slice every layer; returns ``work`` (modified in place)."""
    modules = dict(work.named_modules())
    for f in plan.folds:
        _execute(work, modules, f)
    params = dict(work.named_parameters())
    for name, cut in plan.cuts.items():
        if cut.parameter_dim is None:
            _slice(modules[name], cut)
        else:
            p = params[name]
            parent_name, _, attr = name.rpartition(".")
            replace_tensor(work.get_submodule(parent_name) if parent_name else work, attr, sliced(p, _slicing(p, cut)[""]), p)
    for cut in plan.experts:  # neurons of fused mixture-of-experts tensors, per expert
        slice_experts(modules[cut.name], cut)
    for name, values in plan.attributes.items():  # head counts stored on attention modules (or their config)
        for attr, value in values.items():
            set_count(modules[name], attr, value)
    return work
