"""Hugging Face models (tiny configs, random weights, nothing downloads): keyword inputs, ModelOutput and
key/value caches, generation unchanged, save / load."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import compactor

T = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _llama() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    return _randomized(T.LlamaForCausalLM(cfg).eval()), cfg


def _tokens() -> dict:
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_llama_glu_neurons_go_and_greedy_generation_is_unchanged(tmp_path):
    """LLaMA with GQA (4 heads, 2 KV heads), prune_channels(0.5) on a tokenizer-style dict: half of each GLU MLP's
    neurons go (gate and up rows, down columns); the logits are exact (the DynamicCache it also returns is not
    compared as tensors); greedy generate() gives the same 16 tokens; save / load (factory) round trips."""
    model, cfg = _llama()
    inputs = _tokens()
    compactor.prune_channels(model, inputs, 0.5)
    small = compactor.compact(model, inputs)
    for layer in small.model.layers:
        assert (layer.mlp.gate_proj.out_features, layer.mlp.up_proj.out_features, layer.mlp.down_proj.in_features) \
            == (64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)
    prompt = inputs["input_ids"][:1]
    expected = model.generate(prompt, max_new_tokens=16, do_sample=False)
    assert torch.equal(small.generate(prompt, max_new_tokens=16, do_sample=False), expected)
    path = str(tmp_path / "llama.pt")
    compactor.save(small, path)
    again = compactor.load(lambda: T.LlamaForCausalLM(cfg), path)
    assert torch.equal(again.generate(prompt, max_new_tokens=16, do_sample=False), expected)
    report = compactor.report_of(small)
    assert report.params_after < report.params_before


def test_bert_with_per_layer_masks_and_keyword_inputs():
    """BERT, ln_structured on every Linear but the pooler: exact on keyword inputs; the MLP neurons go."""
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64)
    model = _randomized(T.BertModel(cfg).eval())
    for m in [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]:
        prune.ln_structured(m, "weight", amount=0.5, n=2, dim=0)
    inputs = {**_tokens(), "token_type_ids": torch.zeros(2, 16, dtype=torch.long)}
    small = compactor.compact(model, inputs)
    assert small.encoder.layer[0].intermediate.dense.out_features == 32
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).last_hidden_state, model(**inputs).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
    assert compactor.plan(model, inputs).params_after == compactor.report_of(small).params_after


def test_gpt2_conv1d_layers_are_sliced_and_generation_is_unchanged(tmp_path):
    """GPT-2's projections are Conv1D (weight stored (in, out)): per-layer masks on their output columns let the
    MLP neurons go (c_fc columns, c_proj rows), exactly, with greedy generate() unchanged; prune_channels masks
    whole MLP neurons and whole heads of the fused c_attn, and compact() removes all of them (num_heads and
    split_size follow on each attention module)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    model = _randomized(T.GPT2LMHeadModel(cfg).eval())
    for m in [m for m in model.modules() if isinstance(m, Conv1D)]:
        prune.ln_structured(m, "weight", amount=0.5, n=2, dim=1)  # Conv1D's output channels are its columns
    inputs = {"input_ids": _tokens()["input_ids"]}
    small = compactor.compact(model, inputs)
    for block in small.transformer.h:
        assert block.mlp.c_fc.weight.shape == (32, 64) and block.mlp.c_fc.nf == 64
        assert block.mlp.c_proj.weight.shape == (64, 32)
    prompt = inputs["input_ids"][:1]
    assert torch.equal(small.generate(prompt, max_new_tokens=12, do_sample=False),
                       model.generate(prompt, max_new_tokens=12, do_sample=False))
    fresh = _randomized(T.GPT2LMHeadModel(cfg).eval())
    report = compactor.prune_channels(fresh, inputs, 0.5, heads=0.5)
    assert sorted(g.masked for g in report.groups if g.masked) == [2, 2, 64, 64]  # 2 of 4 heads, 64 of 128 neurons
    again = compactor.compact(fresh, inputs)
    assert [g for g in compactor.report_of(again).groups if g.status != "removed"] == []
    assert again.transformer.h[1].mlp.c_fc.nf == 64
    for block in again.transformer.h:  # the fused QKV projection loses each removed head's Q, K and V columns
        att = block.attn
        assert (att.c_attn.weight.shape, att.c_proj.weight.shape, att.num_heads, att.split_size) == \
            ((32, 48), (16, 32), 2, 16)
    expected = fresh.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(again.generate(prompt, max_new_tokens=12, do_sample=False), expected)
    path = str(tmp_path / "gpt2.pt")  # save / load: Conv1D widths and each module's head counts come back
    compactor.save(again, path)
    reloaded = compactor.load(lambda: T.GPT2LMHeadModel(cfg), path)
    att = reloaded.transformer.h[0].attn
    assert (att.c_attn.nf, att.num_heads, att.split_size, reloaded.transformer.h[0].mlp.c_fc.nf) == (48, 2, 16, 64)
    assert torch.equal(reloaded.generate(prompt, max_new_tokens=12, do_sample=False), expected)


