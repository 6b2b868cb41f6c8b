"""compactor/tensors.py: reading example inputs, random inputs like them, and the tensors a model returns."""

from __future__ import annotations

import pytest
import torch

from compactor import tensors


def test_as_inputs_reads_a_tensor_a_tuple_and_a_dict():
    x = torch.randn(2, 3)
    assert tensors.as_inputs(x) == (x,)
    assert tensors.as_inputs([x, x]) == (x, x)
    (kw,) = tensors.as_inputs({"input_ids": x})
    assert isinstance(kw, tensors.Kwargs) and kw["input_ids"] is x
    with pytest.raises(TypeError, match="non-empty"):
        tensors.as_inputs({})
    with pytest.raises(TypeError, match="every example input must be a tensor, got int"):
        tensors.as_inputs((x, 3), tensors_only=True)


def test_random_like_keeps_shapes_dtypes_and_what_the_values_may_be():
    """Floats follow the example's mean and spread; an all-ones mask may draw 0 and 1; labels holding -100 draw
    only values they hold; a batch size replaces dim 0; the same seed gives the same inputs."""
    ids = torch.tensor([[5, 9, 7]])
    labels = torch.tensor([[-100, 3, 4]])
    floats = torch.full((4, 1000), 3.0) + torch.randn(4, 1000) * 0.01
    kw = tensors.Kwargs(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    (out,) = tensors.random_like((kw,), batch=64, seed=1)
    assert out["input_ids"].shape == (64, 3) and out["input_ids"].dtype == torch.int64
    assert set(out["attention_mask"].unique().tolist()) == {0, 1}
    assert set(out["labels"].unique().tolist()) <= {-100, 3, 4}
    (f,) = tensors.random_like((floats,), seed=1)
    assert abs(float(f.mean()) - 3.0) < 0.01 and float(f.std()) < 0.05
    assert torch.equal(tensors.random_like((floats,), seed=2)[0], tensors.random_like((floats,), seed=2)[0])


def test_flatten_outputs_in_the_order_a_model_returns_them():
    """Tensors of nested tuples and dicts, dicts in insertion order (as ONNX returns them), None skipped."""
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    out = (a, {"z": b, "a": [c, None]})
    assert [float(t) for t in tensors.flatten_outputs(out)] == [0.0, 1.0, 2.0]
    with pytest.raises(Exception, match="returns a str"):
        list(tensors.flatten_outputs("text"))
