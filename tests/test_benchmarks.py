"""Smoke passes of benchmarks/ and the cases of compactor/bench.py, at tiny sizes.

The benchmark scripts run as a user runs them (a subprocess, ``--smoke``); their JSON
must hold rows with positive latencies and the recorded compact-vs-masked and
ONNX-vs-torch checks within their written-down tolerances.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from compactor import bench, export, masks
from compactor.errors import ExportError
from compactor.testing import zoo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name: str, out: str, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), "--smoke", "--quiet", "--out", out, *extra],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = glob.glob(os.path.join(out, "cpu-*", name.replace(".py", "") + "_smoke*.json"))
    with open(path) as f:
        return json.load(f)


def test_latency_smoke_rows_are_checked_and_positive(tmp_path):
    """latency.py --smoke: every row has a positive median; every compact row recorded
    compact == masked within its tolerance and every onnxruntime row ONNX == torch."""
    doc = _script("latency.py", str(tmp_path))
    rows = doc["rows"]
    assert {r["model"] for r in rows} == {"lenet", "resnet50"}
    assert {r["batch"] for r in rows} == {1, 2}
    assert all(r["median_s"] > 0 and r["p25_s"] <= r["median_s"] <= r["p75_s"] for r in rows)
    compact = [r for r in rows if r["variant"] in ("compact", "compact-layers", "compact-round8")]
    assert compact and all(r["check_ref"] == "masked" for r in compact)
    assert all(0 <= r["check_max_abs_diff"] <= r["check_tolerance"] for r in compact)
    ort_rows = [r for r in rows if r["backend"].startswith("ort")]
    if ort_rows:
        assert all(r["onnx_max_abs_diff"] <= r["onnx_tolerance"] and r["onnx_bytes"] > 0 for r in ort_rows)
    native = [r for r in rows if r["variant"] == "native"]
    assert {r["model"] for r in native} == {"lenet", "resnet50"}
    for r in native:  # designed at the compact widths: same parameters, checked before timing
        twin = next(c for c in rows if c["variant"] == "compact-layers"
                    and (c["model"], c["backend"], c["batch"]) == (r["model"], r["backend"], r["batch"]))
        assert r["params"] == twin["params"] and r["macs"] == twin["macs"]
        assert r["check_ref"].startswith("parameter names and shapes of compact")
        assert twin["speedup_vs_native"] == pytest.approx(r["median_s"] / twin["median_s"])
    lenet_c = next(r for r in compact if r["model"] == "lenet" and r["variant"] == "compact")
    assert lenet_c["params"] < next(r for r in rows if r["model"] == "lenet" and r["variant"] == "masked")["params"]
    assert lenet_c["macs"] == 59328 and lenet_c["mac_ratio"] == pytest.approx(199968 / 59328)
    assert doc["sweep_rows"] and {r["sparsity"] for r in doc["sweep_rows"]} == {0.3, 0.7}
    if ort_rows:  # compactor's own exporter (checked parity), not the unchecked fallback
        assert doc["cases"]["resnet50:all-50"]["exporter"].startswith("compactor.export_onnx"), doc["cases"]
    assert doc["machine"]["torch"] == torch.__version__
    assert glob.glob(os.path.join(str(tmp_path), "cpu-*", "latency_smoke*.md"))


def test_compaction_cost_smoke_measures_time_and_memory(tmp_path):
    """compaction_cost.py --smoke: each size ran in its own process, timed, with a peak RSS, verified."""
    doc = _script("compaction_cost.py", str(tmp_path), "--no-resnet")
    rows = doc["rows"]
    assert [(r["depth"], r["width"]) for r in rows] == [(2, 64), (4, 64)]
    for r in rows:
        assert r["compact_s"] > 0 and r["peak_rss_mb"] >= r["rss_before_mb"] > 0
        assert r["params"] == r["depth"] * (64 * 64 + 64) + 64 * 10 + 10
        assert r["params_after"] < r["params"]
        assert r["max_abs_diff"] <= r["tolerance"]


def test_run_case_reports_progress_and_rows():
    """compactor.bench.run_case: one row per variant, speed-ups relative to masked and dense,
    progress reported up to done == total."""
    seen = []
    rows = bench.run_case("lenet", "seeds-50", "torch-cpu-1t", 2, repeats=2,
                          progress=lambda done, total, label: seen.append((done, total)),
                          variants=("compact",))
    assert [r["variant"] for r in rows] == ["dense", "masked", "compact"]
    masked = rows[1]
    assert masked["speedup_vs_masked"] == 1.0 and rows[0]["efficiency"] == 1.0
    assert rows[2]["check_max_abs_diff"] <= rows[2]["check_tolerance"]
    assert seen and seen[-1][0] == seen[-1][1]


def test_onnx_rows_come_only_from_checked_exports(monkeypatch):
    """Every ONNX file bench times was written by compactor.export_onnx, which checks onnxruntime against
    torch: a faithful export gives a row that records both checks; an exporter whose file has fc3's bias
    off by 0.1 (both exporters shifted alike) raises ExportError naming the difference before anything is
    timed; an export that fails raises too, with no other exporter tried."""
    if "ort-cpu-1t" not in bench.available_backends():
        pytest.skip("onnxruntime is not installed")
    prep = bench.prepare("lenet", "seeds-50", variants=("compact",))
    (row,) = bench.time_case(prep, "ort-cpu-1t", 2, repeats=1, variants=["compact"])
    assert prep.exporter.startswith("compactor.export_onnx (")
    assert 0 <= row["onnx_max_abs_diff"] <= row["onnx_tolerance"]
    assert row["check_ref"] == "masked" and row["check_max_abs_diff"] <= row["check_tolerance"]

    real_export = torch.onnx.export

    def export_shifted(model, *args, **kwargs):
        wrong = copy.deepcopy(model)
        with torch.no_grad():
            wrong.fc3.bias += 0.1
        return real_export(wrong, *args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export_shifted)
    monkeypatch.setattr(bench.timing, "measure", lambda *a, **k: pytest.fail("timed an unchecked ONNX model"))
    prep.onnx.clear()  # export again, through the shifted exporter
    with pytest.raises(ExportError, match=r"onnxruntime's outputs differ from PyTorch's by up to 0\.1 "):
        bench.time_case(prep, "ort-cpu-1t", 2, repeats=1, variants=["compact"])

    def export_fails(*args, **kwargs):
        raise ExportError("both exporters failed (simulated)")

    monkeypatch.setattr(export, "export_onnx", export_fails)
    prep.onnx.clear()
    with pytest.raises(ExportError, match=r"both exporters failed \(simulated\)"):
        bench.time_case(prep, "ort-cpu-1t", 2, repeats=1, variants=["compact"])
    assert prep.onnx == {}


def test_a_backend_without_a_checked_onnx_file_is_skipped_with_why(monkeypatch):
    """time_backends: the ONNX export fails (ExportError), so ort-cpu-1t is skipped with the reason while
    torch-cpu-1t is timed and checked; summary ends with the skipped backend and why."""
    if "ort-cpu-1t" not in bench.available_backends():
        pytest.skip("onnxruntime is not installed")

    def export_fails(*args, **kwargs):
        raise ExportError("both exporters failed (simulated)")

    monkeypatch.setattr(export, "export_onnx", export_fails)
    prep = bench.prepare("lenet", "seeds-50", variants=("compact",))
    rows, skipped = bench.time_backends(prep, ["torch-cpu-1t", "ort-cpu-1t"], [1], repeats=1, progress=None)
    assert [(r["backend"], r["variant"]) for r in rows] == [("torch-cpu-1t", v) for v in ("dense", "masked", "compact")]
    assert skipped == {"ort-cpu-1t": "ExportError: both exporters failed (simulated)"}
    assert rows[2]["check_ref"] == "masked" and rows[2]["check_max_abs_diff"] <= rows[2]["check_tolerance"]
    lines = bench.summary(prep, rows, skipped, 1).splitlines()
    assert lines[-1] == "skipped ort-cpu-1t: ExportError: both exporters failed (simulated)"
    assert "= masked: |diff|" in next(line for line in lines if line.split()[2:3] == ["compact"])


def test_run_case_rejects_bad_arguments():
    with pytest.raises(ValueError, match="does not fit model 'lenet'"):
        bench.run_case("lenet", "all-50", "torch-cpu-1t", 1, progress=None)
    with pytest.raises(ValueError, match="model='alexnet'"):
        bench.run_case("alexnet", None, "torch-cpu-1t", 1, progress=None)
    with pytest.raises(ValueError, match="batch=0"):
        bench.run_case("lenet", None, "torch-cpu-1t", 0, progress=None)


def test_all_50_masks_each_residual_stream_consistently():
    """resnet50 all-50: within a stage, every conv writing the residual stream (each block's
    conv3 and the downsample conv) masks the same half of the channels."""
    dense, _, _ = bench.build_dense("resnet50", small=True)
    model = bench.apply_scenario(dense, "resnet50", "all-50")
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        rows = [b.conv3.weight_mask.flatten(1).any(1) for b in stage] + [stage[0].downsample[0].weight_mask.flatten(1).any(1)]
        assert all(torch.equal(r, rows[0]) for r in rows)
        assert int(rows[0].sum()) == rows[0].numel() // 2


def test_bytes_moved_counts_lenet_by_hand():
    """LeNet dense: 6*26*26*9 + 16*11*11*54 + 400*120 + 120*84 + 84*10 = 199,968 MACs per image
    in 11 aten ops; the masked model runs 4 more (one multiply per pruned weight)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bytes_moved
    finally:
        sys.path.pop(0)
    prep = bench.prepare("lenet", "seeds-50", variants=("compact",))
    x = torch.randn(1, 1, 28, 28)
    dense, masked, small = (bytes_moved.count(prep.variants[v], x) for v in ("dense", "masked", "compact"))
    assert dense.macs == 199968 and masked.macs == 199968 and small.macs == 59328
    assert dense.ops == small.ops == 11 and masked.ops == 15 and masked.names["mul"] == 4
    assert dense.w_read == 4 * sum(p.numel() for p in prep.variants["dense"].parameters())


