"""Third-party models built offline from their own libraries' code, pruned as users prune them.

Names: ``tv:<torchvision builder>[@size]``, ``timm:<model>[@size]``, ``yolo:<yaml stem>``,
``hf:<llama|t5|bert|gpt2>``. Weights are random (nothing downloads); BatchNorm statistics
are randomized so no channel is trivially zero. :func:`prune_like_users` applies the
seeds' loop: ``prune.ln_structured(m, "weight", 0.5, n=2, dim=0)`` on every Conv / Linear
but the last (the head).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn
from torch.nn.utils import prune

#: The models issue 9 found failing (crash, hang, memory), at the sizes it gave, then a few that worked.
ISSUE_9 = ("tv:shufflenet_v2_x0_5", "yolo:yolov8n", "hf:t5", "yolo:yolo11n", "tv:swin_t", "timm:rexnet_100",
           "hf:llama")
MORE = ("tv:resnet50", "tv:mobilenet_v3_small", "tv:efficientnet_b0", "tv:maxvit_t@224", "timm:regnety_002",
        "hf:bert")

_NEEDS = {"tv": "torchvision", "timm": "timm", "yolo": "ultralytics", "hf": "transformers"}


def available(name: str) -> bool:
    """Whether the library that builds ``name`` is installed."""
    return importlib.util.find_spec(_NEEDS[name.split(":", 1)[0]]) is not None


def build(name: str) -> tuple[nn.Module, tuple]:
    """The model (eval mode, random weights) and its example inputs."""
    kind, _, rest = name.partition(":")
    spec, _, size = rest.partition("@")
    side = int(size or 64)
    torch.manual_seed(0)
    if kind == "tv":
        import torchvision

        return getattr(torchvision.models, spec)(weights=None).eval(), (torch.randn(2, 3, side, side),)
    if kind == "timm":
        import timm

        return timm.create_model(spec, pretrained=False).eval(), (torch.randn(2, 3, side, side),)
    if kind == "yolo":
        os.environ.setdefault("YOLO_OFFLINE", "1")
        from ultralytics import YOLO

        return YOLO(spec + ".yaml").model.eval(), (torch.randn(1, 3, 64, 64),)
    if kind == "hf":
        import transformers as T

        ids = torch.randint(0, 100, (2, 16))
        if spec == "llama":
            cfg = T.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, use_cache=False)
            return T.LlamaForCausalLM(cfg).eval(), (ids,)
        if spec == "t5":
            cfg = T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, use_cache=False)
            return T.T5ForConditionalGeneration(cfg).eval(), (ids, None, ids)
        if spec == "bert":
            cfg = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64)
            return T.BertModel(cfg).eval(), (ids,)
        if spec == "gpt2":
            cfg = T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, use_cache=False)
            return T.GPT2LMHeadModel(cfg).eval(), (ids,)
    raise ValueError(f"unknown model {name!r}: use tv:, timm:, yolo: or hf: (llama, t5, bert, gpt2)")


def randomize_statistics(model: nn.Module) -> nn.Module:
    """BatchNorm running statistics as a trained model might have them (deterministic), in place."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def prune_like_users(model: nn.Module, amount: float = 0.5) -> list[nn.Module]:
    """Randomize BatchNorm statistics, then ln_structured on every Conv / Linear but the last; returns those."""
    randomize_statistics(model)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    pruned = [m for m in layers[:-1] if m.weight.shape[0] > 1]
    for m in pruned:
        prune.ln_structured(m, "weight", amount=amount, n=2, dim=0)
    return pruned


def masked_rows(layers: list[nn.Module]) -> int:
    """Output rows whose mask is all zero, over ``layers``."""
    return sum(int((m.weight_mask.flatten(1).sum(1) == 0).sum()) for m in layers if hasattr(m, "weight_mask"))
