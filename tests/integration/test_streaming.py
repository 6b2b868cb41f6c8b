"""prune_pretrained: a Hugging Face checkpoint pruned and compacted one decoder block at a time, read from safetensors
shards and written as one that vanilla from_pretrained loads; equal to the masked model it stands for."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch
from torch.nn.utils import prune

import compactor
from compactor import shards, streaming
from compactor.cli import main as cli_main
from compactor.errors import CompactionError

T = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_SIZES = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
              num_key_value_heads=4, initializer_range=0.3)
FAMILIES = {
    "llama-biases": lambda: T.LlamaConfig(attention_bias=True, mlp_bias=True, **_SIZES),
    "mistral": lambda: T.MistralConfig(**_SIZES),
    "qwen2": lambda: T.Qwen2Config(**_SIZES),
    "phi3": lambda: T.Phi3Config(pad_token_id=0, **_SIZES),
}


def _checkpoint(folder, family: str, dtype=torch.float32) -> torch.nn.Module:
    """A random model of ``family`` (random biases and norms) saved in several safetensors shards."""
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in n.lower():
                p.normal_(1.0, 0.2)
    model.to(dtype).save_pretrained(folder, max_shard_size="60KB")
    assert os.path.exists(os.path.join(folder, shards.INDEX))  # sharded: the index is read
    return model


def _tokens(vocab: int = 120) -> dict:
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a right-padded row
    return {"input_ids": ids, "attention_mask": mask}


def _load(folder):
    model, info = T.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _kept(src: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """Which rows of ``src`` ``small`` kept (rows of random weights are unique)."""
    where = {tuple(r.tolist()): i for i, r in enumerate(src)}
    flags = torch.zeros(src.shape[0], dtype=torch.bool)
    flags[[where[tuple(r.tolist())] for r in small]] = True
    return flags


def _masked_as(src: torch.nn.Module, small: torch.nn.Module) -> torch.nn.Module:
    """``src`` with torch prune masks zeroing exactly what ``small`` does not hold: the masked model ``small`` claims
    to equal, recovered from the written weights alone (whatever chose them)."""
    for big, sm in zip(src.model.layers, small.model.layers):
        fused = hasattr(big.self_attn, "qkv_proj")  # Phi-3: Q, K, V rows in one layer, gate / up rows in one
        producers = ("self_attn.qkv_proj", "mlp.gate_up_proj") if fused else (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
        kept = {}
        for name in producers:
            layer = big.get_submodule(name)
            kept[name] = _kept(layer.weight, sm.get_submodule(name).weight)
            prune.custom_from_mask(layer, "weight", kept[name][:, None].expand_as(layer.weight).float())
            if layer.bias is not None:
                prune.custom_from_mask(layer, "bias", kept[name].float())
        o, down = big.self_attn.o_proj, big.mlp.down_proj
        columns = {o: kept["self_attn.qkv_proj" if fused else "self_attn.q_proj"][:o.in_features],
                   down: kept["mlp.gate_up_proj" if fused else "mlp.gate_proj"][:down.in_features]}
        for reader, cols in columns.items():
            prune.custom_from_mask(reader, "weight", cols[None, :].expand_as(reader.weight).float())
    return src


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_out_of_core_equals_the_masked_model_and_loads_with_vanilla_from_pretrained(tmp_path, family):
    """The family's model in 60 kB shards; half the MLP neurons and a quarter of the KV heads go from every block.
    The result loads with vanilla from_pretrained (no missing or unexpected keys), its logits equal the masked
    model's (the masks recovered from the rows it kept) and those of the same pruning done in memory with
    prune_channels(uniform=True), greedy generation is unchanged, and every block was checked."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _checkpoint(src, family)
    report = compactor.prune_pretrained(src, dst, 0.5, heads=0.25)
    assert len(report.blocks) == 3 and all(b.max_abs_diff <= b.tolerance for b in report.blocks)
    assert report.params_after < 0.7 * report.params_before
    assert report.config_updates["intermediate_size"] == 48
    assert os.path.exists(dst / "generation_config.json") and not list(tmp_path.glob(".compactor-*"))
    small = _load(dst)
    assert small.config.intermediate_size == 48 and small.config.num_key_value_heads < 4
    inputs = _tokens()
    masked = _masked_as(_load(src), small)
    in_memory = _load(src)
    compactor.prune_channels(in_memory, inputs, 0.5, heads=0.25, uniform=True)
    with torch.no_grad():
        got = small(**inputs).logits
        torch.testing.assert_close(got, masked(**inputs).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, in_memory(**inputs).logits, rtol=1e-5, atol=1e-5)
        prompt = {"input_ids": inputs["input_ids"][:1, :6], "attention_mask": inputs["attention_mask"][:1, :6]}
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(small.generate(**prompt, **kw), masked.generate(**prompt, **kw))


