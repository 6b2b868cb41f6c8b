"""Attention heads and key/value groups, removed by rule where the traced graph cannot follow.

Attention mixes positions (softmax over ``q k^T``), so the dependency graph keeps every
channel that passes through it. But a head's output is ``softmax(q k^T) v``, and each
softmax row sums to 1: when every V row of a head is masked, ``v`` is that head's V bias
at every position, and so is the head's output, whatever the attention weights. The head
then goes: its Q, K and V rows and the O-projection columns that read it, with
``W_o[:, head] @ v_bias[head]`` folded into the O bias. A head also goes when every O
column that reads it is masked (nothing reads it).

In grouped-query attention a key/value head is shared by ``num_key_value_groups`` query
heads: it goes with all of them, so the ratio stays valid. Masking only Q or K rows does
not make a head constant (uniform attention still averages V): such heads stay, and so
do heads masked in part (``head_dim`` must stay uniform). RoPE rotates pairs of
dimensions inside a head, another reason to remove whole heads only.

Recognized (Hugging Face's attention modules reshape with ``-1`` heads, so a module with
fewer heads runs as it is; head counts stored on the module are updated, and those its forward
reads from the config every layer shares when every layer keeps the same count; each cut is
first tried on a copy of the module, on the input it received, and kept with the reason if that
copy fails or computes otherwise):

- ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` and a ``head_dim`` (LLaMA, Mistral, Qwen2
  with ``num_key_value_groups``; ViT without);
- ``query``, ``key``, ``value`` and an ``attention_head_size``, the O projection being the
  parent's ``output.dense`` (BERT, RoBERTa and kin);
- ``q_lin``, ``k_lin``, ``v_lin``, ``out_lin`` and an ``attention_head_size`` (DistilBERT);
- a fused ``c_attn`` (Q, K, V side by side, split by ``split_size``) and ``c_proj``, with
  ``num_heads`` and ``head_dim`` (GPT-2 self-attention);
- a fused ``qkv_proj`` (Q, K, V side by side) and ``o_proj``, with ``head_dim`` and
  ``num_key_value_heads`` (Phi-3; it reads ``config.num_attention_heads``);
- a fused ``query_key_value`` interleaved per key/value group (its query heads, then K, then V)
  and ``dense``, with ``head_size`` (GPT-NeoX: one head per group) or ``head_dim`` and
  ``num_kv_heads`` (Falcon).
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from . import probe
from .kinds import add_to_bias, dead_rows, is_linear_like, kind_of, out_major, zero_columns
from .plans import Cut, Fold, GroupNote
from .tensors import call, first_line, flatten_outputs

__all__ = ["Attention", "HeadPlan", "COUNT_ATTRIBUTES", "find", "plan_heads", "set_count", "config_updates"]

#: Attributes of attention modules that hold a head count or a width derived from it (updated on the module),
#: by what they count: query heads, key/value heads, or the query width (heads x head_dim).
COUNT_ATTRIBUTES = {"num_attention_heads": "heads", "num_heads": "heads", "n_heads": "heads",
                    "num_key_value_heads": "kv_heads", "num_kv_heads": "kv_heads", "n_kv_heads": "kv_heads",
                    "all_head_size": "width", "split_size": "width"}


@dataclass(frozen=True)
class Attention:
    """One recognized attention module and its projections' names."""

    name: str
    q: str
    k: str
    v: str
    o: str
    heads: int
    kv_heads: int
    head_dim: int
    counts: tuple[str, ...] = ()  # attributes of the module holding a head count or width (COUNT_ATTRIBUTES)
    offsets: tuple[int, int, int] = (0, 0, 0)  # where Q, K, V start in their layers' outputs (a fused QKV layer)
    config_counts: tuple[str, ...] = ()  # head counts to update on the config its forward reads them from (Phi-3)
    interleaved: bool = False  # one fused layer, per key/value group: its query heads, then K, then V (GPT-NeoX)

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    def kv_rows(self, kv_heads) -> list[int]:
        """K / V output rows of these key/value heads (before the layer's offset)."""
        return [j * self.head_dim + d for j in sorted(kv_heads) for d in range(self.head_dim)]

    def q_rows(self, kv_heads) -> list[int]:
        """Q output rows (= O input columns) of every query head sharing these key/value heads."""
        span = self.group * self.head_dim
        return [j * span + d for j in sorted(kv_heads) for d in range(span)]

    def rows(self, which: str, kv_heads) -> list[int]:
        """The output rows, in its layer, of ``which`` ("q", "k" or "v") for these key/value heads (with their
        query heads): where the layout puts them."""
        hd, span = self.head_dim, self.group * self.head_dim
        if self.interleaved:  # per key/value group j: span query rows, then hd K rows, then hd V rows
            start, width = {"q": (0, span), "k": (span, hd), "v": (span + hd, hd)}[which]
            return [j * (span + 2 * hd) + start + d for j in sorted(kv_heads) for d in range(width)]
        off = self.offsets["qkv".index(which)]
        return [off + r for r in (self.q_rows(kv_heads) if which == "q" else self.kv_rows(kv_heads))]


