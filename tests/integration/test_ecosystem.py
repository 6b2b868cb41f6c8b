"""Third-party round trips: the compact model goes where the user takes it and stays equal to the masked model.

timm (save -> load into timm's own model), ultralytics (the YOLO wrapper's fuse / predict / ONNX export /
save -> YOLO(path)), torchvision with torch's own fusion passes (fx ``fuse``, ``torch.ao`` ``fuse_modules``).
Each test runs where its library is installed and is skipped otherwise: ``make test-ecosystem`` builds a
virtual environment with all of them (README) and runs this file.

Every bias, norm and BatchNorm statistic is randomized (libraries initialize BatchNorm to the identity and
biases to zero, which would hide every fold), and the masks come both from the tutorials' per-layer
``prune.ln_structured`` (whose masked channels still emit constants: carriers are needed) and from
``compactor.prune_channels``.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import compactor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RTOL, ATOL = 1e-4, 1e-4


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random biases, norm affines and BatchNorm statistics, so constant folds are exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
            elif isinstance(getattr(m, "bias", None), nn.Parameter):
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model.eval()


def _ln_structured(model: nn.Module, amount: float = 0.3, skip_last: int = 1) -> nn.Module:
    """The tutorials' loop: ln_structured on every dense conv (not depthwise / grouped) but the last ones."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1 and m.out_channels > 4]
    for conv in convs[:len(convs) - skip_last]:
        prune.ln_structured(conv, "weight", amount, n=2, dim=0)
    return model


def _mask(model: nn.Module, how: str, x: torch.Tensor) -> nn.Module:
    if how == "ln_structured":
        return _ln_structured(model)
    compactor.prune_channels(model, x, 0.5)
    return model


def _own_classes(masked: nn.Module, small: nn.Module) -> None:
    assert {type(m) for m in small.modules()} <= {type(m) for m in masked.modules()}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# --------------------------------------------------------------------------- timm


TIMM_MODELS = ["efficientnet_b0", "mobilenetv3_small_050", "regnety_002"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["ln_structured", "prune_channels"])
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_compact_save_load_into_timm_equals_masked(name, how, tmp_path):
    """Norm layers that carry an activation (BatchNormAct2d with SiLU / Hardswish / Identity): compact, save,
    load(lambda: timm.create_model(name)) rebuilds them as copies of timm's own instances; equals masked."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    masked = _mask(_randomize(timm.create_model(name, pretrained=False)), how, x)
    small = compactor.compact(masked, x)
    _own_classes(masked, small)
    report = compactor.report_of(small)
    assert report.params_after < report.params_before
    if how == "prune_channels":  # its masks zero the BatchNorms too: nothing is kept to carry constants
        assert [g for g in report.groups if g.status == "carrier"] == []
    path = compactor.save(small, tmp_path / f"{name}.pt")
    loaded = compactor.load(lambda: timm.create_model(name, pretrained=False), path)
    xb = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(xb), small(xb), rtol=0, atol=0)
        torch.testing.assert_close(loaded(xb), masked(xb), rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- ultralytics


@pytest.fixture(scope="module")
def yolo_pair():
    """(masked DetectionModel, compact DetectionModel, input) for YOLOv8n with per-layer masks."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    ultralytics = pytest.importorskip("ultralytics")
    torch.manual_seed(0)
    masked = _ln_structured(_randomize(ultralytics.YOLO("yolov8n.yaml").model), skip_last=3)
    x = torch.rand(1, 3, 64, 64)
    small = compactor.compact(masked, x)
    assert any(g.status == "carrier" for g in compactor.report_of(small).groups)
    _own_classes(masked, small)
    return masked, small, x


def _yolo(model: nn.Module):
    from ultralytics import YOLO

    wrapper = YOLO("yolov8n.yaml")
    wrapper.model = model
    return wrapper


@pytest.mark.timeout(300)
def test_yolo_fused_by_ultralytics_equals_masked(yolo_pair):
    """ultralytics' own Conv+BN fusion (fuse_conv_and_bn) keeps the compact model exact: every carrier is a
    plain channel of a plain Conv2d + BatchNorm2d."""
    masked, small, x = yolo_pair
    fused = copy.deepcopy(small).fuse(verbose=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(_first(fused(x)), _first(masked(x)), rtol=RTOL, atol=ATOL)


@pytest.mark.timeout(300)
def test_yolo_predict_boxes_equal_masked(yolo_pair):
    """YOLO(...).predict on an image (the predictor fuses Conv+BN itself): the compact model's boxes equal the
    masked model's (its masks made permanent, as prune.remove does) to 1e-3 px."""
    import numpy as np

    masked, small, _ = yolo_pair
    baked = compactor.masks.bake(masked)  # the predictor fuses Conv+BN, which a live prune hook does not survive
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    got = [_yolo(copy.deepcopy(m)).predict(image, imgsz=64, conf=0.01, verbose=False)[0].boxes
           for m in (baked, small)]
    assert len(got[0]) > 0
    torch.testing.assert_close(got[1].xyxy, got[0].xyxy, rtol=0, atol=1e-3)
    torch.testing.assert_close(got[1].conf, got[0].conf, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(300)
def test_yolo_onnx_export_equals_masked(yolo_pair, tmp_path, monkeypatch):
    """YOLO(...).export(format='onnx'): the exported compact model, run in onnxruntime, equals the masked model."""
    from compactor.export import ort_session

    monkeypatch.chdir(tmp_path)  # the exporter writes beside the model's file name, in the working directory
    masked, small, x = yolo_pair
    wrapper = _yolo(copy.deepcopy(small))
    path = wrapper.export(format="onnx", imgsz=64, simplify=False, dynamic=False, project=str(tmp_path))
    session = ort_session(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})[:1]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), _first(masked(x)), rtol=RTOL, atol=1e-3)


