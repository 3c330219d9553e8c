# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown] id="intro"
# # Lesson 10 — Capstone: choosing the right technique, and graduating
#
# Fourteen lessons, fourteen techniques, and each one came with a number measured on this machine:
# what distillation kept of the teacher's quality, what a bit of quantization cost in perplexity,
# how much the KV cache and batching sped decoding up, the acceptance rate below which a draft
# model makes speculative decoding *slower*. A practitioner's job is rarely to implement one of them;
# it is to pick, for a goal and its constraints, the few that will move the number that is missed,
# and to say why. Reaching for the technique you know best (quantizing a model that gives wrong
# answers, fine-tuning for facts that change every week, speculating with a draft the target rejects)
# costs weeks.
#
# **You will build** (each exercise is graded on its own)
# 1. `recommend(scenario, facts)`: the **decision guide**. A scenario (a goal and its constraints:
#    quality, latency and throughput targets, a memory limit, labelled and preference data, tool
#    use, freshness of knowledge, privacy, hardware) goes in; the techniques to reach for come out,
#    ranked, each with its reason — or "none of these", or "measure first". Its thresholds are
#    **the course's measured numbers**, handed to it as `facts`, never constants in your code.
#    It is graded on scenario cases, visible and hidden.
# 2. `graduation_table(results, course, headlines)`: the **graduation report**'s table: for every
#    lesson of the course, what its technique bought on this machine (quality, size, speed), read
#    from the results each lesson recorded — and, for a lesson not run or a row that is missing,
#    a row that says so instead of a silent gap.
#
# **You will see**: the facts the guide stands on, each with the lesson and row it came from (or the
# documented default and *why*: which lesson has not been run); the guide's advice for the coffee
# chain's real situations; one figure of every gain the course measured, and the whole report as a
# self-contained HTML page under the artifact folder.
#
# This lesson trains nothing. It reads what the other lessons wrote with
# `brewslm_helpers.report.record_results` into `artifact_dir(BUDGET)/results/`. Run it after the
# others (at the same budget) to see your numbers; it runs, and says what is missing, with none run.

# %% id="parameters" tags=["parameters"]
import os
BUDGET = os.environ.get("BREWSLM_BUDGET", "full")

# %% id="setup" nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
# %matplotlib inline
import copy
import math
import re
import time
import warnings

warnings.filterwarnings("ignore")

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from brewslm_helpers import budget, capstone, paths, report
from brewslm_helpers.capstone import COURSE, DEFAULT_FACTS, FACTS, HEADLINES, numbers, scenario

budget.resolve(BUDGET)
pd.set_option("display.max_colwidth", 140)
TECHNIQUES = ("measure_first", "none", "rag", "sft", "tool_use_sft", "distillation", "feedback_loop",
              "preference_tuning", "reasoning_training", "multitask", "quantize_q8_0", "quantize_q4_k_m",
              "pruning", "kv_cache", "continuous_batching", "llama_cpp", "vllm", "speculative_prompt_lookup",
              "speculative_draft")
START = time.perf_counter()
print(f"budget {BUDGET}; results are read from {paths.artifact_dir(BUDGET) / 'results'}")

# %% [markdown] id="md-facts"
# ## 1. What the course measured: the facts
#
# Every lesson ended with a "what we measured" table and saved it. `capstone.FACTS` names the numbers
# the decision guide needs and says, in one place, which lesson and which row each comes from; a
# few are computed from two rows (Q4_K_M's perplexity over fp32's, minus one). Where a lesson has
# not been run at this budget, or no longer records the row, the fact takes a **documented default**
# and the table below says so and why: `read` is `recorded` or `DEFAULT`, `source` names the lesson
# and row (or where the default comes from: most are placeholders of the right order, not
# measurements), `missing` says why the row could not be read. At `ci` budget the lessons measure
# toy sizes, so their numbers are real but small-sample; the thresholds mean most from a `full` run.

# %% id="facts"
FACTS_NOW, PROVENANCE = capstone.course_facts(BUDGET)
display(pd.DataFrame(PROVENANCE)[["fact", "value", "unit", "read", "source", "missing"]].round(4))
_missing = sorted({p["missing"] for p in PROVENANCE if p["missing"]})
print(f"{sum(p['missing'] is None for p in PROVENANCE)} of {len(PROVENANCE)} facts read from the lessons' recorded "
      f"results at budget {BUDGET}; the others are DEFAULTS (placeholders, not measurements):")
for line in _missing:
    print("  default used:", line)

