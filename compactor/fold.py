"""Build the new, smaller layers: fold constants into consumers, slice tensors.

Works in place on the planner's baked copy, which the caller owns.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import with_border_correction
from .plan import Decision

__all__ = ["apply"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _keep(n: int, removed: set[int], device) -> torch.Tensor:
    return torch.tensor([i for i in range(n) if i not in removed], dtype=torch.long, device=device)


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=like.requires_grad)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _fold_bias(module: nn.Module, delta: torch.Tensor) -> None:
    delta = delta.to(module.weight.dtype)
    if module.bias is None:
        module.bias = nn.Parameter(delta.clone(), requires_grad=module.weight.requires_grad)
    else:
        module.bias.data = (module.bias.detach().double() + delta.double()).to(module.bias.dtype)


def absorbing_bn(name: str, modules: dict, decision: Decision):
    """The BatchNorm that takes ``name``'s folded constants in its mean, or None (they go into a bias).

    Only for a bias-free conv whose output feeds that BatchNorm alone: the conv then stays
    bias-free (on a GPU a conv bias costs a whole extra pass over the output).
    """
    bn_name = decision.bn_after.get(name)
    if bn_name is None or modules[name].bias is not None:
        return None
    bn = modules[bn_name]
    return bn if getattr(bn, "running_mean", None) is not None else None


def _shift_mean(bn: nn.Module, delta: torch.Tensor) -> None:
    """BN(y + delta) == BN'(y) with running_mean' = running_mean - delta (eval); training mode subtracts the batch mean anyway."""
    bn.running_mean.copy_((bn.running_mean.double() - delta.to(bn.running_mean.device).double()).to(bn.running_mean.dtype))


def _slice(module: nn.Module, out_rm: set[int], in_rm: set[int]) -> None:
    dev = module.weight.device if hasattr(module, "weight") and module.weight is not None else None
    if isinstance(module, _CONV):
        keep_out = _keep(module.out_channels, out_rm, dev)
        w = module.weight.detach().index_select(0, keep_out)
        if module.groups == 1:
            w = w.index_select(1, _keep(module.in_channels, in_rm, dev))
        else:  # the planner removes whole groups only: inputs and outputs of a group together
            per_in = module.in_channels // module.groups
            module.groups -= len(in_rm) // per_in
        module.weight = _param(w, module.weight)
        if module.bias is not None:
            module.bias = _param(module.bias.detach().index_select(0, keep_out), module.bias)
        if hasattr(module, "border_kernel"):
            module.border_kernel = module.border_kernel.index_select(0, keep_out).contiguous()
            module.border_offset = module.border_offset.index_select(0, keep_out).contiguous()
        module.out_channels = len(keep_out)
        module.in_channels -= len(in_rm)
    elif isinstance(module, nn.Linear):
        keep_out = _keep(module.out_features, out_rm, dev)
        keep_in = _keep(module.in_features, in_rm, dev)
        module.weight = _param(module.weight.detach().index_select(0, keep_out).index_select(1, keep_in), module.weight)
        if module.bias is not None:
            module.bias = _param(module.bias.detach().index_select(0, keep_out), module.bias)
        module.out_features, module.in_features = len(keep_out), len(keep_in)
    elif isinstance(module, _BN):
        keep = _keep(module.num_features, out_rm, module.running_mean.device if module.running_mean is not None else dev)
        if module.affine:
            module.weight = _param(module.weight.detach().index_select(0, keep), module.weight)
            module.bias = _param(module.bias.detach().index_select(0, keep), module.bias)
        if module.running_mean is not None:
            module.running_mean = module.running_mean.index_select(0, keep)
            module.running_var = module.running_var.index_select(0, keep)
        module.num_features = len(keep)
    elif isinstance(module, nn.PReLU):
        keep = _keep(module.num_parameters, out_rm, dev)
        module.weight = _param(module.weight.detach().index_select(0, keep), module.weight)
        module.num_parameters = len(keep)
    elif isinstance(module, nn.Embedding):
        keep = _keep(module.embedding_dim, out_rm, dev)
        module.weight = _param(module.weight.detach().index_select(1, keep), module.weight)
        module.embedding_dim = len(keep)
    else:  # the planner only slices the types above
        raise TypeError(f"cannot slice {type(module).__name__}")


def apply(work: nn.Module, decision: Decision) -> nn.Module:
    """Fold the decided constants, then slice every layer; returns ``work`` (modified)."""
    modules = dict(work.named_modules())
    for name, fold in decision.folds.items():
        module = modules[name]
        bn = absorbing_bn(name, modules, decision)
        into_bn = bn is not None
        offset = None
        if fold.bias is not None:
            if into_bn:
                _shift_mean(bn, fold.bias)
            else:
                _fold_bias(module, fold.bias)
        if fold.border is not None:
            if into_bn:
                offset = fold.border.reshape(fold.border.shape[0], -1).sum(1)
                _shift_mean(bn, offset)
            new = with_border_correction(module, fold.border, offset)
            _set_module(work, name, new)
            modules[name] = new
    for name in sorted(set(decision.remove_out) | set(decision.remove_in)):
        _slice(modules[name], decision.remove_out.get(name, set()), decision.remove_in.get(name, set()))
    params = dict(work.named_parameters())
    for name, (dim, removed) in decision.remove_param.items():
        p = params[name]
        keep = _keep(p.shape[dim], removed, p.device)
        parent_name, _, attr = name.rpartition(".")
        parent = work.get_submodule(parent_name) if parent_name else work
        setattr(parent, attr, _param(p.detach().index_select(dim, keep), p))
    return work
