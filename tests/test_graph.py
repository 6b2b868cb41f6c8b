"""graph.trace on hand-built models: the role, indices and root mapping of every item that matters."""

import pytest
import torch
from torch import nn

from compactor import graph
from compactor.demo import LeNet
from tests.hand_models import Halves, Residual, Scaled


def _trace(model: nn.Module, *shape: int):
    return graph.trace(model.eval(), (torch.randn(*shape),))


def _group(groups, root: str) -> graph.Group:
    found = [g for g in groups if g.root == root]
    assert len(found) == 1, f"expected one group rooted at {root!r}, got {[g.root for g in groups]}"
    return found[0]


def _item(group: graph.Group, name: str, role: str) -> graph.Item:
    found = [it for it in group.items if it.name == name and it.role == role]
    assert len(found) == 1, f"{name!r}/{role!r} not in {[(it.name, it.role) for it in group.items]}"
    return found[0]


class ConvBnReluConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.bn(self.c1(x))))


def test_conv_bn_relu_conv_gives_out_slice_pass_in_with_identity_indices():
    """c1 -> bn -> relu -> c2: c1's 4 channels are 'out' in c1, 'slice' in bn, 'pass' in relu, 'in' in c2."""
    groups, _ = _trace(ConvBnReluConv(), 1, 3, 8, 8)
    g = _group(groups, "c1")
    assert g.size == 4 and not g.reaches_output
    assert g.layers() == ["c1", "bn", "c2"]
    assert {it.role for it in g.items} == {"out", "slice", "pass", "in"}
    for name, role, op in (("c1", "out", "Conv2d"), ("bn", "slice", "BatchNorm2d"), ("c2", "in", "Conv2d")):
        it = _item(g, name, role)
        assert it.op == op and it.idxs == [0, 1, 2, 3] and it.root_idxs == [0, 1, 2, 3] and it.reason == ""
    relu = [it for it in g.items if it.role == "pass"]
    assert [it.op for it in relu] == ["Relu"]
    assert relu[0].idxs == [0, 1, 2, 3]


def test_last_layer_group_reaches_the_output():
    """c2 computes the model's output: its group is flagged reaches_output and holds only c2 (out, 2 channels)."""
    groups, _ = _trace(ConvBnReluConv(), 1, 3, 8, 8)
    g = _group(groups, "c2")
    assert g.reaches_output and g.size == 2
    assert [(it.name, it.role, it.idxs) for it in g.items] == [("c2", "out", [0, 1])]


def test_lenet_conv2_channel_c_feeds_fc1_columns_25c_to_25c_plus_24():
    """conv2 (16 x 5 x 5 after pooling) -> flatten -> fc1: channel 2 is fc1 columns 50..74, channel c is 25c..25c+24."""
    torch.manual_seed(0)
    groups, _ = _trace(LeNet(), 1, 1, 28, 28)
    g = _group(groups, "conv2")
    assert g.size == 16
    fc1 = _item(g, "fc1", "in")
    assert fc1.idxs == list(range(400))
    assert [i for i, r in zip(fc1.idxs, fc1.root_idxs) if r == 2] == list(range(50, 75))
    assert fc1.root_idxs == [i // 25 for i in range(400)]
    assert _item(g, "conv2", "out").idxs == list(range(16))
    assert "reshape" in [it.op for it in g.items if it.role == "pass"]


def test_concat_offsets_the_second_producer_in_the_consumer():
    """cat([a(x) (4 ch), b(x) (3 ch)]) -> c: b's channel r is c's input 4 + r; a's channel r is input r."""

    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 3, 1), nn.Conv2d(7, 2, 1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], 1))

    groups, _ = _trace(Cat(), 1, 3, 4, 4)
    ca = _item(_group(groups, "a"), "c", "in")
    cb = _item(_group(groups, "b"), "c", "in")
    assert (ca.idxs, ca.root_idxs) == ([0, 1, 2, 3], [0, 1, 2, 3])
    assert (cb.idxs, cb.root_idxs) == ([4, 5, 6], [0, 1, 2])


def test_depthwise_conv_is_dw_in_its_producers_group():
    """conv(3->4) -> relu -> depthwise conv(4, groups=4) -> conv: the depthwise conv is 'dw', coupled with its producer."""
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 2, 1))
    groups, _ = _trace(m, 1, 3, 8, 8)
    g = next(g for g in groups if any(it.role == "dw" for it in g.items))
    dw = _item(g, "2", "dw")
    assert dw.idxs == [0, 1, 2, 3] and dw.op == "Conv2d"
    assert _item(g, "0", "out").idxs == [0, 1, 2, 3]  # the producer before it
    assert _item(g, "3", "in").idxs == [0, 1, 2, 3]  # the reader after it
    assert not any(it.role in ("gout", "gin") for gr in groups for it in gr.items)