# %% [markdown] id="md-guide"
# ## 2. Exercise: the decision guide
#
# ### The scenario
#
# A scenario is a dict with **every** key below (`capstone.scenario(**changes)` builds one from a
# neutral base where every target is met or absent, and refuses unknown keys):
#
# | key | type | meaning |
# |---|---|---|
# | `quality` | `{"current": float or None, "target": float or None}` | task score on the gold set (0..1, higher is better) |
# | `decode_tokens_per_s` | same | one stream's decode speed (latency; higher is better) |
# | `throughput_tokens_per_s` | same | all streams together (higher is better) |
# | `memory_mb` | same | the weights' size now, and the limit (lower is better) |
# | `bits_per_weight` | float | the format of the weights now (32 for fp32, 16 for F16, ...) |
# | `max_ppl_increase` | float | the relative perplexity increase the application accepts (0.02 = 2 %) |
# | `labelled_examples`, `unlabelled_texts`, `preference_pairs` | int | the data there is |
# | `teacher` | `None`, `"local"` or `"hosted"` | a bigger model with the same tokenizer (a hosted one is an API) |
# | `private_data` | bool | the data may not leave the premises (so it may not be sent to a hosted model) |
# | `tasks` | int | distinct tasks the one model must do |
# | `tool_calls` | bool | the model must emit tool calls |
# | `knowledge_changes` | bool | answers depend on facts that change after training (prices, stock, menus) |
# | `verifiable_answers` | bool | a program can check an answer (arithmetic, a unit test) |
# | `hardware` | `"cpu"` or `"gpu"` | where it is served |
# | `serving` | `{"engine": "transformers" / "llama_cpp" / "vllm", "kv_cache": bool, "batching": "none" / "static" / "continuous"}` | how it is served now |
# | `concurrent_requests` | int | requests typically in flight at once |
# | `structured_output` | bool | replies copy spans of the prompt (tool calls, extraction, JSON) |
# | `draft_alpha` | float or None | greedy acceptance rate measured for an available draft model (None: no draft) |
#
# A metric has a **gap** when its target is not None and its current value misses it: `current <
# target` for quality and the two speeds, `current > target` for memory. A target of None is no
# requirement.
#
# ### The facts
#
# `facts` is a dict like `FACTS_NOW` above (`DEFAULT_FACTS` has the same keys): compare with
# `facts["break_even_alpha"]`, never with a number you remember. The tests hand your function facts
# that differ from this run's.
#
# ### The rules, in order
#
# 1. **Measure first.** If any metric has a target but no current value (None), return only
#    `[("measure_first", reason)]`, the reason naming each such metric by its key: a target you have
#    not measured against is not a gap you can close.
# 2. **None of these.** If no metric has a gap, return `[("none", reason)]`: every technique costs
#    time and risk, and buys nothing here.
# 3. Otherwise walk the table below **in its order** (the order you would do them in: train the
#    model you need, then make it fit, then make it fast — a quantized or distilled copy is redone
#    after every retrain, and the serving choices are measured on the model that ships). Add each
#    technique whose condition holds, **once** (a technique already in the list is not added again,
#    and keeps its first reason). Comparisons are exactly as written (`>=` and `>` differ).
# 4. If gaps exist but no rule applied, return `[("measure_first", reason)]`: the known levers are
#    pulled, so profile where the time or the quality goes before guessing.
#
# Let `T` = `"tool_use_sft"` if `tool_calls` else `"sft"`; a teacher is **usable** if it is
# `"local"`, or `"hosted"` and the data is not private. `size(b)` = `memory_mb["current"] * b /
# bits_per_weight` (the weights stored at `b` bits per weight).
#
# | # | when | condition | technique | its reason must name |
# |---|---|---|---|---|
# | Q1 | quality gap | `knowledge_changes` | `rag` | |
# | Q2a | quality gap | `labelled_examples >= facts["sft_labels"]` | `T` | `sft_labels` |
# | Q2b | quality gap, else | usable teacher and `unlabelled_texts >= facts["sft_labels"]` and `facts["kd_gain_few_labels"] > 0` | `distillation` | `sft_labels`, `kd_gain_few_labels` |
# | Q2c | quality gap, else | (neither) | `feedback_loop` | `sft_labels` |
# | Q3 | quality gap | `preference_pairs >= facts["min_preference_pairs"]` and `facts["dpo_reward_accuracy"] > 0.5` | `preference_tuning` | `min_preference_pairs` |
# | Q4 | quality gap | `verifiable_answers` and `facts["reasoning_gain"] > 0` | `reasoning_training` | `reasoning_gain` |
# | Q5 | quality gap | `tasks > 1` | `multitask` | |
# | M1 | memory gap | `size(facts["q8_0_bits_per_weight"]) <= target` and `facts["q8_0_ppl_increase"] <= max_ppl_increase` | `quantize_q8_0` | `q8_0_ppl_increase` |
# | M2 | memory gap, else | `size(facts["q4_k_m_bits_per_weight"]) <= target` and `facts["q4_k_m_ppl_increase"] <= max_ppl_increase` | `quantize_q4_k_m` | `q4_k_m_ppl_increase` |
# | M3 | memory gap, else | (neither format fits within the accepted loss): `distillation` if `quality["target"]` is None or `quality["current"] * facts["kd_retained"] >= quality["target"]`; then, either way, `pruning` if `facts["pruning_ppl_increase"] <= max_ppl_increase` | `distillation`, `pruning` | `student_params_ratio`, `kd_retained`; `pruning_ppl_increase` |
# | S1 | a speed gap (decode or throughput) | `not serving["kv_cache"]` and `facts["kv_cache_speedup"] > 1` | `kv_cache` | `kv_cache_speedup` |
# | S2 | throughput gap | `concurrent_requests > 1` and `serving["batching"] != "continuous"` and `facts["batching_speedup"] > 1` | `continuous_batching` | `batching_speedup` |
# | S3 | a speed gap | `hardware == "cpu"` and `serving["engine"] != "llama_cpp"` and `facts["engine_speedup"] > 1` → `llama_cpp`; `hardware == "gpu"` and `serving["engine"] != "vllm"` → `vllm` | `llama_cpp` / `vllm` | `engine_speedup` (llama_cpp) |
# | S4 | decode gap | `structured_output` and `facts["prompt_lookup_speedup"] > 1` → `speculative_prompt_lookup`; else if `draft_alpha` is not None and `draft_alpha > facts["break_even_alpha"]` → `speculative_draft` | as said | `prompt_lookup_speedup` / `break_even_alpha` |
#
# Why these, from what the course measured:
# - **Quantization and pruning never fix quality** (lesson 6: every format costs perplexity; lesson
#   13: a pruned model needs recovery to come back near where it was). They appear only for a
#   memory gap, and only within the loss the application accepts.
# - **A student keeps only part of the teacher's quality** (lesson 4's `kd_retained`): distilling
#   for size is a choice only while the quality it keeps still meets the quality target.
# - **Facts that change** belong in a retrieval index (RAG), not in weights that are frozen at
#   training time; the model is still trained for the task if its answers are wrong.
# - **The labelled-data volume decides how to train**: SFT needs labels (lesson 3's all-labels arm
#   had `sft_labels`); with few labels, distillation from a teacher's soft targets on unlabelled
#   text helped in lesson 4 (when `kd_gain_few_labels > 0`); with neither, the labels must come
#   from production (lesson 11's log → tag → retrain loop). A hosted teacher may not see private data.
# - **Speculative decoding pays only above the break-even acceptance rate** (lesson 14); below it the
#   draft's cost is pure loss. Prompt lookup has no draft model to pay for, and wins where the reply
#   copies the prompt. On a 135M model the KV cache, batching and the engine move latency more, which
#   is why they come first.
#
# Return a list of `(technique, reason)` tuples, best first, each technique one of `TECHNIQUES`,
# each reason a non-empty string that names the facts the table lists for its row (by their key, for
# example `"draft alpha 0.81 > break_even_alpha 0.74 (lesson 14)"`). Do not change `scenario` or `facts`.

