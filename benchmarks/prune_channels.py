"""How much does compact() remove after per-layer masks, and after compactor.prune_channels at the same amount?

For each model: (a) the seeds' loop, ``prune.ln_structured(m, "weight", 0.5, n=2, dim=0)`` on every
Conv / Linear but the head; (b) ``compactor.prune_channels(model, x, 0.5)``. Then ``compact()``
on each: masked rows removed, params and MACs compact / dense, verified against the masked model.

    python benchmarks/prune_channels.py                       # torchvision models (needs torchvision)
    python benchmarks/prune_channels.py --models zoo          # the project's zoo only (no extra packages)

Writes benchmarks/results/<device>/prune_channels_<models>_<amount>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import third_party  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import compactor  # noqa: E402
import compactor.probe  # noqa: E402
from compactor.testing import zoo  # noqa: E402

TORCHVISION = ("tv:resnet18", "tv:resnext50_32x4d", "tv:regnet_y_400mf", "tv:mobilenet_v3_small",
               "tv:efficientnet_b0", "tv:efficientnet_v2_s")


def _build(name: str) -> tuple[nn.Module, tuple]:
    if name.startswith("zoo:"):
        return zoo.build(name[4:])
    return third_party.build(name)


def _rows_masked(model: nn.Module) -> int:
    return sum(int((~m.weight_mask.flatten(1).bool().any(1)).sum()) for m in model.modules()
               if hasattr(m, "weight_mask") and not isinstance(m, nn.Embedding))


def one(name: str, how: str, amount: float) -> dict:
    model, x = _build(name)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if how == "per-layer":
        third_party.prune_like_users(model, amount)
    else:
        third_party.randomize_statistics(model)  # the same BatchNorm statistics as per-layer
        compactor.prune_channels(model, x, amount)
    prune_s = time.perf_counter() - t0
    masked = _rows_masked(model)
    t0 = time.perf_counter()
    if not masked and how == "prune_channels":  # nothing it could mask safely (e.g. a channel shuffle everywhere)
        macs = sum(compactor.probe.count_macs(model, x).values())
        params = sum(p.numel() for p in model.parameters())
        return {"model": name, "masks": how, "amount": amount, "masked_rows": 0, "removed_rows": 0, "params": params,
                "params_after": params, "macs": macs, "macs_after": macs, "max_abs_diff": 0.0, "prune_s": prune_s,
                "compact_s": 0.0, "kept": 0}
    small = compactor.compact(model, x)
    report = compactor.report_of(small)
    removed = sum(len(r.removed_out) for r in report.layers if r.op in ("Conv1d", "Conv2d", "Conv3d", "Linear"))
    return {"model": name, "masks": how, "amount": amount, "masked_rows": masked, "removed_rows": removed,
            "params": report.params_before, "params_after": report.params_after, "macs": report.macs_before,
            "macs_after": report.macs_after, "max_abs_diff": report.max_abs_diff, "prune_s": prune_s,
            "compact_s": time.perf_counter() - t0,
            "kept": sum(len(g.channels) for g in report.groups if g.status != "removed")}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="torchvision", help="'torchvision', 'zoo', or comma-separated names")
    p.add_argument("--amount", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = {"torchvision": TORCHVISION, "zoo": tuple(f"zoo:{n}" for n in zoo.NAMES)}.get(
        args.models, tuple(args.models.split(",")))
    rows = []
    for i, name in enumerate(names):
        for how in ("per-layer", "prune_channels"):
            common.bench.progress_bar(i, len(names), f"{name} {how}")
            rows.append(one(name, how, args.amount))
    common.bench.progress_bar(len(names), len(names), "done")
    machine = common.machine_info()
    device = common.device_slug(False)
    folder = common.out_dir(args.out, device)
    name = common.tag("prune_channels", args.models, f"a{args.amount:g}")
    cols = [
        ("model", lambda r: r["model"]),
        ("masks", lambda r: r["masks"]),
        ("masked rows removed", lambda r: f"{r['removed_rows']} of {r['masked_rows']} "
                                          f"({r['removed_rows'] / max(r['masked_rows'], 1):.0%})"),
        ("params compact / dense", lambda r: f"{r['params_after'] / r['params']:.3f}"),
        ("MACs compact / dense", lambda r: f"{r['macs_after'] / r['macs']:.3f}"),
        ("max abs diff", lambda r: f"{r['max_abs_diff']:.1e}"),
        ("prune", lambda r: common.fmt_s(r["prune_s"])),
        ("compact()", lambda r: common.fmt_s(r["compact_s"])),
    ]
    md = [common.header(f"Per-layer masks vs prune_channels at amount {args.amount} ({device})", machine, vars(args)),
          "Per-layer: `prune.ln_structured(m, 'weight', amount, n=2, dim=0)` on every Conv / Linear but the head "
          "(the tutorials' loop). prune_channels: `compactor.prune_channels(model, x, amount)` (l2, local). "
          "Random weights, BatchNorm statistics randomized alike in both; `compact()` verified each model "
          "against its masked one. Command: `python benchmarks/prune_channels.py --models "
          f"{args.models} --amount {args.amount}`.", "", common.table(rows, cols), ""]
    return common.write_results(folder, name, {"kind": "prune_channels", "machine": machine, "settings": vars(args),
                                               "rows": rows}, md)


if __name__ == "__main__":
    main()
