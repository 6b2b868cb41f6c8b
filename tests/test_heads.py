"""The attention-head rule: a head whose value path is constant goes, with its KV group; hand-worked on a
LLaMA-style grouped-query attention written out here (no transformers needed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import compactor
from compactor import heads, masks


class GQA(nn.Module):
    """4 query heads sharing 2 key/value heads (head_dim 4), the way LLaMA's attention reshapes: views with -1 heads."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.head_dim, self.num_key_value_groups = 4, 2
        self.q_proj, self.k_proj = nn.Linear(8, 16, bias=bias), nn.Linear(8, 8, bias=bias)
        self.v_proj, self.o_proj = nn.Linear(8, 8, bias=bias), nn.Linear(16, 8, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        k, v = (t.repeat_interleave(self.num_key_value_groups, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(6, 8), GQA(bias), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(h + self.attn(h))


def _mask(layer: nn.Module, rows=(), cols=()) -> None:
    mask = torch.ones_like(layer.weight)
    mask[list(rows)] = 0
    mask[:, list(cols)] = 0
    prune.custom_from_mask(layer, "weight", mask)


def test_the_rule_recognizes_the_attention_and_its_groups():
    """find(): q/k/v/o, 4 heads over 2 KV heads of 4 dims: a group of 2 query heads per KV head."""
    [att] = heads.find(Block())
    assert (att.name, att.q, att.o, att.heads, att.kv_heads, att.head_dim, att.group) == \
        ("attn", "attn.q_proj", "attn.o_proj", 4, 2, 4, 2)


def test_a_kv_head_with_every_v_row_masked_goes_with_its_query_heads_and_its_v_bias_is_folded():
    """V rows 4..7 (KV head 1) masked: query heads 2, 3 (q rows 8..15, o columns 8..15) and k/v rows 4..7 go;
    o_proj's bias gains W_o[:, 8:16] @ [b_v[4:8], b_v[4:8]] (each removed column reads its KV head's V bias)."""
    torch.manual_seed(0)
    m = Block().eval()
    _mask(m.attn.v_proj, rows=range(4, 8))
    w_o, b_o, b_v = m.attn.o_proj.weight.detach().clone(), m.attn.o_proj.bias.detach().clone(), m.attn.v_proj.bias
    plan = heads.plan_heads(masks.bake(m), set())
    assert {n: (c.out, c.inputs) for n, c in plan.cuts.items()} == {
        "attn.q_proj": (tuple(range(8, 16)), ()), "attn.k_proj": (tuple(range(4, 8)), ()),
        "attn.v_proj": (tuple(range(4, 8)), ()), "attn.o_proj": ((), tuple(range(8, 16)))}
    expected = w_o[:, 8:16].double() @ torch.cat([b_v[4:8], b_v[4:8]]).detach().double()
    [fold] = plan.folds
    assert (fold.layer, fold.target) == ("attn.o_proj", "bias")
    torch.testing.assert_close(fold.values, expected)
    x = torch.randn(2, 5, 6)
    small = compactor.compact(m, x)
    assert (small.attn.q_proj.out_features, small.attn.k_proj.out_features, small.attn.o_proj.in_features) == (8, 4, 8)
    torch.testing.assert_close(small.attn.o_proj.bias, (b_o.double() + expected).float())
    torch.testing.assert_close(small(x), m(x), rtol=1e-5, atol=1e-5)
    assert compactor.plan(m, x).params_after == compactor.report_of(small).params_after


def test_masked_o_columns_remove_the_head_too():
    """Every O column reading query heads 0, 1 (columns 0..7) masked: KV head 0 goes, nothing to fold."""
    torch.manual_seed(0)
    m = Block().eval()
    _mask(m.attn.o_proj, cols=range(0, 8))
    x = torch.randn(2, 5, 6)
    small = compactor.compact(m, x)
    assert (small.attn.q_proj.out_features, small.attn.v_proj.out_features) == (8, 4)
    torch.testing.assert_close(small(x), m(x), rtol=1e-5, atol=1e-5)


def test_q_only_or_partial_masks_keep_the_head_and_say_why():
    """Q rows of head 0 masked (attention weights change, V still averaged): kept, 'only Q or K rows masked';
    half of KV head 1's V rows masked: kept as partial (head_dim must stay uniform)."""
    torch.manual_seed(0)
    m = Block().eval()
    _mask(m.attn.q_proj, rows=range(0, 4))
    _mask(m.attn.v_proj, rows=range(4, 6))
    x = torch.randn(2, 5, 6)
    small = compactor.compact(m, x)
    assert small.attn.q_proj.out_features == 16
    torch.testing.assert_close(small(x), m(x), rtol=1e-5, atol=1e-5)
    notes = {(g.status, tuple(g.channels)): g.reason for g in compactor.report_of(small).groups}
    assert "only Q or K rows masked" in notes[("kept", (0,))]
    assert "masked in part" in notes[("partial", (1,))]


def test_prune_channels_masks_whole_kv_heads():
    """heads=0.5: one of the two KV heads per attention, with its query heads, masked in Q, K, V and O; compact()
    removes them all and equals the masked model."""
    torch.manual_seed(0)
    m = Block().eval()
    x = torch.randn(2, 5, 6)
    compactor.prune_channels(m, x, 0.0, heads=0.5)
    v_rows = (~m.attn.v_proj.weight_mask.bool().any(1)).nonzero().flatten().tolist()
    assert v_rows in ([0, 1, 2, 3], [4, 5, 6, 7])
    small = compactor.compact(m, x)
    assert [g for g in compactor.report_of(small).groups if g.status != "removed"] == []
    assert (small.attn.q_proj.out_features, small.attn.k_proj.out_features, small.attn.o_proj.in_features) == (8, 4, 8)
    torch.testing.assert_close(small(x), m(x), rtol=1e-5, atol=1e-5)


class InterleavedQKV(nn.Module):
    """GPT-2's attributes (c_attn, c_proj, num_heads, head_dim, split_size) but Q, K, V interleaved per head,
    as GPTBigCode lays them out: the rule's assumed layout is wrong here."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.split_size = 2, 4, 8
        self.c_attn, self.c_proj = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.c_attn(x).view(b, n, self.num_heads, 3 * self.head_dim).transpose(1, 2).split(self.head_dim, -1)
        return self.c_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


def test_a_layout_that_does_not_hold_on_the_model_keeps_the_heads():
    """Rows 16..19 ('V of head 0' if Q, K, V were side by side) masked in an interleaved c_attn: the NaN check
    finds the layout does not hold, the heads stay with that reason, and the output is exact."""
    torch.manual_seed(0)
    m = InterleavedQKV().eval()
    _mask(m.c_attn, rows=range(16, 20))
    x = torch.randn(2, 5, 8)
    small = compactor.compact(m, x)
    assert small.c_attn.out_features == 24
    torch.testing.assert_close(small(x), m(x), rtol=1e-5, atol=1e-5)
    reasons = " ".join(g.reason for g in compactor.report_of(small).groups)
    assert "the head layout assumed for '' did not hold" in reasons


def test_head_shaped_parameters_keep_the_heads():
    """Attention sinks (one learned logit per head) break 'softmax rows sum to 1': with a per-head parameter in
    the module, heads stay, and the note names it."""

    class WithSinks(GQA):
        def __init__(self) -> None:
            super().__init__()
            self.sinks = nn.Parameter(torch.zeros(4))

    torch.manual_seed(0)
    m = WithSinks().eval()
    _mask(m.v_proj, rows=range(4, 8))
    plan = heads.plan_heads(masks.bake(m), set())
    assert plan.cuts == {} and "holds 'sinks', sized by its heads" in plan.notes[0].reason


def test_prune_channels_leaves_heads_alone_where_the_rule_would_keep_them():
    """heads=0.5 on the interleaved c_attn: the dry run finds the layout does not hold, so nothing is masked there
    and the report says why."""
    torch.manual_seed(0)
    m = InterleavedQKV().eval()
    with pytest.raises(compactor.CompactionError, match=r"found nothing it can mask in InterleavedQKV.*1 unit\(s\) "
                                                        r"tried.*did not hold when checked"):
        compactor.prune_channels(m, torch.randn(2, 5, 8), 0.0, heads=0.5)
    assert not hasattr(m.c_attn, "weight_mask")


class FixedWidthGQA(GQA):
    """GQA that reshapes its output with a width stored at construction (``self.embed_dim``), which the rule
    does not know to update: with heads removed it cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_dim = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        k, v = (t.repeat_interleave(self.num_key_value_groups, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.embed_dim))


def test_heads_stay_with_the_reason_where_the_attention_reads_a_count_the_rule_does_not_update():
    """The cut is tried on a copy of the attention module first: it fails on the stored width 16, so the heads
    stay (never 'the compact model failed to run'), the report names the attribute, and the model is exact."""
    torch.manual_seed(0)
    model = Block()
    model.attn = FixedWidthGQA()
    model.eval()
    _mask(model.attn.v_proj, rows=range(4, 8))
    x = torch.randn(2, 5, 6)
    small = compactor.compact(model, x)
    assert small.attn.q_proj.out_features == 16
    (note,) = [g for g in small.compaction_report.groups if g.unit == "key/value heads"]
    assert note.status == "kept" and "reads a head count compactor does not update: embed_dim" in note.reason
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-6, atol=1e-6)
