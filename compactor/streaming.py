"""Prune and compact a Hugging Face checkpoint bigger than memory, one decoder block at a time.

:func:`prune_pretrained` reads ``config.json`` and the safetensors shards of a decoder-only
language model (:mod:`compactor.shards`: plain reads of one tensor at a time, no memory map),
embeds the calibration tokens (reading only their rows of the embedding), and for each decoder
block in turn:

1. builds the block on the meta device and reads its tensors (in float32);
2. chooses what goes with :func:`compactor.prune_channels` (``bake=True``: the chosen MLP
   neurons and key/value heads zeroed in place, no mask and no working copy), scored by
   ``importance`` on the block's own calibration hidden states;
3. compacts it with :func:`compactor.compact` (``inplace``), whose own check runs on a probe
   (the first and last calibration rows, up to 32 tokens) and two random inputs of its shape;
4. runs the compact block on every calibration token and compares that with the masked
   block's output on the same hidden states (the per-block exactness check), which are also the
   next block's calibration inputs, as sequential calibration tools propagate them; writes the
   block as one safetensors shard in the checkpoint's dtype, and frees it.

Embeddings, the final norm and the LM head are copied unchanged (the hidden size stays), one
tensor per shard so that only one is held at a time. The
config that describes the compact widths is validated by the family's class built on the meta
device from it (it must hold exactly the written tensors' names and shapes), and the output is
written into a temporary folder beside ``dst`` that becomes ``dst`` only at the end: a failed run
(a full disk included) leaves nothing half-written. Peak memory is about one float32 copy of
one block plus 1.5 GB (the runtime, the calibration activations), whatever the number of blocks
(benchmarks/scale.py measures it from 0.3 B to 13 B parameters).
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any, Optional, Union

import torch
from torch import nn

from . import hfconfig, shards, verify
from .api import compact
from .errors import CompactionError, VerificationError
from .files import replace_folder
from .pruner import prune_channels
from .tensors import give_back_memory

__all__ = ["prune_pretrained", "StreamReport", "SUPPORTED"]

#: Model types whose decoder blocks this path runs (each tested: tests/integration/test_streaming.py).
SUPPORTED = ("llama", "mistral", "qwen2", "phi3")
_ATTENTION_TYPES = ("full_attention", "sliding_attention")
_PROBE_TOKENS = 32


@dataclasses.dataclass
class BlockRecord:
    """One block's outcome: its parameters before and after, the exactness check and the time it took."""

    index: int
    params_before: int
    params_after: int
    max_abs_diff: float  # compact vs masked block on every calibration token
    tolerance: float
    probe_max_abs_diff: float  # compact()'s own check: the probe rows and 2 random inputs of their shape
    probe_tolerance: float
    seconds: float
    rounded: int  # tensors whose compact values the checkpoint's dtype cannot hold exactly (folds): 0 without folds


@dataclasses.dataclass
class StreamReport:
    """What :func:`prune_pretrained` did: per block, the check; the widths written; time, bytes and memory."""

    src: str
    dst: str
    model_type: str
    blocks: list[BlockRecord] = dataclasses.field(default_factory=list)
    config_updates: dict[str, Any] = dataclasses.field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    peak_rss_bytes: int = 0
    calibration_tokens: tuple[int, int] = (0, 0)

    @property
    def params_before(self) -> int:
        return sum(b.params_before for b in self.blocks)

    @property
    def params_after(self) -> int:
        return sum(b.params_after for b in self.blocks)

    def __str__(self) -> str:
        worst = max(self.blocks, key=lambda b: b.max_abs_diff / max(b.tolerance, 1e-30))
        gb = 1e9
        return "\n".join([
            f"{self.model_type}: {len(self.blocks)} decoder blocks pruned and compacted one at a time, "
            f"{self.src} -> {self.dst}",
            f"decoder parameters {self.params_before:,} -> {self.params_after:,} "
            f"({self.params_after / max(self.params_before, 1):.1%}); config: "
            + ", ".join(f"{k}={v}" for k, v in self.config_updates.items()),
            f"every block checked against its masked form on all {self.calibration_tokens[0]}x"
            f"{self.calibration_tokens[1]} calibration tokens: worst max |compact - masked| = {worst.max_abs_diff:.3g} "
            f"(block {worst.index}, tolerance {worst.tolerance:.3g}); and by compact() on a probe and 2 random inputs",
            f"time {self.seconds:.1f} s (reading {self.read_seconds:.1f} s, writing {self.write_seconds:.1f} s); "
            f"read {self.bytes_read / gb:.2f} GB, wrote {self.bytes_written / gb:.2f} GB; peak memory "
            f"{self.peak_rss_bytes / gb:.2f} GB",
        ])


