"""Lesson 6 plumbing: quantized files in the real formats, their runtimes, and the export manifest.

What is here (none of it is an exercise's answer):
- round-to-nearest reference quantizers the AWQ/GPTQ exercises build on (asymmetric min-max grid,
  as the AWQ and GPTQ reference code use), and ``absmax_dequantize`` for the absmax exercise's output;
- GGUF: read tensor types and sizes, write a GGUF copy of the shipped model in F32/F16/Q8_0 with the
  ``gguf`` package (all metadata, tokenizer included, copied), and run llama.cpp's own quantizer
  (``llama_model_quantize`` through llama-cpp-python) for Q8_0 / Q4_K_M;
- llama.cpp runtime: perplexity from ``logits_all`` and greedy decode tokens/s;
- ONNX: export the decoder (logits only, no KV cache), run it with onnxruntime, dynamic int8;
- bitsandbytes NF4 on CPU; torch perplexity and decode speed;
- the held-out text set (``data/heldout_texts.jsonl``) and the manifest row (with sha256).

Every variant descends from the shipped Q4_1 GGUF: the "F32" file is the dequantized Q4_1 model.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from .budget import cpu_threads
from .paths import cache_dir

HELDOUT_FILE = Path(__file__).parent / "data" / "heldout_texts.jsonl"

# llama.cpp file types (enum llama_ftype) for the variants this lesson writes
FTYPES = {"F32": 0, "F16": 1, "Q4_1": 3, "Q8_0": 7, "Q2_K": 10, "Q4_K_M": 15}


def quant_dir() -> Path:
    """``$BREWSLM_CACHE/quant``: where the lesson's GGUF and ONNX files are cached."""
    path = cache_dir() / "quant"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Held-out text
# ----------------------------------------------------------------------------------------------

def load_heldout(n: int | None = None) -> list[str]:
    """The held-out texts (plain English prose written for this course, never used for calibration)."""
    rows = [json.loads(line) for line in HELDOUT_FILE.read_text().splitlines() if line.strip()]
    texts = [r["text"] for r in rows]
    return texts if n is None else texts[:n]


def heldout_token_ids(tokenizer, n_texts: int | None, max_tokens: int) -> list[list[int]]:
    """Token ids of the first ``n_texts`` held-out texts (no special tokens), each cut to ``max_tokens``."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in load_heldout(n_texts)]


def perplexity_from_logits(logits_per_text: list[np.ndarray], ids_per_text: list[list[int]]) -> float:
    """exp(mean next-token negative log-likelihood) over all texts; ``logits[i]`` is ``[T, V]``."""
    nll, count = 0.0, 0
    for logits, ids in zip(logits_per_text, ids_per_text):
        x = torch.as_tensor(np.asarray(logits, dtype=np.float32))[:-1]
        target = torch.as_tensor(ids[1:])
        nll += float(torch.nn.functional.cross_entropy(x, target, reduction="sum"))
        count += len(ids) - 1
    return math.exp(nll / count)


# ----------------------------------------------------------------------------------------------
# Round-to-nearest reference quantizers (min-max grid, as AWQ/GPTQ reference code) and absmax
# ----------------------------------------------------------------------------------------------

def minmax_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per-row grid for ``w`` ``[R, C]``: ``(scale [R, 1], zero [R, 1])``.

    The grid always contains 0; a row that is constant gets scale 1 (GPTQ's convention).
    """
    maxq = 2 ** bits - 1
    lo = torch.clamp(w.min(dim=1, keepdim=True).values, max=0)
    hi = torch.clamp(w.max(dim=1, keepdim=True).values, min=0)
    scale = (hi - lo) / maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.round(-lo / scale)
    return scale, zero


