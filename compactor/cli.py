"""The command line: thin, parses arguments, calls the library, prints.

User errors print one line and exit 2; a bug (e.g. a ``VerificationError``: the compact
model differs from the masked one) prints its traceback and exits 1. Output files are
checked before any work starts (an existing file needs ``--force``), written to
temporary files next to their targets, and renamed into place only when every
step succeeded: a failed command leaves nothing behind.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import traceback
from typing import Any, Callable, NoReturn, Optional, Sequence

from .errors import CompactionError, MaskLoadError, VerificationError
from .tensors import first_line

__all__ = ["main", "build_parser"]


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2) like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- argument helpers


def _model_factory(spec: str) -> Callable[[], Any]:
    """``module:callable`` -> a zero-argument factory; the current folder is importable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name.strip() or not attr.strip() or ":" in attr:
        raise UserError(f"--model {spec!r} should be module:callable, e.g. --model mypkg.nets:LeNet")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.split(".")[0] == exc.name.split(".")[0]:
            raise UserError(
                f"--model: no module named '{exc.name}' in {cwd} or on PYTHONPATH; run compactor from the folder "
                f"that holds {module_name.split('.')[0]}, or add that folder to PYTHONPATH"
            ) from None
        missing = (exc.name or "").split(".")[0]
        raise UserError(f"--model: importing '{module_name}' failed: {first_line(exc)}; install it "
                        f"(pip install {missing or 'the missing package'}) in this environment") from None
    except Exception as exc:
        raise UserError(f"--model: importing '{module_name}' raised {type(exc).__name__}: {first_line(exc)}; "
                        "fix that module") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            from torch import nn

            found = [n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module)
                     and v.__module__ == module.__name__]
            hint = f" (it defines {', '.join(found[:5])})" if found else ""
            raise UserError(f"--model: module '{module_name}' has no '{attr}'{hint}; name the class or function "
                            f"that builds your model, e.g. --model {module_name}:{found[0] if found else 'Net'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"--model: '{spec}' is a {type(obj).__name__}, not a class or function; name the class "
                        "or zero-argument function that builds your model")

    def factory() -> Any:
        from torch import nn

        try:
            model = obj()
        except Exception as exc:
            raise UserError(f"--model: calling {spec}() raised {type(exc).__name__}: {first_line(exc)}; --model "
                            "must name a class or function that builds the model with no arguments") from None
        if not isinstance(model, nn.Module):
            raise UserError(f"--model: {spec}() returned a {type(model).__name__}, not a torch.nn.Module")
        return model

    return factory


def _input_shape(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"--input-shape {text!r} should be positive integers separated by commas, batch first, "
                        "e.g. --input-shape 1,1,28,28")
    return tuple(int(p) for p in parts)


def _example(args: argparse.Namespace) -> Any:
    import torch

    from .tensors import random_like

    # A zeros template: random_like draws N(0, 1) floats, and 0 / 1 integers (0 widened to include 1).
    template = torch.zeros(_input_shape(args.input_shape), dtype=getattr(torch, args.input_dtype))
    return random_like((template,), seed=0)[0]


def _size(path: str) -> str:
    n = os.path.getsize(path)
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


class _Outputs:
    """Stage output files as temporaries next to their targets; rename them all only at the end."""

    def __init__(self, force: bool) -> None:
        self.force = force
        self.pending: list[tuple[str, str]] = []

    def check(self, flag: str, path: Optional[str], inputs: Sequence[str] = ()) -> None:
        """Refuse up front: an existing file without --force, a folder, a missing folder, an input file."""
        if path is None:
            return
        if os.path.isdir(path):
            raise UserError(f"{flag} {path} is a folder; give a file name")
        if os.path.exists(path) and not self.force:
            raise UserError(f"{flag} {path} exists; pass --force to overwrite it, or choose another name")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UserError(f"{flag} {path}: folder {folder} does not exist; create it first")
        for other in inputs:
            if other and os.path.abspath(other) == os.path.abspath(path):
                raise UserError(f"{flag} {path} is also an input; write the output to another file")

    def temp(self, final: str) -> str:
        folder = os.path.dirname(os.path.abspath(final))
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(final) + ".", suffix=".tmp", dir=folder)
        os.close(fd)
        self.pending.append((tmp, final))
        return tmp

    def __enter__(self) -> "_Outputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                for tmp, final in self.pending:
                    if os.path.exists(final) and not self.force:
                        raise UserError(f"{final} appeared while compactor was running; pass --force to overwrite it")
                for tmp, final in self.pending:
                    os.replace(tmp, final)
        finally:
            for tmp, _ in self.pending:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self.pending.clear()


