"""How much faster is the compact model than the masked one, per backend, batch and sparsity?

Variants: dense (never pruned), masked (live prune hooks), masked-baked (prune.remove:
same shapes, zeros inside), native (the architecture designed at the compact widths,
checked to have compact's layer shapes: what those widths can run at), compact (exact),
compact-drop (mode="drop"), compact-round8 (round_to=8). Backends: torch eager CPU
(1 thread / all), onnxruntime CPU (1 thread / all), torch CUDA eager (+ torch.compile with
--compile) and onnxruntime CUDA where present; the other GPU runtimes (fp16 / bf16,
CUDA graphs) are gpu_runtimes.py's question. Every case is checked before it is timed
(compact == masked with compactor.verify.compare; ONNX == torch), and variants are timed
interleaved.

    python benchmarks/latency.py                 # the CPU suite (+ CUDA where present)
    python benchmarks/latency.py --smoke --out /tmp/b   # seconds: tiny models, batch 1 and 2, 3 repeats

Writes benchmarks/results/<device>/latency_<settings>.{json,md} and PNG plots
(latency vs sparsity, speed-up vs batch).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import bench  # noqa: E402

from compactor import timing  # noqa: E402

SCENARIOS = {"lenet": ["seeds-50"], "resnet50": ["bottleneck-inner-50", "all-50"], "vit": ["mlp-50"]}
SWEEP_KIND = {"lenet": "seeds", "resnet50": "bottleneck-inner", "vit": "mlp"}
BIG = ("resnet50", "vit")
#: what latency.py times by default (torch-cuda-compile too with --compile)
DEFAULT_BACKENDS = ("torch-cpu-1t", "torch-cpu", "ort-cpu-1t", "ort-cpu", "torch-cuda", "ort-cuda")


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=common.words, default=["lenet", "resnet50", "vit"], help="comma list (default: lenet,resnet50,vit)")
    p.add_argument("--scenarios", type=common.words, default=None,
                   help="comma list of model:scenario (default: lenet:seeds-50,resnet50:bottleneck-inner-50,resnet50:all-50,vit:mlp-50)")
    p.add_argument("--backends", type=common.words, default=None, help="comma list (default: every available one; torch-cuda-compile only with --compile)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile on CUDA")
    p.add_argument("--batches", type=common.ints, default=[1, 8, 64, 256], help="LeNet batch sweep (default: 1,8,64,256)")
    p.add_argument("--big-batches", type=common.ints, default=[1, 8], help="ResNet-50 / ViT batches (default: 1,8)")
    p.add_argument("--repeats", type=int, default=30, help="timed repeats per variant, LeNet (default: 30)")
    p.add_argument("--big-repeats", type=int, default=5, help="timed repeats per variant, ResNet-50 / ViT (default: 5)")
    p.add_argument("--sparsities", type=common.floats, default=[round(0.1 * i, 1) for i in range(1, 10)],
                   help="LeNet sparsity sweep (default: 0.1..0.9); empty to skip")
    p.add_argument("--big-sparsities", type=common.floats, default=[0.25, 0.5, 0.75],
                   help="ResNet-50 bottleneck-inner sparsity sweep, batch 1, torch 1 thread (default: 0.25,0.5,0.75); empty to skip")
    p.add_argument("--sweep-batches", type=common.ints, default=[1, 256], help="LeNet sweep batches (default: 1,256)")
    p.add_argument("--sweep-backends", type=common.words, default=["torch-cpu-1t", "ort-cpu-1t", "torch-cuda"],
                   help="sweep backends, where available (default: torch-cpu-1t,ort-cpu-1t,torch-cuda)")
    p.add_argument("--variants", type=common.words, default=list(bench.VARIANTS),
                   help=f"comma list (default: {','.join(bench.VARIANTS)}); dense and masked are always timed")
    p.add_argument("--big-variants", type=common.words, default=None, help="variants for ResNet-50 / ViT (default: --variants)")
    p.add_argument("--vit-depth", type=int, default=4, help="ViT blocks (dim 384, 6 heads; default: 4)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results; a temp dir with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: lenet + small resnet50, batch 1 and 2, 3 repeats")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    bad = [v for v in args.variants + (args.big_variants or []) if v not in bench.VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {', '.join(bad)}; valid: {', '.join(bench.VARIANTS)}")
    if args.smoke:
        args.models = [m for m in args.models if m in ("lenet", "resnet50")] or ["lenet"]
        args.batches = args.big_batches = args.sweep_batches = [1, 2]
        args.repeats = args.big_repeats = 3
        args.sparsities = [0.3, 0.7]
        args.big_sparsities = []
        args.big_variants = ["dense", "masked", "native", "compact", "compact-layers"]
        args.out = common.smoke_base(args.out)
        if args.backends is None:
            args.backends = [b for b in ("torch-cpu-1t", "ort-cpu-1t") if b in bench.available_backends()]
        args.sweep_backends = ["torch-cpu-1t"]
    return args


def _scenarios(args: argparse.Namespace) -> list[tuple[str, str]]:
    if args.scenarios:
        pairs = [tuple(s.split(":", 1)) for s in args.scenarios]
        bad = [s for s in args.scenarios if ":" not in s]
        if bad:
            raise SystemExit(f"latency.py: --scenarios wants model:scenario, got {', '.join(bad)}")
        return [(m, s) for m, s in pairs if m in args.models]
    out = []
    for m in args.models:
        for s in SCENARIOS[m]:
            if args.smoke and m == "resnet50" and s != "all-50":
                continue
            out.append((m, s))
    return out


def run(args: argparse.Namespace, after_case: Optional[Callable[[bench.Prepared], None]] = None) -> dict:
    """Time every case; ``after_case(prep)`` is called while each main case's variants are still built."""
    t0 = time.perf_counter()
    # Untimed work (compact(), exports, checks) on 1 thread: on a busy machine OpenMP's barriers between
    # many small convs cost far more than they save. Timed backends set their own thread counts.
    with timing.torch_threads(1):
        return _run(args, after_case, t0)


