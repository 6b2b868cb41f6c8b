"""What does compactor.compact() itself cost, in seconds and peak memory, as models grow?

MLP stacks (Linear+ReLU, every hidden layer pruned with ln_structured 50 %, then an
unpruned Linear head) of growing depth at fixed width and growing width at fixed depth,
plus the ResNet-50-class network in both pruning scenarios. Each size runs in its own
subprocess so peak memory is that size's alone: the kernel's peak-RSS counter (VmHWM)
is reset just before compact() and read just after it (ru_maxrss when the reset is
not allowed), so the number is the peak *during compaction* with the model loaded.

    python benchmarks/compaction_cost.py               # default sizes (up to 8192 wide x 4, 32 deep x 1024)
    python benchmarks/compaction_cost.py --full        # adds width 8192 x 16 layers (~1.07 B params, ~4.3 GB fp32)
    python benchmarks/compaction_cost.py --smoke --out /tmp/b

Writes benchmarks/results/<device>/compaction_cost_<settings>.{json,md,png}.
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
from common import bench  # noqa: E402

_MARK = "COMPACTION_COST_RESULT "


# --------------------------------------------------------------------------- child: one size


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _mlp(depth: int, width: int):
    import torch
    from torch import nn
    from torch.nn.utils import prune

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        layers += [lin, nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    model = nn.Sequential(*layers).eval()
    for m in layers[:-1]:
        if isinstance(m, nn.Linear):
            prune.ln_structured(m, "weight", amount=0.5, n=2, dim=0)
    return model, torch.randn(8, width)


def _trim() -> None:
    """Hand freed heap back to the kernel (glibc), so the RSS baseline holds live memory only."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def child(spec: dict) -> dict:
    import torch

    from compactor import compact

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    _trim()
    rss_import_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if spec["kind"] == "mlp":
        model, x = _mlp(spec["depth"], spec["width"])
    else:
        dense, shape, _ = bench.build_dense(spec["model"], small=spec.get("small", False))
        model = bench.apply_scenario(dense, spec["model"], spec["scenario"]).eval()
        x = torch.randn(2, *shape)
    build_s = time.perf_counter() - t0
    dense_params = sum(p.numel() for p in model.parameters())  # *_orig: the dense sizes
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    held_bytes = model_bytes + sum(b.numel() * b.element_size() for b in model.buffers())
    _trim()
    rss_before_kb = _status_kb("VmRSS")
    reset = _reset_peak()
    maxrss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    small = compact(model, x)
    seconds = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = small.compaction_report
    mb = model_bytes / 2**20
    return {
        **spec,
        "params": dense_params,
        "params_after": report.params_after,
        "model_mb": mb,
        "masked_model_mb": held_bytes / 2**20,
        "build_s": build_s,
        "compact_s": seconds,
        "rss_import_mb": (rss_import_kb or 0) / 1024,
        "rss_before_mb": (rss_before_kb or 0) / 1024,
        "peak_rss_mb": peak_kb / 1024,
        "extra_mb": peak_kb / 1024 - (rss_before_kb or 0) / 1024,
        "peak_over_model": peak_kb / 1024 / mb if mb else None,
        "extra_over_model": (peak_kb / 1024 - (rss_before_kb or 0) / 1024) / mb if mb else None,
        "peak_method": "VmHWM reset before compact()" if reset else "ru_maxrss (whole process; reset not allowed)",
        "maxrss_before_mb": maxrss_before_kb / 1024,
        "max_abs_diff": report.max_abs_diff,
        "tolerance": report.tolerance,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- parent


def _mem_available_mb() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def sizes(args: argparse.Namespace) -> list[dict]:
    if args.smoke:
        out = [{"kind": "mlp", "sweep": "depth", "depth": d, "width": 64} for d in (2, 4)]
        return out + ([{"kind": "model", "model": "resnet50", "scenario": "all-50", "small": True}] if args.resnet else [])
    out = [{"kind": "mlp", "sweep": "depth", "depth": d, "width": args.width} for d in args.depths]
    out += [{"kind": "mlp", "sweep": "width", "depth": args.depth, "width": w} for w in args.widths]
    if args.full:
        out += [{"kind": "mlp", "sweep": "big", "depth": 16, "width": 8192}]
    if args.resnet:
        out += [{"kind": "model", "model": "resnet50", "scenario": s} for s in ("bottleneck-inner-50", "all-50")]
    if args.max_params:
        out = [s for s in out if s["kind"] != "mlp" or s["depth"] * s["width"] ** 2 <= args.max_params]
    return out


def run(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    worst_ratio = base_mb = largest_mb = 0.0
    todo = sizes(args)
    for i, spec in enumerate(todo):
        spec = {**spec, "threads": args.threads}
        label = (f"mlp depth {spec['depth']} width {spec['width']}" if spec["kind"] == "mlp"
                 else f"{spec['model']} {spec['scenario']}")
        if not args.quiet:
            bench.progress_bar(i, len(todo), f"compact(): {label}")
        if spec["kind"] == "mlp" and worst_ratio and args.memory_guard:
            # peak RSS above the bare interpreter, per byte of model, as measured on the smaller MLPs
            need = base_mb + worst_ratio * spec["depth"] * spec["width"] ** 2 * 4 / 2**20
            avail = _mem_available_mb()
            if avail and need > 0.85 * avail:
                rows.append({**spec, "skipped": f"needs ~{need / 1024:.1f} GiB ({worst_ratio:.1f}x the fp32 model for "
                                                "the masked model and compact(), as measured on the smaller sizes, "
                                                f"plus the interpreter), {avail / 1024:.1f} GiB available"})
                continue
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                              capture_output=True, text=True, timeout=args.timeout)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({**spec, "error": f"exit {proc.returncode}: {tail}"})
            continue
        row = json.loads(line[len(_MARK):])
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        if spec["kind"] == "mlp" and row["model_mb"] >= largest_mb:  # the largest MLP so far predicts best
            largest_mb, base_mb = row["model_mb"], row["rss_import_mb"]
            worst_ratio = (row["peak_rss_mb"] - row["rss_import_mb"]) / row["model_mb"]
    if not args.quiet:
        bench.progress_bar(len(todo), len(todo), "compact(): done")
    return rows


def _label(r: dict) -> str:
    if r["kind"] == "mlp":
        return f"MLP {r['depth']} x {r['width']}"
    return f"{r['model']} {r['scenario']}" + (" (small)" if r.get("small") else "")


def write(args: argparse.Namespace, rows: list[dict], elapsed: float) -> list[str]:
    machine = common.machine_info()
    device = common.device_slug(False)
    folder = common.out_dir(args.out, device)
    settings = {"width": args.width, "depths": "-".join(map(str, args.depths)), "depth": args.depth,
                "widths": "-".join(map(str, args.widths)), "full": args.full, "resnet": args.resnet,
                "threads": args.threads or machine["torch_threads"], "smoke": args.smoke}
    if args.smoke:
        name = common.tag("compaction_cost", "smoke", "mlp-d2-4-w64")
    else:
        name = common.tag("compaction_cost", f"w{args.width}-d{settings['depths']}", f"d{args.depth}-w{settings['widths']}",
                          "full" if args.full else None, None if args.resnet else "no-resnet")
    files = [common.write_json(os.path.join(folder, name + ".json"),
                               {"kind": "compaction_cost", "machine": machine, "settings": settings, "device": device,
                                "elapsed_s": elapsed, "rows": rows})]
    ok = [r for r in rows if "compact_s" in r]

    def mb(v: float) -> str:
        return f"{v:.2f} MB" if v < 10 else f"{v:.0f} MB"

    cols = [
        ("model", _label),
        ("params", lambda r: common.fmt_n(r["params"])),
        ("fp32 size", lambda r: mb(r["model_mb"])),
        ("held (orig+mask)", lambda r: mb(r["masked_model_mb"])),
        ("compact()", lambda r: common.fmt_s(r["compact_s"])),
        ("RSS before", lambda r: mb(r["rss_before_mb"])),
        ("peak RSS in compact()", lambda r: mb(r["peak_rss_mb"])),
        ("extra", lambda r: mb(r["extra_mb"])),
        ("peak / model", lambda r: f"{r['peak_over_model']:.1f}x"),
        ("extra / model", lambda r: f"{r['extra_over_model']:.1f}x"),
        ("params after", lambda r: common.fmt_n(r["params_after"])),
        ("max abs diff", lambda r: f"{r['max_abs_diff']:.1e}"),
    ]
    md = [common.header(f"Cost of compactor.compact() ({device})", machine, settings),
          "Peak RSS is the process's resident-memory high-water mark, reset just before compact() "
          f"({ok[0]['peak_method'] if ok else ''}); 'extra' is that peak minus the RSS with the pruned model loaded. "
          "'model' is the dense fp32 size; a masked model holds weight_orig + weight_mask (+ the computed weight).",
          "", common.table(ok, cols), ""]
    bad = [r for r in rows if "compact_s" not in r]
    if bad:
        md += ["Not run:", ""] + [f"- {_label(r)}: {r.get('skipped') or r.get('error')}" for r in bad] + [""]
    series_t: dict[str, list] = {}
    series_m: dict[str, list] = {}
    for r in ok:
        if r["kind"] != "mlp":
            continue
        key = f"depth sweep (width {r['width']})" if r.get("sweep") == "depth" else (
            f"width sweep (depth {r['depth']})" if r.get("sweep") == "width" else "largest")
        series_t.setdefault(key, []).append((r["params"], r["compact_s"]))
        series_m.setdefault(key, []).append((r["params"], r["peak_rss_mb"] / 1024))
    for series, what, unit in ((series_t, "time", "compact() seconds"), (series_m, "memory", "peak RSS in compact() (GiB)")):
        p = common.plot_xy(series, os.path.join(folder, f"{name}_{what}.png"), f"compact() {what} vs MLP size ({device})",
                           "parameters", unit, logx=True)
        if p:
            files.append(p)
            md.append(f"![{os.path.basename(p)}]({os.path.basename(p)})")
    files.append(common.write_text(os.path.join(folder, name + ".md"), "\n".join(md) + "\n"))
    return files


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=1024, help="width of the depth sweep (default: 1024)")
    p.add_argument("--depths", type=common.ints, default=[2, 4, 8, 16, 32], help="depth sweep (default: 2,4,8,16,32)")
    p.add_argument("--depth", type=int, default=4, help="depth of the width sweep (default: 4)")
    p.add_argument("--widths", type=common.ints, default=[256, 512, 1024, 2048, 4096, 8192],
                   help="width sweep (default: 256,512,1024,2048,4096,8192)")
    p.add_argument("--full", action="store_true", help="add the ~1.07 B-parameter MLP (16 x 8192; needs ~20 GB)")
    p.add_argument("--max-params", type=float, default=None, help="skip MLPs above this many parameters")
    p.add_argument("--no-resnet", dest="resnet", action="store_false", help="skip the ResNet-50 rows")
    p.add_argument("--no-memory-guard", dest="memory_guard", action="store_false",
                   help="run sizes even when the memory they are predicted to need exceeds what is available")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per size before giving up (default: 1800)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results; a temp dir with --smoke)")
    p.add_argument("--smoke", action="store_true", help="two tiny MLPs (and the small zoo resnet50 unless --no-resnet)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.out = common.smoke_base(args.out)
        args.threads = args.threads or 1
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse(argv)
    if args.child:
        print(_MARK + json.dumps(child(json.loads(args.child))), flush=True)
        return {}
    t0 = time.perf_counter()
    rows = run(args)
    files = write(args, rows, time.perf_counter() - t0)
    for f in files:
        print(f)
    return {"rows": rows, "files": files}


if __name__ == "__main__":
    main()
