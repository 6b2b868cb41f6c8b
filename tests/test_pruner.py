"""prune_channels: masks chosen per coupled group, which compact() then removes entirely."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

import compactor
from compactor.testing import zoo
from tests.hand_models import Residual

RTOL, ATOL = 1e-5, 1e-5


def _masked_rows(model: nn.Module) -> dict[str, list[int]]:
    """Per layer with a mask, the output rows (Embedding: columns) whose mask is all zero."""
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "weight_mask") and not isinstance(m, nn.modules.batchnorm._BatchNorm):
            mask = m.weight_mask.t() if isinstance(m, nn.Embedding) else m.weight_mask
            rows = torch.nonzero(~mask.flatten(1).bool().any(1)).flatten().tolist()
            if rows:
                out[name] = rows
    return out


def _removed_everything(model: nn.Module, example: tuple) -> nn.Module:
    """compact() removes exactly the masked rows, keeps nothing masked, and equals the masked model."""
    small = compactor.compact(model, example)
    report = compactor.report_of(small)
    assert [g for g in report.groups if g.status != "removed"] == []
    removed = {r.name: r.removed_out for r in report.layers if r.removed_out and r.op != "Parameter"
               and not r.op.startswith("BatchNorm")}
    assert removed == _masked_rows(model)
    with torch.no_grad():
        torch.testing.assert_close(small(*example), model(*example), rtol=RTOL, atol=ATOL)
    assert report.params_after < report.params_before
    return small


def test_a_residual_stream_is_masked_on_the_same_channels_in_every_producer():
    """relu(a(x) + b(x)) -> c: a and b write one stream; the 2 weakest channels by the joint l2 norm of a's and b's
    rows go from both, and compact() removes them."""
    torch.manual_seed(0)
    m = Residual().eval()
    with torch.no_grad():
        m.a.weight.mul_(torch.tensor([1.0, 0.1, 1.0, 0.2])[:, None, None, None])
        m.b.weight.mul_(torch.tensor([1.0, 0.1, 1.0, 0.2])[:, None, None, None])
    x = torch.randn(2, 3, 5, 5)
    report = compactor.prune_channels(m, x, 0.5)
    assert _masked_rows(m) == {"a": [1, 3], "b": [1, 3]}
    [g] = [g for g in report.groups if g.masked]
    assert (g.layers, g.units, g.masked, g.channels) == (("a", "b"), 4, 2, 4)
    small = _removed_everything(m, (x,))
    assert small.c.in_channels == 2


def test_importance_is_the_joint_norm_of_every_producer_row():
    """Scores by hand: channel r of the stream scores ||a.w[r]||_2 over a and b together (l2), or the sum of |w| (l1)."""
    torch.manual_seed(0)
    m = Residual().eval()
    with torch.no_grad():
        m.a.weight.copy_(torch.tensor([3.0, 1.0, 0.0, 2.0])[:, None, None, None].expand(4, 3, 1, 1))
        m.b.weight.copy_(torch.tensor([0.0, 0.5, 4.0, 0.1])[:, None, None, None].expand(4, 3, 1, 1))
    # l2: sqrt(3 * (a^2 + b^2)) -> [5.2, 1.9, 6.9, 3.5]: channel 1 goes first; l1: 3 * (|a| + |b|) -> [9, 4.5, 12, 6.3]
    x = torch.randn(2, 3, 5, 5)
    r2 = compactor.prune_channels(m, x, 1)
    assert _masked_rows(m) == {"a": [1], "b": [1]}
    assert [g.score for g in r2.groups if g.masked] == [pytest.approx((3 * (1.0 + 0.25)) ** 0.5)]
    m2 = Residual().eval()
    m2.load_state_dict({k.replace("_orig", ""): v for k, v in m.state_dict().items() if not k.endswith("_mask")})
    r1 = compactor.prune_channels(m2, x, 1, importance="l1")
    assert [g.score for g in r1.groups if g.masked] == [pytest.approx(3 * 1.5)]
    calls = []
    m3 = Residual().eval()
    compactor.prune_channels(m3, x, 1, importance=lambda rows: calls.append(len(rows)) or float(rows[0].sum()))
    assert calls and set(calls) == {2}  # one tensor of rows per producer, a and b


def test_grouped_convs_lose_whole_conv_groups_inputs_and_outputs_together():
    """conv 1x1 (8) -> grouped 3x3 (8 -> 8, groups=4) -> 1x1: a unit is one conv group (2 inputs + 2 outputs);
    half of the groups go, so the grouped conv keeps 2 groups and compact() removes everything masked."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4),
                      nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    zoo.randomize_(m)
    x = torch.randn(2, 3, 6, 6)
    report = compactor.prune_channels(m, x, 0.5)
    rows = _masked_rows(m)
    assert len(rows["0"]) == len(rows["3"]) == 4
    assert {r // 2 for r in rows["0"]} == {r // 2 for r in rows["3"]}  # the same two conv groups on both sides
    assert [(g.units, g.masked) for g in report.groups if g.masked] == [(4, 2)]
    small = _removed_everything(m, (x,))
    assert small[3].groups == 2


def test_what_compaction_must_keep_is_never_masked():
    """The output layer, a LayerNorm-normalized stream and the layers in ignore are left alone, with the reason."""
    torch.manual_seed(0)

    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()

    x = torch.randn(5, 4)
    m = net()
    report = compactor.prune_channels(m, x, 0.5)
    assert list(_masked_rows(m)) == ["2"]  # the only group compact() can remove: 2 -> relu -> 4
    [(layers, why)] = report.skipped
    assert "0" in layers and why == "1: LayerNorm normalizes across channels"
    m = net()
    with pytest.raises(compactor.CompactionError, match=r"found nothing it can mask.*Not pruned: 2, 4: 4: in ignore; "
                                                        r"0, 2: 1: LayerNorm normalizes across channels"):
        compactor.prune_channels(m, x, 0.5, ignore=[m[4]])
    assert _masked_rows(m) == {}


def test_masks_stack_with_earlier_ones_and_behave_like_torch_masks():
    """An earlier unstructured mask stays (PruningContainer), prune.remove bakes the product, the state_dict has
    weight_orig / weight_mask, and load_pruned + compact() removes the rows."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    prune.random_unstructured(m[0], "weight", amount=0.2)
    first = m[0].weight_mask.clone()
    x = torch.randn(2, 3, 8, 8)
    compactor.prune_channels(m, x, 0.25)
    assert type(m[0]._forward_pre_hooks[next(iter(m[0]._forward_pre_hooks))]).__name__ == "PruningContainer"
    assert bool((m[0].weight_mask <= first).all()) and len(_masked_rows(m)["0"]) == 2
    state = m.state_dict()
    assert {"0.weight_orig", "0.weight_mask"} <= set(state)
    again = compactor.load_pruned(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)), state)
    assert compactor.compact(again.eval(), x)[0].out_channels == 6
    prune.remove(m[0], "weight")
    assert int((m[0].weight.flatten(1).abs().sum(1) == 0).sum()) == 2


def test_global_scope_ranks_across_groups_and_max_amount_caps_each():
    """scope='global': 50 % of all units, but a layer of tiny weights is not emptied (scores divided by each
    group's mean); max_amount=0.5 caps every group at half."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        m[0].weight.mul_(1e-3)
    x = torch.randn(5, 4)
    report = compactor.prune_channels(m, x, 0.5, scope="global", max_amount=0.5)
    assert sum(g.masked for g in report.groups) == 8
    assert all(g.masked <= g.units // 2 for g in report.groups)
    _removed_everything(m, (x,))


def test_round_to_leaves_widths_at_a_multiple():
    """Linear(4, 12) at amount 0.3 (3.6 of 12 units) with round_to=4: 4 masked, 8 remain."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 2)).eval()
    compactor.prune_channels(m, torch.randn(5, 4), 0.3, round_to=4)
    assert len(_masked_rows(m)["0"]) == 4


@pytest.mark.parametrize("bad, match", [
    (dict(amount=1.5), "amount=1.5 should be a float in"), (dict(amount=-1), "amount=-1"),
    (dict(scope="layer"), "scope='layer'"), (dict(importance="l3"), "importance='l3'"),
    (dict(round_to=0), "round_to=0"), (dict(max_amount=2.0), "max_amount=2.0"),
    (dict(ignore=["nope"]), "ignore names 'nope'"),
])
def test_bad_arguments_name_the_argument(bad, match):
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    args = {"amount": 0.5, **bad}
    with pytest.raises(ValueError, match=match):
        compactor.prune_channels(m, torch.randn(3, 4), args.pop("amount"), **args)
    assert _masked_rows(m) == {}


@pytest.mark.timeout(240)
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(zoo.NAMES), st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9]), st.sampled_from(["local", "global"]))
def test_over_the_zoo_compact_removes_every_masked_row(name, amount, scope):
    """The property that matters: whatever prune_channels masks, compact() removes entirely, exactly."""
    model, x = zoo.build(name)
    try:
        compactor.prune_channels(model, x, amount, scope=scope)
    except compactor.CompactionError as exc:  # a zoo model whose channels all have to stay (a channel shuffle)
        assert "found nothing it can mask" in str(exc) and _masked_rows(model) == {}
        return
    if _masked_rows(model):  # (amounts too small to mask a unit of a small group: nothing to remove)
        _removed_everything(model, x)


def test_nothing_maskable_raises_with_each_group_and_why_and_leaves_the_model_alone():
    """Linear -> LayerNorm -> Linear: the only group runs through a LayerNorm (it normalizes across channels), so
    prune_channels masks nothing: it raises naming the group and the reason, and adds no mask."""
    m = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    with pytest.raises(compactor.CompactionError, match=r"found nothing it can mask in Sequential.*Not pruned: 0, 2: "
                                                        r"1: LayerNorm normalizes across channels"):
        compactor.prune_channels(m, torch.randn(2, 4), 0.5)
    assert not any(hasattr(mod, "weight_mask") for mod in m.modules())


def test_l2_scores_a_conv_row_as_its_batchnorm_scales_it():
    """conv rows 0 and 1 have equal norms, but bn scales channel 0 by 0.1 / sqrt(1 + eps) and channel 1 by 2: with
    one unit to mask, channel 0 goes (what it contributes after the BatchNorm is smaller); a callable importance
    still sees the plain rows."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        m[0].weight.copy_(torch.ones_like(m[0].weight))
        m[0].weight[2:] *= 5.0  # channels 2, 3: larger rows, unit BN scale
        m[1].weight.copy_(torch.tensor([0.1, 2.0, 1.0, 1.0]))
        m[1].running_var.fill_(1.0)
    x = torch.randn(2, 3, 6, 6)
    compactor.prune_channels(m, x, 1)
    assert _masked_rows(m) == {"0": [0]}
    seen = []
    m2 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        m2[0].weight.fill_(1.0)
        m2[1].weight.fill_(3.0)
    compactor.prune_channels(m2, x, 1, importance=lambda rows: seen.append(float(rows[0].abs().max())) or 1.0)
    assert set(seen) == {1.0}


def test_heads_on_a_model_without_attention_raises_and_masks_nothing():
    """heads=0.5 on a CNN: no attention module is recognized, so prune_channels says so instead of masking the
    channels alone and reporting success."""
    model, x = zoo.build("vgg")
    with pytest.raises(compactor.CompactionError, match=r"heads=0.5, but .* has no attention module"):
        compactor.prune_channels(model, x, 0.5, heads=0.5)
    assert _masked_rows(model) == {}


@pytest.mark.parametrize("name", ["resnet_basic", "vit", "gqa", "grouped"])
def test_bake_zeroes_what_the_masks_would_and_holds_no_mask(name):
    """bake=True: the same rows (and BatchNorm channels, heads' columns) as masks would zero, zeroed in the tensors
    themselves: no mask buffer or hook, the training flag and every other entry untouched, outputs equal to the
    masked model's; compact(inplace=True) then removes them to the same widths."""
    model, x = zoo.build(name)
    masked, baked = copy.deepcopy(model), copy.deepcopy(model)
    baked.train()
    compactor.prune_channels(masked, x, 0.5)  # (heads: tests/integration/test_streaming.py, through prune_pretrained)
    compactor.prune_channels(baked, x, 0.5, bake=True)
    assert not any(n.endswith(("_mask", "_orig")) for n, _ in baked.named_buffers())
    assert not any(n.endswith("_orig") for n, _ in baked.named_parameters())
    assert not any(m._forward_pre_hooks for m in baked.modules())
    assert baked.training
    baked.eval()
    expected = {n: t.detach() for n, t in compactor.masks.bake(masked).state_dict().items()}
    for n, t in baked.state_dict().items():  # zeros exactly where the masks zero, the rest as it was
        torch.testing.assert_close(t, expected[n], rtol=0, atol=0, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(baked(*x), masked(*x), rtol=0, atol=0)
    a = compactor.compact(masked, x)
    b = compactor.compact(baked, x, inplace=True)
    assert [tuple(p.shape) for _, p in sorted(a.named_parameters())] == \
        [tuple(p.shape) for _, p in sorted(b.named_parameters())]
    assert compactor.report_of(b).params_after < compactor.report_of(b).params_before


def test_bake_on_a_model_with_live_masks_zeroes_under_them():
    """An earlier unstructured mask stays live; bake=True zeroes the chosen rows of weight_orig (and of the
    computed weight), so the rows stay zero through the mask's hook."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    prune.random_unstructured(m[0], "weight", amount=0.2)
    first = m[0].weight_mask.clone()
    x = torch.randn(2, 3, 8, 8)
    compactor.prune_channels(m, x, 0.25, bake=True)
    assert torch.equal(m[0].weight_mask, first)  # no new mask
    m(x)  # the hook recomputes weight from weight_orig
    dead = (m[0].weight.flatten(1).abs().sum(1) == 0).nonzero().flatten().tolist()
    assert len(dead) == 2 and (m[0].weight_orig[dead] == 0).all() and (m[0].bias[dead] == 0).all()
    assert compactor.compact(m, x)[0].out_channels == 6
