"""The model zoo: every entry builds deterministically and runs at its example and other sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compactor.testing import zoo


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _nontrivial_norms(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert not torch.allclose(m.running_mean, torch.zeros_like(m.running_mean)), name
            assert not torch.allclose(m.running_var, torch.ones_like(m.running_var)), name
            assert not torch.allclose(m.weight, torch.ones_like(m.weight)), name
            assert not torch.allclose(m.bias, torch.zeros_like(m.bias)), name
        elif isinstance(m, nn.LayerNorm):
            assert not torch.allclose(m.weight, torch.ones_like(m.weight)), name
            assert not torch.allclose(m.bias, torch.zeros_like(m.bias)), name


def test_names_and_lookup() -> None:
    assert len(zoo.NAMES) == len(set(zoo.NAMES)) >= 17
    for name in zoo.NAMES:
        entry = zoo.get(name)
        assert entry.name == name and entry.description
    with pytest.raises(KeyError, match="resnet_basic"):
        zoo.get("no-such-model")


def _tensors(out) -> list[torch.Tensor]:
    """A zoo model returns a tensor or, like a detection head, a non-empty list of tensors."""
    outs = out if isinstance(out, list) else [out]
    assert outs and all(isinstance(o, torch.Tensor) for o in outs), type(out)
    return outs


@pytest.mark.timeout(5)  # 0.07 s measured (0.15 s with a second pytest process competing for the 2 cores)
@pytest.mark.parametrize("name", zoo.NAMES)
def test_entry(name: str) -> None:
    entry = zoo.get(name)
    model = entry.build()
    again = entry.build()
    assert not model.training
    sd1, sd2 = model.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys()
    for key in sd1:
        assert torch.equal(sd1[key], sd2[key]), key
    _nontrivial_norms(model)

    with torch.no_grad():
        for batch in (1, 3):
            inputs = entry.example_inputs(batch)
            assert isinstance(inputs, tuple)
            for a, b in zip(inputs, entry.example_inputs(batch)):
                assert torch.equal(a, b)
            outs = _tensors(model(*inputs))
            for out in outs:
                assert out.shape[0] == batch
                assert torch.isfinite(out).all()
            for a, b in zip(outs, _tensors(model(*inputs))):
                assert torch.equal(a, b)
            for a, b in zip(outs, _tensors(again(*inputs))):
                assert torch.equal(a, b)
        for size in entry.sizes:
            for out in _tensors(model(*zoo.example_inputs_at(name, 2, size))):
                assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_build_helper() -> None:
    model, inputs = zoo.build("lenet")
    assert not model.training and inputs[0].shape == (2, 1, 28, 28)
    _, tokens = zoo.build("embedding")
    assert tokens[0].dtype == torch.long


def test_resnet50_like_structure() -> None:
    model = zoo.resnet50_like(1 / 16)
    blocks = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
    assert blocks == [3, 4, 6, 3]
    assert model.fc.in_features == 128 and model.fc.out_features == 1000
