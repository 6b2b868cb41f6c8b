"""The CLI on a user's own model, the seeds' flow: a module file with a LeNet class, pruned with
ln_structured, its state_dict saved; `compactor compact / inspect / export` from that folder.

Bad input of every kind gives exit code 2, one line on stderr naming the problem, and no file.
"""

from __future__ import annotations

import importlib
import os
import sys
import uuid

import numpy as np
import pytest
import torch
from torch.nn.utils import prune

import compactor
from compactor.cli import main
from compactor.export import ort_session


pytestmark = pytest.mark.usefixtures("one_torch_thread")

NETS = '''
import torch
import torch.nn.functional as F
from torch import nn


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, int(x.nelement() / x.shape[0]))
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class WideLeNet(LeNet):
    """conv1 has 8 channels: LeNet's weights do not fit."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, 16, 3)


class Renamed(nn.Module):
    """Same layers as LeNet under other names: LeNet's keys do not match."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3)
        self.c2 = nn.Conv2d(6, 16, 3)
        self.f1 = nn.Linear(400, 120)
        self.f2 = nn.Linear(120, 84)
        self.f3 = nn.Linear(84, 10)


class BatchDependentLeNet(LeNet):
    """Compacts fine (verification uses one batch size) but no ONNX file can reproduce it."""

    def forward(self, x):
        y = super().forward(x)
        return y * 2 if x.shape[0] > 1 else y


def not_a_model():
    return 42
'''


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A folder holding the user's module (unique name: each test imports its own) and pruned weights."""
    name = f"nets_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # restored afterwards, like sys.path edits by the CLI
    module = importlib.import_module(name)
    torch.manual_seed(0)
    masked = module.LeNet().eval()
    for layer in ("conv1", "conv2", "fc1", "fc2"):
        prune.ln_structured(getattr(masked, layer), "weight", amount=0.5, n=2, dim=0)
    torch.save(masked.state_dict(), tmp_path / "pruned_model.pth")
    yield name, module, masked, tmp_path
    sys.modules.pop(name, None)


def ort_run(path, x: torch.Tensor) -> np.ndarray:
    session = ort_session(str(path))  # one thread: no spinning pool on a shared 2-core box
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_compact_end_to_end(user, capsys):
    """compact writes the .pt and .onnx; both compute what the masked model computes."""
    name, module, masked, folder = user
    code = main(["compact", "--model", f"{name}:LeNet", "--weights", "pruned_model.pth", "--input-shape", "1,1,28,28",
                 "--out", "lenet_small.pt", "--onnx", "lenet_small.onnx"])
    out = capsys.readouterr().out
    assert code == 0
    assert "conv1" in out and "params 60,074 -> 15,306" in out
    assert "wrote lenet_small.pt" in out and "wrote lenet_small.onnx" in out
    assert sorted(p for p in os.listdir(folder) if p != "__pycache__") == sorted(
        [f"{name}.py", "pruned_model.pth", "lenet_small.pt", "lenet_small.onnx"])

    small = compactor.load(module.LeNet, "lenet_small.pt")
    assert (small.conv1.out_channels, small.fc1.in_features, small.fc2.out_features) == (3, 200, 42)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        want = masked(x)
        torch.testing.assert_close(small(x), want, rtol=1e-5, atol=1e-6)
    for batch in (4, 1):
        np.testing.assert_allclose(ort_run("lenet_small.onnx", x[:batch]), want[:batch].numpy(), rtol=1e-4, atol=1e-5)


def test_inspect_prints_the_plan_and_writes_nothing(user, capsys):
    name, _, _, folder = user
    before = sorted(os.listdir(folder))
    assert main(["inspect", "--model", f"{name}:LeNet", "--weights", "pruned_model.pth",
                 "--input-shape", "2,1,28,28"]) == 0
    out = capsys.readouterr().out
    assert "fc1" in out and "out 60, in 200" in out and "weight rows all zero" in out
    assert sorted(os.listdir(folder)) == before


