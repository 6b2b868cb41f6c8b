"""fold.apply / fold.new_shapes: hand-worked fold values, where they land, and the shapes a plan predicts."""

import copy

import pytest
import torch
from torch import nn

import compactor
from compactor import fold, masks, planner, tensors
from compactor.layers import BorderCorrectedBatchNorm2d, BorderCorrectedConv2d
from tests.hand_models import mask_rows

EXACT = dict(rtol=0.0, atol=0.0)




def _plan(model: nn.Module, x: torch.Tensor, border: str = "carrier"):
    work = masks.bake(model).eval()
    plan, _ = planner.make_plan(work, tensors.make_batches((x,), 2), border=border)
    return work, plan


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shapes(model: nn.Module) -> dict:
    return {k: tuple(p.shape) for k, p in model.named_parameters(remove_duplicate=False)}


def _assert_compact_equals_masked(model: nn.Module, x: torch.Tensor, border: str = "carrier") -> nn.Module:
    small = compactor.compact(model, x, border=border)
    torch.testing.assert_close(small(x), model(x))
    assert _params(small) < _params(masks.bake(model))
    return small


def _linear_pair() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        m[0].bias[1] = 0.7
    mask_rows(m[0], [1])
    return m


def test_linear_bias_fold_is_w2_column_times_relu_of_b1():
    """Row 1 of Linear(4,3) masked, b1[1]=0.7: Fold(bias) into the second layer with values W2[:, 1] * relu(0.7)."""
    m = _linear_pair()
    x = torch.randn(3, 4)
    work, plan = _plan(m, x)
    [f] = plan.folds
    assert (f.layer, f.target, f.bn, f.sources) == ("2", "bias", None, ("0",))
    relu_b = torch.relu(torch.tensor(0.7)).double()  # 0.7 in float32, through ReLU
    expected = m[2].weight.detach()[:, 1].double() * relu_b
    assert f.values.dtype == torch.float64
    torch.testing.assert_close(f.values, expected, **EXACT)

    b2 = m[2].bias.detach().clone()
    fold.apply(work, plan)
    torch.testing.assert_close(work[2].bias.detach(), b2 + m[2].weight.detach()[:, 1] * torch.relu(torch.tensor(0.7)))
    assert work[2].weight.shape == (2, 2) and work[0].weight.shape == (2, 4)
    _assert_compact_equals_masked(m, x)


def test_new_shapes_predicts_the_applied_models_parameters():
    """new_shapes(work, plan), computed before apply, equals the shapes of the parameters apply() builds."""
    m = _linear_pair()
    work, plan = _plan(m, torch.randn(3, 4))
    predicted = fold.new_shapes(work, plan)
    assert predicted == {"0.weight": (2, 4), "0.bias": (2,), "2.weight": (2, 2), "2.bias": (2,)}
    assert _shapes(work) == {"0.weight": (3, 4), "0.bias": (3,), "2.weight": (2, 3), "2.bias": (2,)}  # untouched
    assert _shapes(fold.apply(work, plan)) == predicted


def test_fold_into_a_bias_free_linear_creates_its_bias():
    """The consumer Linear(3, 2, bias=False) gets a bias equal to the fold; new_shapes predicts '2.bias': (2,)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2, bias=False)).eval()
    with torch.no_grad():
        m[0].bias[1] = 0.7
    mask_rows(m[0], [1])
    x = torch.randn(3, 4)
    work, plan = _plan(m, x)
    predicted = fold.new_shapes(work, plan)
    assert predicted["2.bias"] == (2,) and "2.bias" not in _shapes(work)
    built = fold.apply(work, plan)
    assert _shapes(built) == predicted
    expected = m[2].weight.detach()[:, 1] * torch.relu(torch.tensor(0.7))
    torch.testing.assert_close(built[2].bias.detach(), expected)
    assert isinstance(built[2].bias, nn.Parameter)
    [f] = plan.folds
    assert f.creates_bias
    small = _assert_compact_equals_masked(m, x)
    assert "into its bias (created: the layer had none" in small.compaction_report.folded[0]


def test_new_shapes_of_a_created_bias_on_a_layer_that_is_also_cut():
    """Bias-free middle Linear(5, 4) loses its own row 2 and takes a fold: the created bias is 3 wide, not 4."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 4, bias=False), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        m[0].bias[1] = 0.6
    mask_rows(m[0], [1])
    mask_rows(m[2], [2])
    x = torch.randn(3, 4)
    work, plan = _plan(m, x)
    predicted = fold.new_shapes(work, plan)
    assert predicted["2.weight"] == (3, 4) and predicted["2.bias"] == (3,)
    assert _shapes(fold.apply(work, plan)) == predicted
    _assert_compact_equals_masked(m, x)


