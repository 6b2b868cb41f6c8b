"""Masked vs compact on real inputs; raise on mismatch. The package's one comparison and tolerance policy."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from . import masks
from .errors import VerificationError
from .tensors import Kwargs, call, flatten_outputs

__all__ = ["RELATIVE_TOLERANCE", "RUNTIME_RELATIVE_TOLERANCE", "Comparison", "full_precision", "max_abs_diff",
           "tolerance", "compare", "check", "within_float32_error"]

#: The float64 second opinion copies the masked model in float64: not for models above this many bytes.
FLOAT64_CHECK_MAX_BYTES = 4 << 30

#: compact and masked may differ by at most this times the output scale (fp32 summation order);
#: for fp16 / bf16 outputs, 16 x the dtype's epsilon.
RELATIVE_TOLERANCE = 1e-5
#: the same model in another runtime (onnxruntime, torch.export) may differ by this times the
#: output scale: other kernels, other fusions, another summation order.
RUNTIME_RELATIVE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Comparison:
    """The largest difference between two models' outputs, and what it may be."""

    max_abs_diff: float
    scale: float  # the largest |reference|
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Turn off TF32 (on by default for cuDNN convs) so fp32 comparisons mean fp32; restored afterwards."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def max_abs_diff(reference: Sequence[Any], candidate: Sequence[Any]) -> tuple[float, float]:
    """Largest |candidate - reference| over all outputs of all batches, and the largest |reference|.

    NaN and inf must stand in the same places with the same values in both (else the difference is
    inf); the difference and the scale are taken over the finite entries.

    Raises:
        VerificationError: the outputs differ in count or shape.
    """
    worst, scale = 0.0, 0.0
    for ref_out, got_out in zip(reference, candidate):
        ref = list(flatten_outputs(ref_out))
        got = list(flatten_outputs(got_out))
        if len(ref) != len(got):
            raise VerificationError(f"the compact model returns {len(got)} tensors, the reference {len(ref)}")
        for r, g in zip(ref, got):
            if r.shape != g.shape:
                raise VerificationError(
                    f"the compact model's output has shape {tuple(g.shape)}, the reference {tuple(r.shape)}"
                )
            g = g.to(r.device)
            if not r.is_floating_point():
                if not torch.equal(r, g):
                    worst = float("inf")
                continue
            r, g = r.detach().double(), g.detach().double()
            finite = torch.isfinite(r)
            if not torch.equal(finite, torch.isfinite(g)) or not torch.equal(  # NaN / inf must match in place
                    torch.nan_to_num(r[~finite], nan=0.0), torch.nan_to_num(g[~finite], nan=0.0)) \
                    or not torch.equal(r[~finite].isnan(), g[~finite].isnan()):
                worst = float("inf")
                continue
            if bool(finite.any()):  # the difference and the scale over the finite entries
                worst = max(worst, float((g[finite] - r[finite]).abs().max()))
                scale = max(scale, float(r[finite].abs().max()))
    return worst, scale


def tolerance(reference: Sequence[Any], scale: float, rel: float = RELATIVE_TOLERANCE) -> float:
    """The allowed difference: ``rel`` (at least 16 ulps of the outputs' dtype) times the output scale."""
    eps = max((torch.finfo(t.dtype).eps for out in reference for t in flatten_outputs(out) if t.is_floating_point()),
              default=0.0)
    return max(rel, 16 * eps) * max(scale, 1e-2)  # fp16 / bf16 round far coarser than fp32


def compare(reference: Sequence[Any], candidate: Sequence[Any], *, rel: float = RELATIVE_TOLERANCE) -> Comparison:
    """Compare two models' outputs, one entry per batch; :attr:`Comparison.ok` says if they agree."""
    diff, scale = max_abs_diff(reference, candidate)
    return Comparison(diff, scale, tolerance(reference, scale, rel))


def check(reference: Sequence[Any], candidate: Sequence[Any], what: str = "masked") -> Comparison:
    """Raise :class:`VerificationError` if the outputs differ beyond tolerance; return the comparison.

    ``reference`` and ``candidate`` are the outputs of the two models, one entry per batch.
    """
    result = compare(reference, candidate)
    if not result.ok:
        raise VerificationError(
            f"the compact model differs from the {what} model by up to {result.max_abs_diff:.3g} (tolerance "
            f"{result.tolerance:.3g}, output scale {result.scale:.3g}); this is a bug in compactor: please report it "
            "with the model"
        )
    return result


def _double(batch: tuple) -> tuple:
    def conv(x: Any) -> Any:
        return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
    return tuple(Kwargs({k: conv(v) for k, v in b.items()}) if isinstance(b, Kwargs) else conv(b) for b in batch)


def within_float32_error(masked: torch.nn.Module, batches: Sequence[tuple], reference: Sequence[Any],
                         candidate: Sequence[Any]) -> bool:
    """Whether ``candidate`` (the compact model's fp32 outputs) is about as close to the masked model run in
    float64 as ``reference`` (the masked model's own fp32 outputs) is: then the fp32 difference between them
    is summation order, not compaction. False when the model is too large to copy in float64 or will not run
    in it."""
    params = sum(t.numel() for t in masked.state_dict().values() if isinstance(t, torch.Tensor))
    if params * 8 > FLOAT64_CHECK_MAX_BYTES:
        return False
    try:
        wide = masks.clone(masked).double().eval()
        with torch.no_grad():
            exact = [call(wide, _double(b)) for b in batches]
    except Exception:
        return False
    for want, ref, got in zip(exact, reference, candidate):  # output by output, tensor by tensor
        wants, refs, gots = (list(flatten_outputs(o)) for o in (want, ref, got))
        if not len(wants) == len(refs) == len(gots):
            return False
        for w, r, g in zip(wants, refs, gots):
            if not r.is_floating_point():  # an index or a count: fp32 must give exactly what masked fp32 gave
                if not torch.equal(r, g.to(r.device)):
                    return False
                continue
            masked_err, scale = max_abs_diff([w], [r])
            compact_err, _ = max_abs_diff([w], [g])
            if not math.isfinite(masked_err) or not math.isfinite(compact_err) \
                    or compact_err > 4 * masked_err + tolerance([r], scale):
                return False
    return True
