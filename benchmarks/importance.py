"""Which channels to prune: prune_channels' importance criteria against Torch-Pruning's, in accuracy and perplexity.

Part 1, a CNN: the demo's residual CNN trained on scikit-learn's bundled digits. At 30 / 50 / 70 % of
each group's channels, every criterion chooses which channels ``prune_channels`` masks: ``l2``,
``l1``, ``activation``, ``taylor`` (cross-entropy on training batches), and Torch-Pruning's
``GroupMagnitudeImportance``, ``GroupTaylorImportance`` and ``BNScaleImportance`` (their per-channel
scores, computed by Torch-Pruning on a copy of the same model, ranked by prune_channels' own
selection: the same number of channels per group, the same masks, every row compacted and checked
exactly). Accuracy on the held-out digits without fine-tuning and after the demo's fine-tuning (8
epochs, masks on); the mean over ``--seeds`` trained models.

Part 2, a language model: a LLaMA-style model (GQA: 8 heads over 4 key/value heads) trained here on
the Python standard library's own documentation text (``pydoc_data.topics``, bytes as tokens).
Perplexity on held-out text after masking 25 % / 50 % of the MLP neurons plus 25 % of the key/value
groups (one of four per layer), no retraining, per criterion.

Time and peak memory (resident set of a forked process doing the scoring and masking, minus that of
one doing nothing) of each criterion.

    python benchmarks/importance.py            # a few minutes on 2 cores
    python benchmarks/importance.py --smoke    # seconds

Writes benchmarks/results/<device>/importance_<settings>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import math
import multiprocessing
import os
import resource
import sys
import time
from typing import Any, Callable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import compactor  # noqa: E402
from compactor import demo, masks, timing  # noqa: E402

OURS = ("l2", "l1", "activation", "taylor")
THEIRS = ("tp-group-l2", "tp-group-taylor", "tp-bn-scale")


# --------------------------------------------------------------------------- measuring one criterion


def _prune_in_child(model: nn.Module, example: Any, amount: float, kwargs: dict, run: bool) -> int:
    if run:
        compactor.prune_channels(model, example, amount, **kwargs)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def peak_rss_delta(model: nn.Module, example: Any, amount: float, kwargs: dict) -> Optional[float]:
    """Bytes of resident memory prune_channels needs in a fresh process, beyond one that only received the same
    model and inputs (Linux; a spawned process: forking one that runs torch threads can hang)."""
    if sys.platform != "linux":
        return None
    import concurrent.futures as cf

    ctx = multiprocessing.get_context("spawn")
    peaks = []
    for run in (False, True):
        with cf.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            peaks.append(pool.submit(_prune_in_child, model, example, amount, kwargs, run).result())
    return max(0, peaks[1] - peaks[0])


def cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    """The CNN's loss on a calibration batch (images, labels)."""
    return F.cross_entropy(model(batch[0]), batch[1])


# --------------------------------------------------------------------------- Torch-Pruning's scores


def tp_scores(model: nn.Module, example: torch.Tensor, kind: str, loss: Callable[[nn.Module], torch.Tensor]) -> dict:
    """(layer name, output channel) -> Torch-Pruning's importance of that channel's group, on a copy of ``model``."""
    import torch_pruning as tp

    work = copy.deepcopy(model).eval()
    imp = {"tp-group-l2": tp.importance.GroupMagnitudeImportance(p=2),
           "tp-group-taylor": tp.importance.GroupTaylorImportance(),
           "tp-bn-scale": tp.importance.BNScaleImportance()}[kind]
    if kind == "tp-group-taylor":
        work.zero_grad()
        loss(work).backward()
    graph = tp.DependencyGraph().build_dependency(work, example)
    names = {m: n for n, m in work.named_modules()}
    out: dict = {}
    for group in graph.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]):
        scores = imp(group)
        if scores is None:  # e.g. no BatchNorm in the group: every channel ties
            continue
        for item in group.items:  # idxs are plain indices; root_idxs, filled in by the graph, say which channel
            dep = item.dep
            if graph.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, (nn.Conv2d, nn.Linear)):
                for i, r in zip(item.idxs, item.root_idxs):
                    out[(names[dep.target.module], int(i))] = float(scores[int(r)])
    return out


