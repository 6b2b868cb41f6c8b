"""compactor/probe.py: the hook context manager, channel views, the NaN mapping probe and the measurements."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compactor import probe


def test_hooked_runs_pre_and_post_hooks_and_removes_them_even_on_error():
    """A pre-hook that doubles the input and a post-hook that records the output: both act inside the block,
    several hooks on one module run in order, and none is left after the block, even when it raises."""
    m = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU())
    with torch.no_grad():
        m[0].weight.copy_(torch.eye(2))
    seen = []
    x = torch.tensor([[1.0, -1.0]])
    with probe.hooked(m, {"0": lambda mod, args: (args[0] * 2,)},
                      {"0": [lambda mod, a, o: seen.append(o.clone()), lambda mod, a, o: o + 1]}):
        out = m(x)
    torch.testing.assert_close(seen[0], torch.tensor([[2.0, -2.0]]))
    torch.testing.assert_close(out, torch.tensor([[3.0, 0.0]]))  # relu(2x + 1)
    with pytest.raises(RuntimeError, match="boom"):
        with probe.hooked(m, post={"": lambda mod, a, o: seen.append("model")}):
            raise RuntimeError("boom")
    assert not m[0]._forward_pre_hooks and not m[0]._forward_hooks and not m._forward_hooks
    torch.testing.assert_close(m(x), torch.tensor([[1.0, 0.0]]))


def test_channel_view_puts_a_conv_channels_first_and_a_linear_last_axis_first():
    """(N, C, H, W) for a conv -> (C, N*H*W); (N, L, F) for a linear -> (F, N*L)."""
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    v = probe.channel_view(nn.Conv2d(3, 1, 1), x)
    assert v.shape == (3, 8) and v[1].tolist() == [4.0, 5.0, 6.0, 7.0, 16.0, 17.0, 18.0, 19.0]
    y = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    w = probe.channel_view(nn.Linear(4, 1), y)
    assert w.shape == (4, 6) and w[0].tolist() == [0.0, 4.0, 8.0, 12.0, 16.0, 20.0]


def test_nan_probe_finds_where_a_channel_really_goes():
    """conv0's channel 1 set to NaN reaches conv2's input channel 1 only: expecting {1} passes; expecting {2}
    names conv2 as the layer that read them elsewhere; NaN never reaches the output (cleared at each reader)."""
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = (torch.randn(1, 3, 4, 4),)
    assert probe.nan_probe(m, {"0": {1}}, {"2": {1}}, x) == (set(), False)
    bad, leaked = probe.nan_probe(m, {"0": {1}}, {"2": {2}}, x)
    assert bad == {"2"} and not leaked


def test_measure_records_a_constant_channel_and_the_macs():
    """conv0 row 2 zeroed with bias 0.5: conv2 reads relu(0.5) on channel 2 at every position of every batch
    (not varying), channel 0 varies; MACs per sample: 16 * 3 * 4 + 16 * 4 * 2."""
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        m[0].weight[2] = 0
        m[0].bias[2] = 0.5
    batches = [(torch.randn(2, 3, 4, 4),), (torch.randn(2, 3, 4, 4),)]
    measured = probe.measure(m, {"2": [0, 2]}, batches)
    values, varying = measured.stats["2"].query([0, 2])
    assert varying == [0] and float(values[1]) == 0.5
    assert measured.macs == {"0": 16 * 3 * 4, "2": 16 * 4 * 2}
    assert len(measured.outputs) == 2
