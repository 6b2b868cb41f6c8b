"""What does compactor.compact() itself cost, in seconds and peak memory, as models grow?

MLP stacks (Linear+ReLU, every hidden layer pruned with ln_structured 50 %, then an
unpruned Linear head) of growing depth at fixed width and growing width at fixed depth,
plus the ResNet-50-class network in both pruning scenarios, plus third-party models
(torchvision, timm, ultralytics, Hugging Face; see ``third_party.py``) where those
libraries are installed. Each size runs in its own subprocess so peak memory is that
size's alone: the kernel's peak-RSS counter (VmHWM) is reset just before compact() and
read just after it (ru_maxrss when the reset is not allowed), so the number is the peak
*during compaction* with the model loaded. The bound checked per row: the extra memory
compact() takes is at most 2 x the model's fp32 size plus one forward's activations
(measured as an autograd forward of the masked model, which keeps them all) plus a fixed
allowance for what the runtime takes on first use whatever the model (``ALLOWANCE_MB``).

The timing row: torchvision ResNet-50, 224 x 224, a batch of 1, bottleneck conv1 / conv2
masked 50 %, one thread, the median of 5 compact() calls (a garbage collection between
calls, so one call does not pay for freeing the last one's model).

    python benchmarks/compaction_cost.py               # default sizes (up to 8192 wide x 4, 32 deep x 1024)
    python benchmarks/compaction_cost.py --full        # adds width 8192 x 16 layers (~1.07 B params, ~4.3 GB fp32),
                                                       # compacted with inplace=True (no second copy)
    python benchmarks/compaction_cost.py --third-party # the models of third_party.ISSUE_9 + MORE, and the timing row
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

#: memory the runtime takes on first use whatever the model (allocator caches, the tracer's bookkeeping):
#: measured 12-15 MB on models of a few kB, 40-60 MB on small CNNs traced at 64 x 64
ALLOWANCE_MB = 64


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


def _activations_mb(model, x: tuple) -> float:
    """Peak RSS above the current RSS during one autograd forward (which keeps every activation)."""
    import torch

    _trim()
    before = _status_kb("VmRSS") or 0
    if not _reset_peak():
        return float("nan")
    with torch.enable_grad():
        out = model(*x)
    peak = _status_kb("VmHWM") or 0
    del out
    return (peak - before) / 1024


def _timing(spec: dict) -> dict:
    """torchvision ResNet-50, bottleneck conv1 / conv2 masked 50 %, 224 x 224, batch 1: compact() times."""
    import gc
    import statistics

    import torch
    import torchvision
    from torch.nn.utils import prune

    from compactor import compact, report_of

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    for block in [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]:
        for conv in (block.conv1, block.conv2):
            prune.ln_structured(conv, "weight", amount=0.5, n=2, dim=0)
    x = torch.randn(1, 3, 224, 224)
    times = []
    for _ in range(spec.get("repeats", 5)):
        gc.collect()
        t0 = time.perf_counter()
        small = compact(model, x)
        times.append(time.perf_counter() - t0)
        report = report_of(small)
        del small
    return {**spec, "times_s": times, "compact_s": statistics.median(times), "params": report.params_before,
            "params_after": report.params_after, "max_abs_diff": report.max_abs_diff,
            "threads": torch.get_num_threads()}


def _third_party(spec: dict) -> tuple:
    import third_party

    model, x = third_party.build(spec["model"])
    layers = third_party.prune_like_users(model)
    return model, x, layers


def child(spec: dict) -> dict:
    import torch

    from compactor import CompactionError, compact, report_of

    if spec.get("cap_gb"):
        cap = int(spec["cap_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec["kind"] == "timing":
        return _timing(spec)
    _trim()
    rss_import_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    layers = None
    if spec["kind"] == "mlp":
        model, x = _mlp(spec["depth"], spec["width"])
        x = (x,)
    elif spec["kind"] == "third_party":
        model, x, layers = _third_party(spec)
    else:
        dense, shape, _ = bench.build_dense(spec["model"], small=spec.get("small", False))
        model = bench.apply_scenario(dense, spec["model"], spec["scenario"]).eval()
        x = (torch.randn(2, *shape),)
    build_s = time.perf_counter() - t0
    dense_params = sum(p.numel() for p in model.parameters())  # *_orig: the dense sizes
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    held_bytes = model_bytes + sum(b.numel() * b.element_size() for b in model.buffers())
    _trim()
    rss_before_kb = _status_kb("VmRSS")
    reset = _reset_peak()
    maxrss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    status, error = "exact", None
    try:
        small = compact(model, x, inplace=bool(spec.get("inplace")), time_limit=spec.get("time_limit"))
    except CompactionError as exc:
        status, error, small = "refused", " ".join(str(exc).split()), None
    seconds = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mb = model_bytes / 2**20
    extra_mb = peak_kb / 1024 - (rss_before_kb or 0) / 1024
    if small is None:
        return {**spec, "status": status, "error": error, "compact_s": seconds, "params": dense_params,
                "model_mb": mb, "peak_rss_mb": peak_kb / 1024, "extra_mb": extra_mb}
    report = report_of(small)
    removed = sum(len(r.removed_out) for r in report.layers if r.op in ("Conv1d", "Conv2d", "Linear"))
    kept = [f"{g.status}: {', '.join(g.layers[:2])}: {g.reason}" for g in report.groups if g.status != "removed"]
    del small
    act_mb = _activations_mb(model, x) if not spec.get("inplace") else float("nan")
    return {
        **spec,
        "status": status,
        "masked_rows": None if layers is None else __import__("third_party").masked_rows(layers),
        "removed_rows": removed,
        "kept_notes": kept[:5],
        "activations_mb": act_mb,
        "bound_mb": 2 * mb + act_mb + ALLOWANCE_MB,
        "within_bound": None if act_mb != act_mb else extra_mb <= 2 * mb + act_mb + ALLOWANCE_MB,
        "params": dense_params,
        "params_after": report.params_after,
        "model_mb": mb,
        "masked_model_mb": held_bytes / 2**20,
        "build_s": build_s,
        "compact_s": seconds,
        "rss_import_mb": (rss_import_kb or 0) / 1024,
        "rss_before_mb": (rss_before_kb or 0) / 1024,
        "peak_rss_mb": peak_kb / 1024,
        "extra_mb": extra_mb,
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
    if args.full:  # the masked model alone holds ~13 GB: compacted in place, without a second copy
        out += [{"kind": "mlp", "sweep": "big", "depth": 16, "width": 8192, "inplace": True}]
    if args.resnet:
        out += [{"kind": "model", "model": "resnet50", "scenario": s} for s in ("bottleneck-inner-50", "all-50")]
    if args.max_params:
        out = [s for s in out if s["kind"] != "mlp" or s["depth"] * s["width"] ** 2 <= args.max_params]
    if args.third_party:
        import third_party

        names = third_party.ISSUE_9 + third_party.MORE
        out += [{"kind": "third_party", "model": n, "cap_gb": 8, "time_limit": 120, "threads": 1}
                for n in names if third_party.available(n)]
        if third_party.available("tv:resnet50"):
            out.append({"kind": "timing", "model": "torchvision resnet50 224x224 b1, bottleneck conv1/conv2 50 %",
                        "repeats": 5, "threads": 1})
    return out


def run(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    worst_ratio = base_mb = largest_mb = 0.0
    todo = sizes(args)
    for i, spec in enumerate(todo):
        spec = {"threads": args.threads, **spec}
        label = _label(spec)
        if not args.quiet:
            bench.progress_bar(i, len(todo), f"compact(): {label}")
        if spec["kind"] == "mlp" and worst_ratio and args.memory_guard:
            # peak RSS above the bare interpreter, per byte of model, as measured on the smaller MLPs
            size_mb = spec["depth"] * spec["width"] ** 2 * 4 / 2**20
            # in place: the masked model (weight_orig + weight_mask + weight, 3x) is all it holds
            need = base_mb + (3.2 if spec.get("inplace") else worst_ratio) * size_mb
            avail = _mem_available_mb()
            if avail and need > 0.85 * avail:
                rows.append({**spec, "skipped": f"needs ~{need / 1024:.1f} GiB (the masked model and compact(), as "
                                                "measured on the smaller sizes, plus the interpreter), "
                                                f"{avail / 1024:.1f} GiB available"})
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
        return f"MLP {r['depth']} x {r['width']}" + (" (inplace=True)" if r.get("inplace") else "")
    if r["kind"] in ("third_party", "timing"):
        return r["model"]
    return f"{r['model']} {r['scenario']}" + (" (small)" if r.get("small") else "")


def _third_party_md(rows: list[dict]) -> list[str]:
    """The third-party models (exact / refused, time, memory against the bound) and the timing row."""
    out: list[str] = []
    tp = [r for r in rows if r["kind"] == "third_party" and "compact_s" in r]
    if tp:
        def mb(v: Optional[float]) -> str:
            return "-" if v is None or v != v else f"{v:.0f} MB"

        cols = [
            ("model", _label),
            ("result", lambda r: r["status"]),
            ("compact()", lambda r: common.fmt_s(r["compact_s"])),
            ("fp32 size", lambda r: mb(r["model_mb"])),
            ("extra RSS", lambda r: mb(r["extra_mb"])),
            ("activations", lambda r: mb(r.get("activations_mb"))),
            (f"bound 2x size + act. + {ALLOWANCE_MB} MB", lambda r: mb(r.get("bound_mb"))),
            ("within", lambda r: {True: "yes", False: "**no**", None: "-"}[r.get("within_bound")]),
            ("params after", lambda r: f"{r['params_after'] / r['params']:.2f}" if r.get("params_after") else "-"),
            ("masked rows removed", lambda r: f"{r['removed_rows']} of {r['masked_rows']}" if r.get("masked_rows")
             else "-"),
        ]
        out += ["## Third-party models", "",
                "Built offline from their libraries' code (random weights), `prune.ln_structured(m, 'weight', 0.5, "
                "n=2, dim=0)` on every Conv / Linear but the head, one thread, an 8 GiB address-space cap and "
                "`time_limit=120` per model (`benchmarks/third_party.py`). 'exact': the compact model was verified "
                "against the masked one; masked rows that stayed are coupled with unmasked ones (see the notes in "
                "the JSON).", "", common.table(tp, cols), ""]
        refused = [r for r in tp if r["status"] != "exact"]
        out += [f"- {_label(r)}: {r['error']}" for r in refused] + ([""] if refused else [])
    timing = [r for r in rows if r["kind"] == "timing" and "compact_s" in r]
    for r in timing:
        out += ["## Time of one compact()", "",
                f"{r['model']}, {r['threads']} thread: median **{r['compact_s']:.2f} s** of "
                f"{len(r['times_s'])} ({', '.join(f'{t:.2f}' for t in r['times_s'])} s), params "
                f"{common.fmt_n(r['params'])} -> {common.fmt_n(r['params_after'])}, verified "
                f"(max |diff| {r['max_abs_diff']:.1e}).", ""]
    return out


def write(args: argparse.Namespace, rows: list[dict], elapsed: float) -> list[str]:
    machine = common.machine_info()
    device = common.device_slug(False)
    folder = common.out_dir(args.out, device)
    settings = {"width": args.width, "depths": "-".join(map(str, args.depths)), "depth": args.depth,
                "widths": "-".join(map(str, args.widths)), "full": args.full, "resnet": args.resnet,
                "threads": args.threads or machine["torch_threads"], "smoke": args.smoke,
                "third_party": args.third_party}
    if args.smoke:
        name = common.tag("compaction_cost", "smoke", "mlp-d2-4-w64")
    else:
        name = common.tag("compaction_cost", f"w{args.width}-d{settings['depths']}", f"d{args.depth}-w{settings['widths']}",
                          "full" if args.full else None, None if args.resnet else "no-resnet",
                          "third-party" if args.third_party else None)
    files = [common.write_json(os.path.join(folder, name + ".json"),
                               {"kind": "compaction_cost", "machine": machine, "settings": settings, "device": device,
                                "elapsed_s": elapsed, "rows": rows})]
    ok = [r for r in rows if "compact_s" in r and r["kind"] in ("mlp", "model")]

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
    md += _third_party_md(rows)
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
    p.add_argument("--third-party", action="store_true",
                   help="add the torchvision / timm / ultralytics / transformers models that are installed, and the "
                        "torchvision ResNet-50 timing row")
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
