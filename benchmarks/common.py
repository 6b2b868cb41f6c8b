"""Shared by the scripts in benchmarks/: result folders, JSON, markdown tables, plots, targets.

The cases themselves (models, pruning scenarios, variants, checks, timing) live in
:mod:`compactor.bench`, which ``compactor bench`` also calls; this module describes the
machine and writes.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from compactor import bench, timing  # noqa: E402

RESULTS = os.path.join(HERE, "results")


# --------------------------------------------------------------------------- the machine


def _cpu_model() -> str:
    return timing.machine_info()["cpu"]


def _cpu_cores() -> int:
    return timing.cpu_threads()  # every CPU this process may use


machine_info = timing.machine_info


def _slug(s: str) -> str:
    s = re.sub(r"\(r\)|\(tm\)|cpu @.*|processor|\d+-core", "", s.lower())
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-")[:40] or "unknown"


def device_slug(cuda: bool = False) -> str:
    """``cpu-<cpu name>-<cores>c`` or ``cuda-<gpu name>``, lower-case letters, digits and dashes."""
    if cuda and torch.cuda.is_available():
        return "cuda-" + _slug(torch.cuda.get_device_name(0))
    return f"cpu-{_slug(_cpu_model())}-{_cpu_cores()}c"


# --------------------------------------------------------------------------- arguments and folders


def ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def words(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def out_dir(base: Optional[str], device: str) -> str:
    """``<base>/<device>/`` (``base`` defaults to benchmarks/results), created."""
    path = os.path.join(base or RESULTS, device)
    os.makedirs(path, exist_ok=True)
    return path


def script_main(argv: Optional[Sequence[str]], parse: Callable, run: Callable, write: Callable) -> dict:
    """A script's main: ``parse(argv)``, ``run(args)``, ``write(args, result)``; print the files written and
    return the result with them under ``"files"``."""
    args = parse(argv)
    result = run(args)
    result["files"] = write(args, result)
    for f in result["files"]:
        print(f)
    return result


def smoke_base(out: Optional[str]) -> str:
    return out or tempfile.mkdtemp(prefix="compactor-bench-smoke-")


def tag(*parts: Any) -> str:
    """File-name-safe join of settings: tag("lenet", "b1-8", "r30") -> "lenet_b1-8_r30"."""
    text = "_".join(str(p) for p in parts if p not in (None, ""))
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


def write_json(path: str, obj: Any) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_jsonable)
    os.replace(tmp, path)
    return path


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def write_results(folder: str, name: str, payload: dict, md: Sequence[str], extra: Sequence[str] = ()) -> dict:
    """Write ``name``.json and ``name``.md in ``folder``, print every file written; returns rows and files."""
    files = [write_json(os.path.join(folder, name + ".json"), payload), *extra,
             write_text(os.path.join(folder, name + ".md"), "\n".join(md) + "\n")]
    for f in files:
        print(f)
    return {"rows": payload.get("rows"), "files": files}


def write_text(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return path


def header(title: str, machine: dict, settings: dict) -> str:
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ""
    lines = [
        f"# {title}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')} - CPU {machine['cpu']} ({machine['cpu_cores']} cores){gpu}; "
        f"torch {machine['torch']}, onnxruntime {machine.get('onnxruntime')}, python {machine['python']}",
        "",
        "settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- formatting


def fmt_s(s: Optional[float]) -> str:
    if s is None:
        return ""
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_x(v: Optional[float], nd: int = 2) -> str:
    return "" if v is None else f"{v:.{nd}f}"


def fmt_n(v: Optional[float]) -> str:
    if v is None:
        return ""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def table(rows: Sequence[dict], columns: Sequence[tuple[str, Callable[[dict], str]]]) -> str:
    out = ["| " + " | ".join(c for c, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(f(r) for _, f in columns) + " |")
    return "\n".join(out)


LATENCY_COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("variant", lambda r: r["variant"]),
    ("median", lambda r: fmt_s(r["median_s"])),
    ("IQR/median", lambda r: f"{r['spread']:.0%}"),
    ("samples/s", lambda r: fmt_n(r["throughput"])),
    ("params", lambda r: fmt_n(r["params"])),
    ("MACs/sample", lambda r: fmt_n(r["macs"])),
    ("ONNX", lambda r: fmt_n(r["onnx_bytes"]) + "B" if r.get("onnx_bytes") else ""),
    ("x masked", lambda r: fmt_x(r["speedup_vs_masked"])),
    ("x dense", lambda r: fmt_x(r["speedup_vs_dense"])),
    ("x native", lambda r: fmt_x(r.get("speedup_vs_native"))),
    ("MAC ratio", lambda r: fmt_x(r["mac_ratio"])),
    ("efficiency", lambda r: fmt_x(r["efficiency"])),
    ("max abs diff (vs)", lambda r: _check_text(r)),
]


def _check_text(r: dict) -> str:
    if r["variant"] == "native" and r.get("check_ref"):
        return "shapes = compact"
    if r.get("check_max_abs_diff") is None:
        return ""
    text = (f"{r['check_max_abs_diff']:.1e} <= {r['check_tolerance']:.1e} "
            f"({'masked' if r['check_ref'] == 'masked' else 'zeroed'})")
    if r.get("runtime_max_abs_diff") is not None:
        text += f"; {r['dtype']}: {r['runtime_max_abs_diff']:.1e} <= {r['runtime_tolerance']:.1e}"
    return text


def group_key(r: dict) -> tuple:
    return (r["model"], r["scenario"], r["backend"], r["batch"])


def grouped(rows: Iterable[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(group_key(r), []).append(r)
    return out


def latency_markdown(rows: Sequence[dict]) -> str:
    parts = []
    for (model, scenario, backend, batch), rs in grouped(rows).items():
        threads = rs[0]["threads"]
        parts.append(f"### {model} {scenario} - {backend} ({threads} thread{'s' if threads != 1 else ''}) - batch {batch}\n")
        parts.append(table(rs, LATENCY_COLUMNS))
        parts.append("")
    return "\n".join(parts)


def native_markdown(rows: Sequence[dict]) -> str:
    """Per case, a row per (backend, batch): compact (exact / drop / round_to=8) vs the natively designed model,
    next to MAC efficiency. Empty when no row has a native variant."""
    parts = []
    cases: dict[tuple, dict[tuple, dict[str, dict]]] = {}
    for r in rows:
        cases.setdefault((r["model"], r["scenario"]), {}).setdefault((r["backend"], r["batch"]), {})[r["variant"]] = r
    for (model, scenario), cells in cases.items():
        entries = [dict(g, _backend=b, _batch=n) for (b, n), g in cells.items() if "native" in g and "compact" in g]
        if not entries:
            continue

        def x(g: dict, variant: str, key: str) -> str:
            return fmt_x(g[variant].get(key)) if variant in g else ""

        cols = [
            ("backend", lambda g: g["_backend"]),
            ("batch", lambda g: str(g["_batch"])),
            ("MAC ratio", lambda g: x(g, "compact", "mac_ratio")),
            ("native x dense", lambda g: x(g, "native", "speedup_vs_dense")),
            ("drop x native", lambda g: x(g, "compact-drop", "speedup_vs_native")),
            ("**exact x native**", lambda g: x(g, "compact", "speedup_vs_native")),
            ("round8 x native", lambda g: x(g, "compact-round8", "speedup_vs_native")),
            ("exact x dense", lambda g: x(g, "compact", "speedup_vs_dense")),
            ("exact x masked", lambda g: x(g, "compact", "speedup_vs_masked")),
            ("eff. exact / drop / native", lambda g: " / ".join(
                x(g, v, "efficiency") or "-" for v in ("compact", "compact-drop", "native"))),
            ("IQR/median (exact)", lambda g: f"{g['compact']['spread']:.0%}"),
        ]
        parts += [f"### {model} {scenario}\n", table(entries, cols), ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------- targets


def find(rows: Sequence[dict], **kw: Any) -> Optional[dict]:
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


#: (description, model, scenario, batch, variant, metric, threshold, backends)
TARGETS = [
    ("LeNet compact vs masked, batch 1", "lenet", "seeds-50", 1, "compact", "speedup_vs_masked", 1.8, ("torch-cpu-1t",)),
    ("LeNet compact vs masked, batch 256", "lenet", "seeds-50", 256, "compact", "speedup_vs_masked", 1.4, ("torch-cpu-1t",)),
    ("ResNet-50 bottleneck-inner-50 efficiency (exact), batch 8", "resnet50", "bottleneck-inner-50", 8, "compact",
     "efficiency", 0.85, ("ort-cpu-1t", "ort-cpu")),
    ("ResNet-50 bottleneck-inner-50 efficiency (exact), batch 8", "resnet50", "bottleneck-inner-50", 8, "compact",
     "efficiency", 0.75, ("torch-cpu-1t", "torch-cpu")),
    ("ResNet-50 all-50 efficiency (round_to=8), batch 8", "resnet50", "all-50", 8, "compact-round8",
     "efficiency", 0.95, ("ort-cpu-1t", "ort-cpu")),
    ("ResNet-50 all-50 efficiency (exact), batch 8", "resnet50", "all-50", 8, "compact",
     "efficiency", 0.8, ("torch-cpu-1t", "torch-cpu")),
]


def evaluate_targets(rows: Sequence[dict]) -> list[dict]:
    """One entry per (target, backend) found in ``rows``: measured value, threshold, met or not."""
    out = []
    for desc, model, scenario, batch, variant, metric, thr, backends in TARGETS:
        for backend in backends:
            r = find(rows, model=model, scenario=scenario, batch=batch, variant=variant, backend=backend)
            if r is None or r.get(metric) is None:
                continue
            side = None
            if "efficiency" == metric:
                other = "compact-drop" if variant != "compact-drop" else "compact"
                o = find(rows, model=model, scenario=scenario, batch=batch, variant=other, backend=backend)
                side = (other, o.get(metric)) if o else None
            out.append({"target": desc, "backend": backend, "metric": metric, "variant": variant,
                        "measured": r[metric], "threshold": thr, "met": r[metric] >= thr, "side": side,
                        "spread": r["spread"]})
    # onnxruntime vs torch eager, compact LeNet, batch 256 (~3.8x elsewhere; reported, no threshold)
    for t_b, o_b in (("torch-cpu-1t", "ort-cpu-1t"), ("torch-cpu", "ort-cpu")):
        t = find(rows, model="lenet", scenario="seeds-50", batch=256, variant="compact", backend=t_b)
        o = find(rows, model="lenet", scenario="seeds-50", batch=256, variant="compact", backend=o_b)
        if t and o:
            out.append({"target": "LeNet compact, onnxruntime vs torch eager, batch 256 (~3.8x elsewhere)",
                        "backend": f"{o_b} vs {t_b}", "metric": "speedup", "variant": "compact",
                        "measured": t["median_s"] / o["median_s"], "threshold": None, "met": None, "side": None,
                        "spread": max(t["spread"], o["spread"])})
    return out


def targets_markdown(results: Sequence[dict]) -> str:
    if not results:
        return "(no target cases in these results)\n"
    cols = [
        ("target", lambda e: e["target"]),
        ("backend", lambda e: e["backend"]),
        ("measured", lambda e: f"{e['measured']:.2f}" + (f" ({e['variant']})" if e["metric"] == "efficiency" else "")),
        ("side by side", lambda e: f"{e['side'][0]}: {e['side'][1]:.2f}" if e.get("side") and e["side"][1] is not None else ""),
        ("target", lambda e: "" if e["threshold"] is None else f">= {e['threshold']}"),
        ("met", lambda e: "-" if e["met"] is None else ("yes" if e["met"] else "**MISSED**")),
        ("IQR/median", lambda e: f"{e['spread']:.0%}"),
    ]
    return table(results, cols) + "\n"


# --------------------------------------------------------------------------- plots


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_latency_vs_sparsity(rows: Sequence[dict], path: str, title: str) -> Optional[str]:
    plt = pyplot()
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for variant in bench.VARIANTS:
        pts = sorted((r["sparsity"], r["median_s"], r["p25_s"], r["p75_s"]) for r in rows if r["variant"] == variant)
        if not pts:
            continue
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1] * 1e3 for p in pts], marker="o", label=variant)
        ax.fill_between(xs, [p[2] * 1e3 for p in pts], [p[3] * 1e3 for p in pts], alpha=0.15)
    ax.set_xlabel("fraction of channels pruned")
    ax.set_ylabel("latency, median (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speedup_vs_batch(rows: Sequence[dict], path: str, title: str) -> Optional[str]:
    plt = pyplot()
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    for backend in backends:
        for variant, style in (("compact", "-"), ("compact-drop", ":")):
            pts = sorted((r["batch"], r["speedup_vs_masked"]) for r in rows
                         if r["backend"] == backend and r["variant"] == variant and r["speedup_vs_masked"])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{variant} {backend}")
    mac = next((r["mac_ratio"] for r in rows if r["variant"] == "compact" and r.get("mac_ratio")), None)
    if mac:
        ax.axhline(mac, color="grey", lw=0.8, ls="-.", label=f"MAC ratio {mac:.2f}")
    ax.axhline(1.0, color="black", lw=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("speed-up vs masked (x)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_xy(series: dict[str, list[tuple[float, float]]], path: str, title: str, xlabel: str, ylabel: str,
            logx: bool = False) -> Optional[str]:
    plt = pyplot()
    if plt is None or not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