def _load_pruned(factory: Callable[[], Any], weights: str):
    from . import masks

    try:
        return masks.load_pruned(factory, weights)
    except MaskLoadError:
        if _is_compactor_file(weights):
            raise UserError(f"--weights {weights} is a compact model written by compactor.save, not pruned weights; "
                            "convert it with `compactor export`, or pass the pruned state_dict") from None
        raise


def _is_compactor_file(path: str) -> bool:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(obj, dict) and str(obj.get("format", "")).startswith("compactor/")


# --------------------------------------------------------------------------- commands


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    demo.run(args.out, amount=args.amount, epochs=args.epochs, force=args.force)
    return 0


def _words(text: Optional[str]) -> list[str]:
    return [w.strip() for w in (text or "").split(",") if w.strip()]


def _batches(text: Optional[str]) -> list[int]:
    words = _words(text)
    if not all(w.isdigit() and int(w) > 0 for w in words):
        raise UserError(f"--batch {text!r} should be positive integers separated by commas, e.g. --batch 1,8")
    return list(dict.fromkeys(int(w) for w in words))


def _backends(text: Optional[str], default: Sequence[str]) -> list[str]:
    from . import bench

    names = _words(text) or list(default)
    available = bench.available_backends()
    for name in names:
        if name not in bench.BACKENDS:
            raise UserError(f"--backends: {name!r} is not a backend; choose from {', '.join(bench.BACKENDS)}")
        if name not in available:
            raise UserError(f"--backends: {name} is not available on this machine; available here: "
                            f"{', '.join(available)}")
    return list(dict.fromkeys(names))


