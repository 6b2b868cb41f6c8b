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

import torch
from torch import nn

from . import probe
from .errors import CompactionError
from .files import replace_folder
from .fingerprint import probe_batch
from .hfconfig import compact_config
from .tensors import call, flatten_outputs
from .verify import compare, full_precision

__all__ = ["save_pretrained", "compact_config"]

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
        replace_folder(tmp, path)
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