def test_grouped_conv_is_gout_for_its_outputs_and_gin_for_its_inputs():
    """A conv with groups=2 (4 -> 6): 'gout' in the group of its 6 outputs, 'gin' in the group of its 4 inputs."""
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, groups=2), nn.Conv2d(6, 2, 1))
    groups, _ = _trace(m, 1, 3, 8, 8)
    gin = _item(_group(groups, "0"), "2", "gin")
    assert gin.idxs == [0, 1, 2, 3]
    gout = _item(_group(groups, "2"), "2", "gout")
    assert gout.idxs == list(range(6)) and gout.root_idxs == list(range(6))
    assert _item(_group(groups, "2"), "3", "in").idxs == list(range(6))
    assert not any(it.role in ("out", "dw") and it.name == "2" for g in groups for it in g.items)


def test_layernorm_is_blocked_with_a_reason():
    """Linear -> LayerNorm -> Linear: the LayerNorm item is 'blocked' and says it normalizes across channels."""
    m = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    groups, _ = _trace(m, 2, 4)
    ln = _item(_group(groups, "0"), "1", "blocked")
    assert ln.op == "LayerNorm"
    assert ln.reason == "LayerNorm normalizes across channels"
    assert ln.idxs == list(range(6))


def test_fixed_channel_slice_is_blocked():
    """h[:, :4] and h[:, 4:]: both slices are 'blocked' ('a fixed slice ...'); r reads local 0..3 = roots 4..7."""

    groups, _ = _trace(Halves(), 1, 3, 6, 6)
    g = _group(groups, "conv")
    blocked = [it for it in g.items if it.role == "blocked"]
    assert len(blocked) == 2
    assert all(it.reason == "a fixed slice of the channels keeps them" for it in blocked)
    r = _item(g, "r", "in")
    assert (r.idxs, r.root_idxs) == ([0, 1, 2, 3], [4, 5, 6, 7])


def test_residual_add_couples_both_producers_in_one_group():
    """relu(a(x) + b(x)) -> c: a and b are both 'out' in one group, channel r of a with channel r of b."""
    groups, _ = _trace(Residual(), 1, 3, 5, 5)
    owning = [g for g in groups if any(it.name == "b" and it.role == "out" for it in g.items)]
    assert len(owning) == 1
    g = owning[0]
    a, b = _item(g, "a", "out"), _item(g, "b", "out")
    assert (a.idxs, a.root_idxs) == (b.idxs, b.root_idxs) == ([0, 1, 2, 3], [0, 1, 2, 3])
    assert "Add" in [it.op for it in g.items if it.role == "pass"]
    assert _item(g, "c", "in").idxs == [0, 1, 2, 3]
    assert sorted(g.layers()) == ["a", "b", "c"]


def test_bare_parameter_is_sliced_along_dim_0():
    """b(gamma * relu(a(x))), gamma an nn.Parameter (6,): gamma is a 'slice' item on dim 0 in a's group."""

    m = Scaled()
    groups, _ = _trace(m, 2, 4)
    gamma = _item(_group(groups, "a"), "gamma", "slice")
    assert gamma.module is m.gamma and gamma.op == "Parameter" and gamma.dim == 0
    assert gamma.idxs == list(range(6))


def test_bn_pairs_name_the_batchnorm_after_a_conv():
    """conv -> bn (and nothing else reads conv): bn_pairs == {'c1': 'bn'}; no pair for c2, which feeds no BN."""
    _, bn_pairs = _trace(ConvBnReluConv(), 1, 3, 8, 8)
    assert bn_pairs == {"c1": "bn"}


def test_bn_pairs_skip_a_conv_whose_output_is_also_read_elsewhere():
    """c(bn(y) + y), y = conv(x): the BN is not the only reader of conv's output, so no pair."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.c = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            return self.c(self.bn(y) + y)

    _, bn_pairs = _trace(Shared(), 1, 3, 4, 4)
    assert bn_pairs == {}


@pytest.mark.parametrize("reverse", [False, True])
def test_fast_index_mappings_give_torch_prunings_pairs(reverse):
    """graph._mapped applies flatten / concat / split / slice mappings without torch-pruning's per-index
    namedtuple construction: the same (idx, root) pairs, as sets, for each kind and direction."""
    from torch_pruning._helpers import _HybridIndex
    from torch_pruning.dependency import index_mapping as im

    idxs = [_HybridIndex(idx=i, root_idx=r) for i, r in [(0, 0), (3, 1), (5, 1), (7, 4), (12, 2)]]
    for mapping in (im._FlattenIndexMapping(stride=3, reverse=reverse), im._ConcatIndexMapping([4, 9], reverse=reverse),
                    im._SplitIndexMapping([4, 9], reverse=reverse),
                    im._SliceIndexMapping(dim=1, start=2, step=3, end=11, reverse=reverse)):
        assert set(graph._mapped(mapping, idxs)) == set(mapping(idxs)), type(mapping).__name__
        assert all(type(p) is _HybridIndex for p in graph._mapped(mapping, idxs))
