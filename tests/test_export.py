"""compactor/export.py: ONNX export with onnxruntime parity, torch.export programs, save / load.

Every test compares outputs (onnxruntime or the reloaded model against PyTorch) with
written tolerances; none only runs a forward.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import compactor
from compactor import masks
from compactor.demo import LeNet, prune_like_the_seeds
from compactor.errors import CompactionError, ExportError, LoadError
from compactor.layers import BorderCorrectedConv2d
from helpers import assert_unchanged, snapshot

# onnxruntime vs PyTorch, fp32: different kernels and summation orders, nothing more.
ORT_RTOL, ORT_ATOL = 1e-4, 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models on a shared 2-core machine: one thread, so OpenMP does not spin against other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- test models


class ResBN(nn.Module):
    """conv+BN+ReLU, then conv+BN added to its input (residual), mean-pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(y.mean((2, 3)))


class Depthwise(nn.Module):
    """pointwise conv -> depthwise 3x3 (groups=8) + BN -> pointwise -> pooled Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.pw1 = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.pw2 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.dw(F.relu(self.pw1(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.pw2(x), 1), 1))


class Attention(nn.Module):
    """Linear embedding, nn.MultiheadAttention (batch_first), residual LayerNorm, mean over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.ln(h + a)).mean(1)


class Border(nn.Module):
    """conv1 feeds a padding=1 conv2: pruning conv1 leaves a border-corrected conv2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _randomize_bn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model


@functools.lru_cache(maxsize=None)
def lenet_compact():
    torch.manual_seed(0)
    masked = prune_like_the_seeds(LeNet().eval())
    x = torch.randn(2, 1, 28, 28)
    return compactor.compact(masked, x), masked, x


@functools.lru_cache(maxsize=None)
def resbn_compact():
    torch.manual_seed(0)
    masked = _randomize_bn(ResBN()).eval()
    rows = torch.ones(8, 1, 1, 1)
    rows[[0, 3, 5]] = 0  # the residual ties conv1's and conv2's channels: mask the same ones in both
    prune.custom_from_mask(masked.conv1, "weight", rows.expand_as(masked.conv1.weight))
    prune.custom_from_mask(masked.conv2, "weight", rows.expand_as(masked.conv2.weight))
    x = torch.randn(2, 3, 16, 16)
    return compactor.compact(masked, x), masked, x


@functools.lru_cache(maxsize=None)
def depthwise_compact():
    torch.manual_seed(0)
    masked = _randomize_bn(Depthwise()).eval()
    rows = torch.ones(8, 1, 1, 1)
    rows[[1, 4, 6]] = 0  # the depthwise conv ties its channels to pw1's: mask the same ones in both
    prune.custom_from_mask(masked.pw1, "weight", rows.expand_as(masked.pw1.weight))
    prune.custom_from_mask(masked.dw, "weight", rows.expand_as(masked.dw.weight))
    x = torch.randn(2, 3, 16, 16)
    return compactor.compact(masked, x), masked, x


@functools.lru_cache(maxsize=None)
def border_compact():
    torch.manual_seed(0)
    masked = Border().eval()
    prune.ln_structured(masked.conv1, "weight", 0.5, n=2, dim=0)
    x = torch.randn(2, 3, 16, 16)
    return compactor.compact(masked, x), masked, x


# Cached: every test only reads these models (export and save copy them; none is modified).
COMPACTED = {"lenet": lenet_compact, "resbn": resbn_compact, "depthwise": depthwise_compact, "border": border_compact}
ARCH = {"lenet": LeNet, "resbn": ResBN, "depthwise": Depthwise, "border": Border}


def _one_thread() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # no spinning pool on a shared 2-core box
    return options


def ort_run(path: str, *inputs: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(path, sess_options=_one_thread(), providers=["CPUExecutionProvider"])
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
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 1, 28, 28]
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
    and loaded into the zoo's (dense) architecture it computes exactly the same. If compact()
    fails on an entry, the masked model is exported instead: compaction is not what this
    test is about (tests/test_zoo*.py are)."""
    zoo = _ZOO
    model, inputs = zoo.build(name)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))][:-1]
    for m in layers:
        prune.ln_structured(m, "weight", 0.3, n=2, dim=0)
    try:
        model = compactor.compact(model, inputs)
    except CompactionError:
        pass
    path = str(tmp_path / f"{name}.onnx")
    report = compactor.export_onnx(model, inputs, path)
    assert report.max_abs_diff <= report.tolerance
    for batch in (2, 1):
        xs = zoo.get(name).example_inputs(batch)
        got = ort_run(path, *xs)[0]
        np.testing.assert_allclose(got, torch_run(model, *xs), rtol=ORT_RTOL, atol=ORT_ATOL)

    # The same model through save -> load into the zoo's dense architecture: identical.
    loaded = compactor.load(compactor.save(model, tmp_path / f"{name}.pt"), zoo.get(name).build)
    assert [type(m) for m in loaded.modules()][1:] == [type(m) for m in model.modules()][1:]
    plain = masks.bake(model)  # no-op copy, unless compact() failed and the masks are still on
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
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


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("name", list(COMPACTED))
def test_save_load_same_outputs_and_compact_shapes(name, tmp_path):
    """save -> load(path, Class) rebuilds the compact layers: same state_dict shapes, same outputs."""
    small, _, x = COMPACTED[name]()
    path = compactor.save(small, tmp_path / "small.pt")
    loaded = compactor.load(path, ARCH[name])
    assert not loaded.training
    want = {k: tuple(v.shape) for k, v in small.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in loaded.state_dict().items()} == want
    assert [type(m) for m in loaded.modules()][1:] == [type(m) for m in small.modules()][1:]
    xb = torch.randn((3,) + tuple(x.shape[1:]))
    with torch.no_grad():
        torch.testing.assert_close(loaded(xb), small(xb), rtol=0, atol=0)


