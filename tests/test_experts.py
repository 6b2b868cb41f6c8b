"""Mixture-of-experts MLPs: fused 3-D expert tensors (as Hugging Face stores them) lose the same number of
neurons in every expert; per-expert nn.Linear experts go through the traced graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import compactor
from compactor import experts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

H, I, E = 8, 6, 4


class FusedExperts(nn.Module):
    """Experts in two 3-D tensors, computed per expert on the tokens routed to it (Hugging Face's layout)."""

    def __init__(self, interleaved: bool = False) -> None:
        super().__init__()
        self.num_experts, self.intermediate_dim = E, I
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, H) / 3)
        self.down_proj = nn.Parameter(torch.randn(E, H, I) / 3)
        self.interleaved = interleaved  # gate and up rows alternate (another family's layout)

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            pos, tok = torch.where((top_k_index == e).t())
            if tok.numel() == 0:
                continue
            h = F.linear(x[tok], self.gate_up_proj[e])
            gate, up = (h[:, ::2], h[:, 1::2]) if self.interleaved else h.chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y)
        return out


class SparseBlock(nn.Module):
    def __init__(self, interleaved: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(5, H)
        self.router = nn.Linear(H, E, bias=False)
        self.experts = FusedExperts(interleaved)
        self.out = nn.Linear(H, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x).reshape(-1, H)
        w, idx = torch.topk(self.router(h).softmax(-1), 2, dim=-1)
        return self.out(h + self.experts(h, idx, w / w.sum(-1, keepdim=True)))


def _block(interleaved: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return SparseBlock(interleaved).eval(), torch.randn(16, 5)


def _mask_neurons(ex: FusedExperts, per_expert: dict[int, list[int]]) -> None:
    mask = torch.ones_like(ex.gate_up_proj)
    for e, neurons in per_expert.items():
        for j in neurons:
            mask[e, j] = 0  # gate row
            mask[e, I + j] = 0  # up row
    prune.custom_from_mask(ex, "gate_up_proj", mask)


def test_fused_experts_lose_the_fewest_masked_count_in_every_expert():
    """Experts 0..3 have 2, 3, 2, 4 neurons masked (gate and up rows): 2 go in each (one tensor holds them all),
    the lowest-numbered masked ones; the 3 extra masked neurons stay and are reported; the output is exact."""
    model, x = _block()
    masked = {0: [1, 4], 1: [0, 2, 5], 2: [3, 5], 3: [0, 1, 2, 3]}
    _mask_neurons(model.experts, masked)
    small = compactor.compact(model, x)
    ex = small.experts
    assert tuple(ex.gate_up_proj.shape) == (E, 2 * (I - 2), H) and tuple(ex.down_proj.shape) == (E, H, I - 2)
    assert ex.intermediate_dim == I - 2
    baked = model.experts.gate_up_proj.detach()
    kept = {0: [0, 2, 3, 5], 1: [1, 3, 4, 5], 2: [0, 1, 2, 4], 3: [2, 3, 4, 5]}
    for e, rows in kept.items():
        rows = torch.tensor(rows)
        torch.testing.assert_close(ex.gate_up_proj[e], torch.cat([baked[e, rows], baked[e, I + rows]]))
        torch.testing.assert_close(ex.down_proj[e], model.experts.down_proj[e][:, rows])
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-6, atol=1e-6)
    notes = {n.status: n for n in small.compaction_report.groups if n.unit == "expert neurons"}
    assert len(notes["removed"].channels) == 2 * E
    assert notes["kept"].channels == [1 * I + 5, 3 * I + 2, 3 * I + 3]  # expert e's neuron j is e * I + j
    assert small.compaction_report.params_after == small.compaction_report.params_before - 2 * E * 3 * H


def test_a_neuron_whose_down_column_is_masked_goes_too():
    model, x = _block()
    mask = torch.ones_like(model.experts.down_proj)
    mask[:, :, 4] = 0  # neuron 4 of every expert is read by nothing
    prune.custom_from_mask(model.experts, "down_proj", mask)
    small = compactor.compact(model, x)
    assert tuple(small.experts.down_proj.shape) == (E, H, I - 1)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-6, atol=1e-6)