@pytest.mark.parametrize("family", ["Llama", "Mistral", "Qwen2"])
def test_kv_groups_go_with_their_query_heads(family):
    """LLaMA / Mistral / Qwen2 (one attention code; Qwen2's q/k/v carry biases), 8 query heads over 4 KV heads:
    prune_channels(0.5, heads=0.25) masks one KV head per layer with its 2 query heads, and half the MLP neurons;
    compact() removes all of it (q 64 -> 48 rows, k/v 32 -> 24, o 64 -> 48 columns, V biases folded into o),
    logits exact, greedy tokens unchanged."""
    torch.manual_seed(0)
    extra = {"attention_bias": True} if family == "Llama" else {}
    cfg = getattr(T, f"{family}Config")(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=4, **extra)
    model = getattr(T, f"{family}ForCausalLM")(cfg).eval()
    inputs = _tokens()
    report = compactor.prune_channels(model, inputs, 0.5, heads=0.25)
    assert sorted((g.units, g.masked) for g in report.groups if "self_attn.q_proj" in g.layers[0]) == [(4, 1), (4, 1)]
    small = compactor.compact(model, inputs)
    assert [g for g in compactor.report_of(small).groups if g.status != "removed"] == []
    for layer in small.model.layers:
        att = layer.self_attn
        assert (att.q_proj.out_features, att.k_proj.out_features, att.v_proj.out_features, att.o_proj.in_features) \
            == (48, 24, 24, 48)
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)
    prompt = inputs["input_ids"][:1]
    assert torch.equal(small.generate(prompt, max_new_tokens=16, do_sample=False),
                       model.generate(prompt, max_new_tokens=16, do_sample=False))


def test_bert_and_vit_heads_go_and_their_head_counts_follow():
    """BERT (query / key / value, O = attention.output.dense) and ViT (q/k/v/o_proj, no KV groups), 4 heads of 8:
    prune_channels(0.5, heads=0.5) masks 2 heads per layer; compact() removes them (Q 32 -> 16 rows, O 32 -> 16
    columns), updates each module's own head count (never the shared config), and outputs are exact."""
    torch.manual_seed(0)
    bert = _randomized(T.BertModel(T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64)).eval())
    inputs = _tokens()
    compactor.prune_channels(bert, inputs, 0.5, heads=0.5)
    small = compactor.compact(bert, inputs)
    for layer in small.encoder.layer:
        att = layer.attention
        assert (att.self.query.out_features, att.output.dense.in_features) == (16, 16)
        assert (att.self.num_attention_heads, att.self.all_head_size) == (2, 16)
    assert small.config.num_attention_heads == 4
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).last_hidden_state, bert(**inputs).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
    vit = _randomized(T.ViTForImageClassification(T.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=10)).eval())
    x = torch.randn(2, 3, 32, 32)
    compactor.prune_channels(vit, x, 0.5, heads=0.5)
    small = compactor.compact(vit, x)
    atts = [m for m in small.modules() if type(m).__name__ == "ViTAttention"]
    assert len(atts) == 2 and all((a.q_proj.out_features, a.o_proj.in_features, a.num_attention_heads) == (16, 16, 2)
                                  for a in atts)
    assert [g for g in compactor.report_of(small).groups if g.status != "removed"] == []
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits, vit(x).logits, rtol=1e-5, atol=1e-5)


def test_compact_llama_exports_to_onnx_with_onnxruntime_parity_on_logits(tmp_path):
    """The compact LLaMA (heads and GLU neurons removed) exports (a wrapper returning the logits, no cache) and
    onnxruntime computes the same logits at two batch sizes."""
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=4, use_cache=False)
    model = _randomized(T.LlamaForCausalLM(cfg).eval())
    ids = _tokens()["input_ids"]
    compactor.prune_channels(model, {"input_ids": ids}, 0.5, heads=0.25)
    small = compactor.compact(model, {"input_ids": ids})

    class Logits(nn.Module):
        def __init__(self, lm: nn.Module) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=input_ids, use_cache=False).logits

    report = compactor.export_onnx(Logits(small), (ids,), tmp_path / "llama.onnx")
    assert report.batch_sizes == [2, 1] and report.max_abs_diff <= report.tolerance


