"""Example inputs and model outputs: the conventions every stage shares.

One way to read the user's example inputs (:func:`as_inputs`), one maker of random
inputs like them (:func:`random_like`), one way to list the tensors a model returns
(:func:`flatten_outputs`). This module imports nothing but :mod:`compactor.errors`.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch

from .errors import CompactionError

__all__ = ["Inputs", "Kwargs", "as_inputs", "call", "describe", "random_like", "make_batches", "flatten_outputs",
           "first_line"]

#: A tensor, a tuple / list of the model's positional inputs, or a dict of keyword inputs (a tokenizer's output).
Inputs = Union[torch.Tensor, Sequence[Any], Mapping[str, Any]]


class Kwargs(dict):
    """Keyword inputs, standing as the one entry of an inputs tuple: ``model(**kwargs)``."""


def give_back_memory() -> None:
    """Return the heap memory freed tensors left behind to the operating system (glibc's ``malloc_trim``; nothing
    elsewhere): after a step that freed a model's worth of tensors, the next one starts from what is in use."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def as_inputs(example_inputs: Inputs, *, tensors_only: bool = False, who: str = "compactor") -> tuple:
    """``example_inputs`` as a tuple of positional inputs (a dict becomes one :class:`Kwargs` entry).

    Raises:
        TypeError: not a tensor, a non-empty tuple / list or a non-empty dict with string keys (or,
            with ``tensors_only``, an entry that is not a tensor).
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Mapping) and not tensors_only:
        if not example_inputs or not all(isinstance(k, str) for k in example_inputs):
            raise TypeError(f"{who}: a dict of example inputs must be non-empty, keyed by the forward()'s "
                            f"argument names, got keys {list(example_inputs)[:4]}")
        return (Kwargs(example_inputs),)
    if isinstance(example_inputs, (list, tuple)) and len(example_inputs) > 0:
        if tensors_only:
            bad = [type(x).__name__ for x in example_inputs if not isinstance(x, torch.Tensor)]
            if bad:
                raise TypeError(f"{who}: every example input must be a tensor, got {bad[0]}")
        return tuple(example_inputs)
    raise TypeError(
        f"{who}: example_inputs must be a tensor or a non-empty tuple of the model's positional inputs, "
        f"got {type(example_inputs).__name__}"
    )


def call(model: Any, batch: Sequence[Any]) -> Any:
    """``model(*batch)``, or ``model(**kwargs)`` for keyword inputs."""
    if len(batch) == 1 and isinstance(batch[0], Kwargs):
        return model(**batch[0])
    return model(*batch)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"of shape {tuple(x.shape)} ({str(x.dtype).replace('torch.', '')}, {x.device})"
    if isinstance(x, Kwargs):
        return ", ".join(f"{k} {_describe(v)}" for k, v in x.items())
    return type(x).__name__


def describe(batch: Sequence[Any]) -> str:
    """``"of shape (2, 3) (float32, cpu), int"``: the inputs in words, for error messages."""
    return ", ".join(_describe(x) for x in batch)


def random_like(example: Sequence[Any], *, batch: Optional[int] = None, seed: int = 0,
                generator: Optional[torch.Generator] = None) -> tuple:
    """Random inputs like ``example``: same shapes (``batch`` rows if given), dtypes and devices.

    Floating inputs are normal with the example's mean and spread (N(0, 1) for a constant
    example); integer inputs are uniform over the example's range widened to include 0
    and 1, so an all-ones attention mask in the example does not stay all ones (an integer
    input holding a negative value, such as labels with -100, draws only values it holds); bool
    inputs are fair coin flips. Anything that is not a tensor is passed through.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    out = []
    for x in example:
        if isinstance(x, Kwargs):
            keys = list(x)
            out.append(Kwargs(zip(keys, random_like([x[k] for k in keys], batch=batch, generator=gen))))
            continue
        if not isinstance(x, torch.Tensor):
            out.append(x)
            continue
        shape = tuple(x.shape) if batch is None else (batch,) + tuple(x.shape[1:])
        if x.is_floating_point():
            r = torch.randn(shape, generator=gen, dtype=torch.float64)
            scale = float(x.detach().double().std()) if x.numel() > 1 else 1.0
            scale = scale if math.isfinite(scale) and scale > 0 else 1.0
            mean = float(x.detach().double().mean()) if x.numel() else 0.0
            out.append((r * scale + (mean if math.isfinite(mean) else 0.0)).to(dtype=x.dtype, device=x.device))
        elif x.dtype == torch.bool:
            out.append((torch.rand(shape, generator=gen) < 0.5).to(device=x.device))
        elif x.numel() and int(x.min()) < 0:  # a negative sentinel (labels' -100): only values the example holds
            values = torch.unique(x.detach().cpu())
            pick = torch.randint(0, len(values), shape, generator=gen)
            out.append(values[pick].to(dtype=x.dtype, device=x.device))
        else:
            lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 1)
            lo, hi = min(lo, 0), max(hi, 1)
            out.append(torch.randint(lo, hi + 1, shape, generator=gen).to(dtype=x.dtype, device=x.device))
    return tuple(out)


def make_batches(example: tuple, extra: int, seed: int = 0) -> list[tuple]:
    """The example inputs, then ``extra`` random inputs like them (:func:`random_like`)."""
    gen = torch.Generator().manual_seed(seed)
    return [example] + [random_like(example, generator=gen) for _ in range(extra)]


def _is_cache(out: Any) -> bool:
    """A key/value cache (transformers' ``Cache`` classes): its head counts change with compaction, so it is
    not compared as tensors (the tests check the cache path through greedy generation)."""
    return type(out).__name__.endswith("Cache") and hasattr(out, "get_seq_length")


def flatten_outputs(out: Any) -> Iterator[torch.Tensor]:
    """The tensors in a model's output: a tensor, or (nested) tuples / lists / dicts of them (a
    ``ModelOutput`` is a dict); None and key/value caches are skipped.

    Raises:
        CompactionError: the output holds something else, which cannot be compared.
    """
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):  # in insertion order, as exporters flatten a dict (ONNX outputs are positional)
        for k in out:
            yield from flatten_outputs(out[k])
    elif isinstance(out, (list, tuple)):
        for o in out:
            yield from flatten_outputs(o)
    elif out is not None and not _is_cache(out):
        raise CompactionError(
            f"the model returns a {type(out).__name__}, which compactor cannot compare; return a tensor, "
            "or a tuple / list / dict of tensors"
        )
