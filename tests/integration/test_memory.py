"""compact() stays within bounded memory: at most 2x the model's fp32 size plus one forward's activations."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "compaction_cost.py")

@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable peak-RSS counter")
def test_peak_memory_of_compact_on_a_resnet50_sized_model():
    """ResNet-50-sized (25.6 M params, 98 MB fp32), every layer 50 % masked: the memory compact() adds on top of
    the loaded masked model, measured in a fresh process, is within 2 x 98 MB + the activations of one forward
    (+ the fixed allowance the benchmark states for the runtime's first-use memory)."""
    spec = {"kind": "model", "model": "resnet50", "scenario": "all-50", "threads": 1}
    proc = subprocess.run([sys.executable, SCRIPT, "--child", json.dumps(spec)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("COMPACTION_COST_RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-2000:]
    row = json.loads(line.split(" ", 1)[1])
    if row["peak_method"].startswith("ru_maxrss"):
        pytest.skip("the peak-RSS counter could not be reset in this process")
    assert row["status"] == "exact" and row["params_after"] < row["params"]
    assert 90 < row["model_mb"] < 110
    assert row["bound_mb"] <= 2 * row["model_mb"] + row["activations_mb"] + 64
    assert row["within_bound"] and row["extra_mb"] <= row["bound_mb"], row


_PRUNE_CHILD = r"""
import json, torch, compactor
from torch import nn

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

torch.manual_seed(0)
warm = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
compactor.prune_channels(warm, torch.randn(2, 8), 0.5)  # first use: lazy imports and caches, not counted
model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024))]).eval()
x = torch.randn(4, 1024)
model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set to the current one
before = status("VmRSS:")
BAKE = __import__("sys").argv[-1] == "bake"
compactor.prune_channels(model, x, 0.5, bake=BAKE)
row = {"model": model_bytes, "extra": status("VmHWM:") - before,
       "masked": sum(1 for n, _ in model.named_buffers() if n.endswith("weight_mask")),
       "zero_rows": sum(int((m.weight.abs().sum(1) == 0).sum()) for m in model if isinstance(m, nn.Linear))}
if BAKE:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    small = compactor.compact(model, x, inplace=True, progress=False)
    row["compact_extra"] = status("VmHWM:") - before
    row["params_after"] = sum(p.numel() for p in small.parameters())
print(json.dumps(row))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable peak-RSS counter")
def test_prune_channels_needs_under_four_models_of_memory_beyond_the_model():
    """A 6-block MLP (50 M params, 200 MB fp32), half of every Linear but the output masked. The dry runs zero
    and restore rows of the one working copy instead of copying it; that copy is gone before the masks are
    made; the mask torch's hook keeps is a broadcast view. What is left is torch's prune API's own cost, a mask
    buffer and a masked product per tensor (2 x the model here, every tensor masked): the memory added is
    2.2-3.0 x the model from run to run (the allocator's timing) and stays under 4 x (it was 5.8 x)."""
    proc = subprocess.run([sys.executable, "-c", _PRUNE_CHILD], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["masked"] == 11  # every Linear but the output one
    assert row["extra"] < 4.0 * row["model"], f"{row['extra'] / row['model']:.2f} x the model"


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable peak-RSS counter")
def test_bake_then_compact_inplace_stays_near_one_model():
    """The same MLP with bake=True: the rows are zeroed in the model itself, chosen on it (no working copy, no
    mask, no masked product; the dry run keeps only the rows it zeroes, to put them back), then
    compact(inplace=True) slices it. Measured: prune_channels adds 1.2x the model (with masks: 3x), compact 0.5x."""
    proc = subprocess.run([sys.executable, "-c", _PRUNE_CHILD, "bake"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["masked"] == 0 and row["zero_rows"] == 6 * 2048 + 5 * 512  # half the rows of all but the output
    assert row["params_after"] < 0.35 * row["model"] / 4
    assert row["extra"] < 1.6 * row["model"], f"prune: {row['extra'] / row['model']:.2f} x the model"
    assert row["compact_extra"] < 1.0 * row["model"], f"compact: {row['compact_extra'] / row['model']:.2f} x the model"
