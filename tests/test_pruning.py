"""brewslm_helpers.pruning: lesson 13's plumbing, and the removal recipe on SmolLM2's real shapes.

Tiny models only. The removal itself is an exercise, so the reference here is written with
transformers' ``prune_linear_layer``: it checks that the recipe (rows and columns, GQA grouping, the
config fields) gives the gated-to-zero model and reloads with ``from_pretrained`` in this transformers.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import prune_linear_layer

from brewslm_helpers import pruning, quant

IDS = torch.tensor([[3, 14, 15, 9, 2, 6, 5, 35, 8, 9]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def smollm_shaped(num_layers: int = 2) -> LlamaForCausalLM:
    """SmolLM2-135M's layer shapes (hidden 576, 9 query / 3 KV heads of 64, MLP 1536), 2 layers, vocab 64."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=576, num_hidden_layers=num_layers, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, intermediate_size=1536, max_position_embeddings=64,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
    return LlamaForCausalLM(config).eval()


def reference_prune(model, keep_channels: torch.Tensor, keep_heads: torch.Tensor):
    """The recipe with prune_linear_layer: channels (gate/up rows, down columns), heads respecting GQA."""
    config = model.config
    group = config.num_attention_heads // config.num_key_value_heads
    d = config.head_dim
    n_kv = None
    for layer, channels, heads in zip(model.model.layers, keep_channels, keep_heads):
        mlp, attn = layer.mlp, layer.self_attn
        mlp.gate_proj = prune_linear_layer(mlp.gate_proj, channels, 0)
        mlp.up_proj = prune_linear_layer(mlp.up_proj, channels, 0)
        mlp.down_proj = prune_linear_layer(mlp.down_proj, channels, 1)
        heads = torch.sort(heads).values
        kv, counts = torch.unique(heads // group, return_counts=True)
        rows = (heads[:, None] * d + torch.arange(d)).flatten()
        kv_rows = (kv[:, None] * d + torch.arange(d)).flatten()
        attn.q_proj = prune_linear_layer(attn.q_proj, rows, 0)
        attn.k_proj = prune_linear_layer(attn.k_proj, kv_rows, 0)
        attn.v_proj = prune_linear_layer(attn.v_proj, kv_rows, 0)
        attn.o_proj = prune_linear_layer(attn.o_proj, rows, 1)
        attn.num_key_value_groups = int(counts[0])
        n_kv = len(kv)
    config.intermediate_size = keep_channels.shape[1]
    config.num_attention_heads = keep_heads.shape[1]
    config.num_key_value_heads = n_kv
    config.head_dim = d
    return model


@pytest.mark.parametrize("keep_heads", [[0, 2, 3, 5, 6, 8], [3, 4, 5, 6, 7, 8]], ids=["head per group", "whole group"])
def test_recipe_on_smollm_shapes_matches_gating_and_reloads(tmp_path, keep_heads):
    model = smollm_shaped()
    gen = torch.Generator().manual_seed(0)
    channels = torch.stack([torch.randperm(1536, generator=gen)[:1152] for _ in range(2)])
    heads = torch.tensor([keep_heads, keep_heads])
    with pruning.gate_units(model, mlp_keep=dict(enumerate(channels)), head_keep=dict(enumerate(heads))):
        want = logits(model)
    small = reference_prune(copy.deepcopy(model), channels, heads)
    assert (logits(small) - want).abs().max() < 1e-5
    small.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(reloaded) - want).abs().max() < 1e-5
    assert pruning.param_count(reloaded) < pruning.param_count(model)
    attn, small_attn = reloaded.model.layers[0].self_attn, small.model.layers[0].self_attn
    assert attn.num_key_value_groups == small_attn.num_key_value_groups
    out = reloaded.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 4)


def test_stale_config_does_not_reload(tmp_path):
    """Forgetting the config: from_pretrained refuses (or does not give the pruned model back)."""
    model = pruning.tiny_llama()
    keep = torch.arange(12)
    for layer in model.model.layers:
        layer.mlp.gate_proj = prune_linear_layer(layer.mlp.gate_proj, keep, 0)
        layer.mlp.up_proj = prune_linear_layer(layer.mlp.up_proj, keep, 0)
        layer.mlp.down_proj = prune_linear_layer(layer.mlp.down_proj, keep, 1)
    want = logits(model)
    model.save_pretrained(tmp_path)
    try:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    except Exception:  # noqa: BLE001 (a size-mismatch error is the expected outcome)
        return
    assert not torch.allclose(logits(reloaded), want, atol=1e-5)