# --------------------------------------------------------------------------- the block as a model


def _transformers():
    try:
        import transformers
        from transformers import masking_utils
    except ImportError:
        raise ImportError("prune_pretrained needs transformers: pip install transformers") from None
    return transformers, masking_utils


_LAYER_CLASSES: dict[type, type] = {}


def _layer_class(config: Any) -> type:
    """The family's decoder layer class, read off its causal LM built on the meta device."""
    if type(config) not in _LAYER_CLASSES:
        transformers, _ = _transformers()
        small = copy.deepcopy(config)
        small.num_hidden_layers = 1
        if getattr(small, "layer_types", None):
            small.layer_types = list(small.layer_types[:1])
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForCausalLM.from_config(small)
        _LAYER_CLASSES[type(config)] = type(_layers(model)[1][0])
    return _LAYER_CLASSES[type(config)]


def _layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks' ModuleList and its name (``model.layers``)."""
    n = model.config.num_hidden_layers
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n and name.endswith("layers"):
            return name, m
    raise CompactionError(f"{type(model).__name__} has no list of {n} decoder layers named '*layers'; "
                          f"prune_pretrained runs {', '.join(SUPPORTED)}")


class _Block(nn.Module):
    """One decoder layer as a model of the hidden states alone: the attention mask and rotary position
    embeddings of the calibration tokens are fixed attributes. Built from a config (``_Block(config)``), so
    compactor's config checks can build it on the meta device."""

    def __init__(self, config: Any, layer_idx: int = 0) -> None:
        super().__init__()
        self.config = config
        self.layer = _layer_class(config)(config, layer_idx)
        self.contexts: dict[tuple[int, int], dict[str, Any]] = {}  # per (batch, tokens) of the hidden states

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.layer(hidden, **self.contexts[tuple(hidden.shape[:2])])
        return out[0] if isinstance(out, tuple) else out


# --------------------------------------------------------------------------- calibration