def test_t5_encoder_decoder_with_its_cache_compacts_and_generates_the_same():
    """T5 returns an EncoderDecoderCache beside the logits: it is not compared as tensors; MLP neurons go with
    per-layer masks, the logits are exact and greedy generation is unchanged."""
    torch.manual_seed(0)
    cfg = T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    model = T.T5ForConditionalGeneration(cfg).eval()
    for m in [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]:
        prune.ln_structured(m, "weight", amount=0.5, n=2, dim=0)
    ids = _tokens()["input_ids"]
    inputs = {"input_ids": ids, "decoder_input_ids": ids[:, :6]}
    small = compactor.compact(model, inputs)
    assert small.encoder.block[0].layer[1].DenseReluDense.wi.out_features == 32
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(small.generate(ids[:1], max_new_tokens=8, do_sample=False),
                       model.generate(ids[:1], max_new_tokens=8, do_sample=False))


def test_llama_glu_neurons_masked_in_either_projection_go():
    """Per-layer masks, as the seeds' loop leaves them: gate_proj 50 % and up_proj 25 % of rows, chosen separately.
    A neuron with either row masked (no bias) is zero after silu(gate) * up, so the union goes; greedy tokens equal."""
    model, _ = _llama()
    for layer in model.model.layers:
        prune.ln_structured(layer.mlp.gate_proj, "weight", amount=0.5, n=2, dim=0)
        prune.ln_structured(layer.mlp.up_proj, "weight", amount=0.25, n=2, dim=0)
    inputs = _tokens()
    small = compactor.compact(model, inputs)
    for big, layer in zip(model.model.layers, small.model.layers):
        either = (~big.mlp.gate_proj.weight_mask.bool().any(1)) | (~big.mlp.up_proj.weight_mask.bool().any(1))
        assert layer.mlp.gate_proj.out_features == layer.mlp.down_proj.in_features == 128 - int(either.sum())
    assert [g for g in compactor.report_of(small).groups if g.status != "removed"] == []
    prompt = inputs["input_ids"][:1]
    assert torch.equal(small.generate(prompt, max_new_tokens=16, do_sample=False),
                       model.generate(prompt, max_new_tokens=16, do_sample=False))


def test_distilbert_heads_go():
    """DistilBERT (q_lin / k_lin / v_lin / out_lin), 4 heads of 8: prune_channels(0.5, heads=0.5) masks 2 heads per
    layer and half the FFN neurons; compact() removes them, n_heads follows, outputs are exact."""
    torch.manual_seed(0)
    model = _randomized(T.DistilBertModel(T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64)).eval())
    inputs = _tokens()
    compactor.prune_channels(model, inputs, 0.5, heads=0.5)
    small = compactor.compact(model, inputs)
    for layer in small.transformer.layer:
        att = layer.attention
        assert (att.q_lin.out_features, att.out_lin.in_features, att.n_heads, layer.ffn.lin1.out_features) == \
            (16, 16, 2, 32)
    assert [g for g in compactor.report_of(small).groups if g.status != "removed"] == []
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).last_hidden_state, model(**inputs).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def _qwen2_v_masked(attn: str) -> tuple[nn.Module, dict]:
    """Qwen2 (V biases, as every trained Qwen2 has them nonzero), KV head 0 of layer 1 with its V rows masked,
    a tokenizer-style dict with a left-padded row."""
    torch.manual_seed(0)
    cfg = T.Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    m = _randomized(T.Qwen2ForCausalLM(cfg).eval())
    vp = m.model.layers[1].self_attn.v_proj
    mask = torch.ones_like(vp.weight)
    mask[:16] = 0
    prune.custom_from_mask(vp, "weight", mask)
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, :3] = 0  # left padding: the first queries of row 1 may attend to no key
    return m, {"input_ids": ids, "attention_mask": am}