def test_gate_units_equals_zeroed_weights():
    model = pruning.tiny_llama(seed=2)
    keep_c, keep_h = torch.tensor([0, 1, 5, 7, 20]), torch.tensor([1, 3])
    with pruning.gate_units(model, mlp_keep={1: keep_c}, head_keep={0: keep_h}):
        gated = logits(model)
    after = logits(model)  # hooks removed on exit
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        drop_c = torch.ones(24, dtype=torch.bool)
        drop_c[keep_c] = False
        zeroed.model.layers[1].mlp.down_proj.weight[:, drop_c] = 0
        o = zeroed.model.layers[0].self_attn.o_proj.weight
        for h in (0, 2):
            o[:, h * 4:(h + 1) * 4] = 0
    assert torch.allclose(gated, logits(zeroed), atol=1e-6)
    assert torch.allclose(after, logits(model)) and not torch.allclose(after, gated)


def test_token_batches_pad_and_labels(tok):
    batches = pruning.token_batches(tok, ["a short text", "a somewhat longer text than the first one", "x"], 6, 2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    first = batches[0]
    assert first["input_ids"].shape[1] <= 6
    assert torch.equal(first["labels"] == -100, first["attention_mask"] == 0)


def test_perplexity_matches_lesson6_formula():
    model = pruning.tiny_llama(seed=4)
    ids = [[1, 5, 9, 3, 7], [2, 8, 4]]
    want = quant.perplexity_from_logits([quant.torch_logits(model, x) for x in ids], ids)
    assert abs(pruning.perplexity(model, ids) - want) < 1e-4 * want


def test_param_count_counts_tied_weights_once():
    model = smollm_shaped(1)
    assert pruning.param_count(model) == model.num_parameters()
    assert pruning.weight_bytes(model) == 4 * pruning.param_count(model)


def test_sparse_vs_dense_rows():
    table = pruning.sparse_vs_dense({"m": (32, 16)}, [0.5, 0.9], n_cols=[1, 4], repeats=2)
    assert len(table) == 4 and (table["speed-up"] > 0).all()
    assert set(table["sparsity"]) == {0.5, 0.9}


def test_block_influence_and_drop_layers(tmp_path):
    model = pruning.tiny_llama(num_layers=3, seed=5)
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    influence = pruning.block_influence(model, [batch])
    assert influence.shape == (3,) and (influence >= -1e-6).all() and (influence <= 2).all()
    small = pruning.drop_layers(model, [1])
    assert small.config.num_hidden_layers == 2
    reloaded, _ = pruning.save_and_reload(small, tmp_path)
    assert torch.allclose(logits(reloaded), logits(small), atol=1e-5)


def test_speeds_table():
    model = pruning.tiny_llama(seed=6)
    table = pruning.speeds({"a": model, "b": pruning.drop_layers(model, [0])}, [1, 2, 3, 4], 3, repeats=1,
                           prefill_tokens=8)
    assert list(table.index) == ["a", "b"] and (table > 0).all().all()


def test_lora_recover_keeps_pruned_shapes(tiny_llama_of, tok):
    model = tiny_llama_of(2)
    merged, losses, seconds = pruning.lora_recover(model, tok, ["Hello there, this is a text."] * 4, steps=2,
                                                   batch_size=2, r=4, max_length=16)
    assert len(losses) == 2 and seconds > 0
    assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert merged.model.layers[0].mlp.up_proj.weight.shape == (64, 32)


def test_kd_recover_keeps_pruned_shapes_and_moves_toward_the_teacher(tiny_llama_of, tok):
    from brewslm_helpers import models

    teacher = tiny_llama_of(2)
    student = models.student_from_config(tok, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                         intermediate_size=64, seed=1)  # other weights: far from the teacher
    texts = ["Hello there, this is a text.", "Another short line of words."]
    merged, losses, seconds = pruning.kd_recover(student, teacher, tok, texts, steps=8, batch_size=2,
                                                 lr=1e-2, r=4, max_length=16)
    assert len(losses) == 8 and seconds > 0 and losses[-1] < 0.99 * losses[0], losses  # KL falls
    assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert merged.model.layers[0].mlp.up_proj.weight.shape == (64, 32)


def test_calibration_texts_are_cached(tiny_llama_of, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("BREWSLM_CACHE", str(tmp_path))
    model = tiny_llama_of(1)
    texts = pruning.calibration_texts(model, tok, 2, 4, "ci", batch_size=2)
    assert len(texts) == 2
    path = tmp_path / "artifacts" / "ci" / pruning.CALIBRATION_FILE
    stamp = path.stat().st_mtime_ns
    assert pruning.calibration_texts(model, tok, 1, 4, "ci") == texts[:1] and path.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError):
        pruning.calibration_texts(model, tok, len(pruning.TOPICS) + 1, 4, "ci")
