"""Tiny models shared by the unit tests, and the one helper that masks rows by hand."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune


def mask_rows(module: nn.Module, rows: list[int]) -> None:
    """Mask output rows ``rows`` of ``module.weight`` with ``prune.custom_from_mask`` (the expected shapes are known)."""
    mask = torch.ones_like(module.weight)
    mask[rows] = 0
    prune.custom_from_mask(module, "weight", mask)


class Tied(nn.Module):
    """An embedding tied to the output projection: e(t) -> relu(h) -> o, o.weight is e.weight."""

    def __init__(self) -> None:
        super().__init__()
        self.e, self.h = nn.Embedding(10, 6), nn.Linear(6, 6)
        self.o = nn.Linear(6, 10, bias=False)
        self.o.weight = self.e.weight

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.o(torch.relu(self.h(self.e(t))))


class Scaled(nn.Module):
    """b(gamma * relu(a(x))) with gamma a bare nn.Parameter (6,): a layer scale sliced with a's rows."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)
        self.gamma = nn.Parameter(torch.ones(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.gamma * torch.relu(self.a(x)))


class Residual(nn.Module):
    """c(relu(a(x) + b(x))): a and b write the same channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.a(x) + self.b(x)))


class Halves(nn.Module):
    """h = relu(conv(x)); l(h[:, :4]) + r(h[:, 4:]): fixed channel slices."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.l, self.r = nn.Conv2d(3, 8, 3), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.l(h[:, :4]) + self.r(h[:, 4:])