def test_a_v_masked_head_with_a_v_bias_stays_where_sdpa_gives_fully_masked_queries_zero():
    """SDPA returns 0 for a query that may attend to no key (left padding), so there the removed head's V bias
    never reaches O: no bias of O can model that. The head stays, with the reason, and compact is exact
    (this raised VerificationError before)."""
    m, inputs = _qwen2_v_masked("sdpa")
    small = compactor.compact(m, inputs)
    kept = [g for g in compactor.report_of(small).groups if g.unit == "key/value heads" and g.status == "kept"]
    assert len(kept) == 1 and "do not sum to 1" in kept[0].reason
    assert small.model.layers[1].self_attn.v_proj.out_features == 32
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, m(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_a_v_masked_head_with_a_v_bias_goes_under_eager_attention():
    """Eager attention spreads a query with no key evenly over the keys (weights still sum to 1): the V bias
    reaches O at every position, so the head goes and its bias folds into O's bias; exact, padding included."""
    m, inputs = _qwen2_v_masked("eager")
    small = compactor.compact(m, inputs)
    attn = small.model.layers[1].self_attn
    assert attn.v_proj.out_features == 16 and attn.q_proj.out_features == 32
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, m(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_stablelm_head_counts_it_reshapes_with_are_updated():
    """StableLM's attention reshapes with self.num_heads and self.num_key_value_heads: prune_channels(heads=0.25)
    then compact updates both (8 / 4 heads -> 6 / 3), the logits are exact and greedy generation unchanged."""
    torch.manual_seed(0)
    cfg = T.StableLmConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=4)
    m = T.StableLmForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(0.5 if n.endswith("norm.weight") else 0.0, 0.1)
    ids = torch.randint(0, 200, (2, 8), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    compactor.prune_channels(m, inputs, 0.5, heads=0.25)
    small = compactor.compact(m, inputs)
    attn = small.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_key_value_heads, attn.q_proj.out_features) == (6, 3, 48)
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, m(**inputs).logits, rtol=1e-5, atol=1e-5)
        want = m.generate(ids[:1], max_new_tokens=8, do_sample=False)
        got = small.generate(ids[:1], max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


def _randomized(model: nn.Module) -> nn.Module:
    """Every bias and norm weight drawn at random (Hugging Face initializes them to 0 and 1, which hides folds)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in n.lower():  # LayerNorm, RMSNorm, layernorm_before ...
                p.normal_(1.0, 0.1)
    return model


def _padded_tokens(vocab: int) -> dict:
    ids = torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # a right-padded row
    return {"input_ids": ids, "attention_mask": mask}


def _masked_rows(model: nn.Module) -> dict[str, int]:
    return {n[:-len("_mask")]: int((b.flatten(1) == 0).all(1).sum()) for n, b in model.named_buffers()
            if n.endswith("weight_mask")}


def test_phi3_fused_qkv_and_gate_up_go_by_heads_and_neurons():
    """Phi-3 fuses Q, K and V into qkv_proj and gate and up into gate_up_proj (split by chunk). prune_channels(0.5,
    heads=0.25) masks one KV head (its 2 query heads, its K and V rows) per layer and half the neurons (both their
    gate and their up row); compact removes every masked row, updates the head counts the forward reads (the
    config's num_attention_heads, the module's num_key_value_heads), and logits and greedy tokens are unchanged."""
    torch.manual_seed(0)
    cfg = T.Phi3Config(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    m = _randomized(T.Phi3ForCausalLM(cfg).eval())
    inputs = _padded_tokens(200)
    report = compactor.prune_channels(m, inputs, 0.5, heads=0.25)
    assert sum(g.masked for g in report.groups) == 2 * (1 + 64)
    masked = _masked_rows(m)
    assert masked["model.layers.0.self_attn.qkv_proj.weight"] == 2 * 8 + 8 + 8
    assert masked["model.layers.0.mlp.gate_up_proj.weight"] == 2 * 64
    small = compactor.compact(m, inputs)
    layer = small.model.layers[0]
    assert (layer.self_attn.qkv_proj.out_features, layer.self_attn.o_proj.in_features) == (96, 48)
    assert (layer.mlp.gate_up_proj.out_features, layer.mlp.down_proj.in_features) == (128, 64)
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (6, 3)
    assert layer.self_attn.num_key_value_heads == 3
    assert m.config.num_attention_heads == 8  # the masked model's config is its own
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, m(**inputs).logits, rtol=1e-5, atol=1e-5)
        want = m.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert torch.equal(small.generate(**inputs, max_new_tokens=8, do_sample=False), want)


def test_phi3_heads_removed_unevenly_stay_where_the_shared_config_holds_the_count():
    """Phi-3 splits its fused QKV at config.num_attention_heads * head_dim, one value for every layer: a KV head
    masked by hand in one layer only is kept, with that reason, and the model stays exact."""
    torch.manual_seed(0)
    cfg = T.Phi3Config(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    m = _randomized(T.Phi3ForCausalLM(cfg).eval())
    qkv = m.model.layers[1].self_attn.qkv_proj
    mask = torch.ones_like(qkv.weight)
    mask[96 + 8:96 + 16] = 0  # V rows (after 64 Q and 32 K rows) of KV head 1, in layer 1 only
    prune.custom_from_mask(qkv, "weight", mask)
    inputs = _padded_tokens(200)
    small = compactor.compact(m, inputs)
    assert small.model.layers[1].self_attn.qkv_proj.out_features == 128
    assert any("reads num_attention_heads" in n.reason and n.status == "kept" for n in small.compaction_report.groups)
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, m(**inputs).logits, rtol=1e-5, atol=1e-5)


def _moe(family: str) -> nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "Mixtral":
        return _randomized(T.MixtralForCausalLM(T.MixtralConfig(intermediate_size=96, num_local_experts=8,
                                                                **common)).eval())
    return _randomized(T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(  # with a shared expert and V biases
        intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=80, num_experts=8,
        **common)).eval())


@pytest.mark.parametrize("family", ["Mixtral", "Qwen2Moe"])
def test_moe_expert_neurons_go_and_the_checkpoint_reloads_with_from_pretrained(family, tmp_path):
    """prune_channels(0.5, heads=0.5) on a mixture-of-experts LLM (8 experts, top-2; Qwen2-MoE with its shared
    expert): half the neurons of every expert in the fused 3-D tensors (the same count, different ones), half
    the shared expert's, one KV head per layer. compact removes every masked row, the router is untouched,
    logits and greedy tokens are unchanged, and save_pretrained writes a checkpoint vanilla from_pretrained
    loads (intermediate widths in the config)."""
    import json

    m = _moe(family)
    inputs = _padded_tokens(200)
    compactor.prune_channels(m, inputs, 0.5, heads=0.5)
    experts = m.model.layers[0].mlp.experts
    neurons = experts.down_proj.shape[2]
    assert ((experts.gate_up_proj.detach() == 0).all(-1).sum(1) == neurons).all()  # half of 2I rows per expert
    small = compactor.compact(m, inputs)
    assert small.model.layers[0].mlp.experts.down_proj.shape[2] == neurons // 2
    assert small.model.layers[0].mlp.gate.weight.shape == m.model.layers[0].mlp.gate.weight.shape
    assert small.model.layers[0].self_attn.k_proj.out_features == 16
    left = sum(int((p.detach() == 0).all(-1).sum()) for n, p in small.named_parameters() if p.dim() >= 2
               and "embed" not in n)
    assert left == 0  # no masked row stays
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, m(**inputs).logits, rtol=1e-5, atol=1e-5)
        want = m.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert torch.equal(small.generate(**inputs, max_new_tokens=8, do_sample=False), want)
    folder = compactor.save_pretrained(small, tmp_path / "small")
    with open(tmp_path / "small" / "config.json") as f:
        config = json.load(f)
    key = "moe_intermediate_size" if family == "Qwen2Moe" else "intermediate_size"
    assert config[key] == neurons // 2
    if family == "Qwen2Moe":
        assert config["shared_expert_intermediate_size"] == 40
    loaded, info = T.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs).logits, m(**inputs).logits, rtol=1e-5, atol=1e-5)


_ACCEPTANCE = {  # family -> (model class, config class, extra config)
    "Llama": ("LlamaForCausalLM", "LlamaConfig", {"attention_bias": True, "mlp_bias": True}),
    "Qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "Mistral": ("MistralForCausalLM", "MistralConfig", {}),
    "Phi3": ("Phi3ForCausalLM", "Phi3Config", {}),
    "Mixtral": ("MixtralForCausalLM", "MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "StableLm": ("StableLmForCausalLM", "StableLmConfig", {}),
}


@pytest.mark.parametrize("family", list(_ACCEPTANCE))
def test_prune_channels_then_compact_removes_what_it_masked_in_every_family(family):
    """Every bias and norm weight random, a right-padded attention mask: prune_channels(0.5, heads=0.25) then
    compact removes at least 99 % of the masked weight rows, and logits and greedy tokens are unchanged."""
    model_cls, config_cls, extra = _ACCEPTANCE[family]
    torch.manual_seed(0)
    cfg = getattr(T, config_cls)(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=8, num_key_value_heads=4, pad_token_id=0, bos_token_id=1,
                                 eos_token_id=2, **extra)
    m = _randomized(getattr(T, model_cls)(cfg).eval())
    inputs = _padded_tokens(200)
    compactor.prune_channels(m, inputs, 0.5, heads=0.25)
    masked = sum(_masked_rows(m).values()) + sum(int((b == 0).all(-1).sum()) for n, b in m.named_buffers()
                                                 if n.endswith("proj_mask") and b.dim() == 3)  # expert tensors
    small = compactor.compact(m, inputs)
    removed = sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in small.parameters())
    rows_left = sum(int((p.detach() == 0).all(-1).sum()) for n, p in small.named_parameters()
                    if p.dim() >= 2 and "embed" not in n)
    assert masked > 0 and removed > 0
    assert rows_left <= 0.01 * masked, f"{rows_left} of {masked} masked rows left"
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, m(**inputs).logits, rtol=1e-5, atol=1e-5)
        want = m.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert torch.equal(small.generate(**inputs, max_new_tokens=8, do_sample=False), want)


@pytest.mark.parametrize("family", ["GPTNeoX", "Falcon"])
def test_qkv_interleaved_per_head_or_per_kv_group_loses_whole_groups(family):
    """GPT-NeoX fuses Q, K and V per head ([q_h, k_h, v_h] rows), Falcon's new architecture per key/value group
    ([q heads of group g, k_g, v_g]): prune_channels(heads=0.25) masks whole groups where that layout puts them
    (checked on the model), compact removes them with their dense columns, logits and tokens unchanged."""
    torch.manual_seed(0)
    common = dict(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if family == "GPTNeoX":
        m = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(intermediate_size=128, attention_bias=True, **common))
        attention = lambda model: model.gpt_neox.layers[0].attention  # noqa: E731
        rows, columns = 3 * 64 - 2 * 3 * 8, 64 - 2 * 8  # 2 of 8 heads, 3 x 8 rows each
    else:
        m = T.FalconForCausalLM(T.FalconConfig(new_decoder_architecture=True, num_kv_heads=4, bias=True, **common))
        attention = lambda model: model.transformer.h[0].self_attention  # noqa: E731
        rows, columns = (8 + 2 * 4) * 8 - (2 + 2) * 8, 64 - 2 * 8  # 1 of 4 KV groups: 2 query heads, K, V
    m = _randomized(m.eval())
    inputs = _padded_tokens(200)
    compactor.prune_channels(m, inputs, 0.5, heads=0.25)
    small = compactor.compact(m, inputs)
    att = attention(small)
    assert (att.query_key_value.out_features, att.dense.in_features) == (rows, columns)
    assert [g for g in small.compaction_report.groups if g.unit == "key/value heads" and g.status != "removed"] == []
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, m(**inputs).logits, rtol=1e-5, atol=1e-5)
        want = m.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert torch.equal(small.generate(**inputs, max_new_tokens=8, do_sample=False), want)


_ROUND_TRIP = {  # family -> (model class, config class, extra config)
    **_ACCEPTANCE,
    "GPT2": ("GPT2LMHeadModel", "GPT2Config", {}),
    "GPTNeoX": ("GPTNeoXForCausalLM", "GPTNeoXConfig", {"attention_bias": True}),
    "Qwen2Moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2,
                                                           "moe_intermediate_size": 48,
                                                           "shared_expert_intermediate_size": 80}),
}


@pytest.mark.parametrize("family", sorted(_ROUND_TRIP))
def test_uniform_pruning_round_trips_through_vanilla_from_pretrained(family, tmp_path):
    """prune_channels(0.5, heads=0.25, uniform=True, scope="global") -> compact -> save_pretrained -> vanilla
    from_pretrained: no missing or unexpected keys, identical logits and greedy tokens. uniform=True gives every
    block the same widths despite the global ranking, and head counts the family's config describes (LLaMA at
    hidden 64 rejects 6 query heads: 4 are kept, said in the report; GPT-2's config has no head_dim: no head
    goes)."""
    model_cls, config_cls, extra = _ROUND_TRIP[family]
    torch.manual_seed(0)
    sizes = dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "GPT2":
        sizes = dict(vocab_size=200, n_embd=64, n_layer=2, n_head=8, bos_token_id=1, eos_token_id=2)
    m = _randomized(getattr(T, model_cls)(getattr(T, config_cls)(**sizes, **extra)).eval())
    inputs = _padded_tokens(200)
    report = compactor.prune_channels(m, inputs, 0.5, heads=0.25, uniform=True, scope="global")
    assert sum(g.masked for g in report.groups) > 0
    small = compactor.compact(m, inputs)
    folder = compactor.save_pretrained(small, tmp_path / family)
    loaded, info = T.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in small.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs).logits, m(**inputs).logits, rtol=1e-5, atol=1e-5)
        want = m.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert torch.equal(loaded.generate(**inputs, max_new_tokens=8, do_sample=False), want)
    if family == "Llama":
        assert any("LlamaConfig describes 4 query heads, not 6" in line for line in report.adjusted)
        assert loaded.config.num_attention_heads == 4
    # the compact model's own config describes it too: the family's own save_pretrained writes a loadable folder
    assert "model.config updated to the compact widths" in small.compaction_report.config
    small.save_pretrained(tmp_path / "own")
    own = getattr(T, model_cls).from_pretrained(tmp_path / "own").eval()
    with torch.no_grad():
        torch.testing.assert_close(own(**inputs).logits, m(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_a_decoding_step_exports_with_its_cache_and_onnxruntime_generates_torchs_tokens(tmp_path):
    """export_onnx(small, tokens, cache=True): one decoding step with the key/value cache as inputs and outputs,
    checked at two batch sizes, past and step lengths; export/run_onnx.py's greedy loop (numpy and onnxruntime
    only) then gives the tokens torch's generate() gives, for two prompts at once and from the command line."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=4, attention_bias=True, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, initializer_range=0.3)  # larger weights: varied tokens
    m = _randomized(T.LlamaForCausalLM(cfg).eval())
    inputs = _padded_tokens(200)
    inputs["attention_mask"][:] = 1
    compactor.prune_channels(m, inputs, 0.5, heads=0.5)
    small = compactor.compact(m, inputs)
    report = compactor.export_onnx(small, inputs, tmp_path / "step.onnx", cache=True)
    assert report.input_names[:4] == ["input_ids", "attention_mask", "position_ids", "past.0.key"]
    assert report.output_names[:2] == ["logits", "present.0.key"] and report.max_abs_diff <= report.tolerance
    runner = Path(__file__).resolve().parents[2] / "export" / "run_onnx.py"
    spec = importlib.util.spec_from_file_location("run_onnx", runner)
    run_onnx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_onnx)
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    prompt = inputs["input_ids"][:, :6]
    got = run_onnx.generate(session, prompt.numpy(), 10)
    with torch.no_grad():
        greedy = dict(max_new_tokens=10, do_sample=False, eos_token_id=None)  # the runner stops at no token
        want = small.generate(prompt, **greedy)
        assert torch.equal(m.generate(prompt, **greedy), want)
    assert len(set(want[0, 6:].tolist())) > 1
    assert got.tolist() == want.tolist()
    cli = subprocess.run([sys.executable, str(runner), str(tmp_path / "step.onnx"), "--generate", "10", "--prompt",
                          ",".join(map(str, prompt[0].tolist()))], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert f"tokens: {','.join(map(str, want[0].tolist()))}" in cli.stdout


@pytest.mark.parametrize("importance", ["activation", "taylor"])
def test_measured_importance_on_an_llm_with_its_own_loss(importance):
    """importance="activation" / "taylor" (the model's own loss on its tokens, padding left out) over calibration
    dicts: neurons and KV groups masked, compact removes all of them, logits and tokens unchanged."""
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    m = _randomized(T.LlamaForCausalLM(cfg).eval())
    inputs = _padded_tokens(200)
    calibration = [{"input_ids": torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(i)),
                    "attention_mask": torch.ones(2, 12, dtype=torch.long)} for i in range(3)]
    report = compactor.prune_channels(m, inputs, 0.5, heads=0.25, importance=importance, calibration=calibration)
    assert report.calibration[0] == 3 and sum(g.masked for g in report.groups) == 2 * (64 + 1)
    assert all(p.grad is None for p in m.parameters())
    small = compactor.compact(m, inputs)
    assert [g for g in small.compaction_report.groups if g.status != "removed"] == []
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, m(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_export_onnx_takes_the_tokenizer_dict_compact_takes(tmp_path):
    """export_onnx(small, {"input_ids", "attention_mask"}): ONNX inputs of those names, the cache off, the output
    named "logits"; onnxruntime equals torch at two batch sizes, a left-padded row included."""
    import onnxruntime as ort

    model, _ = _llama()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.1)
    inputs = _tokens()
    inputs["attention_mask"][1, :4] = 0
    compactor.prune_channels(model, inputs, 0.5, heads=0.5)
    small = compactor.compact(model, inputs)
    path = tmp_path / "llama.onnx"
    report = compactor.export_onnx(small, inputs, path)
    assert report.batch_sizes == [2, 1] and report.max_abs_diff <= report.tolerance
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    (logits,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(**inputs).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Mistral", "Phi3"])
def test_save_pretrained_loads_with_vanilla_from_pretrained(family, tmp_path):
    """prune_channels(0.5, heads=0.5) -> compact -> compactor.save_pretrained: config.json holds the compact
    widths (4 / 2 heads, explicit head_dim 16, intermediate 128), AutoModelForCausalLM.from_pretrained loads it
    with no missing or unexpected keys, and its logits and greedy tokens equal the masked model's."""
    import json

    torch.manual_seed(0)
    cfg = getattr(T, f"{family}Config")(vocab_size=100, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=4, pad_token_id=0,
                                         bos_token_id=1, eos_token_id=2)
    model = _randomized(getattr(T, f"{family}ForCausalLM")(cfg).eval())  # RMSNorm weights too, as trained
    inputs = _tokens()
    compactor.prune_channels(model, inputs, 0.5, heads=0.5)
    small = compactor.compact(model, inputs).train()
    folder = compactor.save_pretrained(small, tmp_path / "small")
    assert all(m.training for m in small.modules())  # its check ran in eval mode; the flags are restored
    with open(tmp_path / "small" / "config.json") as f:
        config = json.load(f)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
            config["intermediate_size"]) == (4, 2, 16, 128)
    loaded, info = T.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)
        ids = inputs["input_ids"][:1]
        assert torch.equal(loaded.generate(ids, max_new_tokens=8, do_sample=False),
                           model.generate(ids, max_new_tokens=8, do_sample=False))


