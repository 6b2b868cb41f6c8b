"""verify: compare / check / tolerance on hand values, and full_precision's flag handling."""

import pytest
import torch

from compactor import verify
from compactor.errors import VerificationError

EPS32 = torch.finfo(torch.float32).eps  # 2**-23
EPS16 = torch.finfo(torch.float16).eps  # 2**-10


def test_compare_reports_largest_difference_scale_and_tolerance():
    """ref [1, -3], got [1, -2.5]: diff 0.5, scale 3, tolerance max(1e-5, 16 eps32) * 3 = 3e-5; not ok."""
    c = verify.compare([torch.tensor([1.0, -3.0])], [torch.tensor([1.0, -2.5])])
    assert c.max_abs_diff == 0.5 and c.scale == 3.0
    assert 16 * EPS32 < 1e-5
    assert c.tolerance == pytest.approx(1e-5 * 3.0, rel=1e-12)
    assert not c.ok


def test_compare_takes_the_max_over_batches_and_outputs():
    """Two batches, each (tensor, [tensor]): diff is the largest over all (0.25), scale the largest |ref| (8)."""
    ref = [(torch.tensor([1.0]), [torch.tensor([2.0, -8.0])]), (torch.tensor([4.0]), [torch.tensor([0.0, 0.0])])]
    got = [(torch.tensor([1.0]), [torch.tensor([2.0, -8.125])]), (torch.tensor([4.25]), [torch.tensor([0.0, 0.0])])]
    c = verify.compare(ref, got)
    assert (c.max_abs_diff, c.scale) == (0.25, 8.0)
    assert c.tolerance == pytest.approx(8e-5, rel=1e-12)


def test_tolerance_floors_the_scale_at_1e_2():
    """Outputs of size 1e-3: tolerance is 1e-5 * 1e-2 = 1e-7, not 1e-5 * 1e-3; a 5e-8 difference is ok."""
    c = verify.compare([torch.tensor([1e-3])], [torch.tensor([1e-3 + 5e-8])])
    assert c.scale == pytest.approx(1e-3, rel=1e-6)
    assert c.tolerance == pytest.approx(1e-7, rel=1e-12)
    assert c.ok


def test_equal_outputs_are_ok_with_zero_difference():
    """Identical outputs: diff 0.0 and ok; an all-zero reference still gets tolerance 1e-5 * 1e-2."""
    c = verify.compare([torch.zeros(3)], [torch.zeros(3)])
    assert (c.max_abs_diff, c.scale, c.ok) == (0.0, 0.0, True)
    assert c.tolerance == pytest.approx(1e-7, rel=1e-12)


def test_fp16_outputs_get_16_eps_of_fp16():
    """fp16 ref of scale 2: tolerance 16 * 2**-10 * 2 = 0.03125, so a difference of 1/64 passes."""
    ref = [torch.tensor([2.0, 1.0], dtype=torch.float16)]
    c = verify.compare(ref, [torch.tensor([2.0, 1.015625], dtype=torch.float16)])
    assert c.tolerance == 16 * EPS16 * 2.0 == 0.03125
    assert c.max_abs_diff == 0.015625 and c.ok
    assert verify.tolerance(ref, 2.0) == 0.03125


def test_rel_raises_the_tolerance_but_not_below_16_eps():
    """rel=1e-4 at scale 1: tolerance 1e-4; rel=0 still leaves 16 eps32 * 1."""
    ref = [torch.tensor([1.0])]
    assert verify.compare(ref, ref, rel=1e-4).tolerance == pytest.approx(1e-4, rel=1e-12)
    assert verify.tolerance(ref, 1.0, rel=0.0) == 16 * EPS32


def test_unequal_integer_outputs_differ_by_inf():
    """Integer outputs are compared for equality: [1, 2] vs [1, 3] gives inf (never ok), equal gives 0."""
    a, b = torch.tensor([1, 2]), torch.tensor([1, 3])
    c = verify.compare([a], [b])
    assert c.max_abs_diff == float("inf") and not c.ok
    assert verify.compare([a], [a.clone()]).max_abs_diff == 0.0


def test_shape_mismatch_raises_naming_both_shapes():
    """(2, 3) vs (2, 4): VerificationError naming the compact shape (2, 4) and the reference (2, 3)."""
    with pytest.raises(VerificationError, match=r"has shape \(2, 4\), the reference \(2, 3\)"):
        verify.compare([torch.zeros(2, 3)], [torch.zeros(2, 4)])


def test_output_count_mismatch_raises_naming_both_counts():
    """One tensor vs a tuple of two: VerificationError 'returns 2 tensors, the reference 1'."""
    with pytest.raises(VerificationError, match="returns 2 tensors, the reference 1"):
        verify.compare([torch.zeros(2)], [(torch.zeros(2), torch.zeros(2))])


