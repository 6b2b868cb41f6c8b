"""Data-aware importance: "activation" and "taylor" scores hand-worked on a tiny model, the model left as it was,
and compact() removing what they masked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compactor
from tests.helpers import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny() -> tuple[nn.Module, torch.Tensor]:
    """x = [1, 10] (twice) -> fc1 rows [1, 0], [0, 1], [3, 0] -> h = ReLU = [1, 10, 3] -> fc2 = [1, 1, 0.1] . h.

    Per hidden unit j:
    - l2 of its fc1 row: 1, 1, 3 (unit 0 goes first);
    - activation, rms(h_j) * |fc2[:, j]|: 1 * 1, 10 * 1, 3 * 0.1 = 1, 10, 0.3 (unit 2 goes);
    - taylor with loss = sum of outputs: d loss / d fc1[j] = fc2[j] * x per sample, so sum(grad * weight) over the
      row and both samples = 2 * fc2[j] * h_j = 2, 20, 0.6 (unit 2 goes).
    """
    net = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]]))
        net[2].weight.copy_(torch.tensor([[1.0, 1.0, 0.1]]))
    return net.eval(), torch.tensor([[1.0, 10.0], [1.0, 10.0]])


def _masked_unit(net: nn.Module) -> list[int]:
    return torch.nonzero((net[0].weight_mask == 0).all(1)).flatten().tolist()


@pytest.mark.parametrize("importance, unit, score", [("l2", 0, 1.0), ("activation", 2, 0.3), ("taylor", 2, 0.6)])
def test_each_criterion_scores_as_worked_by_hand(importance, unit, score):
    net, x = _tiny()
    loss = {"loss_fn": lambda model, batch: model(batch).sum()} if importance == "taylor" else {}
    report = compactor.prune_channels(net, x, 1, importance=importance, calibration=[x], **loss)
    assert _masked_unit(net) == [unit]
    (group,) = [g for g in report.groups if g.masked]
    assert group.score == pytest.approx(score, rel=1e-6)
    if importance != "l2":
        assert report.calibration[0] == 1


def test_the_calibration_batches_are_read_up_to_max_batches():
    net, x = _tiny()
    seen = []

    def batches():
        for i in range(10):
            seen.append(i)
            yield x

    report = compactor.prune_channels(net, x, 1, importance="activation", calibration=batches(), max_batches=3)
    assert report.calibration[0] == 3 and seen == [0, 1, 2]  # no batch read beyond max_batches


def test_scoring_leaves_the_model_as_it_was():
    """Gradients, requires_grad, train / eval flags and every tensor: unchanged (amount 0 masks nothing)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).train()
    net[0].weight.requires_grad_(False)
    x = torch.randn(4, 3, 10, 10)
    before = snapshot(net)
    for importance in ("activation", "taylor"):
        compactor.prune_channels(net, x, 0, importance=importance, calibration=[x, x],
                                 loss_fn=lambda model, batch: model(batch).pow(2).mean())
        assert_unchanged(net, before)
        assert all(p.grad is None for p in net.parameters())


def test_taylor_needs_a_loss_for_a_model_without_one():
    net, x = _tiny()
    with pytest.raises(compactor.CompactionError, match="importance='taylor' needs loss_fn="):
        compactor.prune_channels(net, x, 1, importance="taylor")


@pytest.mark.parametrize("importance", ["activation", "taylor"])
def test_a_cnn_pruned_by_measured_importance_compacts_entirely_and_exactly(importance):
    """A residual CNN (BatchNorm, a projection shortcut) with labels: every masked unit goes."""
    from compactor.testing.zoo import ResNetBasicSmall

    torch.manual_seed(0)
    net = ResNetBasicSmall().eval()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    kwargs = {"calibration": [b[0] for b in batches]} if importance == "activation" else {
        "calibration": batches, "loss_fn": lambda model, batch: F.cross_entropy(model(batch[0]), batch[1])}
    report = compactor.prune_channels(net, x, 0.5, importance=importance, **kwargs)
    masked = sum(g.masked for g in report.groups)
    small = compactor.compact(net, x)
    assert masked > 0 and [g for g in small.compaction_report.groups if g.status != "removed"] == []
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), rtol=1e-5, atol=1e-5)


def test_measured_importance_works_with_global_scope_and_round_to():
    """scope="global" ranks the measured scores across groups (normalized per group); round_to=4 keeps every
    width a multiple of 4; compaction removes every masked unit."""
    from compactor.testing.zoo import ResNetBasicSmall

    torch.manual_seed(0)
    net = ResNetBasicSmall().eval()
    x = torch.randn(8, 3, 16, 16)
    compactor.prune_channels(net, x, 0.4, importance="activation", calibration=[x[:4], x[4:]], scope="global",
                             round_to=4)
    small = compactor.compact(net, x)
    assert [g for g in small.compaction_report.groups if g.status != "removed"] == []
    widths = [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 4 == 0 for w in widths) and sum(widths) < sum(m.out_channels for m in net.modules()
                                                                   if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), rtol=1e-5, atol=1e-5)