# %% id="ex-recommend" nbgrader={"grade": false, "grade_id": "ex_recommend", "locked": false, "schema_version": 3, "solution": true, "task": false}
def recommend(scenario: dict, facts: dict) -> list[tuple[str, str]]:
    """The techniques to reach for in ``scenario`` (schema above), ranked, each with its reason:
    ``[(technique, reason), ...]``, techniques from ``TECHNIQUES``; thresholds from ``facts``."""
    ### BEGIN SOLUTION
    metrics = ("quality", "decode_tokens_per_s", "throughput_tokens_per_s", "memory_mb")
    unmeasured = [m for m in metrics if scenario[m]["target"] is not None and scenario[m]["current"] is None]
    if unmeasured:
        return [("measure_first", f"{', '.join(unmeasured)}: a target but no measured value; measure before choosing")]
    gaps = {}
    for m in metrics:
        cur, target = scenario[m]["current"], scenario[m]["target"]
        gaps[m] = target is not None and (cur > target if m == "memory_mb" else cur < target)
    if not any(gaps.values()):
        return [("none", "every target is met: a technique would add cost and risk for nothing")]
    out: list[tuple[str, str]] = []

    def add(technique, reason):
        if technique not in [t for t, _ in out]:
            out.append((technique, reason))

    if gaps["quality"]:
        if scenario["knowledge_changes"]:
            add("rag", "answers depend on facts that change: retrieve them at request time, do not train them in")
        trained = "tool_use_sft" if scenario["tool_calls"] else "sft"
        teacher = scenario["teacher"] == "local" or (scenario["teacher"] == "hosted" and not scenario["private_data"])
        if scenario["labelled_examples"] >= facts["sft_labels"]:
            add(trained, f"{scenario['labelled_examples']} labels >= sft_labels {facts['sft_labels']:g} (lesson 3)")
        elif teacher and scenario["unlabelled_texts"] >= facts["sft_labels"] and facts["kd_gain_few_labels"] > 0:
            add("distillation", f"few labels (< sft_labels {facts['sft_labels']:g}) but a usable teacher and "
                                f"unlabelled text; kd_gain_few_labels {facts['kd_gain_few_labels']:+.3f} (lesson 4)")
        else:
            add("feedback_loop", f"fewer labels than sft_labels {facts['sft_labels']:g} and no usable teacher: "
                                 "collect and tag them from production (lesson 11)")
        if scenario["preference_pairs"] >= facts["min_preference_pairs"] and facts["dpo_reward_accuracy"] > 0.5:
            add("preference_tuning", f"{scenario['preference_pairs']} pairs >= min_preference_pairs "
                                     f"{facts['min_preference_pairs']:g}; DPO reward accuracy "
                                     f"{facts['dpo_reward_accuracy']:.2f} (lesson 5)")
        if scenario["verifiable_answers"] and facts["reasoning_gain"] > 0:
            add("reasoning_training", f"answers a verifier can check; reasoning_gain {facts['reasoning_gain']:+.3f} (lesson 15)")
        if scenario["tasks"] > 1:
            add("multitask", f"{scenario['tasks']} tasks in one model: mix them with temperature sampling (lesson 7)")
    if gaps["memory_mb"]:
        limit = scenario["memory_mb"]["target"]
        tolerance = scenario["max_ppl_increase"]

        def size(bits):
            return scenario["memory_mb"]["current"] * bits / scenario["bits_per_weight"]

        if size(facts["q8_0_bits_per_weight"]) <= limit and facts["q8_0_ppl_increase"] <= tolerance:
            add("quantize_q8_0", f"{size(facts['q8_0_bits_per_weight']):.0f} MB <= {limit:g} MB; q8_0_ppl_increase "
                                 f"{facts['q8_0_ppl_increase']:.3f} <= {tolerance:g} (lesson 6)")
        elif size(facts["q4_k_m_bits_per_weight"]) <= limit and facts["q4_k_m_ppl_increase"] <= tolerance:
            add("quantize_q4_k_m", f"{size(facts['q4_k_m_bits_per_weight']):.0f} MB <= {limit:g} MB; q4_k_m_ppl_increase "
                                   f"{facts['q4_k_m_ppl_increase']:.3f} <= {tolerance:g} (lesson 6)")
        else:
            quality = scenario["quality"]
            if quality["target"] is None or quality["current"] * facts["kd_retained"] >= quality["target"]:
                add("distillation", f"no format fits {limit:g} MB within the accepted loss: a student of "
                                    f"student_params_ratio {facts['student_params_ratio']:.2f} of the parameters "
                                    f"keeping kd_retained {facts['kd_retained']:.2f} of the quality (lesson 4)")
            if facts["pruning_ppl_increase"] <= tolerance:
                add("pruning", f"pruning_ppl_increase {facts['pruning_ppl_increase']:.3f} <= {tolerance:g} (lesson 13)")
    speed_gap = gaps["decode_tokens_per_s"] or gaps["throughput_tokens_per_s"]
    if speed_gap:
        serving = scenario["serving"]
        if not serving["kv_cache"] and facts["kv_cache_speedup"] > 1:
            add("kv_cache", f"kv_cache_speedup {facts['kv_cache_speedup']:.2f}x (lesson 8)")
        if (gaps["throughput_tokens_per_s"] and scenario["concurrent_requests"] > 1
                and serving["batching"] != "continuous" and facts["batching_speedup"] > 1):
            add("continuous_batching", f"{scenario['concurrent_requests']} requests in flight; batching_speedup "
                                       f"{facts['batching_speedup']:.2f}x (lesson 8)")
        if scenario["hardware"] == "cpu" and serving["engine"] != "llama_cpp" and facts["engine_speedup"] > 1:
            add("llama_cpp", f"engine_speedup {facts['engine_speedup']:.2f}x for llama.cpp on a GGUF (lesson 6)")
        if scenario["hardware"] == "gpu" and serving["engine"] != "vllm":
            add("vllm", "a GPU: vLLM's paged KV cache and continuous batching (not measured on this CPU course)")
        if gaps["decode_tokens_per_s"]:
            if scenario["structured_output"] and facts["prompt_lookup_speedup"] > 1:
                add("speculative_prompt_lookup", f"replies copy the prompt; prompt_lookup_speedup "
                                                 f"{facts['prompt_lookup_speedup']:.2f}x (lesson 14)")
            elif scenario["draft_alpha"] is not None and scenario["draft_alpha"] > facts["break_even_alpha"]:
                add("speculative_draft", f"draft alpha {scenario['draft_alpha']:.2f} > break_even_alpha "
                                         f"{facts['break_even_alpha']:.2f} (lesson 14)")
    if not out:
        return [("measure_first", "a target is missed and every lever of this guide is already pulled: profile first")]
    return out
    ### END SOLUTION


# %% id="test-recommend" nbgrader={"grade": true, "grade_id": "test_recommend", "locked": true, "points": 6, "schema_version": 3, "solution": false, "task": false}
def _names(out):
    return [t for t, _ in out]


def _check(s, facts, want, cite=()):
    """recommend(s, facts) gives exactly the techniques ``want``, in order, with well-formed reasons;
    each ``(technique, fact)`` in ``cite`` names the fact in that technique's reason."""
    s_before, f_before = copy.deepcopy(s), copy.deepcopy(facts)
    out = recommend(s, facts)
    assert isinstance(out, list) and all(isinstance(x, (tuple, list)) and len(x) == 2 for x in out), out
    got = _names(out)
    assert got == want, f"got {got}, want {want}"
    assert all(isinstance(r, str) and r.strip() for _, r in out), out
    assert s == s_before and facts == f_before, "recommend changed its arguments"
    reasons = dict((t, r) for t, r in out)
    for technique, fact in cite:
        assert fact in reasons[technique], f"the reason for {technique} does not name {fact}: {reasons[technique]!r}"
    return out


F = dict(DEFAULT_FACTS)
assert set(F) == set(FACTS)
# every target met: none of these
_check(scenario(quality=(0.9, 0.85), decode_tokens_per_s=(30.0, 20.0)), F, ["none"])
# a latency target nobody measured against: measure first
_out = _check(scenario(decode_tokens_per_s=(None, 40.0), quality=(0.7, 0.9), labelled_examples=10_000), F, ["measure_first"])
assert "decode_tokens_per_s" in _out[0][1]
# wrong answers, plenty of labels
_check(scenario(quality=(0.70, 0.85), labelled_examples=5000), F, ["sft"], cite=[("sft", "sft_labels")])
# wrong answers, few labels, a local teacher and many unlabelled reviews: distil
_check(scenario(quality=(0.70, 0.85), labelled_examples=40, unlabelled_texts=20_000, teacher="local"), F,
       ["distillation"], cite=[("distillation", "kd_gain_few_labels")])
# it must fit in 200 MB from 540 MB of fp32: Q8_0 is 143 MB at the default 8.5 bits
_check(scenario(memory_mb=(540.0, 200.0), max_ppl_increase=0.01), F, ["quantize_q8_0"],
       cite=[("quantize_q8_0", "q8_0_ppl_increase")])
# too slow on a CPU under transformers without a cache, a draft below break-even
_check(scenario(decode_tokens_per_s=(5.0, 40.0), serving={"kv_cache": False}, draft_alpha=0.3), F,
       ["kv_cache", "llama_cpp"], cite=[("kv_cache", "kv_cache_speedup"), ("llama_cpp", "engine_speedup")])
### BEGIN HIDDEN TESTS
# --- speculative decoding and the measured break-even alpha
_s = scenario(decode_tokens_per_s=(30.0, 40.0), serving={"engine": "llama_cpp"}, draft_alpha=0.6)
_check(_s, {**F, "break_even_alpha": 0.5}, ["speculative_draft"], cite=[("speculative_draft", "break_even_alpha")])
_check(_s, {**F, "break_even_alpha": 0.7}, ["measure_first"])          # below break-even: no speculation
_check({**_s, "draft_alpha": 0.7}, {**F, "break_even_alpha": 0.7}, ["measure_first"])   # at break-even: no gain
_check({**_s, "draft_alpha": 0.95}, {**F, "break_even_alpha": 0.9}, ["speculative_draft"])
_check({**_s, "draft_alpha": 0.4}, {**F, "break_even_alpha": 0.35}, ["speculative_draft"])
_check({**_s, "draft_alpha": None}, {**F, "break_even_alpha": 0.0}, ["measure_first"])
# structured output: prompt lookup (no draft to pay for) when the course measured it faster
_check({**_s, "structured_output": True}, {**F, "break_even_alpha": 0.5}, ["speculative_prompt_lookup"],
       cite=[("speculative_prompt_lookup", "prompt_lookup_speedup")])
