"""compact() / plan() options: inplace, progress, time_limit; errors name their real cause."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import compactor
from compactor import graph
from compactor.errors import CompactionError


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    mask = torch.ones(6, 4)
    mask[[1, 4]] = 0
    prune.custom_from_mask(net[0], "weight", mask)
    return net


def test_inplace_turns_the_model_itself_into_the_compact_model():
    """inplace=True: the same object comes back, rows 1 and 4 gone, no masks left, outputs as masked."""
    net = _net()
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = net(x)
    params_before = sum(p.numel() for n, p in net.named_parameters())  # weight_orig: the dense size
    small = compactor.compact(net, x, inplace=True)
    assert small is net
    assert small[0].weight.shape == (4, 4) and small[2].weight.shape == (3, 4)
    assert not hasattr(small[0], "weight_mask") and not small[0]._forward_pre_hooks
    torch.testing.assert_close(small(x), expected)
    assert sum(p.numel() for p in small.parameters()) < params_before
    assert compactor.report_of(small).max_abs_diff <= compactor.report_of(small).tolerance


def test_inplace_false_leaves_the_model_masked():
    """The default copies: the user's model keeps its masks and shapes."""
    net = _net()
    compactor.compact(net, torch.randn(5, 4))
    assert net[0].weight.shape == (6, 4) and hasattr(net[0], "weight_mask")


def test_progress_names_each_stage(capsys):
    """progress=True prints one line per stage, on standard error."""
    compactor.compact(_net(), torch.randn(5, 4), progress=True)
    err = capsys.readouterr().err
    for stage in ("reading the masks", "tracing the channel dependencies", "measuring channels on 3 input(s)",
                  "building the compact model", "verifying"):
        assert f"compactor: {stage}:" in err


def test_progress_is_quiet_on_a_fast_run(capsys):
    """The default prints nothing when compaction takes less than 2 s."""
    compactor.compact(_net(), torch.randn(5, 4))
    assert capsys.readouterr().err == ""


def test_time_limit_stops_with_the_stage_it_was_in():
    """time_limit too small for the run: a CompactionError saying where it stopped and what to do."""
    with pytest.raises(CompactionError, match=r"stopped after .* while reading the masks \(time_limit=1e-09 s\)"):
        compactor.compact(_net(), torch.randn(5, 4), time_limit=1e-9)
    with pytest.raises(ValueError, match="time_limit=-1"):
        compactor.plan(_net(), torch.randn(5, 4), time_limit=-1)


def test_running_out_of_memory_while_tracing_says_so(monkeypatch):
    """A MemoryError inside planning is reported as memory, not blamed on the inputs."""
    def exhausted(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(graph, "trace", exhausted)
    with pytest.raises(CompactionError, match="ran out of memory while tracing the channel dependencies"):
        compactor.compact(_net(), torch.randn(5, 4))


def test_a_tracer_failure_names_the_model_and_the_cause(monkeypatch):
    """Any other failure inside tracing: 'could not trace <Model>' with the cause's first line."""
    def broken(*args, **kwargs):
        raise RuntimeError("a shape the tracer did not expect\nmore detail")

    monkeypatch.setattr(graph, "_build", broken)  # inside graph.trace, which raises its own TraceError
    with pytest.raises(CompactionError, match="could not trace Sequential .*: a shape the tracer did not expect$"):
        compactor.compact(_net(), torch.randn(5, 4))


def test_labels_with_an_ignore_index_stay_valid_in_the_random_inputs():
    """A keyword input holding -100 (ignored labels): random batches draw only values it holds, so the loss runs."""

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x, labels):
            logits = self.b(torch.relu(self.a(x)))
            return logits, nn.functional.cross_entropy(logits, labels, ignore_index=-100)

    torch.manual_seed(0)
    m = WithLoss().eval()
    prune.custom_from_mask(m.a, "weight", torch.tensor([0.0, 1, 1, 0, 1, 1])[:, None].expand(6, 4))
    inputs = {"x": torch.randn(3, 4), "labels": torch.tensor([0, -100, 2])}
    small = compactor.compact(m, inputs)
    assert small.a.out_features == 4
    torch.testing.assert_close(small(**inputs)[0], m(**inputs)[0])


