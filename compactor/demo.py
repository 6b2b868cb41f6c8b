"""The main job on an embedded default: the seeds' LeNet on scikit-learn's handwritten digits.

Part 1: train for a few seconds, prune 50 % of conv1, conv2, fc1, fc2 with
``prune.ln_structured(..., n=2, dim=0)`` as the tutorials do, save the pruned
state_dict, load it back, compact, verify, and report accuracy, size and speed.

Part 2: a residual CNN from the project's zoo, pruned at the same amount two ways (the
seeds' per-layer masks, and :func:`compactor.prune_channels`), each fine-tuned with its
masks on, then compacted: per-layer masks on a residual network leave most channels in
place, group-aware masks are removed entirely.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, TextIO

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from .testing.zoo import LeNet  # the tutorials' LeNet (defined with the zoo; this is its public home)

__all__ = ["LeNet", "load_digits_28", "train", "accuracy", "prune_like_the_seeds", "run", "GroupRow"]


def load_digits_28(seed: int = 0, test_fraction: float = 0.25):
    """scikit-learn's bundled digits (8x8, 1,797 images) resized to 1x28x28; (x_train, y_train, x_test, y_test)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - depends on the environment
        raise RuntimeError("the demo needs scikit-learn: pip install 'compactor[demo]'") from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[test], y[test]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 8, seed: int = 0, lr: float = 2e-3,
          progress: Optional[Callable[[int, int, float], None]] = None) -> nn.Module:
    """Adam, batches of 64; works with masks on (torch's hooks keep the masked weights at zero)."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(y))
        total = 0.0
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        if progress:
            progress(epoch + 1, epochs, total / len(y))
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def prune_like_the_seeds(model: nn.Module, amount: float = 0.5) -> nn.Module:
    """``prune.ln_structured(m, "weight", amount, n=2, dim=0)`` on conv1, conv2, fc1, fc2 (in place)."""
    for name in ("conv1", "conv2", "fc1", "fc2"):
        prune.ln_structured(getattr(model, name), "weight", amount=amount, n=2, dim=0)
    return model


@dataclass
class GroupRow:
    """Part 2: one way of pruning the residual CNN, from dense to compact."""

    masks: str
    acc_dense: float
    acc_masked: float
    acc_finetuned: float
    acc_compact: float
    rows_masked: int
    rows_removed: int
    params_dense: int
    params_compact: int
    macs_dense: int
    macs_compact: int
    latency_masked_s: float
    latency_compact_s: float


@dataclass
class DemoResult:
    acc_dense: float
    acc_masked: float
    acc_compact: float
    params_dense: int
    params_compact: int
    macs_dense: int
    macs_compact: int
    max_abs_diff: float
    latency_masked_s: float
    latency_compact_s: float
    out_dir: str
    groups: list = None  # the GroupRow of part 2 (None when skipped)
    chart: Optional[str] = None


def _bar(done: int, total: int, width: int = 24) -> str:
    n = int(width * done / total)
    return "[" + "#" * n + "." * (width - n) + f"] {done}/{total}"


def _rows_masked(model: nn.Module) -> int:
    return sum(int((~m.weight_mask.flatten(1).bool().any(1)).sum()) for m in model.modules()
               if hasattr(m, "weight_mask") and m.weight_mask.dim() > 1)  # not the BatchNorms' masks


def residual_cnn() -> nn.Module:
    """The zoo's small ResNet (stem, two BasicBlocks, one with a projection shortcut, pooled Linear) on 1-channel input."""
    from .testing.zoo import ResNetBasicSmall

    torch.manual_seed(0)
    model = ResNetBasicSmall()
    stem = model.stem[0]
    model.stem[0] = nn.Conv2d(1, stem.out_channels, 3, padding=1, bias=False)  # the digits are grey
    return model


