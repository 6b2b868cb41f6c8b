"""compactor/saving.py: save / load of compact models (weights plus a manifest of layer shapes).

Every round trip compares the loaded model's outputs with the saved one's, exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compactor
from compactor.demo import LeNet, prune_like_the_seeds
from compactor.errors import LoadError
from helpers import assert_unchanged, snapshot
from small_models import (ARCH, COMPACTED, Border, Depthwise, border_bn_compact, border_compact, depthwise_compact,
                          lenet_compact)


@pytest.mark.parametrize("name", list(COMPACTED))
def test_save_load_same_outputs_and_compact_shapes(name, tmp_path):
    """save -> load(Class, path) rebuilds the compact layers: same state_dict shapes, same outputs."""
    small, _, x = COMPACTED[name]()
    path = compactor.save(small, tmp_path / "small.pt")
    loaded = compactor.load(ARCH[name], path)
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


def test_border_corrected_batchnorm_is_in_the_manifest(tmp_path):
    """bn2 carries the border correction of stride-1 conv2: the manifest keeps the conv geometry its map needs."""
    small, _, _ = border_bn_compact()
    assert type(small.bn2).__name__ == "BorderCorrectedBatchNorm2d" and type(small.conv2) is nn.Conv2d
    assert type(small.conv3).__name__ == "BorderCorrectedConv2d"
    obj = torch.load(compactor.save(small, tmp_path / "b.pt"), weights_only=True)
    bn2 = obj["manifest"]["layers"]["bn2"]
    assert (bn2["class"], bn2["num_features"], bn2["border_kernel"]) == ("BorderCorrectedBatchNorm2d", 6, [6, 1, 3, 3])
    assert (bn2["border_padding"], bn2["border_dilation"]) == ([1, 1], [1, 1])


def test_load_from_instance_leaves_it_unchanged(tmp_path):
    """load(instance, path) copies the instance: its layers, weights and flags stay dense and untouched."""
    small, _, x = lenet_compact()
    path = compactor.save(small, tmp_path / "lenet.pt")
    dense = LeNet()
    before = snapshot(dense)
    loaded = compactor.load(dense, path)
    assert_unchanged(dense, before)
    assert dense.conv1.out_channels == 6 and loaded.conv1.out_channels == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


def test_load_from_zero_arg_callable(tmp_path):
    small, _, x = depthwise_compact()
    path = compactor.save(small, tmp_path / "dw.pt")
    loaded = compactor.load(lambda: Depthwise(), path)
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
        torch.testing.assert_close(compactor.load(LeNet, path)(x), masked(x), rtol=0, atol=0)


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
        compactor.load(LeNet, path)
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
        compactor.load(arch, path)


def test_load_rejects_a_non_module_factory(border_file):
    with pytest.raises(TypeError, match="returned int"):
        compactor.load(lambda: 3, border_file)


def test_load_in_the_old_order_says_to_swap(border_file):
    """load(path, Model) -- the order before load became model-first -- is a TypeError that says to swap them."""
    with pytest.raises(TypeError, match=r"takes the model first.*swap them"):
        compactor.load(border_file, Border)
    with pytest.raises(TypeError, match=r"swap them"):
        compactor.load(border_file, Border())


class BNAct(nn.BatchNorm2d):
    """A BatchNorm with its activation, built from a constructor argument (as timm's BatchNormAct2d is)."""

    def __init__(self, num_features: int, act: type = nn.ReLU) -> None:
        super().__init__(num_features)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class ActNet(nn.Module):
    """conv -> BNAct(act) -> conv (zero-padded) -> BNAct(act) -> pool -> linear."""

    def __init__(self, act: type = nn.Hardswish) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), BNAct(8, act)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), BNAct(8, act)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn2(self.conv2(self.bn1(self.conv1(x)))).mean((2, 3)))


def _act_net_compact(act: type = nn.Hardswish):
    torch.manual_seed(0)
    model = ActNet(act).eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
            bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    mask = torch.ones_like(model.conv1.weight)
    mask[[0, 3, 5]] = 0
    torch.nn.utils.prune.custom_from_mask(model.conv1, "weight", mask)
    x = torch.randn(2, 3, 10, 10)
    return model, compactor.compact(model, x), x


def test_load_rebuilds_a_batchnorm_subclass_with_its_own_activation(tmp_path):
    """A BatchNorm subclass whose activation comes from a constructor argument (Hardswish here, ReLU by
    default): load copies the architecture's own instance and resizes it, so Hardswish stays and the reload
    equals the masked model; a constructor called with default arguments would have made it a ReLU."""
    masked, small, x = _act_net_compact()
    assert {type(m) for m in small.modules()} <= {type(m) for m in masked.modules()}
    assert small.conv1.out_channels < 8
    path = compactor.save(small, tmp_path / "act.pt")
    loaded = compactor.load(lambda: ActNet(nn.Hardswish), path)
    assert type(loaded.bn1.act) is nn.Hardswish and loaded.bn1.num_features == small.bn1.num_features
    xb = torch.randn(3, 3, 12, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(xb), small(xb), rtol=0, atol=0)
        torch.testing.assert_close(loaded(xb), masked(xb), rtol=1e-5, atol=1e-5)


