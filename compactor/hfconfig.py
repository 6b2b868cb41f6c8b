"""What a Hugging Face config says about widths: the compact model's config, when one can describe it.

A config holds one width per kind of unit (query heads, key/value heads, head size, MLP neurons,
experts' neurons, a shared expert's neurons). :func:`compact_config` reads those widths off a
compact model (attention through :mod:`compactor.heads`, experts through
:mod:`compactor.experts`, MLPs from their projections) and writes them into a copy of its config,
validated by the family's own config class; widths that differ between layers are refused, with
the layers named.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from . import experts, heads
from .errors import CompactionError
from .kinds import out_major

__all__ = ["compact_config", "config_updates", "validated", "describe_widths_", "mismatch_of", "built_on_meta",
           "WIDTH_KEYS"]

#: The config keys that hold widths compaction changes (whichever the family has).
WIDTH_KEYS = ("num_attention_heads", "n_head", "num_heads", "num_key_value_heads", "num_kv_heads", "head_dim",
              "intermediate_size", "n_inner", "ffn_dim", "moe_intermediate_size", "shared_expert_intermediate_size")

#: The MLP projections whose output rows are the MLP's neurons (gate / up of a GLU, fc1 of a plain MLP).
_MLP_IN = ("gate_proj", "up_proj", "fc1", "dense_h_to_4h", "c_fc", "w1", "w3")
#: Gate and up projections fused into one layer, gate rows first (Phi-3): half its rows are neurons.
_MLP_FUSED = ("gate_up_proj",)


def _mlp_widths(model: nn.Module) -> dict[str, int]:
    """Per MLP module (one holding one of :data:`_MLP_IN`), its neuron count."""
    out = {}
    for name, m in model.named_modules():
        widths = {out_major(getattr(m, p)).shape[0] // (2 if p in _MLP_FUSED else 1) for p in _MLP_IN + _MLP_FUSED
                  if isinstance(getattr(m, p, None), nn.Module)
                  and isinstance(getattr(getattr(m, p), "weight", None), torch.Tensor)}
        if widths:
            if len(widths) > 1:  # gate and up disagree: no config can say that
                raise CompactionError(f"MLP '{name}' has projections of {sorted(widths)} neurons; a config holds one "
                                      "intermediate_size; save it with compactor.save")
            out[name] = widths.pop()
    return out


def _uniform(what: str, per_layer: dict[str, int], advice: str) -> Optional[int]:
    values = set(per_layer.values())
    if len(values) > 1:
        listed = ", ".join(f"'{n}': {v}" for n, v in list(per_layer.items())[:6])
        raise CompactionError(
            f"the compact model's {what} differ between layers ({listed}{' …' if len(per_layer) > 6 else ''}); "
            f"a Hugging Face config holds one value for every layer. {advice}; or save it with compactor.save "
            "and reload it with compactor.load")
    return values.pop() if values else None


def compact_config(model: nn.Module) -> Any:
    """A copy of ``model.config`` describing the compact widths, validated by the family's config class.

    Raises:
        CompactionError: widths that differ between layers, or counts the family's config rejects.
    """
    config, updates = config_updates(model)
    new = validated(config, updates)
    mismatch = mismatch_of(model, new)
    if mismatch:
        raise CompactionError(
            f"no {type(config).__name__} describes the compact model ({mismatch}): the family's config has no key "
            "for these widths (e.g. a head size other than hidden_size / heads where it has no head_dim); save it "
            "with compactor.save and reload it with compactor.load, or prune with prune_channels(..., uniform=True)")
    return new


def config_updates(model: nn.Module) -> tuple[Any, dict[str, Any]]:
    """``model.config`` and the keys to change so that it describes ``model``'s widths (not validated).

    Raises:
        CompactionError: widths that differ between layers, or a width the config has no key for.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"save_pretrained takes a Hugging Face model (with a .config), got {type(model).__name__}; "
                        "write other models with compactor.save")
    advice = ("prune with prune_channels(..., uniform=True) (the same count in every block, counts the config "
              "describes)")
    atts = heads.find(model)
    updates: dict[str, Any] = {}
    q = _uniform("query head counts", {a.name: a.heads for a in atts}, advice)
    kv = _uniform("key/value head counts", {a.name: a.kv_heads for a in atts}, advice)
    hd = _uniform("head sizes", {a.name: a.head_dim for a in atts}, advice)
    widths = _mlp_widths(model)
    shared = {n: w for n, w in widths.items() if n.rpartition(".")[2] in ("shared_expert", "shared_experts")}
    mlp = _uniform("MLP widths", {n: w for n, w in widths.items() if n not in shared}, advice)
    shared_width = _uniform("shared-expert MLP widths", shared, advice)
    expert_width = _uniform("expert widths", {ex.name: ex.neurons for ex in experts.find(model)}, advice)
    if q is not None:
        updates.update(heads.config_updates(config, q, kv, hd))
    for width, keys in ((mlp, ("intermediate_size", "n_inner", "ffn_dim")),
                        (shared_width, ("shared_expert_intermediate_size",)),
                        (expert_width, ("moe_intermediate_size", "intermediate_size"))):
        key = next((k for k in keys if hasattr(config, k)), None)
        if width is None:
            continue
        if key is None or updates.get(key, width) != width:
            raise CompactionError(f"{type(config).__name__} has no field for an MLP width of {width} (fields tried: "
                                  f"{', '.join(keys)}); save the model with compactor.save")
        updates[key] = width
    return config, updates


