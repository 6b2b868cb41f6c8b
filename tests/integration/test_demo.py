"""The main job end to end: `compactor demo` trains, prunes, saves, reloads, compacts and verifies."""

import io

import torch

from compactor import demo
from compactor.cli import main


def test_demo_runs_and_compact_equals_masked(tmp_path):
    out = io.StringIO()
    res = demo.run(str(tmp_path / "d"), epochs=2, stream=out)
    text = out.getvalue()
    assert "accuracy on" in text and "CPU latency" in text
    assert res.acc_compact == res.acc_masked  # same function, same predictions
    assert res.acc_dense > 0.5, "a couple of epochs on digits should beat chance by far"
    assert res.params_compact < res.params_dense and res.macs_compact < res.macs_dense
    assert res.max_abs_diff <= 1e-5 * 100
    saved = torch.load(tmp_path / "d" / "pruned_model.pth", weights_only=True)
    assert "conv1.weight_orig" in saved and "conv1.weight_mask" in saved


def test_demo_refuses_to_overwrite_without_force(tmp_path, capsys):
    (tmp_path / "pruned_model.pth").write_bytes(b"precious")
    code = main(["demo", "--out", str(tmp_path), "--epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--force" in err[0]
    assert (tmp_path / "pruned_model.pth").read_bytes() == b"precious"