def _bench(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats} should be a positive integer")
    outputs = _Outputs(args.force)
    outputs.check("--json", args.json, [args.weights] if args.weights else [])
    if args.model and ":" in args.model:
        doc = _bench_user_model(args)
    else:
        doc = _bench_builtin(args)
    if args.json:
        import json

        with outputs:
            with open(outputs.temp(args.json), "w") as f:
                json.dump(doc, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0


def _bench_builtin(args: argparse.Namespace) -> dict:
    from . import bench, timing

    model = args.model or "lenet"
    if model not in bench.MODELS:
        raise UserError(f"--model {model!r} is neither a built-in case ({', '.join(bench.MODELS)}) nor module:callable "
                        "naming your model, e.g. --model mypkg.nets:LeNet")
    for flag, value in (("--weights", args.weights), ("--input-shape", args.input_shape), ("--round-to", args.round_to)):
        if value is not None:
            raise UserError(f"{flag} is for your own model (--model module:callable); the built-in case {model} "
                            "builds and prunes its own")
    rows: list[dict] = []
    for backend in _backends(args.backends, ["torch-cpu-1t"]):
        for batch in _batches(args.batch) or [1]:
            try:
                case = bench.run_case(model, args.scenario, backend, batch, args.repeats)
            except ValueError as exc:
                raise UserError(str(exc)) from None
            print(bench.case_table(case, args.repeats))
            rows += case
    return {"command": "compactor bench", "model": model, "scenario": rows[0]["scenario"], "repeats": args.repeats,
            "machine": timing.machine_info(), "rows": rows}


def _bench_user_model(args: argparse.Namespace) -> dict:
    from . import bench, masks, timing

    if args.weights is None or args.input_shape is None:
        raise UserError(f"--model {args.model} (your model) needs --weights FILE and --input-shape N,C,H,W, as for "
                        "compactor compact")
    if args.scenario is not None:
        raise UserError("--scenario is for the built-in cases (lenet, resnet50, vit); your model's masks come "
                        "from --weights")
    if args.round_to is not None and args.round_to < 1:
        raise UserError(f"--round-to {args.round_to} should be a positive integer")
    example = _example(args)
    batches = _batches(args.batch) or [example.shape[0]]
    backends = _backends(args.backends, bench.available_backends())
    factory = _model_factory(args.model)
    masked = _load_pruned(factory, args.weights)
    dense = masks.dense_from_masked(factory, masked)
    variants = ["compact", "compact-drop"] + ([f"compact-round{args.round_to}"] if args.round_to else [])
    try:
        prep = bench.prepare_models(dense, masked, example, model_name=args.model,
                                    scenario=os.path.basename(args.weights), variants=variants,
                                    source=f"{args.model} with {args.weights}", progress=bench.progress_bar)
        rows, skipped = bench.time_backends(prep, backends, batches, repeats=args.repeats)
    except AssertionError as exc:  # compact differs from masked on a backend: a bug, like a VerificationError
        raise VerificationError(str(exc)) from exc
    print(bench.summary(prep, rows, skipped, args.repeats))
    line = bench.verdict(rows)
    print(line)
    report = prep.reports["compact"]
    return {"command": "compactor bench", "model": args.model, "weights": args.weights,
            "input_shape": list(prep.input_shape), "input_dtype": str(prep.input_dtype).replace("torch.", ""),
            "batches": batches, "backends": backends, "repeats": args.repeats, "variants": list(prep.variants),
            "params": prep.params, "macs": prep.macs,
            "compact": {"params_before": report.params_before, "params_after": report.params_after,
                        "max_abs_diff": report.max_abs_diff, "tolerance": report.tolerance},
            "machine": timing.machine_info(), "skipped": skipped, "rows": rows,
            "verdict": {"backend": bench.fastest(rows), "line": line}}


def _compact(args: argparse.Namespace) -> int:
    from . import api
    from .export import export_onnx
    from .saving import save

    if args.round_to is not None and args.round_to < 1:
        raise UserError(f"--round-to {args.round_to} should be a positive integer")
    outputs = _Outputs(args.force)
    outputs.check("--out", args.out, [args.weights])
    outputs.check("--onnx", args.onnx, [args.weights])
    if args.onnx and os.path.abspath(args.onnx) == os.path.abspath(args.out):
        raise UserError("--out and --onnx name the same file; give them different names")
    example = _example(args)
    factory = _model_factory(args.model)
    masked = _load_pruned(factory, args.weights)
    small = api.compact(masked, example, mode=args.mode, round_to=args.round_to, border=args.border)
    with outputs:
        save(small, outputs.temp(args.out), force=True)
        onnx_report = None
        if args.onnx:
            onnx_report = export_onnx(small, example, outputs.temp(args.onnx), force=True,
                                      dynamic_batch=not args.no_dynamic_batch, opset=args.opset,
                                      exporter=args.exporter)
    print(small.compaction_report)
    print("")
    print(f"wrote {args.out} ({_size(args.out)}; load it with compactor.load({args.model.split(':')[1]}, {args.out!r}))")
    if onnx_report is not None:
        print(f"wrote {_onnx_line(onnx_report, args.onnx)}")
    return 0


def _onnx_line(report: Any, path: str) -> str:
    sizes = ", ".join(map(str, report.batch_sizes))
    return (f"{path} ({_size(path)}, opset {report.opset}, {report.exporter} exporter, "
            f"{'dynamic' if report.dynamic_batch else 'fixed'} batch; onnxruntime vs PyTorch max |diff| "
            f"{report.max_abs_diff:.2g} at batch sizes {sizes}, tolerance {report.tolerance:.2g})")


def _inspect(args: argparse.Namespace) -> int:
    from . import api

    if args.round_to is not None and args.round_to < 1:
        raise UserError(f"--round-to {args.round_to} should be a positive integer")
    if args.plot:  # before the work: a missing matplotlib or an existing file is said at once
        from .files import refuse_overwrite
        from .plot import _pyplot

        try:
            _pyplot()
        except ImportError as exc:
            raise UserError(f"--plot: {exc}") from None
        refuse_overwrite(args.plot, force=args.force)
    example = _example(args)
    masked = _load_pruned(_model_factory(args.model), args.weights)
    report = api.plan(masked, example, mode=args.mode, round_to=args.round_to, border=args.border)
    print(report)
    if args.plot:
        from .plot import widths_chart

        print(f"widths chart: {widths_chart(report, args.plot, force=args.force)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_onnx
    from .saving import load

    outputs = _Outputs(args.force)
    outputs.check("--onnx", args.onnx, [args.weights])
    example = _example(args)
    model = load(_model_factory(args.model), args.weights)
    with outputs:
        report = export_onnx(model, example, outputs.temp(args.onnx), force=True,
                             dynamic_batch=not args.no_dynamic_batch, opset=args.opset, exporter=args.exporter)
    print(f"wrote {_onnx_line(report, args.onnx)}")
    return 0


# --------------------------------------------------------------------------- parser

_MODEL_HELP = "the architecture: module:callable importable from the current folder or PYTHONPATH, e.g. mypkg.nets:LeNet"


def _prune_pretrained(args: argparse.Namespace) -> int:
    from .streaming import prune_pretrained

    report = prune_pretrained(args.src, args.dst, args.amount, heads=args.heads, importance=args.importance,
                              calibration=args.calibration, samples=args.samples, seq_len=args.seq_len,
                              uniform=not args.no_uniform, force=args.force, progress=not args.quiet)
    print(report)
    return 0


def _model_options(p: argparse.ArgumentParser, weights_help: str, *, required: bool = True,
                   model_help: str = _MODEL_HELP) -> None:
    p.add_argument("--model", required=required, metavar="MODULE:CALLABLE", help=model_help)
    p.add_argument("--weights", required=required, metavar="FILE", help=weights_help)
    p.add_argument("--input-shape", required=required, metavar="N,C,H,W",
                   help="shape of one example input, batch first, e.g. 1,1,28,28 (random values, seed 0)")
    p.add_argument("--input-dtype", default="float32", choices=("float32", "float64", "int64"),
                   help="dtype of the example input; int64 draws 0/1 token ids (default: %(default)s)")


def _plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="exact", choices=("exact", "drop"),
                   help="exact: fold the constants removed channels still emit; drop: discard them (default: %(default)s)")
    p.add_argument("--round-to", type=int, default=None, metavar="N",
                   help="keep extra masked channels so every width is a multiple of N")
    p.add_argument("--border", default="carrier", choices=("carrier", "layers"),
                   help="exact mode, zero-padded convs: carrier keeps one masked channel to carry the constants "
                        "(the compact model holds only your own layer classes); layers removes it and adds "
                        "compactor's border-corrected layers (default: %(default)s)")


def _onnx_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-dynamic-batch", action="store_true", help="fix the ONNX batch size to the example's")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset version (default: the exporter's)")
    p.add_argument("--exporter", default="auto", choices=("auto", "torchscript", "dynamo"),
                   help="torch.onnx exporter; auto: TorchScript tracer, dynamo if that fails (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="compactor",
        description="Turn models pruned with torch.nn.utils.prune into smaller, faster, exactly equivalent dense models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  compactor demo --out compactor-demo\n"
               "  compactor inspect --model mypkg.nets:LeNet --weights pruned_model.pth --input-shape 1,1,28,28\n"
               "  compactor compact --model mypkg.nets:LeNet --weights pruned_model.pth --input-shape 1,1,28,28 \\\n"
               "      --out lenet_small.pt --onnx lenet_small.onnx\n"
               "  compactor export --model mypkg.nets:LeNet --weights lenet_small.pt --input-shape 1,1,28,28 \\\n"
               "      --onnx lenet_small.onnx\n"
               "  compactor bench --model mypkg.nets:LeNet --weights pruned_model.pth --input-shape 1,1,28,28\n"
               "  compactor prune-pretrained llama-13b llama-13b-small --amount 0.5 --heads 0.25\n\n"
               "User errors print one line and exit with status 2.",
    )
    import torch

    from . import __version__

    parser.add_argument("--version", action="version",
                        version=f"compactor {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="train, prune, compact and time the tutorials' LeNet on bundled handwritten digits",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  compactor demo --out compactor-demo",
    )
    p.add_argument("--out", default="compactor-demo", help="folder for the artifacts (default: %(default)s)")
    p.add_argument("--amount", type=float, default=0.5, help="ln_structured amount per layer (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite existing artifacts")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "compact",
        help="compact your pruned model: write the small model (.pt) and optionally ONNX",
        description="Load pruned weights into your architecture, remove the masked channels, verify the result "
                    "against the masked model, and save it (compactor.save format; read back with compactor.load).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example (mypkg/nets.py defines LeNet; pruned_model.pth is torch.save(model.state_dict()) after\n"
               "torch.nn.utils.prune, with *_orig/*_mask keys, or weights baked by prune.remove):\n"
               "  compactor compact --model mypkg.nets:LeNet --weights pruned_model.pth --input-shape 1,1,28,28 \\\n"
               "      --out lenet_small.pt --onnx lenet_small.onnx\n"
               "Existing output files are kept unless --force; nothing is written if any step fails.",
    )
    _model_options(p, "state_dict of the pruned model (*_orig/*_mask keys, or baked weights)")
    p.add_argument("--out", required=True, metavar="FILE.pt", help="where to write the compact model")
    p.add_argument("--onnx", metavar="FILE.onnx", help="also export the compact model to ONNX, checked in onnxruntime")
    _plan_options(p)
    _onnx_options(p)
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(func=_compact)

    p = sub.add_parser(
        "inspect",
        help="show what compact would remove, per layer, and why (writes nothing)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n"
               "  compactor inspect --model mypkg.nets:LeNet --weights pruned_model.pth --input-shape 1,1,28,28",
    )
    _model_options(p, "state_dict of the pruned model (*_orig/*_mask keys, or baked weights)")
    _plan_options(p)
    p.add_argument("--plot", metavar="FILE.png", help="also draw each layer's width before and after (needs matplotlib)")
    p.add_argument("--force", action="store_true", help="overwrite the --plot file if it exists")
    p.set_defaults(func=_inspect)

    p = sub.add_parser(
        "export",
        help="export a compact model written by `compactor compact` / compactor.save to ONNX",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n"
               "  compactor export --model mypkg.nets:LeNet --weights lenet_small.pt --input-shape 1,1,28,28 \\\n"
               "      --onnx lenet_small.onnx\n"
               "Run the .onnx on a target without torch: export/run_onnx.py (pip install onnxruntime numpy).",
    )
    _model_options(p, "the compact model, written by compactor.save / `compactor compact --out`")
    p.add_argument("--onnx", required=True, metavar="FILE.onnx", help="where to write the ONNX file")
    _onnx_options(p)
    p.add_argument("--force", action="store_true", help="overwrite an existing ONNX file")
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "bench",
        help="time dense vs masked vs compact: your pruned model on every backend here, or a built-in case",
        description="Two forms, told apart by --model:\n"
                    "  your model (--model MODULE:CALLABLE --weights FILE --input-shape N,C,H,W, the same arguments\n"
                    "    as `compactor compact`): times dense (the weights before masking, *_orig), masked, compact\n"
                    "    (exact), compact-drop (mode='drop') and compact-round<N> (--round-to N) on every backend\n"
                    "    available here, each checked against the masked model before timing, interleaved; prints one\n"
                    "    table and a verdict naming the fastest runtime for the compact model;\n"
                    "  a built-in case (--model lenet|resnet50|vit [--scenario ...]): the benchmark suite's models\n"
                    "    (benchmarks/README.md), with 'native', the architecture designed at the compact widths.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  compactor bench --model mypkg.nets:LeNet --weights pruned_model.pth --input-shape 1,1,28,28 \\\n"
               "      --batch 1,8 --json bench.json\n"
               "  compactor bench --model mypkg.nets:LeNet --weights pruned_model.pth --input-shape 1,1,28,28 \\\n"
               "      --backends torch-cpu-1t,ort-cpu-1t --round-to 8\n"
               "  compactor bench                                   # built-in: the seeds' LeNet, torch CPU 1 thread, batch 1\n"
               "  compactor bench --model resnet50 --scenario bottleneck-inner-50 --backend ort-cpu-1t --batch 8\n"
               "Backends: torch-cpu-1t, torch-cpu, ort-cpu-1t, ort-cpu, torch-cuda, torch-cuda-fp16, torch-cuda-bf16,\n"
               "torch-cuda-graph, torch-cuda-compile, ort-cuda (those this machine has).\n"
               "The whole suite, with JSON / markdown / plots: python benchmarks/run_all.py",
    )
    _model_options(p, "your model: the pruned state_dict (*_orig/*_mask keys), as for compactor compact",
                   required=False,
                   model_help="your model as module:callable (with --weights and --input-shape), or a built-in case: "
                              "lenet, resnet50, vit (default: lenet)")
    p.add_argument("--round-to", type=int, default=None, metavar="N",
                   help="your model: also time compact(round_to=N) (widths kept at multiples of N)")
    p.add_argument("--scenario", default=None,
                   help="built-in case: seeds-<pct> (lenet), bottleneck-inner-<pct> or all-<pct> (resnet50), "
                        "mlp-<pct> (vit); default: the model's 50 %% case")
    p.add_argument("--backends", "--backend", dest="backends", default=None, metavar="LIST",
                   help="comma list (default: every backend available here for your model; torch-cpu-1t for a "
                        "built-in case)")
    p.add_argument("--batch", default=None, metavar="LIST",
                   help="batch sizes, comma list (default: the batch of --input-shape; 1 for a built-in case)")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per variant (default: %(default)s)")
    p.add_argument("--json", metavar="FILE.json", help="also write every row, the checks and the verdict as JSON")
    p.add_argument("--force", action="store_true", help="overwrite the --json file if it exists")
    p.set_defaults(func=_bench)

    p = sub.add_parser(
        "prune-pretrained",
        help="prune and compact a Hugging Face checkpoint folder one decoder block at a time (bigger than memory)",
        description="Read SRC (config.json + safetensors shards) one decoder block at a time, remove --amount of "
                    "each block's MLP neurons and --heads of its key/value heads, check every compact block against "
                    "the masked block on calibration hidden states, and write DST, which vanilla from_pretrained "
                    "loads. Memory: about one float32 copy of one block plus 1.5 GB. Runs: "
                    "llama, mistral, qwen2, phi3.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n"
               "  compactor prune-pretrained llama-8b llama-8b-small --amount 0.5 --heads 0.25 \\\n"
               "      --importance activation --calibration sample.txt\n"
               "DST is written beside itself and moved into place at the end: a failed run leaves nothing.",
    )
    p.add_argument("src", metavar="SRC", help="the checkpoint folder to read")
    p.add_argument("dst", metavar="DST", help="the folder to write")
    p.add_argument("--amount", type=float, required=True, help="fraction of each block's MLP neurons to remove")
    p.add_argument("--heads", type=float, default=None, help="fraction of each block's key/value heads to remove")
    p.add_argument("--importance", choices=("l2", "l1", "activation"), default="l2",
                   help="how units are scored within a block (default: %(default)s)")
    p.add_argument("--calibration", metavar="FILE",
                   help="text (read with SRC's tokenizer) or .json token-id lists; default: random token ids")
    p.add_argument("--samples", type=int, default=4, help="calibration rows (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per calibration row (default: %(default)s)")
    p.add_argument("--no-uniform", action="store_true",
                   help="let blocks differ in what they lose (refused at the end if a config cannot say it)")
    p.add_argument("--quiet", action="store_true", help="no per-block progress lines")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_prune_pretrained)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except VerificationError:  # compact and masked disagree: a bug in compactor, not the user's to fix
        traceback.print_exc(file=sys.stderr)
        print(f"compactor {args.command}: this is a bug in compactor: please report it with the traceback above, "
              "the model and this command line", file=sys.stderr)
        return 1
    except (UserError, CompactionError, FileExistsError, FileNotFoundError) as exc:
        message = " ".join(str(exc).split())
        print(f"compactor {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:  # permissions, a full disk: the user's to fix, not a bug
        print(f"compactor {args.command}: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
              file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