def _calibration_ids(calibration: Any, src: str, samples: int, seq_len: int, vocab: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), both (samples, seq_len): from a text file (the checkpoint's tokenizer), a JSON
    file of token-id lists, a tensor or lists of ids; by default random ids with the last row half padded."""
    if calibration is None:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (samples, seq_len), generator=gen)
        mask = torch.ones_like(ids)
        if samples > 1:
            mask[-1, seq_len // 2:] = 0
        return ids, mask
    rows: list[list[int]]
    if isinstance(calibration, (str, os.PathLike)):
        path = os.fspath(calibration)
        if not os.path.exists(path):
            raise FileNotFoundError(f"calibration file '{path}' does not exist")
        if path.endswith(".json"):
            with open(path) as f:
                rows = json.load(f)
        else:
            transformers, _ = _transformers()
            try:
                tok = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True)
            except Exception as exc:
                raise CompactionError(f"calibration text '{path}' needs the checkpoint's tokenizer, which '{src}' "
                                      f"does not hold ({type(exc).__name__}); pass a .json file of token-id lists "
                                      "instead") from None
            with open(path, encoding="utf-8") as f:
                flat = tok(f.read())["input_ids"]
            rows = [flat[i:i + seq_len] for i in range(0, len(flat), seq_len)]
    elif isinstance(calibration, torch.Tensor):
        rows = calibration.reshape(-1, calibration.shape[-1]).tolist()
    else:
        rows = [list(r) for r in calibration]
    rows = [r[:seq_len] for r in rows if len(r)][:samples]
    if not rows or not all(isinstance(t, int) and 0 <= t < vocab for r in rows for t in r):
        raise CompactionError(f"the calibration data must be non-empty rows of token ids in [0, {vocab})")
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # right padding, as a tokenizer pads for causal LMs
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def _context(config: Any, model: nn.Module, hidden: torch.Tensor, mask2d: torch.Tensor) -> dict[str, dict]:
    """Per attention type, the keyword inputs every block of that type takes besides the hidden states."""
    _, masking_utils = _transformers()
    pos = torch.arange(hidden.shape[1]).unsqueeze(0).expand(hidden.shape[0], -1)
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if rotary is None:
        raise CompactionError(f"{type(model).__name__} has no rotary_emb; prune_pretrained runs {', '.join(SUPPORTED)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rotary = type(rotary)(config=config)
    with torch.no_grad():
        pe = rotary(hidden, pos)
    out = {}
    for kind in set(getattr(config, "layer_types", None) or ["full_attention"]):
        if kind not in _ATTENTION_TYPES:
            raise CompactionError(f"{type(config).__name__} has '{kind}' layers; prune_pretrained runs "
                                  f"{', '.join(_ATTENTION_TYPES)} ones")
        make = masking_utils.LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING[kind]
        mask = make(config=config, inputs_embeds=hidden, attention_mask=mask2d, cache=None, position_ids=pos)
        out[kind] = {"attention_mask": mask, "position_ids": pos, "position_embeddings": pe}
    return out


# --------------------------------------------------------------------------- the loop


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class _Clock:
    def __init__(self) -> None:
        self.read_s = self.write_s = 0.0
        self.bytes_read = self.bytes_written = 0

    def read_tensor(self, ckpt: shards.Checkpoint, key: str) -> torch.Tensor:
        t0 = time.perf_counter()
        t = ckpt.read(key)
        self.read_s += time.perf_counter() - t0
        self.bytes_read += t.numel() * t.element_size()
        return t

    def write(self, path: str, tensors: list[tuple[str, torch.Tensor]]) -> None:
        t0 = time.perf_counter()
        self.bytes_written += shards.write_shard(path, tensors)
        self.write_s += time.perf_counter() - t0


def _load_block(block: _Block, ckpt: shards.Checkpoint, prefix: str, clock: _Clock) -> torch.dtype:
    """Fill ``block`` (on the meta device) with the checkpoint's tensors under ``prefix``, in float32; returns
    their stored dtype."""
    names = dict(block.layer.state_dict(keep_vars=True))
    persistent = set(names)
    stray = [n for n, _ in block.layer.named_buffers() if n not in persistent]
    if stray:
        raise CompactionError(f"{type(block.layer).__name__} holds buffers no checkpoint stores ({', '.join(stray)}); "
                              f"prune_pretrained runs {', '.join(SUPPORTED)}")
    extra = sorted(set(shards.iter_prefixed(ckpt, prefix)) - {prefix + n for n in names})
    if extra:
        raise CompactionError(f"the checkpoint has '{extra[0]}', which {type(block.layer).__name__} built from its "
                              "config does not: the config and the weights do not match")
    block.layer.to_empty(device="cpu")
    dtype = None
    with torch.no_grad():
        for name, target in block.layer.state_dict(keep_vars=True).items():
            t = clock.read_tensor(ckpt, prefix + name)
            if tuple(t.shape) != tuple(target.shape):
                raise CompactionError(f"'{prefix + name}' has shape {tuple(t.shape)} in the checkpoint, "
                                      f"{tuple(target.shape)} in the model its config describes")
            if t.is_floating_point():
                dtype = dtype or t.dtype
                target.data = t.float() if t.dtype != torch.float32 else t
            else:
                target.data = t
    return dtype or torch.float32


def _out_path(folder: str, i: int, n: int) -> tuple[str, str]:
    name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    return os.path.join(folder, name), name


def prune_pretrained(
    src: "str | os.PathLike",
    dst: "str | os.PathLike",
    amount: Union[float, int],
    *,
    heads: Optional[Union[float, int]] = None,
    importance: str = "l2",
    calibration: Any = None,
    samples: int = 4,
    seq_len: int = 64,
    uniform: bool = True,
    force: bool = False,
    progress: bool = False,
) -> StreamReport:
    """Prune and compact the Hugging Face checkpoint folder ``src`` into ``dst``, one decoder block at a time.

    Each block loses ``amount`` of its MLP neurons (and ``heads`` of its key/value heads, with their query heads),
    chosen by ``importance`` within the block, and is checked to compute what the masked block computes on its
    calibration hidden states before it is written (see the module). Vanilla ``from_pretrained(dst)`` loads the
    result. Memory stays near one float32 copy of one block plus 1.5 GB, whatever the number of blocks.

    Args:
        src: a checkpoint folder: ``config.json`` and ``model.safetensors`` or shards with their index.
        dst: the folder to write (must not exist unless ``force``); written beside it, moved into place at the end.
        amount: the fraction (or count) of each block's MLP neurons to remove, as in :func:`prune_channels`.
        heads: the fraction (or count) of each block's key/value heads to remove; ``None`` keeps them.
        importance: ``"l2"``, ``"l1"`` or ``"activation"`` (on the block's calibration hidden states).
        calibration: token ids for the calibration forward and the checks: a text file (read with the
            checkpoint's tokenizer), a ``.json`` file of token-id lists, a tensor or lists of ids; default: random
            ids, one row half padded.
        samples: at most this many calibration rows.
        seq_len: at most this many tokens per row.
        uniform: the same counts in every block, ones the family's config can describe (see
            :func:`prune_channels`); without it, widths that differ between blocks are refused at the end.
        force: replace an existing ``dst``.
        progress: print each block's time and check to standard error.

    Returns:
        A :class:`StreamReport`.

    Raises:
        CompactionError: not a safetensors checkpoint folder, a missing shard or tensor, an architecture outside
            :data:`SUPPORTED`, a block whose compact form differs from its masked form, widths no config of the
            family describes, or a disk that fills up (``dst`` is then left as it was).
        FileExistsError: ``dst`` exists and ``force`` is false.
    """
    transformers, _ = _transformers()
    src, dst = os.fspath(src), os.fspath(dst)
    if importance not in ("l2", "l1", "activation"):
        raise ValueError(f"importance={importance!r}: out of core each block is scored alone, by 'l2', 'l1' or "
                         "'activation' (taylor needs the whole model's loss; prune it in memory with prune_channels)")
    if os.path.exists(dst) and not force:
        raise FileExistsError(f"'{dst}' exists; pass force=True (--force) to replace it")
    if not os.path.exists(os.path.join(src, "config.json")):
        raise CompactionError(f"'{src}' has no config.json: not a Hugging Face checkpoint folder")
    ckpt = shards.Checkpoint(src)
    config = transformers.AutoConfig.from_pretrained(src, local_files_only=True)
    if config.model_type not in SUPPORTED:
        raise CompactionError(f"'{src}' holds a {config.model_type} model ({type(config).__name__}); prune_pretrained "
                              f"runs {', '.join(SUPPORTED)} (decoder blocks it has tested one at a time); load smaller "
                              "models whole and use prune_channels + compact + save_pretrained")
    config._attn_implementation = "sdpa"
    start = time.perf_counter()
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    layers_name, _ = _layers(skeleton)
    expected = dict(skeleton.state_dict(keep_vars=True))
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in expected if k not in ckpt and not (tied and k.endswith("lm_head.weight"))]
    if missing:
        raise CompactionError(f"the checkpoint '{src}' has no tensor '{missing[0]}' ({len(missing)} missing), which a "
                              f"{type(skeleton).__name__} built from its config.json holds: the folder is incomplete "
                              "or its config describes another model")
    embed_key = next(n for n, m in skeleton.named_modules() if m is skeleton.get_input_embeddings()) + ".weight"
    n_layers = config.num_hidden_layers
    rest = [k for k in ckpt.keys() if not k.startswith(layers_name + ".")]  # embeddings, final norm, LM head
    n_shards = n_layers + len(rest)  # one per block, one per other tensor (only one tensor is held at a time)
    report = StreamReport(src, dst, config.model_type)
    clock = _Clock()
    ids, mask2d = _calibration_ids(calibration, src, samples, seq_len, config.vocab_size)
    report.calibration_tokens = tuple(ids.shape)
    rows = ids.unique()
    t0 = time.perf_counter()
    table = ckpt.read_rows(embed_key, rows.tolist()).float()
    clock.read_s += time.perf_counter() - t0
    clock.bytes_read += table.numel() * ckpt.tensors[embed_key].dtype.itemsize
    hidden = table[torch.searchsorted(rows, ids)]
    del table
    # the tracing, trials and compact()'s own checks run on a probe (the first and last rows, up to 32 tokens:
    # under a causal mask their hidden states are a slice of the full ones); scoring, the full check and the
    # propagation run on every calibration token
    rows_probe = sorted({0, ids.shape[0] - 1})
    probe_len = min(ids.shape[1], _PROBE_TOKENS)
    contexts = {kind: {tuple(hidden.shape[:2]): ctx} for kind, ctx in _context(config, skeleton, hidden, mask2d).items()}
    probe_contexts = _context(config, skeleton, hidden[rows_probe, :probe_len], mask2d[rows_probe, :probe_len])
    for kind, ctx in probe_contexts.items():
        contexts[kind][(len(rows_probe), probe_len)] = ctx
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".compactor-", dir=parent)
    index: dict[str, str] = {}
    written_shapes: dict[str, tuple[int, ...]] = {}
    updates: Optional[dict[str, Any]] = None
    try:
        for i in range(n_layers):
            t_block = time.perf_counter()
            cfg = copy.deepcopy(config)
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                block = _Block(cfg, i)
            prefix = f"{layers_name}.{i}."
            dtype = _load_block(block, ckpt, prefix, clock)
            kind = (getattr(config, "layer_types", None) or ["full_attention"] * n_layers)[i]
            block.contexts = contexts[kind]
            block.eval()
            before = sum(p.numel() for p in block.parameters())
            probe = hidden[rows_probe, :probe_len]
            with torch.no_grad():
                prune_channels(block, probe, amount, heads=heads, importance=importance, uniform=uniform,
                               calibration=[hidden] if importance == "activation" else None, bake=True)
                masked_out = block(hidden)
            small = compact(block, probe, inplace=True, progress=False)
            del block
            small.contexts = contexts[kind]
            rep = small.compaction_report
            block_updates = hfconfig.config_updates(small)[1]
            if updates is None:
                updates = block_updates
            elif block_updates != updates:
                raise CompactionError(
                    f"block {i} compacts to {block_updates}, block 0 to {updates}: a Hugging Face config holds one "
                    "value for every block; pass uniform=True (--uniform)")
            with torch.no_grad():
                hidden = small(hidden)
            full = verify.compare([masked_out], [hidden])
            if not full.ok:  # compact() checked the probe; this is every calibration token
                raise VerificationError(
                    f"block {i}: the compact block differs from the masked block on the calibration hidden states by "
                    f"{full.max_abs_diff:.3g} (tolerance {full.tolerance:.3g}); this is a bug in compactor: please "
                    "report it with the checkpoint's config.json and this command")
            del masked_out
            tensors, rounded = [], 0
            for name, t in small.layer.state_dict().items():
                stored = t.to(dtype) if t.is_floating_point() else t
                if t.is_floating_point() and dtype != t.dtype and not torch.equal(stored.float(), t):
                    rounded += 1
                tensors.append((prefix + name, stored))
            path, fname = _out_path(tmp, i, n_shards)
            clock.write(path, tensors)
            for key, t in tensors:
                index[key] = fname
                written_shapes[key] = tuple(t.shape)
            after = sum(p.numel() for p in small.parameters())
            del small, tensors
            give_back_memory()
            seconds = time.perf_counter() - t_block
            report.blocks.append(BlockRecord(i, before, after, full.max_abs_diff, full.tolerance,
                                             rep.max_abs_diff or 0.0, rep.tolerance or 0.0, seconds, rounded))
            if progress:
                print(f"compactor: block {i + 1}/{n_layers}: {before:,} -> {after:,} parameters, max |compact - "
                      f"masked| {full.max_abs_diff:.2g} on the calibration tokens (tolerance {full.tolerance:.2g}), "
                      f"{rep.max_abs_diff:.2g} on the probe and 2 random inputs, {seconds:.1f} s, peak memory "
                      f"{_peak_rss() / 1e9:.2f} GB", file=sys.stderr, flush=True)
            if i == 0:
                _check_space(parent, report, n_layers, ckpt, layers_name, clock)
        for j, key in enumerate(rest):
            path, fname = _out_path(tmp, n_layers + j, n_shards)
            t = clock.read_tensor(ckpt, key)
            clock.write(path, [(key, t)])
            index[key], written_shapes[key] = fname, tuple(t.shape)
            del t
        new_config = hfconfig.validated(config, updates or {})
        mismatch = hfconfig.mismatch_of(skeleton, new_config, written_shapes)  # what from_pretrained will load
        if mismatch:
            raise CompactionError(
                f"no {type(config).__name__} describes the compact checkpoint ({mismatch}); prune with uniform=True "
                "(--uniform), or load the model whole and save it with compactor.save")
        report.config_updates = {k: v for k, v in (updates or {}).items() if getattr(config, k, None) != v}
        new_config.save_pretrained(tmp)
        with open(os.path.join(tmp, shards.INDEX), "w") as f:
            json.dump({"metadata": {"total_size": clock.bytes_written}, "weight_map": index}, f, indent=2)
        for name in os.listdir(src):  # tokenizer, generation config, ...
            full = os.path.join(src, name)
            if (os.path.isfile(full) and name not in ("config.json", shards.INDEX)
                    and not name.endswith((".safetensors", ".bin", ".pt", ".pth"))):
                shutil.copy2(full, os.path.join(tmp, name))
        replace_folder(tmp, dst)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # any write: a shard, the config, the index
            raise CompactionError(
                f"the disk filled up while writing the compact checkpoint beside '{dst}' ({clock.bytes_written / 1e9:.2f} "
                "GB of tensors written): nothing was written to the destination and the partial output is removed; "
                "free space beside it and run again") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.bytes_read, report.bytes_written = clock.bytes_read, clock.bytes_written
    report.read_seconds, report.write_seconds = clock.read_s, clock.write_s
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = _peak_rss()
    return report


def _check_space(parent: str, report: StreamReport, n_layers: int, ckpt: shards.Checkpoint, layers_name: str,
                 clock: _Clock) -> None:
    """After the first block, refuse early when the rest cannot fit on the destination's disk."""
    rest = sum(t.nbytes for k, t in ckpt.tensors.items() if not k.startswith(layers_name + "."))
    need = clock.bytes_written * (n_layers - 1) + rest
    free = shutil.disk_usage(parent).free
    if free < need:
        raise CompactionError(f"the compact checkpoint needs about {need / 1e9:.2f} GB more beside '{report.dst}', "
                              f"where {free / 1e9:.2f} GB are free: nothing was written; free space and run again")

