"""A zoo of small reference architectures, each built by name with example inputs.

Every entry is tiny (a few channels, inputs like ``2x3x16x16``) so that it builds
and runs a forward pass in a few milliseconds on a CPU, yet each one exercises a
structural feature that a compactor must handle exactly: BatchNorm after convs
(with and without conv bias), residual adds, downsample branches, depthwise and
grouped convs, channel concatenation, channel shuffle, channels-last LayerNorm and
Linear, bare ``nn.Parameter`` layer-scales, multi-head attention, squeeze-and-
excitation gating, padded average pooling, 1-d convs and embeddings.

Six entries are written-out shapes of third-party models on which channel-group
tracing once crashed, hung or blew up memory, one per failure class:
``shuffle_unit`` (ShuffleNetV2 chunk / cat / channel shuffle), ``c2f`` (YOLOv8
C2f + SPPF, a list of two detection maps), ``swin_window`` (pad, roll and window
partition in NHWC), ``partial_residual`` (ReXNet shortcut into a channel slice),
``enc_dec`` (T5-like encoder-decoder: two token inputs, cross-attention, relative
position bias) and ``gqa`` (LLaMA grouped-query attention, RMSNorm, GLU MLP).
A model returns a tensor or, for ``c2f``, a list of tensors.

Builds are deterministic: :attr:`ZooEntry.build` seeds ``torch.manual_seed(0)``
before constructing the model and then, with a separately seeded generator, gives
every normalisation layer a non-trivial ``weight``/``bias`` (and, for BatchNorm,
``running_mean``/``running_var``) and every zero-initialised bias a random value,
so that no normalisation layer is an identity. Example inputs come from their own
seeded generator, so ``example_inputs(n)`` returns the same tensors on every call.

Typical use::

    from compactor.testing import zoo
    model, inputs = zoo.build("resnet_basic")   # eval mode, batch of 2
    out = model(*inputs)

    entry = zoo.get("vgg")
    for size in entry.sizes:                    # other input sizes it accepts
        model(*zoo.example_inputs_at("vgg", 1, size))
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


__all__ = [
    "ZooEntry",
    "NAMES",
    "get",
    "build",
    "example_inputs_at",
    "randomize_",
    "resnet50_like",
    # model classes
    "VGGSmall",
    "BasicBlock",
    "Bottleneck",
    "ResNetBasicSmall",
    "ResNetBottleneckSmall",
    "ResNet50Like",
    "InvertedResidual",
    "MobileNetV2Small",
    "DenseLayer",
    "DenseNetSmall",
    "ConvNeXtBlock",
    "ConvNeXtSmall",
    "ViTBlock",
    "ViTSmall",
    "SqueezeExcitation",
    "SENet",
    "ShuffleNet",
    "GroupedConvNet",
    "PoolFC",
    "Conv1dNet",
    "EmbeddingMLP",
    "ActivationsNet",
    "PaddedAvgPoolNet",
    "ShuffleV2Unit",
    "ShuffleNetV2Small",
    "YoloBottleneck",
    "C2f",
    "SPPF",
    "C2fNet",
    "WindowAttention",
    "SwinBlock",
    "SwinSmall",
    "PartialResidualBlock",
    "ReXNetSmall",
    "Seq2SeqAttention",
    "EncoderDecoder",
    "RMSNorm",
    "GQAttention",
    "GQADecoder",
]


# --------------------------------------------------------------------------- helpers


def randomize_(model: nn.Module, seed: int = 1) -> nn.Module:
    """Make normalisation layers and zero biases of ``model`` non-trivial, in place.

    BatchNorm: ``weight ~ U(0.5, 1.5)``, ``bias ~ N(0, 0.1)``, ``running_mean ~ N(0, 0.1)``,
    ``running_var ~ U(0.5, 1.5)``. LayerNorm / GroupNorm: ``weight ~ U(0.5, 1.5)``,
    ``bias ~ N(0, 0.1)``. Any other parameter named ``*bias`` that is all zeros (e.g. the
    in/out projection biases of ``nn.MultiheadAttention``) gets ``N(0, 0.1)``.
    Deterministic for a given ``seed``; returns ``model``.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) * (hi - lo) + lo)

    def normal(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * std)

    done: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if module.weight is not None:
                    uniform(module.weight, 0.5, 1.5)
                    normal(module.bias, 0.1)
                    done.update({id(module.weight), id(module.bias)})
                if module.running_mean is not None:
                    normal(module.running_mean, 0.1)
                    uniform(module.running_var, 0.5, 1.5)
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                if module.weight is not None:
                    uniform(module.weight, 0.5, 1.5)
                    done.add(id(module.weight))
                if module.bias is not None:
                    normal(module.bias, 0.1)
                    done.add(id(module.bias))
        for name, param in model.named_parameters():
            if id(param) in done:
                continue
            if name.rsplit(".", 1)[-1].endswith("bias") and not bool(param.any()):
                normal(param, 0.1)
    return model


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, groups: int = 1,
             bias: bool = False, act: Optional[nn.Module] = None) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=padding, groups=groups, bias=bias),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


class _Head(nn.Sequential):
    """Global average pool -> flatten -> Linear."""

    def __init__(self, channels: int, classes: int = 10) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, classes))


# --------------------------------------------------------------------------- models