@dataclass
class HeadPlan:
    """What the head rule decided, in the planner's vocabulary (:mod:`compactor.plans`)."""

    cuts: dict[str, Cut] = field(default_factory=dict)
    folds: list[Fold] = field(default_factory=list)  # O-bias folds of removed heads' V bias
    notes: list[GroupNote] = field(default_factory=list)  # per attention module, in key/value heads
    owned: set[str] = field(default_factory=set)  # projections whose traced groups this rule answers for
    attributes: dict[str, dict[str, int]] = field(default_factory=dict)  # module -> attribute -> new value
    any_masked: bool = False


def _note(out: HeadPlan, layers: list[str], kv_heads: list[int], status: str, why: str) -> None:
    out.notes.append(GroupNote(layers=layers, channels=kv_heads, status=status, reason=why, unit="key/value heads"))


def _add_cut(out: HeadPlan, name: str, rows: set[int] = frozenset(), columns: set[int] = frozenset()) -> None:
    """``name`` loses output ``rows`` and input ``columns`` besides what it loses already."""
    old = out.cuts.get(name, Cut(name=name, why="attention head(s) removed"))
    out.cuts[name] = Cut(name=name, out=tuple(sorted(set(old.out) | set(rows))),
                         inputs=tuple(sorted(set(old.inputs) | set(columns))), why=old.why)


def _name(prefix: str, child: str) -> str:
    return f"{prefix}.{child}" if prefix else child


def _counts(m: nn.Module) -> tuple[str, ...]:
    """The head-count attributes (:data:`COUNT_ATTRIBUTES`) stored on attention module ``m`` (its forward may
    reshape with any of them: StableLM reads ``num_heads`` and ``num_key_value_heads``)."""
    return tuple(a for a in COUNT_ATTRIBUTES if isinstance(m.__dict__.get(a), int) and not isinstance(m.__dict__[a], bool))


