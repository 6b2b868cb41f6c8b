"""Files: atomic writes, the one reader of ``torch.save`` files, the one state_dict key check.

A base module: it imports only :mod:`compactor.errors` and :mod:`compactor.tensors`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
from typing import Any, Iterator, Mapping, Sequence, Union

import torch

from .tensors import first_line

__all__ = ["refuse_overwrite", "replace_folder", "atomic_write", "atomic_save", "read_weights", "check_keys"]

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- atomic writes


def refuse_overwrite(path: PathLike, *, force: bool = False) -> None:
    """Raise ``FileExistsError`` if ``path`` exists and ``force`` is false: check before the work starts."""
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} exists; pass force=True (--force) to overwrite it")


def replace_folder(tmp: PathLike, path: PathLike) -> None:
    """Move the finished folder ``tmp`` to ``path`` (beside it, same disk); an existing ``path`` is moved aside
    first and deleted only once the new folder is in place (put back if the move fails)."""
    parent = os.path.dirname(os.path.abspath(path))
    old_folder = None
    if os.path.exists(path):
        old_folder = tempfile.mkdtemp(prefix=".compactor-old-", dir=parent)
        os.replace(path, os.path.join(old_folder, "x"))
    try:
        os.replace(tmp, path)
    except BaseException:
        if old_folder is not None:
            os.replace(os.path.join(old_folder, "x"), path)
        raise
    finally:
        if old_folder is not None:
            shutil.rmtree(old_folder, ignore_errors=True)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: PathLike, *, force: bool = False) -> Iterator[str]:
    """Write to the temporary file this yields, next to ``path``; it becomes ``path`` when the block ends.

    An exception in the block (or a crash) never leaves a half-written ``path``: the
    temporary file is removed and ``path`` keeps what it held. An existing ``path`` is
    replaced only with ``force``, checked before the block runs and again before the rename.

    Raises:
        FileExistsError: ``path`` exists and ``force`` is false.
        IsADirectoryError: ``path`` is a folder.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
        >>> with atomic_write(path) as tmp:
        ...     with open(tmp, "w") as f:
        ...         _ = f.write("done")
        >>> open(path).read()
        'done'
    """
    path = os.fspath(path)
    refuse_overwrite(path, force=force)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600 files; give what open() would have given
        refuse_overwrite(path, force=force)  # it may have appeared while we were writing
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: PathLike, *, force: bool = False) -> str:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`; returns ``path``.

    Raises:
        FileExistsError: ``path`` exists and ``force`` is false.
    """
    with atomic_write(path, force=force) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    return os.fspath(path)


# --------------------------------------------------------------------------- reading


def read_weights(path: PathLike, *, error: type[Exception], name: str, written_by: str, pickled: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: nothing in the file is executed.

    Every failure raises one ``error`` that names the file and says how to write a good one.

    Args:
        path: the file to read.
        error: the exception class to raise (``MaskLoadError``, ``LoadError``).
        name: how messages name the file, e.g. ``"weights file 'x.pth'"``.
        written_by: the call that writes a good file, e.g. ``"torch.save(model.state_dict(), path)"``.
        pickled: what messages add after "holds pickled Python objects" (the file is a
            pickle ``weights_only`` refuses): why, and what to do instead.

    Raises:
        error: ``path`` is missing, a folder, a pickle of Python objects, truncated or not a torch.save file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise error(f"{name} does not exist; check the path (write one with {written_by})")
    if os.path.isdir(path):
        raise error(f"{name} is a folder; pass the file written by {written_by}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text:
            raise error(f"{name} holds pickled Python objects{pickled}") from None
        after = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
        detail = next((line.strip() for line in after.splitlines() if line.strip()), "")
        raise error(f"{name} could not be read (unpickling failed{': ' + detail if detail else ''}); it may be "
                    f"truncated or damaged: write it again with {written_by}") from None
    except Exception as exc:  # torch raises many types for corrupt / truncated files
        raise error(f"{name} could not be read ({first_line(exc)}); it may be truncated or not a torch.save "
                    f"file: write it again with {written_by}") from None


# --------------------------------------------------------------------------- checking


def _short_list(keys: Sequence[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_keys(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], *, error: type[Exception],
               model: str, source: str, fix: str, shape_fix: str, name_sides: bool = False) -> None:
    """Raise ``error`` unless ``state`` has exactly ``expected``'s keys, each at the same shape.

    Args:
        expected: what the model holds (its ``state_dict()``).
        state: what was read.
        error: the exception class to raise.
        model: the model's name in messages (its class name).
        source: what ``state`` is, in messages: ``"the state_dict"``, ``"the file"``.
        fix: what to do about missing or unexpected keys.
        shape_fix: what to do about a shape mismatch.
        name_sides: say "``model`` has k that ``source`` lacks" instead of "missing k".

    Raises:
        error: missing or unexpected keys (the first five of each named), or the first
            key whose shapes differ.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{model} has {_short_list(missing)} that {source} lacks" if name_sides
                         else f"missing {_short_list(missing)}")
        if unexpected:
            parts.append(f"{source} has {_short_list(unexpected)} that {model} lacks" if name_sides
                         else f"unexpected {_short_list(unexpected)}")
        raise error(f"{source} does not match {model}: {'; '.join(parts)}; {fix}")
    for key, tensor in state.items():
        want = tuple(expected[key].shape)
        if tuple(tensor.shape) != want:
            raise error(f"key '{key}' has shape {tuple(tensor.shape)} in {source} but {want} in {model}; {shape_fix}")
