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

# %% [markdown] id="cell-01"
# # Lesson 8 — Serving and inference optimization
#
# Until now every model in this course answered one prompt at a time, inside the notebook. A product
# serves many users at once, over HTTP, and is judged by three numbers: **latency** (how long one user
# waits, and how long until the first word appears: *time to first token*, TTFT), **throughput** (tokens
# per second for everyone together) and **cost** (what a million tokens cost on the hardware you rent).
# Four ideas move those numbers:
#
# 1. **The KV cache.** A decoder that keeps the keys and values of the tokens it has already seen does
#    one token's worth of work per step instead of re-reading the whole sequence.
# 2. **Memory for the cache.** The cache is paid per token per concurrent request; it decides how many
#    requests fit on a machine.
# 3. **Continuous (iteration-level) batching.** A scheduler that admits and evicts requests at every
#    decode step keeps the batch full, instead of waiting for the slowest request of a static batch.
# 4. **A real engine and a real server on cheaper weights.** llama.cpp's batched decoding driven by your
#    scheduler, and an OpenAI-compatible server (llama-cpp-python's here; vLLM on a GPU, not run here)
#    serving quantized GGUF files.
#
# You will build:
#
# 1. `greedy_generate(model, prompt_ids, max_new_tokens, use_cache)`: greedy decoding with and without a
#    KV cache (identical tokens), fast enough to stand next to transformers' `generate`;
# 2. `kv_cache_capacity(config, kv_memory_bytes, context_len, bytes_per_value, block_size)`: the KV-cache
#    memory formula, and how many requests fit in a memory budget with paged (block) allocation;
# 3. `continuous_batching(trace, max_batch, step_time)`: an iteration-level scheduler (admit, step,
#    evict) over a request trace;
# 4. `serving_metrics(records)`: p50/p95 latency, TTFT and throughput, computed per request.
#
# You will measure, on the real SmolLM2-135M-Instruct on this machine: the KV-cache speed-up against the
# number of generated tokens, and your loop's speed against `generate`; static against continuous batching
# on one request trace (throughput, p50/p95 latency, TTFT) and a latency-throughput curve over batch
# sizes; then the same scheduler driving a **real batching engine** (llama.cpp decoding up to 16 sequences
# per call), throughput and latency against the number of concurrent clients, real next to simulated, with
# every batched answer checked against the same prompt decoded alone; decode speed against this machine's
# memory-bandwidth roofline; and llama-cpp-python's server started by this notebook, hit by concurrent
# requests, serving F32/F16/Q8_0 files re-typed from the shipped Q4_1 and the Q4_1 itself, with tokens/s
# and cost per million tokens. Exercises are tested on tiny random models and hand-made traces; every
# measurement uses the real model.

# %% id="parameters" tags=["parameters"]
import os
BUDGET = os.environ.get("BREWSLM_BUDGET", "full")

# %% id="setup" nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
# %matplotlib inline
import math
import time
import warnings

warnings.filterwarnings("ignore")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import transformers
from IPython.display import display
from matplotlib.ticker import FuncFormatter
from tqdm.auto import tqdm
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from brewslm_helpers import budget, models, plots, report, serving
from brewslm_helpers.evaluation import chat_prompt

transformers.logging.set_verbosity_error()
torch.manual_seed(0)

# only sizes differ between budgets: every cell runs in both
CFG = budget.pick(
    BUDGET,
    ci={"gen_lengths": [4, 8], "repeats": 1, "step_batch_sizes": [1, 4], "step_context": 32,
        "step_iters": 2, "step_repeats": 1, "trace_requests": 40, "max_batch": 4, "curve_batches": [1, 2, 4],
        "gguf_kinds": ["F16", "Q4_1"], "server_single_tokens": 8, "server_requests": 2,
        "server_concurrency": 2, "server_max_tokens": 4, "bandwidth_mb": 64,
        "engine_batches": [1, 2, 4], "engine_ctx": 128, "engine_steps": 4, "engine_repeats": 1,
        "engine_requests": 4, "engine_out": (4, 12), "engine_poisson_requests": 6},
    full={"gen_lengths": [8, 32, 64], "repeats": 2, "step_batch_sizes": [1, 2, 4, 8, 16],
          "step_context": 64, "step_iters": 4, "step_repeats": 2, "trace_requests": 300, "max_batch": 16,
          "curve_batches": [1, 2, 4, 8, 16, 32], "gguf_kinds": ["F32", "F16", "Q8_0", "Q4_1"],
          "server_single_tokens": 48, "server_requests": 8, "server_concurrency": 4,
          "server_max_tokens": 24, "bandwidth_mb": 512,
          "engine_batches": [1, 2, 4, 8, 16], "engine_ctx": 256, "engine_steps": 16, "engine_repeats": 3,
          "engine_requests": 32, "engine_out": (16, 128), "engine_poisson_requests": 64},
)
THREADS = torch.get_num_threads()
# An ASSUMED price for the machine, to turn tokens/s into dollars (not a measurement): a small
# on-demand cloud VM with 2 vCPUs. Put your own hardware's price here.
PRICE_PER_HOUR_USD = 0.10
print(f"budget {BUDGET}: {CFG}; torch threads: {THREADS}")

# %% [markdown] id="cell-04"
# ## The real model and the prompts
#
# `models.load_teacher()` gives SmolLM2-135M-Instruct in fp32. Prompts are written in the model's own
# ChatML template (`chat_prompt`), tokenised **once**: from here on everything works on token ids.

# %% id="cell-05"
model, tok = models.load_teacher()
QUESTIONS = ["Write a short story about a coffee shop that never closes.",
             "Explain why the sky is blue to a ten-year-old.",
             "Give three tips for brewing better espresso at home.",
             "What should I pack for a weekend hiking trip?"]
PROMPTS = [chat_prompt(tok, q) for q in QUESTIONS]
PROMPT_IDS = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
print(f"{model.num_parameters():,} parameters; prompt lengths: {[len(p) for p in PROMPT_IDS]} tokens")


# %% [markdown] id="cell-06"
# ## Exercise 1 — greedy decoding, with and without a KV cache
#
# A decoder produces token $t+1$ from tokens $1..t$. Without a cache, step $t$ runs the model over the
# whole sequence again: $t$ tokens of work for one new token, $O(n^2)$ work for $n$ tokens. Inside every
# layer, though, the keys and values of tokens $1..t-1$ are the same as at the previous step (causal
# attention: earlier tokens never see later ones). The **KV cache** keeps them, so each decode step feeds
# **only the newest token**, computes its query, key and value, appends the key and value to the cache
# and attends over everything cached. Same arithmetic, same tokens, a fraction of the work.
#
# In transformers 5 the cache is a `DynamicCache` object that the model fills in place:
#
# ```python
# cache = DynamicCache(config=model.config)
# out = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)   # prefill: whole prompt
# out = model(input_ids=next_token, cache=cache, use_cache=True, logits_to_keep=1)   # decode: 1 token
# ```
#
# `logits_to_keep=1` asks for the last position's logits only (the others would cost a 49152-wide
# projection each for nothing). The positions of the new tokens come from the cache's length.
#
# Make it fast, the way a serving loop must be: run under `torch.inference_mode()` (no autograd
# bookkeeping), keep token ids as tensors (no re-tokenising text), feed only the last token.
#
# **Your task.** `greedy_generate(model, prompt_ids, max_new_tokens, use_cache=True, eos_token_id=None)`
# returns the list of new token ids. With `use_cache=False` it re-runs the model on the full sequence at
# each step; both must give exactly the tokens of `model.generate(do_sample=False)`. Write the loop
# yourself, calling only the model's forward, `model(...)`: `generate` is the reference your tokens are
# compared to, and the tests hand you models whose `generate` is switched off. One forward call per new
# token: with the cache, the first call feeds the whole prompt and every later call one token; without
# it, every call feeds the whole sequence so far. A **fresh cache per call**: a cache belongs to one
# request, and one left over from the previous request makes the model attend to someone else's
# conversation. If `eos_token_id` is given, stop after emitting it (it is included in the output).

# %% id="ex_greedy_generate" nbgrader={"grade": false, "grade_id": "ex_greedy_generate", "locked": false, "schema_version": 3, "solution": true, "task": false}
def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int, use_cache: bool = True,
                    eos_token_id: int | None = None) -> list[int]:
    """Greedy (argmax) decoding of one prompt.

    model: a transformers causal LM (batch 1); call its forward only (`model(...)`), not `generate`.
    prompt_ids: the prompt's token ids (non-empty list of ints).
    max_new_tokens: how many tokens to generate at most (0 gives []).
    use_cache: True: prefill the prompt into a new DynamicCache, then feed one token per step;
        False: run the model on the whole sequence (prompt + generated so far) at every step.
    eos_token_id: if given, stop right after generating it (it is part of the output).
    Returns the new token ids (list of ints, length <= max_new_tokens).
    """
    ### BEGIN SOLUTION
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    cache = DynamicCache(config=model.config) if use_cache else None
    step_input = ids
    new_tokens = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            if use_cache:
                out = model(input_ids=step_input, cache=cache, use_cache=True, logits_to_keep=1)
            else:
                out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
            next_id = out.logits[0, -1].argmax()
            token = int(next_id)
            new_tokens.append(token)
            if token == eos_token_id:
                break
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            step_input = next_id.view(1, 1)
    return new_tokens
    ### END SOLUTION