_check({**_s, "structured_output": True}, {**F, "break_even_alpha": 0.5, "prompt_lookup_speedup": 0.9},
       ["speculative_draft"])
_check({**_s, "structured_output": True}, {**F, "break_even_alpha": 0.7, "prompt_lookup_speedup": 1.0},
       ["measure_first"])                                                  # no faster, and the draft is below break-even
# speculation helps one stream's latency, not throughput
_check(scenario(throughput_tokens_per_s=(30.0, 40.0), serving={"engine": "llama_cpp", "batching": "continuous"},
                concurrent_requests=8, draft_alpha=0.99, structured_output=True), F, ["measure_first"])
# --- quality problems are never solved by quantization or pruning
_q = scenario(quality=(0.6, 0.8), labelled_examples=2000, memory_mb=(540.0, None), bits_per_weight=32.0)
for _f in (F, {**F, "q8_0_ppl_increase": 0.0, "q4_k_m_ppl_increase": 0.0, "pruning_ppl_increase": 0.0}):
    _out = _check(_q, _f, ["sft"])
    assert not {"quantize_q8_0", "quantize_q4_k_m", "pruning"} & set(_names(_out))
_check({**_q, "bits_per_weight": 4.5, "memory_mb": {"current": 80.0, "target": 1000.0}}, F, ["sft"])
# --- the labelled-data volume decides how to train
_few = scenario(quality=(0.6, 0.8), labelled_examples=100, unlabelled_texts=5000, teacher="local")
_check(_few, {**F, "sft_labels": 100}, ["sft"])                                    # >= is enough
_check(_few, {**F, "sft_labels": 101}, ["distillation"], cite=[("distillation", "sft_labels")])
_check(_few, {**F, "sft_labels": 101, "kd_gain_few_labels": -0.02}, ["feedback_loop"], cite=[("feedback_loop", "sft_labels")])
_check(_few, {**F, "sft_labels": 101, "kd_gain_few_labels": 0.0}, ["feedback_loop"])
_check({**_few, "unlabelled_texts": 50}, {**F, "sft_labels": 101}, ["feedback_loop"])
_check({**_few, "unlabelled_texts": 101}, {**F, "sft_labels": 101}, ["distillation"])
_check({**_few, "teacher": None}, {**F, "sft_labels": 101}, ["feedback_loop"])
_check({**_few, "teacher": "hosted"}, {**F, "sft_labels": 101}, ["distillation"])
_check({**_few, "teacher": "hosted", "private_data": True}, {**F, "sft_labels": 101}, ["feedback_loop"])
_check({**_few, "private_data": True}, {**F, "sft_labels": 101}, ["distillation"])     # a local teacher may see it
_check({**_few, "labelled_examples": 5000, "tool_calls": True}, {**F, "sft_labels": 1000}, ["tool_use_sft"],
       cite=[("tool_use_sft", "sft_labels")])
_check({**_few, "labelled_examples": 0, "unlabelled_texts": 0}, {**F, "sft_labels": 1}, ["feedback_loop"])
# --- rag, preference, reasoning, multitask, in the table's order
_all = scenario(quality=(0.5, 0.8), labelled_examples=900, knowledge_changes=True, preference_pairs=300,
                verifiable_answers=True, tasks=3)
_check(_all, {**F, "sft_labels": 800, "min_preference_pairs": 300, "dpo_reward_accuracy": 0.6, "reasoning_gain": 0.02},
       ["rag", "sft", "preference_tuning", "reasoning_training", "multitask"],
       cite=[("preference_tuning", "min_preference_pairs"), ("reasoning_training", "reasoning_gain")])
_check(_all, {**F, "sft_labels": 800, "min_preference_pairs": 301, "dpo_reward_accuracy": 0.6, "reasoning_gain": 0.0},
       ["rag", "sft", "multitask"])
_check(_all, {**F, "sft_labels": 800, "min_preference_pairs": 10, "dpo_reward_accuracy": 0.5, "reasoning_gain": -0.1},
       ["rag", "sft", "multitask"])
_check({**_all, "tasks": 1, "knowledge_changes": False, "verifiable_answers": False, "preference_pairs": 0},
       {**F, "sft_labels": 800}, ["sft"])
# --- memory: the largest format that fits within the accepted loss, else a student
_m = scenario(memory_mb=(512.0, 100.0), bits_per_weight=32.0, max_ppl_increase=0.05)
_mf = {**F, "q8_0_bits_per_weight": 8.5, "q4_k_m_bits_per_weight": 6.0, "q8_0_ppl_increase": 0.001, "q4_k_m_ppl_increase": 0.03}
_check(_m, _mf, ["quantize_q4_k_m"], cite=[("quantize_q4_k_m", "q4_k_m_ppl_increase")])       # 136 MB, 96 MB
_check({**_m, "memory_mb": {"current": 512.0, "target": 136.0}}, _mf, ["quantize_q8_0"])     # fits exactly
_check({**_m, "memory_mb": {"current": 512.0, "target": 95.0}}, {**_mf, "pruning_ppl_increase": 0.2},
       ["distillation"], cite=[("distillation", "student_params_ratio"), ("distillation", "kd_retained")])
_check({**_m, "memory_mb": {"current": 512.0, "target": 95.0}}, {**_mf, "pruning_ppl_increase": 0.05},
       ["distillation", "pruning"], cite=[("pruning", "pruning_ppl_increase")])
_check(_m, {**_mf, "q4_k_m_ppl_increase": 0.08}, ["distillation"])                      # fits, but loses too much
_check({**_m, "max_ppl_increase": 0.0005}, _mf, ["distillation"])
_check({**_m, "max_ppl_increase": 0.03}, _mf, ["quantize_q4_k_m"])                       # the loss accepted exactly
_check({**_m, "max_ppl_increase": 0.001}, _mf, ["distillation"])                         # Q8_0 too big at any loss
_check({**_m, "memory_mb": {"current": 512.0, "target": 140.0}, "max_ppl_increase": 0.001}, _mf, ["quantize_q8_0"])
# distilling for size only while the quality lesson 4's student keeps still meets the target
_mq = {**_m, "memory_mb": {"current": 512.0, "target": 95.0}}
_check({**_mq, "quality": {"current": 0.8, "target": 0.5}}, {**_mf, "kd_retained": 0.625}, ["distillation"])   # 0.5 >= 0.5
_check({**_mq, "quality": {"current": 0.8, "target": 0.5}}, {**_mf, "kd_retained": 0.6}, ["measure_first"])    # 0.48 < 0.5
_check({**_mq, "quality": {"current": 0.8, "target": 0.5}}, {**_mf, "kd_retained": 0.6, "pruning_ppl_increase": 0.01},
       ["pruning"])
