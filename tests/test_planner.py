"""The planner's stages (select, round_widths, restrict_grouped, place_folds, cut_layers) on hand-masked models.

Each test masks rows (or columns) with prune.custom_from_mask, bakes the masks as compact() does
(masks.bake(model).eval()) and reads the plan: the notes, cuts, folds it decides. compact() on whole
models, where a naive planner would return a wrong or larger model, is in test_compact_cases.py.
"""

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import compactor
from compactor import graph, masks, planner, tensors
from compactor.errors import CompactionError
from compactor.planner import Cut, GroupNote
from tests.hand_models import Residual, Scaled, Tied, mask_rows


def _dead_cols(module: nn.Module, cols: list[int]) -> None:
    mask = torch.ones_like(module.weight)
    mask[:, cols] = 0
    prune.custom_from_mask(module, "weight", mask)


def _plan(model: nn.Module, *example, **kw):
    """(baked model, plan) as compact() makes them: bake, eval, the example plus 2 random batches."""
    work = masks.bake(model).eval()
    plan, _ = planner.make_plan(work, tensors.make_batches(tuple(example), 2), **kw)
    return work, plan


def _kept_alone(m: nn.Module, x: torch.Tensor) -> str:
    """Plan ``m``: nothing is cut and the one note keeps channel 1; returns its reason."""
    _, plan = _plan(m, x)
    assert dict(plan.cuts) == {}
    [note] = plan.notes
    assert (note.channels, note.status) == ([1], "kept")
    return note.reason


def _mlp(hidden: int = 6, out: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, out)).eval()


def test_residual_masked_in_one_producer_only_is_partial_and_kept():
    """a(x) + b(x) with row 1 of a masked, b unmasked: channel 1 is not constant, so the note says 'partial', no cut."""
    torch.manual_seed(0)
    m = Residual().eval()
    mask_rows(m.a, [1])
    _, plan = _plan(m, torch.randn(2, 3, 5, 5))
    assert plan.notes == (GroupNote(layers=["a", "b", "c"], channels=[1], status="partial",
                                    reason="masked in some but not all of the layers that compute or read them; kept"),)
    assert dict(plan.cuts) == {} and plan.folds == ()
    assert plan.any_masked


def test_residual_masked_in_both_producers_is_removed_from_a_b_and_c():
    """a(x) + b(x) with row 1 masked in both: a and b lose output 1, c loses input 1 and takes the constant in its bias."""
    torch.manual_seed(0)
    m = Residual().eval()
    with torch.no_grad():
        m.a.bias[1], m.b.bias[1] = 0.3, 0.2  # relu(0.5): a constant to fold
    mask_rows(m.a, [1])
    mask_rows(m.b, [1])
    x = torch.randn(2, 3, 5, 5)
    _, plan = _plan(m, x)
    assert plan.cuts["a"] == Cut(name="a", out=(1,), why="weight rows all zero")
    assert plan.cuts["b"] == Cut(name="b", out=(1,), why="weight rows all zero")
    assert plan.cuts["c"] == Cut(name="c", inputs=(1,), why="follows a")
    [f] = plan.folds
    const = torch.relu(m.a.bias[1] + m.b.bias[1]).double()  # what channel 1 holds everywhere
    assert (f.layer, f.target) == ("c", "bias")
    torch.testing.assert_close(f.values, const * m.c.weight[:, 1, 0, 0].double())
    assert [n.status for n in plan.notes] == ["removed"]
    small = compactor.compact(m, x)
    torch.testing.assert_close(small(x), m(x))
    assert (small.a.out_channels, small.b.out_channels, small.c.in_channels) == (3, 3, 3)


def test_output_layer_rows_are_kept_as_the_models_output():
    """Row 1 of the last Linear masked: its output is the model's output, so it is kept with that reason."""
    m = _mlp()
    mask_rows(m[2], [1])
    _, plan = _plan(m, torch.randn(2, 4))
    assert plan.notes == (GroupNote(layers=["2"], channels=[1], status="kept",
                                    reason="these channels are the model's output"),)
    assert dict(plan.cuts) == {}