# %% id="test_greedy_generate" nbgrader={"grade": true, "grade_id": "test_greedy_generate", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
# Tiny random Llamas (built here in milliseconds); transformers' generate is the reference.
def _tiny_lm(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _reference(m, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def _forward_only(m):
    """The model as greedy_generate gets it: generate, the reference, is switched off."""
    def _generate_off(*args, **kwargs):
        raise AssertionError("greedy_generate must run its own decoding loop with model(...): "
                             "model.generate is the reference it is compared to, not part of the answer")
    m.generate = _generate_off
    return m


_threads = torch.get_num_threads()
torch.set_num_threads(1)              # tiny matrices: one thread is fastest, even on a busy machine
try:
    _m = _tiny_lm()
    _p1, _p2 = [5, 17, 3, 42, 8, 11], [60, 2, 33]
    _ref1, _ref2 = _reference(_m, _p1, 8), _reference(_m, _p2, 8)
    _forward_only(_m)
    _got = greedy_generate(_m, _p1, 8, use_cache=True)
    assert isinstance(_got, list) and all(isinstance(t, int) for t in _got), _got
    assert _got == _ref1, f"with cache: {_got} != generate's {_ref1}"
    assert greedy_generate(_m, _p1, 8, use_cache=False) == _ref1, "without cache: tokens differ from generate"
    # a second request on the same model: its own answer, not one polluted by the first request's cache
    assert greedy_generate(_m, _p2, 8, use_cache=True) == _ref2, "second request: a cache reused across requests?"
    print("greedy_generate: visible tests passed")
    ### BEGIN HIDDEN TESTS
    # the work done: with the cache, the model sees the prompt once and then one token per step
    _seen = []
    _hook = _m.model.embed_tokens.register_forward_hook(lambda mod, inp, out: _seen.append(inp[0].shape[-1]))
    try:
        greedy_generate(_m, _p1, 6, use_cache=True)
        _with_cache = list(_seen)
        _seen.clear()
        greedy_generate(_m, _p1, 6, use_cache=False)
        _without = list(_seen)
    finally:
        _hook.remove()
    assert _with_cache == [len(_p1)] + [1] * 5, f"tokens fed per step with the cache: {_with_cache}"
    assert _without == [len(_p1) + k for k in range(6)], f"tokens fed per step without cache: {_without}"
    # many requests in a row, interleaved with and without cache, on a deeper model
    _m3 = _tiny_lm(seed=3, layers=3)
    _cases = [(_p, _reference(_m3, _p, 10)) for _p in ([1], [7, 7, 7, 7], [90, 12, 45, 3, 3, 64, 20, 1, 8])]
    _forward_only(_m3)
    for _p, _r in _cases:
        assert greedy_generate(_m3, _p, 10) == _r
        assert greedy_generate(_m3, _p, 10, use_cache=False) == _r
    # eos: stop right after it, included
    _eos = _ref1[3]
    _want = _ref1[:_ref1.index(_eos) + 1]
    assert greedy_generate(_m, _p1, 8, eos_token_id=_eos) == _want
    assert greedy_generate(_m, _p1, 8, use_cache=False, eos_token_id=_eos) == _want
    assert greedy_generate(_m, _p1, 0) == [] and greedy_generate(_m, _p1, 1) == _ref1[:1]
    ### END HIDDEN TESTS
finally:
    torch.set_num_threads(_threads)


# %% [markdown] id="cell-09"
# ### Measure: the KV cache on the real model, and your loop against `generate`
#
# For each length in `CFG["gen_lengths"]` we generate exactly that many tokens from the same prompt three
# ways: your loop with the cache, your loop without it, and transformers' `generate` (with its cache), the
# reference implementation. All three must produce **identical tokens** (we check; `eos_token_id=None` so
# every run has the same length). Each timing is the best of `CFG["repeats"]` runs after one warm-up
# call, so that a neighbour's burst of CPU use does not decide the result.
#
# Expect the no-cache loop to fall behind as the output grows (its step $t$ costs $t$ tokens of compute),
# and your cached loop to keep pace with `generate` (a serving loop that is slower than the library is a
# bug; one that is faster just skips `generate`'s per-step bookkeeping).

# %% id="cell-10"
def best_time(fn, repeats):
    """(result of the fastest call, its seconds)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = fn()
        dt = time.perf_counter() - t0
        if dt < best:
            best, result = dt, r
    return result, best


def hf_generate(prompt_ids, n):
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return out[0, len(prompt_ids):].tolist()


P0 = PROMPT_IDS[0]
greedy_generate(model, P0, 2)                   # warm-up: first-call overheads out of the way
hf_generate(P0, 2)
kv_rows = []
for n in tqdm(CFG["gen_lengths"], desc="KV cache vs length"):
    cached, t_cached = best_time(lambda: greedy_generate(model, P0, n, use_cache=True), CFG["repeats"])
    hf, t_hf = best_time(lambda: hf_generate(P0, n), CFG["repeats"])
    uncached, t_uncached = best_time(lambda: greedy_generate(model, P0, n, use_cache=False), 1)
    kv_rows.append({"new_tokens": n, "with_cache_tok_s": n / t_cached, "without_cache_tok_s": n / t_uncached,
                    "generate_tok_s": n / t_hf, "kv_speedup": t_uncached / t_cached,
                    "loop_vs_generate": t_hf / t_cached, "identical_tokens": cached == uncached == hf})
kv_table = pd.DataFrame(kv_rows)
display(kv_table.round(2))
assert kv_table["identical_tokens"].all(), "the three decoders disagree"
print("sample (longest run):", repr(tok.decode(cached)))

# %% id="cell-11"
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
ax1.plot(kv_table["new_tokens"], kv_table["with_cache_tok_s"], "o-", label="your loop, KV cache")
ax1.plot(kv_table["new_tokens"], kv_table["generate_tok_s"], "s--", label="transformers generate")
ax1.plot(kv_table["new_tokens"], kv_table["without_cache_tok_s"], "o-", label="your loop, no cache")
ax1.set(title="Decode speed vs tokens generated", xlabel="new tokens", ylabel="tokens / s")
ax1.legend(fontsize=8)
ax1.grid(alpha=0.3)
ax2.plot(kv_table["new_tokens"], kv_table["kv_speedup"], "o-", color="tab:green")
ax2.set(title="KV-cache speed-up (with / without)", xlabel="new tokens", ylabel="x")
ax2.grid(alpha=0.3)
fig.tight_layout()
plt.show()
ratio_longest = kv_table["loop_vs_generate"].iloc[-1]
print(f"your cached loop runs at {ratio_longest:.2f}x generate's tokens/s at "
      f"{kv_table['new_tokens'].iloc[-1]} new tokens (>= 0.8 is the bar)")


# %% [markdown] id="cell-12"
# The speed-up grows with the output length because the no-cache loop's cost per token grows with the
# sequence while the cached loop's stays nearly flat. The honest caveat: the cache is not free. It costs
# memory that grows with every token of every request in flight, and that memory caps how many requests a
# server can hold at once (whether memory or compute runs out first depends on the machine and the
# model). That is the next exercise.

# %% [markdown] id="cell-13"
# ## Exercise 2 — the KV-cache memory formula, and how many requests fit
#
# Per token, every layer stores one key and one value vector for every **key/value head**:
#
# $$\text{bytes per token} = 2\,(\text{K and V}) \times L_\text{layers} \times H_\text{kv} \times d_\text{head} \times \text{bytes per value}$$
#
# (grouped-query attention: SmolLM2 has 9 query heads but 3 K/V heads, and only those are cached;
# $d_\text{head}$ is `config.head_dim` if set, else `hidden_size // num_attention_heads`).
#
# How that memory is handed out decides how much of it is wasted. A **naive contiguous allocator** (what
# a static `[batch, max_length]` cache tensor is) reserves room for a request's *maximum* length when it is
# admitted, used or not. vLLM's **paged attention** does not reserve ahead: it hands out the cache in
# fixed **blocks** of `block_size` tokens (16 by default) **on demand**, one more block each time the
# request's tokens fill the last one, like pages of virtual memory. No request needs one contiguous
# region, nothing is reserved for tokens not yet generated, and the waste is at most one partly filled
# block per request. A request that reaches `context_len` tokens then holds
# $\lceil \text{context\_len} / \text{block\_size} \rceil$ blocks, and the number of requests that fit,
# if every one of them reaches `context_len`, is
#
# $$\text{max requests} = \left\lfloor \frac{\text{KV memory}}{\text{blocks per request} \times \text{block\_size} \times \text{bytes per token}} \right\rfloor$$
#
# That number is the guaranteed ceiling on the batch size of the scheduler in exercise 3. Because blocks
# are allocated as requests grow, a paged engine can admit more requests than that while they are still
# short, and preempts one (frees or swaps out its blocks) if the cache runs out later.
#
# **Your task.** `kv_cache_capacity(config, kv_memory_bytes, context_len, bytes_per_value, block_size=16)`
# returns `{"bytes_per_token", "blocks_per_request", "max_requests"}`.

# %% id="ex_kv_cache_capacity" nbgrader={"grade": false, "grade_id": "ex_kv_cache_capacity", "locked": false, "schema_version": 3, "solution": true, "task": false}
def kv_cache_capacity(config, kv_memory_bytes: int, context_len: int, bytes_per_value: float,
                      block_size: int = 16) -> dict:
    """How much KV cache one token needs, and how many requests fit in ``kv_memory_bytes``.

    config: a transformers config with num_hidden_layers, num_attention_heads, num_key_value_heads,
        hidden_size and optionally head_dim.
    kv_memory_bytes: memory set aside for the KV cache (bytes).
    context_len: tokens each request may reach (prompt + output).
    bytes_per_value: 4 fp32, 2 fp16/bf16, 1 int8, 0.5 int4.
    block_size: tokens per allocation block (paged attention).
    Returns {"bytes_per_token": int (rounded up), "blocks_per_request": int,
             "max_requests": int (whole requests, each holding whole blocks)}.
    """
    ### BEGIN SOLUTION
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    values_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    bytes_per_token = values_per_token * bytes_per_value
    blocks_per_request = math.ceil(context_len / block_size)
    bytes_per_request = blocks_per_request * block_size * bytes_per_token
    return {"bytes_per_token": math.ceil(bytes_per_token), "blocks_per_request": blocks_per_request,
            "max_requests": int(kv_memory_bytes // bytes_per_request)}
    ### END SOLUTION


# %% id="test_kv_cache_capacity" nbgrader={"grade": true, "grade_id": "test_kv_cache_capacity", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
# Reference: the bytes a real DynamicCache holds per token, for tiny Llamas.
def _cache_bytes_per_token(heads=4, kv_heads=2, hidden=32, layers=3, head_dim=None, seq=5):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=48, head_dim=head_dim)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        cache = m(input_ids=torch.arange(seq).view(1, -1), use_cache=True).cache
    return cfg, sum(l.keys.nbytes + l.values.nbytes for l in cache.layers) // seq


_cfg, _real = _cache_bytes_per_token()
_c = kv_cache_capacity(_cfg, 10_000_000, 100, 4)
assert set(_c) == {"bytes_per_token", "blocks_per_request", "max_requests"}, _c.keys()
assert _c["bytes_per_token"] == _real, f"{_c['bytes_per_token']} bytes/token, the real DynamicCache holds {_real}"
assert _c["blocks_per_request"] == 7                       # ceil(100 / 16)
assert _c["max_requests"] == 10_000_000 // (7 * 16 * _real), _c
print("kv_cache_capacity: visible tests passed")
### BEGIN HIDDEN TESTS
_cfg2, _real2 = _cache_bytes_per_token(heads=4, kv_heads=1, layers=2)            # multi-query attention
assert kv_cache_capacity(_cfg2, 1, 1, 4)["bytes_per_token"] == _real2
_cfg3, _real3 = _cache_bytes_per_token(heads=4, kv_heads=4, hidden=32, head_dim=16)  # explicit head_dim
assert kv_cache_capacity(_cfg3, 1, 1, 4)["bytes_per_token"] == _real3
_smol = LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=1536)
_s = kv_cache_capacity(_smol, 2 ** 30, 2048, 2)
assert _s == {"bytes_per_token": 23040, "blocks_per_request": 128, "max_requests": 22}, _s
# blocks round up: 17 tokens take 2 blocks of 16; exactly 32 take 2; a block of 1 is no rounding
assert kv_cache_capacity(_smol, 2 ** 30, 17, 2)["blocks_per_request"] == 2
assert kv_cache_capacity(_smol, 2 ** 30, 32, 2)["blocks_per_request"] == 2
assert kv_cache_capacity(_smol, 23040 * 2 * 16 * 3 - 1, 17, 2)["max_requests"] == 2
assert kv_cache_capacity(_smol, 23040 * 1000, 1000, 2, block_size=1)["max_requests"] == 1
assert kv_cache_capacity(_smol, 10 ** 9, 64, 0.5)["bytes_per_token"] == 5760        # a 4-bit cache
assert kv_cache_capacity(_smol, 100, 64, 2)["max_requests"] == 0
### END HIDDEN TESTS

# %% [markdown] id="cell-16"
# ### Measure: SmolLM2's cache against a memory budget
#
# First your formula against the real `DynamicCache` the model filled for a prompt; then how many
# concurrent requests fit in 1 GiB of fp16 KV cache at several context lengths. The formula is exact for
# the cache's payload; a real engine also keeps activations, the sampler's buffers and fragmentation
# headroom, so the number it admits is a bit lower.

# %% id="cell-17"
with torch.inference_mode():
    _cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([P0]), cache=_cache, use_cache=True, logits_to_keep=1)
real_per_token = sum(l.keys.nbytes + l.values.nbytes for l in _cache.layers) // len(P0)
del _cache
mine = kv_cache_capacity(model.config, 2 ** 30, 2048, 4)
print(f"real DynamicCache: {real_per_token:,} bytes per token (fp32); kv_cache_capacity: {mine['bytes_per_token']:,}")
assert real_per_token == mine["bytes_per_token"]
cap_rows = [{"context_len": L, **kv_cache_capacity(model.config, 2 ** 30, L, 2)} for L in (512, 2048, 8192)]
capacity = pd.DataFrame(cap_rows).rename(columns={"max_requests": "requests in 1 GiB (fp16)"})
display(capacity)


# %% [markdown] id="cell-18"
# ## Exercise 3 — a continuous-batching scheduler
#
# A server receives requests at random times, each with its own prompt and its own output length. Two
# ways to batch them:
#
# * **Static (request-level) batching**, what `model.generate` on a padded batch does: take up to
#   `max_batch` waiting requests, run them together until the **longest** one is done, return them, take
#   the next batch. A request that finishes early keeps its slot busy (padding), and a request that arrives
#   one millisecond after a batch started waits for the whole batch.
# * **Continuous (iteration-level) batching** (Orca, 2022; vLLM, TGI, llama.cpp's server): the scheduler
#   decides **at every decode step**. Each iteration:
#   1. **admit**: move waiting requests that have arrived (first come, first served) into the running
#      batch while it has fewer than `max_batch` requests;
#   2. **step**: one forward pass gives every running request one more token; a request admitted in
#      this iteration has its prompt prefilled in the same pass, so the pass costs
#      `step_time(batch_size, prefill_tokens)` where `prefill_tokens` sums the prompts admitted now;
#   3. **evict**: a request that has all its output tokens leaves the batch at once, freeing its slot
#      (and its KV blocks) for the next iteration.
#   When nothing is running and nothing has arrived, the clock jumps to the next arrival.
#
# We do not run the model per step here: the scheduler drives a **cost model**, `step_time`, measured
# on the real model below (time of one decode iteration as a function of batch size, plus the prefill
# cost per prompt token). That is how serving systems are designed and capacity-planned, and it lets us
# replay a trace of hundreds of requests in milliseconds. The caveat: a cost model ignores what it does
# not measure (a long prompt's prefill stalling the decode of everyone else, which *chunked prefill*
# addresses; cache memory running out, which forces preemption).
#
# **Your task.** `continuous_batching(trace, max_batch, step_time)` simulates the loop above and returns,
# for every request (in trace order), its fields plus `first_token_s` (end of the iteration that produced
# its first token) and `finish_s` (end of the iteration that produced its last one).

# %% id="ex_continuous_batching" nbgrader={"grade": false, "grade_id": "ex_continuous_batching", "locked": false, "schema_version": 3, "solution": true, "task": false}
def continuous_batching(trace: list[dict], max_batch: int, step_time) -> list[dict]:
    """Iteration-level batching of ``trace`` with at most ``max_batch`` running requests.

    trace: dicts {"id", "arrival_s", "prompt_tokens", "output_tokens" (>= 1)}.
    step_time: step_time(batch_size, prefill_tokens) -> seconds of one iteration in which
        ``batch_size`` requests each get one token and ``prefill_tokens`` prompt tokens (of the
        requests admitted in this iteration) are prefilled.
    Each iteration at clock t: admit arrived requests (arrival_s <= t, FIFO) while fewer than
    max_batch run; if none runs, jump t to the next arrival; else t += step_time(...), every
    running request gets a token; requests with all their tokens leave (finish_s = t).
    Returns one dict per request, in trace order: its fields plus "first_token_s", "finish_s".
    """
    ### BEGIN SOLUTION
    waiting = sorted(trace, key=lambda r: (r["arrival_s"], r["id"]))
    running = []                                  # [request, tokens generated so far]
    first, finish = {}, {}
    t, i = 0.0, 0
    while i < len(waiting) or running:
        admitted = []
        while i < len(waiting) and len(running) < max_batch and waiting[i]["arrival_s"] <= t:
            running.append([waiting[i], 0])
            admitted.append(waiting[i])
            i += 1
        if not running:                           # idle: jump to the next arrival
            t = waiting[i]["arrival_s"]
            continue
        t += step_time(len(running), sum(r["prompt_tokens"] for r in admitted))
        still_running = []
        for slot in running:
            req = slot[0]
            slot[1] += 1
            first.setdefault(req["id"], t)
            if slot[1] >= req["output_tokens"]:
                finish[req["id"]] = t             # evict: its slot is free for the next iteration
            else:
                still_running.append(slot)
        running = still_running
    return [{**r, "first_token_s": first[r["id"]], "finish_s": finish[r["id"]]} for r in trace]
    ### END SOLUTION


# %% id="test_continuous_batching" nbgrader={"grade": true, "grade_id": "test_continuous_batching", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
def _req(i, arrival, out, prompt=10):
    return {"id": i, "arrival_s": arrival, "prompt_tokens": prompt, "output_tokens": out}


def _times(records):
    return {r["id"]: (round(r["first_token_s"], 9), round(r["finish_s"], 9)) for r in records}


_flat = lambda b, p: 1.0                      # every iteration takes 1 s, whatever the batch
# A needs 4 tokens; B arrives while A runs and needs 1: it joins A at the next iteration
_trace = [_req(0, 0.0, 4), _req(1, 0.5, 1)]
_res = continuous_batching(_trace, max_batch=2, step_time=_flat)
assert [r["id"] for r in _res] == [0, 1] and all({"first_token_s", "finish_s"} <= set(r) for r in _res)
assert _times(_res) == {0: (1.0, 4.0), 1: (2.0, 2.0)}, _times(_res)
# with one slot, B waits for A; the trace's fields are kept
_res1 = continuous_batching(_trace, max_batch=1, step_time=_flat)
assert _times(_res1) == {0: (1.0, 4.0), 1: (5.0, 5.0)}, _times(_res1)
assert _res1[1]["output_tokens"] == 1 and _res1[1]["arrival_s"] == 0.5
# the iteration that admits a request pays for its prefill (0.01 s per prompt token here)
_cost = lambda b, p: 1.0 + 0.01 * p
_res2 = continuous_batching([_req(0, 0.0, 2, prompt=100), _req(1, 0.0, 1, prompt=50)], 2, _cost)
assert _times(_res2) == {0: (2.5, 3.5), 1: (2.5, 2.5)}, _times(_res2)
print("continuous_batching: visible tests passed")
### BEGIN HIDDEN TESTS
# idle gaps: the clock jumps to the next arrival
_res3 = continuous_batching([_req(0, 0.0, 2), _req(1, 10.0, 1)], 4, _flat)
assert _times(_res3) == {0: (1.0, 2.0), 1: (11.0, 11.0)}, _times(_res3)
# FIFO admission when more arrive than there are slots; a freed slot is reused at once
_tr = [_req(0, 0.0, 3), _req(1, 0.0, 1), _req(2, 0.1, 2), _req(3, 0.2, 1)]
_res4 = continuous_batching(_tr, 2, _flat)
assert _times(_res4) == {0: (1.0, 3.0), 1: (1.0, 1.0), 2: (2.0, 3.0), 3: (4.0, 4.0)}, _times(_res4)
# the batch size passed to step_time is the number of running requests
_seen = []
continuous_batching(_tr, 2, lambda b, p: _seen.append((b, p)) or 1.0)
assert _seen == [(2, 20), (2, 10), (2, 0), (1, 10)], _seen
# trace order is kept even when the trace is not sorted by arrival
_res5 = continuous_batching([_req(7, 3.0, 1), _req(4, 0.0, 1)], 1, _flat)
assert [r["id"] for r in _res5] == [7, 4] and _times(_res5) == {7: (4.0, 4.0), 4: (1.0, 1.0)}
# a batch-dependent cost: max_batch=1 is sequential
_lin = lambda b, p: 0.5 + 0.25 * b
_res6 = continuous_batching([_req(0, 0.0, 2), _req(1, 0.0, 2)], 1, _lin)
assert _times(_res6) == {0: (0.75, 1.5), 1: (2.25, 3.0)}, _times(_res6)
### END HIDDEN TESTS

# %% [markdown] id="cell-21"
# ## Exercise 4 — latency percentiles, per request
#
# A server is judged per **request**: the user waits from the moment the request arrives (queueing
# included) until the last token. For request $i$, latency $= \text{finish}_i - \text{arrival}_i$ and
# TTFT $= \text{first token}_i - \text{arrival}_i$. Report the median (p50) and the tail (p95) over all
# requests: a p95 of 4 s means one user in twenty waits 4 s or more. Throughput is all output tokens
# divided by the time from the first arrival to the last finish.
#
# Two common ways to get this wrong: measuring from the moment a request *started running* instead of
# from its arrival (which hides queueing, the very thing batching policies change), and computing
# percentiles over **batches** (one number per group of requests that finished together) instead of over
# requests: a batch of 16 slow requests then counts as much as a batch of 1 fast one.
#
# **Your task.** `serving_metrics(records)` returns p50/p95 latency, p50/p95 TTFT and the throughput.
# Use `np.percentile` (linear interpolation, its default), which is what the check below compares with.

# %% id="ex_serving_metrics" nbgrader={"grade": false, "grade_id": "ex_serving_metrics", "locked": false, "schema_version": 3, "solution": true, "task": false}
def serving_metrics(records: list[dict]) -> dict:
    """Per-request latency percentiles and throughput of a served trace.

    records: one dict per request with "arrival_s", "first_token_s", "finish_s" (seconds, one
        clock) and "output_tokens".
    Returns {"p50_latency_s", "p95_latency_s", "p50_ttft_s", "p95_ttft_s", "throughput_tok_s"}:
        latency = finish - arrival and ttft = first token - arrival, percentiles over requests
        (np.percentile); throughput = total output tokens / (last finish - first arrival).
    """
    ### BEGIN SOLUTION
    latency = np.array([r["finish_s"] - r["arrival_s"] for r in records])
    ttft = np.array([r["first_token_s"] - r["arrival_s"] for r in records])
    span = max(r["finish_s"] for r in records) - min(r["arrival_s"] for r in records)
    tokens = sum(r["output_tokens"] for r in records)
    p50, p95 = np.percentile(latency, [50, 95])
    t50, t95 = np.percentile(ttft, [50, 95])
    return {"p50_latency_s": float(p50), "p95_latency_s": float(p95), "p50_ttft_s": float(t50),
            "p95_ttft_s": float(t95), "throughput_tok_s": tokens / span}
    ### END SOLUTION


# %% id="test_serving_metrics" nbgrader={"grade": true, "grade_id": "test_serving_metrics", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
def _rec(arrival, first, finish, out):
    return {"arrival_s": arrival, "first_token_s": first, "finish_s": finish, "output_tokens": out}


# one batch of three requests that all finish at 10 s, and one request alone that finishes at 12 s
_recs = [_rec(0.0, 2.0, 10.0, 5), _rec(1.0, 2.0, 10.0, 5), _rec(4.0, 6.0, 10.0, 5), _rec(11.0, 11.5, 12.0, 5)]
_m = serving_metrics(_recs)
assert set(_m) == {"p50_latency_s", "p95_latency_s", "p50_ttft_s", "p95_ttft_s", "throughput_tok_s"}, _m.keys()
_lat = [10.0, 9.0, 6.0, 1.0]
_ttft = [2.0, 1.0, 2.0, 0.5]
assert math.isclose(_m["p50_latency_s"], np.percentile(_lat, 50)), _m      # 7.5: over requests
assert math.isclose(_m["p95_latency_s"], np.percentile(_lat, 95)), _m
assert math.isclose(_m["p50_ttft_s"], np.percentile(_ttft, 50)), _m
assert math.isclose(_m["p95_ttft_s"], np.percentile(_ttft, 95)), _m
assert math.isclose(_m["throughput_tok_s"], 20 / 12.0), _m
print("serving_metrics: visible tests passed")
### BEGIN HIDDEN TESTS
_rng = np.random.default_rng(0)
_arr = np.sort(_rng.uniform(5, 20, 50))
_fst = _arr + _rng.uniform(0.1, 3, 50)
_fin = _fst + _rng.uniform(0, 5, 50)
_fin[:20] = _fin[:20].max()                          # a big batch that finishes together
_out = _rng.integers(1, 100, 50)
_m2 = serving_metrics([_rec(a, f, e, int(o)) for a, f, e, o in zip(_arr, _fst, _fin, _out)])
assert math.isclose(_m2["p50_latency_s"], np.percentile(_fin - _arr, 50))
assert math.isclose(_m2["p95_latency_s"], np.percentile(_fin - _arr, 95))
assert math.isclose(_m2["p95_ttft_s"], np.percentile(_fst - _arr, 95))
assert math.isclose(_m2["throughput_tok_s"], _out.sum() / (_fin.max() - _arr.min()))
_one = serving_metrics([_rec(3.0, 3.5, 7.0, 8)])
assert math.isclose(_one["p95_latency_s"], 4.0) and math.isclose(_one["p50_ttft_s"], 0.5)
assert math.isclose(_one["throughput_tok_s"], 2.0)
### END HIDDEN TESTS

# %% [markdown] id="cell-24"
# ### Measure: the cost model, from the real model
#
# `serving.measure_step_times` fills a `DynamicCache` with a batch of `b` sequences of
# `CFG["step_context"]` tokens and times single-token decode iterations of the real model for each batch
# size in `CFG["step_batch_sizes"]` (best of `CFG["step_repeats"]`), plus a prefill pass (seconds per prompt token).
# `serving.cost_model` turns that into `step_time(batch_size, prefill_tokens)` (linear interpolation
# between the measured batch sizes). Look at the right panel: one iteration serves `b` requests, so if the
# step time grows slower than `b`, batching multiplies throughput; decode at batch 1 is limited by reading
# the weights, and a bigger batch reads them once for everyone.

# %% id="cell-25"
with torch.inference_mode():
    measured = serving.measure_step_times(model, CFG["step_batch_sizes"], context_len=CFG["step_context"],
                                          steps=CFG["step_iters"], prefill_len=CFG["step_context"],
                                          repeats=CFG["step_repeats"])
step_time = serving.cost_model(measured)
steps = pd.DataFrame({"batch_size": measured["batch_sizes"], "step_ms": np.array(measured["step_s"]) * 1e3})
steps["tokens_per_s"] = steps["batch_size"] / (steps["step_ms"] / 1e3)
display(steps.round(2))
print(f"prefill: {measured['prefill_s_per_token'] * 1e3:.2f} ms per prompt token")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.4))
ax1.plot(steps["batch_size"], steps["step_ms"], "o-")
ax1.set(title="One decode iteration (real model)", xlabel="batch size", ylabel="ms", xscale="log")
ax2.plot(steps["batch_size"], steps["tokens_per_s"], "o-", color="tab:green")
ax2.set(title="Decode throughput per iteration", xlabel="batch size", ylabel="tokens / s", xscale="log")
for ax in (ax1, ax2):
    ax.set_xticks(steps["batch_size"], [str(b) for b in steps["batch_size"]])
    ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()

# %% [markdown] id="cell-26"
# ### Measure: static vs continuous batching on one request trace
#
# `serving.make_trace` draws a trace of `CFG["trace_requests"]` requests: Poisson arrivals, prompt and
# output lengths log-uniform (many short replies, a few long ones, as chat traffic has). The arrival rate
# is set from the cost model measured above, to keep a `max_batch` engine about 70 % busy: the numbers
# are about *this* machine. Both schedulers replay the same trace with the same `step_time` and the same
# `max_batch`; `serving.static_batching` is the baseline, your `continuous_batching` the contender, your
# `serving_metrics` the judge.

# %% id="cell-27"
MAX_BATCH = CFG["max_batch"]
OUT_RANGE, PROMPT_RANGE = (4, 256), (16, 256)
mean_out = np.mean(np.exp(np.random.default_rng(1).uniform(np.log(OUT_RANGE[0]), np.log(OUT_RANGE[1]), 100_000)))
capacity_req_s = MAX_BATCH / (step_time(MAX_BATCH, 0) * mean_out)    # requests/s a full batch sustains
rate = 0.7 * capacity_req_s
trace = serving.make_trace(CFG["trace_requests"], rate, prompt_tokens=PROMPT_RANGE, output_tokens=OUT_RANGE, seed=0)
print(f"{len(trace)} requests at {rate:.3g} requests/s (cost model capacity at batch {MAX_BATCH}: "
      f"{capacity_req_s:.3g}/s); output tokens: median {np.median([r['output_tokens'] for r in trace]):.0f}, "
      f"max {max(r['output_tokens'] for r in trace)}")

sched = {"static": serving.static_batching(trace, MAX_BATCH, step_time),
         "continuous": continuous_batching(trace, MAX_BATCH, step_time)}
sched_table = pd.DataFrame([{"scheduler": k, **serving_metrics(v)} for k, v in sched.items()]).set_index("scheduler")
display(sched_table.round(3))
cb_speedup = sched_table.loc["continuous", "throughput_tok_s"] / sched_table.loc["static", "throughput_tok_s"]
cb_p95 = sched_table.loc["static", "p95_latency_s"] / sched_table.loc["continuous", "p95_latency_s"]
print(f"continuous batching: {cb_speedup:.2f}x the throughput, p95 latency {cb_p95:.2f}x lower")

# %% id="cell-28"
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
for ax, (name, recs) in zip(axes, sched.items()):
    lat = [r["finish_s"] - r["arrival_s"] for r in recs]
    ax.hist(lat, bins=30, color="tab:blue" if name == "static" else "tab:green")
    ax.axvline(np.percentile(lat, 50), color="k", ls="--", label="p50")
    ax.axvline(np.percentile(lat, 95), color="r", ls="--", label="p95")
    ax.set(title=f"{name} batching: latency per request", xlabel="seconds (simulated)", ylabel="requests")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()

# %% [markdown] id="cell-29"
# ### Measure: the latency-throughput curve over batch sizes
#
# The same trace, replayed at a higher arrival rate (twice what a `max_batch` engine sustains, so the
# queue builds up), for each `max_batch` in `CFG["curve_batches"]`, under both schedulers. Each point is
# one batch size. Moving right (bigger batches) buys throughput; the price is per-step time, and with
# static batching, waiting for the slowest request of every batch.

# %% id="cell-30"
busy_trace = serving.make_trace(CFG["trace_requests"], 2 * capacity_req_s, prompt_tokens=PROMPT_RANGE,
                                output_tokens=OUT_RANGE, seed=1)
curve_rows = []
for b in CFG["curve_batches"]:
    for name, fn in (("static", serving.static_batching), ("continuous", continuous_batching)):
        curve_rows.append({"scheduler": name, "max_batch": b, **serving_metrics(fn(busy_trace, b, step_time))})
curve = pd.DataFrame(curve_rows)
display(curve.round(3))

fig, ax = plots.new_axes("Latency vs throughput (one point per max_batch)", "throughput (tokens / s)",
                         "latency (s, simulated)")
for name, color in (("static", "tab:blue"), ("continuous", "tab:green")):
    c = curve[curve["scheduler"] == name]
    ax.plot(c["throughput_tok_s"], c["p50_latency_s"], "o-", color=color, label=f"{name} p50")
    ax.plot(c["throughput_tok_s"], c["p95_latency_s"], "s--", color=color, label=f"{name} p95")
    for _, r in c.iterrows():
        ax.annotate(str(r["max_batch"]), (r["throughput_tok_s"], r["p50_latency_s"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
ax.set_yscale("log")
ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
ax.legend(fontsize=8)
plt.show()

# %% [markdown] id="cell-31"
# Continuous batching wins on both axes because of the spread in output lengths: a static batch runs as
# long as its longest member, and everyone in it, and everyone queued behind it, waits. Evicting each
# request the moment it is done, and filling its slot at the next iteration, keeps the batch full of useful
# work. The honest caveat: these are *simulated* times from a cost model measured on transformers on this
# CPU, where a bigger batch costs noticeably more per step; how large the gap is depends on that step-time
# curve, so it is a property of the hardware and the engine, and the next section measures it on a real
# engine instead of assuming it. Remember too that batch size is capped by KV memory (exercise 2).

# %% [markdown] id="engine-intro"
# ## A real engine: llama.cpp's batched decoding, driven by your scheduler
#
# Everything above is a simulation: a cost model, measured on transformers, replayed by a scheduler.
# Here the same scheduler drives a **real engine that batches**. llama.cpp decodes several sequences in
# one call: a `llama_batch` holds tokens from many sequences, each tagged with its position and its
# `seq_id`, and one `llama_decode` runs them through the model together (every weight matrix is read
# once for all of them; each sequence attends only to its own KV cells). That is the machinery
# `llama-server --parallel N` uses for its slots; we reach it through llama-cpp-python's low-level C API,
# so no server binary has to be built:
#
# * `serving.BatchedLlama(gguf, n_seqs)` loads the Q4_1 GGUF into one llama.cpp context with `n_seqs`
#   sequences, each with its own KV cells (`n_seq_max`, `kv_unified=False`). `engine.step({seq_id:
#   tokens})` appends tokens to any subset of the sequences in **one** `llama_decode` (a prompt to prefill,
#   or the one token sampled last) and returns each sequence's greedy next token; `engine.release(seq_id)`
#   frees a finished request's KV cells (`llama_memory_seq_rm`) for the next one.
# * `serving.EngineSteps(engine, trace)` is a `step_time(batch_size, prefill_tokens)` that **runs** the
#   iteration instead of predicting it. Pass it to your `continuous_batching` (or to
#   `serving.static_batching`) in place of the cost model: your scheduler decides who runs, the engine
#   runs them (admitted requests' prompts are prefilled in the same `llama_decode` as the others' decode
#   tokens, exactly as the scheduler charges it), and the scheduler's clock advances by the **measured**
#   wall time of the iteration. The schedulers' contract says which requests a call means (admission is
#   FIFO, the rest are the running requests), and `EngineSteps` raises if a call contradicts it.
#
# The clock is real except in one place: when nothing runs, the scheduler jumps to the next arrival
# instead of sleeping until it. Latencies, TTFT and throughput are then those of a server that received
# the trace's requests at their arrival times. The arrivals are simulated, not HTTP clients, so the cost
# of the HTTP layer is not in these numbers (the llama-cpp-python server below has one).
#
# **Checks.** (1) Batching must not change the answer: every request's greedy tokens from the batched
# runs are compared with the same prompt decoded alone (one sequence per `llama_decode`). Matrix
# products over a batch may sum in another order than over one row, so a float can differ in its last
# bits and flip an argmax that is nearly tied; we report the fraction of requests that match exactly
# rather than assume it is 1. (2) The simulation is checked against the engine: the cost model is
# measured on *this* engine (`engine.measure_step_times`: decode iterations at each batch size, repeated),
# and your scheduler replays the same trace on the cost model and on the engine.
#
# **One llama.cpp thread** for the whole section (`ENGINE_THREADS`), for the cost model and for every
# run. llama.cpp's threads meet at a barrier after every operation of the graph (hundreds per decode
# call), so on a machine where other processes keep the cores busy, every barrier waits for whichever
# thread was descheduled, and two threads can be many times slower than one, by an amount that changes
# with the neighbours' load from one minute to the next. A thread count picked once by timing can turn
# bad halfway through the section and make the engine's runs incomparable with its cost model; one
# thread is slower on an idle machine but does not collapse on a busy one. On a machine of your own with
# nothing else running, set `ENGINE_THREADS = THREADS` and rerun the section.

# %% id="engine-steps"
ENGINE_THREADS = 1
engine = serving.BatchedLlama(models.gguf_path(), n_seqs=max(CFG["engine_batches"]),
                              n_ctx_per_seq=CFG["engine_ctx"], n_threads=ENGINE_THREADS)
engine_measured = engine.measure_step_times(CFG["engine_batches"], context_len=CFG["step_context"],
                                            steps=CFG["engine_steps"], repeats=CFG["engine_repeats"],
                                            prefill_len=CFG["step_context"])
engine_step_time = serving.cost_model(engine_measured)
eng_steps = pd.DataFrame({"concurrent_sequences": engine_measured["batch_sizes"],
                          "step_ms": np.array(engine_measured["step_s"]) * 1e3})
_all = np.array(engine_measured["step_s_all"])                     # [batch size, repeat] seconds
eng_steps["tok_s_median"] = eng_steps["concurrent_sequences"] / np.median(_all, axis=1)
eng_steps["tok_s_min"] = eng_steps["concurrent_sequences"] / _all.max(axis=1)
eng_steps["tok_s_max"] = eng_steps["concurrent_sequences"] / _all.min(axis=1)
eng_steps["vs_one_sequence"] = eng_steps["tok_s_median"] / eng_steps["tok_s_median"].iloc[0]
display(eng_steps.round(2))
print(f"{CFG['engine_repeats']} timings of {CFG['engine_steps']} iterations each per batch size; "
      f"prefill {engine_measured['prefill_s_per_token'] * 1e3:.2f} ms per prompt token")

# %% [markdown] id="engine-clients"
# ### Measure: concurrent clients, real engine against the simulation
#
# `C` clients that each send their next request as soon as the previous answer is back keep `C` requests
# in flight: that is a trace whose requests all arrive at once, served with `max_batch = C`. For each
# `C` in `CFG["engine_batches"]` the same `CFG["engine_requests"]` requests (the questions below as
# ChatML prompts, output lengths log-uniform in `CFG["engine_out"]`, exactly that many tokens each) are
# served by your `continuous_batching` on the engine, `CFG["engine_repeats"]` times, and once on the
# engine's cost model. A client's latency counts from the moment *it* sends: request `j` (in FIFO order)
# is sent when the `(j - C + 1)`-th answer comes back (the first `C` at 0), and `closed_loop` re-bases
# the records to those send times before `serving_metrics` judges them. Throughput is the same either
# way (all tokens over the whole run).

# %% id="engine-run"
ENGINE_QUESTIONS = QUESTIONS + ["Name three uses for baking soda.", "How do I make cold brew coffee?",
                                "Summarise the plot of Romeo and Juliet in two sentences.",
                                "What is the difference between a latte and a cappuccino?"]
ENGINE_PROMPTS = [tok(chat_prompt(tok, q), add_special_tokens=False)["input_ids"] for q in ENGINE_QUESTIONS]


def run_on_engine(trace, max_batch, scheduler):
    """Serve ``trace`` on the engine with ``scheduler``; (per-request records, outputs by id)."""
    steps_ = serving.EngineSteps(engine, trace)
    records = scheduler(trace, max_batch, steps_)
    return records, steps_.close()


_alone = {}


def alone(prompt_ids, n):
    """The reference: the prompt decoded alone (one sequence per llama_decode), first n tokens."""
    key = tuple(prompt_ids)
    if key not in _alone:                 # once per prompt, as long as any request of this section
        _alone[key] = engine.generate(list(key), CFG["engine_out"][1])
    return _alone[key][:n]


client_trace = serving.make_trace(CFG["engine_requests"], float("inf"), output_tokens=CFG["engine_out"],
                                  seed=10, prompts=ENGINE_PROMPTS)


def closed_loop(records, clients):
    """``records`` as ``clients`` closed-loop clients see them: request j (FIFO order) is sent when the
    (j - clients + 1)-th request finishes, the first ``clients`` at 0 (the scheduler admits it then)."""
    order = sorted(records, key=lambda r: (r["arrival_s"], r["id"]))
    done = sorted(r["finish_s"] for r in records)
    return [{**r, "arrival_s": 0.0 if j < clients else done[j - clients]} for j, r in enumerate(order)]


checks = []                              # (requests served batched, requests identical to alone)


def check_outputs(trace, outputs):
    same = [outputs[r["id"]] == alone(r["prompt_ids"], r["output_tokens"]) for r in trace]
    checks.append((len(same), sum(same)))
    return float(np.mean(same))


client_rows = []
for C in tqdm(CFG["engine_batches"], desc="concurrent clients"):
    sim = serving_metrics(closed_loop(continuous_batching(client_trace, C, engine_step_time), C))
    for rep in range(CFG["engine_repeats"]):
        records, outputs = run_on_engine(client_trace, C, continuous_batching)
        client_rows.append({"clients": C, "repeat": rep, **serving_metrics(closed_loop(records, C)),
                            "sim_throughput_tok_s": sim["throughput_tok_s"],
                            "sim_p50_latency_s": sim["p50_latency_s"], "sim_p50_ttft_s": sim["p50_ttft_s"],
                            "same_as_alone": check_outputs(client_trace, outputs)})
clients = pd.DataFrame(client_rows)
client_table = clients.groupby("clients").agg(
    real_tok_s=("throughput_tok_s", "median"), real_tok_s_min=("throughput_tok_s", "min"),
    real_tok_s_max=("throughput_tok_s", "max"), sim_tok_s=("sim_throughput_tok_s", "first"),
    real_p50_latency_s=("p50_latency_s", "median"), sim_p50_latency_s=("sim_p50_latency_s", "first"),
    real_p50_ttft_s=("p50_ttft_s", "median"), sim_p50_ttft_s=("sim_p50_ttft_s", "first"),
    same_as_alone=("same_as_alone", "mean"))
client_table["real_over_sim_tok_s"] = client_table["real_tok_s"] / client_table["sim_tok_s"]
display(client_table.round(3))
C_MAX = int(client_table.index[-1])
client_gain = client_table["real_tok_s"].iloc[-1] / client_table["real_tok_s"].iloc[0]
sim_client_gain = client_table["sim_tok_s"].iloc[-1] / client_table["sim_tok_s"].iloc[0]
print(f"throughput, {C_MAX} clients / 1 client: {client_gain:.2f}x on the engine, {sim_client_gain:.2f}x simulated "
      f"(decode alone, {C_MAX} sequences / 1: {eng_steps.set_index('concurrent_sequences').loc[C_MAX, 'vs_one_sequence']:.2f}x); "
      f"most throughput at {int(client_table['real_tok_s'].idxmax())} clients")
print(f"real / simulated throughput: {client_table['real_over_sim_tok_s'].min():.2f} to "
      f"{client_table['real_over_sim_tok_s'].max():.2f} over {len(client_table)} client counts")
_prefill_s = engine_measured["prefill_s_per_token"] * sum(r["prompt_tokens"] for r in client_trace)
prefill_share = {C: _prefill_s / max(r["finish_s"] for r in continuous_batching(client_trace, C, engine_step_time))
                 for C in (1, C_MAX)}
print("prefill's share of the simulated time: " + ", ".join(f"{v:.0%} with {C} client(s)" for C, v in prefill_share.items()))

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
x = client_table.index.to_numpy()
ax1.errorbar(x, client_table["real_tok_s"], yerr=[client_table["real_tok_s"] - client_table["real_tok_s_min"],
             client_table["real_tok_s_max"] - client_table["real_tok_s"]], fmt="o-", capsize=3,
             label="llama.cpp engine (median, min-max)")
ax1.plot(x, client_table["sim_tok_s"], "s--", label="simulation (engine's cost model)")
ax1.set(title="Throughput vs concurrent clients", xlabel="clients (= max_batch)", ylabel="tokens / s")
ax2.plot(x, client_table["real_p50_latency_s"], "o-", label="engine p50 latency")
ax2.plot(x, client_table["sim_p50_latency_s"], "s--", label="simulated p50 latency")
ax2.plot(x, client_table["real_p50_ttft_s"], "o-", label="engine p50 TTFT")
ax2.plot(x, client_table["sim_p50_ttft_s"], "s--", label="simulated p50 TTFT")
ax2.set(title="Latency per request vs concurrent clients", xlabel="clients (= max_batch)", ylabel="seconds")
for ax in (ax1, ax2):
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(c) for c in x])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown] id="engine-poisson"
# ### Measure: static against continuous batching, on the real engine
#
# The question of exercise 3, asked of the engine: a Poisson trace of `CFG["engine_poisson_requests"]`
# requests (arrival rate set from the engine's cost model to keep a `max_batch` engine about 70 % busy),
# served by `serving.static_batching` and by your `continuous_batching`, each on the engine and on its
# cost model. A static batch really decodes its finished rows until its longest request is done (that is
# the padding it pays for); continuous batching really evicts them.

# %% id="engine-poisson-run"
EB = max(CFG["engine_batches"])
_mean_out = float(np.mean([r["output_tokens"] for r in client_trace]))
_mean_prompt = float(np.mean([len(p) for p in ENGINE_PROMPTS]))
_per_request_s = engine_step_time(EB, 0) * _mean_out / EB + engine_measured["prefill_s_per_token"] * _mean_prompt
engine_rate = 0.7 / _per_request_s          # requests/s that keep a full batch about 70 % busy
poisson_trace = serving.make_trace(CFG["engine_poisson_requests"], engine_rate, output_tokens=CFG["engine_out"],
                                   seed=7, prompts=ENGINE_PROMPTS)
engine_sched_rows = []
for name, fn in (("static", serving.static_batching), ("continuous", continuous_batching)):
    records, outputs = run_on_engine(poisson_trace, EB, fn)
    engine_sched_rows.append({"scheduler": name, "run": "llama.cpp engine", **serving_metrics(records),
                              "same_as_alone": check_outputs(poisson_trace, outputs)})
    engine_sched_rows.append({"scheduler": name, "run": "simulated (engine cost model)",
                              **serving_metrics(fn(poisson_trace, EB, engine_step_time))})
engine_sched = pd.DataFrame(engine_sched_rows).set_index(["scheduler", "run"])
display(engine_sched.round(3))
_real = engine_sched.xs("llama.cpp engine", level="run")
engine_cb_speedup = _real.loc["continuous", "throughput_tok_s"] / _real.loc["static", "throughput_tok_s"]
engine_cb_p95 = _real.loc["static", "p95_latency_s"] / _real.loc["continuous", "p95_latency_s"]
served, identical = map(sum, zip(*checks))
print(f"{len(poisson_trace)} requests at {engine_rate:.3g}/s, max_batch {EB}, on the engine: throughput continuous / "
      f"static {engine_cb_speedup:.2f}x; p95 latency static / continuous {engine_cb_p95:.2f}x (above 1: continuous is better)")
print(f"batched greedy output identical to the prompt decoded alone: {identical} of {served} requests served "
      f"in this section ({identical / served:.1%})")
assert identical / served >= 0.9, "batched decoding changed most answers: a bug, not rounding"
engine.close()                          # frees the model, the KV cache and llama.cpp's threads

# %% [markdown] id="engine-read"
# How to read it. **Throughput against clients** is the engine's step-time curve at work. Batching pays
# exactly as far as one `llama_decode` for `C` sequences costs less than `C` single-sequence ones: the
# `vs_one_sequence` column of the first table is that gain for decode, measured. It depends on the
# hardware and the kernels: where decode is bound by reading the weights, `C` sequences share one read
# and the gain approaches `C`; where the CPU's arithmetic is already the limit (a quantized model on one
# core can be), it stays small. Whole requests also pay their **prefill**, which the cost model charges
# per prompt token whatever the batch; the shorter the replies next to the prompts, the larger its share
# of the work (printed above for the simulation) and the less client throughput gains over decode alone.
# Compare the printed `clients / 1 client` gains with decode's: whether throughput keeps growing up to
# the most clients, levels off, or falls back is this run's measurement, not a law. A client's latency
# grows with `C` as far as each iteration gets longer (the first table's `step_ms`). The numbers are
# this machine's, with one llama.cpp thread; other CPUs and GPUs have other curves, and none was measured
# here. **Real against simulated** is the test of the whole method of the section above: where the two
# columns agree, the cost model is a good stand-in for the engine and capacity planning on it is sound;
# where they differ, the difference is what the cost model leaves out (the scheduler's Python, attention
# growing with the context, several prompts prefilled in one call, a neighbour process on the CPU).
# **Identical outputs** is the check that the engine serves each user the answer it would have given
# them alone.

# %% [markdown] id="cell-32"
# ## A real server: llama.cpp's OpenAI-compatible server
#
# `llama-cpp-python[server]` ships an HTTP server that speaks the OpenAI API (`/v1/models`,
# `/v1/completions`, `/v1/chat/completions`) on top of llama.cpp, serving a GGUF file on CPU.
# `serving.LlamaServer` starts it as a subprocess on a free port, waits until `/v1/models` answers, and
# **always stops it**: the `with` block kills the server's whole process group however the block ends
# (an exception included), and a `weakref.finalize` finalizer does it if the object is dropped or the
# kernel exits. A server left running after a failed cell would hold memory and a port, and skew every
# later timing; lesson 9's drift checks reuse the same helper.
#
# The client, `serving.complete`, is plain HTTP: a streamed `POST /v1/completions` with the raw ChatML
# prompt (the model's own template; we do not rely on the server's built-in chat formats), timing the
# first token and the last. `serving.run_concurrent` sends many requests from several client threads at
# once.
#
# **GGUF variants.** The course ships the model as Q4_1. `serving.gguf_variant` writes the other types
# with llama.cpp's own quantizer (`llama_model_quantize`, re-quantizing allowed) into the cache folder,
# once. An F16 or F32 file made *from Q4_1 weights* has F16/F32's size and speed but Q4_1's quality: the
# rounding that 4 bits did is not undone. So this comparison is about **speed and cost**. The course has
# no full-precision original of the model: lesson 6's "F32" model is the same dequantized Q4_1, and its
# quality comparisons are between formats made from those weights, not against the original release.
#
# For each variant we measure: the single-request decode rate (one stream, tokens after the first over
# the time after the first), and `CFG["server_requests"]` requests sent by `CFG["server_concurrency"]`
# concurrent clients (throughput, p50/p95 latency, TTFT). Then the **cost per million tokens** at the
# assumed `PRICE_PER_HOUR_USD`: $\text{price per hour} / (3600 \times \text{tokens/s}) \times 10^6$.

# %% id="cell-33"
variants = {}
for kind in tqdm(CFG["gguf_kinds"], desc="GGUF variants"):
    t0 = time.perf_counter()
    path = serving.gguf_variant(kind)
    variants[kind] = {"path": path, "MiB": path.stat().st_size / 2 ** 20, "prepare_s": time.perf_counter() - t0}
display(pd.DataFrame([{"type": k, "file": v["path"].name, "MiB": round(v["MiB"], 1)} for k, v in variants.items()]))

# %% id="cell-34"
server_prompts = [PROMPTS[i % len(PROMPTS)] for i in range(CFG["server_requests"])]
server_rows, server_pids = [], []
for kind in CFG["gguf_kinds"]:
    with serving.LlamaServer(variants[kind]["path"], n_threads=THREADS, n_ctx=512) as server:
        server_pids.append(server.pid)
        serving.complete(server.base_url, PROMPTS[0], max_tokens=2)        # warm-up
        single = serving.complete(server.base_url, PROMPTS[0], max_tokens=CFG["server_single_tokens"])
        load = serving.run_concurrent(server.base_url, server_prompts, CFG["server_concurrency"],
                                      CFG["server_max_tokens"])
    t_first = min(r["start_s"] for r in load["requests"])
    records = [{"arrival_s": r["start_s"] - t_first, "first_token_s": r["first_token_s"] - t_first,
                "finish_s": r["finish_s"] - t_first, "output_tokens": r["tokens"]} for r in load["requests"]]
    m = serving_metrics(records)
    decode = (single["tokens"] - 1) / max(single["latency_s"] - single["ttft_s"], 1e-9)
    server_rows.append({"type": kind, "MiB": variants[kind]["MiB"], "startup_s": server.startup_s,
                        "single_decode_tok_s": decode, "single_ttft_s": single["ttft_s"],
                        "concurrent_tok_s": load["tokens_per_s"], **m,
                        "usd_per_M_tokens": PRICE_PER_HOUR_USD / (3600 * load["tokens_per_s"]) * 1e6})
# every server is gone: not one process left behind
assert not any(serving.pid_alive(pid) for pid in server_pids), "a server survived its with-block"
server_table = pd.DataFrame(server_rows).set_index("type")
server_table["concurrent_over_single"] = server_table["concurrent_tok_s"] / server_table["single_decode_tok_s"]
display(server_table.round(3))
print("sample reply:", repr(single["text"]))

# %% id="cell-35"
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.4))
kinds = list(server_table.index)
ax1.bar(kinds, server_table["single_decode_tok_s"], color="tab:blue", label="one request")
ax1.bar(kinds, server_table["concurrent_tok_s"], color="tab:orange", alpha=0.6,
        label=f"{CFG['server_concurrency']} concurrent clients")
ax1.set(title="llama.cpp server: tokens / s by GGUF type", ylabel="tokens / s")
ax1.legend(fontsize=8)
ax2.bar(kinds, server_table["usd_per_M_tokens"], color="tab:red")
ax2.set(title=f"Cost per million tokens at ${PRICE_PER_HOUR_USD}/hour (assumed)", ylabel="USD")
for ax in (ax1, ax2):
    ax.grid(alpha=0.3, axis="y")
fig.tight_layout()
plt.show()

# %% [markdown] id="cell-36"
# Two things to read off the table. First, the bytes per weight: a decode step reads every weight once, so
# a 4-bit file moves a fraction of an F16 or F32 file's bytes per token, and where decode is bound by
# memory, fewer bytes decode faster. The order is not guaranteed: each type also has its own
# dequantize-and-multiply kernel, and where that arithmetic is the limit a smaller type can decode slower
# than a larger one (read the `single_decode_tok_s` column of this run rather than assume the order).
# Cost per token follows speed; the roofline below says how close each file comes to what the memory bus
# allows. Second, compare the concurrent column with the single stream: llama-cpp-python's server runs
# **one request at a time** (one `Llama` object behind a lock, by its design), so concurrent clients
# queue behind each other and their latency includes the wait, while the throughput cannot rise above
# one stream's (the `concurrent_over_single` ratio above; the single stream is timed after its first
# token, the concurrent run includes every prefill, so the ratio is about 1 or below, and above 1 only
# by timing noise). The batched engine of the previous section is what it lacks: the same llama.cpp
# kernels, with many sequences per `llama_decode`. llama.cpp's own `llama-server --parallel N` serves its
# slots that way over HTTP; it is a separate binary that llama-cpp-python's build does not produce (it
# builds the libraries only), so this notebook drives the libraries' batched API directly instead.

# %% [markdown] id="cell-37"
# ### Decode speed against the memory-bandwidth roofline
#
# At batch 1 a decode step multiplies a single vector by every weight matrix: about two floating-point
# operations per weight *read from memory*. CPUs (and GPUs) compute far faster than they read, so decode
# is **memory-bound** (quantized types add dequantization arithmetic per weight, which can make a CPU's
# arithmetic the tighter limit), and its ceiling is
#
# $$\text{tokens/s} \le \frac{\text{memory bandwidth (bytes/s)}}{\text{bytes of weights read per token}}.$$
#
# We measure this machine's read bandwidth the way torch sees it (`serving.memory_bandwidth_gbs`: the best
# sum over a buffer much larger than the CPU caches) and compare each engine's measured single-stream
# decode rate with its roofline. The bytes per token are the weights' bytes (the tied embedding is read
# once, by the output projection; the KV cache of these short contexts is small next to it). The caveat:
# this is a *bound*, and a single number for bandwidth is a simplification (one core reads slower than all
# of them; part of a small model can stay in cache); a busy machine lowers both sides, and a fraction
# above 1 means the bandwidth measurement was disturbed, or the weights partly stayed in cache.

# %% id="cell-38"
bandwidth = serving.memory_bandwidth_gbs(CFG["bandwidth_mb"])
fp32_bytes = model.get_memory_footprint(return_buffers=False)
roof_rows = [{"engine": "transformers fp32 (your loop)", "weight_MB": fp32_bytes / 1e6,
              "measured_tok_s": kv_table["with_cache_tok_s"].iloc[-1]}]
roof_rows.append({"engine": f"llama.cpp batched engine Q4_1, 1 sequence, {ENGINE_THREADS} thread(s)",
                  "weight_MB": models.gguf_path().stat().st_size / 1e6,
                  "measured_tok_s": eng_steps["tok_s_median"].iloc[0]})
for kind, row in server_table.iterrows():
    roof_rows.append({"engine": f"llama.cpp server {kind}", "weight_MB": variants[kind]["MiB"] * 2 ** 20 / 1e6,
                      "measured_tok_s": row["single_decode_tok_s"]})
roof = pd.DataFrame(roof_rows)
roof["roofline_tok_s"] = bandwidth * 1e9 / (roof["weight_MB"] * 1e6)
roof["fraction_of_roofline"] = roof["measured_tok_s"] / roof["roofline_tok_s"]
print(f"measured read bandwidth: {bandwidth:.1f} GB/s ({THREADS} torch threads)")
display(roof.round(3))

fig, ax = plots.new_axes("Decode vs the memory-bandwidth roofline", "MB of weights read per token", "tokens / s")
mb = np.geomspace(roof["weight_MB"].min() * 0.8, roof["weight_MB"].max() * 1.25, 50)
ax.plot(mb, bandwidth * 1e9 / (mb * 1e6), "k--", label=f"roofline at {bandwidth:.0f} GB/s")
for _, r in roof.iterrows():
    ax.plot(r["weight_MB"], r["measured_tok_s"], "o", label=r["engine"])
ax.set(xscale="log", yscale="log")
for axis in (ax.xaxis, ax.yaxis):                 # plain numbers on the log axes
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
ax.legend(fontsize=7)
plt.show()

# %% [markdown] id="cell-39"
# ## The same client, pointed at vLLM (on a GPU)
#
# vLLM is the engine production moves to on a GPU: paged attention (exercise 2's blocks), continuous
# batching (exercise 3's scheduler) and fast kernels, behind the same OpenAI API. Because our client only
# speaks that API, moving to vLLM is a change of URL and model name:
#
# ```bash
# # on a machine with a CUDA GPU (pip install vllm); the HF-format model folder, not the GGUF
# vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --port 8000 --max-num-seqs 64
# ```
#
# ```python
# VLLM_URL = "http://gpu-host:8000/v1"
# reply = serving.complete(VLLM_URL, PROMPTS[0], max_tokens=64, model="HuggingFaceTB/SmolLM2-135M-Instruct")
# load = serving.run_concurrent(VLLM_URL, server_prompts, concurrency=16, max_tokens=64,
#                               model="HuggingFaceTB/SmolLM2-135M-Instruct")
# ```
#
# **This was not run here**: this course runs on CPU, and no GPU was available when this lesson was
# written, so there are no vLLM numbers in this notebook. What this notebook did measure is the mechanism
# on a CPU: llama.cpp batching the concurrent requests, and how far its throughput grows with the number
# of clients on this machine (the engine section's table and its printed gains). For vLLM on a GPU, the
# claim is its authors': the PagedAttention paper
# (Kwon et al., *Efficient Memory Management for Large Language Model Serving with PagedAttention*, SOSP
# 2023, arXiv:2309.06180) reports 2-4x the throughput of FasterTransformer and Orca at the same latency,
# from fitting larger batches into the same KV memory. Run the cells above against your own vLLM server to
# see what it does for this model on your GPU.

# %% [markdown] id="cell-40"
# ## What we measured
#
# Every number below was computed in this run, on this machine (timings depend on its CPU and on what
# else it was running). Rows marked "simulated" replay a cost model measured here; the llama.cpp engine's
# rows were served for real (arrivals simulated, every iteration run and timed). The price per hour is
# an assumption, not a measurement.

# %% id="cell-41"
rows = []
for r in kv_rows:
    n = r["new_tokens"]
    rows += [
        {"quantity": f"decode with KV cache, {n} new tokens (your loop)", "value": round(r["with_cache_tok_s"], 1), "unit": "tokens/s"},
        {"quantity": f"decode without cache, {n} new tokens", "value": round(r["without_cache_tok_s"], 1), "unit": "tokens/s"},
        {"quantity": f"KV-cache speed-up, {n} new tokens", "value": round(r["kv_speedup"], 2), "unit": "x"},
        {"quantity": f"your loop / transformers generate, {n} new tokens", "value": round(r["loop_vs_generate"], 2),
         "unit": "x", "note": f"identical tokens: {r['identical_tokens']}"},
    ]
rows += [
    {"quantity": "KV cache per token (fp32), real DynamicCache = formula", "value": real_per_token, "unit": "bytes",
     "note": str(real_per_token == mine["bytes_per_token"])},
    {"quantity": "requests of 2048 tokens in 1 GiB of fp16 KV cache", "value": int(capacity.loc[1, "requests in 1 GiB (fp16)"]), "unit": "requests"},
    {"quantity": f"decode iteration, batch 1 / batch {measured['batch_sizes'][-1]}",
     "value": f"{measured['step_s'][0] * 1e3:.1f} / {measured['step_s'][-1] * 1e3:.1f}", "unit": "ms"},
]
for name in ("static", "continuous"):
    s = sched_table.loc[name]
    rows += [
        {"quantity": f"{name} batching (max_batch {MAX_BATCH}): throughput", "value": round(s["throughput_tok_s"], 1), "unit": "tokens/s",
         "note": f"{len(trace)} requests, simulated"},
        {"quantity": f"{name} batching: p50 / p95 latency", "value": f"{s['p50_latency_s']:.2f} / {s['p95_latency_s']:.2f}", "unit": "s"},
        {"quantity": f"{name} batching: p50 / p95 time to first token", "value": f"{s['p50_ttft_s']:.2f} / {s['p95_ttft_s']:.2f}", "unit": "s"},
    ]
rows += [{"quantity": "continuous / static throughput", "value": round(cb_speedup, 2), "unit": "x", "note": "simulated"},
         {"quantity": "static / continuous p95 latency", "value": round(cb_p95, 2), "unit": "x", "note": "simulated"}]
for _, r in eng_steps.iterrows():
    rows.append({"quantity": f"llama.cpp batched decode, {int(r['concurrent_sequences'])} concurrent sequences",
                 "value": round(r["tok_s_median"], 1), "unit": "tokens/s",
                 "note": f"median of {CFG['engine_repeats']} (min {r['tok_s_min']:.1f}, max {r['tok_s_max']:.1f}), "
                         f"{engine.n_threads} thread(s)"})
for C, r in client_table.iterrows():
    rows += [
        {"quantity": f"{C} concurrent clients on the llama.cpp engine: throughput real / simulated",
         "value": f"{r['real_tok_s']:.1f} / {r['sim_tok_s']:.1f}", "unit": "tokens/s",
         "note": f"real median of {CFG['engine_repeats']}, range {r['real_tok_s_min']:.1f}-{r['real_tok_s_max']:.1f}"},
        {"quantity": f"{C} concurrent clients on the llama.cpp engine: p50 latency real / simulated",
         "value": f"{r['real_p50_latency_s']:.2f} / {r['sim_p50_latency_s']:.2f}", "unit": "s",
         "note": "closed loop: from each client's send"},
    ]
for (name, run), r in engine_sched.iterrows():
    rows.append({"quantity": f"{name} batching on the Poisson trace, {run}: throughput; p50 / p95 latency",
                 "value": f"{r['throughput_tok_s']:.1f}; {r['p50_latency_s']:.2f} / {r['p95_latency_s']:.2f}",
                 "unit": "tokens/s; s", "note": f"{len(poisson_trace)} requests, max_batch {EB}"})
rows += [{"quantity": f"llama.cpp engine: throughput, {C_MAX} concurrent clients / 1 client", "value": round(client_gain, 2),
          "unit": "x", "note": f"simulated on its cost model: {sim_client_gain:.2f}x"},
         {"quantity": "llama.cpp engine: real / simulated throughput, over the client counts",
          "value": f"{client_table['real_over_sim_tok_s'].min():.2f} to {client_table['real_over_sim_tok_s'].max():.2f}",
          "unit": "x"}]
rows += [{"quantity": "llama.cpp engine: continuous / static throughput", "value": round(engine_cb_speedup, 2), "unit": "x",
          "note": "measured"},
         {"quantity": "batched greedy answers identical to the prompt decoded alone", "value": f"{identical} / {served}",
          "unit": "requests", "note": f"{identical / served:.1%}"},
         {"quantity": "memory read bandwidth (torch)", "value": round(bandwidth, 1), "unit": "GB/s"}]
for _, r in roof.iterrows():
    rows.append({"quantity": f"{r['engine']}: decode / roofline", "value": f"{r['measured_tok_s']:.1f} / {r['roofline_tok_s']:.1f}",
                 "unit": "tokens/s", "note": f"{r['fraction_of_roofline']:.0%} of the roofline"})
for kind, s in server_table.iterrows():
    rows += [
        {"quantity": f"llama.cpp server, {kind} ({s['MiB']:.0f} MiB): one stream", "value": round(s["single_decode_tok_s"], 1), "unit": "tokens/s"},
        {"quantity": f"llama.cpp server, {kind}: {CFG['server_concurrency']} concurrent clients", "value": round(s["concurrent_tok_s"], 1),
         "unit": "tokens/s", "note": f"p50 / p95 latency {s['p50_latency_s']:.2f} / {s['p95_latency_s']:.2f} s"},
        {"quantity": f"llama.cpp server, {kind}: cost per million tokens", "value": round(s["usd_per_M_tokens"], 3), "unit": "USD",
         "note": f"at an assumed ${PRICE_PER_HOUR_USD}/hour"},
    ]
rows.append({"quantity": "vLLM on GPU", "value": "not run", "unit": "", "note": "no GPU here; see the vLLM section"})
rows.append({"quantity": "llama-server (--parallel, HTTP)", "value": "not built", "unit": "",
             "note": "same kernels measured through the batched C API instead"})
results = report.record_results("08_serving", BUDGET, rows)
display(results)

# %% [markdown] id="cell-42"
# ## Where this goes next
#
# You can now serve the model and say what it costs: the KV cache (and its memory), a batching policy,
# a server you can start and stop reliably, and the numbers that matter to users (p50/p95 latency, TTFT)
# and to whoever pays (tokens/s, cost per million tokens). Lesson 9 puts this server under observation:
# every request an event, and scheduled drift checks that re-run the gold set against the live endpoint.
# Lesson 14 attacks the one cost batching cannot remove, the sequential decode of a single stream, with
# speculative decoding.
