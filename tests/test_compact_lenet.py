"""compact() on the seeds' LeNet: hand-built masks, every mask source, the tutorials' workflows."""

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import compactor
from compactor import masks
from compactor.demo import LeNet
from tests.helpers import assert_unchanged, snapshot

# fp32 tolerances: compact sums fewer terms in another order than masked.
TOL = dict(rtol=1e-5, atol=1e-6)


def _lenet() -> nn.Module:
    torch.manual_seed(0)
    m = LeNet()
    with torch.no_grad():  # biases large enough that dropping their constants would show
        for mod in (m.conv1, m.conv2, m.fc1, m.fc2):
            mod.bias.uniform_(0.1, 0.5)
    return m


def _rows_mask(n_out: int, like: torch.Tensor, masked: list[int]) -> torch.Tensor:
    mask = torch.ones_like(like)
    mask[masked] = 0
    return mask


X = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_masked_conv2_channel_2_feeds_fc1_columns_50_to_74():
    """conv2's output channel 2 is masked: fc1 loses columns 50..74 and absorbs relu(conv2.bias[2]) over them."""
    m = _lenet()
    prune.custom_from_mask(m.conv2, "weight", _rows_mask(16, m.conv2.weight, [2]))
    c = compactor.compact(m, X)
    assert (c.conv2.out_channels, c.fc1.in_features) == (15, 375)
    keep = [i for i in range(400) if not 50 <= i < 75]
    torch.testing.assert_close(c.fc1.weight, m.fc1.weight[:, keep])
    const = torch.relu(m.conv2.bias[2])  # max-pool of a constant map is the constant
    expected_bias = m.fc1.bias + const * m.fc1.weight[:, 50:75].sum(1)
    torch.testing.assert_close(c.fc1.bias, expected_bias, **TOL)
    torch.testing.assert_close(c(X), m(X), **TOL)
    assert compactor.plan(m, X).layers[2].removed_in == list(range(50, 75))


def test_masked_conv1_channels_fold_into_conv2_bias_by_hand():
    """conv1 channels 0 and 4 masked: conv2 bias gains relu(b1[c]) * sum(W2[:, c]) for c in (0, 4)."""
    m = _lenet()
    prune.custom_from_mask(m.conv1, "weight", _rows_mask(6, m.conv1.weight, [0, 4]))
    c = compactor.compact(m, X)
    assert c.conv1.weight.shape == (4, 1, 3, 3) and c.conv2.weight.shape == (16, 4, 3, 3)
    b1 = torch.relu(m.conv1.bias)
    expected = m.conv2.bias + b1[0] * m.conv2.weight[:, 0].sum((1, 2)) + b1[4] * m.conv2.weight[:, 4].sum((1, 2))
    torch.testing.assert_close(c.conv2.bias, expected, **TOL)
    torch.testing.assert_close(c(X), m(X), **TOL)


def test_half_ln_structured_gives_the_issue_shapes_and_equals_masked():
    """The seeds' 50 % ln_structured on conv1, conv2, fc1, fc2: 6->3, 3/8, 200/60, 60/42, fc3 in 42."""
    m = _lenet()
    for name in ("conv1", "conv2", "fc1", "fc2"):
        prune.ln_structured(getattr(m, name), "weight", amount=0.5, n=2, dim=0)
    c = compactor.compact(m, X)
    assert c.conv1.out_channels == 3
    assert (c.conv2.in_channels, c.conv2.out_channels) == (3, 8)
    assert (c.fc1.in_features, c.fc1.out_features) == (200, 60)
    assert (c.fc2.in_features, c.fc2.out_features) == (60, 42)
    assert (c.fc3.in_features, c.fc3.out_features) == (42, 10)
    torch.testing.assert_close(c(X), m(X), **TOL)
    report = c.compaction_report
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    assert report.params_after == sum(p.numel() for p in c.parameters())
    assert report.max_abs_diff <= report.tolerance