def _conv_bn(padding: int, stride: int = 1) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 3, stride=stride, padding=padding, bias=False),
                      nn.BatchNorm2d(2)).eval()
    with torch.no_grad():
        m[0].bias[1] = 0.5
        m[3].running_mean.copy_(torch.tensor([0.2, -0.1]))
        m[3].running_var.copy_(torch.tensor([1.5, 0.8]))
    mask_rows(m[0], [1])
    return m


def _conv_bn_fold(padding: int, stride: int = 1, border: str = "carrier"):
    """The conv -> BN model of _conv_bn, an input, its baked copy, its plan and the one fold the plan makes."""
    m = _conv_bn(padding=padding, stride=stride)
    x = torch.randn(2, 3, 6, 6)
    work, plan = _plan(m, x, border)
    [f] = plan.folds
    return m, x, work, plan, f


def test_bias_free_conv_feeding_a_batchnorm_alone_folds_into_its_running_mean():
    """conv0 row 1 masked (constant 0.5) -> bias-free conv2 -> bn3 alone: Fold(bn_mean, bn='3'), mean -= 0.5 * sum W[:, 1]."""
    m, x, work, plan, f = _conv_bn_fold(padding=0)
    assert (f.layer, f.target, f.bn) == ("2", "bn_mean", "3")
    expected = 0.5 * m[2].weight.detach()[:, 1].double().sum((1, 2))
    torch.testing.assert_close(f.values, expected, rtol=1e-12, atol=0.0)
    mean = m[3].running_mean.clone()
    fold.apply(work, plan)
    torch.testing.assert_close(work[3].running_mean, (mean.double() - f.values).float(), **EXACT)
    assert work[2].bias is None  # the conv stays bias-free
    small = _assert_compact_equals_masked(m, x)
    assert small[2].bias is None and small[2].in_channels == 3


def _padded(bias_free: bool = False) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1, bias=not bias_free)).eval()
    with torch.no_grad():
        m[0].bias[1], m[0].bias[2] = 0.5, 0.3
    mask_rows(m[0], [1, 2])
    return m


