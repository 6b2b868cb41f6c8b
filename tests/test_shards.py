"""compactor.shards: the safetensors reader and writer the out-of-core path streams a checkpoint through."""

from __future__ import annotations

import json
import os

import pytest
import torch

from compactor import shards
from compactor.errors import CompactionError

safetensors_torch = pytest.importorskip("safetensors.torch")


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(5, 3, generator=g).bfloat16(), "ids": torch.arange(7), "scalar": torch.tensor(2.5),
            "flags": torch.tensor([[True, False], [False, True]]), "half": torch.randn(2, 2, 2, generator=g).half(),
            "view": torch.randn(4, 3, generator=g)[:, :2], "empty": torch.zeros(0, 4)}


def test_written_files_read_back_equal_through_safetensors_and_our_reader(tmp_path):
    ts = _tensors()
    n = shards.write_shard(tmp_path / shards.SINGLE, ts)
    assert n == sum(t.numel() * t.element_size() for t in ts.values())
    theirs = safetensors_torch.load_file(str(tmp_path / shards.SINGLE))
    ours = shards.Checkpoint(tmp_path)
    assert sorted(ours.keys()) == sorted(ts)
    for k, t in ts.items():
        assert theirs[k].dtype == t.dtype and torch.equal(theirs[k], t), k
        assert torch.equal(ours.read(k), t), k
    # only the asked rows, in the asked order
    assert torch.equal(ours.read_rows("w", [4, 0, 4]), ts["w"][[4, 0, 4]])
    with pytest.raises(IndexError, match="row 5 of 'w'"):
        ours.read_rows("w", [5])


def test_a_sharded_folder_is_read_through_its_index(tmp_path):
    a, b = torch.randn(3, 2), torch.randn(4)
    safetensors_torch.save_file({"a": a}, str(tmp_path / "one.safetensors"))
    safetensors_torch.save_file({"b": b}, str(tmp_path / "two.safetensors"))
    (tmp_path / shards.INDEX).write_text(json.dumps({"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}))
    ck = shards.Checkpoint(tmp_path)
    assert torch.equal(ck.read("a"), a) and torch.equal(ck.read("b"), b)
    assert ck.nbytes == 40
    with pytest.raises(CompactionError, match="no tensor 'c'"):
        ck.read("c")


def test_bad_folders_are_named_with_what_to_do(tmp_path):
    with pytest.raises(CompactionError, match="not a folder"):
        shards.Checkpoint(tmp_path / "nope")
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CompactionError, match=r"not a safetensors checkpoint folder.*pytorch_model.bin.*safe_serialization"):
        shards.Checkpoint(tmp_path)
    (tmp_path / shards.INDEX).write_text(json.dumps({"weight_map": {"a": "gone-00001.safetensors"}}))
    with pytest.raises(CompactionError, match="1 shard.*not there: gone-00001.safetensors"):
        shards.Checkpoint(tmp_path)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    shards.write_shard(tmp_path / shards.SINGLE, {"w": torch.randn(64, 64)})
    path = tmp_path / shards.SINGLE
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # the last tensor's end is missing
    with pytest.raises(CompactionError, match="ends before its tensors do"):
        shards.Checkpoint(tmp_path).read("w")
    path.write_bytes(b"PK\x03\x04" + os.urandom(60))  # a zip (torch.save) file under the safetensors name
    with pytest.raises(CompactionError, match="not a safetensors file"):
        shards.Checkpoint(tmp_path)
