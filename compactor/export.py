"""ONNX export with onnxruntime parity; save / load of compact models; atomic file writes."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

__all__ = ["atomic_save"]


def atomic_save(obj: Any, path: str, *, force: bool = False) -> str:
    """``torch.save`` to ``path`` through a temporary file in the same folder, renamed at the end.

    A crash never leaves a half-written file; an existing file is replaced only with ``force``.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite it")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
