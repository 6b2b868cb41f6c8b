"""Masked vs compact on real inputs; raise on mismatch."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch

from .errors import VerificationError

__all__ = ["RELATIVE_TOLERANCE", "full_precision", "flatten_outputs", "max_abs_diff", "check", "make_batches"]

#: compact and masked may differ by at most this times the output scale (fp32 summation order);
#: for fp16 / bf16 outputs, 16 x the dtype's epsilon.
RELATIVE_TOLERANCE = 1e-5


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Turn off TF32 (on by default for cuDNN convs) so fp32 comparisons mean fp32; restored afterwards."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def flatten_outputs(out: Any) -> Iterator[torch.Tensor]:
    """The tensors in a model's output: a tensor, or (nested) tuples / lists / dicts of them; None is skipped."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        for k in sorted(out):
            yield from flatten_outputs(out[k])
    elif isinstance(out, (list, tuple)):
        for o in out:
            yield from flatten_outputs(o)
    elif out is not None:
        raise VerificationError(
            f"the model returns a {type(out).__name__}, which compactor cannot compare; return a tensor, "
            "or a tuple / list / dict of tensors"
        )


def make_batches(example: tuple, extra: int, seed: int = 0) -> list[tuple]:
    """The example inputs, then ``extra`` random inputs of the same shapes and dtypes."""
    gen = torch.Generator().manual_seed(seed)
    batches = [example]
    for _ in range(extra):
        batch = []
        for x in example:
            if not isinstance(x, torch.Tensor):
                batch.append(x)
            elif x.is_floating_point():
                r = torch.randn(x.shape, generator=gen, dtype=torch.float64)
                scale = float(x.detach().double().std()) if x.numel() > 1 else 1.0
                scale = scale if math.isfinite(scale) and scale > 0 else 1.0
                r = r * scale + float(x.detach().double().mean())
                batch.append(r.to(dtype=x.dtype, device=x.device))
            elif x.dtype == torch.bool:
                batch.append((torch.rand(x.shape, generator=gen) < 0.5).to(device=x.device))
            else:
                # Widen to include 0 and 1: an all-ones mask in the example must not stay all ones,
                # or a channel it gates would look constant.
                lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 1)
                lo, hi = min(lo, 0), max(hi, 1)
                batch.append(torch.randint(lo, hi + 1, x.shape, generator=gen).to(dtype=x.dtype, device=x.device))
        batches.append(tuple(batch))
    return batches


def max_abs_diff(reference: Sequence[Any], candidate: Sequence[Any]) -> tuple[float, float]:
    """Largest |candidate - reference| over all outputs of all batches, and the largest |reference|."""
    worst, scale = 0.0, 0.0
    for ref_out, got_out in zip(reference, candidate):
        ref = list(flatten_outputs(ref_out))
        got = list(flatten_outputs(got_out))
        if len(ref) != len(got):
            raise VerificationError(f"the compact model returns {len(got)} tensors, the masked one {len(ref)}")
        for r, g in zip(ref, got):
            if r.shape != g.shape:
                raise VerificationError(
                    f"the compact model's output has shape {tuple(g.shape)}, the masked one {tuple(r.shape)}"
                )
            if r.is_floating_point():
                worst = max(worst, float((g.double() - r.double()).abs().max()) if r.numel() else 0.0)
                scale = max(scale, float(r.double().abs().max()) if r.numel() else 0.0)
            elif not torch.equal(r, g):
                worst = float("inf")
    return worst, scale


def check(reference: Sequence[Any], candidate: Sequence[Any], what: str = "masked") -> tuple[float, float]:
    """Raise :class:`VerificationError` if the outputs differ beyond tolerance; return (diff, tolerance).

    ``reference`` and ``candidate`` are the outputs of the two models, one entry per batch.
    """
    diff, scale = max_abs_diff(reference, candidate)
    eps = max((torch.finfo(t.dtype).eps for out in reference for t in flatten_outputs(out) if t.is_floating_point()),
              default=0.0)
    tol = max(RELATIVE_TOLERANCE, 16 * eps) * max(scale, 1e-2)  # fp16 / bf16 round far coarser than fp32
    if not diff <= tol:
        raise VerificationError(
            f"the compact model differs from the {what} model by up to {diff:.3g} (tolerance {tol:.3g}, "
            f"output scale {scale:.3g}); this is a bug in compactor: please report it with the model"
        )
    return diff, tol
