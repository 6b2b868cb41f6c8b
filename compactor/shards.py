"""Safetensors checkpoint folders, read one tensor (or a few rows of one) at a time and written one shard at a time.

A base module (it imports only :mod:`compactor.errors`): the out-of-core path
(:func:`compactor.prune_pretrained`) reads a checkpoint bigger than memory through it.
Reads are plain file reads into a tensor the caller owns, not memory maps: what a step holds is
what it asked for, and an address-space limit counts only that. The format is the safetensors
one (an 8-byte little-endian header length, a JSON header of dtype, shape and byte offsets, the
data), written with ``{"format": "pt"}`` metadata as ``transformers`` expects.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from .errors import CompactionError

__all__ = ["Checkpoint", "TensorInfo", "write_shard", "INDEX", "SINGLE"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint lies: its file, dtype, shape and byte range in that file."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _header(path: str) -> tuple[dict, int]:
    """The JSON header of the safetensors file ``path`` and where its data starts."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CompactionError(f"'{path}' is not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8 or n > 100_000_000:
                raise CompactionError(f"'{path}' is not a safetensors file (a header of {n} bytes in a file of {size})")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompactionError(f"'{path}' is not a safetensors file: its header is not JSON ({exc})") from None
    return header, 8 + n


class Checkpoint:
    """The tensors of a Hugging Face checkpoint folder (``model.safetensors``, or shards listed by
    ``model.safetensors.index.json``), by key; nothing is read until asked for.

    Raises:
        CompactionError: no safetensors weights in the folder (a ``pytorch_model.bin`` one is named, with what to
            do), a shard the index lists that is missing, or a file that is not safetensors.
    """

    def __init__(self, folder: "str | os.PathLike") -> None:
        self.folder = os.fspath(folder)
        if not os.path.isdir(self.folder):
            raise CompactionError(f"'{self.folder}' is not a folder; pass a Hugging Face checkpoint folder "
                                  "(config.json and model.safetensors or its shards)")
        index = os.path.join(self.folder, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CompactionError(f"'{index}' has no weight_map; the checkpoint index is damaged")
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(self.folder, SINGLE)):
            files = [SINGLE]
        else:
            present = sorted(os.listdir(self.folder))
            pickled = [p for p in present if p.endswith((".bin", ".pt", ".pth"))]
            hint = (f" It holds {', '.join(pickled[:3])}: load it with from_pretrained and save it with "
                    "save_pretrained(..., safe_serialization=True) first." if pickled else "")
            raise CompactionError(f"'{self.folder}' has no {SINGLE} and no {INDEX}: not a safetensors checkpoint "
                                  f"folder.{hint}")
        missing = [f for f in files if not os.path.exists(os.path.join(self.folder, f))]
        if missing:
            raise CompactionError(f"the checkpoint '{self.folder}' lists {len(missing)} shard(s) that are not there: "
                                  f"{', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}; copy or download "
                                  "the whole folder again")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = os.path.join(self.folder, name)
            header, data = _header(path)
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                dtype = _DTYPES.get(meta.get("dtype"))
                if dtype is None:
                    raise CompactionError(f"'{path}': tensor '{key}' has dtype {meta.get('dtype')!r}, which "
                                          f"compactor does not read (it reads {', '.join(_DTYPES)})")
                lo, hi = meta["data_offsets"]
                self.tensors[key] = TensorInfo(name, dtype, tuple(meta["shape"]), data + lo, data + hi)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def _info(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            raise CompactionError(f"the checkpoint '{self.folder}' has no tensor '{key}', which the model's "
                                  "config implies; the folder holds another architecture or is incomplete") from None

    def read(self, key: str) -> torch.Tensor:
        """The whole tensor ``key``, read into memory of its own."""
        info = self._info(key)
        out = torch.empty(info.nbytes, dtype=torch.uint8)
        self._read_into(info, info.start, out)
        return out.view(info.dtype).reshape(info.shape) if info.shape else out.view(info.dtype).reshape(())

    def read_rows(self, key: str, rows: Sequence[int]) -> torch.Tensor:
        """Rows ``rows`` (along dimension 0) of tensor ``key``, reading only those bytes."""
        info = self._info(key)
        row_bytes = info.nbytes // max(info.shape[0], 1)
        out = torch.empty((len(rows), row_bytes), dtype=torch.uint8)
        for j, r in enumerate(rows):
            if not 0 <= r < info.shape[0]:
                raise IndexError(f"row {r} of '{key}', which has {info.shape[0]}")
            self._read_into(info, info.start + r * row_bytes, out[j])
        return out.view(info.dtype).reshape(len(rows), *info.shape[1:])

    def _read_into(self, info: TensorInfo, offset: int, out: torch.Tensor) -> None:
        path = os.path.join(self.folder, info.file)
        view = memoryview(out.numpy()).cast("B")
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise CompactionError(f"'{path}' ends before its tensors do (truncated at byte {offset + done}); "
                                          "copy or download the checkpoint again")
                done += n


def _payload(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def write_shard(path: "str | os.PathLike", tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                ) -> int:
    """Write ``tensors`` as one safetensors file at ``path`` (streamed: no serialized copy is built in memory).

    Returns:
        The bytes of tensor data written.
    """
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, t in items:
        if t.dtype not in _NAMES:
            raise CompactionError(f"tensor '{key}' has dtype {t.dtype}, which safetensors does not hold")
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in items:
            if t.numel():
                f.write(_payload(t))
    return offset


def iter_prefixed(checkpoint: Checkpoint, prefix: str) -> Iterator[str]:
    """The checkpoint's keys under ``prefix`` (``"model.layers.3."``)."""
    return (k for k in checkpoint.tensors if k.startswith(prefix))