def test_saved_file_is_plain_data(tmp_path):
    """The file loads with weights_only=True and holds the format tag, the manifest and the weights."""
    small, _, _ = border_compact()
    path = compactor.save(small, tmp_path / "b.pt")
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == "compactor/1"
    conv2 = obj["manifest"]["layers"]["conv2"]
    assert conv2["class"] == "BorderCorrectedConv2d"
    assert (conv2["in_channels"], conv2["out_channels"], conv2["kernel_size"], conv2["padding"]) == (4, 8, [3, 3], [1, 1])
    assert obj["manifest"]["layers"]["conv1"]["out_channels"] == 4
    assert tuple(obj["state_dict"]["conv2.border_kernel"].shape) == (8, 1, 3, 3)
    assert obj["report"]["params_after"] == small.compaction_report.params_after


def test_load_from_instance_leaves_it_unchanged(tmp_path):
    """load(path, instance) copies the instance: its layers, weights and flags stay dense and untouched."""
    small, _, x = lenet_compact()
    path = compactor.save(small, tmp_path / "lenet.pt")
    dense = LeNet()
    before = snapshot(dense)
    loaded = compactor.load(path, dense)
    assert_unchanged(dense, before)
    assert dense.conv1.out_channels == 6 and loaded.conv1.out_channels == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


def test_load_from_zero_arg_callable(tmp_path):
    small, _, x = depthwise_compact()
    path = compactor.save(small, tmp_path / "dw.pt")
    loaded = compactor.load(path, lambda: Depthwise())
    assert loaded.dw.groups == small.dw.groups < 8
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


def test_save_bakes_live_masks(tmp_path):
    """Saving a masked model writes what it computes (masks made permanent), model untouched."""
    torch.manual_seed(0)
    masked = prune_like_the_seeds(LeNet().eval())
    before = snapshot(masked)
    path = compactor.save(masked, tmp_path / "masked.pt")
    assert_unchanged(masked, before)
    assert not any(k.endswith("_mask") for k in torch.load(path, weights_only=True)["state_dict"])
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(compactor.load(path, LeNet)(x), masked(x), rtol=0, atol=0)


