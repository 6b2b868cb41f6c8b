"""compactor/export.py: ONNX export with onnxruntime parity, and torch.export programs.

Every test compares outputs (onnxruntime or the reloaded model against PyTorch) with
written tolerances; none only runs a forward.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import compactor
from compactor.tensors import flatten_outputs
from compactor.demo import LeNet, prune_like_the_seeds
from compactor.errors import CompactionError, ExportError
from compactor.export import ort_session
from compactor.layers import BorderCorrectedBatchNorm2d, BorderCorrectedConv2d
from helpers import assert_unchanged, snapshot
from small_models import COMPACTED, Attention, border_bn_compact, border_compact, lenet_compact

# onnxruntime vs PyTorch, fp32: different kernels and summation orders, nothing more.
ORT_RTOL, ORT_ATOL = 1e-4, 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ort_run(path: str, *inputs: torch.Tensor) -> list[np.ndarray]:
    session = ort_session(path)  # one thread: no spinning pool on a shared 2-core box
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})


def torch_run(model: nn.Module, *inputs: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(*inputs).numpy()


# --------------------------------------------------------------------------- ONNX parity


@pytest.mark.parametrize("name", list(COMPACTED))
def test_onnx_matches_pytorch_at_two_batch_sizes(name, tmp_path):
    """onnxruntime runs the exported compact model like PyTorch at batch 2 and 1 (dynamic batch),
    and like the masked model it came from; the compact model has fewer parameters."""
    small, masked, x = COMPACTED[name]()
    assert small.compaction_report.params_after < small.compaction_report.params_before
    path = str(tmp_path / f"{name}.onnx")
    report = compactor.export_onnx(small, x, path)

    assert os.path.getsize(path) == report.size_bytes > 0
    assert report.exporter == "torchscript"
    assert report.batch_sizes == [2, 1]
    assert report.max_abs_diff <= report.tolerance
    onnx.checker.check_model(path)
    for batch in (2, 1, 5):
        xb = torch.randn((batch,) + tuple(x.shape[1:]))
        got = ort_run(path, xb)[0]
        assert got.shape[0] == batch
        np.testing.assert_allclose(got, torch_run(small, xb), rtol=ORT_RTOL, atol=ORT_ATOL)
        np.testing.assert_allclose(got, torch_run(masked, xb), rtol=ORT_RTOL, atol=ORT_ATOL)


def test_border_corrected_conv_survives_export(tmp_path):
    """The compacted Border model holds a BorderCorrectedConv2d, and ONNX reproduces its
    border constant: outputs match PyTorch on an all-zero input, where only the fold acts."""
    small, masked, x = border_compact()
    assert isinstance(small.conv2, BorderCorrectedConv2d)
    assert small.conv2.in_channels == 4
    path = str(tmp_path / "border.onnx")
    compactor.export_onnx(small, x, path)
    zeros = torch.zeros(3, 3, 16, 16)
    np.testing.assert_allclose(ort_run(path, zeros)[0], torch_run(masked, zeros), rtol=ORT_RTOL, atol=ORT_ATOL)


def test_attention_model_exports_with_dynamic_batch(tmp_path):
    """nn.MultiheadAttention exports; onnxruntime matches PyTorch at batch 3 and 1."""
    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(3, 5, 8)
    path = str(tmp_path / "attn.onnx")
    report = compactor.export_onnx(model, x, path)
    assert report.batch_sizes == [3, 1]
    for batch in (3, 1):
        xb = torch.randn(batch, 5, 8)
        np.testing.assert_allclose(ort_run(path, xb)[0], torch_run(model, xb), rtol=ORT_RTOL, atol=ORT_ATOL)


def test_dynamo_exporter_also_matches(tmp_path):
    """exporter='dynamo' (torch.export-based) gives the same outputs on the compact border model,
    even from a batch-1 example (export_onnx traces at batch 2 so batch is not fixed to 1)."""
    pytest.importorskip("onnxscript")
    small, _, x = border_compact()
    path = str(tmp_path / "border_dynamo.onnx")
    report = compactor.export_onnx(small, x[:1], path, exporter="dynamo")
    assert report.exporter == "dynamo" and report.batch_sizes == [1, 3]
    xb = torch.randn(4, 3, 16, 16)
    np.testing.assert_allclose(ort_run(path, xb)[0], torch_run(small, xb), rtol=ORT_RTOL, atol=ORT_ATOL)


def test_fixed_batch_export(tmp_path):
    """dynamic_batch=False: the ONNX input has the example's batch size and only it is checked."""
    small, _, x = lenet_compact()
    path = str(tmp_path / "fixed.onnx")
    report = compactor.export_onnx(small, x, path, dynamic_batch=False)
    assert report.batch_sizes == [2]
    assert ort_session(path).get_inputs()[0].shape == [2, 1, 28, 28]
    np.testing.assert_allclose(ort_run(path, x)[0], torch_run(small, x), rtol=ORT_RTOL, atol=ORT_ATOL)