def by_rows(model: nn.Module, table: dict) -> Callable[[list[torch.Tensor]], float]:
    """A prune_channels importance callable that scores a unit by ``table``, finding the unit from its weight rows
    (each row of the model's convs and Linears is told apart by its values)."""
    index = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            for i, row in enumerate(m.weight.detach()):
                index[row.numpy().tobytes()] = (name, i)

    def score(rows: list[torch.Tensor]) -> float:
        for r in rows:
            key = index.get(r[0].numpy().tobytes())
            if key in table:
                return table[key]
        return 0.0
    return score


# --------------------------------------------------------------------------- part 1: the CNN


def cnn_part(args: argparse.Namespace, say: Callable[[str], None]) -> list[dict]:
    xtr, ytr, xte, yte = demo.load_digits_28()
    calib_x = [xtr[i:i + 64] for i in range(0, 512, 64)]
    calib = [(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, 512, 64)]

    ce = cross_entropy
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        dense = demo.train(demo.residual_cnn(), xtr, ytr, epochs=args.epochs, lr=3e-3, seed=seed).eval()
        acc_dense = demo.accuracy(dense, xte, yte)
        say(f"seed {seed}: dense {acc_dense:.1%}")
        for amount in args.amounts:
            for crit in args.criteria:
                model = masks.clone(dense)
                kwargs: dict[str, Any] = {}
                if crit in THEIRS:
                    table = tp_scores(dense, xtr[:8], crit, lambda m: sum(ce(m, b) for b in calib))
                    kwargs["importance"] = by_rows(dense, table)
                else:
                    kwargs["importance"] = crit
                    if crit == "activation":
                        kwargs["calibration"] = calib_x
                    elif crit == "taylor":
                        kwargs.update(calibration=calib, loss_fn=ce)
                t0 = time.perf_counter()
                compactor.prune_channels(model, xtr[:8], amount, **kwargs)
                seconds = time.perf_counter() - t0
                memory = peak_rss_delta(dense, xtr[:8], amount, kwargs) if seed == 0 and crit in OURS else None
                acc = demo.accuracy(model, xte, yte)
                small = compactor.compact(model, xte[:8], progress=False)
                assert abs(demo.accuracy(small, xte, yte) - acc) < 1e-9, "compact != masked"
                demo.train(model, xtr, ytr, epochs=args.finetune, lr=3e-3, seed=seed)
                acc_ft = demo.accuracy(model, xte, yte)
                rows.append({"part": "cnn", "seed": seed, "amount": amount, "criterion": crit,
                             "acc_dense": acc_dense, "acc": acc, "acc_finetuned": acc_ft,
                             "params": small.compaction_report.params_after,
                             "params_dense": small.compaction_report.params_before,
                             "seconds": seconds, "peak_bytes": memory})
                say(f"  {amount:.0%} {crit:16s} {acc:.1%} -> fine-tuned {acc_ft:.1%}  "
                    f"params {small.compaction_report.params_after}  {seconds:.2f} s")
    return rows


# --------------------------------------------------------------------------- part 2: the language model


def _text() -> bytes:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")


def _windows(data: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - length - 1, (n,), generator=gen)
    return torch.stack([data[s:s + length] for s in starts.tolist()])