_check({**_mq, "quality": {"current": 0.8, "target": None}}, {**_mf, "kd_retained": 0.1}, ["distillation"])
_check({**_mq, "quality": {"current": None, "target": None}}, {**_mf, "kd_retained": 0.1}, ["distillation"])
_check({**_m, "memory_mb": {"current": 512.0, "target": 200.0}, "max_ppl_increase": 0.0005}, _mf, ["distillation"])
_check({**_m, "memory_mb": {"current": 512.0, "target": 200.0}}, {**_mf, "q8_0_bits_per_weight": 13.0}, ["quantize_q4_k_m"])
_check({**_m, "bits_per_weight": 16.0, "memory_mb": {"current": 256.0, "target": 140.0}}, _mf, ["quantize_q8_0"])
_check({**_m, "bits_per_weight": 8.5, "memory_mb": {"current": 136.0, "target": 100.0}}, _mf, ["quantize_q4_k_m"])
_check(scenario(memory_mb=(100.0, 100.0)), F, ["none"])                                      # at the limit: fits
# --- serving
_v = scenario(throughput_tokens_per_s=(50.0, 200.0), concurrent_requests=16, serving={"kv_cache": False, "batching": "static"})
_check(_v, F, ["kv_cache", "continuous_batching", "llama_cpp"], cite=[("continuous_batching", "batching_speedup")])
_check(_v, {**F, "batching_speedup": 0.9, "kv_cache_speedup": 1.0}, ["llama_cpp"])
_check({**_v, "concurrent_requests": 1}, F, ["kv_cache", "llama_cpp"])
_check({**_v, "hardware": "gpu"}, F, ["kv_cache", "continuous_batching", "vllm"])
_check({**_v, "hardware": "gpu", "serving": {"engine": "vllm", "kv_cache": True, "batching": "continuous"}}, F, ["measure_first"])
_check({**_v, "serving": {"engine": "llama_cpp", "kv_cache": True, "batching": "none"}}, {**F, "engine_speedup": 50.0},
       ["continuous_batching"])
_check(scenario(decode_tokens_per_s=(10.0, 12.0), concurrent_requests=16), F, ["llama_cpp"])   # batching is for throughput
_check(scenario(decode_tokens_per_s=(10.0, 12.0)), {**F, "engine_speedup": 0.8}, ["measure_first"])
_check(scenario(decode_tokens_per_s=(10.0, 12.0)), {**F, "engine_speedup": 1.0}, ["measure_first"])      # no faster
_check(_v, {**F, "batching_speedup": 1.0, "kv_cache_speedup": 1.5}, ["kv_cache", "llama_cpp"])
# --- measure first: any target without a current value, whatever else is missed
_out = _check(scenario(quality=(0.5, 0.9), memory_mb=(None, 100.0), labelled_examples=10 ** 6), F, ["measure_first"])
assert "memory_mb" in _out[0][1]
_out = _check(scenario(quality=(None, 0.9), throughput_tokens_per_s=(None, 10.0)), F, ["measure_first"])
assert "quality" in _out[0][1] and "throughput_tokens_per_s" in _out[0][1]
_check(scenario(quality=(None, None), decode_tokens_per_s=(None, None)), F, ["none"])
_check(scenario(quality=(0.8, 0.8), throughput_tokens_per_s=(100.0, 100.0), decode_tokens_per_s=(40.0, 40.0)), F,
       ["none"])                                                                            # met exactly
# no gap, whatever the data and the needs: none of these
_rich = dict(knowledge_changes=True, tool_calls=True, tasks=3, preference_pairs=10 ** 4, labelled_examples=10 ** 5,
             verifiable_answers=True, teacher="local", unlabelled_texts=10 ** 6, structured_output=True, draft_alpha=0.99,
             serving={"kv_cache": False, "batching": "none"}, concurrent_requests=32)
_check(scenario(quality=(0.9, 0.8), **_rich), F, ["none"])
# a speed gap only: no training technique, however much data there is
_check(scenario(decode_tokens_per_s=(10.0, 20.0), **_rich), F, ["kv_cache", "llama_cpp", "speculative_prompt_lookup"])
# --- everything at once: quality, then memory, then speed, each technique once
_big = scenario(quality=(0.6, 0.8), labelled_examples=10, unlabelled_texts=10 ** 5, teacher="local",
                memory_mb=(540.0, 20.0), decode_tokens_per_s=(5.0, 30.0), serving={"kv_cache": False},
                structured_output=True, tool_calls=True)
_out = _check(_big, F, ["distillation", "kv_cache", "llama_cpp", "speculative_prompt_lookup"])
assert "kd_gain_few_labels" in dict(_out)["distillation"]                              # the first reason is kept
# a student measured above its teacher (kd_retained > 1, noise on a small gold set): distillation is named
# for quality and again for size, and is listed once, with its first reason
_out = _check(_big, {**F, "kd_retained": 1.5}, ["distillation", "kv_cache", "llama_cpp", "speculative_prompt_lookup"])
assert "kd_gain_few_labels" in dict(_out)["distillation"], _out
_check({**_big, "labelled_examples": 10 ** 5}, {**F, "pruning_ppl_increase": 0.0},   # 0.6 x kd_retained < 0.8
       ["tool_use_sft", "pruning", "kv_cache", "llama_cpp", "speculative_prompt_lookup"])
_check({**_big, "labelled_examples": 10 ** 5, "quality": {"current": 0.6, "target": 0.5}}, {**F, "pruning_ppl_increase": 0.0},
       ["distillation", "pruning", "kv_cache", "llama_cpp", "speculative_prompt_lookup"])   # no quality gap: no SFT
assert all(t in TECHNIQUES for t in _names(recommend(_big, F)))
### END HIDDEN TESTS

# %% [markdown] id="md-advice"
# ### The guide on the coffee chain's situations, with this run's facts
#
# The same function, now with the facts this run read from the course (or their defaults, said
# above). Each situation is one the course met on the way; its numbers (accuracies, speeds, sizes,
# label counts) are the **givens** of the case, as a client would state them, not measurements. The
# `defaults` column flags every fact a reason names that is a DEFAULT rather than a recorded result.

# %% id="advice"
SITUATIONS = {
    "sentiment: 71 % on gold, must reach 85 %; 40 labels, the teacher and 600 unlabelled reviews":
        scenario(quality=(0.71, 0.85), labelled_examples=40, unlabelled_texts=600, teacher="local"),
    "the menu bot is wrong since the prices changed; 5000 tagged conversations":
        scenario(quality=(0.62, 0.9), labelled_examples=5000, knowledge_changes=True),
    "the same, but only a hosted teacher and customers' private data":
        scenario(quality=(0.71, 0.85), labelled_examples=40, unlabelled_texts=5000, teacher="hosted", private_data=True),
    "the till's model must fit in 150 MB (fp32 now, 540 MB); 2 % perplexity is acceptable":
        scenario(memory_mb=(540.0, 150.0), max_ppl_increase=0.02),
    "a tool-call router at 12 tokens/s must reach 30; replies copy the request's city":
        scenario(decode_tokens_per_s=(12.0, 30.0), tool_calls=True, structured_output=True),
    "16 baristas' tablets at once: 40 tokens/s in total, 150 needed":
        scenario(throughput_tokens_per_s=(40.0, 150.0), concurrent_requests=16, serving={"batching": "static"}),
    "a cut draft with alpha 0.45 offered for the llama.cpp server at 60 tokens/s, 80 wanted":
        scenario(decode_tokens_per_s=(60.0, 80.0), serving={"engine": "llama_cpp"}, draft_alpha=0.45),
    "'it feels slow', nobody timed it":
        scenario(decode_tokens_per_s=(None, 30.0)),
    "everything meets its target":
        scenario(quality=(0.9, 0.85), decode_tokens_per_s=(90.0, 30.0)),
}
ADVICE = []
for name, s in SITUATIONS.items():
    for rank, (technique, reason) in enumerate(recommend(s, FACTS_NOW), start=1):
        ADVICE.append({"scenario": name, "rank": rank, "technique": technique, "reason": reason,
                       "defaults": capstone.defaults_named(reason, PROVENANCE)})