def test_save_never_overwrites_without_force(tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(b"keep me")
    small, _, _ = lenet_compact()
    with pytest.raises(FileExistsError, match="force"):
        compactor.save(small, path)
    assert path.read_bytes() == b"keep me"
    compactor.save(small, path, force=True)
    assert torch.load(path, weights_only=True)["format"] == "compactor/1"


def test_save_pickle_is_explicit(tmp_path):
    """save_pickle writes the module object; load refuses it (no unpickling), torch.load(weights_only=False) reads it."""
    small, _, x = lenet_compact()
    path = compactor.save_pickle(small, tmp_path / "pickled.pt")
    with pytest.raises(LoadError, match="pickled Python objects.*weights_only=False"):
        compactor.load(path, LeNet)
    again = torch.load(path, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)


class NoConv2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)


class Conv2IsLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 4)


class WithExtra(Border):
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(2, 2)


@pytest.fixture(scope="module")
def border_file(tmp_path_factory):
    small, _, _ = border_compact()
    return compactor.save(small, tmp_path_factory.mktemp("border") / "border.pt")


def _rewrite(src: str, dst, edit) -> str:
    obj = torch.load(src, weights_only=True)
    edit(obj)
    torch.save(obj, dst)
    return str(dst)


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"'.*nope\.pt' does not exist; check the path"),
    ("folder", r"is a folder"),
    ("truncated", r"could not be read .*truncated"),
    ("garbage", r"could not be read"),
    ("state_dict", r"plain state_dict, not a compactor file; .*load_pruned"),
    ("other_object", r"not a compactor file"),
    ("newer", r"format 'compactor/2'.*upgrade compactor"),
    ("damaged", r"damaged"),
    ("lacks_layer", r"layer 'conv2' \(BorderCorrectedConv2d\) that NoConv2 lacks"),
    ("wrong_kind", r"layer 'conv2' is a BorderCorrectedConv2d in the file but a Linear in Conv2IsLinear"),
    ("extra_keys", r"WithExtra has extra\.weight, extra\.bias that the file lacks"),
    ("missing_key", r"Border has fc\.bias that the file lacks"),
])
def test_load_errors_name_the_problem(case, pattern, border_file, tmp_path):
    """Each bad file or architecture raises LoadError naming the file / key / layer and the fix."""
    arch = Border
    path = str(tmp_path / "f.pt")
    data = open(border_file, "rb").read()
    if case == "missing":
        path = str(tmp_path / "nope.pt")
    elif case == "folder":
        path = str(tmp_path)
    elif case == "truncated":
        open(path, "wb").write(data[: len(data) // 2])
    elif case == "garbage":
        open(path, "wb").write(b"\x00not a torch file" * 10)
    elif case == "state_dict":
        torch.save(Border().state_dict(), path)
    elif case == "other_object":
        torch.save([1, 2, 3], path)
    elif case == "newer":
        _rewrite(border_file, path, lambda o: o.update(format="compactor/2"))
    elif case == "damaged":
        _rewrite(border_file, path, lambda o: o.update(manifest=[]))
    elif case == "missing_key":
        _rewrite(border_file, path, lambda o: o["state_dict"].pop("fc.bias"))
    else:
        path = border_file
        arch = {"lacks_layer": NoConv2, "wrong_kind": Conv2IsLinear, "extra_keys": WithExtra}[case]
    with pytest.raises(LoadError, match=pattern):
        compactor.load(path, arch)


def test_load_rejects_a_non_module_factory(border_file):
    with pytest.raises(TypeError, match="returned int"):
        compactor.load(border_file, lambda: 3)


def test_written_files_get_ordinary_permissions(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the final files get what open() would give."""
    umask = os.umask(0)
    os.umask(umask)
    small, _, x = lenet_compact()
    for path in (compactor.save(small, tmp_path / "m.pt"), compactor.export_onnx(small, x, tmp_path / "m.onnx").path):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
