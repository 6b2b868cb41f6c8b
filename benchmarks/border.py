"""Exact mode's two ways to carry constants into zero-padded convs, against native: carrier vs layers.

``compact`` (``border="carrier"``, the default) keeps one masked channel per coupled group that
feeds a zero-padded conv, as a plain channel of plain layers; ``compact-layers``
(``border="layers"``) removes it and adds the border term with compactor's own layer classes.
For ResNet-50 bottleneck-inner-50 and all-50, this records per variant (native, compact,
compact-layers, compact-drop): parameters, MACs, ops per forward (GPU code paths, as
``op_count.py`` counts them), and batch-8 latency at one thread in torch eager and onnxruntime
(every variant checked against the masked model first, interleaved medians).

    python benchmarks/border.py                 # both cases, batch 8, 30 repeats
    python benchmarks/border.py --smoke         # the zoo's small ResNet-50: seconds

Writes benchmarks/results/<device>/border_<settings>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import op_count  # noqa: E402

from compactor import bench  # noqa: E402

VARIANTS = ("native", "compact", "compact-layers", "compact-drop")
CASES = ("bottleneck-inner-50", "all-50")


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=common.words, default=list(CASES))
    p.add_argument("--backends", type=common.words, default=None,
                   help="default: torch-cpu-1t and ort-cpu-1t where available")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--smoke", action="store_true", help="the zoo's small ResNet-50, 3 repeats")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.backends is None:
        args.backends = [b for b in ("torch-cpu-1t", "ort-cpu-1t") if b in bench.available_backends()]
    if args.smoke:
        args.repeats, args.out = 3, common.smoke_base(args.out)
    return args


def run(args: argparse.Namespace) -> dict:
    rows = []
    for case in args.cases:
        prep = bench.prepare("resnet50", case, small=args.smoke, variants=VARIANTS, progress=None)
        x1 = prep.inputs(1)
        counts = {v: op_count.count(prep.variants[v], x1) for v in VARIANTS}
        carriers = sum(len(g.channels) for g in prep.reports["compact"].groups if g.status == "carrier")
        times = {}
        for backend in args.backends:
            for r in bench.time_case(prep, backend, args.batch, repeats=args.repeats, variants=VARIANTS):
                times[(backend, r["variant"])] = r["median_s"]
        for v in VARIANTS:
            row = {"case": case, "variant": v, "params": prep.params[v], "macs": prep.macs[v],
                   "ops": counts[v]["ops"], "carrier_channels": carriers if v == "compact" else 0}
            for backend in args.backends:
                t, native = times.get((backend, v)), times.get((backend, "native"))
                row[f"{backend}_ms"] = t * 1e3 if t else None
                row[f"{backend}_x_native"] = native / t if t and native else None
            rows.append(row)
    return {"settings": {"batch": args.batch, "repeats": args.repeats, "smoke": args.smoke,
                         "backends": args.backends}, "rows": rows}


def write(args: argparse.Namespace, result: dict) -> list[str]:
    machine = common.machine_info()
    columns = [("case", lambda r: r["case"]), ("variant", lambda r: r["variant"]),
               ("params", lambda r: f"{r['params']:,}"), ("MACs", lambda r: f"{r['macs']:,}"),
               ("ops / forward", lambda r: str(r["ops"])), ("carrier channels", lambda r: str(r["carrier_channels"]))]
    for b in result["settings"]["backends"]:
        columns += [(f"{b} ms", lambda r, b=b: common.fmt_n(r[f"{b}_ms"])),
                    (f"{b} x native", lambda r, b=b: common.fmt_x(r[f"{b}_x_native"]))]
    md = [common.header("Exact mode: carrier channels vs border-corrected layers vs native", machine,
                        result["settings"]), "", common.table(result["rows"], columns), ""]
    folder = common.out_dir(args.out, common.device_slug(False))
    name = "border_" + common.tag("-".join(args.cases), f"b{args.batch}", f"r{args.repeats}",
                                  "smoke" if args.smoke else "")
    files = common.write_results(folder, name, {"machine": machine, **result}, md)["files"]
    print("\n".join(md))
    return files


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return common.script_main(argv, parse, run, write)


if __name__ == "__main__":
    main()