def validated(config: Any, updates: dict[str, Any]) -> Any:
    """A copy of ``config`` with ``updates``, made by the family's config class (which must keep them)."""
    values = {**config.to_dict(), **updates}
    try:
        new = type(config).from_dict(values)
    except Exception as exc:
        raise CompactionError(
            f"{type(config).__name__} rejects the compact widths {updates}: {str(exc).splitlines()[-1].strip()}; "
            "choose amounts whose counts the family accepts (e.g. a head count that divides hidden_size), or save "
            "with compactor.save") from None
    for key, value in updates.items():
        if getattr(new, key, None) != value:
            raise CompactionError(f"{type(config).__name__} does not keep {key}={value} (it gave "
                                  f"{getattr(new, key, None)}); save the model with compactor.save")
    return new




def built_on_meta(model: nn.Module, config: Any) -> nn.Module:
    """``model``'s class built from ``config`` on the meta device (shapes only, no memory); raises what it raises."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(model)(config)


def mismatch_of(model: nn.Module, config: Any, shapes: Optional[dict[str, tuple[int, ...]]] = None) -> str:
    """'' when ``model``'s class built from ``config`` (on the meta device: no memory) has ``model``'s parameter
    names and shapes (or ``shapes``: a checkpoint's, by key); else the first difference, in words."""
    try:
        built = built_on_meta(model, config)
    except Exception as exc:
        return f"{type(model).__name__} cannot be built from it: {type(exc).__name__}"
    want = shapes if shapes is not None else {k: tuple(p.shape) for k, p in model.named_parameters()}
    have = {k: tuple(p.shape) for k, p in built.named_parameters()}
    for key in sorted(set(want) | set(have)):
        if want.get(key) != have.get(key):
            return (f"built from it, {type(model).__name__} has '{key}' of shape {have.get(key)}, the compact model "
                    f"{want.get(key)}")
    return ""


def describe_widths_(model: nn.Module) -> tuple[dict[str, Any], str]:
    """Set ``model.config`` (in place: its layers may hold the same object) to the compact widths when one
    config can describe them. Returns (the old values of the keys changed, what was done in words)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}, ""
    try:
        config, updates = config_updates(model)
        mismatch = mismatch_of(model, validated(config, updates))
    except CompactionError as exc:
        return {}, f"model.config still gives the original widths: {str(exc).split('; ')[0]}"
    if mismatch:
        return {}, f"model.config still gives the original widths: no config of the family describes them ({mismatch})"
    changed = {k: v for k, v in updates.items() if getattr(config, k, None) != v}
    old = {k: getattr(config, k, None) for k in changed}
    for key, value in changed.items():
        setattr(config, key, value)
    if not changed:
        return {}, ""
    return old, ("model.config updated to the compact widths (" + ", ".join(f"{k}={v}" for k, v in changed.items())
                 + "): model.save_pretrained writes a checkpoint from_pretrained loads")