@pytest.mark.timeout(300)
def test_yolo_compactor_export_onnx_passes_its_parity_check(yolo_pair, tmp_path):
    """compactor.export_onnx on the compact YOLOv8 (its head returns a dict): onnxruntime equals torch."""
    _, small, x = yolo_pair
    compactor.export_onnx(copy.deepcopy(small), x, str(tmp_path / "yolo.onnx"))


@pytest.mark.timeout(300)
def test_yolo_save_and_reload_equals_masked(yolo_pair, tmp_path):
    """YOLO(...).save(path) -> YOLO(path): ultralytics stores the weights in float16, so the reloaded compact
    model equals the compact model with float16-rounded weights exactly, and the masked model to that rounding."""
    from ultralytics import YOLO

    masked, small, x = yolo_pair
    path = tmp_path / "small.pt"
    _yolo(copy.deepcopy(small)).save(path)
    reloaded = YOLO(str(path)).model.float().eval()
    rounded = copy.deepcopy(small).half().float().eval()
    with torch.no_grad():
        torch.testing.assert_close(_first(reloaded(x)), _first(rounded(x)), rtol=0, atol=0)
        torch.testing.assert_close(_first(reloaded(x)), _first(masked(x)), rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------- torchvision + torch's fusers


@pytest.fixture(scope="module")
def resnet_pair():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    masked = _ln_structured(_randomize(torchvision.models.resnet18(weights=None)), skip_last=0)
    x = torch.randn(2, 3, 64, 64)
    small = compactor.compact(masked, x)
    assert any(g.status == "carrier" for g in compactor.report_of(small).groups)
    _own_classes(masked, small)
    return masked, small, x


@pytest.mark.timeout(300)
def test_fx_fuse_of_a_compact_resnet_equals_masked(resnet_pair):
    """torch.fx.experimental.optimization.fuse folds every BatchNorm into its conv; still equals masked."""
    from torch.fx.experimental.optimization import fuse

    masked, small, x = resnet_pair
    fused = fuse(copy.deepcopy(small))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), masked(x), rtol=RTOL, atol=ATOL)


@pytest.mark.timeout(300)
def test_ao_fuse_modules_of_a_compact_resnet_equals_masked(resnet_pair):
    """torch.ao.quantization.fuse_modules on conv-bn(-relu) triples of every block; still equals masked."""
    from torch.ao.quantization import fuse_modules

    masked, small, x = resnet_pair
    fused = copy.deepcopy(small)
    triples = [["conv1", "bn1", "relu"]]
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(fused, layer)):
            triples += [[f"{layer}.{i}.conv1", f"{layer}.{i}.bn1"], [f"{layer}.{i}.conv2", f"{layer}.{i}.bn2"]]
            if block.downsample is not None:
                triples.append([f"{layer}.{i}.downsample.0", f"{layer}.{i}.downsample.1"])
    fused = fuse_modules(fused, triples)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), masked(x), rtol=RTOL, atol=ATOL)


@pytest.mark.timeout(300)
def test_compact_resnet_save_load_into_torchvision_equals_masked(resnet_pair, tmp_path):
    """save -> load(torchvision.models.resnet18) -> equals masked (the fingerprint checked it too)."""
    import torchvision

    masked, small, x = resnet_pair
    path = compactor.save(small, tmp_path / "r18.pt")
    loaded = compactor.load(lambda: torchvision.models.resnet18(weights=None), path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), masked(x), rtol=RTOL, atol=ATOL)


@pytest.mark.timeout(300)
def test_timm_nfnet_weight_standardized_convs_are_frozen_and_exact():
    """NF-ResNet's ScaledStdConv2d standardizes each weight row over its input columns (and scales it by a
    per-channel gain): compact freezes each to the plain Conv2d it computes, says so, and equals the masked model."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _randomize(timm.create_model("nf_resnet26", pretrained=False))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "gain", None), torch.Tensor):
                m.gain.uniform_(0.5, 1.5)  # timm zero-initializes the last gain of a block
            if isinstance(getattr(m, "skipinit_gain", None), torch.Tensor):
                m.skipinit_gain.fill_(1.0)
    masked = _ln_structured(model)
    x = torch.randn(2, 3, 64, 64)
    small = compactor.compact(masked, x)
    report = compactor.report_of(small)
    assert report.frozen and all("ScaledStdConv2d" in f for f in report.frozen)
    assert report.params_after < report.params_before
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), rtol=RTOL, atol=ATOL)
