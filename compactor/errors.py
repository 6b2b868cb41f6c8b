"""Exceptions raised by compactor. Each message names the layer or key, says why, and what to do."""

from __future__ import annotations

__all__ = ["CompactionError", "NoPruningFoundError", "VerificationError", "MaskLoadError"]


class CompactionError(ValueError):
    """The model cannot be compacted as asked; the message says which layer and why."""


class NoPruningFoundError(CompactionError):
    """The model carries no torch.nn.utils.prune masks and no all-zero channels."""


class VerificationError(CompactionError):
    """The compact model's outputs differ from the masked model's beyond tolerance."""


class MaskLoadError(CompactionError):
    """A pruned state_dict could not be loaded into the given model."""