display(pd.DataFrame(ADVICE).set_index(["scenario", "rank"]))
print(f"{sum(bool(a['defaults']) for a in ADVICE)} of {len(ADVICE)} reasons name a DEFAULT fact (see the defaults column)")

# %% [markdown] id="md-sensitivity"
# **How much the measured numbers matter.** The draft above is offered at α = 0.45. Whether the
# guide takes it depends on one measured number only, lesson 14's break-even α; below, the same
# scenario against a range of break-even values, with the value read above marked (labelled a DEFAULT
# when lesson 14 has not recorded it at this budget). A guide with a
# remembered threshold would give the same answer whatever the course measured.

# %% id="sensitivity"
_s = SITUATIONS["a cut draft with alpha 0.45 offered for the llama.cpp server at 60 tokens/s, 80 wanted"]
_be = next(p for p in PROVENANCE if p["fact"] == "break_even_alpha")
_be_label = "lesson 14, this budget" if _be["missing"] is None else "a DEFAULT: lesson 14's row not recorded here"
_grid = [round(0.05 * i, 2) for i in range(1, 20)]
_takes = [int("speculative_draft" in [t for t, _ in recommend(_s, {**FACTS_NOW, "break_even_alpha": b})]) for b in _grid]
fig, ax = plt.subplots(figsize=(6, 2.2))
ax.step(_grid, _takes, where="mid")
ax.axvline(FACTS_NOW["break_even_alpha"], color="C3", ls="--", label=f"{_be_label}: {FACTS_NOW['break_even_alpha']:.2f}")
ax.axvline(_s["draft_alpha"], color="0.5", ls=":", label=f"the draft's α {_s['draft_alpha']}")
ax.set_yticks([0, 1], ["no", "speculate"]); ax.set_xlabel("break-even α (lesson 14)")
ax.set_title("Does the guide take the draft?"); ax.legend(fontsize=7)
plt.tight_layout(); plt.show()
print(f"break_even_alpha = {_be['value']:g}, from {_be['source']}" + (f" ({_be['missing']})" if _be["missing"] else ""))

# %% [markdown] id="md-table"
# ## 3. Exercise: the graduation table
#
# `results` is what the lessons recorded at this budget, `{slug: payload}` with `payload["rows"]` a
# list of `{"quantity", "value", "unit", ...}` (as `report.load_payloads(BUDGET)` returns); `course`
# the slugs of every lesson, in order (`list(COURSE)`); `headlines` (`capstone.HEADLINES`) says, per
# lesson, which rows show what its technique bought. A headline is a dict:
#
# - `axis` (`"quality"`, `"size"` or `"speed"`) and `what` (a label): copied into your row;
# - `after` and `before`: **regular expressions**; a row matches when `re.fullmatch(pattern,
#   row["quantity"])`; when several rows match, the **last** one counts (lessons record sizes in
#   increasing order). `before` may be None: then `after` is already a ratio, new / old;
# - `after_index`, `before_index`: which number of the value to take, an index into
#   `numbers(row["value"])` (`capstone.numbers`: `[v]` for a number, the numbers written in a string,
#   so `"0.512 -> 0.700"` gives `[0.512, 0.7]`; `[]` for `"yes"`); negative indices count from the end;
# - `better`: `"higher"` or `"lower"`: which direction is a gain.
#
# Return a list of dicts, one per headline, lessons in `course` order and each lesson's headlines in
# their order, with the keys `lesson`, `axis`, `what`, `before`, `after`, `gain`, `status`:
#
# | status | when (checked in this order) | before, after, gain |
# |---|---|---|
# | `"not run"` | the lesson is not in `results` | None |
# | `"row missing"` | no row matches `after`, or `before` is not None and no row matches it | None |
# | `"not a number"` | the matched value has no number at the index | None |
# | `"measured"` | otherwise | the numbers (`before` None when the headline's is None) and the gain |
#
# The **gain** is a factor where more than 1 is better, whichever way the quantity points:
# `after / before` for `"higher"`, `before / after` for `"lower"`; with `before` None, `after` for
# `"higher"` and `1 / after` for `"lower"`. A zero denominator gives `gain` None (the row is still
# `"measured"`). A lesson of `course` with no headline (absent from `headlines`, or an empty list) gets
# one row with `axis`, `what`, `before`, `after` and `gain` None and `status` `"run"` or `"not run"`.
#
# **A lesson that was not run is a row that says so, never a gap.** A report that leaves it out
# reads as "everything the course did", and the reader cannot tell a technique that bought nothing
# from one nobody ran.

# %% id="ex-table" nbgrader={"grade": false, "grade_id": "ex_graduation_table", "locked": false, "schema_version": 3, "solution": true, "task": false}
def graduation_table(results: dict, course: list, headlines: dict) -> list[dict]:
    """One row per headline of each lesson in ``course`` (see above): ``lesson``, ``axis``, ``what``,
    ``before``, ``after``, ``gain`` (> 1 is better) and ``status``."""
    ### BEGIN SOLUTION
    def last_match(rows, pattern):
        found = [r for r in rows if re.fullmatch(pattern, str(r.get("quantity", "")))]
        return found[-1] if found else None

    def pick(row, index):
        got = numbers(row.get("value"))
        return got[index] if -len(got) <= index < len(got) else None

    table = []
    for slug in course:
        ran = slug in results
        if not headlines.get(slug):
            table.append({"lesson": slug, "axis": None, "what": None, "before": None, "after": None, "gain": None,
                          "status": "run" if ran else "not run"})
            continue
        rows = results[slug].get("rows", []) if ran else []
        for h in headlines[slug]:
            out = {"lesson": slug, "axis": h["axis"], "what": h["what"], "before": None, "after": None, "gain": None}
            after_row = last_match(rows, h["after"]) if ran else None
            before_row = last_match(rows, h["before"]) if ran and h["before"] is not None else None
            if not ran:
                out["status"] = "not run"
            elif after_row is None or (h["before"] is not None and before_row is None):
                out["status"] = "row missing"
            else:
                after = pick(after_row, h.get("after_index", 0))
                before = pick(before_row, h.get("before_index", 0)) if before_row is not None else None
                if after is None or (before_row is not None and before is None):
                    out["status"] = "not a number"
                else:
                    out.update(status="measured", before=before, after=after)
                    if before is None:
                        num, den = (after, 1.0) if h["better"] == "higher" else (1.0, after)
                    else:
                        num, den = (after, before) if h["better"] == "higher" else (before, after)
                    out["gain"] = num / den if den != 0 else None
            table.append(out)
    return table
    ### END SOLUTION


# %% id="test-table" nbgrader={"grade": true, "grade_id": "test_graduation_table", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
_KEYS = {"lesson", "axis", "what", "before", "after", "gain", "status"}


def _table(results, course=None, headlines=None):
    course = list(COURSE) if course is None else course
    headlines = HEADLINES if headlines is None else headlines
    args = copy.deepcopy((results, course, headlines))
    out = graduation_table(results, course, headlines)
    assert (results, course, headlines) == args, "graduation_table changed its arguments"
    assert isinstance(out, list) and all(isinstance(r, dict) and set(r) == _KEYS for r in out), out[:2]
    want = [(s, h["axis"], h["what"]) for s in course for h in (headlines.get(s) or [{"axis": None, "what": None}])]
    assert [(r["lesson"], r["axis"], r["what"]) for r in out] == want, "one row per headline, in course order"
    return out