@functools.lru_cache(maxsize=None)
def _forward_reads(cls: type, pattern: str) -> frozenset[str]:
    """The names ``pattern``'s group matches in the source of ``cls.forward`` (read once per class); none when
    there is no source (compiled, or defined interactively)."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return frozenset()
    return frozenset(re.findall(pattern, source))


def _config_counts(m: nn.Module) -> tuple[str, ...]:
    """The head counts (:data:`COUNT_ATTRIBUTES`) the forward of ``m`` reads from ``self.config``, the config every
    layer shares (Phi-3 splits its fused QKV at ``self.config.num_attention_heads * self.head_dim``)."""
    config = m.__dict__.get("config")
    if config is None:
        return ()
    read = _forward_reads(type(m), r"self\.config\.(\w+)")
    if not any(a in read and isinstance(getattr(config, a, None), int) for a in COUNT_ATTRIBUTES):
        return ()
    # then every head count the config holds follows, and an explicit head_dim (no longer hidden_size / heads)
    return tuple(a for a, what in COUNT_ATTRIBUTES.items() if what != "width"
                 and isinstance(getattr(config, a, None), int)) + ("head_dim",)


def config_updates(config: object, heads: int, kv_heads: int, head_dim: int) -> dict[str, int]:
    """The keys of a Hugging Face ``config`` that describe attention of ``heads`` query heads over ``kv_heads``
    key/value heads of ``head_dim`` (an explicit head_dim where hidden_size / heads no longer gives it)."""
    out = {}
    key = next((k for k in ("num_attention_heads", "n_head", "num_heads") if hasattr(config, k)), None)
    if key is not None:
        out[key] = heads
    key = next((k for k in ("num_key_value_heads", "num_kv_heads") if hasattr(config, k)), None)
    if key is not None and getattr(config, key) is not None:
        out[key] = kv_heads
    if getattr(config, "head_dim", None) is not None or head_dim * heads != getattr(config, "hidden_size",
                                                                                    head_dim * heads):
        out["head_dim"] = head_dim
    return out


def set_count(module: nn.Module, attr: str, value: int) -> None:
    """Set a head count on an attention ``module``, or on its config for ``"config.<name>"``."""
    owner, _, leaf = attr.rpartition(".")
    setattr(getattr(module, owner) if owner else module, leaf, value)


# Attention layouts, tried in order (the first that recognizes a module wins). Each takes (name, module, every
# module by name) and returns (q, k, v, o names, head_dim, query heads per KV head, head-count attributes to
# update[, Q/K/V offsets in one fused layer, or "interleaved"]) or None.


def _separate_projections(name: str, m: nn.Module, modules: dict) -> tuple | None:
    """q_proj, k_proj, v_proj, o_proj and a head_dim (LLaMA, Mistral, Qwen2 with num_key_value_groups; ViT)."""
    if isinstance(getattr(m, "head_dim", None), int) and all(
            is_linear_like(getattr(m, p, None)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        groups = getattr(m, "num_key_value_groups", 1)
        return (*(_name(name, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")), m.head_dim, groups, _counts(m))
    return None


def _distilbert(name: str, m: nn.Module, modules: dict) -> tuple | None:
    if isinstance(getattr(m, "attention_head_size", None), int) and all(
            is_linear_like(getattr(m, p, None)) for p in ("q_lin", "k_lin", "v_lin", "out_lin")):
        return (*(_name(name, p) for p in ("q_lin", "k_lin", "v_lin", "out_lin")), m.attention_head_size, 1,
                _counts(m))
    return None


def _bert(name: str, m: nn.Module, modules: dict) -> tuple | None:
    """query, key, value; the O projection is the parent's output.dense."""
    if isinstance(getattr(m, "attention_head_size", None), int) and all(
            is_linear_like(getattr(m, p, None)) for p in ("query", "key", "value")) and "." in name:
        o = f"{name.rpartition('.')[0]}.output.dense"
        if is_linear_like(modules.get(o)):
            return (*(_name(name, p) for p in ("query", "key", "value")), o, m.attention_head_size, 1, _counts(m))
    return None


def _fused_side_by_side(name: str, m: nn.Module, modules: dict) -> tuple | None:
    """qkv_proj holding Q, K and V one after the other, and o_proj (Phi-3)."""
    if isinstance(getattr(m, "head_dim", None), int) and isinstance(getattr(m, "num_key_value_heads", None), int) \
            and all(is_linear_like(getattr(m, p, None)) for p in ("qkv_proj", "o_proj")) and m.head_dim > 0:
        q_width, kv_width = out_major(m.o_proj).shape[1], m.num_key_value_heads * m.head_dim
        if kv_width > 0 and q_width % kv_width == 0 and out_major(m.qkv_proj).shape[0] == q_width + 2 * kv_width:
            qkv = _name(name, "qkv_proj")
            return (qkv, qkv, qkv, _name(name, "o_proj"), m.head_dim, q_width // kv_width, _counts(m),
                    (0, q_width, q_width + kv_width))
    return None