def test_save_pretrained_refuses_what_no_config_can_describe(tmp_path):
    """Per-layer MLP widths (scope='global') and a head count LlamaConfig rejects (6 heads at hidden 128): a clear
    error naming the widths, and nothing written."""
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=100, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=4)
    inputs = _tokens()
    model = _randomized(T.LlamaForCausalLM(cfg).eval())
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight.mul_(3.0)  # layer 0's neurons score higher: uneven widths
    compactor.prune_channels(model, inputs, 0.5, scope="global")
    small = compactor.compact(model, inputs)
    with pytest.raises(compactor.CompactionError, match=r"MLP widths differ between layers .*uniform=True"):
        compactor.save_pretrained(small, tmp_path / "a")
    model = _randomized(T.LlamaForCausalLM(cfg).eval())
    compactor.prune_channels(model, inputs, 0.5, heads=0.25)
    with pytest.raises(compactor.CompactionError, match=r"LlamaConfig rejects .*'num_attention_heads': 6.*not a "
                                                        r"multiple of the number of attention heads"):
        compactor.save_pretrained(compactor.compact(model, inputs), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_save_pretrained_of_a_head_pruned_gpt2_says_the_config_cannot_describe_it(tmp_path):
    """GPT-2 derives the head size as hidden_size / heads and has no head_dim: after heads go, no GPT2Config
    describes the model (GPT2LMHeadModel built from one has other shapes), and save_pretrained says so
    (CompactionError), writing nothing."""
    torch.manual_seed(0)
    model = _randomized(T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=32)).eval())
    inputs = _tokens()
    compactor.prune_channels(model, inputs, 0.5, heads=0.5)
    small = compactor.compact(model, inputs)
    with pytest.raises(compactor.CompactionError, match=r"no GPT2Config describes the compact model \(built from it, "
                                                         r"GPT2LMHeadModel has 'transformer.h.0.attn.c_attn.bias'"):
        compactor.save_pretrained(small, tmp_path / "gpt2")
    assert not (tmp_path / "gpt2").exists() and [p.name for p in tmp_path.iterdir()] == []