def _gain_ok(r, payloads, h):
    """The gain recomputed from the payload for a measured row."""
    rows = payloads[r["lesson"]]["rows"]
    after = [x for x in rows if re.fullmatch(h["after"], x["quantity"])][-1]
    a = numbers(after["value"])[h["after_index"]]
    if h["before"] is None:
        g = a if h["better"] == "higher" else 1 / a
    else:
        b = numbers([x for x in rows if re.fullmatch(h["before"], x["quantity"])][-1]["value"])[h["before_index"]]
        g = a / b if h["better"] == "higher" else b / a
    return math.isclose(r["gain"], g, rel_tol=1e-9)


# every lesson run (seeded fake results with every headline row)
_all = capstone.fake_payloads(COURSE, seed=1)
_t = _table(_all)
assert all(r["status"] == "measured" for r in _t), [r for r in _t if r["status"] != "measured"][:3]
_hs = [h for s in COURSE for h in HEADLINES[s]]
assert all(_gain_ok(r, _all, h) for r, h in zip(_t, _hs))
# none run: every lesson is still there, and says so
_t = _table({})
assert all(r["status"] == "not run" and r["gain"] is None and r["before"] is None and r["after"] is None for r in _t)
# some run
_some = {s: p for s, p in _all.items() if s in ("04_kd_quality", "06_quantization", "08_serving")}
_t = _table(_some)
assert {r["lesson"] for r in _t} == set(COURSE)
assert all((r["status"] == "measured") == (r["lesson"] in _some) for r in _t)
assert {r["status"] for r in _t if r["lesson"] not in _some} == {"not run"}
# a lower-is-better quantity: perplexity from 20 to 25 is a gain of 0.8, not 1.25
_hq = {"x": [{"axis": "quality", "what": "ppl", "before": "ppl: a", "before_index": 0, "after": "ppl: b",
              "after_index": 0, "better": "lower"}]}
_p = {"x": {"rows": [{"quantity": "ppl: a", "value": 20.0, "unit": "ppl"}, {"quantity": "ppl: b", "value": 25.0, "unit": "ppl"}]}}
(_r,) = _table(_p, ["x"], _hq)
assert _r["status"] == "measured" and _r["before"] == 20.0 and _r["after"] == 25.0 and math.isclose(_r["gain"], 0.8), _r
### BEGIN HIDDEN TESTS
for _seed in (2, 3):
    _pl = capstone.fake_payloads(COURSE, seed=_seed)
    _t = _table(_pl)
    assert all(r["status"] == "measured" and _gain_ok(r, _pl, h) for r, h in zip(_t, _hs))
    for r, h in zip(_t, _hs):
        if h["before"] is None:
            assert r["before"] is None
# some run, in another order of keys, and the capstone's own results are not a lesson of the course
_some = {s: _all[s] for s in ("15_reasoning", "01_toolkit", "12_tool_use")}
_some["10_capstone"] = {"rows": [{"quantity": "x", "value": 1, "unit": ""}]}
_t = _table(_some)
assert [r["lesson"] for r in _t] == [s for s in COURSE for _ in HEADLINES[s]]
assert all((r["status"] == "measured") == (r["lesson"] in _some) for r in _t)
# a lesson of the course without headlines still has its row
_t = _table({"a": {"rows": []}}, ["a", "b", "c"], {"c": []})
assert [(r["lesson"], r["status"]) for r in _t] == [("a", "run"), ("b", "not run"), ("c", "not run")]
assert all(r["axis"] is None and r["gain"] is None for r in _t)
# before None: the after row is a ratio; for "lower", the gain is its inverse
_hr = {"x": [{"axis": "size", "what": "params", "before": None, "before_index": 0, "after": "ratio",
              "after_index": 0, "better": "lower"},
             {"axis": "speed", "what": "speed", "before": None, "before_index": 0, "after": "speed-up",
              "after_index": 0, "better": "higher"}]}
_t = _table({"x": {"rows": [{"quantity": "ratio", "value": 0.25, "unit": ""}, {"quantity": "speed-up", "value": "2.5", "unit": "x"}]}},
            ["x"], _hr)
assert _t[0]["status"] == "measured" and _t[0]["before"] is None and math.isclose(_t[0]["gain"], 4.0), _t[0]
assert _t[1]["after"] == 2.5 and math.isclose(_t[1]["gain"], 2.5), _t[1]
# the last matching row counts; the pattern must match the whole quantity
_hl = {"x": [{"axis": "speed", "what": "kv", "before": None, "before_index": 0, "after": r"speed-up, \d+ tokens",
              "after_index": 0, "better": "higher"}]}
_rows = [{"quantity": "speed-up, 16 tokens", "value": 1.5, "unit": "x"}, {"quantity": "speed-up, 64 tokens", "value": 2.75, "unit": "x"},
         {"quantity": "speed-up, 64 tokens (median)", "value": 9.0, "unit": "x"}, {"quantity": "old speed-up, 99 tokens", "value": 7.0, "unit": "x"}]
(_r,) = _table({"x": {"rows": _rows}}, ["x"], _hl)
assert _r["after"] == 2.75 and math.isclose(_r["gain"], 2.75), _r
# a renamed row is "row missing" (the lesson ran), never "not run"
(_r,) = _table({"x": {"rows": [{"quantity": "KV cache speedup, 64 tokens", "value": 2.0, "unit": "x"}]}}, ["x"], _hl)
assert _r["status"] == "row missing" and _r["after"] is None and _r["gain"] is None, _r
(_r,) = _table({"x": {"rows": [{"quantity": "ppl: b", "value": 25.0, "unit": "ppl"}]}}, ["x"], _hq)
assert _r["status"] == "row missing", _r                                            # the before row is gone
(_r,) = _table({"x": {"rows": [{"quantity": "ppl: a", "value": 25.0, "unit": "ppl"}]}}, ["x"], _hq)
assert _r["status"] == "row missing", _r
# values that hold no number
for _bad in ("not run", "yes", None, float("nan")):
    (_r,) = _table({"x": {"rows": [{"quantity": "speed-up, 8 tokens", "value": _bad, "unit": ""}]}}, ["x"], _hl)
    assert _r["status"] == "not a number" and _r["gain"] is None and _r["after"] is None, (_bad, _r)
(_r,) = _table({"x": {"rows": [{"quantity": "ppl: a", "value": "n/a", "unit": ""}, {"quantity": "ppl: b", "value": 3.0, "unit": ""}]}},
               ["x"], _hq)
assert _r["status"] == "not a number" and _r["before"] is None and _r["after"] is None, _r
(_r,) = _table({"x": {"rows": [{"quantity": "ppl: a", "value": "n/a", "unit": ""}]}}, ["x"], _hq)
assert _r["status"] == "row missing", _r                                            # missing is checked first
# numbers picked by index from "before -> after" strings
_hi = {"x": [{"axis": "quality", "what": "valid", "before": "valid call rate", "before_index": 0, "after": "valid call rate",
              "after_index": -1, "better": "higher"}]}
