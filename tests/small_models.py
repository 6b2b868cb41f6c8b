"""Small models compacted once per session, shared by tests/test_export.py and tests/test_saving.py.

Each builder returns ``(compact, masked, example)``; every test only reads them (export and
save copy the model; none is modified).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import compactor
from compactor.demo import LeNet, prune_like_the_seeds


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


class BorderBN(nn.Module):
    """conv+BN+ReLU into a stride-1 padded conv+BN (the BN takes the border correction), then a stride-2 padded
    conv+BN (the conv keeps it), pooled Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
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


def _mask_channels(model: nn.Module, layers: tuple[str, ...], channels: list[int]) -> nn.Module:
    """Mask the same output channels (8 in all) of every layer named in ``layers``, by hand."""
    rows = torch.ones(8, 1, 1, 1)
    rows[channels] = 0
    for name in layers:
        layer = getattr(model, name)
        prune.custom_from_mask(layer, "weight", rows.expand_as(layer.weight))
    return model


def _compacted(masked: nn.Module, *shape: int, border: str = "carrier") -> tuple[nn.Module, nn.Module, torch.Tensor]:
    x = torch.randn(*shape)
    return compactor.compact(masked, x, border=border), masked, x


@functools.lru_cache(maxsize=None)
def lenet_compact():
    torch.manual_seed(0)
    return _compacted(prune_like_the_seeds(LeNet().eval()), 2, 1, 28, 28)


@functools.lru_cache(maxsize=None)
def resbn_compact():
    """The residual ties conv1's and conv2's channels: the same ones are masked in both."""
    torch.manual_seed(0)
    return _compacted(_mask_channels(_randomize_bn(ResBN()).eval(), ("conv1", "conv2"), [0, 3, 5]), 2, 3, 16, 16)


@functools.lru_cache(maxsize=None)
def depthwise_compact():
    """The depthwise conv ties its channels to pw1's: the same ones are masked in both."""
    torch.manual_seed(0)
    return _compacted(_mask_channels(_randomize_bn(Depthwise()).eval(), ("pw1", "dw"), [1, 4, 6]), 2, 3, 16, 16)


@functools.lru_cache(maxsize=None)
def border_compact():
    """Half of conv1's channels go (ln_structured); border='layers': conv2 becomes a BorderCorrectedConv2d."""
    torch.manual_seed(0)
    masked = Border().eval()
    prune.ln_structured(masked.conv1, "weight", 0.5, n=2, dim=0)
    return _compacted(masked, 2, 3, 16, 16, border="layers")


@functools.lru_cache(maxsize=None)
def border_bn_compact():
    """Rows of conv1 and conv2 masked; border='layers': bn2 becomes a BorderCorrectedBatchNorm2d, conv3 a
    BorderCorrectedConv2d."""
    torch.manual_seed(0)
    masked = _randomize_bn(BorderBN()).eval()
    for name, rows in (("conv1", [0, 2, 5]), ("conv2", [1, 6])):
        mask = torch.ones(8, 1, 1, 1)
        mask[rows] = 0
        layer = getattr(masked, name)
        prune.custom_from_mask(layer, "weight", mask.expand_as(layer.weight))
    return _compacted(masked, 2, 3, 15, 15, border="layers")


COMPACTED = {"lenet": lenet_compact, "resbn": resbn_compact, "depthwise": depthwise_compact, "border": border_compact,
             "border_bn": border_bn_compact}
ARCH = {"lenet": LeNet, "resbn": ResBN, "depthwise": Depthwise, "border": Border, "border_bn": BorderBN}
