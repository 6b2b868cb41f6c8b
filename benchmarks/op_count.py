"""What one forward pass launches: dense / native / compact (exact) / compact-drop, op by op.

Eager PyTorch on a GPU runs about one kernel per ATen op that computes something, and at
batch <= 64 its time follows that count more than the MACs (it is launch-bound). Exact
mode's border correction must not add ops a model designed at the compact widths
(``native``) does not have. This counts, in one forward under ``torch.no_grad`` at batch 1:

- ``ops``: ATen ops dispatched, views and allocations excluded (each is a kernel launch on a GPU);
- ``passes``: the elementwise ops among them (add, mul, relu, batch norm, ...: each reads
  and writes a whole activation);
- ``MB written``: the bytes those ops and the convolutions write.

It runs on the CPU and takes the GPU code paths where compactor's layers choose by device
(``compactor.layers._one_launch_preferred`` forced to True), so the counts are those a GPU
would launch. The counts do not depend on the machine's load. One timing sits beside them:
``host us``: the same architecture at 1/16 width (the zoo's small ResNet-50) on an 8x8
input, one thread, GPU code paths, interleaved medians. There the arithmetic is negligible and
what remains is the per-layer Python and dispatch cost: the part of an eager GPU forward the
host pays before each launch, which bounds eager PyTorch at small batch.

    python benchmarks/op_count.py                    # ResNet-50 bottleneck-inner-50 and all-50
    python benchmarks/op_count.py --smoke            # the zoo's small ResNet-50: seconds

Writes benchmarks/results/<device>/op_count_<settings>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Iterator, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bytes_moved  # noqa: E402
import common  # noqa: E402

import torch  # noqa: E402

from compactor import bench, layers, timing  # noqa: E402

VARIANTS = ("dense", "native", "compact", "compact-layers", "compact-drop")
_ALLOCATIONS = {"empty", "empty_like", "empty_strided"}  # no kernel (the CPU batch norm allocates its statistics)


@contextlib.contextmanager
def gpu_code_paths() -> Iterator[None]:
    """Inside: compactor's layers take the paths they take on a GPU (where they choose by device)."""
    saved = layers._one_launch_preferred
    layers._one_launch_preferred = lambda x: True
    try:
        yield
    finally:
        layers._one_launch_preferred = saved


def count(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """The ops one forward of ``model`` dispatches (GPU code paths), by name, and the bytes they write."""
    with gpu_code_paths(), torch.no_grad():
        model(x)  # build the per-size caches first: they are made once, not per call
        with bytes_moved.Counter(set()) as c:
            model(x)
    names = {k: n for k, n in c.names.items() if k not in _ALLOCATIONS}
    ops = sum(names.values())
    compute = sum(n for k, n in names.items() if k in bytes_moved.COMPUTE)
    return {"ops": ops, "compute_ops": compute, "passes": ops - compute, "macs": c.macs,
            "mb_written": c.written / 2 ** 20, "by_op": dict(sorted(names.items()))}


def host_us(models: dict, shape: tuple, repeats: int) -> dict:
    """Per-forward host cost in microseconds on an 8x8 input (see the module docstring)."""
    x = bench.make_inputs((shape[0], 8, 8), 1)
    with gpu_code_paths(), torch.no_grad(), timing.torch_threads(1):
        t = timing.measure({v: (lambda m=m: m(x)) for v, m in models.items()}, repeats=repeats)
    return {v: r.median * 1e6 for v, r in t.items()}


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", type=common.words, default=["resnet50:bottleneck-inner-50", "resnet50:all-50"],
                   help="comma list of model:scenario (default: resnet50:bottleneck-inner-50,resnet50:all-50)")
    p.add_argument("--out", default=None, help="results base folder (default: benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="the small models, written to a temporary folder")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    rows = []
    for item in args.scenarios:
        model_name, scenario = item.split(":", 1)
        prep = bench.prepare(model_name, scenario, small=args.smoke, variants=list(VARIANTS[1:]))
        x = bench.make_inputs(prep.input_shape, 1)
        tiny = prep if args.smoke else bench.prepare(model_name, scenario, small=True, variants=list(VARIANTS[1:]))
        host = host_us({v: tiny.variants[v] for v in VARIANTS}, tiny.input_shape, 5 if args.smoke else 41)
        for v in VARIANTS:
            rows.append({"model": model_name, "scenario": scenario, "variant": v,
                         "source": prep.source if v != "native" else prep.native_source,
                         **count(prep.variants[v], x), "host_us": host[v]})
    return {"rows": rows}


def write(args: argparse.Namespace, result: dict) -> list[str]:
    machine = timing.machine_info()
    folder = common.out_dir(common.smoke_base(args.out) if args.smoke else args.out, common.device_slug(False))
    name = common.tag("op_count", "smoke" if args.smoke else "", *(s.replace(":", "-") for s in args.scenarios))
    rows = result["rows"]
    native = {(r["model"], r["scenario"]): r for r in rows if r["variant"] == "native"}

    def vs_native(r: dict, key: str) -> str:
        n = native[(r["model"], r["scenario"])][key]
        d = r[key] - n
        return f"{d:+.1f}" if isinstance(d, float) else f"{d:+d}"

    table = common.table(rows, [
        ("model", lambda r: f"{r['model']} {r['scenario']}"),
        ("variant", lambda r: r["variant"]),
        ("ops (GPU launches)", lambda r: str(r["ops"])),
        ("vs native", lambda r: vs_native(r, "ops")),
        ("conv / matmul", lambda r: str(r["compute_ops"])),
        ("elementwise passes", lambda r: str(r["passes"])),
        ("MB written (batch 1)", lambda r: f"{r['mb_written']:.1f}"),
        ("vs native", lambda r: vs_native(r, "mb_written")),
        ("host us (1/16 width, 8x8)", lambda r: f"{r['host_us']:.0f}"),
        ("x native", lambda r: f"{native[(r['model'], r['scenario'])]['host_us'] / r['host_us']:.2f}"),
    ])
    by_op = ["", "## Ops by name", ""]
    for r in rows:
        by_op.append(f"- {r['model']} {r['scenario']} {r['variant']}: "
                     + ", ".join(f"{k} {n}" for k, n in r["by_op"].items()))
    md = [common.header(f"Ops per forward: dense / native / compact / compact-drop ({common.device_slug(False)})",
                        machine, vars(args)), "", table, *by_op]
    return common.write_results(folder, name, {"machine": machine, "settings": vars(args), "rows": rows}, md)["files"]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse(argv)
    result = run(args)
    result["files"] = write(args, result)
    return result


if __name__ == "__main__":
    main()
