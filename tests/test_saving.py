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
