"""Models bigger than memory: prune_pretrained on LLaMA-shaped checkpoints from 0.3 B to 13 B parameters.

For each size, a checkpoint of random bf16 weights (std 0.02, norms around 1) is written in the
Hugging Face layout (config.json, one safetensors shard per decoder block plus one for the
embeddings and head, an index), then, each in a fresh subprocess under an address-space limit
(``RLIMIT_AS``, ``--limit-gb``):

- ``copy``: every tensor read and written again with the same reader and writer, nothing
  computed: the I/O floor the ``time / I/O`` column divides by;
- ``prune``: ``compactor.prune_pretrained(src, dst, --amount, heads=--heads)``: every block
  masked, compacted and checked against the masked block on 4 x 64 calibration tokens;
- ``check``: the output loaded with vanilla ``from_pretrained`` truncated to its first
  ``--check-layers`` blocks (the rest of the keys are unexpected there and ignored), against the
  same blocks of the source loaded the same way, pruned with ``prune_channels(uniform=True)``
  and compacted in memory: same shapes, logits within fp32 rounding. The whole output's keys and
  shapes are checked by prune_pretrained itself against the family's class built on the meta
  device from the written config.

The page cache is dropped before each step where this process may (root), so reads come from
the disk. Peak memory is the child's peak RSS (ru_maxrss).

    python benchmarks/scale.py --sizes 0.3b,1b,3b --limit-gb 10
    python benchmarks/scale.py --sizes 8b --limit-gb 24
    python benchmarks/scale.py --sizes 13b --limit-gb 10       # ~26 GB of input, more than this machine's RAM
    python benchmarks/scale.py --smoke --out /tmp/b            # a 2-layer toy, seconds
    python benchmarks/scale.py --in-memory --sizes 0.3b,1b     # the in-memory path instead (below)

``--in-memory``: the model built whole in bf16 (random weights), then in one fresh process per row
``prune_channels(model, tokens, --amount, heads=--heads)`` with torch's masks, or with
``bake=True`` followed by ``compact(model, tokens, inplace=True)``; the peak resident memory
beyond the loaded model (VmHWM, reset before each step) and the time of each step.

Writes benchmarks/results/<device>/scale_<sizes>.{json,md,png}; the checkpoints go to --work
(default: a temporary folder) and are deleted after each size unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

_MARK = "SCALE_RESULT "

#: LLaMA shapes: (hidden, intermediate, layers, heads, key/value heads, vocab)
SHAPES = {
    "toy": (256, 512, 2, 8, 4, 1000),
    "0.3b": (1024, 4096, 16, 16, 8, 32000),
    "1b": (2048, 5632, 22, 32, 4, 32000),
    "3b": (3072, 8192, 28, 24, 8, 128256),
    "8b": (4096, 14336, 32, 32, 8, 128256),
    "13b": (5120, 13824, 40, 40, 40, 32000),
}


def _config(size: str):
    from transformers import LlamaConfig

    h, i, n, heads, kv, vocab = SHAPES[size]
    return LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
                       num_key_value_heads=kv, head_dim=h // heads, vocab_size=vocab, tie_word_embeddings=False,
                       torch_dtype="bfloat16")


def write_checkpoint(folder: str, size: str, seed: int = 0) -> dict:
    """A random bf16 LLaMA checkpoint of ``size`` in ``folder``, one block per shard; returns its size and time."""
    import torch

    from compactor import shards

    t0 = time.perf_counter()
    config = _config(size)
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    h, inter, n, heads, kv, vocab = SHAPES[size]
    hd = h // heads
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, mean: float = 0.0, std: float = 0.02) -> torch.Tensor:
        return torch.empty(*shape, dtype=torch.bfloat16).normal_(mean, std, generator=gen)

    block = {"self_attn.q_proj.weight": (heads * hd, h), "self_attn.k_proj.weight": (kv * hd, h),
             "self_attn.v_proj.weight": (kv * hd, h), "self_attn.o_proj.weight": (h, heads * hd),
             "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter)}
    index, total, params = {}, 0, 0
    for i in range(n + 1):
        name = f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors"
        if i < n:
            tensors = [(f"model.layers.{i}.{k}", rand(*s)) for k, s in block.items()]
            tensors += [(f"model.layers.{i}.input_layernorm.weight", rand(h, mean=1.0, std=0.1)),
                        (f"model.layers.{i}.post_attention_layernorm.weight", rand(h, mean=1.0, std=0.1))]
        else:
            tensors = [("model.embed_tokens.weight", rand(vocab, h, std=1.0)),
                       ("model.norm.weight", rand(h, mean=1.0, std=0.1)), ("lm_head.weight", rand(vocab, h))]
        total += shards.write_shard(os.path.join(folder, name), tensors)
        params += sum(t.numel() for _, t in tensors)
        index.update({k: name for k, _ in tensors})
        del tensors
    with open(os.path.join(folder, shards.INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": index}, f)
    return {"params": params, "bytes": total, "write_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------- children


def _child(argv: Sequence[str]) -> None:
    mode, src, dst, limit_gb = argv[0], argv[1], argv[2], float(argv[3])
    if limit_gb > 0:
        limit = int(limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from compactor import shards

    t0 = time.perf_counter()
    out: dict = {}
    if mode == "copy":
        ck = shards.Checkpoint(src)
        os.makedirs(dst, exist_ok=True)
        read_s = write_s = 0.0
        by_file: dict[str, list[str]] = {}
        for k, info in ck.tensors.items():
            by_file.setdefault(info.file, []).append(k)
        for name, keys in sorted(by_file.items()):
            t = time.perf_counter()
            tensors = [(k, ck.read(k)) for k in keys]
            read_s += time.perf_counter() - t
            t = time.perf_counter()
            shards.write_shard(os.path.join(dst, name), tensors)
            write_s += time.perf_counter() - t
            del tensors
        out = {"read_s": read_s, "write_s": write_s, "bytes": ck.nbytes}
    elif mode == "prune":
        from compactor import prune_pretrained

        amount, heads = float(argv[4]), float(argv[5])
        rep = prune_pretrained(src, dst, amount, heads=heads, progress=True)
        out = {"report": str(rep), "bytes_read": rep.bytes_read, "bytes_written": rep.bytes_written,
               "read_s": rep.read_seconds, "write_s": rep.write_seconds, "params_before": rep.params_before,
               "params_after": rep.params_after, "config": rep.config_updates,
               "blocks": [vars(b) for b in rep.blocks]}
    elif mode == "inmem":
        out = _in_memory(src, argv[4] == "bake", float(argv[5]), float(argv[6]))
    elif mode == "check":
        out = _check(src, dst, int(argv[4]), float(argv[5]), float(argv[6]))
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(_MARK + json.dumps(out), flush=True)


def _check(src: str, dst: str, layers: int, amount: float, heads: float) -> dict:
    """The first ``layers`` blocks of ``dst`` (vanilla from_pretrained) against the same blocks of ``src`` pruned
    and compacted in memory."""
    import warnings

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import compactor

    warnings.simplefilter("ignore")

    def load(folder: str):
        cfg = AutoConfig.from_pretrained(folder)
        cfg.num_hidden_layers = layers
        model, info = AutoModelForCausalLM.from_pretrained(folder, config=cfg, dtype=torch.float32,
                                                           output_loading_info=True)
        return model.eval(), info

    small, info = load(dst)
    ref, _ = load(src)
    ids = torch.randint(0, ref.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    compactor.prune_channels(ref, inputs, amount, heads=heads, uniform=True)
    ref = compactor.compact(ref, inputs, inplace=True, progress=False)
    same_shapes = all(tuple(p.shape) == tuple(q.shape) for p, q in zip(ref.parameters(), small.parameters()))
    same_values = all(torch.equal(p, q) for p, q in zip(ref.parameters(), small.parameters()))
    with torch.no_grad():
        a, b = ref(**inputs).logits, small(**inputs).logits
    return {"layers": layers, "missing_keys": sorted(info["missing_keys"]), "same_shapes": same_shapes,
            "same_values": same_values, "max_abs_diff": (a - b).abs().max().item(),
            "scale": a.abs().max().item()}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def _reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS:")


def _in_memory(size: str, bake: bool, amount: float, heads: float) -> dict:
    """prune_channels (masks, or bake=True then compact(inplace=True)) on the whole model in memory."""
    import warnings

    import torch
    from transformers import LlamaForCausalLM

    import compactor

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(_config(size))
    model = model.to_empty(device="cpu").to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.02)
    rotary = model.model.rotary_emb  # its buffers are not parameters: built again on the CPU, not left empty
    model.model.rotary_emb = type(rotary)(config=model.config)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    tokens = {"input_ids": ids, "attention_mask": mask}
    tiny = LlamaForCausalLM(_config("toy")).eval()  # first use (imports, caches) not counted
    compactor.prune_channels(tiny, {"input_ids": ids % 1000}, 0.5, heads=0.25, bake=True)
    compactor.compact(tiny, {"input_ids": ids % 1000}, inplace=True, progress=False)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"size": size, "bake": bake, "model_bytes": model_bytes}
    base = _reset_peak()
    t = time.perf_counter()
    compactor.prune_channels(model, tokens, amount, heads=heads, bake=bake)
    out.update(prune_s=time.perf_counter() - t, prune_peak_added=_status("VmHWM:") - base,
               held_after_prune=_status("VmRSS:") - base)
    if bake:
        _reset_peak()
        t = time.perf_counter()
        small = compactor.compact(model, tokens, inplace=True, progress=False)
        report = compactor.report_of(small)
        out.update(compact_s=time.perf_counter() - t, compact_peak_added=_status("VmHWM:") - base,
                   params_before=report.params_before, params_after=report.params_after,
                   max_abs_diff=report.max_abs_diff, tolerance=report.tolerance)
    return out


def _spawn(mode: str, src: str, dst: str, limit_gb: float, *extra: str) -> dict:
    _drop_caches()
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, src, dst, str(limit_gb), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    if proc.returncode or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        return {"error": f"{mode} exited with {proc.returncode}: {tail}"}
    sys.stderr.write(proc.stderr[-2000:] if mode == "prune" else "")
    return json.loads(lines[-1][len(_MARK):])


def _drop_caches() -> None:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


# --------------------------------------------------------------------------- main


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="0.3b,1b,3b", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--amount", type=float, default=0.5)
    p.add_argument("--heads", type=float, default=0.25)
    p.add_argument("--limit-gb", type=float, default=10.0, help="RLIMIT_AS of each child, GiB (0: none)")
    p.add_argument("--check-layers", type=int, default=2)
    p.add_argument("--work", default=None, help="where the checkpoints go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--in-memory", action="store_true", help="measure prune_channels / compact(inplace=True) instead")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.out = "toy", common.smoke_base(args.out)
    return args


def run(args: argparse.Namespace) -> dict:
    if args.in_memory:
        rows = [_spawn("inmem", size, "-", 0, how, str(args.amount), str(args.heads))
                for size in common.words(args.sizes) for how in ("masks", "bake")]
        return {"rows": rows, "settings": {"amount": args.amount, "heads": args.heads, "in_memory": True}}
    work = args.work or tempfile.mkdtemp(prefix="compactor-scale-")
    rows = []
    for size in common.words(args.sizes):
        src, dst, copy = (os.path.join(work, f"{size}-{k}") for k in ("src", "dst", "copy"))
        for d in (src, dst, copy):
            shutil.rmtree(d, ignore_errors=True)
        print(f"{size}: writing the checkpoint", file=sys.stderr, flush=True)
        row = {"size": size, "shape": SHAPES[size], "limit_gb": args.limit_gb, **write_checkpoint(src, size)}
        row["copy"] = _spawn("copy", src, copy, args.limit_gb)
        shutil.rmtree(copy, ignore_errors=True)
        print(f"{size}: prune_pretrained", file=sys.stderr, flush=True)
        row["prune"] = _spawn("prune", src, dst, args.limit_gb, str(args.amount), str(args.heads))
        if "error" not in row["prune"]:
            row["check"] = _spawn("check", src, dst, 0, str(args.check_layers), str(args.amount), str(args.heads))
        print(json.dumps({k: v for k, v in row.items() if k != "prune"}, default=str)[:600], file=sys.stderr)
        rows.append(row)
        if not args.keep:
            for d in (src, dst):
                shutil.rmtree(d, ignore_errors=True)
    if not args.work and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "settings": {"amount": args.amount, "heads": args.heads, "limit_gb": args.limit_gb,
                                       "check_layers": args.check_layers}}


def _md(rows: list[dict]) -> list[str]:
    gb = 1e9
    md = ["| size | params | checkpoint | peak memory | limit (AS) | prune time | copy (I/O only) | time / I/O | "
          "read | write | blocks checked | worst max diff / tol | first blocks vs in-memory |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, c, k = r["prune"], r["copy"], r.get("check", {})
        if "error" in p:
            md.append(f"| {r['size']} | {r['params'] / 1e9:.2f} B | {r['bytes'] / gb:.1f} GB | | | {p['error'][:200]} |")
            continue
        worst = max(p["blocks"], key=lambda b: b["max_abs_diff"] / max(b["tolerance"], 1e-30))
        io = c.get("seconds", float("nan"))
        check = ("error: " + k["error"][:80]) if "error" in k else (
            f"{k['layers']} blocks: same values {k['same_values']}, logits max diff {k['max_abs_diff']:.2g} "
            f"(of {k['scale']:.2g})")
        md.append(
            f"| {r['size']} | {r['params'] / 1e9:.2f} B | {r['bytes'] / gb:.1f} GB | {p['peak_rss'] / gb:.2f} GB | "
            f"{r['limit_gb']:g} GiB | {p['seconds']:.0f} s | {io:.0f} s | {p['seconds'] / io:.1f}x | "
            f"{p['bytes_read'] / gb / max(p['read_s'], 1e-9):.2f} GB/s | "
            f"{p['bytes_written'] / gb / max(p['write_s'], 1e-9):.2f} GB/s | {len(p['blocks'])} | "
            f"{worst['max_abs_diff']:.2g} / {worst['tolerance']:.2g} | {check} |")
    return md


def _md_in_memory(rows: list[dict]) -> list[str]:
    gb = 1e9
    md = ["| size | model | how | prune_channels | peak beyond the model | held after | compact(inplace=True) | "
          "peak beyond the model | params | max diff / tol |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| | | | {r['error'][:200]} |")
            continue
        m = r["model_bytes"]
        line = (f"| {r['size']} | {m / gb:.2f} GB | {'bake=True' if r['bake'] else 'masks'} | {r['prune_s']:.0f} s | "
                f"+{r['prune_peak_added'] / gb:.2f} GB ({r['prune_peak_added'] / m:.2f}x) | "
                f"+{r['held_after_prune'] / gb:.2f} GB |")
        if r["bake"]:
            line += (f" {r['compact_s']:.0f} s | +{r['compact_peak_added'] / gb:.2f} GB ({r['compact_peak_added'] / m:.2f}x)"
                     f" | {r['params_after'] / r['params_before']:.2f} | {r['max_abs_diff']:.2g} / {r['tolerance']:.2g} |")
        else:
            line += " | | | |"
        md.append(line)
    return md


def write(args: argparse.Namespace, result: dict) -> list[str]:
    folder = common.out_dir(args.out, common.device_slug())
    if args.in_memory:
        name = "scale_in-memory_" + common.tag(args.sizes.replace(",", "-"), f"a{args.amount}", f"h{args.heads}")
        md = [common.header("prune_channels and compact(inplace=True) in memory", common.timing.machine_info(),
                            result["settings"]), "", *_md_in_memory(result["rows"])]
        return common.write_results(folder, name, result, md)["files"]
    name = "scale_" + common.tag(args.sizes.replace(",", "-"), f"a{args.amount}", f"h{args.heads}",
                                 f"as{args.limit_gb:g}g")
    rows = result["rows"]
    ok = [r for r in rows if "error" not in r["prune"]]
    extra = []
    plot = common.plot_xy(
        {"peak memory (GB)": [(r["params"] / 1e9, r["prune"]["peak_rss"] / 1e9) for r in ok],
         "checkpoint (GB)": [(r["params"] / 1e9, r["bytes"] / 1e9) for r in ok]},
        os.path.join(folder, name + ".png"), "prune_pretrained: peak memory vs model size (LLaMA shapes, bf16)",
        "parameters (billions)", "GB")
    if plot:
        extra.append(plot)
    md = [common.header("prune_pretrained at scale", common.timing.machine_info(), result["settings"]), "", *_md(rows)]
    return common.write_results(folder, name, {"rows": rows, "settings": result["settings"]}, md, extra)["files"]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return common.script_main(argv, parse, run, write)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
    else:
        main()
