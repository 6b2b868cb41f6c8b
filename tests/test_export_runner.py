"""export/run_onnx.py runs where torch cannot even be imported, and agrees with PyTorch.

The runner is started in a subprocess whose PYTHONPATH puts first a package
``torch`` that raises ImportError, so any ``import torch`` in it (or in anything it
imports) fails the test.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.utils import prune

import compactor
from compactor.demo import LeNet

RUNNER = Path(__file__).resolve().parents[1] / "export" / "run_onnx.py"


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory) -> dict:
    blocker = tmp_path_factory.mktemp("blocker")
    (blocker / "torch").mkdir()
    (blocker / "torch" / "__init__.py").write_text(
        'raise ImportError("torch is blocked: export/run_onnx.py must run without it")\n'
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(blocker)
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def lenet_files(tmp_path_factory):
    """The compact LeNet as ONNX, an input, and the reference output computed by PyTorch
    (by the *masked* model, the one the user trained)."""
    folder = tmp_path_factory.mktemp("lenet")
    torch.manual_seed(0)
    masked = LeNet().eval()
    for name in ("conv1", "conv2", "fc1", "fc2"):
        prune.ln_structured(getattr(masked, name), "weight", 0.5, n=2, dim=0)
    small = compactor.compact(masked, torch.randn(2, 1, 28, 28))
    compactor.export_onnx(small, torch.randn(2, 1, 28, 28), folder / "lenet_small.onnx")
    x = torch.randn(3, 1, 28, 28)
    np.save(folder / "x.npy", x.numpy())
    with torch.no_grad():
        y = masked(x).numpy()
    np.save(folder / "y_torch.npy", y)
    np.save(folder / "y_wrong.npy", y + 1e-2)
    return folder


def run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), *args], env=env, capture_output=True, text=True, timeout=120)


def test_the_blocker_blocks(no_torch_env):
    """The environment really has no usable torch (else the other tests prove nothing)."""
    proc = subprocess.run([sys.executable, "-c", "import torch"], env=no_torch_env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr


def test_runner_source_imports_no_torch():
    tree = ast.parse(RUNNER.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"torch", "compactor"}
    assert {"numpy", "onnxruntime"} <= imported


def test_matches_pytorch_reference_without_torch(no_torch_env, lenet_files):
    """onnxruntime on the target reproduces PyTorch's (masked model's) output within atol 1e-5;
    it prints the model's inputs/outputs and a median latency."""
    d = lenet_files
    proc = run(no_torch_env, str(d / "lenet_small.onnx"), "--input", str(d / "x.npy"),
               "--reference", str(d / "y_torch.npy"), "--atol", "1e-5", "--rtol", "0", "--repeats", "5",
               "--save-output", str(d / "y_ort.npy"))
    assert proc.returncode == 0, proc.stderr
    assert "input  input: tensor(float) [batch, 1, 28, 28]" in proc.stdout
    assert "output output: tensor(float) [batch, 10]" in proc.stdout
    assert "latency: median" in proc.stdout
    assert ": ok" in proc.stdout
    np.testing.assert_allclose(np.load(d / "y_ort.npy"), np.load(d / "y_torch.npy"), rtol=0, atol=1e-5)


def test_mismatch_exits_1_and_random_input_uses_batch(no_torch_env, lenet_files):
    """A reference off by 1e-2 fails (exit 1, MISMATCH); random input takes --batch for the
    dynamic dimension."""
    d = lenet_files
    proc = run(no_torch_env, str(d / "lenet_small.onnx"), "--input", str(d / "x.npy"),
               "--reference", str(d / "y_wrong.npy"), "--atol", "1e-3", "--rtol", "0", "--repeats", "0")
    assert proc.returncode == 1
    assert "MISMATCH" in proc.stdout and "max |output - reference| = 0.01" in proc.stdout

    proc = run(no_torch_env, str(d / "lenet_small.onnx"), "--batch", "4", "--repeats", "2",
               "--save-output", str(d / "y_random.npy"))
    assert proc.returncode == 0, proc.stderr
    assert np.load(d / "y_random.npy").shape == (4, 10)


def test_bad_arguments_exit_2_with_one_line(no_torch_env, lenet_files, tmp_path):
    d = lenet_files
    proc = run(no_torch_env, str(tmp_path / "missing.onnx"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    proc = run(no_torch_env, str(d / "lenet_small.onnx"), "--reference", str(d / "y_torch.npy"))
    assert proc.returncode == 2 and "--reference needs --input" in proc.stderr