def quantize_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``w`` to the grid ``scale * (q - zero)``, ``q`` in ``[0, 2^bits - 1]``; returns dequantized values."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)
    return scale * (q - zero)


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Round-to-nearest baseline: min-max grid per row (``group_size`` None) or per group of a row.

    ``w`` ``[R, C]`` float; returns the dequantized ``[R, C]`` tensor.
    """
    R, C = w.shape
    g = C if group_size is None else group_size
    if C % g:
        raise ValueError(f"group_size {g} does not divide {C}")
    flat = w.reshape(-1, g)
    return quantize_grid(flat, *minmax_params(flat, bits), bits).reshape(R, C)


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Undo an absmax quantization: ``q`` ``[R, C]`` ints, ``scale`` ``[R, G]`` (``[1, 1]`` per tensor)."""
    R, C = q.shape
    G = scale.shape[1]
    return (q.float().reshape(R, G, C // G) * scale.float().unsqueeze(-1)).reshape(R, C)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """Relative output error ||X W^T - X W_hat^T||_F / ||X W^T||_F of a linear layer on inputs ``X [N, in]``."""
    ref = X @ W.T
    return float(torch.linalg.norm(ref - X @ W_hat.T) / torch.linalg.norm(ref))


# ----------------------------------------------------------------------------------------------
# GGUF files
# ----------------------------------------------------------------------------------------------

_READERS: dict = {}


def gguf_reader(path: str | Path):
    """A ``gguf.GGUFReader`` for ``path`` (memory-mapped), reused while the file is unchanged.

    Parsing the header (49k tokenizer strings) takes seconds, so readers are cached by path and mtime.
    """
    import gguf
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _READERS:
        _READERS[key] = gguf.GGUFReader(str(path))
    return _READERS[key]


def gguf_tensors(path: str | Path) -> list[dict]:
    """One dict per tensor: name, type (str), shape (ggml order: row length first), n_elements, n_bytes."""
    reader = gguf_reader(path)
    return [{"name": t.name, "type": t.tensor_type.name, "shape": [int(s) for s in t.shape],
             "n_elements": int(t.n_elements), "n_bytes": int(t.n_bytes)} for t in reader.tensors]


def gguf_bits_per_weight(path: str | Path) -> float:
    """8 x (bytes of all tensor data) / (number of weights): the file's real bits per weight."""
    tensors = gguf_tensors(path)
    return 8 * sum(t["n_bytes"] for t in tensors) / sum(t["n_elements"] for t in tensors)


def gguf_tensor_f32(path: str | Path, name: str) -> np.ndarray:
    """One tensor of a GGUF file, dequantized to float32, shape ``[rows, row_length]``."""
    import gguf
    reader = gguf_reader(path)
    for t in reader.tensors:
        if t.name == name:
            return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
    raise KeyError(name)


def gguf_tensor_bytes(path: str | Path, name: str) -> tuple[np.ndarray, str]:
    """The raw bytes (``uint8``, flattened) and type name of one tensor of a GGUF file."""
    reader = gguf_reader(path)
    for t in reader.tensors:
        if t.name == name:
            return np.asarray(t.data).view(np.uint8).reshape(-1).copy(), t.tensor_type.name
    raise KeyError(name)


def write_gguf(src: str | Path, dst: str | Path, qtype: str = "F32") -> Path:
    """Copy GGUF ``src`` to ``dst`` with every 2-D tensor dequantized and stored as ``qtype``.

    ``qtype``: "F32", "F16" or "Q8_0" (``gguf.quants``). 1-D tensors (norms) stay F32, as llama.cpp
    keeps them. All metadata (architecture, hyperparameters, tokenizer, chat template) is copied and
    ``general.file_type`` is updated. Written atomically.
    """
    import gguf
    qt = gguf.GGMLQuantizationType[qtype]
    reader = gguf.GGUFReader(str(src))
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    writer = gguf_writer_like(reader, tmp, file_type=FTYPES[qtype])
    for t in reader.tensors:
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        target = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else qt
        stored = gguf.quants.quantize(data, target)
        writer.add_tensor(t.name, stored, raw_dtype=target)  # quantized bytes: shape inferred
    finish_gguf(writer, tmp, dst)
    return dst


def gguf_writer_like(reader, tmp: str | Path, file_type: int | None = None):
    """A ``gguf.GGUFWriter`` to ``tmp`` holding every metadata field of ``reader`` (architecture,
    hyperparameters, tokenizer, chat template), ``general.file_type`` replaced by ``file_type`` when
    given. Add the tensors, then call :func:`finish_gguf`."""
    import gguf
    writer = gguf.GGUFWriter(str(tmp), arch=reader.get_field(gguf.Keys.General.ARCHITECTURE).contents(),
                             endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = file_type if field.name == gguf.Keys.General.FILE_TYPE and file_type is not None else field.contents()
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, val_type, sub_type=sub_type)
    return writer


def finish_gguf(writer, tmp: str | Path, dst: str | Path) -> None:
    """Write ``writer``'s header, metadata and tensors to ``tmp`` and move it onto ``dst`` (atomic)."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)


def llama_quantize(src: str | Path, dst: str | Path, ftype: str, nthread: int | None = None) -> Path:
    """llama.cpp's own quantizer (``llama_model_quantize``): ``src`` GGUF -> ``dst`` as ``ftype``.

    ``ftype``: a key of ``FTYPES`` ("Q8_0", "Q4_K_M", ...). The type of each tensor is chosen by
    llama.cpp's recipe for that file type. Written atomically.
    """
    import llama_cpp
    dst = Path(dst)
    tmp = dst.with_name(f".tmp-{os.getpid()}-{dst.name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = nthread or cpu_threads()
    params.ftype = FTYPES[ftype]
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype}) returned {rc}")
    os.replace(tmp, dst)
    return dst


def gguf_variants(kinds=("F16", "Q8_0", "Q4_K_M")) -> dict[str, Path]:
    """The GGUF variants of the model, built once from the shipped Q4_1 file and cached under ``quant_dir()``.

    F32 and F16 are written with ``gguf`` (every tensor dequantized, then stored as F32 / F16); Q8_0 and
    Q4_K_M come from llama.cpp's own quantizer run on the shipped file (``allow_requantize``: llama.cpp
    dequantizes Q4_1 to float first, so the result is byte-identical to quantizing an F32 copy).
    The F32 file is 540 MB: larger than the grader sandbox lets a notebook write (512 MiB).
    """
    from .models import gguf_path
    src = gguf_path()
    out = {}
    for kind in kinds:
        path = quant_dir() / f"smollm2-135m-{kind}.gguf"
        if not path.exists():
            if kind in ("F32", "F16"):
                write_gguf(src, path, kind)
            else:
                llama_quantize(src, path, kind)
        out[kind] = path
    return out


# ----------------------------------------------------------------------------------------------
# llama.cpp runtime
# ----------------------------------------------------------------------------------------------

def load_llama(path: str | Path, n_ctx: int = 1024, n_threads: int | None = None, n_batch: int = 1):
    """A ``llama_cpp.Llama`` on ``path`` with logits for every position (``logits_all=True``).

    ``n_batch=1`` evaluates a text token by token (the decode path). On the shared 2-core machine
    this course was built on, batched prefill through llama-cpp-python was several times slower
    than that; the logits are the same either way up to float summation order.
    """
    import llama_cpp
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                           n_threads=n_threads or cpu_threads(), logits_all=True, verbose=False)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp logits ``[T, V]`` (float32) for one token sequence, from a fresh context."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_decode_speed(llm, prompt_ids: list[int], n_new: int) -> float:
    """Greedy decode tokens/s with llama.cpp: one ``eval`` per new token after the prompt."""
    llm.reset()
    llm.eval(list(prompt_ids))
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    start = time.perf_counter()
    for _ in range(n_new):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return n_new / (time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# torch, bitsandbytes NF4
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def torch_logits(model, ids: list[int]) -> np.ndarray:
    """A transformers causal LM's logits ``[T, V]`` (float32) for one token sequence."""
    return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


@torch.no_grad()
def torch_decode_speed(model, prompt_ids: list[int], n_new: int) -> float:
    """Greedy decode tokens/s with ``generate`` and the KV cache (time after the first new token)."""
    from .timing import timed_generate
    _, _, times = timed_generate(model, torch.tensor([prompt_ids]), n_new + 1)
    return n_new / (times[-1] - times[0])


def load_nf4(model_dir: str | Path):
    """The model loaded with bitsandbytes NF4 weights (``load_in_4bit``) on the CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, device_map="cpu")
    model.eval()
    return model


def torch_weight_bytes(model) -> int:
    """Bytes of a torch model's parameters and buffers as stored in memory (bnb 4-bit packing included)."""
    return int(model.get_memory_footprint())


# ----------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------

class _LogitsOnly(torch.nn.Module):
    """``input_ids [B, T]`` -> ``logits [B, T, V]``, no KV cache: the graph the ONNX file holds."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        # an explicit all-ones mask keeps transformers off its packed-sequence check (aten::diff)
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                          use_cache=False).logits


def export_onnx(model, path: str | Path, opset: int = 17) -> Path:
    """Export a transformers causal LM to ONNX (TorchScript exporter), dynamic batch and length."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    example = torch.arange(1, 9).unsqueeze(0)
    with torch.no_grad():
        torch.onnx.export(_LogitsOnly(model).eval(), (example,), str(tmp), input_names=["input_ids"],
                          output_names=["logits"], opset_version=opset, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                        "logits": {0: "batch", 1: "tokens"}})
    os.replace(tmp, path)
    return path


