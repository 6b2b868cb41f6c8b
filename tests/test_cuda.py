"""compact() on a CUDA model: same exactness, everything stays on the device. Skips without a GPU."""

import pytest
import torch
from torch.nn.utils import prune

import compactor
from compactor.testing import zoo
from compactor.verify import full_precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", ["lenet", "resnet_bottleneck", "mobilenetv2", "vgg"])
def test_compact_on_cuda_equals_masked(name):
    model, x = zoo.build(name)
    model = model.cuda()
    x = tuple(t.cuda() for t in x)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.weight.shape[0] > 10:
            prune.ln_structured(m, "weight", amount=0.5, n=2, dim=0)
    small = compactor.compact(model, x)
    assert all(p.is_cuda for p in small.parameters())
    with full_precision():  # TF32 convs would differ by ~1e-3 whatever the model
        torch.testing.assert_close(small(*x), model(*x), rtol=1e-5, atol=1e-5)
    assert small.compaction_report.params_after < small.compaction_report.params_before