def test_an_expert_with_nothing_masked_keeps_every_neuron_with_the_reason():
    model, x = _block()
    _mask_neurons(model.experts, {0: [1], 1: [1], 2: [1]})  # expert 3 has none masked
    small = compactor.compact(model, x)
    assert small.experts.gate_up_proj.shape == model.experts.gate_up_proj.shape
    assert any("expert 3 has none masked" in n.reason for n in small.compaction_report.groups)


def test_another_gate_and_up_layout_is_refused_by_the_trial_run_and_kept_exact():
    """Gate and up rows interleaved: cutting rows j and I + j would cut other neurons; the trial run on the
    example input catches it and nothing goes, with the reason."""
    model, x = _block(interleaved=True)
    mask = torch.ones_like(model.experts.gate_up_proj)
    mask[:, :2] = 0  # rows 0 and 1: gate and up of neuron 0 in this layout, but gate 0 and 1 as assumed
    mask[:, I:I + 2] = 0  # and rows I, I + 1, which the assumed layout would pair with them
    prune.custom_from_mask(model.experts, "gate_up_proj", mask)
    small = compactor.compact(model, x)
    assert small.experts.gate_up_proj.shape == model.experts.gate_up_proj.shape
    assert any("did not compute the same" in n.reason for n in small.compaction_report.groups)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-6, atol=1e-6)


def test_prune_channels_masks_the_same_number_of_neurons_in_every_expert_and_compact_removes_them(tmp_path):
    model, x = _block()
    report = compactor.prune_channels(model, x, 0.5)
    group = next(g for g in report.groups if g.layers[0] == "experts.gate_up_proj")
    assert (group.units, group.masked) == (E * I, E * 3)
    dead = (model.experts.gate_up_proj.detach() == 0).all(-1)  # (E, 2I)
    assert dead.sum(1).tolist() == [6] * E and torch.equal(dead[:, :I], dead[:, I:])
    assert ((model.experts.down_proj.detach() == 0).all(1) == dead[:, :I]).all()
    small = compactor.compact(model, x)
    assert tuple(small.experts.gate_up_proj.shape) == (E, 6, H)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-6, atol=1e-6)
    loaded = compactor.load(lambda: _block()[0], compactor.save(small, tmp_path / "moe.pt"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


def test_find_reads_the_neurons_last_layout_and_skips_shapes_that_fit_neither():
    m = nn.Module()
    m.gate_up_proj = nn.Parameter(torch.zeros(E, H, 2 * I))  # (E, H, 2I) and (E, I, H)
    m.down_proj = nn.Parameter(torch.zeros(E, I, H))
    (found,) = experts.find(m)
    assert (found.neurons, found.neurons_last) == (I, True)
    odd = nn.Module()
    odd.gate_up_proj = nn.Parameter(torch.zeros(E, 8, 8))
    odd.down_proj = nn.Parameter(torch.zeros(E, 4, 4))
    assert experts.find(odd) == []


class LinearExpert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False), nn.Linear(I, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LinearMoE(nn.Module):
    """The older layout: one nn.Linear MLP per expert, tokens gathered and scattered back."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, H)
        self.router = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(LinearExpert() for _ in range(E))
        self.out = nn.Linear(H, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x).reshape(-1, H)
        w, idx = torch.topk(self.router(h).softmax(-1), 2, dim=-1)
        y = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            pos, tok = torch.where((idx == e).t())
            y.index_add_(0, tok, expert(h[tok]) * w[tok, pos, None])
        return self.out(h + y)


def test_per_expert_linear_experts_lose_their_masked_neurons_through_the_graph():
    torch.manual_seed(0)
    model, x = LinearMoE().eval(), torch.randn(16, 5)
    compactor.prune_channels(model, x, 0.5)
    small = compactor.compact(model, x)
    assert [e.w1.out_features for e in small.experts] == [3] * E
    assert [e.w2.in_features for e in small.experts] == [3] * E
    assert small.router.out_features == E  # the router is untouched
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-6, atol=1e-6)