def test_zero_padded_consumer_keeps_the_largest_constant_as_the_carrier_of_the_others():
    """Channels 1, 2 (constants 0.5, 0.3) feed a padding=1 conv: channel 1 stays as the carrier (a plain kept
    channel emitting 0.5) and its column becomes W[:, 1] + (0.3 / 0.5) W[:, 2]; channel 2 goes. The conv's own
    zero padding then makes 0.5 * W'[:, 1] what both channels contributed, border included."""
    m = _padded()
    x = torch.randn(2, 3, 6, 6)
    work, plan = _plan(m, x)
    [f] = plan.folds
    assert (f.layer, f.target, f.channel) == ("2", "carrier", 1)
    assert f.scale == 0.5
    w = m[2].weight.detach().double()
    v2 = torch.tensor(0.3).float().double()  # the float32 constant
    torch.testing.assert_close(f.values, v2 * w[:, 2] / 0.5, rtol=1e-12, atol=0.0)
    assert plan.cuts["0"].out == (2,) and plan.cuts["2"].inputs == (2,)
    [kept] = [n for n in plan.notes if n.status == "carrier"]
    assert kept.channels == [1] and "carry" in kept.reason and "'2'" in kept.reason
    small = _assert_compact_equals_masked(m, x)
    assert [type(mod) for mod in small] == [nn.Conv2d, nn.ReLU, nn.Conv2d]
    assert small[0].out_channels == 3 and small[2].in_channels == 3
    torch.testing.assert_close(small[2].weight[:, 1].double(), w[:, 1] + 0.6 * w[:, 2], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(small[2].weight[:, 2], m[2].weight[:, 3], **EXACT)  # channel 3 moved to 2
    # the border: at the top-left output only W[..., 1:, 1:] meets the image; the carrier makes that exact
    xb = torch.randn(1, 3, 9, 5)
    torch.testing.assert_close(small(xb), m(xb), rtol=1e-5, atol=1e-6)


def test_a_constant_of_zero_needs_no_carrier():
    """Masked channels whose constant is 0 (relu of a negative bias) add nothing, border or not: all go."""
    m = _padded()
    with torch.no_grad():
        m[0].bias[1], m[0].bias[2] = -0.5, -0.3
    x = torch.randn(2, 3, 6, 6)
    work, plan = _plan(m, x)
    assert plan.folds == () and plan.cuts["0"].out == (1, 2)
    assert _assert_compact_equals_masked(m, x)[0].out_channels == 2


def test_a_channel_rounding_keeps_anyway_is_the_carrier():
    """Channels 1, 2 masked of 4: with round_to=3 rounding keeps one of them anyway, and that one is the carrier
    (channel 1, the larger constant): width 3; with round_to=2 the carrier's width 3 rounds up to 4."""
    m = _padded()
    x = torch.randn(2, 3, 6, 6)
    work = masks.bake(m).eval()
    plan, _ = planner.make_plan(work, tensors.make_batches((x,), 2), round_to=3)
    assert plan.cuts["0"].out == (2,)  # carrier 1 kept, 2 removed: width 3, a multiple of 3 already
    plan, _ = planner.make_plan(work, tensors.make_batches((x,), 2), round_to=2)
    assert "0" not in plan.cuts and plan.folds == ()


def test_zero_padded_consumer_gets_a_border_kernel_sum_of_v_c_times_w_c():
    """border='layers': channels 1, 2 (constants 0.5, 0.3) feed a padding=1 conv: Fold(border) kernel =
    0.5 W[:, 1] + 0.3 W[:, 2]."""
    m = _padded()
    x = torch.randn(2, 3, 6, 6)
    work, plan = _plan(m, x, "layers")
    [f] = plan.folds
    assert (f.layer, f.target, f.bn, f.offset) == ("2", "border", None, None)
    w = m[2].weight.detach().double()
    v1, v2 = torch.tensor(0.5).double(), torch.tensor(0.3).float().double()  # the float32 constants
    assert f.values.shape == (2, 3, 3)
    assert abs(float(f.values[1, 0, 2]) - float(v1 * w[1, 1, 0, 2] + v2 * w[1, 2, 0, 2])) < 1e-15
    torch.testing.assert_close(f.values, v1 * w[:, 1] + v2 * w[:, 2], rtol=1e-12, atol=0.0)

    built = fold.apply(work, plan)
    assert type(built[2]) is BorderCorrectedConv2d
    assert built[2].border_kernel.shape == (2, 1, 3, 3) and built[2].in_channels == 2
    # at the top-left output the kernel overlaps the padding on its first row and column: only W[..., 1:, 1:] counts
    border = built[2].border_map(torch.zeros(1, 2, 6, 6))
    corner = (v1 * w[:, 1, 1:, 1:] + v2 * w[:, 2, 1:, 1:]).sum((1, 2))
    inside = f.values.sum((1, 2))
    torch.testing.assert_close(border[0, :, 0, 0].double(), corner, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(border[0, :, 3, 3].double(), inside, rtol=1e-6, atol=1e-7)
    small = _assert_compact_equals_masked(m, x, "layers")
    assert type(small[2]) is BorderCorrectedConv2d


def test_border_fold_with_a_batchnorm_puts_the_interior_in_its_mean_and_the_frame_in_the_batchnorm():
    """Bias-free stride-1 padded conv -> BN alone: Fold(bn_border, bn='3'), offset = kernel sum subtracted from
    the BN mean; the conv stays a plain Conv2d and the BN adds the frame, scaled by gamma / sqrt(var + eps)."""
    m, x, work, plan, f = _conv_bn_fold(padding=1, border="layers")
    assert (f.layer, f.target, f.bn) == ("2", "bn_border", "3")
    w = m[2].weight.detach().double()
    torch.testing.assert_close(f.values, 0.5 * w[:, 1], rtol=1e-12, atol=0.0)
    torch.testing.assert_close(f.offset, f.values.sum((1, 2)), **EXACT)
    mean = m[3].running_mean.clone()
    built = fold.apply(work, plan)
    torch.testing.assert_close(built[3].running_mean, (mean.double() - f.offset).float(), **EXACT)
    assert type(built[2]) is nn.Conv2d and built[2].bias is None
    assert type(built[3]) is BorderCorrectedBatchNorm2d and built[3].border_kernel.shape == (2, 1, 3, 3)
    # Pre-BN, the top-left output misses what the kernel's first row and column met in the padding:
    # 0.5 * (sum W[:, 1, 1:, 1:] - sum W[:, 1]); inside the frame nothing is added.
    frame = built[3].border_map(torch.zeros(1, 2, 6, 6))
    corner = 0.5 * (w[:, 1, 1:, 1:].sum((1, 2)) - w[:, 1].sum((1, 2)))
    torch.testing.assert_close(frame[0, :, 0, 0].double(), corner, rtol=1e-6, atol=1e-7)
    assert frame[0, :, 1:5, 1:5].abs().max() < 1e-6  # zero up to the float32 rounding of the offset
    y = torch.randn(3, 2, 6, 6)
    scale = m[3].weight.detach() / (m[3].running_var + m[3].eps).sqrt()
    expected = (y - built[3].running_mean[None, :, None, None]) * scale[None, :, None, None] \
        + m[3].bias.detach()[None, :, None, None] + frame * scale[None, :, None, None]
    with torch.no_grad():
        torch.testing.assert_close(built[3](y), expected)
    _assert_compact_equals_masked(m, x, "layers")


def test_border_fold_after_a_strided_conv_stays_on_the_conv():
    """Stride 2: the BN's input size does not tell the conv's, so the conv carries the frame (Fold border)."""
    m, x, work, plan, f = _conv_bn_fold(padding=1, stride=2, border="layers")
    assert (f.layer, f.target, f.bn) == ("2", "border", "3")
    built = fold.apply(work, plan)
    assert type(built[2]) is BorderCorrectedConv2d and built[2].bias is None and type(built[3]) is nn.BatchNorm2d
    _assert_compact_equals_masked(m, x, "layers")


def test_folds_from_two_groups_into_one_consumer_add_up():
    """Two producers concatenated into one Linear: one Fold whose values sum both removed columns' contributions."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(6, 2)

        def forward(self, x):
            return self.c(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))

    torch.manual_seed(0)
    m = Two().eval()
    with torch.no_grad():
        m.a.bias[0], m.b.bias[2] = 0.25, 0.75
    mask_rows(m.a, [0])
    mask_rows(m.b, [2])
    x = torch.randn(3, 4)
    work, plan = _plan(m, x)
    [f] = plan.folds
    assert f.layer == "c" and f.target == "bias" and set(f.sources) == {"a", "b"}
    w = m.c.weight.detach().double()
    torch.testing.assert_close(f.values, 0.25 * w[:, 0] + 0.75 * w[:, 5], rtol=1e-12, atol=0.0)
    assert plan.cuts["c"].inputs == (0, 5)
    _assert_compact_equals_masked(m, x)


class Conv1D(nn.Module):
    """Hugging Face's Conv1D as GPT-2 uses it: weight stored (in, out), x @ weight + bias."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.nf,))


def test_a_transposed_linear_loses_columns_and_folds_like_a_linear():
    """Conv1D(4 -> 6) -> relu -> Conv1D(6 -> 3), output columns 1 and 4 of the first masked (bias b1): the first
    keeps columns 0, 2, 3, 5; the second loses rows 1, 4 and its bias gains W2[1] relu(b1[1]) + W2[4] relu(b1[4])."""
    torch.manual_seed(0)
    m = nn.Sequential(Conv1D(6, 4), nn.ReLU(), Conv1D(3, 6)).eval()
    mask = torch.ones(4, 6)
    mask[:, [1, 4]] = 0
    torch.nn.utils.prune.custom_from_mask(m[0], "weight", mask)
    w2, b1, b2 = m[2].weight.detach().clone(), m[0].bias.detach(), m[2].bias.detach().clone()
    x = torch.randn(2, 5, 4)
    small = _assert_compact_equals_masked(m, x)
    assert small[0].weight.shape == (4, 4) and small[0].nf == 4 and small[2].weight.shape == (4, 3)
    expected = b2 + w2[1] * torch.relu(b1[1]) + w2[4] * torch.relu(b1[4])
    torch.testing.assert_close(small[2].bias, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("stride", [1, 2])
def test_compacting_a_compact_model_again_keeps_both_border_corrections(stride):
    """border='layers': prune, compact, prune more, compact again: the second fold adds to the correction the first one left
    (on the conv for stride 2, moving to the conv when the BatchNorm already carries one for stride 1)."""
    m = _conv_bn(padding=1, stride=stride)
    with torch.no_grad():
        m[0].bias[2] = 0.8  # a second constant channel, masked in round two
    x = torch.randn(2, 3, 7, 7)
    small = compactor.compact(m, x, border="layers")
    assert small[0].out_channels == 3
    mask_rows(small[0], [1])  # old channel 2, constant 0.8
    again = compactor.compact(small, x, border="layers")
    assert again[0].out_channels == 2
    xb = torch.randn(4, 3, 9, 7)
    with torch.no_grad():
        reference = copy.deepcopy(m)
        mask_rows(reference[0], [1, 2])
        torch.testing.assert_close(again(xb), reference(xb), rtol=1e-5, atol=1e-5)


def test_a_masked_channel_no_consumer_reads_is_never_the_carrier():
    """conv0 rows 0-2 masked (constants relu(b) > 0) into the zero-padded conv2, whose columns 5, 6 are masked
    too (those channels are unread, never measured): one of 0-2 carries the others, 5 and 6 go silently."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    with torch.no_grad():
        m[0].bias.copy_(m[0].bias.abs() + 0.2)
    mask_rows(m[0], [0, 1, 2])
    cols = torch.ones_like(m[2].weight)
    cols[:, 5:7] = 0
    torch.nn.utils.prune.custom_from_mask(m[2], "weight", cols)
    x = torch.randn(2, 3, 8, 8)
    work, plan = _plan(m, x)
    [carrier] = [n for n in plan.notes if n.status == "carrier"]
    assert carrier.channels[0] in (0, 1, 2) and plan.cuts["0"].out == tuple(sorted({0, 1, 2, 5, 6} - set(carrier.channels)))
    _assert_compact_equals_masked(m, x)


def test_one_carrier_serves_every_group_a_conv_reads():
    """c(relu(cat[a(x), b(x)])), rows 0-3 masked in both a and b: two groups, one zero-padded reader; one
    carrier (from either group) takes both groups' constants, the other group loses all four rows."""

    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(16, 4, 3, padding=1)

        def forward(self, x):
            return self.c(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))

    torch.manual_seed(0)
    m = Cat().eval()
    with torch.no_grad():
        m.a.bias.copy_(m.a.bias.abs() + 0.1)
        m.b.bias.copy_(m.b.bias.abs() + 0.1)
    mask_rows(m.a, [0, 1, 2, 3])
    mask_rows(m.b, [0, 1, 2, 3])
    x = torch.randn(2, 3, 8, 8)
    small = _assert_compact_equals_masked(m, x)
    assert sorted([small.a.out_channels, small.b.out_channels]) == [4, 5] and small.c.in_channels == 9
    assert len([g for g in small.compaction_report.groups if g.status == "carrier"]) == 1


def test_no_carrier_where_the_padded_conv_does_not_read_the_constants():
    """a's rows 0-2 masked; the zero-padded x has those columns masked too (reads nothing of them), the 1x1 y
    reads them (a bias fold): no carrier is kept, all three rows go."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.x, self.y = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, i):
            h = torch.relu(self.a(i))
            return self.x(h) + self.y(h)

    torch.manual_seed(0)
    m = Two().eval()
    with torch.no_grad():
        m.a.bias.copy_(m.a.bias.abs() + 0.2)
    mask_rows(m.a, [0, 1, 2])
    cols = torch.ones_like(m.x.weight)
    cols[:, :3] = 0
    torch.nn.utils.prune.custom_from_mask(m.x, "weight", cols)
    x = torch.randn(2, 3, 8, 8)
    small = _assert_compact_equals_masked(m, x)
    assert small.a.out_channels == 5
    assert [f.target for f in planner.make_plan(masks.bake(m).eval(), [(x,)])[0].folds] == ["bias"]


def test_a_fold_of_zeros_creates_no_bias():
    """Row 1 of Linear(4,3) masked with bias -0.7: relu gives 0, so the bias-free second layer gets no bias (a
    GLU neuron whose gate row is masked emits 0 the same way: LLaMA's bias-free down_proj stays bias-free)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2, bias=False)).eval()
    with torch.no_grad():
        m[0].bias[1] = -0.7
    mask_rows(m[0], [1])
    x = torch.randn(3, 4)
    work, plan = _plan(m, x)
    assert plan.folds == ()
    small = _assert_compact_equals_masked(m, x)
    assert small[2].bias is None and small[2].in_features == 2
