"""The main job end to end: `compactor demo` trains, prunes, saves, reloads, compacts and verifies."""

import io

import torch

from compactor import demo
from compactor.cli import main


def test_demo_runs_and_compact_equals_masked(tmp_path):
    """Part 1 (LeNet, the seeds' masks) and part 2 (the residual CNN, per-layer masks vs prune_channels)."""
    out = io.StringIO()
    res = demo.run(str(tmp_path / "d"), epochs=2, stream=out, group_epochs=3, group_finetune=1)
    text = out.getvalue()
    assert "accuracy on" in text and "CPU latency" in text
    assert res.acc_compact == res.acc_masked  # same function, same predictions
    assert res.acc_dense > 0.5, "a couple of epochs on digits should beat chance by far"
    assert res.params_compact < res.params_dense and res.macs_compact < res.macs_dense
    assert res.max_abs_diff <= 1e-5 * 100
    saved = torch.load(tmp_path / "d" / "pruned_model.pth", weights_only=True)
    assert "conv1.weight_orig" in saved and "conv1.weight_mask" in saved
    per_layer, grouped = res.groups
    assert (per_layer.masks, grouped.masks) == ("per-layer masks", "prune_channels")
    for row in res.groups:  # exact: the fine-tuned accuracy carries over to the compact model
        assert row.acc_compact == row.acc_finetuned
        assert row.params_compact < row.params_dense
    assert per_layer.rows_removed < per_layer.rows_masked  # the residual stream's masks disagree: most stay
    assert grouped.rows_removed == grouped.rows_masked > 0  # group-aware masks: all go
    assert grouped.params_compact < per_layer.params_compact
    assert "masked rows removed" in text and (tmp_path / "d" / "widths.png").stat().st_size > 1000


def test_demo_refuses_to_overwrite_without_force(tmp_path, capsys):
    (tmp_path / "pruned_model.pth").write_bytes(b"precious")
    code = main(["demo", "--out", str(tmp_path), "--epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--force" in err[0]
    assert (tmp_path / "pruned_model.pth").read_bytes() == b"precious"