def perplexity(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            logits = model(input_ids=ids).logits
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="sum"))
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def lm_part(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[list[dict], dict]:
    import transformers as T

    data = torch.tensor(list(_text()), dtype=torch.long)
    split = int(len(data) * 0.9)
    train_data, test_data = data[:split], data[split:]
    gen = torch.Generator().manual_seed(0)
    size = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2) if args.smoke else \
        dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4)
    cfg = T.LlamaConfig(vocab_size=256, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, **size)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    steps = 30 if args.smoke else args.lm_steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        ids = _windows(train_data, 16, 128, gen)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            say(f"LM step {step + 1}/{steps}: loss {float(loss.detach()):.3f} ({time.perf_counter() - t0:.0f} s)")
    train_s = time.perf_counter() - t0
    model.eval()
    test = [_windows(test_data, 8, 128, torch.Generator().manual_seed(100 + i)) for i in range(4 if args.smoke else 16)]
    calib = [{"input_ids": _windows(train_data, 8, 128, torch.Generator().manual_seed(200 + i))}
             for i in range(4 if args.smoke else 16)]
    ppl_dense = perplexity(model, test)
    say(f"LM trained {steps} steps in {train_s:.0f} s: held-out perplexity {ppl_dense:.2f}")
    example = calib[0]
    rows = []
    for amount in args.lm_amounts:
        for crit in OURS:
            masked = masks.clone(model)
            kwargs: dict[str, Any] = {"importance": crit}
            if crit in ("activation", "taylor"):
                kwargs["calibration"] = calib
            t0 = time.perf_counter()
            compactor.prune_channels(masked, example, amount, heads=0.25, **kwargs)
            seconds = time.perf_counter() - t0
            memory = peak_rss_delta(model, example, amount, {"heads": 0.25, **kwargs})
            ppl = perplexity(masked, test)
            small = compactor.compact(masked, example, progress=False)
            ppl_compact = perplexity(small, test)
            assert abs(ppl_compact - ppl) <= 1e-3 * ppl, "compact != masked"
            rows.append({"part": "lm", "amount": amount, "criterion": crit, "ppl_dense": ppl_dense, "ppl": ppl,
                         "params": small.compaction_report.params_after,
                         "params_dense": small.compaction_report.params_before,
                         "seconds": seconds, "peak_bytes": memory})
            say(f"  MLP {amount:.0%} + KV 25% {crit:10s} perplexity {ppl:.2f}  {seconds:.2f} s")
    return rows, {"train_s": train_s, "steps": steps, "ppl_dense": ppl_dense, "text_bytes": len(data),
                  "config": size}