(_r,) = _table({"x": {"rows": [{"quantity": "valid call rate", "value": "0.400 -> 0.900", "unit": ""}]}}, ["x"], _hi)
assert (_r["before"], _r["after"]) == (0.4, 0.9) and math.isclose(_r["gain"], 2.25), _r
(_r,) = _table({"x": {"rows": [{"quantity": "valid call rate", "value": 0.9, "unit": ""}]}}, ["x"], _hi)
assert _r["status"] == "measured" and math.isclose(_r["gain"], 1.0), _r             # one number: index 0 and -1 agree
_h2 = {"x": [{**_hi["x"][0], "after_index": 1, "before_index": 0}]}
(_r,) = _table({"x": {"rows": [{"quantity": "valid call rate", "value": 0.9, "unit": ""}]}}, ["x"], _h2)
assert _r["status"] == "not a number", _r
_h3 = {"x": [{"axis": "speed", "what": "pruned", "before": None, "before_index": 0, "after": "decode / prefill",
              "after_index": 0, "better": "higher"}]}
(_r,) = _table({"x": {"rows": [{"quantity": "decode / prefill", "value": "1.10 / 1.40", "unit": "x"}]}}, ["x"], _h3)
assert _r["after"] == 1.1 and math.isclose(_r["gain"], 1.1), _r
# a zero denominator: measured, no gain
(_r,) = _table({"x": {"rows": [{"quantity": "ppl: a", "value": 20.0, "unit": ""}, {"quantity": "ppl: b", "value": 0, "unit": ""}]}},
               ["x"], _hq)
assert _r["status"] == "measured" and _r["gain"] is None and _r["after"] == 0, _r
_r, _r2 = _table({"x": {"rows": [{"quantity": "ratio", "value": 0.0, "unit": ""}, {"quantity": "speed-up", "value": 0.0, "unit": ""}]}},
                 ["x"], _hr)
assert _r["status"] == "measured" and _r["gain"] is None, _r                       # 1 / 0
assert _r2["status"] == "measured" and _r2["gain"] == 0.0, _r2                     # a speed-up of 0 is a gain of 0
_hh = {"x": [{**_hq["x"][0], "better": "higher"}]}
(_r,) = _table({"x": {"rows": [{"quantity": "ppl: a", "value": 0.0, "unit": ""}, {"quantity": "ppl: b", "value": 0.5, "unit": ""}]}},
               ["x"], _hh)
assert _r["status"] == "measured" and _r["gain"] is None and _r["before"] == 0.0, _r   # a rate up from 0: no factor
(_r,) = _table({"x": {"rows": [{"quantity": "ppl: a", "value": 0.5, "unit": ""}, {"quantity": "ppl: b", "value": 0.0, "unit": ""}]}},
               ["x"], _hh)
assert _r["status"] == "measured" and _r["gain"] == 0.0, _r
# one headline's row missing leaves the lesson's other headlines measured
_two = {"x": [_hl["x"][0], _hq["x"][0]]}
_r, _r2 = _table({"x": {"rows": [{"quantity": "ppl: a", "value": 20.0, "unit": ""}, {"quantity": "ppl: b", "value": 16.0, "unit": ""}]}},
                 ["x"], _two)
assert _r["status"] == "row missing" and _r2["status"] == "measured" and math.isclose(_r2["gain"], 1.25), (_r, _r2)
# the real headlines against this lesson's table rules, lesson by lesson
for _slug in COURSE:
    _one = {_slug: _all[_slug]}
    _t = _table(_one)
    assert all((r["status"] == "measured") == (r["lesson"] == _slug) for r in _t), _slug
### END HIDDEN TESTS

# %% [markdown] id="md-report"
# ## 4. The graduation report
#
# `capstone.graduation_report` reads every lesson's recorded results at this budget, builds the
# table with **your** `graduation_table`, draws one figure (one panel per axis; each bar is a gain on
# a log scale, 1 = no change, right of the line = better; a lesson not run is written in grey where
# its bar would be) and writes the page — lessons run and not run, the figure, the table, the guide's
# facts with their sources and the guide's advice — as one self-contained HTML file.

# %% id="report"
REPORT = capstone.graduation_report(BUDGET, graduation_table, advice=ADVICE)
plt.show()
TABLE = pd.DataFrame(REPORT["table"])
display(TABLE.round(3))
_not_run = [l["lesson"] for l in REPORT["lessons"] if l["status"] != "run"]
print(f"lessons run at budget {BUDGET}: {len(COURSE) - len(_not_run)} of {len(COURSE)}")
print("not run (no recorded results at this budget):", ", ".join(_not_run) or "none")
_renamed = TABLE[TABLE["status"] == "row missing"]
if len(_renamed):
    print("rows a lesson no longer records (renamed? update capstone.HEADLINES):")
    display(_renamed[["lesson", "what"]])
print(f"the report: {REPORT['path']} ({REPORT['path'].stat().st_size / 1e3:.0f} kB)")
assert set(TABLE["lesson"]) == set(COURSE), "the table must list every lesson"

# %% [markdown] id="md-results"
# ## What we measured
#
# This lesson measures nothing new: it counts what the course recorded. Every value below was
# computed in this run.

# %%
_measured = TABLE[TABLE["status"] == "measured"]
_res = [
    {"quantity": "lessons with recorded results", "value": len(COURSE) - len(_not_run), "unit": "lessons",
     "note": f"of {len(COURSE)}; not run: {', '.join(_not_run) or 'none'}"},
    {"quantity": "guide facts read from the course", "value": sum(p["missing"] is None for p in PROVENANCE),
     "unit": "facts", "note": f"of {len(PROVENANCE)}; the others are documented defaults"},
    {"quantity": "headline gains measured", "value": len(_measured), "unit": "rows", "note": f"of {len(TABLE)}"},
    {"quantity": "situations advised", "value": len(SITUATIONS), "unit": "scenarios",
     "note": f"{len(ADVICE)} recommendations"},
    {"quantity": "graduation report", "value": REPORT["path"].name, "unit": "", "note": str(REPORT["path"])},
    {"quantity": "capstone run time", "value": round(time.perf_counter() - START, 1), "unit": "s"},
]
for axis in capstone.AXES:
    _g = [g for g in _measured[_measured["axis"] == axis]["gain"] if g is not None and g > 0]
    if _g:
        _res.append({"quantity": f"best measured gain: {axis}", "value": round(max(_g), 3), "unit": "x",
                     "note": _measured.loc[_measured[_measured["axis"] == axis]["gain"].idxmax(), "what"]})
display(report.record_results("10_capstone", BUDGET, _res))

# %% [markdown] id="md-takeaways"
# ## What to take away
#
# - **Name the gap before the technique.** Quality, speed and size are different problems with
#   different levers; "the model is bad" is not yet a gap, and a target nobody measured against is
#   the first thing to fix ("measure first"). When every target is met, the right answer is none.
# - **Quantization and pruning spend quality to buy size and speed**; they never buy quality back.
#   Facts that change go in a retrieval index, not in the weights.
# - **The data decides the training method**: SFT with labels, distillation when a usable teacher and
#   unlabelled text make up for few labels, a feedback loop when neither exists. Privacy decides
#   which teacher is usable.
# - **Serving levers in the order they pay** on a small model: the KV cache, batching for throughput,
#   the engine; speculative decoding last, and only above the break-even acceptance rate you measured.
# - **Thresholds are measurements.** The guide reads them from the course's results; a remembered
#   number is right on the machine where it was measured, and a lesson that was not run is said, not
#   silently replaced.
# - **Honest caveats.** The rules are a guide for this course's model and machine, written from a few
#   measurements each (at `ci` budget, toy sizes); they are deliberately simple and order-based, and
#   a real decision weighs costs (engineering time, hardware, risk) that no table here holds. RAG and
#   vLLM are in the guide but were not measured in this course.