def test_native_lenet_is_designed_at_the_compact_widths():
    """seeds-50 prunes round(0.5 * n) of conv1 (6), conv2 (16), fc1 (120), fc2 (84): LeNet(widths=(3, 8, 60, 42)),
    fc1 reading 8 * 5 * 5 = 200 features; every parameter has compact's name and shape (15,306 in all)."""
    native, source = bench.build_native("lenet", "seeds-50")
    assert source == "LeNet(widths=(3, 8, 60, 42))" and native.fc1.in_features == 200
    prep = bench.prepare("lenet", "seeds-50", variants=("native", "compact", "compact-drop"))
    assert prep.native_checked == ["compact", "compact-drop"]
    assert bench.layer_shapes(prep.variants["native"]) == bench.layer_shapes(prep.variants["compact"])
    assert prep.params["native"] == prep.params["compact"] == 15306


def test_native_with_other_shapes_is_refused():
    """A 'native' model whose fc2 has 43 outputs where compact has 42 is not the yardstick: prepare_models
    raises naming the first parameter that differs."""
    from compactor.demo import prune_like_the_seeds

    dense = zoo.LeNet().eval()
    masked = prune_like_the_seeds(masks.clone(dense), 0.5)
    with pytest.raises(AssertionError, match=r"fc2.bias: native \(43,\), compact \(42,\)"):
        bench.prepare_models(dense, masked, torch.randn(2, 1, 28, 28), model_name="lenet", scenario="seeds-50",
                             source="test", variants=("native", "compact"),
                             native=(zoo.LeNet((3, 8, 60, 43)), "LeNet(widths=(3, 8, 60, 43))"))


