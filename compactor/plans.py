"""The planner's vocabulary: what a layer loses (:class:`Cut`), where a constant goes (:class:`Fold`), what
happened to the masked channels of one coupled group (:class:`GroupNote`). The channel rule
(:mod:`compactor.planner`), the attention-head rule (:mod:`compactor.heads`) and the experts rule
(:mod:`compactor.experts`, :class:`ExpertCut`) all speak it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

__all__ = ["GroupNote", "Cut", "Fold", "ExpertCut"]


@dataclass(frozen=True, kw_only=True)
class GroupNote:
    """What happened to masked channels of one coupled group."""

    layers: list[str]
    channels: list[int]
    status: Literal["removed", "kept", "partial", "carrier"]  # "carrier": kept to carry constants (choose_carriers)
    reason: str
    unit: str = "channels"  # what ``channels`` counts ("key/value heads" for the head rule)


@dataclass(frozen=True, kw_only=True)
class Cut:
    """What one layer (or one bare ``nn.Parameter``) loses."""

    name: str
    out: tuple[int, ...] = ()  # output channels (a bare parameter: indices along ``dim``)
    inputs: tuple[int, ...] = ()  # input channels
    why: str = ""
    parameter_dim: Optional[int] = None  # set for a bare nn.Parameter: the dimension its channels lie on


@dataclass(frozen=True, kw_only=True, eq=False)
class Fold:
    """One constant folded into the compact model.

    ``target`` says where:

    - ``"bias"``: ``values`` (out,) is added to ``layer``'s bias (created if it has none);
    - ``"bn_mean"``: ``values`` (out,) is subtracted from the running mean of BatchNorm ``bn``,
      which alone reads ``layer``'s output (``layer`` stays bias-free);
    - ``"border"``: ``layer`` (a zero-padded conv) becomes border-corrected with kernel
      ``values`` (out, *k); with ``bn`` set, the interior part ``offset`` (out,) goes into
      that BatchNorm's mean and the correction adds only the rest;
    - ``"bn_border"``: as ``"border"`` with ``bn`` set, but the stride-1 conv ``layer`` stays a
      plain conv and BatchNorm ``bn`` adds the rest (scaled) in the pass it makes anyway;
    - ``"carrier"``: ``values`` (out, *k) is added to the weight column of ``layer``'s input
      ``channel``, a kept channel that emits the constant ``scale``: that channel, zero-padded by
      the conv itself, then contributes what the removed channels did, border included.
    """

    layer: str
    target: Literal["bias", "bn_mean", "border", "bn_border", "carrier"]
    values: torch.Tensor  # float64
    bn: Optional[str] = None
    offset: Optional[torch.Tensor] = None
    sources: tuple[str, ...] = ()
    channel: Optional[int] = None  # "carrier": the consumer's input channel (before cutting) that carries them
    scale: Optional[float] = None  # "carrier": the constant that channel emits
    creates_bias: bool = False  # "bias": the layer has none, so the fold adds one (a tensor the model had not)


@dataclass(frozen=True, kw_only=True)
class ExpertCut:
    """The neurons a mixture-of-experts module keeps in each expert: the same number in every expert (one tensor
    holds them all), not the same ones."""

    name: str  # the experts module
    keep: tuple[tuple[int, ...], ...]  # per expert, the neurons it keeps
    tensors: tuple[tuple[str, int, int], ...]  # (parameter, dim of the neurons, 2 for gate-and-up halves else 1)
