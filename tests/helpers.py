"""Shared test helpers: snapshots of a model's full state, to prove compact() leaves it alone."""

from __future__ import annotations

import torch
from torch import nn


def snapshot(model: nn.Module) -> dict:
    """Everything compact() must not change: tensors (by value), hooks, flags, parameter identity."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "params": {k: (id(p), p.requires_grad) for k, p in model.named_parameters()},
        "hooks": {n: list(m._forward_pre_hooks.values()) for n, m in model.named_modules()},
        "fhooks": {n: list(m._forward_hooks.values()) for n, m in model.named_modules()},
        "training": {n: m.training for n, m in model.named_modules()},
        "modules": {n: id(m) for n, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), f"{k} changed"
    assert after["params"] == before["params"]
    assert after["hooks"] == before["hooks"]
    assert after["fhooks"] == before["fhooks"]
    assert after["training"] == before["training"]
    assert after["modules"] == before["modules"]
