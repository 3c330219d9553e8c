"""Lesson 6 plumbing (brewslm_helpers.quant) on tiny inputs: reference quantizers, the GGUF copy
writer (metadata kept, types and values right), llama.cpp's quantizer error path, the ONNX export
and onnxruntime parity on a tiny Llama, perplexity, the manifest row and the held-out set."""
from __future__ import annotations

import hashlib
import json
import math

import gguf
import numpy as np
import pytest
import torch

from brewslm_helpers import quant


def test_heldout_set_is_distinct_prose():
    rows = [json.loads(line) for line in quant.HELDOUT_FILE.read_text().splitlines()]
    texts = quant.load_heldout()
    assert len(texts) == len(rows) >= 12
    assert len({r["id"] for r in rows}) == len(rows) and len(set(texts)) == len(texts)
    assert all(len(t.split()) >= 80 for t in texts)
    assert quant.load_heldout(2) == texts[:2]


def test_minmax_grid_and_rtn():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=g)
    w[2] = 0.7  # a constant positive row: the grid still holds 0 and 0.7
    for bits in (2, 3, 4, 8):
        scale, zero = quant.minmax_params(w, bits)
        assert scale.shape == zero.shape == (6, 1) and (scale > 0).all()
        w_hat = quant.quantize_grid(w, scale, zero, bits)
        assert torch.allclose(quant.quantize_grid(w_hat, scale, zero, bits), w_hat, atol=1e-6)  # idempotent
        assert ((w - w_hat).abs() <= scale / 2 + 1e-6).all()  # no clipping with a min-max grid
        assert torch.allclose(quant.quantize_grid(torch.zeros(6, 1), scale, zero, bits), torch.zeros(6, 1))
    per_row = quant.rtn_quantize(w, 4)
    grouped = quant.rtn_quantize(w, 4, group_size=16)
    assert torch.linalg.norm(w - grouped) < torch.linalg.norm(w - per_row)
    with pytest.raises(ValueError):
        quant.rtn_quantize(w, 4, group_size=10)


def test_absmax_dequantize_shapes():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(2, 2)  # [2, 32]
    assert torch.equal(quant.absmax_dequantize(q, torch.tensor([[0.5]])), q.float() * 0.5)
    scale = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = quant.absmax_dequantize(q, scale)
    assert torch.equal(out[1, 16:], q[1, 16:].float() * 4.0) and torch.equal(out[0, :16], q[0, :16].float())


def test_output_error():
    W = torch.eye(4)
    X = torch.randn(10, 4)
    assert quant.output_error(W, W, X) == 0.0
    assert quant.output_error(W, 1.1 * W, X) == pytest.approx(0.1, rel=1e-5)


def test_perplexity_from_logits():
    V = 50
    ids = [[1, 2, 3, 4], [5, 6, 7]]
    uniform = [np.zeros((len(x), V), np.float32) for x in ids]
    assert quant.perplexity_from_logits(uniform, ids) == pytest.approx(V, rel=1e-5)
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal((len(x), V)).astype(np.float32) for x in ids]
    nll = sum(float(torch.nn.functional.cross_entropy(torch.tensor(l[:-1]), torch.tensor(x[1:]), reduction="sum"))
              for l, x in zip(logits, ids))
    assert quant.perplexity_from_logits(logits, ids) == pytest.approx(math.exp(nll / 5), rel=1e-5)


def _tiny_gguf(path):
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(1)
    writer.add_file_type(0)
    writer.add_token_list(["<a>", "<b>", "c"])
    writer.add_chat_template("{{ messages }}")
    rng = np.random.default_rng(0)
    mat = rng.standard_normal((4, 64)).astype(np.float32)
    norm = rng.standard_normal(64).astype(np.float32)
    writer.add_tensor("blk.0.attn_q.weight", mat)
    writer.add_tensor("blk.0.attn_norm.weight", norm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return mat, norm


@pytest.mark.parametrize("qtype,bpw,tol", [("F16", 16, 1e-3), ("Q8_0", 8.5, 0.02), ("F32", 32, 0)])
def test_write_gguf_copies_metadata_and_converts(tmp_path, qtype, bpw, tol):
    src, dst = tmp_path / "src.gguf", tmp_path / f"dst-{qtype}.gguf"
    mat, norm = _tiny_gguf(src)
    quant.write_gguf(src, dst, qtype)
    reader = gguf.GGUFReader(str(dst))
    assert reader.get_field("general.architecture").contents() == "llama"
    assert reader.get_field("tokenizer.ggml.tokens").contents() == ["<a>", "<b>", "c"]
    assert reader.get_field("tokenizer.chat_template").contents() == "{{ messages }}"
    assert reader.get_field("general.file_type").contents() == quant.FTYPES[qtype]
    types = {t["name"]: t["type"] for t in quant.gguf_tensors(dst)}
    assert types == {"blk.0.attn_q.weight": qtype, "blk.0.attn_norm.weight": "F32"}
    assert np.abs(quant.gguf_tensor_f32(dst, "blk.0.attn_q.weight") - mat).max() <= tol * np.abs(mat).max()
    assert np.array_equal(quant.gguf_tensor_f32(dst, "blk.0.attn_norm.weight"), norm)
    raw, name = quant.gguf_tensor_bytes(dst, "blk.0.attn_q.weight")
    assert name == qtype and raw.dtype == np.uint8
    expected_bits = 8 * (raw.size + 64 * 4) / (4 * 64 + 64)
    assert quant.gguf_bits_per_weight(dst) == pytest.approx(expected_bits)
    assert 8 * raw.size / mat.size == pytest.approx(bpw)
    with pytest.raises(KeyError):
        quant.gguf_tensor_f32(dst, "missing.weight")


def test_llama_quantize_reports_failure(tmp_path):
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(RuntimeError, match="llama_model_quantize"):
        quant.llama_quantize(bad, tmp_path / "out.gguf", "Q8_0")
    assert not (tmp_path / "out.gguf").exists()


def test_onnx_export_parity_and_int8(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=64)).eval()
    path = quant.export_onnx(model, tmp_path / "tiny.onnx")
    session = quant.onnx_session(path)
    ids = [3, 17, 5, 9, 60, 2, 11]
    diff = np.abs(quant.onnx_logits(session, ids) - quant.torch_logits(model, ids)).max()
    assert diff < 1e-4, diff
    int8 = quant.onnx_quantize_int8(path, tmp_path / "tiny-int8.onnx")
    assert quant.onnx_weight_bytes(int8) < quant.onnx_weight_bytes(path)
    assert quant.onnx_logits(quant.onnx_session(int8), ids).shape == (len(ids), 96)
    assert quant.onnx_decode_speed(session, ids[:3], 2) > 0


def test_manifest_row_and_sha(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 1000)
    assert quant.sha256(f) == hashlib.sha256(b"x" * 1000).hexdigest()
    row = quant.manifest_row("v", "GGUF", "Q8_0", "llama.cpp", 850, 800, f, 12.5, 100.0)
    assert set(row) == set(quant.MANIFEST_COLUMNS)
    assert row["bytes"] == 1000 and row["bits_per_weight"] == pytest.approx(8.5) and row["sha256"] == quant.sha256(f)
    assert quant.manifest_row("m", "PyTorch", "NF4", "torch", 500, 1000, None, 1, 1)["bytes"] == 500


def test_layer_of():
    assert quant.layer_of("blk.17.ffn_down.weight") == 17
    assert quant.layer_of("token_embd.weight") is None