def test_gpu_runtimes_dry_run_on_cpu_checks_every_runtime(tmp_path):
    """gpu_runtimes.py --device cpu --smoke runs gpu.sh's code path on the CPU: every CUDA runtime (fp32, fp16 /
    bf16 channels_last, the graph runner, torch.compile with the eager backend) times dense / masked / native /
    compact / drop; compact was checked against masked in fp32 and again in the runtime's own dtype; LeNet's
    x.view() cannot take channels_last, so its fp16 run says it fell back to contiguous."""
    doc = _script("gpu_runtimes.py", str(tmp_path), "--device", "cpu", "--cases",
                  "resnet50:bottleneck-inner-50,lenet:seeds-50")
    assert doc["errors"] == [] and doc["skipped"] == []
    rows = doc["rows"]
    runtimes = ["torch-cuda-fp16", "torch-cuda-graph", "torch-cuda", "torch-cuda-bf16"]
    assert [(c["case"], c["runtime"]) for c in doc["cells"]] == (
        [("resnet50:bottleneck-inner-50", r) for r in runtimes] + [("lenet:seeds-50", r) for r in runtimes]
        + [("lenet:seeds-50", "torch-cuda-compile")])
    assert all(r["run_on"] == "cpu" and r["median_s"] > 0 for r in rows)
    compact = [r for r in rows if r["variant"] == "compact"]
    assert len(compact) == 9 and all(r["check_ref"] == "masked" and r["check_max_abs_diff"] <= r["check_tolerance"]
                                     for r in compact)
    low = [r for r in compact if r["backend"] != "torch-cuda"]
    assert all(r["runtime_max_abs_diff"] <= r["runtime_tolerance"] for r in low)
    assert {r["dtype"] for r in low} == {"float16", "bfloat16"}
    fp16 = {r["model"]: r["memory_format"] for r in compact if r["backend"] == "torch-cuda-fp16"}
    assert fp16["resnet50"] == "channels_last" and fp16["lenet"].startswith("contiguous (channels_last fails")
    assert {r["variant"] for r in rows if r["backend"] == "torch-cuda-compile"} == {
        "dense", "native", "compact", "compact-drop"}
    assert doc["cases"]["resnet50:bottleneck-inner-50"]["native_checked"] == ["compact-layers", "compact-drop"]
    (md,) = glob.glob(os.path.join(str(tmp_path), "cpu-*", "gpu_runtimes_smoke*.md"))
    with open(md) as f:
        text = f.read()
    assert "DRY RUN ON CPU" in text and "**exact x native**" in text and "### resnet50 bottleneck-inner-50" in text


