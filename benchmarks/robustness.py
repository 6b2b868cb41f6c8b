"""Does compact() hold on many third-party models? Exact or a clean refusal, in bounded time and memory.

Each model (``third_party.py`` names) runs twice in its own subprocess, under an address-space cap
and ``time_limit``: after the seeds' per-layer masks, and after ``compactor.prune_channels(0.5)``.
A row says exact / refused / error, the parameter ratio, how many groups with masked layers stayed, and
the time. For ``prune_channels`` every masked row must go: "kept" counts the groups that did not (zero-
initialized output layers, which nobody masked, do not count).

    python benchmarks/robustness.py                       # the sweep list below (needs torchvision and timm)
    python benchmarks/robustness.py --models tv:resnet18,timm:ghostnet_100

Writes benchmarks/results/<device>/robustness_<n>-models.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import third_party  # noqa: E402

SWEEP = (
    "timm:convnext_atto", "timm:efficientformer_l1@224", "timm:mobilevit_xxs", "timm:ghostnet_100",
    "timm:densenet121", "timm:dla34", "timm:hrnet_w18_small", "timm:levit_128s@224", "timm:mixer_b16_224@224",
    "timm:poolformer_s12", "timm:regnetx_002", "timm:resnest14d", "timm:cspdarknet53", "timm:coat_lite_tiny@224",
    "timm:efficientvit_b0@224", "timm:fastvit_t8", "timm:repvit_m1", "timm:mobilenetv4_conv_small",
    "timm:edgenext_xx_small", "timm:pvt_v2_b0", "timm:xcit_nano_12_p16_224@224", "timm:resnet18d",
    "timm:selecsls42b", "timm:rexnetr_100", "timm:tf_efficientnet_lite0", "timm:inception_v3@96",
    "tv:googlenet", "tv:squeezenet1_0", "tv:mnasnet0_5", "tv:vit_b_16@224", "tv:convnext_tiny",
    "tv:regnet_x_400mf", "tv:shufflenet_v2_x1_0", "tv:mobilenet_v2", "tv:densenet121", "tv:resnext50_32x4d",
    "tv:wide_resnet50_2", "tv:efficientnet_v2_s", "tv:swin_v2_t",
)
_MARK = "ROBUSTNESS_RESULT "


def child(name: str, how: str, cap_gb: float, limit: float) -> dict:
    resource.setrlimit(resource.RLIMIT_AS, (int(cap_gb * 2**30),) * 2)
    import torch

    import compactor

    torch.set_num_threads(1)
    model, x = third_party.build(name)
    t0 = time.perf_counter()
    row = {"model": name, "masks": how}
    try:
        if how == "per-layer":
            third_party.prune_like_users(model)
        else:
            third_party.randomize_statistics(model)
            compactor.prune_channels(model, x, 0.5)
        small = compactor.compact(model, x, time_limit=limit)
        report = compactor.report_of(small)
        masked = {n for n, m in model.named_modules() if hasattr(m, "weight_mask")}
        row.update(result="exact", params=report.params_after / report.params_before,  # kept groups of masked layers
                   kept=sum(1 for g in report.groups if g.status != "removed" and masked & set(g.layers)),
                   max_abs_diff=report.max_abs_diff)
    except compactor.NoPruningFoundError:
        row.update(result="nothing masked")
    except compactor.VerificationError as exc:
        row.update(result="error", error=f"VerificationError: {exc}"[:300])
    except compactor.CompactionError as exc:
        row.update(result="refused", error=" ".join(str(exc).split())[:300])
    except Exception as exc:  # noqa: BLE001 - the point is to record it
        row.update(result="error", error=f"{type(exc).__name__}: {exc}"[:300])
    row["seconds"] = time.perf_counter() - t0
    return row


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=common.words, default=list(SWEEP))
    p.add_argument("--cap-gb", type=float, default=8.0, help="address-space cap per run (default 8)")
    p.add_argument("--time-limit", type=float, default=200.0, help="compact(time_limit=...) per run (default 200)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(_MARK + json.dumps(child(*args.child, args.cap_gb, args.time_limit)), flush=True)
        return {}
    names = [n for n in args.models if third_party.available(n)]
    rows = []
    for i, name in enumerate(names):
        for how in ("per-layer", "prune_channels"):
            common.bench.progress_bar(i, len(names), f"{name} {how}")
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, how,
                                   "--cap-gb", str(args.cap_gb), "--time-limit", str(args.time_limit)],
                                  capture_output=True, text=True, timeout=args.time_limit * 3 + 120)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)), None)
            rows.append(json.loads(line[len(_MARK):]) if line else
                        {"model": name, "masks": how, "result": "error",
                         "error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"[:300]})
    common.bench.progress_bar(len(names), len(names), "done")
    machine = common.machine_info()
    device = common.device_slug(False)
    folder = common.out_dir(args.out, device)
    name = common.tag("robustness", f"{len(names)}-models")
    cols = [("model", lambda r: r["model"]), ("masks", lambda r: r["masks"]), ("result", lambda r: r["result"]),
            ("params after", lambda r: f"{r['params']:.3f}" if "params" in r else "-"),
            ("groups kept", lambda r: str(r.get("kept", "-"))),
            ("time", lambda r: common.fmt_s(r["seconds"]) if "seconds" in r else "-")]
    bad = [r for r in rows if r["result"] == "error" or (r["masks"] == "prune_channels" and r.get("kept"))]
    md = [common.header(f"compact() on {len(names)} third-party models ({device})", machine, vars(args)),
          f"Random weights, built offline; one thread; {args.cap_gb:g} GiB address-space cap; "
          f"`time_limit={args.time_limit:g}`. 'exact': verified against the masked model. For per-layer masks, "
          "kept groups are masked channels coupled with unmasked ones; for prune_channels, any kept group is a "
          f"miss. Errors or misses: {len(bad)}.", "", common.table(rows, cols), ""]
    md += [f"- {r['model']} ({r['masks']}): {r.get('error', 'kept groups')}" for r in bad]
    return common.write_results(folder, name, {"kind": "robustness", "machine": machine, "settings": vars(args),
                                               "rows": rows}, md)


if __name__ == "__main__":
    main()