def test_check_raises_with_the_difference_and_returns_the_comparison_when_ok():
    """check(): off by 0.5 raises 'differs from the masked model by up to 0.5'; within 3e-5 returns it."""
    ref = [torch.tensor([1.0, -3.0])]
    with pytest.raises(VerificationError, match="differs from the masked model by up to 0.5"):
        verify.check(ref, [torch.tensor([1.0, -2.5])])
    with pytest.raises(VerificationError, match="differs from the onnx model"):
        verify.check(ref, [torch.tensor([1.0, -2.5])], "onnx")
    c = verify.check(ref, [torch.tensor([1.0, -3.0 + 2**-16])])  # 1.5e-5, exact in float32, under 3e-5
    assert isinstance(c, verify.Comparison) and c.ok
    assert (c.max_abs_diff, c.scale) == (2**-16, 3.0)


def test_full_precision_turns_tf32_off_and_restores_the_flags():
    """Inside full_precision both TF32 flags are False; afterwards (also after an exception) they are as before."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
        with verify.full_precision():
            assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, False)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)

        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
        with pytest.raises(RuntimeError, match="inside"):
            with verify.full_precision():
                raise RuntimeError("inside")
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, False)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def test_nan_and_inf_must_match_in_place_and_do_not_hide_other_differences():
    """NaN where the reference is finite (or the other way round) is an infinite difference; a -inf in the
    reference neither widens the tolerance nor hides a mismatch in another output."""
    t = torch.tensor
    nan, inf = float("nan"), float("inf")
    assert verify.compare([t([nan, 1.0])], [t([nan, 5.0])]).max_abs_diff == 4.0
    assert not verify.compare([t([0.0, 1.0])], [t([nan, 1.0])]).ok
    assert not verify.compare([t([nan, 1.0])], [t([0.0, 1.0])]).ok
    assert not verify.compare([t([inf, 1.0])], [t([-inf, 1.0])]).ok
    c = verify.compare([(t([-inf, 1.0]), t([1.0, 2.0]))], [(t([-inf, 1.0]), t([50.0, -9.0]))])
    assert (c.max_abs_diff, c.scale, c.ok) == (49.0, 2.0, False)
    assert verify.compare([t([-inf, nan, 2.0])], [t([-inf, nan, 2.0])]).ok


def _cancelling() -> tuple[torch.nn.Module, torch.Tensor]:
    """fc2 sums 512 terms of ~1e3 that cancel in pairs: the output is ~0.04, its fp32 rounding ~0.01. Rows 3, 100
    and their twins 259, 356 are masked (their bias constants fold into fc2's bias, which changes the order)."""
    from torch import nn
    from torch.nn.utils import prune

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 512), nn.ReLU(), nn.Linear(512, 2)).eval()
    with torch.no_grad():
        m[0].weight.normal_(0, 1000.0)
        m[0].bias.uniform_(0, 1000)
        m[0].weight[256:] = m[0].weight[:256]
        m[0].bias[256:] = m[0].bias[:256]
        w = torch.randn(2, 256)
        m[2].weight.copy_(torch.cat([w, -w], 1))
    mask = torch.ones(512, 4)
    mask[[3, 259, 100, 356]] = 0
    prune.custom_from_mask(m[0], "weight", mask)
    return m, torch.randn(8, 4)


def test_a_difference_within_the_masked_models_own_fp32_error_is_not_a_bug():
    """Outputs that are fp32 rounding noise (0.01 on 0.04) differ between any two summation orders: the fp32
    check fails, the float64 second opinion finds the compact model as close to the exact result as the
    masked model itself, and compact() returns it, saying so in the report."""
    import compactor

    m, x = _cancelling()
    small = compactor.compact(m, x)
    report = compactor.report_of(small)
    assert report.judged_in_float64 and report.max_abs_diff > 1e-3
    assert "float64" in str(report)


def test_the_float64_second_opinion_still_catches_a_wrong_model():
    """A candidate 0.1 off (ten times the masked model's own fp32 error) is not summation order."""
    from compactor import tensors

    m, x = _cancelling()
    batches = tensors.make_batches((x,), 1)
    with torch.no_grad():
        ref = [m(*b) for b in batches]
    assert verify.within_float32_error(m, batches, ref, ref)
    assert not verify.within_float32_error(m, batches, ref, [r + 0.1 for r in ref])


def test_the_float64_second_opinion_refuses_non_finite_and_integer_differences():
    """A reference that overflows in fp32 (inf where float64 is finite) vouches for nothing, and an integer output
    must equal the masked model's exactly: both make the second opinion say no."""
    m, x = _cancelling()
    from compactor import tensors

    batches = tensors.make_batches((x,), 0)
    with torch.no_grad():
        ref = [m(*b) for b in batches]
    overflowed = [(r, torch.full_like(r, float("inf"))) for r in ref]
    assert not verify.within_float32_error(_Pair(m), batches, overflowed, [(r + 5, torch.zeros_like(r)) for r in ref])
    ints = [(r, r.round().long()) for r in ref]
    assert verify.within_float32_error(_IntPair(m), batches, ints, ints)
    assert not verify.within_float32_error(_IntPair(m), batches, ints, [(r, i + 1) for r, i in ints])


class _Pair(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        y = self.m(x)
        return y, y * 0


class _IntPair(_Pair):
    def forward(self, x):
        y = self.m(x)
        return y, y.round().long()
