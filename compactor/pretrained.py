"""Hugging Face checkpoints out: a compact model written so that vanilla ``from_pretrained`` loads it.

:func:`save_pretrained` reads the compact widths off the model (attention heads and key/value
heads per layer through :mod:`compactor.heads`, MLP neurons from the MLP's projections), writes
them into a copy of the model's config (``num_attention_heads``, ``num_key_value_heads``, an
explicit ``head_dim``, ``intermediate_size``; for mixture-of-experts models the experts' width,
``moe_intermediate_size`` where the family has one, and ``shared_expert_intermediate_size``), lets
the family's own config class validate it,
saves with the model's own ``save_pretrained`` into a temporary folder, loads that folder back
with the model class's vanilla ``from_pretrained`` (no ``trust_remote_code``) and checks it has
no missing or unexpected keys and computes the compact model's logits on its probe input;
only then is the folder moved into place. Widths that differ between layers, or tensors the
config cannot describe (a bias a fold created on a bias-free family), are refused with the
layers or keys named: ``compactor.save`` / ``compactor.load`` round-trip any compact model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Optional

import torch
from torch import nn

from . import experts, heads, probe
from .errors import CompactionError
from .fingerprint import probe_batch
from .kinds import out_major
from .tensors import call, flatten_outputs
from .verify import compare, full_precision

__all__ = ["save_pretrained", "compact_config"]

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
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"save_pretrained takes a Hugging Face model (with a .config), got {type(model).__name__}; "
                        "write other models with compactor.save")
    advice = ("prune with the default scope='local' (the same share of every layer), not scope='global'")
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
        for key in ("num_attention_heads", "n_head", "num_heads"):
            if hasattr(config, key):
                updates[key] = q
                break
        if hasattr(config, "num_key_value_heads") and kv is not None:
            updates["num_key_value_heads"] = kv
        if hd is not None and (getattr(config, "head_dim", None) is not None
                               or hd * q != getattr(config, "hidden_size", hd * q)):
            updates["head_dim"] = hd
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


def save_pretrained(model: nn.Module, path: "str | os.PathLike", *, force: bool = False) -> str:
    """Write a compact Hugging Face model so that vanilla ``from_pretrained`` loads it (see the module).

    Args:
        model: a compact model from :func:`compactor.compact` of a Hugging Face ``PreTrainedModel``.
        path: the folder to write (it must not exist unless ``force``).
        force: replace an existing folder.

    Returns:
        ``path``.

    Raises:
        CompactionError: widths no config of the family can describe, tensors it has no key for, or a
            reload that does not compute what ``model`` computes (nothing is written then).
        FileExistsError: ``path`` exists and ``force`` is false.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not force:
        raise FileExistsError(f"'{path}' exists; pass force=True to replace it")
    new_config = compact_config(model)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".compactor-", dir=parent)
    try:
        old = model.config
        model.config = new_config
        try:
            model.save_pretrained(tmp)
        finally:
            model.config = old
        _check_reload(model, tmp)
        old_folder = None
        if os.path.exists(path):  # moved aside, not deleted, until the new folder is in place
            old_folder = tempfile.mkdtemp(prefix=".compactor-old-", dir=parent)
            os.replace(path, os.path.join(old_folder, "x"))
        try:
            os.replace(tmp, path)
        except BaseException:
            if old_folder is not None:
                os.replace(os.path.join(old_folder, "x"), path)
            raise
        finally:
            if old_folder is not None:
                shutil.rmtree(old_folder, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_reload(model: nn.Module, folder: str) -> None:
    """Load ``folder`` with the class's own ``from_pretrained``: no missing or unexpected keys, same logits."""
    try:
        loaded, info = type(model).from_pretrained(folder, output_loading_info=True)
    except Exception as exc:
        raise CompactionError(
            f"{type(model).__name__}.from_pretrained cannot load the compact model as written: "
            f"{str(exc).strip().splitlines()[0]}; the family's config does not describe these widths (e.g. a head "
            "size other than hidden_size / heads where the family has no head_dim); save it with compactor.save "
            "and reload it with compactor.load") from None
    bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys") and v}
    if bad:
        raise CompactionError(
            f"{type(model).__name__}.from_pretrained does not read the compact model as written: {bad}. Its config "
            "has no switch for these tensors (e.g. a bias a fold created where the family has none); save it with "
            "compactor.save")
    inputs = model.__dict__.get("compaction_probe")
    if inputs is None:
        return
    loaded = loaded.to(next(model.parameters()).device).eval()
    with probe.evaluating(model), torch.no_grad(), full_precision():
        batch = probe_batch(inputs, next(model.parameters()).device)
        want, got = call(model, batch), call(loaded, batch)
    result = compare([list(flatten_outputs(want))], [list(flatten_outputs(got))])
    if not result.ok:
        raise CompactionError(
            f"{type(model).__name__}.from_pretrained of the written folder differs from the compact model by "
            f"{result.max_abs_diff:.3g} (tolerance {result.tolerance:.3g}); the family's forward reads a width the "
            "config does not carry; save it with compactor.save")