def _run(args: argparse.Namespace, after_case: Optional[Callable[[bench.Prepared], None]], t0: float) -> dict:
    available = bench.available_backends()
    wanted = args.backends or [b for b in available
                               if b in DEFAULT_BACKENDS or (b == "torch-cuda-compile" and args.compile)]
    backends = [b for b in wanted if b in available]
    skipped = [b for b in wanted if b not in available]
    if skipped:
        print(f"latency.py: skipping backends not available here: {', '.join(skipped)}", file=sys.stderr)
    progress = None if args.quiet else bench.progress_bar
    rows: list[dict] = []
    cases: dict[str, dict] = {}
    for model, scenario in _scenarios(args):
        big = model in BIG
        variants = (args.big_variants or args.variants) if big else args.variants
        prep = bench.prepare(model, scenario, small=args.smoke, variants=variants, vit_depth=args.vit_depth,
                             progress=progress)
        for backend in backends:
            for batch in (args.big_batches if big else args.batches):
                rows += bench.time_case(prep, backend, batch, repeats=args.big_repeats if big else args.repeats,
                                        progress=progress)
        if after_case is not None:
            after_case(prep)
        cases[f"{model}:{scenario}"] = _case_info(prep)
        del prep

    sweep_rows: list[dict] = []
    sweep_variants = ["dense", "masked", "compact"] if args.smoke else args.variants
    sweeps = [(m, args.sparsities, args.sweep_batches, sweep_variants, args.repeats) for m in args.models if m == "lenet"]
    sweeps += [(m, args.big_sparsities, [1], ["dense", "masked", "compact"], args.big_repeats)
               for m in args.models if m == "resnet50"]
    for model, sparsities, batches, variants, repeats in sweeps:
        sweep_backends = [b for b in args.sweep_backends if b in backends]
        if model in BIG:
            sweep_backends = sweep_backends[:1]
        for s in sparsities:
            scenario = f"{SWEEP_KIND[model]}-{int(round(s * 100))}"
            prep = bench.prepare(model, scenario, small=args.smoke, variants=variants, progress=progress)
            for backend in sweep_backends:
                for batch in batches:
                    sweep_rows += bench.time_case(prep, backend, batch, repeats=repeats, progress=progress)
            cases.setdefault(f"{model}:{scenario}", _case_info(prep))
            del prep
    return {"rows": rows, "sweep_rows": sweep_rows, "cases": cases, "backends": backends,
            "elapsed_s": time.perf_counter() - t0}