class LeNet(nn.Module):
    """The tutorials' LeNet: 1x28x28 input (16*5*5 = 400 holds only for 28x28).

    ``widths`` designs it at other widths: the output channels of conv1 and conv2 and the
    output features of fc1 and fc2 (the tutorials' are 6, 16, 120, 84).

    Example:
        >>> LeNet((3, 8, 60, 42)).fc1
        Linear(in_features=200, out_features=60, bias=True)
    """

    def __init__(self, widths: Sequence[int] = (6, 16, 120, 84)) -> None:
        super().__init__()
        c1, c2, f1, f2 = (int(w) for w in widths)
        self.conv1 = nn.Conv2d(1, c1, 3)
        self.conv2 = nn.Conv2d(c1, c2, 3)
        self.fc1 = nn.Linear(c2 * 5 * 5, f1)
        self.fc2 = nn.Linear(f1, f2)
        self.fc3 = nn.Linear(f2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, int(x.nelement() / x.shape[0]))
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)



class VGGSmall(nn.Module):
    """VGG-BN style: three conv(3x3, padding=1, *with* bias)->BN->ReLU blocks and a maxpool,
    then AdaptiveAvgPool2d(1)->flatten->Linear.

    Exercises conv bias followed by BatchNorm, consecutive conv->conv pruning through BN,
    and a Linear consuming pooled channels.
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """ResNet BasicBlock: two bias-free 3x3 conv+BN, residual add, optional 1x1 conv+BN downsample.

    Exercises residual adds (channels tied between the branch output and the shortcut).
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet (v1.5) Bottleneck: 1x1, 3x3 (carries the stride), 1x1 bias-free convs + BN,
    expansion 4, residual add, optional 1x1 conv+BN downsample.

    Exercises residual adds around a three-conv branch whose inner channels prune freely.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, inner: Optional[int] = None) -> None:
        super().__init__()
        inner = planes if inner is None else inner  # conv1 / conv2 channels
        self.conv1 = nn.Conv2d(inplanes, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetBasicSmall(nn.Module):
    """Stem conv+BN+ReLU, two BasicBlocks (the second stride 2 with a 1x1 conv+BN downsample),
    then avgpool->Linear.

    Exercises an identity shortcut and a projection shortcut.
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8, 3, padding=1, act=nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2, downsample=_conv_bn(8, 16, 1, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNetBottleneckSmall(nn.Module):
    """Stem, two Bottleneck blocks (an identity one, then a stride-2 one with downsample),
    then avgpool->Linear.

    Exercises expansion-4 bottlenecks.
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 16, 3, padding=1, act=nn.ReLU(inplace=True))
        self.layer1 = Bottleneck(16, 4)
        self.layer2 = Bottleneck(16, 8, stride=2, downsample=_conv_bn(16, 32, 1, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet50Like(nn.Module):
    """A ResNet-50 (torchvision v1.5 layout) written out here: 7x7/2 stem conv+BN+ReLU,
    3x3/2 maxpool, Bottleneck stages [3, 4, 6, 3] with widths 64, 128, 256, 512 (x4 output)
    scaled by ``width``, avgpool, Linear to ``classes``. ``inner_widths`` designs each stage's
    Bottlenecks at another inner width (conv1 / conv2 channels; default: the stage's width).

    Exercises a realistic depth with many residual groups and downsample branches.
    """

    def __init__(self, width: float = 1.0, classes: int = 1000, layers: Sequence[int] = (3, 4, 6, 3),
                 inner_widths: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        widths = self.stage_widths(width)
        inner = list(inner_widths) if inner_widths is not None else widths
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(widths[0], layers[0], stride=1, inner=inner[0])
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2, inner=inner[1])
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2, inner=inner[2])
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2, inner=inner[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3] * Bottleneck.expansion, classes)

    @staticmethod
    def stage_widths(width: float = 1.0) -> list[int]:
        """The four stages' widths (``planes``) at ``width``: 64, 128, 256, 512 scaled and rounded, at least 1.

        Example:
            >>> ResNet50Like.stage_widths(1 / 16)
            [4, 8, 16, 32]
        """
        return [max(1, int(round(w * width))) for w in (64, 128, 256, 512)]

    def _make_layer(self, planes: int, blocks: int, stride: int, inner: int) -> nn.Sequential:
        downsample: Optional[nn.Module] = None
        out = planes * Bottleneck.expansion
        if stride != 1 or self.inplanes != out:
            downsample = _conv_bn(self.inplanes, out, 1, stride=stride)
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, inner)]
        self.inplanes = out
        layers += [Bottleneck(out, planes, inner=inner) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50_like(width: float = 1.0) -> nn.Module:
    """A ResNet-50-class network for 3x224x224 input (about 25.6 M parameters at ``width=1.0``).

    Bottleneck stages [3, 4, 6, 3], widths 64..2048 scaled by ``width``, BatchNorm,
    downsample branches, stride 2, 1000 classes. Uses PyTorch's default initialisation
    from the global RNG (seed it yourself, or use ``build("resnet50")``); BatchNorm
    layers are left at their defaults (call :func:`randomize_` for non-trivial ones).
    """
    return ResNet50Like(width=width)


class InvertedResidual(nn.Module):
    """MobileNetV2 InvertedResidual: 1x1 expand conv+BN+ReLU6, depthwise 3x3 conv
    (groups=channels, padding=1)+BN+ReLU6, 1x1 project conv+BN, residual add when
    stride is 1 and input and output channels match.

    Exercises depthwise convs (in-channels tied to out-channels) and linear bottlenecks.
    """

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.expand = _conv_bn(cin, hidden, 1, act=nn.ReLU6(inplace=True))
        self.depthwise = _conv_bn(hidden, hidden, 3, stride=stride, padding=1, groups=hidden,
                                  act=nn.ReLU6(inplace=True))
        self.project = _conv_bn(hidden, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.use_residual else out


class MobileNetV2Small(nn.Module):
    """Stem conv+BN+ReLU6, two InvertedResidual blocks (a stride-2 one without and a
    stride-1 one with a residual connection), 1x1 conv+BN+ReLU6 head, avgpool, Linear.
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8, 3, padding=1, act=nn.ReLU6(inplace=True))
        self.block1 = InvertedResidual(8, 12, stride=2, expand=4)
        self.block2 = InvertedResidual(12, 12, stride=1, expand=4)
        self.head_conv = _conv_bn(12, 32, 1, act=nn.ReLU6(inplace=True))
        self.head = _Head(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.head(self.head_conv(x))


class DenseLayer(nn.Module):
    """DenseNet layer: BN->ReLU->conv3x3, output concatenated onto the input (``torch.cat``).

    Exercises channel concatenation and BN applied *before* the conv (pre-activation).
    """

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=False)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.relu(self.norm(x)))], 1)


class DenseNetSmall(nn.Module):
    """DenseNet-style: stem conv, two DenseLayers (8 -> 12 -> 16 channels), transition
    BN->ReLU->1x1 conv->AvgPool2d(2), final BN->ReLU, avgpool, Linear.
    """

    def __init__(self, classes: int = 10, growth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.dense1 = DenseLayer(8, growth)
        self.dense2 = DenseLayer(8 + growth, growth)
        c = 8 + 2 * growth
        self.transition = nn.Sequential(
            nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, 8, 1, bias=False), nn.AvgPool2d(2)
        )
        self.final = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.head = _Head(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dense2(self.dense1(self.stem(x)))
        return self.head(self.final(self.transition(x)))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7 conv (padding 3), permute to channels-last, nn.LayerNorm,
    Linear expand x4, GELU, Linear project, layer-scale ``gamma`` (a bare nn.Parameter)
    multiplied in, permute back, residual add.

    Exercises channels-last Linear/LayerNorm on 4-d tensors, permutes, and a bare parameter.
    """

    def __init__(self, dim: int, layer_scale: float = 0.5) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # Non-trivial by construction (random around ``layer_scale``) so it is never an identity.
        self.gamma = nn.Parameter(layer_scale * (0.5 + torch.rand(dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = (self.gamma * y).permute(0, 3, 1, 2)
        return x + y


class ConvNeXtSmall(nn.Module):
    """Stem conv (2x2, stride 2), one ConvNeXtBlock, global mean -> LayerNorm -> Linear."""

    def __init__(self, classes: int = 10, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.block = ConvNeXtBlock(dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))
        return self.head(self.norm(x.mean((2, 3))))


class ViTBlock(nn.Module):
    """Pre-norm transformer encoder block on (N, L, D) tokens: LayerNorm -> nn.MultiheadAttention
    (batch_first=True) -> residual; LayerNorm -> Linear -> GELU -> Linear -> residual.

    Exercises attention (packed in_proj weights, heads) and an MLP on 3-d tensors.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViTSmall(nn.Module):
    """ViT: patch-embedding conv (kernel = stride = patch), flatten to (N, L, D) tokens,
    ``depth`` ViTBlocks (MLP ``mlp_ratio`` x dim), final LayerNorm, mean over tokens, Linear
    head. No position embedding, so any input size (tokens = floor(H/patch) * floor(W/patch))
    is accepted.

    The defaults are the zoo's tiny entry; ``ViTSmall(1000, 384, 6, 16, depth=4, mlp_ratio=4)``
    is a ViT-S/16-style encoder for 3x224x224 input (the benchmarks' ``vit``). ``mlp_hidden``
    designs the MLP at another width (a multiple of ``dim``).

    Raises:
        ValueError: ``mlp_hidden`` is not a positive multiple of ``dim``.

    Example:
        >>> ViTSmall(1000, 384, 6, 16, depth=4, mlp_hidden=768).blocks[3].fc1
        Linear(in_features=384, out_features=768, bias=True)
    """

    def __init__(self, classes: int = 10, dim: int = 16, heads: int = 2, patch: int = 4, *, depth: int = 1,
                 mlp_ratio: int = 2, mlp_hidden: Optional[int] = None) -> None:
        super().__init__()
        if mlp_hidden is not None:
            if mlp_hidden < dim or mlp_hidden % dim:
                raise ValueError(f"ViTSmall: mlp_hidden={mlp_hidden} should be a positive multiple of dim={dim}")
            mlp_ratio = mlp_hidden // dim
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(1))


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation: AdaptiveAvgPool2d(1) -> 1x1 conv -> ReLU -> 1x1 conv -> Sigmoid,
    broadcast-multiplied onto the input features.

    Exercises a gate whose output channels are tied to the gated feature channels.
    """

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))
        return x * s


class SENet(nn.Module):
    """conv+BN+ReLU, squeeze-and-excitation, conv+BN+ReLU, avgpool, Linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = _conv_bn(3, 16, 3, padding=1, act=nn.ReLU(inplace=True))
        self.se = SqueezeExcitation(16, 4)
        self.conv2 = _conv_bn(16, 16, 3, padding=1, act=nn.ReLU(inplace=True))
        self.head = _Head(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(self.se(self.conv1(x))))


class ShuffleNet(nn.Module):
    """Stem conv, grouped 1x1 conv+BN+ReLU, channel shuffle
    (``view(N, g, C//g, H, W).transpose(1, 2).reshape(N, C, H, W)``), grouped 1x1 conv+BN+ReLU,
    avgpool, Linear.

    Exercises a channel permutation between two grouped convs (group structure must survive).
    """

    def __init__(self, classes: int = 10, channels: int = 16, groups: int = 4) -> None:
        super().__init__()
        self.groups = groups
        self.stem = _conv_bn(3, channels, 3, padding=1, act=nn.ReLU(inplace=True))
        self.gconv1 = _conv_bn(channels, channels, 1, groups=groups, act=nn.ReLU(inplace=True))
        self.gconv2 = _conv_bn(channels, channels, 1, groups=groups, act=nn.ReLU(inplace=True))
        self.head = _Head(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gconv1(self.stem(x))
        n, c, h, w = x.shape
        g = self.groups
        x = x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(self.gconv2(x))


class GroupedConvNet(nn.Module):
    """Plain conv, grouped conv ``Conv2d(16, 16, 3, padding=1, groups=4)``, plain 1x1 conv
    (each +BN+ReLU), avgpool, Linear.

    Exercises 1 < groups < channels (pruning must stay group-consistent).
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = _conv_bn(3, 16, 3, padding=1, act=nn.ReLU(inplace=True))
        self.gconv = _conv_bn(16, 16, 3, padding=1, groups=4, act=nn.ReLU(inplace=True))
        self.conv2 = _conv_bn(16, 16, 1, act=nn.ReLU(inplace=True))
        self.head = _Head(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(self.gconv(self.conv1(x))))


class PoolFC(nn.Module):
    """conv -> ReLU -> AdaptiveAvgPool2d(1) -> flatten -> Linear -> ReLU -> Linear.

    Exercises conv channels feeding Linear in-features through a global pool, and a
    Linear->Linear hidden layer.
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(F.relu(self.conv(x))), 1)
        return self.fc2(F.relu(self.fc1(x)))


class Conv1dNet(nn.Module):
    """Conv1d(padding=1)+BN1d+ReLU, Conv1d(padding=2)+ReLU on (N, C, L), AdaptiveAvgPool1d(1),
    flatten, Linear.

    Exercises 1-d convs and BatchNorm1d.
    """

    def __init__(self, classes: int = 10, cin: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(cin, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 16, 5, padding=2)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class EmbeddingMLP(nn.Module):
    """nn.Embedding -> Linear -> ReLU -> Linear on integer tokens (N, L); returns (N, L, classes).

    Exercises embedding columns feeding a Linear, and Linear on 3-d tensors.
    """

    def __init__(self, vocab: int = 50, dim: int = 16, hidden: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.embed(tokens))))


class ActivationsNet(nn.Module):
    """conv -> GELU -> conv -> SiLU -> avgpool -> Linear -> Hardswish -> Linear.

    Exercises non-ReLU elementwise activations (f(0) = 0 for all three, so pruned channels
    stay zero).
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.act2 = nn.SiLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(16, 16)
        self.act3 = nn.Hardswish()
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        x = torch.flatten(self.pool(x), 1)
        return self.fc2(self.act3(self.fc1(x)))


class PaddedAvgPoolNet(nn.Module):
    """conv -> ReLU -> AvgPool2d(3, stride=1, padding=1, count_include_pad=True) ->
    conv(padding=1) -> ReLU -> avgpool -> Linear.

    Exercises zero padding inside a pooling layer: a removed channel's constant bias
    would be averaged with padding zeros at the borders, so it is not a constant there.
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=True)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = _Head(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        return self.head(F.relu(self.conv2(x)))


# --------------------------------------------------------------------------- third-party shapes
# One model per failure class seen on third-party models (issue 9): each is the smallest
# faithful rewrite of the pattern that crashed, hung or blew memory in channel-group tracing.


def _channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ``channel_shuffle``: view(b, g, c//g, h, w) -> transpose(1, 2) -> view(b, c, h, w)."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleV2Unit(nn.Module):
    """torchvision's ShuffleNetV2 ``InvertedResidual``. Stride 1: ``x1, x2 = x.chunk(2, 1)``, x2 through
    branch2 (1x1 conv+BN+ReLU, 3x3 depthwise conv+BN, 1x1 conv+BN+ReLU), ``cat((x1, branch2(x2)))``.
    Stride 2: ``cat((branch1(x), branch2(x)))`` with branch1 = depthwise conv+BN, 1x1 conv+BN+ReLU.
    Then ``channel_shuffle(out, 2)``.

    Exercises chunk feeding a cat whose halves are then interleaved by a channel shuffle.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(cin if stride > 1 else half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return _channel_shuffle(out, 2)


class ShuffleNetV2Small(nn.Module):
    """ShuffleNetV2 written out: stem 3x3 conv+BN+ReLU (3 -> 8), a stride-2 ShuffleV2Unit (8 -> 16, both
    branches), a stride-1 unit (16 -> 16, chunk), 1x1 conv+BN+ReLU (16 -> 32), avgpool, Linear.
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8, 3, padding=1, act=nn.ReLU(inplace=True))
        self.stage = nn.Sequential(ShuffleV2Unit(8, 16, 2), ShuffleV2Unit(16, 16, 1))
        self.conv5 = _conv_bn(16, 32, 1, act=nn.ReLU(inplace=True))
        self.head = _Head(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv5(self.stage(self.stem(x))))


def _cbs(cin: int, cout: int, k: int = 1, stride: int = 1) -> nn.Sequential:
    """ultralytics' ``Conv``: bias-free conv (padding k // 2) -> BN -> SiLU."""
    return _conv_bn(cin, cout, k, stride=stride, padding=k // 2, act=nn.SiLU(inplace=True))


class YoloBottleneck(nn.Module):
    """ultralytics' ``Bottleneck``: two 3x3 Conv-BN-SiLU, ``x + cv2(cv1(x))`` when ``shortcut``."""

    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = _cbs(c, c, 3)
        self.cv2 = _cbs(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """ultralytics' C2f: ``y = list(cv1(x).chunk(2, 1)); y.extend(m(y[-1]) for m in self.m);
    return cv2(torch.cat(y, 1))``.

    Exercises a chunk whose second half feeds both a cat and a residual bottleneck chain.
    """

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = _cbs(c1, 2 * self.c, 1)
        self.cv2 = _cbs((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(YoloBottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """ultralytics' SPPF: Conv, the same MaxPool2d(5, 1, 2) applied 3 times in a row, cat of the four, Conv."""

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        hidden = c1 // 2
        self.cv1 = _cbs(c1, hidden, 1)
        self.cv2 = _cbs(hidden * 4, c2, 1)
        self.m = nn.MaxPool2d(k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class C2fNet(nn.Module):
    """YOLOv8-style: Conv/2 (3 -> 8), C2f (8, shortcut), Conv/2 (8 -> 16), SPPF (16), and a detection
    head returning a **list** of two maps: a 1x1 conv on each of the two feature levels.

    Exercises chunk + extend + cat, repeated pooling of one tensor, and a list output.
    """

    def __init__(self, outputs: int = 6) -> None:
        super().__init__()
        self.stem = _cbs(3, 8, 3, 2)
        self.c2f = C2f(8, 8, n=1, shortcut=True)
        self.down = _cbs(8, 16, 3, 2)
        self.sppf = SPPF(16, 16)
        self.detect = nn.ModuleList([nn.Conv2d(8, outputs, 1), nn.Conv2d(16, outputs, 1)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.c2f(self.stem(x))
        p4 = self.sppf(self.down(p3))
        return [self.detect[0](p3), self.detect[1](p4)]


class WindowAttention(nn.Module):
    """Swin window attention on (windows, tokens, C): qkv Linear, heads, a learned relative position
    bias (a bare ``(heads, N, N)`` parameter) added to the scores, softmax, proj Linear."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        n = window * window
        self.relative_position_bias = nn.Parameter(0.1 * torch.randn(heads, n, n))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.relative_position_bias
        if mask is not None:  # (windows, n, n), per image: view the window batch as (images, windows)
            windows = mask.shape[0]
            attn = attn.view(b // windows, windows, self.heads, n, n) + mask[None, :, None]
            attn = attn.view(b, self.heads, n, n)
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class SwinBlock(nn.Module):
    """Swin block in NHWC: LayerNorm -> ``F.pad`` H, W to a multiple of the window -> ``torch.roll``
    by ``-shift`` -> view/permute into windows -> WindowAttention (with torchvision's shifted-window
    mask, -100 between regions the roll brought together) -> windows back -> roll by ``shift`` ->
    crop -> residual; LayerNorm -> Linear -> GELU -> Linear -> residual.
    """

    def __init__(self, dim: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws, s = self.window, self.shift
        y = F.pad(self.norm1(x), (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
        hp, wp = y.shape[1], y.shape[2]
        y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = y.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        y = self.attn(y, self._shift_mask(y, hp, wp) if s else None)
        y = y.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        y = torch.roll(y, shifts=(s, s), dims=(1, 2))[:, :h, :w, :].contiguous()
        x = x + y
        return x + self.mlp(self.norm2(x))

    def _shift_mask(self, like: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
        """torchvision's ``shifted_window_attention`` mask, (windows, ws * ws, ws * ws)."""
        ws, s = self.window, self.shift
        region = like.new_zeros((hp, wp))
        count = 0
        for h0, h1 in ((0, -ws), (-ws, -s), (-s, None)):
            for w0, w1 in ((0, -ws), (-ws, -s), (-s, None)):
                region[h0:h1, w0:w1] = count
                count += 1
        region = region.view(hp // ws, ws, wp // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
        diff = region.unsqueeze(1) - region.unsqueeze(2)
        return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class SwinSmall(nn.Module):
    """Swin written out: patch-embed conv (2x2, stride 2, 3 -> 16), permute to NHWC, LayerNorm, one
    shifted-window SwinBlock (window 3, shift 1: an 8x8 map is padded to 9x9), LayerNorm, mean over
    H, W, Linear.

    Exercises pad and roll on channels-last maps, window partition views, and attention.
    """

    def __init__(self, classes: int = 10, dim: int = 16, heads: int = 2, window: int = 3) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 2, stride=2)
        self.patch_norm = nn.LayerNorm(dim)
        self.block = SwinBlock(dim, heads, window, shift=window // 2)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_norm(self.patch_embed(x).permute(0, 2, 3, 1))
        x = self.norm(self.block(x))
        return self.head(x.mean((1, 2)))


class PartialResidualBlock(nn.Module):
    """ReXNet ``LinearBottleneck``: 1x1 expand conv+BN+SiLU, 3x3 depthwise conv+BN+ReLU6, 1x1 project
    conv+BN, then the shortcut added into the first ``cin`` of ``cout`` channels only. ``inplace=False``:
    timm's ``torch.cat([out[:, :cin] + x, out[:, cin:]], 1)``; ``inplace=True``: the original
    ``out[:, 0:cin] += x``.

    Exercises a residual that ties a channel *slice* of the output to the input.
    """

    def __init__(self, cin: int, cout: int, expand: int = 2, inplace: bool = False) -> None:
        super().__init__()
        hidden = cin * expand
        self.cin, self.inplace = cin, inplace
        self.expand = _conv_bn(cin, hidden, 1, act=nn.SiLU(inplace=True))
        self.depthwise = _conv_bn(hidden, hidden, 3, padding=1, groups=hidden, act=nn.ReLU6(inplace=True))
        self.project = _conv_bn(hidden, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        if self.inplace:
            out[:, 0:self.cin] += x
            return out
        return torch.cat([out[:, :self.cin] + x, out[:, self.cin:]], 1)


class ReXNetSmall(nn.Module):
    """ReXNet-style: stem conv/2+BN+SiLU (3 -> 8), PartialResidualBlock 8 -> 12 (cat form),
    PartialResidualBlock 12 -> 16 (in-place slice add), 1x1 conv+BN+SiLU (16 -> 32), avgpool, Linear.
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8, 3, stride=2, padding=1, act=nn.SiLU(inplace=True))
        self.block1 = PartialResidualBlock(8, 12)
        self.block2 = PartialResidualBlock(12, 16, inplace=True)
        self.head_conv = _conv_bn(16, 32, 1, act=nn.SiLU(inplace=True))
        self.head = _Head(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_conv(self.block2(self.block1(self.stem(x)))))


def _relative_buckets(q_len: int, k_len: int, buckets: int, max_distance: int, bidirectional: bool,
                      device: torch.device) -> torch.Tensor:
    """T5's ``_relative_position_bucket`` for every (query, key) pair: exact buckets for small
    distances, log-spaced up to ``max_distance``; half the buckets per sign when bidirectional."""
    rel = torch.arange(k_len, device=device)[None, :] - torch.arange(q_len, device=device)[:, None]
    out = torch.zeros_like(rel)
    if bidirectional:
        buckets //= 2
        out = out + (rel > 0).long() * buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    exact = buckets // 2
    large = exact + (torch.log(rel.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (buckets - exact)).long()
    large = torch.clamp(large, max=buckets - 1)
    return out + torch.where(rel < exact, rel, large)


class Seq2SeqAttention(nn.Module):
    """Attention with Linear q/k/v/o, ``softmax(q k^T / sqrt(d) + bias) v``. With ``buckets`` it owns a
    T5 relative position bias ``nn.Embedding(buckets, heads)`` added to the scores; ``causal`` adds
    a -inf mask above the diagonal."""

    def __init__(self, dim: int, heads: int, *, buckets: int = 0, bidirectional: bool = True,
                 causal: bool = False, max_distance: int = 16) -> None:
        super().__init__()
        self.heads, self.causal, self.bidirectional, self.max_distance = heads, causal, bidirectional, max_distance
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.relative_attention_bias = nn.Embedding(buckets, heads) if buckets else None

    def forward(self, x: torch.Tensor, memory: Optional[torch.Tensor] = None) -> torch.Tensor:
        memory = x if memory is None else memory
        b, lq, c = x.shape
        lk, d = memory.shape[1], c // self.heads
        q = self.q(x).view(b, lq, self.heads, d).transpose(1, 2)
        k = self.k(memory).view(b, lk, self.heads, d).transpose(1, 2)
        v = self.v(memory).view(b, lk, self.heads, d).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        if self.relative_attention_bias is not None:
            buckets = _relative_buckets(lq, lk, self.relative_attention_bias.num_embeddings,
                                        self.max_distance, self.bidirectional, x.device)
            scores = scores + self.relative_attention_bias(buckets).permute(2, 0, 1)[None]
        if self.causal:
            scores = scores + torch.full((lq, lk), float("-inf"), device=x.device).triu(1)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, c)
        return self.o(out)


class EncoderDecoder(nn.Module):
    """A T5-like encoder-decoder written out, on (source, target) token ids. One shared Embedding;
    encoder block: LayerNorm -> self-attention (bidirectional relative bias) -> residual,
    LayerNorm -> Linear-ReLU-Linear -> residual, LayerNorm; decoder block: LayerNorm -> causal
    self-attention (unidirectional relative bias) -> residual, LayerNorm -> cross-attention on the
    encoder output -> residual, MLP -> residual, LayerNorm; LM head Linear.

    Exercises two token inputs, cross-attention, and an Embedding whose columns are attention heads.
    """

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 2, hidden: int = 32, buckets: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.enc_norm1 = nn.LayerNorm(dim)
        self.enc_attn = Seq2SeqAttention(dim, heads, buckets=buckets, bidirectional=True)
        self.enc_norm2 = nn.LayerNorm(dim)
        self.enc_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.enc_norm = nn.LayerNorm(dim)
        self.dec_norm1 = nn.LayerNorm(dim)
        self.dec_attn = Seq2SeqAttention(dim, heads, buckets=buckets, bidirectional=False, causal=True)
        self.dec_norm2 = nn.LayerNorm(dim)
        self.cross_attn = Seq2SeqAttention(dim, heads)
        self.dec_norm3 = nn.LayerNorm(dim)
        self.dec_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.dec_norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = self.embed(source)
        h = h + self.enc_attn(self.enc_norm1(h))
        h = self.enc_norm(h + self.enc_mlp(self.enc_norm2(h)))
        y = self.embed(target)
        y = y + self.dec_attn(self.dec_norm1(y))
        y = y + self.cross_attn(self.dec_norm2(y), h)
        y = self.dec_norm(y + self.dec_mlp(self.dec_norm3(y)))
        return self.lm_head(y)


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm written out: ``x * rsqrt(mean(x^2, -1) + eps) * weight``. The weight starts
    random around 1 (not all ones) so that it is never an identity."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(0.5 + torch.rand(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), -1)


class GQAttention(nn.Module):
    """LLaMA attention with grouped queries: q Linear to ``heads`` heads, k / v Linears to ``kv_heads``
    (Qwen2-style biases on q, k, v; none on o), rotary embedding on q and k, ``repeat_kv``
    (``k[:, :, None].expand(B, kvh, rep, L, d).reshape(B, kvh * rep, L, d)``), causal
    ``F.scaled_dot_product_attention``, o Linear."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        b, kvh, length, d = t.shape
        rep = self.heads // kvh
        return t[:, :, None].expand(b, kvh, rep, length, d).reshape(b, kvh * rep, length, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(b, length, self.heads, d).transpose(1, 2)
        k = self.k_proj(x).view(b, length, self.kv_heads, d).transpose(1, 2)
        v = self.v_proj(x).view(b, length, self.kv_heads, d).transpose(1, 2)
        freqs = torch.arange(length, device=x.device, dtype=torch.float32)[:, None] * self.inv_freq[None]
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos(), emb.sin()
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, self._repeat_kv(k), self._repeat_kv(v), is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, self.heads * d))


class GQADecoder(nn.Module):
    """A LLaMA-style decoder written out: token Embedding, one block (RMSNorm -> GQAttention (4 query
    heads sharing 2 kv heads, rotary) -> residual; RMSNorm -> GLU MLP ``down(silu(gate(x)) * up(x))``
    -> residual), RMSNorm, LM head Linear.

    Exercises repeat_kv (expand + reshape of kv heads), rotary chunk/cat, a hand-written RMSNorm and a GLU.
    """

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 4, kv_heads: int = 2, hidden: int = 32) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.input_norm = RMSNorm(dim)
        self.attn = GQAttention(dim, heads, kv_heads)
        self.post_attention_norm = RMSNorm(dim)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(tokens)
        h = h + self.attn(self.input_norm(h))
        x = self.post_attention_norm(h)
        h = h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.lm_head(self.norm(h))


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: a deterministic builder, an example-input generator and metadata.

    ``sizes`` lists other spatial sizes (H, W), sequence lengths (L,) or, for two token
    inputs, (source length, target length) pairs the model accepts
    (use :func:`example_inputs_at` to make inputs at them); empty when the input size is
    fixed, e.g. by a flatten->Linear.
    """

    name: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[int], tuple]
    sizes: tuple[tuple[int, ...], ...] = ()
    description: str = ""


_INPUT_SEED = 1234
_BUILD_SEED = 0
_NORM_SEED = 1


def _float_inputs(batch: int, size: tuple[int, ...], *, channels: int) -> tuple:
    gen = torch.Generator().manual_seed(_INPUT_SEED)
    return (torch.randn((batch, channels, *size), generator=gen),)


def _token_inputs(batch: int, size: tuple[int, ...], *, vocab: int) -> tuple:
    gen = torch.Generator().manual_seed(_INPUT_SEED)
    return (torch.randint(0, vocab, (batch, *size), generator=gen, dtype=torch.long),)


def _seq2seq_inputs(batch: int, size: tuple[int, ...], *, vocab: int) -> tuple:
    """(source, target) token ids of lengths ``size = (source_len, target_len)``."""
    gen = torch.Generator().manual_seed(_INPUT_SEED)
    return tuple(torch.randint(0, vocab, (batch, n), generator=gen, dtype=torch.long) for n in size)


def _builder(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build_model() -> nn.Module:
        torch.manual_seed(_BUILD_SEED)
        model = factory()
        randomize_(model, _NORM_SEED)
        return model.eval()

    build_model.__name__ = f"build_{getattr(factory, '__name__', 'model')}"
    return build_model


# name -> (factory, sized-input maker (batch, size) -> tuple, default size, other sizes)
_SizedInputs = Callable[[int, tuple[int, ...]], tuple]
_SPECS: dict[str, tuple[Callable[[], nn.Module], _SizedInputs, tuple[int, ...],
                        tuple[tuple[int, ...], ...]]] = {}
_IMG = functools.partial(_float_inputs, channels=3)
_OTHER_HW = ((12, 12), (19, 19))

_SPECS["lenet"] = (LeNet, functools.partial(_float_inputs, channels=1), (28, 28), ())
_SPECS["vgg"] = (VGGSmall, _IMG, (16, 16), _OTHER_HW)
_SPECS["resnet_basic"] = (ResNetBasicSmall, _IMG, (16, 16), _OTHER_HW)
_SPECS["resnet_bottleneck"] = (ResNetBottleneckSmall, _IMG, (16, 16), _OTHER_HW)
_SPECS["mobilenetv2"] = (MobileNetV2Small, _IMG, (16, 16), _OTHER_HW)
_SPECS["densenet"] = (DenseNetSmall, _IMG, (16, 16), _OTHER_HW)
_SPECS["convnext"] = (ConvNeXtSmall, _IMG, (16, 16), _OTHER_HW)
_SPECS["vit"] = (ViTSmall, _IMG, (16, 16), _OTHER_HW)
_SPECS["se"] = (SENet, _IMG, (16, 16), _OTHER_HW)
_SPECS["shuffle"] = (ShuffleNet, _IMG, (16, 16), _OTHER_HW)
_SPECS["grouped"] = (GroupedConvNet, _IMG, (16, 16), _OTHER_HW)
_SPECS["pool_fc"] = (PoolFC, _IMG, (16, 16), _OTHER_HW)
_SPECS["conv1d"] = (Conv1dNet, functools.partial(_float_inputs, channels=4), (32,), ((24,), (41,)))
_SPECS["embedding"] = (EmbeddingMLP, functools.partial(_token_inputs, vocab=50), (12,), ((5,), (20,)))
_SPECS["activations"] = (ActivationsNet, _IMG, (16, 16), _OTHER_HW)
_SPECS["padded_avgpool"] = (PaddedAvgPoolNet, _IMG, (16, 16), _OTHER_HW)
_SPECS["shuffle_unit"] = (ShuffleNetV2Small, _IMG, (16, 16), _OTHER_HW)
_SPECS["c2f"] = (C2fNet, _IMG, (16, 16), _OTHER_HW)
_SPECS["swin_window"] = (SwinSmall, _IMG, (16, 16), _OTHER_HW)
_SPECS["partial_residual"] = (ReXNetSmall, _IMG, (16, 16), _OTHER_HW)
_SPECS["enc_dec"] = (EncoderDecoder, functools.partial(_seq2seq_inputs, vocab=50), (12, 8), ((5, 7), (16, 16)))
_SPECS["gqa"] = (GQADecoder, functools.partial(_token_inputs, vocab=50), (12,), ((5,), (16,)))
_SPECS["resnet50"] = (functools.partial(resnet50_like, 1 / 16), _IMG, (64, 64), ((40, 40), (57, 57)))


def _description(factory: Callable[[], nn.Module]) -> str:
    target = factory.func if isinstance(factory, functools.partial) else factory
    doc = (target.__doc__ or "").strip()
    return " ".join(doc.split("\n\n", 1)[0].split())


def _make_entries() -> dict[str, ZooEntry]:
    entries: dict[str, ZooEntry] = {}
    for name, (factory, sized, default, others) in _SPECS.items():
        def example_inputs(batch: int, _sized: _SizedInputs = sized,
                           _size: tuple[int, ...] = default) -> tuple:
            return _sized(batch, _size)

        desc = _description(factory)
        if name == "resnet50":
            desc = "resnet50_like(width=1/16): the [3, 4, 6, 3] bottleneck ResNet-50 at channels 4..128, 3x64x64 input."
        entries[name] = ZooEntry(name=name, build=_builder(factory), example_inputs=example_inputs,
                                 sizes=others, description=desc)
    return entries


_ENTRIES: dict[str, ZooEntry] = _make_entries()
NAMES: tuple[str, ...] = tuple(_ENTRIES)


def get(name: str) -> ZooEntry:
    """The zoo entry called ``name``; KeyError listing the valid names otherwise."""
    try:
        return _ENTRIES[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; valid names: {', '.join(NAMES)}") from None


def build(name: str) -> tuple[nn.Module, tuple]:
    """Build zoo model ``name`` (deterministic weights, eval mode) with ``example_inputs(2)``."""
    entry = get(name)
    return entry.build().eval(), entry.example_inputs(2)


def example_inputs_at(name: str, batch: int, size: Sequence[int]) -> tuple:
    """Deterministic inputs for zoo model ``name`` at another spatial size / length ``size``
    (one of ``get(name).sizes``, or any other size the model accepts)."""
    get(name)
    _, sized, default, _ = _SPECS[name]
    size = tuple(int(s) for s in size)
    if len(size) != len(default):
        raise ValueError(f"{name}: size {size} should have {len(default)} dimension(s), like {default}")
    return sized(batch, size)