def test_gpu_runtimes_budget_skips_and_still_writes(tmp_path, capsys):
    """With no time left no cell starts: every planned cell is listed as skipped (ResNet-50 bottleneck-inner-50
    first, torch.compile of the other cases last), and the JSON + markdown are written all the same."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu_runtimes
    finally:
        sys.path.pop(0)
    result = gpu_runtimes.main(["--device", "cpu", "--smoke", "--quiet", "--budget-s", "0", "--out", str(tmp_path),
                                "--cases", "resnet50:bottleneck-inner-50,lenet:seeds-50"])
    assert result["rows"] == [] and result["cells"] == []
    order = [(s["case"], s["runtime"]) for s in result["skipped"]]
    assert order[0] == ("resnet50:bottleneck-inner-50", "torch-cuda-fp16")
    assert order[-1] == ("lenet:seeds-50", "torch-cuda-compile") and len(order) == 9
    assert all(s["why"].startswith("budget:") for s in result["skipped"])
    assert [os.path.splitext(f)[1] for f in result["files"]] == [".json", ".md"]


def test_gpu_sh_parses():
    """gpu.sh cannot run without a GPU; at least it is valid bash and names the script it runs."""
    path = os.path.join(ROOT, "benchmarks", "gpu.sh")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    with open(path) as f:
        assert "benchmarks/gpu_runtimes.py" in f.read()


def test_exact_mode_launches_what_native_does():
    """Counted on the GPU code paths: exact mode's carrier channels are plain channels of plain layers, so
    compact (exact) dispatches exactly native's ops, as drop mode does. border='layers' dispatches native's
    plus one add for each of the three stride-2 3x3 convs (their correction stays on the conv), the
    BatchNorm after each stride-1 conv carrying its correction in the pass it makes anyway."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import op_count
    finally:
        sys.path.pop(0)
    names = ("native", "compact", "compact-layers", "compact-drop")
    prep = bench.prepare("resnet50", "bottleneck-inner-50", small=True, variants=names)
    x = prep.inputs(1)
    native, exact, layers, drop = (op_count.count(prep.variants[v], x) for v in names)
    assert drop["by_op"] == native["by_op"] and exact["by_op"] == native["by_op"]
    assert layers["ops"] == native["ops"] + 3 and layers["by_op"]["add_"] == 3
    assert layers["by_op"]["addcmul"] == 13
    assert layers["by_op"]["native_batch_norm"] == native["by_op"]["native_batch_norm"] - 13
    torch.testing.assert_close(prep.variants["compact-layers"](x), prep.variants["masked"](x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(prep.variants["compact"](x), prep.variants["masked"](x), rtol=1e-4, atol=1e-4)


def test_scale_smoke_prunes_a_written_checkpoint_and_checks_its_first_blocks(tmp_path):
    """scale.py --smoke: a toy LLaMA checkpoint written in shards, copied (the I/O floor), pruned out of core under
    an address-space limit with every block checked, and its blocks loaded with from_pretrained equal to an
    in-memory compaction of the same blocks."""
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "scale.py"), "--smoke", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = glob.glob(os.path.join(str(tmp_path), "cpu-*", "scale_toy*.json"))
    with open(path) as f:
        [row] = json.load(f)["rows"]
    prune, check = row["prune"], row["check"]
    assert len(prune["blocks"]) == 2 and all(b["max_abs_diff"] <= b["tolerance"] for b in prune["blocks"])
    assert prune["params_after"] < 0.6 * prune["params_before"] and 0 < prune["peak_rss"] < 10 * 2**30
    assert row["copy"]["bytes"] == row["bytes"] and check["missing_keys"] == []
    assert check["same_shapes"] and check["same_values"] and check["max_abs_diff"] == 0.0