def test_layernorm_normalized_stream_is_kept_with_the_layernorm_reason():
    """Linear -> LayerNorm -> Linear, row 1 masked: LayerNorm mixes channels, so channel 1 is kept, the note names it."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)).eval()
    mask_rows(m[0], [1])
    _, plan = _plan(m, torch.randn(2, 4))
    assert plan.notes == (GroupNote(layers=["0", "2"], channels=[1], status="kept",
                                    reason="1: LayerNorm normalizes across channels"),)
    assert dict(plan.cuts) == {}


def test_round_to_keeps_the_highest_masked_channel_to_reach_a_multiple():
    """8 wide, 5 masked, round_to=4: width 3 rounds up to 4, so the highest masked channel (7) is kept, 4 go."""
    m = _mlp(hidden=8)
    mask_rows(m[0], [1, 3, 4, 6, 7])
    _, plan = _plan(m, torch.randn(2, 4), round_to=4)
    assert plan.cuts["0"].out == (1, 3, 4, 6) and plan.cuts["2"].inputs == (1, 3, 4, 6)
    kept = [n for n in plan.notes if n.status == "kept"]
    assert kept == [GroupNote(layers=["0", "2"], channels=[7], status="kept",
                              reason="round_to=4: widths kept at a multiple")]
    assert plan.round_to == 4


def test_round_to_keeps_every_masked_channel_when_the_next_multiple_is_the_full_width():
    """8 wide, 3 masked, round_to=4: width 5 rounds up to 8, so all 3 masked channels are kept."""
    m = _mlp(hidden=8)
    mask_rows(m[0], [1, 4, 6])
    _, plan = _plan(m, torch.randn(2, 4), round_to=4)
    assert dict(plan.cuts) == {}
    assert plan.notes == (GroupNote(layers=["0", "2"], channels=[1, 4, 6], status="kept",
                                    reason="round_to=4: widths kept at a multiple"),)


def test_round_widths_stage_on_a_ledger():
    """select() makes rows 1,3,4,6,7 of 8 candidates; round_widths(ledger, 4) takes back 7 only, with a note."""
    m = _mlp(hidden=8)
    mask_rows(m[0], [1, 3, 4, 6, 7])
    work = masks.bake(m).eval()
    groups, _ = graph.trace(work, (torch.randn(2, 4),))
    ledger = planner.select(groups, set())
    gi = next(i for i, g in enumerate(groups) if g.root == "0")
    assert ledger.cand == {gi: {1, 3, 4, 6, 7}} and ledger.notes == []
    planner.round_widths(ledger, 4)
    assert ledger.cand[gi] == {1, 3, 4, 6}
    assert ledger.notes == [GroupNote(layers=["0", "2"], channels=[7], status="kept",
                                      reason="round_to=4: widths kept at a multiple")]
    planner.round_widths(ledger, 2)  # width 4 is already even: nothing more is kept
    assert ledger.cand[gi] == {1, 3, 4, 6} and len(ledger.notes) == 1


def _grouped() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(),
                      nn.Conv2d(6, 2, 1)).eval()
    with torch.no_grad():
        m[0].bias.uniform_(0.1, 0.5)
        m[2].bias.uniform_(0.1, 0.5)
    return m


def test_grouped_conv_removes_a_whole_group_and_keeps_a_partial_one():
    """groups=2 conv (4 -> 6, 2 inputs / 3 outputs per group): inputs 0,1 and outputs 0,1,2 masked go (group 0);
    input 2 masked alone is half of group 1, so it is kept with the grouped-conv note."""
    m = _grouped()
    mask_rows(m[0], [0, 1, 2])
    mask_rows(m[2], [0, 1, 2])
    x = torch.randn(2, 3, 8, 8)
    _, plan = _plan(m, x)
    assert plan.cuts["0"].out == (0, 1)
    assert (plan.cuts["2"].out, plan.cuts["2"].inputs) == ((0, 1, 2), (0, 1))
    assert plan.cuts["4"].inputs == (0, 1, 2)
    kept = [n for n in plan.notes if n.status == "kept"]
    assert kept == [GroupNote(layers=["0", "2"], channels=[2], status="kept",
                              reason="grouped conv 2: only whole groups (inputs and outputs) can go")]
    small = compactor.compact(m, x)
    assert (small[2].groups, small[2].in_channels, small[2].out_channels) == (1, 2, 3)
    torch.testing.assert_close(small(x), m(x))


def test_grouped_conv_outputs_masked_without_their_inputs_are_kept():
    """Outputs 0..3 of the groups=2 conv masked, its inputs not: no whole group (inputs and outputs) is masked."""
    m = _grouped()
    mask_rows(m[2], [0, 1, 2, 3])
    _, plan = _plan(m, torch.randn(2, 3, 8, 8))
    assert dict(plan.cuts) == {}
    assert [(n.channels, n.status, n.reason) for n in plan.notes] == [
        ([0, 1, 2, 3], "kept", "grouped conv 2: only whole groups (inputs and outputs) can go")]


def test_note_on_grouped_conv_outputs_names_the_grouped_conv():
    """Outputs 0..3 of grouped conv '2' kept: the note (printed 'kept: <layers> channels ...') names layer '2'."""
    m = _grouped()
    mask_rows(m[2], [0, 1, 2, 3])
    _, plan = _plan(m, torch.randn(2, 3, 8, 8))
    [note] = plan.notes
    assert "2" in note.layers


def test_tied_weights_keep_the_channels_with_a_note():
    """h's row 2 feeds o, whose weight is the embedding's: the channel is kept, the note says slicing would untie."""

    torch.manual_seed(0)
    m = Tied().eval()
    mask_rows(m.h, [2])
    work = masks.bake(m).eval()
    assert planner.tied_layers(work) == {"e", "o"}
    plan, _ = planner.make_plan(work, tensors.make_batches((torch.randint(0, 10, (2, 5)),), 2))
    assert plan.notes == (GroupNote(layers=["h", "o"], channels=[2], status="kept",
                                    reason="o: weights tied with another layer; slicing would untie them"),)
    assert dict(plan.cuts) == {}


def test_bare_parameter_is_cut_along_its_channel_dim():
    """b(gamma * relu(a(x))), rows 0 and 3 of a masked: gamma (6,) loses entries 0 and 3 on dim 0, b columns 0 and 3."""

    torch.manual_seed(0)
    m = Scaled().eval()
    with torch.no_grad():
        m.a.bias.fill_(0.4)
    mask_rows(m.a, [0, 3])
    x = torch.randn(3, 4)
    _, plan = _plan(m, x)
    assert plan.cuts["gamma"] == Cut(name="gamma", out=(0, 3), why="follows a", parameter_dim=0)
    assert plan.cuts["a"].out == (0, 3) and plan.cuts["b"].inputs == (0, 3)
    [f] = plan.folds  # b absorbs gamma[c] * relu(0.4) * b.weight[:, c] for c in (0, 3)
    g = m.gamma.detach().double()
    want = 0.4 * (g[0] * m.b.weight[:, 0].double() + g[3] * m.b.weight[:, 3].double())
    torch.testing.assert_close(f.values, want, rtol=1e-6, atol=1e-7)
    small = compactor.compact(m, x)
    torch.testing.assert_close(small.gamma, m.gamma[[1, 2, 4, 5]])
    torch.testing.assert_close(small(x), m(x))


def test_plan_is_frozen():
    """Plan, Cut and GroupNote are frozen dataclasses; cuts and dropped are read-only mappings."""
    m = _mlp()
    mask_rows(m[0], [1])
    _, plan = _plan(m, torch.randn(2, 4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.mode = "drop"
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.cuts["0"].out = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.notes[0].status = "kept"
    with pytest.raises(TypeError):
        plan.cuts["0"] = Cut(name="0")
    with pytest.raises(TypeError):
        plan.dropped["2"] = (1,)
    assert isinstance(plan.folds, tuple) and isinstance(plan.notes, tuple)


def test_drop_mode_lists_the_dropped_inputs_and_folds_nothing():
    """mode='drop', rows 1 and 2 masked: plan.dropped == {'2': (1, 2)}, no folds; exact mode folds instead."""
    m = _mlp()
    with torch.no_grad():
        m[0].bias.fill_(0.5)
    mask_rows(m[0], [1, 2])
    _, drop = _plan(m, torch.randn(2, 4), mode="drop")
    assert drop.mode == "drop" and drop.folds == () and dict(drop.dropped) == {"2": (1, 2)}
    assert drop.cuts["0"].out == (1, 2) and drop.cuts["2"].inputs == (1, 2)
    _, exact = _plan(m, torch.randn(2, 4))
    assert dict(exact.dropped) == {} and [(f.layer, f.target) for f in exact.folds] == [("2", "bias")]
    assert dict(exact.cuts) == dict(drop.cuts)


def test_columns_no_consumer_reads_go_without_a_fold():
    """Columns 1 and 4 of the second Linear masked (the first is unmasked): channels 1, 4 go, nothing is folded."""
    m = _mlp()
    _dead_cols(m[2], [1, 4])
    x = torch.randn(2, 4)
    _, plan = _plan(m, x)
    assert plan.cuts["0"].out == (1, 4) and plan.cuts["2"].inputs == (1, 4)
    assert plan.folds == ()
    small = compactor.compact(m, x)
    torch.testing.assert_close(small[2].bias, m[2].bias)  # unread channels leave no constant behind
    torch.testing.assert_close(small(x), m(x))


def test_why_of_an_unread_producer_does_not_claim_zero_rows():
    """Only the consumer's columns 1, 4 are masked: the first Linear's rows 1, 4 are not zero, its why must not say so."""
    m = _mlp()
    _dead_cols(m[2], [1, 4])
    work, plan = _plan(m, torch.randn(2, 4))
    assert bool(work[0].weight[[1, 4]].ne(0).any())
    assert "weight rows all zero" not in plan.cuts["0"].why


def test_channel_that_varies_at_zero_padded_pooling_is_kept():
    """A masked channel (constant 0.5) through AvgPool2d(3, padding=1) is smaller at the border: kept, not constant."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AvgPool2d(3, 1, padding=1), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        m[0].bias.fill_(0.5)
    mask_rows(m[0], [1])
    assert _kept_alone(m, torch.randn(2, 3, 6, 6)).startswith("not constant where '3' reads them")


