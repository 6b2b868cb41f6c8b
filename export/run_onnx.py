#!/usr/bin/env python3
"""Run an ONNX model with onnxruntime on a deployment target: no torch, no compactor.

Needs only ``pip install onnxruntime numpy``. Prints the model's inputs and
outputs, runs it on the given ``.npy`` input(s) or on random input shaped like the
model's inputs (dynamic dimensions from ``--batch`` / ``--dim``), times it (warm-up
runs, then the median and spread of timed repeats) and, with ``--reference``,
compares the first output (or every output, from an ``.npz``) with a saved
reference and exits 1 on mismatch. With ``--generate N`` on a decoding-step graph (an LLM
exported with ``compactor.export_onnx(model, tokens, path, cache=True)``), greedy-decodes N
tokens after ``--prompt``.

Examples:
    python run_onnx.py lenet_small.onnx
    python run_onnx.py lenet_small.onnx --batch 8 --repeats 200 --threads 1
    python run_onnx.py lenet_small.onnx --input x.npy --reference y.npy --atol 1e-4
    python run_onnx.py lenet_small.onnx --input x.npy --save-output y_onnx.npy
    python run_onnx.py llm_step.onnx --generate 16 --prompt 5,17,42   # a decoding-step graph

Exit codes: 0 ok, 1 output differs from the reference, 2 bad arguments or files.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Optional, Sequence

import numpy as np

_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


class UsageError(Exception):
    """Bad arguments or files: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like the rest of the errors
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _shape_text(shape: Sequence) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def describe(session) -> str:
    lines = []
    for kind, items in (("input", session.get_inputs()), ("output", session.get_outputs())):
        for i in items:
            lines.append(f"  {kind:6s} {i.name}: {i.type} {_shape_text(i.shape)}")
    return "\n".join(lines)


def _parse_dims(items: Sequence[str]) -> dict[str, int]:
    dims = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.isdigit() or int(value) < 1:
            raise UsageError(f"--dim {item!r} should look like NAME=SIZE with a positive SIZE, e.g. --dim height=32")
        dims[name] = int(value)
    return dims