def group_aware_part(data: tuple, *, amount: float = 0.5, epochs: int = 15, finetune: int = 8,
                     say: Callable[[str], None] = print) -> tuple[list, dict]:
    """Part 2: the residual CNN pruned per layer and with prune_channels, fine-tuned, compacted.

    Returns the :class:`GroupRow` per way and the compaction reports by name (for the chart).
    """
    from . import api, masks, timing
    from .pruner import prune_channels
    from .report import Report

    xtr, ytr, xte, yte = data
    dense = train(residual_cnn(), xtr, ytr, epochs=epochs, lr=3e-3)
    acc_dense = accuracy(dense, xte, yte)
    say(f"    trained the zoo's residual CNN: {acc_dense:.1%} on the held-out digits")
    rows, reports = [], {}
    for how in ("per-layer masks", "prune_channels"):
        model = masks.clone(dense)
        if how == "per-layer masks":  # the seeds' loop: every conv / linear but the classifier
            for m in [m for m in model.modules() if isinstance(m, nn.Conv2d)]:
                prune.ln_structured(m, "weight", amount=amount, n=2, dim=0)
        else:
            prune_channels(model, xtr[:8], amount)
        acc_masked = accuracy(model, xte, yte)
        train(model, xtr, ytr, epochs=finetune, lr=3e-3)
        acc_ft = accuracy(model, xte, yte)
        small = api.compact(model, xte[:8])
        report: Report = small.compaction_report
        reports[how] = report
        x1 = xte[:1]
        with timing.torch_threads(1), torch.inference_mode():
            t = timing.measure({"masked": lambda: model(x1), "compact": lambda: small(x1)}, repeats=30)
        rows.append(GroupRow(how, acc_dense, acc_masked, acc_ft, accuracy(small, xte, yte), _rows_masked(model),
                             sum(len(r.removed_out) for r in report.layers if r.op in ("Conv2d", "Linear")),
                             report.params_before, report.params_after, report.macs_before, report.macs_after,
                             t["masked"].median, t["compact"].median))
        say(f"    {how}: fine-tuned {finetune} epochs with the masks on, compacted")
    return rows, reports