def test_channel_shuffle_fails_the_mapping_probe_and_is_kept():
    """A channel shuffle (view / transpose / reshape) moves channel 1 to 2: the NaN probe catches it, channel kept."""

    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            n, c, h, w = y.shape
            return self.c(y.view(n, 2, 2, h, w).transpose(1, 2).reshape(n, 4, h, w))

    torch.manual_seed(0)
    m = Shuffle().eval()
    mask_rows(m.a, [1])
    assert _kept_alone(m, torch.randn(2, 3, 4, 4)).startswith("the traced channel mapping did not hold")


def test_select_refuses_a_layer_left_with_no_channel():
    """All 3 rows of the first Linear masked: select() raises CompactionError naming the layer and the count."""
    m = _mlp(hidden=3)
    mask_rows(m[0], [0, 1, 2])
    work = masks.bake(m).eval()
    groups, _ = graph.trace(work, (torch.randn(2, 4),))
    with pytest.raises(CompactionError, match=r"layer '0': the masks remove all 3 of its output channels"):
        planner.select(groups, set())


def test_dead_rows_and_zero_columns_read_the_weights():
    """dead_rows: rows whose every weight is 0 (conv: over in x kH x kW); zero_columns: inputs no output reads."""
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight[1].zero_()
        conv.weight[2, :, 0, 0] = 0  # partly zero: not dead
        conv.weight[:, 2].zero_()
    assert planner.dead_rows(conv).tolist() == [False, True, False, False]
    assert planner.zero_columns(conv).tolist() == [False, False, True]
    emb = nn.Embedding(5, 3)
    with torch.no_grad():
        emb.weight[:, 1] = 0  # an embedding's channels are its columns
    assert planner.dead_rows(emb).tolist() == [False, True, False]