def _case_info(prep: bench.Prepared) -> dict:
    info = {"source": prep.source, "input_shape": prep.input_shape, "small": prep.small, "exporter": prep.exporter,
            "compact_s": prep.compact_s, "onnx_export_s": prep.onnx_s, "macs": prep.macs, "params": prep.params,
            "reports": {}}
    for v, r in prep.reports.items():
        info["reports"][v] = {"params_before": r.params_before, "params_after": r.params_after,
                              "macs_before": r.macs_before, "macs_after": r.macs_after,
                              "max_abs_diff": r.max_abs_diff, "tolerance": r.tolerance,
                              "verified_inputs": r.verified_inputs}
    return info


def settings_of(args: argparse.Namespace) -> dict:
    return {"models": ",".join(args.models), "batches": "-".join(map(str, args.batches)),
            "big_batches": "-".join(map(str, args.big_batches)), "repeats": args.repeats,
            "big_repeats": args.big_repeats, "sparsities": ",".join(map(str, args.sparsities)),
            "big_sparsities": ",".join(map(str, args.big_sparsities)), "vit_depth": args.vit_depth,
            "backends": ",".join(args.backends or ["available"]), "variants": ",".join(args.variants),
            "big_variants": ",".join(args.big_variants or args.variants), "smoke": args.smoke}


def write(args: argparse.Namespace, result: dict) -> list[str]:
    machine = common.machine_info()
    settings = settings_of(args)
    name = common.tag("latency", "smoke" if args.smoke else None, "-".join(args.models),
                      "b" + "-".join(map(str, args.batches)), "B" + "-".join(map(str, args.big_batches)),
                      f"r{args.repeats}-{args.big_repeats}")
    files = []
    for cuda in (False, True):
        rows = [r for r in result["rows"] if ("cuda" in r["backend"]) == cuda]
        sweep = [r for r in result["sweep_rows"] if ("cuda" in r["backend"]) == cuda]
        if not rows and not sweep:
            continue
        device = common.device_slug(cuda)
        folder = common.out_dir(args.out, device)
        for r in rows + sweep:
            r["device"] = device
        doc = {"kind": "latency", "machine": machine, "settings": settings, "device": device,
               "elapsed_s": result["elapsed_s"], "cases": result["cases"], "rows": rows, "sweep_rows": sweep,
               "targets": common.evaluate_targets(rows)}
        files.append(common.write_json(os.path.join(folder, name + ".json"), doc))
        md = [common.header(f"Latency: compact vs masked vs dense ({device})", machine, settings)]
        md.append("## Targets\n")
        md.append(common.targets_markdown(doc["targets"]))
        native = common.native_markdown(rows)
        if native:
            md.append("## Compact vs native (the same architecture designed at the compact widths)\n")
            md.append(native)
        md.append("## Cases\n")
        md.append(common.latency_markdown(rows))
        if sweep:
            md.append("## Sparsity sweep\n")
            md.append(common.latency_markdown(sweep))
        plots = _plots(rows, sweep, folder, name)
        files += plots
        if plots:
            md.append("## Plots\n")
            md += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
        files.append(common.write_text(os.path.join(folder, name + ".md"), "\n".join(md) + "\n"))
    return files


def _plots(rows: list[dict], sweep: list[dict], folder: str, name: str) -> list[str]:
    out = []
    for (model, backend, batch), rs in _by(sweep, ("model", "backend", "batch")).items():
        p = common.plot_latency_vs_sparsity(
            rs, os.path.join(folder, common.tag(name.replace("latency", "latency-vs-sparsity"), model, backend, f"b{batch}") + ".png"),
            f"{model} ({SWEEP_KIND.get(model, '')} pruning), {backend}, batch {batch}: latency vs sparsity")
        if p:
            out.append(p)
    for (model, scenario), rs in _by(rows, ("model", "scenario")).items():
        if len({r["batch"] for r in rs}) < 2:
            continue
        p = common.plot_speedup_vs_batch(
            rs, os.path.join(folder, common.tag(name.replace("latency", "speedup-vs-batch"), model, scenario) + ".png"),
            f"{model} {scenario}: speed-up of compact over masked vs batch")
        if p:
            out.append(p)
    return out


def _by(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return common.script_main(argv, parse, run, write)


if __name__ == "__main__":
    main()