def test_a_failure_after_tracing_names_the_stage(monkeypatch):
    """A failure while measuring says which stage and suggests random_inputs=0, not 'could not trace'."""
    from compactor import probe

    def broken(*args, **kwargs):
        raise RuntimeError("index out of range in self")

    monkeypatch.setattr(probe, "measure", broken)
    with pytest.raises(CompactionError, match=r"failed while measuring channels on 3 input\(s\): index out of range"):
        compactor.compact(_net(), torch.randn(5, 4))


def test_a_parametrized_layer_is_frozen_to_the_plain_layer_it_computes():
    """weight_norm on an unpruned conv between pruned ones (wav2vec2's positional conv): compact freezes it to
    the weight it computes (a plain Conv1d, said in the report), slices its input columns, and stays exact;
    the user's model keeps its parametrization."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), weight_norm(nn.Conv1d(8, 8, 3, padding=1)), nn.ReLU(),
                      nn.Conv1d(8, 4, 1)).eval()
    prune.ln_structured(m[0], "weight", 0.5, n=2, dim=0)
    x = torch.randn(2, 3, 16)
    small = compactor.compact(m, x)
    assert type(small[2]) is nn.Conv1d and small[2].in_channels < 8
    assert parametrize.is_parametrized(m[2])
    assert compactor.report_of(small).frozen == ["'2'.weight (_WeightNorm) frozen to the tensor it computes"]
    assert "parametrization: '2'.weight" in str(compactor.report_of(small))
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x), rtol=1e-5, atol=1e-6)
    assert compactor.plan(m, x).frozen == compactor.report_of(small).frozen


def test_a_model_that_is_one_layer_reports_its_macs():
    """A bare pruned Conv2d is both the model and its only layer: both hooks run, so its MACs are counted
    (6*6 outputs x 4 channels x 3*9 per image; its rows are the model's output, so they stay)."""
    conv = nn.Conv2d(3, 4, 3)
    prune.ln_structured(conv, "weight", 0.5, n=2, dim=0)
    report = compactor.plan(conv, torch.randn(1, 3, 8, 8))
    assert report.macs_before == report.macs_after == 6 * 6 * 4 * 3 * 9


class StdConv2d(nn.Conv2d):
    """A weight-standardized conv as timm writes it: each row standardized over all its input columns."""

    def forward(self, x):
        w = torch.nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                                           momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return torch.nn.functional.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SamePadded(nn.Conv2d):
    """Pads its input in forward (timm's ...Same classes): freezing it to a plain conv would lose that."""

    def forward(self, x):
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1)), self.weight * 2, self.bias)


def test_a_weight_standardized_conv_is_frozen_to_the_plain_conv_it_computes():
    """Removing input columns of a StdConv2d would change how every row is standardized: compact freezes it to
    the nn.Conv2d it computes (said in the report), then removes conv0's masked channels exactly; a subclass that
    also pads its input in forward is left as it is."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), StdConv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(8, 2, 1)).eval()
    prune.ln_structured(m[0], "weight", 0.5, n=2, dim=0)
    x = torch.randn(2, 3, 8, 8)
    small = compactor.compact(m, x)
    assert type(small[2]) is nn.Conv2d and small[2].in_channels < 8 and type(m[2]) is StdConv2d
    assert compactor.report_of(small).frozen[0].startswith("'2' (StdConv2d) frozen to the plain Conv2d")
    xb = torch.randn(3, 3, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(small(xb), m(xb), rtol=1e-5, atol=1e-5)
    same = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), SamePadded(8, 4, 3)).eval()
    prune.ln_structured(same[0], "weight", 0.5, n=2, dim=0)
    assert compactor.plan(same, x).frozen == []
