"""Data-aware importance for :func:`compactor.prune_channels`: what calibration data says about each unit.

Two criteria, both measured on a copy of the model (the user's model is never run with hooks,
given gradients or switched between train and eval):

``"activation"``
    How much of what a unit emits its readers use: for every layer that reads the unit's
    channels, the root mean square of each channel over the calibration data times the norm of
    the layer's weight column that reads it, summed (Wanda's score, ``|W| * ||x||``, per
    column). A channel that is large but read with small weights, or read with large weights
    but nearly always 0, scores low. For attention heads, the O projection's columns that read
    the head; where no layer reads the channels directly, the weight norm.

``"taylor"``
    First-order Taylor: removing a unit changes the loss by about ``-sum(grad * weight)`` over
    every tensor entry the unit's masks zero (its rows in every producer, their biases, the
    BatchNorm weight and bias that follow, a head's Q, K, V rows and O columns, an expert
    neuron's gate and up rows and down column); the score is ``|sum(grad * weight)|`` with the
    gradient accumulated over the calibration batches.

Hooks keep running sums (one number per channel), never whole activations.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from . import probe
from .errors import CompactionError
from .kinds import kind_of, out_major
from .tensors import Kwargs, as_inputs, call

__all__ = ["Evidence", "LossFn", "gather", "activation_score", "taylor_score"]

#: ``loss_fn(model, batch) -> scalar loss`` for ``importance="taylor"``.
LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class Evidence:
    """What the calibration batches said: per reading layer, the mean square of each input channel
    (``"activation"``); per parameter, its gradient summed over the batches (``"taylor"``)."""

    kind: str
    mean_square: dict[str, torch.Tensor] = field(default_factory=dict)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: int = 0
    seconds: float = 0.0


def _batches(calibration: Optional[Iterable], example: tuple, max_batches: Optional[int]) -> Iterable:
    if calibration is None:
        yield example
        return
    yield from itertools.islice(calibration, max_batches)  # (None: all of them)


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """A Hugging Face causal LM's own loss on its tokens (padding left out)."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise CompactionError(
            f"importance='taylor' needs loss_fn=(model, batch) -> loss for {type(model).__name__}: the default "
            "covers Hugging Face causal LMs given their tokenizer's output (a dict with input_ids)")
    labels = batch["input_ids"]
    if "attention_mask" in batch:
        labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    loss = getattr(model(**batch, labels=labels), "loss", None)
    if loss is None:
        raise CompactionError(f"{type(model).__name__} returned no loss for its tokens as labels; pass loss_fn=")
    return loss


def gather(work: nn.Module, kind: str, calibration: Optional[Iterable], example: tuple, readers: set[str],
           *, loss_fn: Optional[LossFn] = None, max_batches: Optional[int] = None,
           say: Optional[Callable[[str], None]] = None) -> Evidence:
    """Run ``work`` (a baked copy) over the calibration batches (default: the example alone) and collect the
    :class:`Evidence` ``kind`` needs: input-channel mean squares of the layers in ``readers``, or gradients."""
    out = Evidence(kind)
    t0 = time.perf_counter()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            view = kind_of(module).channel_view(x).double()
            sums[name] = sums.get(name, 0) + view.pow(2).sum(1)
            counts[name] = counts.get(name, 0) + view.shape[1]
        return hook

    flags = {n: p.requires_grad for n, p in work.named_parameters()}
    try:
        if kind == "taylor":
            for p in work.parameters():
                p.requires_grad_(True)
                p.grad = None
        with probe.hooked(work, {n: keep(n) for n in readers} if kind == "activation" else {}):
            for batch in _batches(calibration, example, max_batches):
                if kind == "activation":
                    with torch.no_grad():
                        call(work, as_inputs(batch, who="prune_channels (calibration)"))
                else:
                    with torch.enable_grad():
                        loss = (loss_fn or _default_loss)(work, _unwrap(batch) if calibration is None else batch)
                        loss.backward()
                out.batches += 1
                if say is not None and out.batches % 10 == 0:
                    say(f"prune_channels: {out.batches} calibration batch(es), {time.perf_counter() - t0:.1f} s")
        if kind == "taylor":
            out.grads = {n: p.grad.detach().clone() for n, p in work.named_parameters() if p.grad is not None}
    finally:
        for n, p in work.named_parameters():
            p.grad = None
            p.requires_grad_(flags[n])
    if not out.batches:
        raise CompactionError("prune_channels: calibration yielded no batch; pass an iterable of inputs")
    out.mean_square = {n: s / max(counts[n], 1) for n, s in sums.items()}
    out.seconds = time.perf_counter() - t0
    return out


def _unwrap(example: tuple) -> Any:
    """The example as the model took it: a dict of keywords, one tensor, or a tuple."""
    if len(example) == 1 and isinstance(example[0], (Kwargs, torch.Tensor)):
        return dict(example[0]) if isinstance(example[0], Kwargs) else example[0]
    return example


def activation_score(evidence: Evidence, reads: list[tuple[str, nn.Module, list[int]]]) -> Optional[float]:
    """Sum over ``reads`` (layer name, layer, its input channels) of rms(channel) * ||weight column||; None when
    no reading layer was measured."""
    total, seen = 0.0, False
    for name, module, cols in reads:
        ms = evidence.mean_square.get(name)
        if ms is None or not cols:
            continue
        idx = torch.tensor(cols, dtype=torch.long)
        w = out_major(module)
        norms = w.index_select(1, idx.to(w.device)).double().transpose(0, 1).reshape(len(cols), -1).norm(dim=1)
        total += float((ms.index_select(0, idx).sqrt() * norms.cpu()).sum())
        seen = True
    return total if seen else None


def taylor_score(evidence: Evidence, params: dict[str, torch.Tensor],
                 parts: list[tuple[str, int, list[int]]]) -> float:
    """``|sum(grad * weight)|`` over the entries ``parts`` names: (parameter, dimension, indices along it)."""
    total = 0.0
    for pname, dim, idxs in parts:
        g, w = evidence.grads.get(pname), params.get(pname)
        if g is None or w is None or not idxs:
            continue
        idx = torch.tensor(idxs, dtype=torch.long, device=w.device)
        total += float((g.index_select(dim, idx).double() * w.detach().index_select(dim, idx).double()).sum())
    return abs(total)