def test_bf16_shards_with_activation_importance_and_json_calibration(tmp_path):
    """A bf16 checkpoint scored by activations on token ids from a JSON file: written in bf16, the tensors are the
    source's own values (nothing rounded), it equals the masked model its rows describe, and the calibration
    changed the choice (activation keeps other neurons than l2 in some block)."""
    src = tmp_path / "src"
    _checkpoint(src, "llama-biases", torch.bfloat16)
    calib = tmp_path / "calibration.json"
    calib.write_text(json.dumps([list(range(3, 40)), list(range(50, 70))]))
    act = compactor.prune_pretrained(src, tmp_path / "act", 0.5, importance="activation", calibration=calib)
    compactor.prune_pretrained(src, tmp_path / "l2", 0.5)
    assert act.calibration_tokens == (2, 37) and all(b.rounded == 0 for b in act.blocks)
    written = shards.Checkpoint(tmp_path / "act")
    assert {written.tensors[k].dtype for k in written.keys()} == {torch.bfloat16}
    small = _load(tmp_path / "act")
    masked = _masked_as(_load(src), small)
    inputs = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, masked(**inputs).logits, rtol=1e-5, atol=1e-5)
    other = _load(tmp_path / "l2")
    assert any(not torch.equal(a.mlp.gate_proj.weight, b.mlp.gate_proj.weight)
               for a, b in zip(small.model.layers, other.model.layers))


def test_bad_inputs_get_clear_errors_and_leave_nothing(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _checkpoint(src, "mistral")
    with pytest.raises(ValueError, match="taylor needs the whole model's loss"):
        compactor.prune_pretrained(src, dst, 0.5, importance="taylor")
    with pytest.raises(CompactionError, match="no config.json"):
        compactor.prune_pretrained(tmp_path, dst, 0.5)
    gpt2 = tmp_path / "gpt2"
    T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    with pytest.raises(CompactionError, match="holds a gpt2 model.*runs llama, mistral, qwen2, phi3"):
        compactor.prune_pretrained(gpt2, dst, 0.5)
    # the disk fills up while the second block is written: no dst, no temporary folder left
    real = shards.write_shard
    calls = []

    def full(path, tensors):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, tensors)

    monkeypatch.setattr(shards, "write_shard", full)
    with pytest.raises(CompactionError, match="disk filled up.*nothing was written to the destination"):
        compactor.prune_pretrained(src, dst, 0.5)
    monkeypatch.undo()
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "src"]
    # too little free space for what the first block says the rest will take: refused early, nothing left
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(path)._replace(free=1000))
    with pytest.raises(CompactionError, match=r"needs about 0.\d\d GB more beside .*where 0.00 GB are free: "
                                              r"nothing was written"):
        compactor.prune_pretrained(src, dst, 0.5)
    monkeypatch.undo()
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "src"]
    # dst exists: refused unless force, and kept as it was
    dst.mkdir()
    (dst / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="force"):
        compactor.prune_pretrained(src, dst, 0.5)
    assert (dst / "mine.txt").read_text() == "keep"
    # a shard the index lists is missing
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.rename(tmp_path / "aside.safetensors")
    with pytest.raises(CompactionError, match=f"not there: {shard.name}"):
        compactor.prune_pretrained(src, tmp_path / "out", 0.5)
    assert not (tmp_path / "out").exists()


def test_the_command_line_writes_the_checkpoint_and_reports_every_block(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _checkpoint(src, "qwen2")
    assert cli_main(["prune-pretrained", str(src), str(dst), "--amount", "0.5", "--heads", "0.25"]) == 0
    out, err = capsys.readouterr()
    assert "3 decoder blocks pruned and compacted one at a time" in out and "block 3/3" in err
    assert _load(dst).config.intermediate_size == 48
    assert cli_main(["prune-pretrained", str(src), str(dst), "--amount", "0.5"]) == 2
    assert "exists" in capsys.readouterr().err
    assert streaming.SUPPORTED == ("llama", "mistral", "qwen2", "phi3")


def test_a_text_calibration_file_is_read_with_the_checkpoints_tokenizer(tmp_path):
    """Text calibration: tokenized by the tokenizer saved beside the checkpoint, cut into --seq-len rows (the last
    one shorter, so right-padded); the tokenizer files are copied to the output. Without a tokenizer: a clear error."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    src = tmp_path / "src"
    _checkpoint(src, "llama-biases")
    text = tmp_path / "sample.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 3)
    with pytest.raises(CompactionError, match="needs the checkpoint's tokenizer.*json file of token-id lists"):
        compactor.prune_pretrained(src, tmp_path / "out", 0.5, calibration=text)
    words = sorted(set(text.read_text().split()))
    tok = Tokenizer(models.WordLevel({w: i + 1 for i, w in enumerate(words)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(src)
    report = compactor.prune_pretrained(src, tmp_path / "out", 0.5, calibration=text, seq_len=10, samples=8)
    assert report.calibration_tokens == (3, 10)  # 27 words: rows of 10, 10 and 7 (padded)
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert _load(tmp_path / "out").config.intermediate_size == 48