def test_masked_model_exports_and_is_left_alone(tmp_path):
    """A model with live prune masks exports (masks applied) and is not modified, training flag included."""
    torch.manual_seed(0)
    masked = prune_like_the_seeds(LeNet())  # left in training mode on purpose
    before = snapshot(masked)
    path = str(tmp_path / "masked.onnx")
    compactor.export_onnx(masked, torch.randn(2, 1, 28, 28), path)
    assert_unchanged(masked, before)
    xb = torch.randn(3, 1, 28, 28)
    np.testing.assert_allclose(ort_run(path, xb)[0], torch_run(masked.eval(), xb), rtol=ORT_RTOL, atol=ORT_ATOL)


class BatchDependent(nn.Module):
    """Output depends on the batch size: doubles at batch > 1. No exporter can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y * 2 if x.shape[0] > 1 else y


def test_parity_failure_raises_with_the_difference_and_writes_nothing(tmp_path):
    """Traced at batch 2, the ONNX graph doubles at batch 1 too: the check at batch 1 catches it,
    the error gives the measured difference, and no file is left behind."""
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match=r"differ from PyTorch's by up to [0-9.]+ .*batch 1: ") as info:
        compactor.export_onnx(BatchDependent().eval(), torch.randn(2, 4), path, exporter="torchscript")
    assert isinstance(info.value, CompactionError)
    assert os.listdir(tmp_path) == []


def test_rejected_input_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match=r"rejected the example input\(s\) of shape \(2, 3, 28, 28\)"):
        compactor.export_onnx(LeNet(), torch.randn(2, 3, 28, 28), tmp_path / "x.onnx")
    assert os.listdir(tmp_path) == []


def test_onnx_never_overwrites_without_force(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"keep me")
    small, _, x = lenet_compact()
    with pytest.raises(FileExistsError, match="force"):
        compactor.export_onnx(small, x, path)
    assert path.read_bytes() == b"keep me"
    compactor.export_onnx(small, x, path, force=True)
    np.testing.assert_allclose(ort_run(str(path), x)[0], torch_run(small, x), rtol=ORT_RTOL, atol=ORT_ATOL)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no temporary files left


def _zoo():
    try:
        from compactor.testing import zoo
    except ImportError:  # pragma: no cover - the zoo lives in the package
        return None
    return zoo


_ZOO = _zoo()


@pytest.mark.skipif(_ZOO is None, reason="compactor.testing.zoo is not available")
@pytest.mark.parametrize("name", list(_ZOO.NAMES) if _ZOO else [])
def test_zoo_onnx_parity(name, tmp_path):
    """Every zoo model, pruned (30 % of the rows of every conv / Linear but the last) and compacted,
    exports with a dynamic batch and runs in onnxruntime like in PyTorch at batch 2 and 1; saved
    and loaded into the zoo's (dense) architecture it computes exactly the same. Every entry
    compacts (a failure here is a failure, not a reason to export the masked model instead)."""
    zoo = _ZOO
    model, inputs = zoo.build(name)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))][:-1]
    for m in layers:
        prune.ln_structured(m, "weight", 0.3, n=2, dim=0)
    model = compactor.compact(model, inputs)
    path = str(tmp_path / f"{name}.onnx")
    report = compactor.export_onnx(model, inputs, path)
    assert report.max_abs_diff <= report.tolerance
    for batch in (2, 1):
        xs = zoo.get(name).example_inputs(batch)
        with torch.no_grad():
            expected = [t.numpy() for t in flatten_outputs(model(*xs))]  # a detection head returns a list
        got = ort_run(path, *xs)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=ORT_RTOL, atol=ORT_ATOL)

    # The same model through save -> load into the zoo's dense architecture: identical.
    loaded = compactor.load(zoo.get(name).build, compactor.save(model, tmp_path / f"{name}.pt"))
    assert [type(m) for m in loaded.modules()][1:] == [type(m) for m in model.modules()][1:]
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), model(*inputs), rtol=0, atol=0)


# --------------------------------------------------------------------------- torch.export program


def test_export_program_roundtrip(tmp_path):
    """The .pt2 program reloads without the model's class and matches it at batch 2 and 5."""
    small, _, x = border_compact()
    path = compactor.export_program(small, x, tmp_path / "border.pt2")
    reloaded = torch.export.load(path).module()
    for batch in (2, 5):
        xb = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(xb), small(xb), rtol=1e-5, atol=1e-6)