# --------------------------------------------------------------------------- the script


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def summarize(rows: list[dict]) -> list[dict]:
    """CNN rows averaged over seeds: one per (amount, criterion)."""
    out = []
    keys = sorted({(r["amount"], r["criterion"]) for r in rows if r["part"] == "cnn"},
                  key=lambda k: (k[0], (OURS + THEIRS).index(k[1])))
    for amount, crit in keys:
        rs = [r for r in rows if r["part"] == "cnn" and r["amount"] == amount and r["criterion"] == crit]
        out.append({"amount": amount, "criterion": crit, "acc_dense": _mean(rs, "acc_dense"), "acc": _mean(rs, "acc"),
                    "acc_finetuned": _mean(rs, "acc_finetuned"), "params": _mean(rs, "params"),
                    "params_dense": rs[0]["params_dense"], "seconds": _mean(rs, "seconds"),
                    "peak_bytes": rs[0]["peak_bytes"], "seeds": len(rs)})
    return out


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--amounts", type=common.floats, default=[0.3, 0.5, 0.7])
    p.add_argument("--criteria", type=common.words, default=list(OURS + THEIRS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=15, help="training epochs of the dense CNN")
    p.add_argument("--finetune", type=int, default=8, help="fine-tuning epochs after masking")
    p.add_argument("--lm-amounts", type=common.floats, default=[0.25, 0.5])
    p.add_argument("--lm-steps", type=int, default=1500)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--parts", type=common.words, default=["cnn", "lm"], help="cnn,lm (default: both)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.out, args.amounts, args.seeds, args.epochs, args.finetune = common.smoke_base(args.out), [0.3], 1, 2, 1
        args.lm_amounts = [0.5]
    return args


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    rows = cnn_part(args, say) if "cnn" in args.parts else []
    lm_rows, lm = lm_part(args, say) if "lm" in args.parts else ([], {})
    return {"rows": rows + lm_rows, "cnn": summarize(rows), "lm": lm, "machine": timing.machine_info()}


def write(args: argparse.Namespace, result: dict) -> list[str]:
    device = common.device_slug(False)
    folder = common.out_dir(args.out, device)
    what = "_".join({"cnn": "resnet-digits", "lm": "llama-pydoc"}[p] for p in args.parts)
    name = common.tag("importance", "smoke" if args.smoke else what,
                      "a" + "-".join(f"{a:g}" for a in args.amounts), f"s{args.seeds}", f"t{args.threads}")
    files = [common.write_json(os.path.join(folder, name + ".json"), {"settings": vars(args), **result})]
    mem = lambda r: common.fmt_n(r["peak_bytes"]) + "B" if r.get("peak_bytes") is not None else "-"  # noqa: E731
    cnn_cols = [("channels masked", lambda r: f"{r['amount']:.0%}"), ("criterion", lambda r: r["criterion"]),
                ("params / dense", lambda r: f"{r['params'] / r['params_dense']:.2f}"),
                ("accuracy, no fine-tuning", lambda r: f"{r['acc']:.1%}"),
                (f"after {args.finetune} epochs", lambda r: f"{r['acc_finetuned']:.1%}"),
                ("time", lambda r: common.fmt_s(r["seconds"])), ("peak memory", mem)]
    lm_rows = [r for r in result["rows"] if r["part"] == "lm"]
    lm_cols = [("MLP neurons masked", lambda r: f"{r['amount']:.0%} (+ 25 % KV groups)"),
               ("criterion", lambda r: r["criterion"]),
               ("params / dense", lambda r: f"{r['params'] / r['params_dense']:.2f}"),
               ("perplexity", lambda r: f"{r['ppl']:.2f}"),
               ("increase over dense", lambda r: f"{r['ppl'] - r['ppl_dense']:+.2f}"),
               ("time", lambda r: common.fmt_s(r["seconds"])), ("peak memory", mem)]
    cnn = result["cnn"]
    lm = result["lm"]
    md = [common.header("Importance criteria: which channels prune_channels masks", result["machine"], vars(args))]
    if cnn:
        md += [f"## Residual CNN on the digits (dense {_mean(cnn, 'acc_dense'):.1%}; mean of {args.seeds} seed(s))",
               "", "Every row is masked by prune_channels (the same channels per group for every criterion), "
               "compacted, and the compact model's accuracy checked equal to the masked model's.", "",
               common.table(cnn, cnn_cols), ""]
    if lm:
        md += [f"## LLaMA-style LM on pydoc text ({lm['text_bytes']:,} bytes, {lm['config']}, {lm['steps']} steps "
               f"in {lm['train_s']:.0f} s; held-out perplexity {lm['ppl_dense']:.2f})", "",
               "No retraining; the compact model's perplexity checked equal to the masked model's.", "",
               common.table(lm_rows, lm_cols), ""]
    series = {c: [(r["amount"], r["acc"]) for r in cnn if r["criterion"] == c] for c in args.criteria}
    plot = common.plot_xy(series, os.path.join(folder, name + ".png"),
                          "Residual CNN on the digits: accuracy without fine-tuning", "channels masked",
                          "accuracy") if cnn else None
    if plot:
        files.append(plot)
        md.append(f"![{os.path.basename(plot)}]({os.path.basename(plot)})")
    files.append(common.write_text(os.path.join(folder, name + ".md"), "\n".join(md) + "\n"))
    return files


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return common.script_main(argv, parse, run, write)


if __name__ == "__main__":
    main()
