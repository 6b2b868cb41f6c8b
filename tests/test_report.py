"""report: rows, totals, MACs and text built from a plan; report_of(); plan() and compact() agree."""

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import compactor
from compactor import fold, masks, planner, report, tensors
from compactor.report import LayerRow
from tests.hand_models import Residual, Scaled, Tied, mask_rows




def _mlp() -> nn.Module:
    """Linear(4, 6) -> ReLU -> Linear(6, 2), rows 0 and 3 of the first masked (biases 0.4, 0.2: constants > 0)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    with torch.no_grad():
        m[0].bias[0], m[0].bias[3] = 0.4, 0.2
    mask_rows(m[0], [0, 3])
    return m


def _built(model: nn.Module, x: torch.Tensor, **kw) -> report.Report:
    """report.build as plan() calls it: the baked model's layout, new_shapes, the measured MACs."""
    work = masks.bake(model).eval()
    plan, measured = planner.make_plan(work, tensors.make_batches((x,), 2), **kw)
    return report.build(plan, report.layout(work), fold.new_shapes(work, plan), measured.macs)


def test_build_rows_give_shapes_removed_channels_why_params_and_macs():
    """Rows 0, 3 of Linear(4, 6) masked, input (1, 4): layer 0 is 6x4 -> 4x4 (30 -> 20 params, 24 -> 16 MACs),
    layer 2 is 2x6 -> 2x4 (14 -> 10 params, 12 -> 8 MACs)."""
    r = _built(_mlp(), torch.randn(1, 4))
    assert r.layers == [
        LayerRow("0", "Linear", (6, 4), (4, 4), [0, 3], [], "weight rows all zero", 30, 20, 24, 16),
        LayerRow("2", "Linear", (2, 6), (2, 4), [], [0, 3], "follows 0", 14, 10, 12, 8),
    ]
    assert (r.params_before, r.params_after) == (30 + 14, 20 + 10)
    assert (r.macs_before, r.macs_after) == (4 * 6 + 6 * 2, 4 * 4 + 4 * 2)
    assert r.mode == "exact" and [n.status for n in r.groups] == ["removed"]
    assert r.folded == ["constants of removed channels from 0 -> '2' into its bias"]


def test_conv_macs_by_hand():
    """Conv2d(1, 4, 3) -> Conv2d(4, 2, 1) on 1x1x6x6, channel 1 masked: MACs 4*16*9 + 2*16*4 = 704 -> 3*16*9 + 2*16*3."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    mask_rows(m[0], [1])
    r = _built(m, torch.randn(1, 1, 6, 6))
    assert [(row.macs_before, row.macs_after) for row in r.layers] == [(576, 432), (128, 96)]
    assert (r.macs_before, r.macs_after) == (704, 528)
    assert [(row.params_before, row.params_after) for row in r.layers] == [(40, 30), (10, 8)]


def test_str_has_the_table_header_totals_and_folded_line():
    """str(report): the column header, a dashed rule, the params/MACs line and 'folded: ... into its bias'."""
    text = str(_built(_mlp(), torch.randn(1, 4)))
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "op", "shape", "before", "shape", "after", "removed", "params", "MACs", "why"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split()[:5] == ["0", "Linear", "6x4", "4x4", "out"]
    assert "params 44 -> 30 (68.2%); MACs 36 -> 24 (66.7%); mode=exact" in lines
    assert "folded: constants of removed channels from 0 -> '2' into its bias" in lines


def test_str_lists_kept_channels_with_their_reason():
    """Row 1 of the output layer masked: 'kept: 2 channels [1]: these channels are the model's output'."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    mask_rows(m[2], [1])
    r = _built(m, torch.randn(1, 4))
    assert "kept: 2 channels [1]: these channels are the model's output" in str(r).splitlines()
    assert r.params_after == r.params_before and all(row.removed_out == [] for row in r.layers)


def test_drop_mode_report_has_no_folded_line():
    """mode='drop': the same cuts, 'mode=drop' in the totals line and nothing folded."""
    r = _built(_mlp(), torch.randn(1, 4), mode="drop")
    assert r.folded == [] and "folded:" not in str(r)
    assert "mode=drop" in str(r) and r.params_after == 30


