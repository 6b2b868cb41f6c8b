"""Which GPU runtime makes the compact model fast, measured against the same architecture designed at its widths?

Cases: ResNet-50 bottleneck-inner-50 and all-50, the ViT MLP at 50 %, the seeds' LeNet. Variants: dense,
masked, native (the architecture designed at the compact widths: torchvision's resnet50(width_per_group=32)
for bottleneck-inner-50), compact (exact), compact-drop, and compact-round8 on all-50. Runtimes: torch eager
fp32 (TF32 convs, PyTorch's default), eager fp16 and bf16 channels_last, a CUDA graph (fp16 channels_last) and
torch.compile(mode="reduce-overhead") with inductor freezing (fp16 channels_last); batch 64 and 256. Each
compact variant is checked against masked in fp32 on the GPU and again in the runtime itself before it is
timed; native's parameter shapes against compact's; variants are timed interleaved (medians, IQR).

One prepared run for a lent GPU (`bash benchmarks/gpu.sh`): cells run in priority order (ResNet-50
bottleneck-inner-50 first with every runtime, torch.compile included; then the other cases, their
torch.compile cells last) and none starts once --budget-s would be passed, so the run ends in time; JSON +
markdown are rewritten after every cell, naming what was skipped. A cell that fails is recorded with its
error and the run goes on.

    python benchmarks/gpu_runtimes.py                          # a CUDA machine: ~7 minutes on an H200
    python benchmarks/gpu_runtimes.py --device cpu --smoke     # the same code path on the CPU, in seconds

With --device cpu the CUDA runtimes run their code path on the CPU (their dtype and memory format; no graph
capture; torch.compile with the eager backend): a dry run for tests, not a measurement.
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

import torch  # noqa: E402

from compactor import timing  # noqa: E402
from compactor.tensors import first_line  # noqa: E402

VARIANTS = ["dense", "masked", "native", "compact", "compact-layers", "compact-drop"]
CASES = {  # model:scenario -> variants, in priority order
    "resnet50:bottleneck-inner-50": VARIANTS,
    "resnet50:all-50": VARIANTS + ["compact-round8"],
    "vit:mlp-50": VARIANTS,
    "lenet:seeds-50": VARIANTS,
}
#: priority order; torch-cuda-compile runs after every other runtime of every case
RUNTIMES = ["torch-cuda-fp16", "torch-cuda-graph", "torch-cuda", "torch-cuda-bf16", "torch-cuda-compile"]
#: first guesses of a cell's seconds on an H200, replaced by what the run measures
GUESS_S = {"compile": 45.0, "other": 8.0}


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default), or cpu for a dry run of the same code path")
    p.add_argument("--cases", type=common.words, default=list(CASES),
                   help=f"comma list of model:scenario (default: {','.join(CASES)})")
    p.add_argument("--runtimes", type=common.words, default=list(RUNTIMES),
                   help=f"comma list, in priority order (default: {','.join(RUNTIMES)})")
    p.add_argument("--batches", type=common.ints, default=[64, 256], help="(default: 64,256)")
    p.add_argument("--compile-batches", type=common.ints, default=[256],
                   help="batches for torch-cuda-compile, one compilation per variant each (default: 256)")
    p.add_argument("--compile-variants", type=common.words, default=["dense", "native", "compact", "compact-drop"],
                   help="variants torch.compile compiles (default: dense,native,compact,compact-drop; masked with "
                        "freezing folds its masks into the weights, i.e. it becomes dense)")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per variant (default: 10)")
    p.add_argument("--budget-s", type=float, default=400.0,
                   help="start no cell that would end after this many seconds (default: 400)")
    p.add_argument("--vit-depth", type=int, default=4, help="ViT blocks (dim 384, 6 heads; default: 4)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results; a temp dir with --smoke)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny models (LeNet and the small ResNet-50 / ViT), batch 2, 2 repeats; compile on LeNet only")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    bad = [r for r in args.runtimes if r not in RUNTIMES]
    if bad:
        p.error(f"unknown runtime(s) {', '.join(bad)}; valid: {', '.join(RUNTIMES)}")
    bad = [c for c in args.cases if c not in CASES]
    if bad:
        p.error(f"unknown case(s) {', '.join(bad)}; valid: {', '.join(CASES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here; run with --device cpu for a dry run of the same code path")
    if args.smoke:
        args.batches = args.compile_batches = [2]
        args.repeats = 2
        args.compile_cases = ["lenet:seeds-50"]
        args.out = common.smoke_base(args.out)
    else:
        args.compile_cases = args.cases
    return args


def plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """The cells, (case, runtime, batch), in the order they run: the first case with every runtime
    (torch.compile last), then the other cases without torch.compile, then their torch.compile cells."""
    def cells(case: str, compiled: bool) -> list[tuple[str, str, int]]:
        if compiled:
            if "torch-cuda-compile" not in args.runtimes or case not in args.compile_cases:
                return []
            return [(case, "torch-cuda-compile", b) for b in args.compile_batches]
        return [(case, rt, b) for rt in args.runtimes if rt != "torch-cuda-compile" for b in args.batches]

    first, rest = args.cases[:1], args.cases[1:]
    out = [c for case in first for c in cells(case, False) + cells(case, True)]
    out += [c for case in rest for c in cells(case, False)]
    return out + [c for case in rest for c in cells(case, True)]


def run(args: argparse.Namespace, after_cell: Optional[Callable[[dict], None]] = None) -> dict:
    """Run the cells of :func:`plan` within the budget; ``after_cell(result so far)`` after each one."""
    t0 = time.perf_counter()
    progress = None if args.quiet else bench.progress_bar
    preps: dict[str, bench.Prepared] = {}
    result: dict = {"rows": [], "cells": [], "skipped": [], "errors": [], "cases": {}, "elapsed_s": 0.0}
    seconds = dict(GUESS_S)
    # Untimed work (compact(), checks) on one thread for a CPU dry run; the timed runs set their own.
    with timing.torch_threads(1 if args.device == "cpu" else torch.get_num_threads()):
        for case, runtime, batch in plan(args):
            kind = "compile" if runtime == "torch-cuda-compile" else "other"
            # torch.compile: one compilation per variant; masked stays the (eager) reference of the checks
            variants = [v for v in CASES[case] if kind != "compile" or v in args.compile_variants]
            guess = seconds[kind] * (len(variants) if kind == "compile" else 1)
            elapsed = time.perf_counter() - t0
            if elapsed + guess > args.budget_s:
                result["skipped"].append({"case": case, "runtime": runtime, "batch": batch, "why": (
                    f"budget: {elapsed:.0f} s spent, ~{guess:.0f} s more would pass {args.budget_s:.0f} s")})
                continue
            model, scenario = case.split(":")
            c0 = time.perf_counter()
            try:
                if case not in preps:
                    preps[case] = bench.prepare(model, scenario, small=args.smoke, variants=CASES[case],
                                                vit_depth=args.vit_depth, progress=progress)
                    p = preps[case]
                    result["cases"][case] = {
                        "source": p.source, "native": p.native_source, "native_checked": p.native_checked,
                        "params": p.params, "macs": p.macs, "compact_s": p.compact_s, "input_shape": p.input_shape}
                result["rows"] += bench.time_case(preps[case], runtime, batch, repeats=args.repeats,
                                                  variants=variants, progress=progress, device=args.device)
            except Exception as exc:  # record it and go on: one failing cell must not cost the whole run
                result["errors"].append({"case": case, "runtime": runtime, "batch": batch,
                                         "error": f"{type(exc).__name__}: {first_line(exc)}"})
                print(f"gpu_runtimes.py: {case} {runtime} b{batch} failed: {result['errors'][-1]['error']}",
                      file=sys.stderr)
            cell_s = time.perf_counter() - c0
            result["cells"].append({"case": case, "runtime": runtime, "batch": batch, "seconds": cell_s})
            per = cell_s / (len(variants) if kind == "compile" else 1)
            seconds[kind] = max(per, 0.5 * seconds[kind])  # the first cell also paid for building the case
            result["elapsed_s"] = time.perf_counter() - t0
            if after_cell is not None:
                after_cell(result)
    result["elapsed_s"] = time.perf_counter() - t0
    return result


def settings_of(args: argparse.Namespace) -> dict:
    return {"device": args.device, "cases": ",".join(args.cases), "runtimes": ",".join(args.runtimes),
            "batches": "-".join(map(str, args.batches)), "compile_batches": "-".join(map(str, args.compile_batches)),
            "compile_variants": ",".join(args.compile_variants), "repeats": args.repeats, "budget_s": args.budget_s,
            "vit_depth": args.vit_depth, "smoke": args.smoke}


def write(args: argparse.Namespace, result: dict) -> list[str]:
    machine = common.machine_info()
    settings = settings_of(args)
    cuda = args.device == "cuda"
    device = common.device_slug(cuda)
    folder = common.out_dir(args.out, device)
    name = common.tag("gpu_runtimes", "smoke" if args.smoke else None, None if cuda else "dry-run-on-cpu",
                      "b" + "-".join(map(str, args.batches)), f"r{args.repeats}")
    for r in result["rows"]:
        r["device"] = device
    doc = {"kind": "gpu_runtimes", "machine": machine, "settings": settings, "device": device,
           **{k: v for k, v in result.items() if k != "files"}}
    files = [common.write_json(os.path.join(folder, name + ".json"), doc)]
    title = "GPU runtimes: compact (exact / drop) vs native vs dense" + ("" if cuda else " - DRY RUN ON CPU")
    md = [common.header(f"{title} ({device})", machine, settings)]
    md.append(f"{len(result['cells'])} cells in {result['elapsed_s']:.0f} s; x native = native latency / variant "
              "latency (above 1: faster than the model designed at those widths).\n")
    md.append("## Compact vs native (the same architecture designed at the compact widths)\n")
    md.append(common.native_markdown(result["rows"]) or "(no cell with both native and compact)\n")
    if result["skipped"] or result["errors"]:
        md.append("## Not measured\n")
        md += [f"- {s['case']} {s['runtime']} batch {s['batch']}: skipped ({s['why']})" for s in result["skipped"]]
        md += [f"- {e['case']} {e['runtime']} batch {e['batch']}: **failed**: {e['error']}" for e in result["errors"]]
        md.append("")
    md.append("## Every cell\n")
    md.append(common.latency_markdown(result["rows"]))
    files.append(common.write_text(os.path.join(folder, name + ".md"), "\n".join(md) + "\n"))
    return files


def main(argv: Optional[Sequence[str]] = None) -> dict:
    # written after every cell too: a run stopped from outside (a timeout) keeps what it measured
    return common.script_main(argv, parse, lambda args: run(args, after_cell=lambda part: write(args, part)), write)


if __name__ == "__main__":
    main()