def test_load_names_the_first_layer_that_does_not_compute_what_was_saved(tmp_path):
    """Loaded into an architecture built with other arguments (ReLU where the saved model has Hardswish), the
    rebuilt model's shapes all fit, but its fingerprint check fails at bn1, the first layer whose output differs."""
    _, small, _ = _act_net_compact()
    path = compactor.save(small, tmp_path / "act.pt")
    with pytest.raises(LoadError, match=r"layer 'bn1\.act' \(ReLU\) is the first whose output differs"):
        compactor.load(lambda: ActNet(nn.ReLU), path)
    unchecked = compactor.load(lambda: ActNet(nn.ReLU), path, verify=False)  # asked for: no check
    assert type(unchecked.bn1.act) is nn.ReLU


def test_a_file_without_fingerprint_loads_with_a_warning(tmp_path):
    """Files written before fingerprints (or without example inputs) still load, and say they were not checked."""
    _, small, x = _act_net_compact()
    path = tmp_path / "old.pt"
    compactor.save(small, path)
    obj = torch.load(path, weights_only=True)
    del obj["fingerprint"]
    torch.save(obj, path)
    with pytest.warns(UserWarning, match="has no fingerprint"):
        loaded = compactor.load(ActNet, path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


def test_save_without_example_inputs_warns_and_explicit_inputs_give_a_fingerprint(tmp_path):
    """A model not made by compact() carries no probe: save warns; example_inputs= gives the fingerprint."""
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.warns(UserWarning, match="no fingerprint"):
        compactor.save(net, tmp_path / "a.pt")
    compactor.save(net, tmp_path / "b.pt", example_inputs=torch.randn(2, 4))
    fp = torch.load(tmp_path / "b.pt", weights_only=True)["fingerprint"]
    assert [name for name, _, _ in fp["layers"]] == ["0", "1", "2"]
    assert fp["outputs"][0]["shape"] == [2, 2]


def test_save_refuses_a_parametrized_layer(tmp_path):
    """weight_norm's weight is computed from two other tensors: save says so and how to proceed."""
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    torch.nn.utils.parametrizations.weight_norm(net[0])
    with pytest.raises(ValueError, match=r"layer '0' \(ParametrizedLinear\).*remove_parametrizations"):
        compactor.save(net, tmp_path / "wn.pt", example_inputs=torch.randn(2, 4))
    assert not (tmp_path / "wn.pt").exists()


def test_fingerprint_catches_nan_small_changes_and_missing_outputs():
    """check() names the first differing layer for a NaN bias and for a bias moved by 0.01, and says so when the
    rebuilt model returns fewer tensors; the same model passes."""
    import copy

    from compactor import fingerprint

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    fp = fingerprint.take(m, fingerprint.probe_inputs((torch.randn(1, 3, 16, 16),)))
    fingerprint.check(copy.deepcopy(m), fp)
    nan, moved = copy.deepcopy(m), copy.deepcopy(m)
    with torch.no_grad():
        nan[0].bias[0] = float("nan")
        moved[2].bias += 0.01
    with pytest.raises(LoadError, match=r"layer '0' \(Conv2d\) is the first whose output differs \(non-finite"):
        fingerprint.check(nan, fp)
    with pytest.raises(LoadError, match=r"layer '2' \(Conv2d\) is the first whose output differs"):
        fingerprint.check(moved, fp)

    class Pair(nn.Module):
        def __init__(self, k: int) -> None:
            super().__init__()
            self.c, self.k = nn.Conv2d(3, 4, 1), k

        def forward(self, x):
            y = self.c(x)
            return (y, 2 * y)[: self.k]

    two = Pair(2).eval()
    fp2 = fingerprint.take(two, fingerprint.probe_inputs((torch.randn(1, 3, 4, 4),)))
    two.k = 1
    with pytest.raises(LoadError, match=r"returns 1 tensor\(s\) where the saved model returned 2"):
        fingerprint.check(two, fp2)


def test_a_loaded_model_saves_again_with_its_fingerprint(tmp_path):
    """load keeps the probe, so save(load(...)) writes a fingerprint without example_inputs."""
    _, small, x = _act_net_compact()
    loaded = compactor.load(ActNet, compactor.save(small, tmp_path / "a.pt"))
    compactor.save(loaded, tmp_path / "b.pt")
    assert torch.load(tmp_path / "b.pt", weights_only=True)["fingerprint"] is not None
    compactor.load(ActNet, tmp_path / "b.pt")


def test_a_compact_model_pickled_whole_unpickles_without_compactor(tmp_path):
    """torch.save(small) (what ultralytics' YOLO.save does): the file names no compactor class, so a process
    where compactor cannot be imported loads it and computes the same; its report comes back as a plain dict."""
    import subprocess
    import sys

    torch.manual_seed(0)
    masked = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1))
    with torch.no_grad():
        masked[1].bias.uniform_(0.2, 1.0)  # constants to carry: the compact model has a carrier channel
    torch.nn.utils.prune.ln_structured(masked[0], "weight", 0.5, n=2, dim=0)
    x = torch.randn(2, 3, 8, 8)
    small = compactor.compact(masked.eval(), x)
    path = tmp_path / "whole.pt"
    torch.save(small, path)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(small(x), tmp_path / "y.pt")
    code = (
        "import sys; sys.modules['compactor'] = None\n"  # any import of compactor now fails
        "import torch\n"
        "m = torch.load(sys.argv[1] + '/whole.pt', weights_only=False)\n"
        "x, y = torch.load(sys.argv[1] + '/x.pt'), torch.load(sys.argv[1] + '/y.pt')\n"
        "with torch.no_grad(): torch.testing.assert_close(m(x), y, rtol=0, atol=0)\n"
        "assert isinstance(m.__dict__['compaction_report'], dict)\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
