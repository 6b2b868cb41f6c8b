"""Where does the time go? Per-op-type time of dense vs compact models (onnxruntime and torch profilers).

For each variant: onnxruntime's own profiler (per-node kernel time, summed by op type,
with the nodes compactor's exact mode adds - the border-correction path of a zero-padded
conv that lost constant input channels - in their own rows) and torch.profiler (self CPU
time per aten op). Used to explain an efficiency target that was missed.

    python benchmarks/profile_ops.py                      # ResNet-50, both scenarios, batch 8, 1 thread
    python benchmarks/profile_ops.py --smoke --out /tmp/b

Writes benchmarks/results/<device>/profile_ops_<settings>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import bench  # noqa: E402

import torch  # noqa: E402

from compactor import export, timing  # noqa: E402

VARIANTS = ("dense", "compact", "compact-drop", "compact-round8")
_PLUMBING = {"Shape", "Gather", "Unsqueeze", "Concat", "ConstantOfShape", "Slice", "Cast", "Expand"}


def _ort_group(op: str, node: str) -> str:
    if op in _PLUMBING:
        return "border: shape plumbing + ConstantOfShape"
    if op in ("Conv", "FusedConv") and re.search(r"/conv\d*/Conv_1", node):
        return "border: conv over ones"
    if op == "Add" and re.search(r"/conv\d*/Add", node):
        return "border: Add"
    if op in ("ReorderInput", "ReorderOutput"):
        return "layout reorder (NCHWc <-> NCHW)"
    return op


def profile_ort(path: str, x, threads: int, runs: int) -> tuple[dict[str, tuple[int, float]], float]:
    """{group: (nodes, ms per forward)}, total ms per forward."""
    sess = export.ort_session(path, threads=threads,
                              profile_prefix=os.path.join(tempfile.mkdtemp(prefix="ort-prof-"), "p"))
    feed = {sess.get_inputs()[0].name: x.numpy()}
    sess.run(None, feed)  # warm-up, dropped below
    for _ in range(runs):
        sess.run(None, feed)
    prof = sess.end_profiling()
    with open(prof) as f:
        events = json.load(f)
    runs_seen = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    skip_until = runs_seen[0]["ts"] + runs_seen[0]["dur"] if runs_seen else 0
    out: dict[str, list] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < skip_until:
            continue
        op = e.get("args", {}).get("op_name", "?")
        g = _ort_group(op, e["name"])
        acc = out.setdefault(g, [set(), 0.0])
        acc[0].add(e["name"])
        acc[1] += e["dur"] / 1000 / runs
    total = sum(e["dur"] for e in runs_seen[1:]) / 1000 / max(len(runs_seen) - 1, 1) if len(runs_seen) > 1 else 0.0
    os.unlink(prof)
    return {k: (len(v[0]), v[1]) for k, v in out.items()}, total


def profile_torch(model, x, threads: int, runs: int) -> tuple[dict[str, tuple[int, float]], float]:
    from torch.profiler import ProfilerActivity, profile

    with timing.torch_threads(threads), torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(x)
    out: dict[str, tuple[int, float]] = {}
    total = 0.0
    for ev in prof.key_averages():
        ms = ev.self_cpu_time_total / 1000 / runs
        total += ms
        if ms > 0:
            out[ev.key] = (ev.count // runs, ms)
    return out, total


def profile_prepared(prep: bench.Prepared, batch: int, *, backends: Sequence[str] = ("ort-cpu-1t", "torch-cpu-1t"),
                     variants: Sequence[str] = VARIANTS, runs: int = 3, progress=None) -> list[dict]:
    x = bench.make_inputs(prep.input_shape, batch)
    names = [v for v in variants if v in prep.variants]
    rows = []
    steps = len(backends) * len(names)
    i = 0
    for backend in backends:
        threads = bench.backend_threads(backend)
        for v in names:
            if progress:
                progress(i, steps, f"profiling {prep.model_name} {prep.scenario} {backend} {v} b{batch}")
            i += 1
            if backend.startswith("ort"):
                ops, total = profile_ort(prep.onnx_path(v), x, threads, runs)
            else:
                ops, total = profile_torch(prep.variants[v], x, threads, runs)
            for op, (n, ms) in ops.items():
                rows.append({"model": prep.model_name, "scenario": prep.scenario, "backend": backend, "batch": batch,
                             "variant": v, "op": op, "nodes": n, "ms": ms, "total_ms": total,
                             "macs": prep.macs.get(v)})
    if progress:
        progress(steps, steps, f"profiled {prep.model_name} {prep.scenario}")
    return rows


def markdown(rows: list[dict], top: int = 12) -> str:
    parts = []
    keys = list(dict.fromkeys((r["model"], r["scenario"], r["backend"], r["batch"]) for r in rows))
    for model, scenario, backend, batch in keys:
        rs = [r for r in rows if (r["model"], r["scenario"], r["backend"], r["batch"]) == (model, scenario, backend, batch)]
        variants = list(dict.fromkeys(r["variant"] for r in rs))
        by = {(r["variant"], r["op"]): r for r in rs}
        ops = sorted({r["op"] for r in rs}, key=lambda op: -max(by.get((v, op), {"ms": 0})["ms"] for v in variants))
        shown = ops[:top]
        if len(ops) > top:
            shown += [o for o in ops[top:] if o.startswith("border")]
        totals = {v: sum(r["ms"] for r in rs if r["variant"] == v) for v in variants}
        macs = {v: next(r["macs"] for r in rs if r["variant"] == v) for v in variants}
        parts.append(f"### {model} {scenario} - {backend} - batch {batch} (ms per forward, summed op time)\n")
        head = "| op | " + " | ".join(f"{v} (nodes)" for v in variants) + " | dense / compact |"
        lines = [head, "|" + "---|" * (len(variants) + 2)]
        for op in shown:
            cells = []
            for v in variants:
                r = by.get((v, op))
                cells.append(f"{r['ms']:.2f} ({r['nodes']})" if r else "")
            d, c = by.get(("dense", op)), by.get(("compact", op))
            ratio = f"{d['ms'] / c['ms']:.2f}" if d and c and c["ms"] else ""
            lines.append(f"| {op} | " + " | ".join(cells) + f" | {ratio} |")
        lines.append("| **all ops** | " + " | ".join(f"**{totals[v]:.2f}**" for v in variants)
                     + (f" | **{totals['dense'] / totals['compact']:.2f}** |" if "dense" in totals and totals.get("compact") else " | |"))
        lines.append("| MAC ratio dense / variant | " + " | ".join(
            f"{macs['dense'] / macs[v]:.2f}" if macs.get("dense") and macs.get(v) else "" for v in variants) + " | |")
        parts += lines + [""]
        border = {v: sum(r["ms"] for r in rs if r["variant"] == v and r["op"].startswith(("border", "layout")))
                  for v in variants}
        if any(border.values()) and backend.startswith("ort"):
            parts.append(", ".join(f"{v}: {border[v]:.2f} ms ({border[v] / totals[v]:.0%}) in border-correction "
                                   "and layout-reorder nodes" for v in variants if totals[v]) + "\n")
    return "\n".join(parts)


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--scenarios", type=common.words, default=["bottleneck-inner-50", "all-50"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--backends", type=common.words, default=["ort-cpu-1t", "torch-cpu-1t"])
    p.add_argument("--runs", type=int, default=3, help="profiled forwards per variant (default: 3)")
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="small zoo resnet50, batch 2, 1 run")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.runs, args.scenarios = 2, 1, ["all-50"]
        args.out = common.smoke_base(args.out)
    return args


def write(args: argparse.Namespace, rows: list[dict]) -> list[str]:
    machine = common.machine_info()
    device = common.device_slug(False)
    folder = common.out_dir(args.out, device)
    settings = {"model": args.model, "scenarios": ",".join(args.scenarios), "batch": args.batch,
                "backends": ",".join(args.backends), "runs": args.runs, "smoke": args.smoke}
    name = common.tag("profile_ops", "smoke" if args.smoke else None, args.model, "-".join(args.scenarios),
                      f"b{args.batch}", "-".join(args.backends))
    files = [common.write_json(os.path.join(folder, name + ".json"),
                               {"kind": "profile_ops", "machine": machine, "settings": settings, "rows": rows})]
    md = [common.header(f"Per-op time, dense vs compact ({device})", machine, settings), markdown(rows)]
    files.append(common.write_text(os.path.join(folder, name + ".md"), "\n".join(md) + "\n"))
    return files


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse(argv)
    progress = None if args.quiet else bench.progress_bar
    rows: list[dict] = []
    for scenario in args.scenarios:
        prep = bench.prepare(args.model, scenario, small=args.smoke, variants=VARIANTS, progress=progress)
        rows += profile_prepared(prep, args.batch, backends=args.backends, runs=args.runs, progress=progress)
        del prep
    files = write(args, rows)
    for f in files:
        print(f)
    return {"rows": rows, "files": files}


if __name__ == "__main__":
    main()
