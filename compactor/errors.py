"""Exceptions raised by compactor. Each message names the layer or key, says why, and what to do."""

from __future__ import annotations

__all__ = ["CompactionError", "NoPruningFoundError", "VerificationError", "MaskLoadError", "ExportError", "LoadError"]


class CompactionError(ValueError):
    """The model cannot be compacted as asked; the message says which layer and why."""


class NoPruningFoundError(CompactionError):
    """The model carries no torch.nn.utils.prune masks and no all-zero channels."""


class VerificationError(RuntimeError):
    """The compact model's outputs differ from the masked model's beyond tolerance: a bug in compactor, not bad
    input, so it is not a :class:`CompactionError` (``except CompactionError`` does not swallow it)."""


class MaskLoadError(CompactionError):
    """A pruned state_dict could not be loaded into the given model."""


class ExportError(CompactionError):
    """ONNX export failed, or onnxruntime's outputs differ from PyTorch's beyond tolerance."""


class LoadError(CompactionError):
    """A file written by :func:`compactor.save` could not be read or does not fit the architecture."""
