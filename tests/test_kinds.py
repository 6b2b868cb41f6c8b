"""compactor/kinds.py: one object per layer kind; ConvTranspose added through it alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import compactor
from compactor.kinds import dead_rows, kind_of, out_major, zero_columns

RTOL, ATOL = 1e-5, 1e-5


@pytest.mark.parametrize("layer, name, rows", [
    (nn.Conv2d(3, 5, 3), "Conv", 5), (nn.ConvTranspose2d(3, 5, 3), "ConvTranspose", 5),
    (nn.ConvTranspose1d(4, 2, 3), "ConvTranspose", 2), (nn.ConvTranspose3d(2, 3, 2), "ConvTranspose", 3),
    (nn.Linear(4, 6), "Linear", 6), (nn.BatchNorm2d(7), "BatchNorm", 7), (nn.Embedding(10, 4), "Embedding", 4),
    (nn.PReLU(3), "PReLU", 3)])
def test_kind_of_finds_each_kind_and_its_output_rows(layer, name, rows):
    assert kind_of(layer).name == name and kind_of(layer).out_rows(layer) == rows


def test_a_grouped_transposed_conv_is_not_a_kind_compactor_slices():
    assert kind_of(nn.ConvTranspose2d(4, 4, 3, groups=2)) is None and kind_of(nn.ReLU()) is None


def test_transposed_conv_rows_are_weight_dim_1():
    """ConvTranspose2d(3 -> 4): weight (3, 4, k, k); output channel 2 is weight[:, 2]; input channel 1 is weight[1]."""
    t = nn.ConvTranspose2d(3, 4, 2)
    with torch.no_grad():
        t.weight[:, 2] = 0
        t.weight[1] = 0
    assert out_major(t).shape == (4, 3, 2, 2)
    assert dead_rows(t).tolist() == [False, False, True, False]
    assert zero_columns(t).tolist() == [False, True, False]
    mask = kind_of(t).row_mask(t, torch.tensor([True, False, False, True]))
    assert mask[:, 0].eq(0).all() and mask[:, 3].eq(0).all() and mask[:, 1:3].eq(1).all()


class Decoder(nn.Module):
    """A U-Net-style decoder step: strided conv down, transposed conv up (stride 2), zero-padded conv head."""

    def __init__(self, dims: int = 2) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        up = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.enc, self.bn1 = conv(3, 8, 3, stride=2, padding=1), bn(8)
        self.up, self.bn2 = up(8, 6, 4, stride=2, padding=1), bn(6)
        self.head = conv(6, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.enc(x)))
        return self.head(torch.relu(self.bn2(self.up(h))))


def _decoder(dims: int = 2) -> nn.Module:
    torch.manual_seed(0)
    m = Decoder(dims).eval()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 1.0)
            bn.running_mean.normal_(0, 0.2), bn.running_var.uniform_(0.5, 2.0)
    return m


def _mask_decoder(m: nn.Module) -> nn.Module:
    """enc rows 1, 4, 6 (constants relu(bn1 shift) reach the transposed conv); up's output channels 0, 3
    (weight[:, [0, 3]]: dim 1, as prune.ln_structured(..., dim=1) masks a transposed conv's outputs)."""
    mask = torch.ones_like(m.enc.weight)
    mask[[1, 4, 6]] = 0
    prune.custom_from_mask(m.enc, "weight", mask)
    mask = torch.ones_like(m.up.weight)
    mask[:, [0, 3]] = 0
    prune.custom_from_mask(m.up, "weight", mask)
    return m


@pytest.mark.parametrize("dims, shape, other", [(2, (2, 3, 16, 16), (3, 3, 20, 12)), (1, (2, 3, 16), (3, 3, 22)),
                                                (3, (1, 3, 8, 8, 8), (2, 3, 6, 10, 8))])
def test_a_decoder_with_masked_transposed_convs_compacts_exactly(dims, shape, other):
    """The transposed conv's masked output channels are sliced on weight dim 1 (with its bias and bn2), and it
    reads the encoder's removed channels through a carrier: a constant input reaches a strided transposed conv
    unevenly, and the carrier (a plain channel it reads) reproduces that exactly, at any input size."""
    m = _mask_decoder(_decoder(dims))
    small = compactor.compact(m, torch.randn(*shape))
    assert {type(x) for x in small.modules()} <= {type(x) for x in m.modules()}
    report = compactor.report_of(small)
    # up: 2 of 6 outputs masked, one goes, one carries its constant into the zero-padded head
    assert small.up.out_channels == small.up.weight.shape[1] == small.head.in_channels == small.bn2.num_features == 5
    assert small.up.in_channels == small.enc.out_channels == 6  # enc: 3 masked, 2 go, 1 carries their constants
    carriers = [g for g in report.groups if g.status == "carrier"]  # one per group, for the layer reading it
    assert [len(g.channels) for g in carriers] == [1, 1]
    assert sorted("'up'" in g.reason for g in carriers) == [False, True] and any("'head'" in g.reason for g in carriers)
    assert report.params_after < report.params_before
    with torch.no_grad():
        for x in (torch.randn(*shape), torch.randn(*other)):
            torch.testing.assert_close(small(x), m(x), rtol=RTOL, atol=ATOL)


def test_border_layers_keeps_what_reaches_a_transposed_conv_and_says_why():
    """border='layers' has no correction for a transposed conv: the one encoder channel with a nonzero constant
    that reaches it stays (with the reason); channels whose constant is 0 still go."""
    m = _mask_decoder(_decoder())
    x = torch.randn(2, 3, 16, 16)
    small = compactor.compact(m, x, border="layers")
    kept = [g for g in compactor.report_of(small).groups if g.status == "kept"]
    assert [g.channels for g in kept] == [[4]] and "ConvTranspose2d 'up'" in kept[0].reason
    assert small.up.in_channels == 6
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x), rtol=RTOL, atol=ATOL)


def test_prune_channels_masks_transposed_conv_outputs_and_compact_removes_them(tmp_path):
    """prune_channels writes a transposed conv's row mask on weight dim 1 (and its bias, its BatchNorm):
    compact removes every masked row, and the result saves and loads back into Decoder exactly."""
    m = _decoder()
    x = torch.randn(2, 3, 16, 16)
    compactor.prune_channels(m, x, 0.5)
    assert m.up.weight_mask[:, :, 0, 0].eq(0).all(0).sum() == 3  # whole output channels (dim 1)
    small = compactor.compact(m, x)
    report = compactor.report_of(small)
    assert [g for g in report.groups if g.status != "removed"] == []
    assert small.up.out_channels == 3 and small.enc.out_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x), rtol=RTOL, atol=ATOL)
    loaded = compactor.load(Decoder, compactor.save(small, tmp_path / "dec.pt"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