def _fused_interleaved(name: str, m: nn.Module, modules: dict) -> tuple | None:
    """query_key_value holding, per key/value group, its query heads' rows, then K's, then V's, and dense
    (GPT-NeoX: one head per group, head_size; Falcon: head_dim and num_kv_heads)."""
    if not all(is_linear_like(getattr(m, p, None)) for p in ("query_key_value", "dense")):
        return None
    hd = m.__dict__.get("head_size", m.__dict__.get("head_dim"))
    if not isinstance(hd, int) or hd < 1 or (m.__dict__.get("multi_query") and
                                             not m.__dict__.get("new_decoder_architecture")):
        return None  # (Falcon's multi-query layout: one K and one V head, nothing to remove)
    width = out_major(m.dense).shape[1]
    kv = m.__dict__.get("num_kv_heads", width // hd)
    if isinstance(kv, int) and kv > 0 and width % (kv * hd) == 0 \
            and out_major(m.query_key_value).shape[0] == width + 2 * kv * hd:
        qkv = _name(name, "query_key_value")
        return (qkv, qkv, qkv, _name(name, "dense"), hd, width // (kv * hd), _counts(m), "interleaved")
    return None


def _gpt2(name: str, m: nn.Module, modules: dict) -> tuple | None:
    """c_attn holding Q, K and V side by side (split by split_size), and c_proj; not cross-attention."""
    if isinstance(getattr(m, "head_dim", None), int) and isinstance(getattr(m, "split_size", None), int) \
            and isinstance(getattr(m, "num_heads", None), int) and not hasattr(m, "q_attn") \
            and is_linear_like(getattr(m, "c_attn", None)) and is_linear_like(getattr(m, "c_proj", None)) \
            and out_major(m.c_attn).shape[0] == 3 * m.split_size:
        qkv = _name(name, "c_attn")
        return (qkv, qkv, qkv, _name(name, "c_proj"), m.head_dim, 1, _counts(m), (0, m.split_size, 2 * m.split_size))
    return None


_RECOGNIZERS = (_separate_projections, _distilbert, _bert, _fused_side_by_side, _fused_interleaved, _gpt2)


def _recognize(name: str, m: nn.Module, modules: dict) -> tuple | None:
    """What the first recognizer that knows ``m``'s layout says, or None."""
    for recognizer in _RECOGNIZERS:
        seen = recognizer(name, m, modules)
        if seen is not None:
            return seen
    return None


def find(model: nn.Module) -> list[Attention]:
    """The attention modules of ``model`` the head rule understands."""
    modules = dict(model.named_modules())
    found = []
    for name, m in modules.items():
        seen = _recognize(name, m, modules)
        if seen is None:
            continue
        q_name, k_name, v_name, o_name, head_dim, groups, counts = seen[:7]
        offsets = seen[7] if len(seen) > 7 else (0, 0, 0)
        interleaved = offsets == "interleaved"
        if not isinstance(groups, int) or head_dim < 1 or groups < 1:
            continue
        o = out_major(modules[o_name])
        if interleaved:  # kv_heads blocks of (groups + 2) heads
            kv = out_major(modules[q_name]).shape[0] // ((groups + 2) * head_dim)
            q_rows, k_rows, v_rows, offsets = kv * groups * head_dim, kv * head_dim, kv * head_dim, (0, 0, 0)
        elif offsets == (0, 0, 0):
            q_rows, k_rows, v_rows = (out_major(modules[n]).shape[0] for n in (q_name, k_name, v_name))
        else:  # one layer: Q, K and V one after the other from these offsets
            q_rows, k_rows = offsets[1] - offsets[0], offsets[2] - offsets[1]
            v_rows = out_major(modules[q_name]).shape[0] - offsets[2]
        heads, kv_heads = q_rows // head_dim, k_rows // head_dim
        if kv_heads < 1 or q_rows != heads * head_dim or k_rows != v_rows \
                or k_rows != kv_heads * head_dim or heads != kv_heads * groups or o.shape[1] != q_rows:
            continue
        found.append(Attention(name, q_name, k_name, v_name, o_name, heads, kv_heads, head_dim, counts, offsets,
                               _config_counts(m), interleaved))
    return found


def _head_shaped(att: Attention, modules: dict) -> str:
    """A parameter of the attention module, outside its projections, sized by its heads (a per-head norm, attention
    sinks): the rule's argument does not cover it. Returns its name, or ''."""
    module = modules[att.name]
    projections = {id(p) for n in (att.q, att.k, att.v, att.o) for p in modules[n].parameters()}
    sizes = {att.heads, att.kv_heads, att.heads * att.head_dim, att.kv_heads * att.head_dim}
    for pname, p in module.named_parameters():
        if id(p) not in projections and sizes & set(p.shape):
            return pname
    return ""


def _o_inputs(model: nn.Module, names: set[str], batch: tuple, perturb: dict[str, set[int]]) -> dict:
    """The first input of each O projection in ``names``, one per call in one forward, with large noise added to
    the output channels ``perturb[layer]`` of the Q / K / V layers."""
    seen: dict[str, list[torch.Tensor]] = {}
    gen = torch.Generator().manual_seed(0)

    def noisy(mod: nn.Module, args: tuple, out: torch.Tensor, idx: list) -> torch.Tensor:
        noise = torch.randn(out.shape[:-1] + (len(idx),), generator=gen, dtype=torch.float64) * 1e3
        out = out.clone()
        out[..., idx] += noise.to(out.dtype).to(out.device)
        return out

    keep = {n: (lambda m, a, _n=n: seen.setdefault(_n, []).append(a[0].detach())) for n in names}  # every call
    shake = {n: (lambda m, a, o, _i=sorted(rows): noisy(m, a, o, _i)) for n, rows in perturb.items()}
    with probe.hooked(model, keep, shake), torch.no_grad():
        call(model, batch)
    return seen


def _layout_holds(model: nn.Module, cands: list, batch: tuple) -> set[str]:
    """Check on the model that perturbing the Q, K and V rows of the heads to remove changes the O projection's
    input only in the columns of their query heads (the layout this rule assumes; a NaN would not do, fused
    attention kernels zero a row of NaN scores); returns the attention modules where it held."""
    def run(subset: list) -> bool:
        perturb: dict[str, set[int]] = {}
        expect: dict[str, set[int]] = {}
        for att, gone in subset:
            for name, which in ((att.q, "q"), (att.k, "k"), (att.v, "v")):
                perturb.setdefault(name, set()).update(att.rows(which, gone))
            expect.setdefault(att.o, set()).update(att.q_rows(gone))
        try:
            clean = _o_inputs(model, set(expect), batch, {})
            moved = _o_inputs(model, set(expect), batch, perturb)
        except Exception:  # a forward that cannot take the noise: the layout is unproven
            return False
        for o, cols in expect.items():
            if o not in clean or o not in moved:
                return False
            if len(clean[o]) != len(moved[o]):
                return False
            changed: set[int] = set()
            for a, b in zip(clean[o], moved[o]):  # every call of O (a module shared between layers too)
                changed |= set(torch.nonzero((a != b).reshape(-1, a.shape[-1]).any(0)).flatten().tolist())
            if not changed or not changed <= cols:
                return False
        return True

    if not cands:
        return set()
    if run(cands):
        return {att.name for att, _ in cands}
    return {att.name for att, gone in cands if run([(att, gone)])}


def _v_bias_columns(att: Attention, gone: list[int], modules: dict) -> tuple[list[int], Optional[torch.Tensor]]:
    """O's input columns that the KV heads ``gone`` (with their query heads) write, and the V bias each of them
    carries there (None without a V bias)."""
    v = modules[att.v]
    cols = sorted(att.q_rows(gone))
    if v.bias is None:
        return cols, None
    hd, rep = att.head_dim, att.group
    v_of_col = torch.tensor([att.rows("v", [c // hd // rep])[c % hd] for c in cols], dtype=torch.long,
                            device=v.bias.device)
    return cols, v.bias.detach().index_select(0, v_of_col)


def _folds_hold(model: nn.Module, cands: list, modules: dict, batches: Sequence[tuple]) -> set[str]:
    """The attention modules among ``cands`` whose removed heads really hand O their V bias at every position
    of every batch. A head whose V rows are masked averages its V bias with weights that sum to 1, except on a
    query that may attend to no key at all (left padding): eager attention then spreads it evenly (still the
    bias), SDPA returns 0 there, and no bias of O can say that."""
    checks = {}
    for att, gone in cands:
        cols, bias = _v_bias_columns(att, gone, modules)
        o_cols_read = not bool(zero_columns(modules[att.o])[cols].all())
        if bias is not None and bool(bias.ne(0).any()) and o_cols_read:
            checks[att.name] = (att.o, cols, bias)
    if not checks:
        return {att.name for att, _ in cands}
    failed: set[str] = set()
    for batch in batches:
        try:
            seen = _o_inputs(model, {o for o, _, _ in checks.values()}, batch, {})
        except Exception:
            return {att.name for att, _ in cands} - set(checks)
        for name, (o, cols, bias) in checks.items():
            calls = seen.get(o, [])
            if not calls or not all(torch.allclose(x[..., cols], bias.to(x.dtype).expand_as(x[..., cols]),
                                                   rtol=1e-4, atol=1e-6) for x in calls):
                failed.add(name)
    return {att.name for att, _ in cands} - failed


def _cut(att: Attention, gone: list[int], modules: dict, out: HeadPlan) -> None:
    """Record the rows, columns, bias fold and head counts that removing KV heads ``gone`` of ``att`` takes."""
    hd, rep = att.head_dim, att.group
    o = modules[att.o]
    for name, which in ((att.q, "q"), (att.k, "k"), (att.v, "v")):
        _add_cut(out, name, rows=set(att.rows(which, gone)))
    _add_cut(out, att.o, columns=set(att.q_rows(gone)))
    cols, bias = _v_bias_columns(att, gone, modules)
    if bias is not None:  # the constant heads emit their V bias; O reads it through the removed columns
        w = out_major(o).index_select(1, torch.tensor(cols, dtype=torch.long, device=bias.device)).double()
        delta = w @ bias.double()  # zero where O's columns are masked
        if bool(delta.any()):
            out.folds.append(Fold(layer=att.o, target="bias", values=delta, sources=("attention heads",),
                                  creates_bias=o.bias is None))
    left = att.heads - len(gone) * rep
    values = {"heads": left, "kv_heads": att.kv_heads - len(gone), "width": left * hd}
    counts = {a: values[COUNT_ATTRIBUTES[a]] for a in att.counts}
    values["head_dim"] = hd
    counts.update({f"config.{a}": values[COUNT_ATTRIBUTES.get(a, a)] for a in att.config_counts})
    if counts:
        out.attributes[att.name] = counts


def _shared_config_uneven(atts: list[Attention], cands: list, modules: dict) -> dict[str, str]:
    """Attention modules whose forward reads a head count from a config shared with other layers, where the
    planned cuts would leave those layers different counts (one config value cannot say that): name -> why."""
    gone = {att.name: len(g) for att, g in cands}
    by_config: dict[int, list[Attention]] = {}
    for att in atts:
        if att.config_counts:
            by_config.setdefault(id(modules[att.name].config), []).append(att)
    out = {}
    for sharing in by_config.values():
        left = {(a.kv_heads - gone.get(a.name, 0), a.heads // a.kv_heads) for a in sharing}
        if len(left) > 1:
            for a in sharing:
                out[a.name] = (f"'{a.name}' reads {', '.join(a.config_counts)} from the config every layer shares: "
                               "remove the same number of key/value heads in every layer (prune_channels(heads=...) "
                               "does)")
    return out


def _scope(att: Attention) -> str:
    """The smallest module holding the attention's projections (BERT's O sits beside its self-attention)."""
    parts = [n.split(".") for n in (att.name, att.q, att.k, att.v, att.o)]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _unupdated_counts(module: nn.Module, att: Attention) -> list[str]:
    """Integer attributes the forward of ``module`` reads (``self.<name>``) that hold one of the attention's head
    counts or widths and that the rule does not update: the likely reason a cut breaks it."""
    sizes = {att.heads, att.kv_heads, att.heads * att.head_dim, att.kv_heads * att.head_dim}
    safe = set(COUNT_ATTRIBUTES) | {"head_dim", "attention_head_size", "num_key_value_groups", "layer_idx"}
    return sorted({a for a in _forward_reads(type(module), r"self\.(\w+)") if a not in safe
                   and isinstance(module.__dict__.get(a), int) and module.__dict__[a] in sizes})


def _trials_hold(model: nn.Module, cands: list, modules: dict, batch: tuple) -> dict[str, str]:
    """Cut each candidate in a copy of the module holding its projections and run that copy on the input the
    module received in ``batch`` (and the module itself, on a copy of the same input): attention modules whose
    copy fails or computes otherwise, with why (a head count its forward reads that the rule does not update)."""
    if not cands:
        return {}
    scopes = {att.name: _scope(att) for att, _ in cands}
    try:
        seen = probe.first_inputs(model, set(scopes.values()), batch, copied=True)
    except Exception:
        return {}  # the input cannot be recorded (copied): left to the compact model's verification
    failed = {}
    for att, gone in cands:
        name = scopes[att.name]
        if name not in seen:
            continue
        plan = HeadPlan()
        _cut(att, gone, modules, plan)
        original = modules[name]
        trial = copy.deepcopy(original)
        inner = dict(trial.named_modules())
        prefix = f"{name}." if name else ""
        why = ""
        try:
            for layer, cut in plan.cuts.items():
                kind_of(inner[layer[len(prefix):]]).cut(inner[layer[len(prefix):]], cut.out, cut.inputs)
            for f in plan.folds:  # (the rule's folds are all "bias" folds into O)
                add_to_bias(inner[f.layer[len(prefix):]], f.values)
            for module_name, values in plan.attributes.items():
                for attr, value in values.items():
                    set_count(inner[module_name[len(prefix):]], attr, value)
            with torch.no_grad():
                args, kwargs = copy.deepcopy(seen[name])
                want = next(iter(flatten_outputs(original(*args, **kwargs))), None)
                args, kwargs = copy.deepcopy(seen[name])
                got = next(iter(flatten_outputs(trial(*args, **kwargs))), None)
            if want is None or got is None or want.shape != got.shape or not torch.allclose(
                    got.double(), want.double(), rtol=1e-4, atol=1e-5 * max(float(want.abs().max()), 1.0)):
                why = "computes otherwise with them removed"
        except Exception as exc:
            why = f"fails with them removed ({type(exc).__name__}: {first_line(exc)})"
        if why:
            reads = _unupdated_counts(modules[att.name], att)
            failed[att.name] = (f"'{att.name}' {why}: the attention module reads a head count compactor does not "
                                f"update{': ' + ', '.join(reads) if reads else ''}; kept")
    return failed


def plan_heads(model: nn.Module, tied: set[str], batch: tuple | None = None,
               fold_batches: Sequence[tuple] = ()) -> HeadPlan:
    """Which key/value heads (with their query heads) go in every recognized attention module of ``model``.

    With ``batch``, the assumed layout is checked on the model first (:func:`_layout_holds`); with
    ``fold_batches``, that the removed heads' V bias reaches O unchanged on every one (:func:`_folds_hold`).
    """
    out = HeadPlan()
    modules = dict(model.named_modules())
    cands = []
    atts = find(model)
    for att in atts:
        q, k, v, o = (modules[n] for n in (att.q, att.k, att.v, att.o))
        out.owned |= {att.q, att.k, att.v}
        layers = list(dict.fromkeys([att.q, att.k, att.v, att.o]))  # a fused QKV layer once
        v_dead, o_unread = dead_rows(v).tolist(), zero_columns(o).tolist()
        q_dead, k_dead = dead_rows(q).tolist(), dead_rows(k).tolist()
        gone, partial, qk_only = [], [], []
        for j in range(att.kv_heads):
            v_rows, o_cols = att.rows("v", [j]), att.q_rows([j])
            constant = all(v_dead[r] for r in v_rows)
            unread = all(o_unread[c] for c in o_cols)
            if constant or unread:
                gone.append(j)
            elif any(v_dead[r] for r in v_rows) or any(o_unread[c] for c in o_cols):
                partial.append(j)
            elif any(q_dead[r] for r in att.rows("q", [j])) or any(k_dead[r] for r in att.rows("k", [j])):
                qk_only.append(j)
        if gone or partial or qk_only:
            out.any_masked = True
        if partial:
            _note(out, layers, partial, "partial", "key/value head(s) masked in part (or only some of the "
                              "query heads sharing them): head_dim must stay uniform; kept")
        if qk_only:
            _note(out, layers, qk_only, "kept", "only Q or K rows masked: the attention weights change but "
                              "the head still averages V, so it is not constant; mask V rows (or O columns)")
        if not gone:
            continue
        if len(gone) == att.kv_heads:
            _note(out, layers, gone, "kept", "every key/value head is masked: the attention would be empty; "
                              "prune fewer heads")
            continue
        shared = sorted(set(layers) & tied)
        if shared:
            _note(out, layers, gone, "kept", f"{', '.join(shared)}: weights tied with another layer")
            continue
        extra = _head_shaped(att, modules)
        if extra:
            _note(out, layers, gone, "kept", f"'{att.name}' holds '{extra}', sized by its heads (a per-head "
                              "norm or attention sinks): heads are not removed there")
            continue
        cands.append((att, gone))
    held = _layout_holds(model, cands, batch) if batch is not None else {att.name for att, _ in cands}
    folds = _folds_hold(model, [c for c in cands if c[0].name in held], modules, fold_batches) if fold_batches \
        else held
    uneven = _shared_config_uneven(atts, [c for c in cands if c[0].name in folds], modules)
    broken = _trials_hold(model, [c for c in cands if c[0].name in folds and c[0].name not in uneven], modules,
                          batch) if batch is not None else {}
    for att, gone in cands:
        layers = list(dict.fromkeys([att.q, att.k, att.v, att.o]))
        if att.name not in held:
            _note(out, layers, gone, "kept", f"the head layout assumed for '{att.name}' did not hold when "
                              "checked on the model (e.g. Q, K and V interleaved per head)")
            continue
        if att.name not in folds:
            _note(out, layers, gone, "kept", f"their V bias reaches '{att.o}' through attention weights "
                              "that do not sum to 1 on every query (a query that may attend to no key, under "
                              "padding, gets 0 from SDPA): no bias of O can take it; mask their O columns too "
                              "(prune_channels does), or use attn_implementation='eager'")
            continue
        if att.name in uneven or att.name in broken:
            _note(out, layers, gone, "kept", uneven.get(att.name) or broken[att.name])
            continue
        _cut(att, gone, modules, out)
        _note(out, layers, gone, "removed", f"key/value head(s) with every V row (or every O column "
                          f"reading them) masked, with their {att.group} query head(s) each")
    return out