def onnx_quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """onnxruntime dynamic quantization: int8 weights for MatMul/Gemm, activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp.onnx")
    quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
    os.replace(tmp, dst)
    return dst


def onnx_session(path: str | Path, n_threads: int | None = None):
    """An onnxruntime CPU ``InferenceSession``."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = n_threads or cpu_threads()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_logits(session, ids: list[int]) -> np.ndarray:
    """onnxruntime logits ``[T, V]`` for one token sequence."""
    return session.run(["logits"], {"input_ids": np.array([ids], dtype=np.int64)})[0][0]


def onnx_decode_speed(session, prompt_ids: list[int], n_new: int) -> float:
    """Greedy decode tokens/s through the ONNX graph. It has no KV cache: each step re-reads the prefix."""
    ids = list(prompt_ids)
    start = time.perf_counter()
    for _ in range(n_new):
        ids.append(int(np.argmax(onnx_logits(session, ids)[-1])))
    return n_new / (time.perf_counter() - start)


def onnx_weight_bytes(path: str | Path) -> int:
    """Bytes of an ONNX file's initializers (its weights)."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(path), load_external_data=True)
    return int(sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer))


# ----------------------------------------------------------------------------------------------
# The manifest
# ----------------------------------------------------------------------------------------------

MANIFEST_COLUMNS = ["variant", "format", "type", "runtime", "bits_per_weight", "bytes", "perplexity",
                    "decode_tokens_per_s", "sha256", "note"]


def manifest_row(variant: str, fmt: str, qtype: str, runtime: str, weight_bytes: int, n_weights: int,
                 file: str | Path | None, perplexity: float, tokens_per_s: float, note: str = "") -> dict:
    """One manifest row. ``bytes`` is the file size (in-memory footprint when there is no file);
    ``bits_per_weight`` = 8 x ``weight_bytes`` / ``n_weights``; sha256 of the file ("" without one)."""
    size = os.path.getsize(file) if file else weight_bytes
    return {"variant": variant, "format": fmt, "type": qtype, "runtime": runtime,
            "bits_per_weight": 8 * weight_bytes / n_weights, "bytes": int(size),
            "perplexity": float(perplexity), "decode_tokens_per_s": float(tokens_per_s),
            "sha256": sha256(file) if file else "", "note": note}


def layer_of(name: str) -> int | None:
    """The block index in a GGUF tensor name (``blk.7.ffn_down.weight`` -> 7), None outside blocks."""
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None
