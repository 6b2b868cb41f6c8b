"""Bad input gets a clear error naming the layer; the user's model is never modified."""

import pytest
import torch
from torch.nn.utils import prune

import compactor
from compactor import CompactionError, NoPruningFoundError, VerificationError
from compactor.demo import LeNet
from tests.helpers import assert_unchanged, snapshot

X = torch.randn(2, 1, 28, 28)


def _pruned():
    torch.manual_seed(0)
    m = LeNet()
    prune.ln_structured(m.conv2, "weight", amount=0.5, n=2, dim=0)
    return m


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        compactor.compact(lambda x: x, X)


def test_no_masks_says_so_and_what_to_do():
    with pytest.raises(NoPruningFoundError, match=r"prune\.ln_structured"):
        compactor.compact(LeNet(), X)


def test_mask_removing_every_channel_names_the_layer():
    m = LeNet()
    prune.custom_from_mask(m.conv2, "weight", torch.zeros_like(m.conv2.weight))
    before = snapshot(m)
    with pytest.raises(CompactionError, match="layer 'conv2'.*all 16"):
        compactor.compact(m, X)
    assert_unchanged(m, before)


def test_rejected_example_input_is_explained():
    m = _pruned()
    with pytest.raises(CompactionError, match=r"rejected the example input\(s\) of shape \(2, 1, 32, 32\)"):
        compactor.compact(m, torch.randn(2, 1, 32, 32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_name_the_layer(bad):
    m = _pruned()
    with torch.no_grad():
        m.fc2.weight[3, 7] = bad
    with pytest.raises(CompactionError, match="layer 'fc2': weight contains NaN or inf"):
        compactor.compact(m, X)


def test_nan_in_masked_orig_of_a_masked_row_is_harmless_but_in_a_kept_row_named():
    m = _pruned()
    kept = int(m.conv2.weight_mask.flatten(1).any(1).nonzero()[0])
    with torch.no_grad():
        m.conv2.weight_orig[kept, 0, 0, 0] = float("nan")
    with pytest.raises(CompactionError, match="layer 'conv2'"):
        compactor.compact(m, X)


def test_bad_options():
    with pytest.raises(ValueError, match="mode='fast'"):
        compactor.compact(_pruned(), X, mode="fast")
    with pytest.raises(ValueError, match="round_to=0"):
        compactor.compact(_pruned(), X, round_to=0)
    with pytest.raises(TypeError, match="example_inputs"):
        compactor.compact(_pruned(), [])


def test_verification_catches_a_wrong_fold(monkeypatch):
    """If folding were skipped, verification must fail loudly rather than return a wrong model."""
    from compactor import fold

    monkeypatch.setattr(fold, "add_to_bias", lambda module, delta: None)  # the name fold calls it by
    m = _pruned()
    with torch.no_grad():
        m.conv2.bias.fill_(0.5)
    with pytest.raises(VerificationError, match="differs from the masked model"):
        compactor.compact(m, X)


def test_an_output_compactor_cannot_compare_is_a_user_error_not_a_bug():
    """A model returning an object that is not a tensor / tuple / dict is refused as CompactionError, not VerificationError."""

    class Box:
        pass

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 3)

        def forward(self, x):
            box = Box()
            box.y = self.a(x)
            return box

    m = Odd()
    torch.nn.utils.prune.ln_structured(m.a, "weight", amount=1, n=2, dim=0)
    with pytest.raises(CompactionError, match="returns a Box") as info:
        compactor.compact(m, torch.randn(2, 4))
    assert not isinstance(info.value, VerificationError)


def test_a_verification_error_is_a_bug_not_bad_input():
    """VerificationError stands outside the CompactionError tree: `except CompactionError` (bad input, said
    clearly) does not swallow a compact model that differs from the masked one."""
    assert not issubclass(VerificationError, CompactionError) and issubclass(VerificationError, RuntimeError)