def random_inputs(session, batch: int, dims: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Random input for every model input; symbolic dims from ``dims``, else dim 0 from ``batch``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        shape = []
        for axis, d in enumerate(i.shape):
            if isinstance(d, int) and d >= 0:
                shape.append(d)
            elif isinstance(d, str) and d in dims:
                shape.append(dims[d])
            elif axis == 0:
                shape.append(batch)
            else:
                raise UsageError(
                    f"input '{i.name}' has a dynamic dimension {axis} ({d!r}); give it with --dim "
                    f"{d if isinstance(d, str) else 'NAME'}=SIZE or pass real data with --input"
                )
        dtype = _DTYPES.get(i.type)
        if dtype is None:
            raise UsageError(f"input '{i.name}' has type {i.type}, which random input does not cover; pass --input")
        if np.issubdtype(dtype, np.floating):
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[i.name] = rng.random(shape) < 0.5
        else:
            feeds[i.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def _load_npy(path: str, what: str) -> np.ndarray:
    if not os.path.exists(path):
        raise UsageError(f"{what} file '{path}' does not exist; check the path")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise UsageError(f"{what} file '{path}' could not be read as .npy/.npz ({type(exc).__name__}: {exc})") from None


def file_inputs(session, paths: Sequence[str]) -> dict[str, np.ndarray]:
    inputs = session.get_inputs()
    if len(paths) != len(inputs):
        raise UsageError(f"the model takes {len(inputs)} input(s) ({', '.join(i.name for i in inputs)}) but "
                         f"{len(paths)} --input file(s) were given; pass one --input per model input, in order")
    feeds = {}
    for i, path in zip(inputs, paths):
        x = _load_npy(path, "input")
        if isinstance(x, np.lib.npyio.NpzFile):
            raise UsageError(f"input file '{path}' is an .npz; pass one .npy per input")
        want = _DTYPES.get(i.type)
        if want is not None and x.dtype != want:
            if np.can_cast(x.dtype, want, casting="same_kind"):
                x = x.astype(want)
            else:
                raise UsageError(f"input file '{path}' holds {x.dtype} but input '{i.name}' is {i.type}")
        if len(x.shape) != len(i.shape) or any(isinstance(d, int) and d >= 0 and d != s for d, s in zip(i.shape, x.shape)):
            raise UsageError(f"input file '{path}' has shape {list(x.shape)} but input '{i.name}' is "
                             f"{_shape_text(i.shape)}; pass data of the model's input shape")
        feeds[i.name] = x
    return feeds


def compare(outputs: list[np.ndarray], names: list[str], reference_path: str, atol: float, rtol: float) -> tuple[bool, list[str]]:
    """Compare outputs with the reference (.npy: the first output; .npz: outputs by name)."""
    ref = _load_npy(reference_path, "reference")
    pairs = []
    if isinstance(ref, np.lib.npyio.NpzFile):
        for name, out in zip(names, outputs):
            if name in ref.files:
                pairs.append((name, out, ref[name]))
        if not pairs:
            raise UsageError(f"reference '{reference_path}' has arrays {ref.files}, none named like an output "
                             f"({', '.join(names)})")
    else:
        pairs.append((names[0], outputs[0], ref))
    ok, lines = True, []
    for name, out, r in pairs:
        if out.shape != r.shape:
            ok = False
            lines.append(f"{name}: shape {list(out.shape)} but the reference is {list(r.shape)}: MISMATCH")
            continue
        diff = np.abs(out.astype(np.float64) - r.astype(np.float64))
        limit = atol + rtol * np.abs(r.astype(np.float64))
        good = bool(np.all(diff <= limit)) if diff.size else True
        ok = ok and good
        worst = float(diff.max()) if diff.size else 0.0
        lines.append(f"{name}: max |output - reference| = {worst:.3g} (atol {atol:g}, rtol {rtol:g}): "
                     f"{'ok' if good else 'MISMATCH'}")
    return ok, lines


def generate(session, prompt: np.ndarray, new: int) -> np.ndarray:
    """Greedy decoding of ``new`` tokens after ``prompt`` (batch, length) on a decoding-step graph (inputs
    input_ids, attention_mask, position_ids, past.<layer>.key / .value; outputs logits, present.<layer>.*,
    as compactor's export_onnx(..., cache=True) writes): the prompt in one step, then one token per step."""
    inputs = {i.name: i for i in session.get_inputs()}
    if not {"input_ids", "attention_mask", "position_ids"} <= set(inputs) or not any(n.startswith("past.")
                                                                                  for n in inputs):
        raise UsageError("--generate needs a decoding-step graph (inputs input_ids, attention_mask, position_ids, "
                         "past.*): export it with compactor.export_onnx(model, tokens, path, cache=True)")
    b = prompt.shape[0]
    past = {}
    for name, i in inputs.items():
        if name.startswith("past."):
            kv, hd = i.shape[1], i.shape[3]
            past[name] = np.zeros((b, kv, 0, hd), dtype=_DTYPES.get(i.type, np.float32))
    outputs = [o.name for o in session.get_outputs()]
    tokens = prompt.astype(np.int64)
    ids, positions = tokens, np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int64), tokens.shape)
    for _ in range(new):
        feeds = {"input_ids": ids, "attention_mask": np.ones((b, tokens.shape[1]), dtype=np.int64),
                 "position_ids": np.ascontiguousarray(positions), **past}
        out = dict(zip(outputs, session.run(None, feeds)))
        nxt = out["logits"][:, -1].argmax(-1).astype(np.int64)[:, None]
        past = {name: out["present." + name[len("past."):]] for name in past}
        tokens = np.concatenate([tokens, nxt], 1)
        ids, positions = nxt, np.full((b, 1), tokens.shape[1] - 1, dtype=np.int64)
    return tokens


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="run_onnx.py",
        description="Run, time and check an ONNX model with onnxruntime (no torch needed).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python run_onnx.py lenet_small.onnx --batch 8\n"
               "  python run_onnx.py lenet_small.onnx --input x.npy --reference y.npy --atol 1e-4\n"
               "exit codes: 0 ok, 1 output differs from --reference, 2 bad arguments or files",
    )
    p.add_argument("model", help="the .onnx file")
    p.add_argument("--input", action="append", default=[], metavar="NPY",
                   help="input data (.npy), one per model input in order; default: random input")
    p.add_argument("--batch", type=int, default=1, help="size of dynamic dimension 0 for random input (default: 1)")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                   help="size of a named dynamic dimension for random input, e.g. --dim height=32")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input (default: 0)")
    p.add_argument("--reference", metavar="NPY", help="expected output (.npy for the first output, .npz by name)")
    p.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance for --reference (default: 1e-4)")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance for --reference (default: 1e-4)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default: 5)")
    p.add_argument("--repeats", type=int, default=50, help="timed runs; 0 skips timing (default: 50)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads; 0 = its default")
    p.add_argument("--save-output", metavar="NPY", help="write the first output (.npy) or all outputs (.npz)")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="greedy decoding of N tokens on a decoding-step graph (export_onnx(..., cache=True))")
    p.add_argument("--prompt", metavar="IDS", help="with --generate: the prompt's token ids, comma-separated, or "
                   "an .npy of shape (batch, length)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except UsageError as exc:
        print(f"run_onnx.py: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import onnxruntime as ort

    if args.batch < 1 or args.repeats < 0 or args.warmup < 0 or args.threads < 0:
        raise UsageError("--batch must be >= 1 and --repeats, --warmup, --threads >= 0")
    if args.reference and not args.input:
        raise UsageError("--reference needs --input: a reference output only means something for the input "
                         "it was computed from")
    if not os.path.exists(args.model):
        raise UsageError(f"model file '{args.model}' does not exist; check the path")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if args.threads:
        options.intra_op_num_threads = args.threads
    try:
        session = ort.InferenceSession(args.model, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"onnxruntime could not load '{args.model}' ({first}); is it a complete .onnx file?") from None

    print(f"{args.model} (onnxruntime {ort.__version__}, CPUExecutionProvider)")
    print(describe(session))
    if args.generate:
        return _generate(session, args)
    if args.input:
        feeds = file_inputs(session, args.input)
        source = ", ".join(args.input)
    else:
        feeds = random_inputs(session, args.batch, _parse_dims(args.dim), args.seed)
        source = f"random, seed {args.seed}"
    print(f"input ({source}): " + ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in feeds.items()))

    names = [o.name for o in session.get_outputs()]
    try:
        outputs = session.run(None, feeds)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"onnxruntime failed on this input ({first})") from None
    print("output: " + ", ".join(f"{n} {list(o.shape)} {o.dtype}" for n, o in zip(names, outputs)))

    if args.repeats:
        for _ in range(args.warmup):
            session.run(None, feeds)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - t0)
        times.sort()
        lo, hi = times[len(times) // 10], times[min(len(times) - 1, (9 * len(times)) // 10)]
        print(f"latency: median {statistics.median(times) * 1e3:.3f} ms (p10 {lo * 1e3:.3f}, p90 {hi * 1e3:.3f}) "
              f"over {args.repeats} runs after {args.warmup} warm-up, threads {args.threads or 'default'}")

    if args.save_output:
        if args.save_output.endswith(".npz"):
            np.savez(args.save_output, **dict(zip(names, outputs)))
        else:
            np.save(args.save_output, outputs[0])
        print(f"wrote {args.save_output}")

    if args.reference:
        ok, lines = compare(outputs, names, args.reference, args.atol, args.rtol)
        for line in lines:
            print(line)
        if not ok:
            print(f"run_onnx.py: output differs from {args.reference}", file=sys.stderr)
            return 1
    return 0


def _generate(session, args: argparse.Namespace) -> int:
    if not args.prompt:
        raise UsageError("--generate needs --prompt: the token ids to start from (e.g. --prompt 5,17,42)")
    if args.prompt.endswith(".npy"):
        prompt = _load_npy(args.prompt, "prompt")
    else:
        try:
            prompt = np.array([[int(t) for t in args.prompt.split(",")]], dtype=np.int64)
        except ValueError:
            raise UsageError(f"--prompt {args.prompt!r}: comma-separated integers or an .npy file") from None
    if prompt.ndim != 2:
        raise UsageError(f"--prompt has shape {list(prompt.shape)}; it should be (batch, length)")
    t0 = time.perf_counter()
    tokens = generate(session, prompt, args.generate)
    seconds = time.perf_counter() - t0
    for row in tokens:
        print("tokens: " + ",".join(map(str, row.tolist())))
    print(f"generated {args.generate} token(s) per row in {seconds * 1e3:.1f} ms")
    if args.save_output:
        np.save(args.save_output, tokens)
        print(f"wrote {args.save_output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