def _group_table(rows: list) -> str:
    head = ("masks", "acc dense", "masked", "fine-tuned", "compact", "masked rows removed", "params", "MACs",
            "compact vs masked (CPU, b1)")
    lines = [head] + [(
        r.masks, f"{r.acc_dense:.1%}", f"{r.acc_masked:.1%}", f"{r.acc_finetuned:.1%}", f"{r.acc_compact:.1%}",
        f"{r.rows_removed} of {r.rows_masked}", f"{r.params_compact / r.params_dense:.0%}",
        f"{r.macs_compact / r.macs_dense:.0%}", f"{r.latency_masked_s / r.latency_compact_s:.2f}x faster")
        for r in rows]
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def run(out_dir: str = "compactor-demo", *, amount: float = 0.5, epochs: int = 8, force: bool = False,
        stream: TextIO = sys.stdout, group_part: bool = True, group_epochs: int = 15,
        group_finetune: int = 8) -> DemoResult:
    """Run the whole main job and print a short report; artifacts go to ``out_dir``."""
    from . import api, masks, timing
    from .export import export_onnx
    from .files import atomic_save
    from .saving import save

    def say(msg: str, end: str = "\n") -> None:
        print(msg, end=end, file=stream, flush=True)

    os.makedirs(out_dir, exist_ok=True)
    pruned_path = os.path.join(out_dir, "pruned_model.pth")
    compact_path = os.path.join(out_dir, "lenet_compact.pt")
    onnx_path = os.path.join(out_dir, "lenet_compact.onnx")
    for p in (pruned_path, compact_path, onnx_path):
        if os.path.exists(p) and not force:
            raise FileExistsError(f"{p} exists; pass --force to overwrite or choose another --out")

    t0 = time.perf_counter()
    say("1/5 loading scikit-learn's handwritten digits, resized to 1x28x28 ...")
    xtr, ytr, xte, yte = load_digits_28()
    say(f"    {len(ytr)} training / {len(yte)} held-out images")
    say("2/5 training the seeds' LeNet")
    torch.manual_seed(0)
    dense = LeNet()
    train(dense, xtr, ytr, epochs=epochs,
          progress=lambda e, n, loss: say(f"\r    {_bar(e, n)} loss {loss:.3f}", end="\n" if e == n else ""))
    acc_dense = accuracy(dense, xte, yte)

    say(f"3/5 pruning conv1, conv2, fc1, fc2 with prune.ln_structured(amount={amount}, n=2, dim=0)")
    pruned = prune_like_the_seeds(masks.clone(dense), amount)
    atomic_save(pruned.state_dict(), pruned_path, force=force)
    say(f"    saved the pruned state_dict ({', '.join(list(pruned.state_dict())[:2])}, ...) to {pruned_path}")
    masked = masks.load_pruned(LeNet, pruned_path)
    acc_masked = accuracy(masked, xte, yte)

    say("4/5 compacting, verifying against the masked model, saving (.pt) and exporting to ONNX")
    small = api.compact(masked, xte[:8])
    report = small.compaction_report
    acc_compact = accuracy(small, xte, yte)
    save(small, compact_path, force=force)
    onnx_report = export_onnx(small, xte[:8], onnx_path, force=force)

    say("5/5 timing masked vs compact on the CPU (batch 1, interleaved, medians)")
    x1 = xte[:1]
    with timing.torch_threads(1), torch.inference_mode():
        t = timing.measure({"masked": lambda: masked(x1), "compact": lambda: small(x1)}, repeats=40)

    say("")
    say(report.table())
    say("")
    say(f"accuracy on {len(yte)} held-out digits: dense {acc_dense:.2%}  masked {acc_masked:.2%}  compact {acc_compact:.2%}")
    say(f"parameters: {report.params_before:,} -> {report.params_after:,} ({report.params_after / report.params_before:.1%})")
    say(f"MACs per image: {report.macs_before:,} -> {report.macs_after:,} ({report.macs_after / report.macs_before:.1%})")
    say(f"max |compact - masked| over {report.verified_inputs} verification batches: {report.max_abs_diff:.2e} "
        f"(tolerance {report.tolerance:.1e})")
    tm, tc = t["masked"], t["compact"]
    say(f"CPU latency, batch 1, 1 thread: masked {tm.median * 1e6:.0f} us, compact {tc.median * 1e6:.0f} us "
        f"-> {tm.median / tc.median:.2f}x faster")
    say(f"ONNX: {onnx_path}, {onnx_report.size_bytes / 1000:.1f} kB; onnxruntime vs PyTorch max |diff| "
        f"{onnx_report.max_abs_diff:.1e} at batch sizes {', '.join(map(str, onnx_report.batch_sizes))}")
    say(f"artifacts: {pruned_path}, {compact_path} (compactor.load(LeNet, path)), {onnx_path}  "
        f"({time.perf_counter() - t0:.1f} s so far)")
    result = DemoResult(acc_dense, acc_masked, acc_compact, report.params_before, report.params_after,
                        report.macs_before, report.macs_after, report.max_abs_diff, tm.median, tc.median, out_dir)
    if not group_part:
        return result
    say("")
    say(f"part 2: a residual CNN from the zoo, {amount:.0%} of its channels masked per layer (the seeds' loop) "
        "vs with compactor.prune_channels")
    result.groups, reports = group_aware_part((xtr, ytr, xte, yte), amount=amount, epochs=group_epochs,
                                              finetune=group_finetune, say=say)
    say("")
    say(_group_table(result.groups))
    say("per-layer masks disagree across the residual stream, so compaction must keep most of them; "
        "prune_channels masks whole coupled groups, which compaction removes entirely")
    try:
        from .plot import widths_chart

        result.chart = widths_chart(reports, os.path.join(out_dir, "widths.png"),
                                    title="Residual CNN: output channels per layer")
        say(f"chart of the widths: {result.chart}")
    except ImportError as exc:
        say(f"(no chart: {exc})")
    say(f"({time.perf_counter() - t0:.1f} s in all)")
    return result
