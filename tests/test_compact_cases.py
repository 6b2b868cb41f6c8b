"""compact() on whole models: edge cases where a naive planner returns a wrong or larger model; each must
stay exact (compact(x) == masked(x)) or be refused."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import compactor
from tests.hand_models import Halves, Tied, mask_rows


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
    mask_rows(m.a, [0])
    example = (torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.long))
    small = compactor.compact(m, example)
    other = (torch.randn(2, 5, 4), torch.zeros(2, 5, dtype=torch.long))
    torch.testing.assert_close(small(*other), m(*other))


def test_fixed_channel_slice_keeps_its_channels():
    """h[:, :4] and h[:, 4:] name channels by position: removing channel 1 would shift them."""

    torch.manual_seed(0)
    m = Halves().eval()
    mask_rows(m.conv, [1])
    x = torch.randn(2, 3, 9, 9)
    small = compactor.compact(m, x)
    torch.testing.assert_close(small(x), m(x))
    assert small.conv.out_channels == 8
    assert "slice" in str(small.compaction_report)


def test_batchnorm_mean_fold_skipped_when_the_conv_output_is_also_returned():
    """c2's output goes to bn and is also returned: its constants go into c2's bias, not bn's running mean."""
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
    mask_rows(m.c1, [0, 3])
    x = torch.randn(2, 3, 5, 5)
    small = compactor.compact(m, x)
    for got, want in zip(small(x), m(x)):
        torch.testing.assert_close(got, want)
    assert small.c2.bias is not None  # the constant went into c2's bias, not bn's mean


def test_tied_weights_are_not_untied():
    """An embedding tied to the output projection: slicing one copy would untie and grow the model."""

    torch.manual_seed(0)
    m = Tied().eval()
    mask_rows(m.h, [2])
    t = torch.randint(0, 10, (2, 5))
    small = compactor.compact(m, t)
    torch.testing.assert_close(small(t), m(t))
    assert small.e.weight is small.o.weight
    assert small.compaction_report.params_after <= small.compaction_report.params_before


def test_bfloat16_model_is_verified_at_bfloat16_precision():
    """A bfloat16 model (half its rows masked) compacts and verifies at 16 eps of bfloat16, not fp32's tolerance."""
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
    mask_rows(m[0], [1, 4])
    x = torch.randn(2, 3, 10, 10)
    small = compactor.compact(m, x)
    assert small[2].in_channels == 4 and type(small[2]) is nn.Conv2d
    torch.testing.assert_close(small(x), m(x))


def test_output_types_that_cannot_be_compared_are_refused():
    """A forward returning a dataclass is refused with a CompactionError saying to return a tensor or a tuple."""
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
    mask_rows(m.a, [0])
    with pytest.raises(compactor.CompactionError, match="return a tensor, or a tuple"):
        compactor.compact(m, torch.randn(2, 4))


def test_channels_of_a_returned_tensor_also_used_further_are_kept():
    """A detection-style head returns feat = relu(bn(a(x))) *and* feeds it to b: a's masked rows are part
    of the model's output, so they stay (the output keeps its shape), though the path is plain conv/BN/ReLU."""

    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1)

        def forward(self, x):
            feat = torch.relu(self.bn(self.a(x)))
            return [feat, self.b(feat)]

    torch.manual_seed(0)
    m = TwoOutputs().eval()
    mask = torch.ones_like(m.a.weight)
    mask[[1, 4]] = 0
    prune.custom_from_mask(m.a, "weight", mask)
    x = torch.randn(2, 3, 8, 8)
    small = compactor.compact(m, x)
    assert small.a.out_channels == 6
    for got, want in zip(small(x), m(x)):
        torch.testing.assert_close(got, want)
    notes = compactor.report_of(small).groups
    assert any(n.status == "kept" and n.channels == [1, 4] and "model's output" in n.reason for n in notes)


class GLU(nn.Module):
    """down(silu(gate(x)) * up(x)), LLaMA's MLP."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(4, 6, bias=bias), nn.Linear(4, 6, bias=bias)
        self.down = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def test_one_zero_factor_of_a_glu_product_is_enough():
    """gate row 1 masked (silu(0) = 0) and up row 3 masked, no biases: neurons 1 and 3 are zero after the product,
    so both go from gate, up and down, though each is masked in only one of the two producers."""
    torch.manual_seed(0)
    m = GLU().eval()
    mask_rows(m.gate, [1])
    mask_rows(m.up, [3])
    x = torch.randn(2, 5, 4)
    small = compactor.compact(m, x)
    assert (small.gate.out_features, small.up.out_features, small.down.in_features) == (4, 4, 4)
    torch.testing.assert_close(small(x), m(x))
    [note] = compactor.report_of(small).groups
    assert (note.status, note.channels) == ("removed", [1, 3])


def test_a_masked_factor_with_a_bias_is_not_zero():
    """With biases, gate row 1 masked leaves silu(b_1) * up(x)_1, not constant: kept as partial, exact."""
    torch.manual_seed(0)
    m = GLU(bias=True).eval()
    mask_rows(m.gate, [1])
    x = torch.randn(2, 5, 4)
    small = compactor.compact(m, x)
    assert small.gate.out_features == 6
    torch.testing.assert_close(small(x), m(x))
    assert [n.status for n in compactor.report_of(small).groups] == ["partial"]
