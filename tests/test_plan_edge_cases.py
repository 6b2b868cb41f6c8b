"""Edge cases where a naive planner returns a wrong or larger model: each must stay exact or be refused."""

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import compactor



def _dead_rows(module: nn.Module, rows: list[int]) -> None:
    mask = torch.ones_like(module.weight)
    mask[rows] = 0
    prune.custom_from_mask(module, "weight", mask)


def test_channel_gated_by_an_all_ones_integer_mask_is_not_taken_for_a_constant():
    """relu(a(x)) * mask: with mask all ones in the example, random batches must still vary the mask."""

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x, mask):
            return self.b(torch.relu(self.a(x)) * mask[..., None])

    torch.manual_seed(0)
    m = Gated().eval()
    with torch.no_grad():
        m.a.bias.fill_(1.0)
    _dead_rows(m.a, [0])
    example = (torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.long))
    small = compactor.compact(m, example)
    other = (torch.randn(2, 5, 4), torch.zeros(2, 5, dtype=torch.long))
    torch.testing.assert_close(small(*other), m(*other))


def test_fixed_channel_slice_keeps_its_channels():
    """h[:, :4] and h[:, 4:] name channels by position: removing channel 1 would shift them."""

    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.l, self.r = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            return self.l(h[:, :4]) + self.r(h[:, 4:])

    torch.manual_seed(0)
    m = Halves().eval()
    _dead_rows(m.conv, [1])
    x = torch.randn(2, 3, 9, 9)
    small = compactor.compact(m, x)
    torch.testing.assert_close(small(x), m(x))
    assert small.conv.out_channels == 8
    assert "slice" in str(small.compaction_report)


def test_batchnorm_mean_fold_skipped_when_the_conv_output_is_also_returned():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.bn = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.c2(torch.relu(self.c1(x)))
            return self.bn(y), y

    torch.manual_seed(0)
    m = TwoHeads().eval()
    with torch.no_grad():
        m.c1.bias.fill_(0.5)
    _dead_rows(m.c1, [0, 3])
    x = torch.randn(2, 3, 5, 5)
    small = compactor.compact(m, x)
    for got, want in zip(small(x), m(x)):
        torch.testing.assert_close(got, want)
    assert small.c2.bias is not None  # the constant went into c2's bias, not bn's mean


def test_tied_weights_are_not_untied():
    """An embedding tied to the output projection: slicing one copy would untie and grow the model."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.h = nn.Embedding(10, 6), nn.Linear(6, 6)
            self.o = nn.Linear(6, 10, bias=False)
            self.o.weight = self.e.weight

        def forward(self, t):
            return self.o(torch.relu(self.h(self.e(t))))

    torch.manual_seed(0)
    m = Tied().eval()
    _dead_rows(m.h, [2])
    t = torch.randint(0, 10, (2, 5))
    small = compactor.compact(m, t)
    torch.testing.assert_close(small(t), m(t))
    assert small.e.weight is small.o.weight
    assert small.compaction_report.params_after <= small.compaction_report.params_before


def test_bfloat16_model_is_verified_at_bfloat16_precision():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16).eval()
    prune.ln_structured(m[0], "weight", amount=0.5, n=2, dim=0)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    small = compactor.compact(m, x)
    assert small[0].out_features == 8
    torch.testing.assert_close(small(x), m(x), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate"])
def test_reflect_and_replicate_padding_fold_into_the_bias(padding_mode):
    """A constant channel stays constant under reflect / replicate padding: a plain bias fold is exact."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1, padding_mode=padding_mode)).eval()
    with torch.no_grad():
        m[0].bias.fill_(0.3)
    _dead_rows(m[0], [1, 4])
    x = torch.randn(2, 3, 10, 10)
    small = compactor.compact(m, x)
    assert small[2].in_channels == 4 and type(small[2]) is nn.Conv2d
    torch.testing.assert_close(small(x), m(x))


def test_output_types_that_cannot_be_compared_are_refused():
    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return Out(self.b(torch.relu(self.a(x))))

    m = M().eval()
    _dead_rows(m.a, [0])
    with pytest.raises(compactor.CompactionError, match="return a tensor, or a tuple"):
        compactor.compact(m, torch.randn(2, 4))