def test_dropping_the_constants_would_change_the_output():
    """Why folding matters: drop mode equals the masked model only with the constants zeroed."""
    m = _lenet()
    for name in ("conv1", "conv2", "fc1", "fc2"):
        prune.ln_structured(getattr(m, name), "weight", amount=0.5, n=2, dim=0)
    exact = compactor.compact(m, X)
    dropped = compactor.compact(m, X, mode="drop")
    assert (dropped(X) - m(X)).abs().max() > 1e-2
    torch.testing.assert_close(exact(X), m(X), **TOL)
    assert [p.shape for p in dropped.parameters()] == [p.shape for p in exact.parameters()]


def test_three_mask_sources_give_the_same_compact_model(tmp_path):
    """Live hooks, the saved pruned_model.pth, and prune.remove'd zeros compact to the same function."""
    live = _lenet()
    for name in ("conv1", "conv2", "fc1", "fc2"):
        prune.ln_structured(getattr(live, name), "weight", amount=0.5, n=2, dim=0)
    path = tmp_path / "pruned_model.pth"
    torch.save(live.state_dict(), path)
    from_file = compactor.load_pruned(LeNet, path)
    baked = masks.bake(live)
    outs = [compactor.compact(src, X) for src in (live, from_file, baked)]
    for c in outs:
        assert c.fc1.weight.shape == (60, 200)
        torch.testing.assert_close(c(X), live(X), **TOL)


def test_input_model_is_untouched_including_hooks_and_training_flag():
    m = _lenet().train()
    prune.random_unstructured(m.conv1, "weight", amount=0.3)
    prune.ln_structured(m.conv1, "weight", amount=0.5, n=2, dim=0)
    prune.l1_unstructured(m.fc3, "bias", amount=3)
    prune.ln_structured(m.fc1, "weight", amount=0.5, n=2, dim=0)
    before = snapshot(m)
    c = compactor.compact(m, X)
    assert_unchanged(m, before)
    assert c is not m and not c.training
    assert all(p.data_ptr() not in {q.data_ptr() for q in m.parameters()} for p in c.parameters())


# --- the tutorials' workflows as inputs -------------------------------------------------------


class FooBarPruningMethod(prune.BasePruningMethod):
    """The seeds' custom method: prune every other entry."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        mask.view(-1)[::2] = 0
        return mask


def _local(m):
    prune.random_unstructured(m.conv1, "weight", amount=0.3)
    prune.l1_unstructured(m.conv1, "bias", amount=3)
    prune.ln_structured(m.conv1, "weight", amount=0.5, n=2, dim=0)


def _iterative(m):
    for amount in (0.25, 0.25, 0.25):  # each step prunes a share of what is left
        prune.ln_structured(m.fc1, "weight", amount=amount, n=2, dim=0)
        prune.ln_structured(m.conv2, "weight", amount=amount, n=1, dim=0)


def _loop(m):
    for _, module in m.named_modules():
        if isinstance(module, nn.Conv2d):
            prune.l1_unstructured(module, name="weight", amount=0.2)
        elif isinstance(module, nn.Linear):
            prune.ln_structured(module, name="weight", amount=0.4, n=2, dim=0)


def _global(m):
    params = [(m.conv1, "weight"), (m.conv2, "weight"), (m.fc1, "weight"), (m.fc2, "weight"), (m.fc3, "weight")]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.2)


def _foobar(m):
    FooBarPruningMethod.apply(m.fc3, "bias")
    prune.ln_structured(m.fc2, "weight", amount=0.5, n=2, dim=0)


@pytest.mark.parametrize(
    "workflow, removed",
    [(_local, {"conv1": 3}), (_iterative, {"fc1": 120 - 51, "conv2": 16 - 7}),
     (_loop, {"fc1": 48, "fc2": 34}), (_global, {}), (_foobar, {"fc2": 42})],
    ids=["local", "iterative", "multi-module-loop", "global", "custom-FooBar"],
)
def test_seed_workflows_compact_exactly(workflow, removed):
    """Each tutorial workflow: compact equals masked; layers lose exactly the fully masked rows."""
    m = _lenet()
    workflow(m)
    c = compactor.compact(m, X)
    torch.testing.assert_close(c(X), m(X), **TOL)
    before = dict(LeNet().named_modules())
    for name, n in removed.items():
        got = getattr(c, name).weight.shape[0]
        assert got == before[name].weight.shape[0] - n, name
    if removed:
        assert c.compaction_report.params_after < c.compaction_report.params_before
