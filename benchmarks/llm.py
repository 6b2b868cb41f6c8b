"""What does compaction buy an LLM on the CPU: prefill latency and greedy decode speed.

A LlamaForCausalLM built from its config (random weights, nothing downloads): hidden 768, 12 layers,
12 heads over 4 KV heads, MLP 2048, vocabulary 32000; with ``--family phi3`` the same sizes with
Q, K, V fused into one layer and gate and up into another; with ``--family mixtral`` 8 experts of
1024 neurons in fused 3-D tensors, 2 per token (half the experts' neurons go in each). Masked with
``compactor.prune_channels(model, inputs, 0.5, heads=0.25)`` (half the GLU neurons, a quarter of
the KV groups with their query heads), then compacted. Timed, interleaved, medians: prefill of one
batch of 128 tokens; greedy ``generate`` of 64 new tokens (tokens/s), dense / masked / compact.
The compact model is checked against the masked one first (logits, and the same 64 tokens).

    python benchmarks/llm.py                  # the full model (a few minutes on 2 cores)
    python benchmarks/llm.py --smoke          # 2 layers, hidden 64: seconds
    python benchmarks/llm.py --family mixtral # or phi3

Writes benchmarks/results/<device>/llm_<settings>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import torch  # noqa: E402

import compactor  # noqa: E402
from compactor import masks, timing  # noqa: E402


#: family -> (config class, model class, extra config, name in result files). Phi-3 fuses Q, K and V into one
#: layer and gate and up into another; Mixtral holds 8 experts (top-2) in fused 3-D tensors.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "llama"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, "phi3"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 8, "num_experts_per_tok": 2}, "mixtral-e8"),
}


def _config(family: str, smoke: bool):
    import transformers as T

    config, _, extra, _ = FAMILIES[family]
    tokens = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if smoke:
        return getattr(T, config)(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, **extra, **tokens)
    width = 1024 if family == "mixtral" else 2048  # 8 experts of 1024 neurons, 2 of them per token
    return getattr(T, config)(vocab_size=32000, hidden_size=768, intermediate_size=width, num_hidden_layers=12,
                              num_attention_heads=12, num_key_value_heads=4, **extra, **tokens)


def run(args: argparse.Namespace) -> dict:
    import transformers as T

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = _config(args.family, args.smoke)
    dense = getattr(T, FAMILIES[args.family][1])(cfg).eval()
    prompt_len = 16 if args.smoke else args.prompt
    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    masked = masks.clone(dense)
    t0 = time.perf_counter()
    prune_report = compactor.prune_channels(masked, inputs, args.mlp, heads=args.heads)
    prune_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    small = compactor.compact(masked, inputs)
    compact_s = time.perf_counter() - t0
    report = compactor.report_of(small)
    new = 8 if args.smoke else args.new_tokens
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    with torch.inference_mode():
        same_tokens = torch.equal(masked.generate(ids, **gen), small.generate(ids, **gen))
    if not same_tokens:
        raise AssertionError("the compact model generated other tokens than the masked one")
    models = {"dense": dense, "masked": masked, "compact": small}
    with torch.inference_mode():
        prefill = timing.measure({k: (lambda m=m: m(**inputs)) for k, m in models.items()},
                                 repeats=args.repeats, warmup=2, inner=1)
        decode = timing.measure({k: (lambda m=m: m.generate(ids, **gen)) for k, m in models.items()},
                                repeats=max(3, args.repeats // 3), warmup=1, inner=1)
    params = {k: sum(p.numel() for p in (masks.bake(m) if k == "masked" else m).parameters()) for k, m in models.items()}
    rows = []
    for k in models:
        rows.append({"variant": k, "params": params[k], "prefill_s": prefill[k].median,
                     "prefill_spread": prefill[k].spread, "decode_tokens_per_s": new / decode[k].median,
                     "decode_spread": decode[k].spread})
    for r in rows:
        r["prefill_speedup_vs_dense"] = prefill["dense"].median / r["prefill_s"]
        r["decode_speedup_vs_dense"] = r["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
        r["param_ratio"] = r["params"] / params["dense"]
    return {"rows": rows, "prune_s": prune_s, "compact_s": compact_s, "max_abs_diff": report.max_abs_diff,
            "same_tokens": same_tokens, "prompt": prompt_len, "new_tokens": new,
            "masked_units": sum(g.masked for g in prune_report.groups),
            "config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                     "num_attention_heads", "num_key_value_heads", "vocab_size",
                                                     "num_local_experts") if hasattr(cfg, k)}}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="llama",
                   help="llama (default), phi3 (fused QKV and gate-up layers) or mixtral (8 experts, top-2)")
    p.add_argument("--mlp", type=float, default=0.5, help="fraction of GLU neurons (default 0.5)")
    p.add_argument("--heads", type=float, default=0.25, help="fraction of KV groups (default 0.25)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.out, args.repeats = common.smoke_base(args.out), 3
    load = os.getloadavg()[0]
    result = run(args)
    result["load_before"], result["load_after"] = load, os.getloadavg()[0]
    machine = common.machine_info()
    device = common.device_slug(False)
    folder = common.out_dir(args.out, device)
    size = "smoke" if args.smoke else "768x12-gqa12-4"
    name = common.tag("llm", f"{FAMILIES[args.family][3]}-{size}",
                      f"mlp{args.mlp:g}-kv{args.heads:g}", f"t{args.threads}")
    files = [common.write_json(os.path.join(folder, name + ".json"),
                               {"kind": "llm", "machine": machine, "settings": vars(args), **result})]
    cols = [
        ("variant", lambda r: r["variant"]),
        ("params", lambda r: common.fmt_n(r["params"])),
        ("params / dense", lambda r: f"{r['param_ratio']:.2f}"),
        (f"prefill ({result['prompt']} tokens)", lambda r: common.fmt_s(r["prefill_s"])),
        ("prefill vs dense", lambda r: f"{r['prefill_speedup_vs_dense']:.2f}x"),
        (f"decode ({result['new_tokens']} tokens)", lambda r: f"{r['decode_tokens_per_s']:.1f} tok/s"),
        ("decode vs dense", lambda r: f"{r['decode_speedup_vs_dense']:.2f}x"),
        ("efficiency (prefill speed-up x param ratio)",
         lambda r: f"{r['prefill_speedup_vs_dense'] * r['param_ratio']:.2f}"),
    ]
    title = {"llama": "LLaMA-style model", "phi3": "Phi-3-style model (fused projections)",
             "mixtral": "Mixtral-style mixture-of-experts model (8 experts, top-2)"}[args.family]
    md = [common.header(f"{title} on the CPU: dense / masked / compact ({device})", machine, vars(args)),
          f"Config {result['config']}; `prune_channels(model, inputs, {args.mlp}, heads={args.heads})` masked "
          f"{result['masked_units']} units; compact() took {result['compact_s']:.1f} s (prune_channels "
          f"{result['prune_s']:.1f} s), max |compact - masked| {result['max_abs_diff']:.1e}, the same "
          f"{result['new_tokens']} greedy tokens. torch eager, {args.threads} thread(s), medians of interleaved "
          f"repeats; load average {result['load_before']:.2f} before, {result['load_after']:.2f} after. "
          "Efficiency 1.0: time fell as much as the parameters.", "", common.table(result["rows"], cols), ""]
    plot = common.plot_xy({"prefill": [(r["param_ratio"], r["prefill_speedup_vs_dense"]) for r in result["rows"]],
                           "decode": [(r["param_ratio"], r["decode_speedup_vs_dense"]) for r in result["rows"]]},
                          os.path.join(folder, name + ".png"), "Speed-up vs dense against the parameter ratio",
                          "parameters / dense", "speed-up vs dense")
    if plot:
        files.append(plot)
        md.append(f"![{os.path.basename(plot)}]({os.path.basename(plot)})")
    files.append(common.write_text(os.path.join(folder, name + ".md"), "\n".join(md) + "\n"))
    for f in files:
        print(f)
    return result


if __name__ == "__main__":
    main()