def test_inspect_plot_draws_the_widths_and_refuses_to_overwrite(user, capsys):
    """--plot FILE.png writes a PNG chart of the widths; an existing file is refused (exit 2) unless --force."""
    name, _, _, folder = user
    args = ["inspect", "--model", f"{name}:LeNet", "--weights", "pruned_model.pth", "--input-shape", "2,1,28,28",
            "--plot", "widths.png"]
    assert main(args) == 0
    assert "widths chart: widths.png" in capsys.readouterr().out
    with open(os.path.join(folder, "widths.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0


def test_inspect_plot_without_matplotlib_says_how_to_install_it(user, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    name, _, _, folder = user
    code = main(["inspect", "--model", f"{name}:LeNet", "--weights", "pruned_model.pth", "--input-shape", "2,1,28,28",
                 "--plot", "w.png"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'compactor[plot]'" in err and not os.path.exists(os.path.join(folder, "w.png"))


def test_export_from_saved_compact_model(user, capsys):
    """`compactor export` loads a compactor.save file into the architecture and writes ONNX equal to it."""
    name, module, masked, _ = user
    small = compactor.compact(masked, torch.randn(2, 1, 28, 28))
    compactor.save(small, "small.pt")
    assert main(["export", "--model", f"{name}:LeNet", "--weights", "small.pt", "--input-shape", "2,1,28,28",
                 "--onnx", "small.onnx"]) == 0
    assert "wrote small.onnx" in capsys.readouterr().out
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        np.testing.assert_allclose(ort_run("small.onnx", x), masked(x).numpy(), rtol=1e-4, atol=1e-5)


def _compact_args(name, **over):
    args = {"--model": f"{name}:LeNet", "--weights": "pruned_model.pth", "--input-shape": "1,1,28,28",
            "--out": "small.pt", "--onnx": "small.onnx"}
    args.update(over)
    flat = ["compact"]
    for k, v in args.items():
        if v is not None:
            flat += [k, v]
    return flat


def _prepare(case, name, folder):
    """Make the bad input for ``case``; return the override arguments."""
    data = (folder / "pruned_model.pth").read_bytes()
    if case == "missing weights":
        return {"--weights": "nope.pth"}
    if case == "corrupt weights":
        (folder / "bad.pth").write_bytes(b"\x00garbage, not a torch file" * 20)
        return {"--weights": "bad.pth"}
    if case == "truncated weights":
        (folder / "bad.pth").write_bytes(data[: len(data) // 2])
        return {"--weights": "bad.pth"}
    if case == "keys do not match":
        return {"--model": f"{name}:Renamed"}
    if case == "shapes do not match":
        return {"--model": f"{name}:WideLeNet"}
    if case == "model not module:callable":
        return {"--model": name}
    if case == "model does not import":
        return {"--model": "no_such_module_xyz:LeNet"}
    if case == "model needs a missing package":
        (folder / "needs_pkg.py").write_text("import no_such_package_abc\n")
        return {"--model": "needs_pkg:LeNet"}
    if case == "model has no such callable":
        return {"--model": f"{name}:Nope"}
    if case == "model is not a module":
        return {"--model": f"{name}:not_a_model"}
    if case == "bad input shape":
        return {"--input-shape": "1,one,28,28"}
    if case == "input shape rejected":
        return {"--input-shape": "1,3,32,32"}
    if case == "onnx cannot match":
        return {"--model": f"{name}:BatchDependentLeNet"}
    raise AssertionError(case)


@pytest.mark.parametrize("case, keyword", [
    ("missing weights", "does not exist"),
    ("corrupt weights", "could not be read"),
    ("truncated weights", "could not be read"),
    ("keys do not match", "which Renamed does not have"),
    ("shapes do not match", "has shape"),
    ("model not module:callable", "module:callable"),
    ("model does not import", "no module named 'no_such_module_xyz'"),
    ("model needs a missing package", "pip install no_such_package_abc"),
    ("model has no such callable", "has no 'Nope' (it defines"),
    ("model is not a module", "not a torch.nn.Module"),
    ("bad input shape", "--input-shape '1,one,28,28'"),
    ("input shape rejected", "rejected the example input"),
    ("onnx cannot match", "onnxruntime's outputs differ from PyTorch's by up to"),
])
def test_bad_input_one_line_exit_2_nothing_written(case, keyword, user, capsys):
    name, _, _, folder = user
    over = _prepare(case, name, folder)
    before = sorted(os.listdir(folder))
    code = main(_compact_args(name, **over))
    line = one_line_error(capsys)
    assert code == 2
    assert line.startswith("compactor compact: error: ") and keyword in line, line
    assert "Traceback" not in line
    written = {"__pycache__", "needs_pkg.py"}  # the case's own module
    assert sorted(p for p in os.listdir(folder) if p not in written) == [p for p in before if p not in written]


def test_existing_outputs_are_refused_up_front(user, capsys):
    """--out exists: refused before any work, the file is untouched, and --onnx is not written either;
    with --force both are written."""
    name, _, _, folder = user
    (folder / "small.pt").write_bytes(b"precious")
    code = main(_compact_args(name))
    line = one_line_error(capsys)
    assert code == 2 and "--out small.pt exists; pass --force" in line
    assert (folder / "small.pt").read_bytes() == b"precious" and not (folder / "small.onnx").exists()

    (folder / "small.onnx").write_bytes(b"precious too")
    code = main(_compact_args(name, **{"--out": "other.pt"}))
    assert code == 2 and "--onnx small.onnx exists" in one_line_error(capsys)
    assert not (folder / "other.pt").exists()

    assert main(_compact_args(name) + ["--force"]) == 0
    assert torch.load(folder / "small.pt", weights_only=True)["format"] == "compactor/1"
    assert (folder / "small.onnx").read_bytes() != b"precious too"


def test_verification_error_is_reported_as_a_bug(user, capsys, monkeypatch):
    """A VerificationError (compact differs from masked: compactor's bug, not the user's) prints the
    full traceback and asks for a report, exit code 1 -- not the one-line exit-2 user error -- and
    writes nothing."""
    from compactor import api
    from compactor.errors import VerificationError

    def compact_disagrees(*args, **kwargs):
        raise VerificationError("the compact model differs from the masked model by up to 0.5 (simulated)")

    monkeypatch.setattr(api, "compact", compact_disagrees)
    name, _, _, folder = user
    code = main(_compact_args(name))
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err and "in compact_disagrees" in err
    assert "VerificationError: the compact model differs from the masked model by up to 0.5 (simulated)" in err
    assert "this is a bug in compactor: please report it" in err.splitlines()[-1]
    assert not (folder / "small.pt").exists() and not (folder / "small.onnx").exists()


def test_output_equal_to_input_is_refused(user, capsys):
    name, _, _, folder = user
    data = (folder / "pruned_model.pth").read_bytes()
    code = main(_compact_args(name, **{"--out": "pruned_model.pth", "--onnx": None}) + ["--force"])
    assert code == 2 and "is also an input" in one_line_error(capsys)
    assert (folder / "pruned_model.pth").read_bytes() == data


@pytest.mark.parametrize("case, keyword", [
    ("pruned weights, not a compact file", "plain state_dict, not a compactor file"),
    ("truncated compact file", "could not be read"),
    ("architecture lacks a layer", "that Renamed lacks"),
])
def test_export_bad_input(case, keyword, user, capsys):
    name, _, masked, folder = user
    weights, model = "small.pt", f"{name}:LeNet"
    if case == "pruned weights, not a compact file":
        weights = "pruned_model.pth"
    else:
        small = compactor.compact(masked, torch.randn(2, 1, 28, 28))
        compactor.save(small, "small.pt")
        if case == "truncated compact file":
            data = (folder / "small.pt").read_bytes()
            (folder / "small.pt").write_bytes(data[: len(data) // 3])
        else:
            model = f"{name}:Renamed"
    code = main(["export", "--model", model, "--weights", weights, "--input-shape", "1,1,28,28", "--onnx", "o.onnx"])
    line = one_line_error(capsys)
    assert code == 2 and line.startswith("compactor export: error: ") and keyword in line, line
    assert not (folder / "o.onnx").exists()


def test_compact_file_passed_as_pruned_weights(user, capsys):
    name, _, masked, _ = user
    compactor.save(compactor.compact(masked, torch.randn(2, 1, 28, 28)), "small.pt")
    code = main(_compact_args(name, **{"--weights": "small.pt", "--out": "again.pt", "--onnx": None}))
    assert code == 2 and "compactor export" in one_line_error(capsys)


def test_usage_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as info:
        main(["compact", "--model", "m:LeNet", "--input-shape", "1,1,28,28", "--out", "x.pt"])
    line = one_line_error(capsys)
    assert info.value.code == 2 and "--weights" in line and "--help" in line


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["compact", "--help"])
    out = capsys.readouterr().out
    assert "compactor compact --model mypkg.nets:LeNet --weights pruned_model.pth --input-shape 1,1,28,28" in out


def test_bench_times_lenet_and_checks_compact_against_masked(capsys):
    """`compactor bench` on the seeds' LeNet: a row per variant, compact smaller than masked, checks passed."""
    from compactor.cli import main as cli_main

    assert cli_main(["bench", "--model", "lenet", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.strip()}
    assert set(rows) >= {"dense", "masked", "compact", "compact-drop"}
    assert int(rows["compact"][3].replace(",", "")) < int(rows["masked"][3].replace(",", ""))


def test_bench_unknown_backend_is_one_line(capsys):
    from compactor.cli import main as cli_main

    assert cli_main(["bench", "--backend", "tpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tpu" in err[0]


def _bench_args(name, *extra):
    return ["bench", "--model", f"{name}:LeNet", "--weights", "pruned_model.pth", "--input-shape", "1,1,28,28",
            "--backends", "torch-cpu-1t,ort-cpu-1t", "--batch", "1,2", "--repeats", "2", *extra]


def test_bench_on_the_users_model_times_every_variant_checked_and_names_the_fastest(user, capsys):
    """`compactor bench --model nets:LeNet --weights pruned_model.pth`: one table, a row per (backend, batch,
    variant); dense is the *_orig weights (199,968 MACs, 60,074 params), compact the 15,306-parameter model
    checked against masked before timing; one verdict line naming a timed backend; --json holds the same rows
    and refuses to be overwritten without --force."""
    import json

    name, _, _, folder = user
    assert main(_bench_args(name, "--json", "bench.json")) == 0
    out = capsys.readouterr().out.splitlines()
    table = {tuple(line.split()[:3]): line for line in out if line.split()[:1] in (["torch-cpu-1t"], ["ort-cpu-1t"])}
    variants = ("dense", "masked", "compact", "compact-drop")
    assert sorted(table) == sorted((b, str(n), v) for b in ("torch-cpu-1t", "ort-cpu-1t") for n in (1, 2)
                                   for v in variants)
    for backend in ("torch-cpu-1t", "ort-cpu-1t"):
        assert "= masked: |diff|" in table[(backend, "1", "compact")]
        assert "15,306" in table[(backend, "2", "compact")] and "60,074" in table[(backend, "2", "dense")]
    verdicts = [line for line in out if line.startswith("verdict: ")]
    assert len(verdicts) == 1 and "the compact model runs fastest on " in verdicts[0]
    assert "x the masked model" in verdicts[0] and "dense on that runtime" in verdicts[0]
    assert out[-1] == "wrote bench.json"

    with open(folder / "bench.json") as f:
        doc = json.load(f)
    assert doc["model"] == f"{name}:LeNet" and doc["weights"] == "pruned_model.pth" and doc["batches"] == [1, 2]
    assert len(doc["rows"]) == 16 and {r["variant"] for r in doc["rows"]} == set(variants)
    assert doc["params"] == {"dense": 60074, "masked": 60074, "compact": 15306, "compact-drop": 15306}
    assert doc["macs"]["dense"] == 199968 and doc["macs"]["compact"] == 59328
    compact_rows = [r for r in doc["rows"] if r["variant"] == "compact"]
    assert all(r["check_ref"] == "masked" and 0 <= r["check_max_abs_diff"] <= r["check_tolerance"] for r in compact_rows)
    assert all(r["median_s"] > 0 and r["speedup_vs_masked"] > 0 for r in doc["rows"])
    assert doc["verdict"]["backend"] in ("torch-cpu-1t", "ort-cpu-1t") and doc["verdict"]["line"] == verdicts[0]
    assert f"({doc['verdict']['backend']})" in verdicts[0]

    before = (folder / "bench.json").read_bytes()
    assert main(_bench_args(name, "--json", "bench.json")) == 2
    assert "--json bench.json exists; pass --force" in one_line_error(capsys)
    assert (folder / "bench.json").read_bytes() == before


def test_bench_dense_is_the_weights_before_masking(user, capsys):
    """The dense row is the model before masking: built from *_orig with the masks dropped, it computes what
    the model computed before ln_structured, not the masked (or prune.remove'd) model."""
    from compactor import masks

    name, module, masked, _ = user
    loaded = compactor.load_pruned(module.LeNet, "pruned_model.pth")
    dense = masks.dense_from_masked(module.LeNet, loaded)
    torch.manual_seed(0)
    original = module.LeNet().eval()  # the same seed as the fixture, before pruning
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), original(x), rtol=0, atol=0)
        assert not torch.allclose(dense(x), masked(x))
    assert not any(k.endswith(("_orig", "_mask")) for k in dense.state_dict())


@pytest.mark.parametrize("over, keyword", [
    (["--input-shape", "1,one,28,28"], "--input-shape '1,one,28,28' should be positive integers"),
    (["--batch", "0"], "--batch '0' should be positive integers"),
    (["--backends", "tpu"], "'tpu' is not a backend"),
    (["--scenario", "all-50"], "--scenario is for the built-in cases"),
])
def test_bench_user_errors_are_one_line_exit_2(over, keyword, user, capsys):
    name, _, _, folder = user
    before = sorted(os.listdir(folder))
    args = _bench_args(name, "--json", "bench.json")
    for flag, value in zip(over[::2], over[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    code = main(args)
    line = one_line_error(capsys)
    assert code == 2 and line.startswith("compactor bench: error: ") and keyword in line, line
    assert sorted(os.listdir(folder)) == before


def test_bench_builtin_name_with_weights_is_refused(capsys):
    """A built-in name (lenet) and --weights: one line saying --weights is for module:callable models."""
    assert main(["bench", "--model", "lenet", "--weights", "pruned_model.pth"]) == 2
    assert "--weights is for your own model (--model module:callable)" in one_line_error(capsys)


def test_version_and_python_dash_m():
    """`python -m compactor --version` prints the package's version (from its metadata) and torch's."""
    import subprocess
    import sys

    import compactor

    out = subprocess.run([sys.executable, "-m", "compactor", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith(f"compactor {compactor.__version__} (torch ")