def test_bare_parameter_gets_its_own_row():
    """gamma (6,) sliced with a's rows 0, 3: a 'Parameter' row 6 -> 4, and gamma counted in the totals."""

    torch.manual_seed(0)
    m = Scaled().eval()
    mask_rows(m.a, [0, 3])
    r = _built(m, torch.randn(1, 4))
    [row] = [row for row in r.layers if row.name == "gamma"]
    assert (row.op, row.shape_before, row.shape_after, row.removed_out) == ("Parameter", (6,), (4,), [0, 3])
    assert (row.params_before, row.params_after) == (6, 4)
    assert (r.params_before, r.params_after) == (30 + 14 + 6, 20 + 10 + 4)


def test_layout_counts_a_tied_weight_once():
    """Embedding(10, 6) tied to the output Linear: 60 + 42 parameters, 'o.weight' is an alias, not 60 more."""

    lay = report.layout(Tied())
    assert lay.aliases == frozenset({"o.weight"})
    assert lay.params() == 60 + 36 + 6
    assert lay.layers == {"e": "Embedding", "h": "Linear", "o": "Linear"}


def test_report_of_returns_the_compact_models_report():
    """report_of(compact(m)) is the report compact() attached, with the verified difference within tolerance."""
    m = _mlp()
    x = torch.randn(1, 4)
    small = compactor.compact(m, x)
    r = compactor.report_of(small)
    assert r is small.compaction_report
    assert r.verified_inputs == 3 and r.max_abs_diff <= r.tolerance
    assert r.params_after == sum(p.numel() for p in small.parameters()) == 30
    assert "verified on 3 input(s)" in str(r)


def test_report_of_a_plain_module_raises_type_error_naming_compact():
    """report_of(nn.Linear(2, 2)): TypeError saying it takes a model returned by compactor.compact()."""
    with pytest.raises(TypeError, match=r"Linear carries no compaction report: .*compactor\.compact\(\)"):
        compactor.report_of(nn.Linear(2, 2))


def _scaled_bias_free() -> nn.Module:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3, bias=False)
            self.gamma = nn.Parameter(torch.linspace(0.5, 1.0, 6))
            self.c = nn.Linear(3, 2)

        def forward(self, x):
            return self.c(torch.relu(self.b(self.gamma * torch.relu(self.a(x)))))

    torch.manual_seed(0)
    m = M().eval()
    mask_rows(m.a, [1, 4])
    return m


def _conv_bn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                      nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        m[0].bias.uniform_(0.1, 0.5)
    mask_rows(m[0], [0, 2])
    mask_rows(m[2], [3])
    return m


@pytest.mark.parametrize("make, shape", [(_mlp, (1, 4)), (_scaled_bias_free, (2, 4)), (_conv_bn, (1, 3, 6, 6))],
                         ids=["mlp", "bare-parameter-and-created-bias", "conv-bn-border"])
def test_plan_and_compact_report_the_same_rows_and_params(make, shape):
    """plan() predicts (fold.new_shapes) what compact() measures: equal rows, params and MACs, params went down."""
    m = make()
    x = torch.randn(*shape)
    dry = compactor.plan(m, x)
    done = compactor.report_of(compactor.compact(m, x))
    assert dry.layers == done.layers
    assert (dry.params_before, dry.params_after) == (done.params_before, done.params_after)
    assert (dry.macs_before, dry.macs_after) == (done.macs_before, done.macs_after)
    assert dry.folded == done.folded and [n.status for n in dry.groups] == [n.status for n in done.groups]
    assert done.params_after < done.params_before


def test_sparsity_left_inside_kept_rows_is_reported():
    """Rows 0, 3 masked plus one weight of row 1: the compact 4x4 weight keeps 1 zero of 16, reported as 6.2%."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    mask = torch.ones(6, 4)
    mask[[0, 3]] = 0
    mask[1, 2] = 0
    prune.custom_from_mask(m[0], "weight", mask)
    r = compactor.report_of(compactor.compact(m, torch.randn(1, 4)))
    assert r.sparsity == {"0.weight": 1 / 16}
    assert "sparsity left: 0.weight is 6.2% zeros inside the kept channels" in str(r)


def test_kept_channels_come_with_the_remedy():
    """A residual stream masked in one producer only: the report says how many stayed and what makes masks removable."""
    torch.manual_seed(0)
    m = Residual().eval()
    mask_rows(m.a, [1])
    text = str(compactor.plan(m, torch.randn(2, 3, 5, 5)))
    assert "partial: a, b, c channels [1]" in text
    assert "1 masked channel(s) kept; compactor.prune_channels(model, inputs, amount) makes masks" in text
