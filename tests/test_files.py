"""compactor/files.py: atomic writes, the one reader of torch.save files, the one state_dict key check."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from compactor import files
from compactor.errors import LoadError


def _read(path):
    return files.read_weights(path, error=LoadError, name=f"'{path}'", written_by="torch.save(model.state_dict(), path)",
                              pickled=" (a whole model?); save its state_dict instead")


# --------------------------------------------------------------------------- atomic writes


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    """An exception half-way through the block: the target keeps its old bytes, no temporary file is left."""
    path = tmp_path / "m.pt"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with files.atomic_write(path, force=True) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half of the new")
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["m.pt"]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with files.atomic_write(tmp_path / "new.pt") as tmp:
            open(tmp, "wb").write(b"partial")
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_refuses_to_overwrite_without_force(tmp_path):
    """An existing file is kept unless force=True; the block does not even run."""
    path = tmp_path / "m.pt"
    path.write_bytes(b"keep me")
    ran = []
    with pytest.raises(FileExistsError, match=r"m\.pt exists; pass force=True"):
        with files.atomic_write(path) as tmp:
            ran.append(tmp)
    assert ran == [] and path.read_bytes() == b"keep me"
    with pytest.raises(FileExistsError, match="force"):
        files.atomic_save({"w": torch.ones(2)}, path)
    files.atomic_save({"w": torch.ones(2)}, path, force=True)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["m.pt"]


def test_refuses_a_file_that_appears_while_writing(tmp_path):
    """Another process creates the target during the write: it wins, our temporary file is removed."""
    path = tmp_path / "m.pt"
    with pytest.raises(FileExistsError):
        with files.atomic_write(path) as tmp:
            open(tmp, "wb").write(b"ours")
            path.write_bytes(b"theirs")
    assert path.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["m.pt"]


def test_a_folder_is_not_a_file_name(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        with files.atomic_write(tmp_path, force=True):
            pass


# --------------------------------------------------------------------------- reading


def test_read_weights_returns_what_was_saved(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"fc.weight": torch.arange(6.0).view(2, 3)}, path)
    assert torch.equal(_read(path)["fc.weight"], torch.arange(6.0).view(2, 3))


def test_read_weights_missing_file(tmp_path):
    """The message names the file and says how to write one."""
    with pytest.raises(LoadError, match=r"'.*nope\.pt' does not exist; check the path \(write one with "
                                        r"torch\.save\(model\.state_dict\(\), path\)\)"):
        _read(tmp_path / "nope.pt")


def test_read_weights_refuses_a_pickled_model(tmp_path):
    """A whole pickled module is never unpickled (weights_only); the caller's advice is in the message."""
    path = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2), path)
    with pytest.raises(LoadError, match=r"model\.pt' holds pickled Python objects \(a whole model\?\); save its "
                                        r"state_dict instead"):
        _read(path)


def test_read_weights_truncated_file(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(LoadError, match=r"sd\.pt' could not be read \(.*\); it may be truncated .*: write it "
                                        r"again with torch\.save"):
        _read(path)


def test_read_weights_raises_the_callers_error_class(tmp_path):
    class MyError(Exception):
        pass

    with pytest.raises(MyError, match="weights 'x' does not exist"):
        files.read_weights(tmp_path / "x", error=MyError, name="weights 'x'", written_by="save()", pickled="")


# --------------------------------------------------------------------------- key check


def _check(expected, state, **kw):
    files.check_keys(expected, state, error=LoadError, model="Net", source="the file", fix="pass Net",
                     shape_fix="resave it", **kw)


def test_check_keys_names_missing_and_unexpected_keys():
    """Missing and unexpected keys are named, missing first, then the fix."""
    expected = {"a.weight": torch.ones(2), "a.bias": torch.ones(2)}
    with pytest.raises(LoadError, match=r"^the file does not match Net: missing a\.bias; unexpected b\.weight; "
                                        r"pass Net$"):
        _check(expected, {"a.weight": torch.ones(2), "b.weight": torch.ones(2)})
    with pytest.raises(LoadError, match=r"Net has a\.bias that the file lacks; the file has b\.weight that Net lacks"):
        _check(expected, {"a.weight": torch.ones(2), "b.weight": torch.ones(2)}, name_sides=True)


def test_check_keys_lists_at_most_five_keys():
    expected = {f"k{i}": torch.ones(1) for i in range(8)}
    with pytest.raises(LoadError, match=r"missing k0, k1, k2, k3, k4 \(\+3 more\);"):
        _check(expected, {})


def test_check_keys_names_the_key_whose_shape_differs():
    with pytest.raises(LoadError, match=r"key 'a\.weight' has shape \(3,\) in the file but \(2,\) in Net; resave it"):
        _check({"a.weight": torch.ones(2)}, {"a.weight": torch.ones(3)})
    _check({"a.weight": torch.ones(2)}, {"a.weight": torch.zeros(2)})  # same keys and shapes: no error