def test_written_files_get_ordinary_permissions(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the final files get what open() would give."""
    umask = os.umask(0)
    os.umask(umask)
    small, _, x = lenet_compact()
    for path in (compactor.save(small, tmp_path / "m.pt"), compactor.export_onnx(small, x, tmp_path / "m.onnx").path):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_border_corrections_compile_in_one_graph():
    """torch.compile captures the BatchNorm- and conv-carried border corrections without a graph break, and the
    compiled compact model equals the masked one."""
    import torch._dynamo as dynamo

    small, masked, x = border_bn_compact()
    assert isinstance(small.bn2, BorderCorrectedBatchNorm2d) and isinstance(small.conv3, BorderCorrectedConv2d)
    explained = dynamo.explain(small)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(small, backend="aot_eager")(x), masked(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("build", [border_bn_compact, border_compact])
def test_border_corrections_trace_with_torch_fx(build):
    """torch.fx.symbolic_trace (quantization prep, fx passes) traces both border-corrected kinds; the traced graph
    and fx's conv-BatchNorm fusion (which leaves a BatchNorm carrying a correction alone) equal the masked model."""
    from torch.fx.experimental.optimization import fuse

    small, masked, x = build()
    traced = torch.fx.symbolic_trace(small)
    fused = fuse(small)
    xb = torch.randn((3,) + tuple(x.shape[1:]))
    with torch.no_grad():
        torch.testing.assert_close(traced(xb), masked(xb), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused(xb), masked(xb), rtol=1e-5, atol=1e-6)


class _ConvReluConvBN(nn.Module):
    """conv1 (+bias) -> ReLU -> padded conv2 -> bn2 -> ReLU -> mean -> fc: conv1's masked rows emit relu(bias)
    in train and eval mode alike, so the compact model matches the masked one in both."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("border", ["carrier", "layers"])
def test_fx_traced_compact_model_follows_train_and_eval_at_run_time(momentum, border):
    """Traced in eval, trained a few steps, evaluated, the compact model matches the masked model, running
    statistics and num_batches_tracked included: the carrier is a plain channel, and the border-corrected
    layers are one opaque call in an fx graph, so train / eval is read when it runs."""
    torch.manual_seed(0)
    masked = _ConvReluConvBN().eval()
    masked.bn2.momentum = momentum
    with torch.no_grad():
        masked.conv1.bias[[1, 4]] = torch.tensor([0.7, 1.3])
        masked.bn2.running_mean.normal_()
        masked.bn2.running_var.uniform_(0.5, 2.0)
    mask = torch.ones_like(masked.conv1.weight)
    mask[[1, 4]] = 0
    prune.custom_from_mask(masked.conv1, "weight", mask)
    small = compactor.compact(masked, torch.randn(2, 3, 9, 9), border=border)
    assert isinstance(small.bn2, BorderCorrectedBatchNorm2d) == (border == "layers")
    traced = torch.fx.symbolic_trace(small)
    traced.train(), masked.train()
    for _ in range(3):
        xb = torch.randn(4, 3, 8, 7)
        torch.testing.assert_close(traced(xb), masked(xb), rtol=1e-4, atol=1e-5)
    assert int(traced.bn2.num_batches_tracked) == int(masked.bn2.num_batches_tracked) == 3
    traced.eval(), masked.eval()
    with torch.no_grad():
        torch.testing.assert_close(traced(xb), masked(xb), rtol=1e-4, atol=1e-5)


class _DictHead(nn.Module):
    """Returns (y, {"z": ..., "a": ...}): dict keys not in sorted order, as YOLOv8's detection head does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.mean((2, 3))), {"z": h[:, :2], "a": h.mean(1)}


def test_dict_outputs_are_compared_in_the_order_onnx_returns_them(tmp_path):
    """ONNX flattens a returned dict in insertion order ("z" before "a"); the parity check compares in that order
    too (it sorted the keys, and called a correct export broken)."""
    torch.manual_seed(0)
    m = _DictHead().eval()
    prune.ln_structured(m.conv, "weight", 0.5, n=2, dim=0)
    x = torch.randn(2, 3, 8, 8)
    small = compactor.compact(m, x)
    assert [tuple(t.shape[1:]) for t in flatten_outputs(small(x))] == [(2,), (2, 8, 8), (8, 8)]
    compactor.export_onnx(small, x, str(tmp_path / "dict.onnx"))
