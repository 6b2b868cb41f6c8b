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