def test_restrict_grouped_then_cut_layers_on_a_ledger():
    """select() proposes conv0 rows {0,1,2} and grouped conv2 rows {0,1,2}; restrict_grouped takes back conv0's 2
    (half of conv2's group 1); cut_layers then gives conv0 out (0,1), conv2 out (0,1,2) in (0,1), conv4 in (0,1,2)."""
    m = _grouped()
    mask_rows(m[0], [0, 1, 2])
    mask_rows(m[2], [0, 1, 2])
    work = masks.bake(m).eval()
    groups, _ = graph.trace(work, (torch.randn(1, 3, 8, 8),))
    ledger = planner.select(groups, set())
    by_root = {groups[gi].root: gi for gi in ledger.cand}
    assert {r: ledger.cand[gi] for r, gi in by_root.items()} == {"0": {0, 1, 2}, "2": {0, 1, 2}}
    planner.restrict_grouped(ledger)
    assert ledger.cand[by_root["0"]] == {0, 1} and ledger.cand[by_root["2"]] == {0, 1, 2}
    assert [(n.channels, n.status) for n in ledger.notes] == [([2], "kept")]
    cuts = planner.cut_layers(ledger)
    assert cuts == {"0": Cut(name="0", out=(0, 1), why="weight rows all zero"),
                    "2": Cut(name="2", out=(0, 1, 2), inputs=(0, 1), why="weight rows all zero"),
                    "4": Cut(name="4", inputs=(0, 1, 2), why="follows 2")}
    assert sorted(n.status for n in ledger.notes) == ["kept", "removed", "removed"]


