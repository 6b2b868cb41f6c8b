"""compactor.masks: reading torch.nn.utils.prune state without touching the user's model."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from compactor import MaskLoadError, load_pruned, masks
from compactor.demo import LeNet
from tests.helpers import assert_unchanged, snapshot


def _pruned_lenet():
    torch.manual_seed(0)
    m = LeNet()
    prune.random_unstructured(m.conv1, "weight", amount=0.3)
    prune.ln_structured(m.conv1, "weight", amount=0.5, n=2, dim=0)  # stacked: a PruningContainer
    prune.l1_unstructured(m.conv1, "bias", amount=3)
    prune.ln_structured(m.fc1, "weight", amount=0.25, n=2, dim=0)
    return m


def test_deepcopy_of_live_masked_model_is_refused_by_torch_but_clone_works():
    """torch's deepcopy refuses the non-leaf masked weight; masks.clone copies it, hooks and masks included."""
    m = _pruned_lenet()
    with pytest.raises(RuntimeError):
        copy.deepcopy(m)
    c = masks.clone(m)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(c(x), m(x), rtol=0, atol=0)
    assert isinstance(next(iter(c.conv1._forward_pre_hooks.values())), prune.PruningContainer)
    c.conv1.weight_orig.data.add_(1.0)
    assert not torch.equal(c.conv1.weight_orig, m.conv1.weight_orig), "clone must not share storage"


def test_pruned_tensors_lists_stacked_methods_and_bias_masks():
    """A PruningContainer appears once, with the combined mask and every method's name."""
    m = _pruned_lenet()
    found = {t.key: t for t in masks.pruned_tensors(m)}
    assert set(found) == {"conv1.weight", "conv1.bias", "fc1.weight"}
    assert found["conv1.weight"].methods == ("RandomUnstructured", "LnStructured")
    assert torch.equal(found["conv1.weight"].mask, m.conv1.weight_mask)
    assert int(found["conv1.bias"].mask.sum()) == 3


def test_bake_matches_masked_model_and_leaves_it_alone():
    m = _pruned_lenet()
    before = snapshot(m)
    b = masks.bake(m)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(b(x), m(x), rtol=0, atol=0)
    assert not any(k.endswith("_orig") or k.endswith("_mask") for k in b.state_dict())
    assert_unchanged(m, before)


def test_load_pruned_round_trips_the_seeds_pruned_model_pth(tmp_path):
    """torch.save(model.state_dict(), 'pruned_model.pth') then load_pruned(LeNet, path) gives the same masked model."""
    m = _pruned_lenet()
    path = tmp_path / "pruned_model.pth"
    torch.save(m.state_dict(), path)
    loaded = load_pruned(LeNet, path)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    assert torch.equal(loaded.fc1.weight_mask, m.fc1.weight_mask)
    fresh = LeNet()
    before = snapshot(fresh)
    load_pruned(fresh, path)
    assert_unchanged(fresh, before)


def test_load_pruned_plain_state_dict_keeps_baked_zeros(tmp_path):
    m = _pruned_lenet()
    for mod, name in ((m.conv1, "weight"), (m.conv1, "bias"), (m.fc1, "weight")):
        prune.remove(mod, name)
    loaded = load_pruned(LeNet, m.state_dict())
    assert masks.pruned_tensors(loaded) == []
    assert torch.equal(loaded.conv1.weight, m.conv1.weight)


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda sd: sd.pop("fc1.weight_mask"), "no matching"),
        (lambda sd: sd.__setitem__("fc9.weight_mask", torch.ones(1)) or sd.__setitem__("fc9.weight_orig", torch.ones(1)), "fc9.weight"),
        (lambda sd: sd.__setitem__("fc1.weight_mask", torch.ones(3, 3)), "shape"),
        (lambda sd: sd.pop("fc2.bias"), "missing fc2.bias"),
        (lambda sd: sd.__setitem__("fc2.bias", torch.ones(7)), "fc2.bias"),
    ],
)
def test_load_pruned_names_the_bad_key(mutate, words):
    sd = dict(_pruned_lenet().state_dict())
    mutate(sd)
    with pytest.raises(MaskLoadError, match=words.replace(".", r"\.")):
        load_pruned(LeNet, sd)


def test_load_pruned_bad_files(tmp_path):
    with pytest.raises(MaskLoadError, match="does not exist"):
        load_pruned(LeNet, tmp_path / "nope.pth")
    good = tmp_path / "good.pth"
    torch.save(_pruned_lenet().state_dict(), good)
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(good.read_bytes()[:200])
    with pytest.raises(MaskLoadError, match="could not be read"):
        load_pruned(LeNet, trunc)
    junk = tmp_path / "junk.pth"
    torch.save([1, 2, 3], junk)
    with pytest.raises(MaskLoadError, match="does not hold a state_dict"):
        load_pruned(LeNet, junk)
    with pytest.raises(TypeError):
        load_pruned(42, good)


def test_load_pruned_refuses_a_pickled_model(tmp_path):
    """A whole model saved with torch.save(model) is not unpickled; the message says to save the state_dict."""
    path = tmp_path / "model.pth"
    torch.save(LeNet(), path)
    with pytest.raises(MaskLoadError, match=r"model\.state_dict\(\)"):
        load_pruned(LeNet, path)


def test_a_model_holding_a_computed_tensor_copies_and_compacts():
    """A forward run with grad enabled left a non-leaf tensor in a cache on the module (as timm's attention-bias
    cache does): bake / clone copy it detached instead of failing, and compact() works on the model unchanged."""
    import compactor

    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
            self.temperature = nn.Parameter(torch.tensor(0.5))
            self.cache = {}

        def forward(self, x):
            if "t" not in self.cache:
                self.cache["t"] = self.temperature * 2  # computed from a parameter: not a leaf
            return self.b(torch.relu(self.a(x))) * self.cache["t"]

    torch.manual_seed(0)
    m = Cached().eval()
    prune.custom_from_mask(m.a, "weight", torch.tensor([0.0, 1, 1, 0, 1, 1])[:, None].expand(6, 4))
    x = torch.randn(2, 4)
    expected = m(x)  # grad enabled: the cache now holds a non-leaf tensor
    assert not m.cache["t"].is_leaf
    assert masks.clone(m).cache["t"].is_leaf and masks.bake(m).cache["t"].is_leaf
    small = compactor.compact(m, x)
    torch.testing.assert_close(small(x), expected.detach())
    assert small.a.out_features == 4
