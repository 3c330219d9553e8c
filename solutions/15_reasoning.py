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

# %% [markdown]
# # Lesson 15 — Reasoning training: CoT SFT, PRM vs ORM, GRPO, and a verifier-grounded eval
#
# "Reasoning" training teaches a model to write out intermediate steps before it answers, and then
# rewards it for getting the answer right. This lesson builds every piece on a task where "right" is
# exact: short arithmetic word problems (one to three steps, whole-number answers), generated offline
# with their worked traces. Because the task is **verifiable**, a program can say whether an answer is
# correct. Every claim below is measured with that program, not with a model's opinion and not
# with a format check.
#
# **You will build** (each exercise is graded on its own)
# 1. `extract_answer` / `verify`: pull the final answer out of whatever the model wrote, and say
#    "no answer" (`None`) rather than guess;
# 2. `step_labels`: label each step of a trace correct or incorrect from the generator's ground truth
#    (the training signal of a **process** reward model);
# 3. `majority_vote`: self-consistency over sampled answers, ignoring "no answer";
# 4. `group_advantages`: GRPO's group-relative advantage (mean-centred, with or without the group's
#    standard deviation, safe on a group whose rewards are all equal);
# 5. `grpo_loss`: the clipped surrogate loss with a per-token KL penalty, for TRL's `grpo`, `bnpo` and
#    `dr_grpo` normalisations.
#
# The last two are checked against TRL's `GRPOTrainer` on the same tensors, to 1e-6.
#
# **You will measure**, on held-out problems (names, objects and phrasings never seen in training):
# the base model; **answer-only SFT** against **chain-of-thought SFT** on the same budget (TRL
# `SFTTrainer`, LoRA); **best-of-N** selection with a process reward model (PRM), an outcome reward
# model (ORM), majority vote and random choice; a short **GRPO** run (TRL `GRPOTrainer`) with the
# verifier as its reward; and the **control** that keeps everyone honest: the same GRPO run rewarding
# only the answer format.

# %% tags=["parameters"]
import os
BUDGET = os.environ.get("BREWSLM_BUDGET", "full")

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
# %matplotlib inline
import collections
import copy
import random
import re
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import transformers
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from brewslm_helpers import budget, models, plots, reasoning, report

datasets.disable_progress_bars()
transformers.logging.set_verbosity_error()
torch.manual_seed(0)
CFG = budget.pick(
    BUDGET,
    ci=dict(test_rows=4, sft_rows=8, sft_steps=2, sft_batch=4, lr=1e-3, lora_r=8, max_new_tokens=24,
            gen_batch=16, rm_rows=4, bon_rows=2, bon_n=4, bon_draws=2, temperature=0.8,
            grpo_rows=4, grpo_steps=1, grpo_gens=2, grpo_batch=2, grpo_tokens=8, grpo_lr=1e-5, beta=0.04,
            tiny_grpo=True),
    full=dict(test_rows=90, sft_rows=600, sft_steps=16, sft_batch=8, lr=1e-3, lora_r=16, max_new_tokens=64,
              gen_batch=45, rm_rows=80, bon_rows=20, bon_n=16, bon_draws=20, temperature=0.8,
              grpo_rows=200, grpo_steps=6, grpo_gens=4, grpo_batch=8, grpo_tokens=64, grpo_lr=1e-4,
              beta=0.04, tiny_grpo=False),
)
BON_SIZES = [n for n in (1, 2, 4, 8, 16) if n <= CFG["bon_n"]]

model, tok = models.load_teacher()
TRL_TRAINER = reasoning.trl_loss_trainer(tok)  # a tiny GRPOTrainer: TRL's own loss code on our tensors
print(f"budget {BUDGET}: {CFG}")
print(f"{models.MODEL_NAME}: {model.num_parameters():,} parameters")

# %% [markdown]
# ## 1. The task: word problems with an exact answer
#
# Each problem starts with an amount and changes it one to three times (the **level** is the number of
# steps): add, subtract, double or triple, share equally and keep one share. Every intermediate value
# is a whole number below 100. The generator (`brewslm_helpers/data/make_reasoning_data.py`) writes
# the question, the steps and the answer, so a worked **trace** comes for free:
#
# ```
# Step 1: 12 + 5 = 17
# Step 2: 17 - 3 = 14
# Answer: 14
# ```
#
# The held-out split uses names, objects and one phrasing per operation that never occur in training.
# A model that memorised training sentences gains nothing there; it has to read the problem.
# Why this task? The base model must be able to make *some* progress (a task it never solves gives
# reinforcement learning nothing to reinforce) and must be far from perfect (or there is nothing to
# learn). Section 3 measures where the base model stands: even with a worked example it solves few of
# these problems, so GRPO with the verifier reward starts from the CoT-SFT model (section 10), which
# solves enough of them for a group of samples to disagree.

# %% [markdown]
# ## 2. Answer extraction and the verifier
#
# A verifier is only as good as its answer extraction. Models write `Answer: 14`, `**Answer:** 14`,
# `The answer is 14.`, `\boxed{14}`, `#### 14`, `Answer: 14 candles` or `Answer: 1,234`. A trace
# holds many numbers, and the answer is the **last** one the model marked as its answer, never the
# first number it wrote. A reply that marks no answer (it rambled, or the generation was cut) gets
# **no answer**, `None`. Guessing, say by taking the last number in the text, turns format failures
# into lucky hits and inflates the score of exactly the models that did not follow instructions.
#
# The rule, stated up front:
# 1. An answer marker is `answer` (any case) followed by an optional `is`, `:` or `=` (with optional
#    `*`, `$` and spaces around), or `\boxed{`, or `####`, **immediately** followed by a number:
#    digits with optional thousands commas, an optional minus sign and optional decimals.
# 2. The answer is the number of the **last** such marker. Commas are dropped; a whole number (also
#    `14.0`) is returned as an `int`, any other as a `float`.
# 3. No marker with a number: `None`.
#
# `verify(text, gold)` is `True` only when an answer was extracted and equals `gold`.

# %% nbgrader={"grade": false, "grade_id": "ex_extract_answer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def extract_answer(text: str) -> int | float | None:
    """The final answer marked in a model's reply, or None ("no answer").

    text: the model's reply (any string). The answer is the number right after the LAST answer
    marker: "answer" (any case) with optional "is", ":" or "=" (and optional "*", "$", spaces),
    "\\boxed{" or "####". Numbers: optional "-", digits with optional thousands commas, optional
    decimals. Returns an int for a whole number (commas dropped, "14.0" -> 14), else a float.
    Returns None when no marker is followed by a number (never falls back to other numbers).
    """
    ### BEGIN SOLUTION
    number = r"(?P<num>-?\d[\d,]*(?:\.\d+)?)"
    marker = r"(?:answer\s*(?:is)?[\s*:=$]*|\\boxed\{\s*\$?|####\s*\$?)"
    matches = list(re.finditer(marker + number, text, flags=re.IGNORECASE))
    if not matches:
        return None
    match = matches[-1]
    value = float(match.group("num").replace(",", ""))
    return int(value) if value.is_integer() else value
    ### END SOLUTION


def verify(text: str, gold: int) -> bool:
    """True when the reply's extracted answer (extract_answer) equals gold; "no answer" is wrong."""
    ### BEGIN SOLUTION
    answer = extract_answer(text)
    return answer is not None and answer == gold
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_extract_answer", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
trace = "Step 1: 12 + 5 = 17\nStep 2: 17 - 3 = 14\nAnswer: 14"
assert extract_answer(trace) == 14, extract_answer(trace)
assert isinstance(extract_answer(trace), int)
for text, want in [("**Answer:** 14", 14), ("The answer is 14.", 14), ("So the final answer is $14$.", 14),
                   ("\\boxed{14}", 14), ("#### 14", 14), ("Answer: 14 candles", 14), ("ANSWER = 14", 14),
                   ("Answer: 1,234", 1234), ("Answer: -3", -3), ("Answer: 14.0", 14), ("Answer: 2.5", 2.5)]:
    assert extract_answer(text) == want, f"{text!r}: got {extract_answer(text)!r}, expected {want!r}"
# no marked answer: None, not a guess
for text in ["Nora has 53 candles.", "Step 1: 14 + 8 = 22\nStep 2: 22 * 2 =", "", "Answer: unknown"]:
    assert extract_answer(text) is None, f"{text!r} marks no answer, got {extract_answer(text)!r}"
assert verify(trace, 14) and not verify(trace, 17) and not verify("Nora has 14 candles.", 14)
print("extract_answer / verify: OK")
### BEGIN HIDDEN TESTS
# the last marked answer wins, even after an earlier marked one and other numbers
assert extract_answer("The answer is 17. Wait, 17 - 3 = 14. Answer: 14") == 14
assert extract_answer("Answer: 9\nStep 1: 4 + 5 = 9\nStep 2: 9 * 2 = 18\nAnswer: 18 (not 9)") == 18
assert extract_answer("Step 1: 3 * 2 = 6\nthe answer is 6 apples, 2 boxes") == 6
assert extract_answer("answer:12") == 12 and extract_answer("Final answer: **7**") == 7
assert extract_answer("\\boxed{ 40 }") == 40 and extract_answer("#### -5") == -5
# a marker with no number after it does not borrow the previous number
assert extract_answer("I have 5 apples. The answer is unclear.") is None
assert extract_answer("12 apples, then 5 more; answer") is None
assert verify("Answer: 14", 14) is True and verify("Answer: 14.5", 14) is False
assert verify("", 0) is False and verify("Answer: 0", 0) is True
### END HIDDEN TESTS

# %% [markdown]
# ## 3. The base model on the held-out problems
#
# The model as shipped gets the system message (which describes the step format and asks for a final
# `Answer:` line) and each held-out problem, and we decode greedily, twice: **0-shot** (the problem
# alone) and **1-shot** (one worked example before it, `reasoning.messages(q, shots=1)`). Two numbers
# per model, side by side: **accuracy** (the verifier says correct; 95 % Wilson interval) and
# **format compliance** (`reasoning.format_ok`: only `Step k: ... = n` lines, then one `Answer: n`
# line). They measure different things, and the lesson ends on why that matters.
#
# The fine-tuned models later in the lesson are prompted 0-shot: they learn the format from their
# training targets, and the shorter prompt halves the cost of every training step and generation.

# %%
test_rows = reasoning.load_reasoning_data("test", CFG["test_rows"])
train_rows = reasoning.load_reasoning_data("train")
questions = [r["question"] for r in test_rows]
golds = [r["answer"] for r in test_rows]
RESULTS = {}


def evaluate(m, name, shots=0):
    """Greedy replies on the held-out problems, scored by the verifier; stored in RESULTS[name].
    shots=1 shows the worked example first (the base model's prompt), 0 does not (fine-tuned models)."""
    start = time.perf_counter()
    replies = [r[0] for r in reasoning.generate(m, tok, questions, max_new_tokens=CFG["max_new_tokens"],
                                                batch_size=CFG["gen_batch"], shots=shots, desc=name)]
    correct = np.array([verify(t, g) for t, g in zip(replies, golds)])
    fmt = np.array([reasoning.format_ok(t) for t in replies])
    none = np.array([extract_answer(t) is None for t in replies])
    RESULTS[name] = {"replies": replies, "correct": correct, "format": fmt, "no_answer": none,
                     "seconds": time.perf_counter() - start}
    lo, hi = reasoning.wilson(int(correct.sum()), len(correct))
    print(f"{name}: accuracy {correct.mean():.3f} [{lo:.3f}, {hi:.3f}], format {fmt.mean():.3f}, "
          f"no answer {none.mean():.3f} ({time.perf_counter() - start:.0f} s)")
    return RESULTS[name]


print(f"{len(test_rows)} held-out problems, levels {collections.Counter(r['level'] for r in test_rows)}")
print("example:", test_rows[0]["question"], "->", golds[0])
base0 = evaluate(model, "base (0-shot)", shots=0)
base = evaluate(model, "base (1-shot)", shots=1)
by_level = pd.Series(base["correct"]).groupby([r["level"] for r in test_rows]).mean()
print("base accuracy by level:", by_level.round(3).to_dict())
print(f"a 0-shot reply: {base0['replies'][0][:200]!r}")
for text, gold in list(zip(base["replies"], golds))[:3]:
    print(f"\n--- gold {gold}, extracted {extract_answer(text)!r}\n{text[:300]}")

# %% [markdown]
# ## 4. Chain-of-thought SFT against answer-only SFT, on the same budget
#
# Two LoRA adapters on the same base model, with the same (0-shot) prompts, problems, steps, batch size
# and learning rate (TRL `SFTTrainer`, loss on the reply only). They differ only in the target:
# - **answer-only**: `Answer: 14`;
# - **chain of thought (CoT)**: the worked trace, then the answer line.
#
# A transformer does a fixed amount of computation per token. Asked for the answer at once, it has
# to do all three steps inside one forward pass; writing the steps out gives it a forward pass per
# intermediate result, each conditioned on the previous one. The CoT target is longer, so CoT costs more
# tokens to train and to generate: that is the price. We compare the two on the same held-out
# problems and report the **paired** difference (each problem answered by both), with a bootstrap
# interval over problems.

# %%
LORA = dict(r=CFG["lora_r"], lora_alpha=2 * CFG["lora_r"], lora_dropout=0.0, bias="none",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM")
sft_rows = train_rows[:CFG["sft_rows"]]


def sft(cot, name):
    """A fresh copy of the base model fine-tuned with LoRA on the CoT or answer-only targets."""
    m = copy.deepcopy(model)  # the base weights, untouched by the other run
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="brewslm-15-"), use_cpu=True, bf16=False,
                     gradient_checkpointing=False, seed=0, max_steps=CFG["sft_steps"],
                     per_device_train_batch_size=CFG["sft_batch"], learning_rate=CFG["lr"],
                     lr_scheduler_type="constant_with_warmup", warmup_steps=min(5, CFG["sft_steps"] // 5),
                     max_length=256, logging_steps=1, save_strategy="no", report_to="none",
                     dataloader_num_workers=0, disable_tqdm=False)
    trainer = SFTTrainer(model=m, args=args, train_dataset=Dataset.from_list(reasoning.sft_examples(sft_rows, cot)),
                         processing_class=tok, peft_config=LoraConfig(**LORA))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = sum(int((np.array(x) != -100).sum()) for x in trainer.train_dataset["labels"][:CFG["sft_batch"]])
    print(f"{name}: {CFG['sft_steps']} steps x {CFG['sft_batch']} in {seconds:.0f} s; loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}; ~{tokens / CFG['sft_batch']:.0f} target tokens per example")
    merged = trainer.model.merge_and_unload().eval()  # the adapter folded into the weights
    return merged, losses, seconds


answer_model, answer_losses, answer_seconds = sft(False, "answer-only SFT")
cot_model, cot_losses, cot_seconds = sft(True, "CoT SFT")
fig, ax = plots.new_axes("SFT loss on the reply (LoRA)", "step", "loss (nats/token)")
ax.plot(answer_losses, label="answer-only")
ax.plot(cot_losses, label="chain of thought")
ax.legend()
plt.show()

# %%
answer_only = evaluate(answer_model, "answer-only SFT")
cot = evaluate(cot_model, "CoT SFT")
D_COT = reasoning.paired_bootstrap(cot["correct"], answer_only["correct"])
print(f"\nCoT - answer-only, paired over {len(golds)} problems: {D_COT[0]:+.3f} [{D_COT[1]:+.3f}, {D_COT[2]:+.3f}]")
levels = [r["level"] for r in test_rows]
table = pd.DataFrame({name: pd.Series(RESULTS[name]["correct"]).groupby(levels).mean()
                      for name in ("base (1-shot)", "answer-only SFT", "CoT SFT")})
table.index.name = "level"
display(table.round(3))
print(f"a CoT reply: {cot['replies'][0]!r}")

# %% [markdown]
# ## 5. Process supervision: labelling each step
#
# An **outcome** reward model (ORM) learns from one label per trace: was the final answer right? A
# **process** reward model (PRM) learns a label per step, so it can say *where* a trace went wrong and
# score a half-finished one. Step labels are expensive when people write them (PRM800K). Here the
# generator knows every intermediate value, so we can make them: take a correct trace, inject one
# error (a slip in the arithmetic, a wrong operand, a wrong operator), carry the wrong value on, and
# label each step against the ground truth.
#
# The labelling rule (the one Math-Shepherd and PRM800K use in spirit): a step is **correct** if its
# result and every earlier result match the ground truth. Once a trace has gone wrong, every later
# step is **incorrect**, even a step whose arithmetic is fine, because it builds on a wrong value and
# the trace can no longer reach the answer. A step with no readable result (`None`) is incorrect, and
# so is any step beyond the ground truth's last one. The caveat: this rule assumes the model solves in
# the generator's order; a correct solution in another order would be labelled wrong. Math-Shepherd
# avoids that by rolling out from each step and checking the final answers, at a much higher cost.

# %% nbgrader={"grade": false, "grade_id": "ex_step_labels", "locked": false, "schema_version": 3, "solution": true, "task": false}
def step_labels(values: list, gold: list[int]) -> list[int]:
    """One label per step of a trace: 1 = correct, 0 = incorrect.

    values: the result the trace wrote at each of its steps (int, or None when unreadable).
    gold: the ground-truth result of each step.
    Step k (0-based) is 1 when k < len(gold) and values[j] == gold[j] for every j <= k; else 0.
    Returns a list of len(values) ints.
    """
    ### BEGIN SOLUTION
    labels, ok = [], True
    for k, value in enumerate(values):
        ok = ok and k < len(gold) and value is not None and value == gold[k]
        labels.append(int(ok))
    return labels
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_step_labels", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
assert step_labels([17, 14], [17, 14]) == [1, 1]
assert step_labels([17, 15], [17, 14]) == [1, 0]
assert step_labels([18, 15], [17, 14]) == [0, 0], "a step built on a wrong value is incorrect"
assert step_labels([], [17, 14]) == []
assert all(isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in step_labels([17, 15], [17, 14])), \
    "labels are the ints 1 and 0, not bools (a bool tensor of targets breaks the reward head's loss)"
print("step_labels: OK")
### BEGIN HIDDEN TESTS
# a later step that happens to hit the gold value after an earlier error is still incorrect
assert step_labels([18, 14, 28], [17, 14, 28]) == [0, 0, 0]
assert step_labels([5, None, 7], [5, 6, 7]) == [1, 0, 0]
assert step_labels([5, 6, 7, 7], [5, 6, 7]) == [1, 1, 1, 0], "a step beyond the ground truth is incorrect"
assert step_labels([5], [5, 6, 7]) == [1]
assert step_labels([None], [5]) == [0]
assert step_labels([0, 1], [0, 1]) == [1, 1]
### END HIDDEN TESTS

# %% [markdown]
# ### Training the two reward models
#
# Both reward models are a small head on the CoT model's last hidden state (frozen: one forward pass
# per trace, no fine-tuning). TRL 1.16 no longer has a `PRMTrainer` (it moved to `trl.experimental`
# and was then removed), so the step-level model is built by hand here. The same set-up, with labels on
# each step's last token, is what `LlamaForTokenClassification` fine-tuning would give at a higher price.
# - **PRM**: a logistic head on the state at the last token of each step, trained on the step labels.
#   A trace's score is its **weakest step**, the minimum over steps of P(step correct).
# - **ORM**: the same kind of head on the state at the trace's last token, trained on whether the
#   final answer is right.
#
# TRL's `RewardTrainer`, which remains, would fine-tune a whole sequence classifier on chosen/rejected
# pairs for the ORM. We do not use it on purpose: with the same frozen-feature head for both, the PRM
# and the ORM differ only in their labels (one per step against one per trace), a like-for-like
# comparison, and each costs one forward pass per trace instead of a training run.
#
# Both see the same traces: for each training problem the correct trace and one with an injected error.
# The PRM gets a label per step, the ORM one per trace. We check each on traces of *held-out* problems
# (AUC: the chance that a random correct item outscores a random incorrect one; 0.5 is chance).

# %%
rng = random.Random(0)


def labelled_traces(rows):
    """For each problem: its correct trace and one corrupted trace, with step and outcome labels."""
    out = []
    for r in rows:
        gold = [s["value"] for s in r["steps"]]
        bad = reasoning.corrupt(r, rng)
        for trace in (reasoning.format_trace(r["steps"], r["answer"]), bad["trace"]):
            out.append({"question": r["question"], "trace": trace,
                        "steps": step_labels(reasoning.step_values(trace), gold),
                        "outcome": int(verify(trace, r["answer"]))})
    return out


def head_data(items, feats):
    steps_x = torch.cat([f[:-1] for f in feats])
    steps_y = torch.tensor([y for it in items for y in it["steps"]])
    final_x = torch.stack([f[-1] for f in feats])
    final_y = torch.tensor([it["outcome"] for it in items])
    return steps_x, steps_y, final_x, final_y


rm_train = labelled_traces(train_rows[-CFG["rm_rows"]:])  # the SFT used the first rows
rm_check = labelled_traces(test_rows[:max(4, CFG["bon_rows"])])
start = time.perf_counter()
train_feats = reasoning.trace_features(cot_model, tok, [x["question"] for x in rm_train], [x["trace"] for x in rm_train])
check_feats = reasoning.trace_features(cot_model, tok, [x["question"] for x in rm_check], [x["trace"] for x in rm_check])
sx, sy, fx, fy = head_data(rm_train, train_feats)
prm = reasoning.train_head(sx, sy)
orm = reasoning.train_head(fx, fy)
RM_SECONDS = time.perf_counter() - start
csx, csy, cfx, cfy = head_data(rm_check, check_feats)
PRM_AUC = reasoning.auc(prm(csx).detach().numpy(), csy.numpy())
ORM_AUC = reasoning.auc(orm(cfx).detach().numpy(), cfy.numpy())
print(f"{len(rm_train)} training traces ({len(sy)} steps, {float(sy.float().mean()):.2f} labelled correct), "
      f"features and heads in {RM_SECONDS:.0f} s")
print(f"held-out injected errors: PRM step AUC {PRM_AUC:.3f}, ORM outcome AUC {ORM_AUC:.3f}")
example = rm_check[1]
print(f"\n{example['trace']}\nstep labels {example['steps']}, PRM P(correct) per step "
      f"{np.round(prm(check_feats[1][:-1]).detach().numpy(), 2).tolist()}")

# %% [markdown]
# ## 6. Majority vote (self-consistency)
#
# Sample several traces, extract each answer, return the most common one. Two details decide whether
# it works. "No answer" is not an answer: if most samples were cut off, counting `None` as a vote
# would make "no answer" win over a real answer that several samples agree on. Ties need a rule:
# here the answer that appeared **first** wins (a deterministic rule that does not favour any value).

# %% nbgrader={"grade": false, "grade_id": "ex_majority_vote", "locked": false, "schema_version": 3, "solution": true, "task": false}
def majority_vote(answers: list):
    """The most common answer among those that are not None ("no answer" does not vote).

    answers: extracted answers (int, float or None), one per sample, in sampling order.
    Ties go to the answer that occurs first in the list. Returns None when every answer is None
    (or the list is empty).
    """
    ### BEGIN SOLUTION
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_majority_vote", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
assert majority_vote([3, 5, 5, 2]) == 5
assert majority_vote([None, None, None, 7]) == 7, "no answer must not win the vote"
assert majority_vote([None, None]) is None and majority_vote([]) is None
print("majority_vote: OK")
### BEGIN HIDDEN TESTS
assert majority_vote([9, 4, 4, 9]) == 9, "a tie goes to the answer seen first"
assert majority_vote([None, 4, 9, None, 9, 4, None]) == 4
assert majority_vote([2.5, 2.5, 3]) == 2.5
assert majority_vote([0, None, 0, 1]) == 0
assert majority_vote([1, 2, 3]) == 1
### END HIDDEN TESTS

# %% [markdown]
# ## 7. Best-of-N: PRM vs ORM vs majority vote vs random
#
# For each held-out problem we sample `bon_n` traces from the CoT model (temperature
# `CFG["temperature"]`) and ask four selectors, and an oracle, to pick one answer from N of them:
# - **random**: any one sample (its expected accuracy is the mean accuracy of single samples);
# - **majority vote**: your `majority_vote` over the N extracted answers;
# - **ORM**: the sample with the highest outcome score;
# - **PRM**: the sample whose weakest step scores highest (a sample with no step gets 0);
# - **oracle**: right if *any* of the N samples is right (the verifier itself as the selector, which
#   no deployed system has on new problems): the ceiling that a perfect reward model would reach.
#
# Each point averages `bon_draws` random subsets of size N out of the samples, and its interval is a
# bootstrap over problems. N = 1 is the same for every selector: one sample. The gap between the oracle
# and a selector is what that selector fails to recover; read it next to the reward models' AUCs in
# section 5 (an AUC near 0.5 cannot pick the right sample, however many there are).

# %%
bon_rows = test_rows[:CFG["bon_rows"]]
start = time.perf_counter()
samples = reasoning.generate(cot_model, tok, [r["question"] for r in bon_rows], n=CFG["bon_n"],
                             temperature=CFG["temperature"], max_new_tokens=CFG["max_new_tokens"],
                             batch_size=max(CFG["gen_batch"], CFG["bon_n"]), desc="sample")
SAMPLE_SECONDS = time.perf_counter() - start
flat_q = [r["question"] for r in bon_rows for _ in range(CFG["bon_n"])]
flat_t = [t for group in samples for t in group]
feats = reasoning.trace_features(cot_model, tok, flat_q, flat_t, desc="score")
prm_scores = np.array([float(prm(f[:-1]).min()) if len(f) > 1 else 0.0 for f in feats]).reshape(len(bon_rows), -1)
orm_scores = np.array([float(orm(f[-1])) for f in feats]).reshape(len(bon_rows), -1)
answers = [[extract_answer(t) for t in group] for group in samples]
right = np.array([[a is not None and a == r["answer"] for a in group] for group, r in zip(answers, bon_rows)])
print(f"{len(flat_t)} samples in {SAMPLE_SECONDS:.0f} s; single-sample accuracy {right.mean():.3f}; "
      f"problems with at least one right sample: {right.any(1).mean():.3f}")

draw_rng = np.random.default_rng(0)
BON = {k: {} for k in ("random", "majority vote", "ORM", "PRM", "oracle (the verifier picks)")}
PER_PROBLEM = {k: {} for k in BON}  # accuracy per problem, averaged over the draws
for n in BON_SIZES:
    per_problem = {k: np.zeros(len(bon_rows)) for k in BON}
    for _ in range(CFG["bon_draws"]):
        for i, r in enumerate(bon_rows):
            pick = draw_rng.choice(CFG["bon_n"], size=n, replace=False)
            per_problem["random"][i] += right[i, pick[0]]
            per_problem["majority vote"][i] += majority_vote([answers[i][j] for j in pick]) == r["answer"]
            per_problem["ORM"][i] += right[i, pick[np.argmax(orm_scores[i, pick])]]
            per_problem["PRM"][i] += right[i, pick[np.argmax(prm_scores[i, pick])]]
            per_problem["oracle (the verifier picks)"][i] += right[i, pick].any()
    for k in BON:
        PER_PROBLEM[k][n] = per_problem[k] / CFG["bon_draws"]
        BON[k][n] = reasoning.bootstrap_mean(PER_PROBLEM[k][n])
fig, ax = plots.new_axes(f"best-of-N on {len(bon_rows)} held-out problems", "N (samples)", "accuracy")
for k, style in zip(BON, ("C7", "C2", "C1", "C0", "k")):
    means = [BON[k][n][0] for n in BON_SIZES]
    ax.errorbar(BON_SIZES, means, yerr=[[m - BON[k][n][1] for m, n in zip(means, BON_SIZES)],
                                        [BON[k][n][2] - m for m, n in zip(means, BON_SIZES)]],
                marker="o", capsize=3, label=k, color=style)
ax.set_xscale("log", base=2)
ax.set_xticks(BON_SIZES, [str(n) for n in BON_SIZES])
ax.legend(fontsize=8)
plt.show()
display(pd.DataFrame({k: {n: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for n, v in BON[k].items()} for k in BON}))
N_BIG = 8 if 8 in BON_SIZES else max(BON_SIZES)
D_BON = {k: reasoning.paired_bootstrap(PER_PROBLEM[k][N_BIG], PER_PROBLEM[k][1]) for k in BON}
for k, (d, lo, hi) in D_BON.items():
    print(f"{k:28s} best-of-{N_BIG} minus best-of-1: {d:+.3f} [{lo:+.3f}, {hi:+.3f}] (paired over problems)")

# %% [markdown]
# ## 8. GRPO: group-relative advantages
#
# PPO needs a value network to say how good a state is. **GRPO** (DeepSeekMath) drops it: for each
# prompt it samples a **group** of G completions, scores each with the reward (here, the verifier:
# 1 if right, 0 if not), and uses the group as its own baseline:
#
# $$A_i = \frac{r_i - \operatorname{mean}(r_1..r_G)}{\operatorname{std}(r_1..r_G) + \varepsilon}$$
#
# - The mean is **per group**: a completion is good if it beats its siblings on the *same* prompt.
#   A batch-wide mean would reward easy prompts and punish hard ones.
# - Dividing by the group's std (TRL's `scale_rewards="group"`, the default) equalises the scale across
#   prompts; Dr. GRPO argues it over-weights prompts that are almost always right or wrong and turns
#   it off (`"none"`); `"batch"` divides by the std of the whole batch instead.
# - A group whose rewards are all equal (every sample right, or every one wrong) carries **no signal**:
#   its advantages must be exactly 0, not `0/0 = nan`. TRL adds ε = 1e-4 to the std, and its std is
#   the unbiased (Bessel-corrected, divide by G-1) one.
#
# Rewards arrive as one flat vector of B = groups × G values, each group's completions adjacent.

# %% nbgrader={"grade": false, "grade_id": "ex_group_advantages", "locked": false, "schema_version": 3, "solution": true, "task": false}
def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """GRPO's advantages, (B,) float, for rewards (B,) laid out as B // group_size adjacent groups.

    Every advantage is reward minus its group's mean. scale: "group" divides by the group's std,
    "batch" by the std of all B rewards, "none" does not divide. Stds are unbiased (divide by n-1),
    and 1e-4 is added to the std before dividing.
    """
    ### BEGIN SOLUTION
    rewards = rewards.float()
    groups = rewards.view(-1, group_size)
    centred = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = groups.std(dim=1, unbiased=True).repeat_interleave(group_size)
    elif scale == "batch":
        std = rewards.std(unbiased=True).expand_as(rewards)
    else:
        raise ValueError(f"unknown scale {scale!r}")
    return centred / (std + 1e-4)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_group_advantages", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
got = group_advantages(r, 4)
assert got.shape == (8,) and got.dtype == torch.float32, (got.shape, got.dtype)
torch.testing.assert_close(got, reasoning.trl_advantages(r, 4, "group"), atol=1e-6, rtol=0)
torch.testing.assert_close(group_advantages(r, 4, "none"), reasoning.trl_advantages(r, 4, "none"), atol=1e-6, rtol=0)
# a group whose rewards are all equal gives exactly zero advantage, never nan
flat = group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2)
assert torch.isfinite(flat).all() and flat[:2].abs().max() == 0, flat
print("group_advantages: OK")
### BEGIN HIDDEN TESTS
gen = torch.Generator().manual_seed(0)
for groups, size in [(3, 4), (2, 8), (5, 2)]:
    rewards = torch.rand(groups * size, generator=gen) * 3 - 1
    for scale in ("group", "batch", "none"):
        torch.testing.assert_close(group_advantages(rewards, size, scale),
                                   reasoning.trl_advantages(rewards, size, scale), atol=1e-6, rtol=0)
rewards = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
for scale in ("group", "batch", "none"):
    torch.testing.assert_close(group_advantages(rewards, 4, scale), reasoning.trl_advantages(rewards, 4, scale),
                               atol=1e-6, rtol=0)
assert (group_advantages(torch.zeros(6), 3) == 0).all()
assert group_advantages(torch.tensor([1, 0, 1, 1]), 2).dtype == torch.float32
### END HIDDEN TESTS

# %% [markdown]
# ## 9. The clipped GRPO loss with a KL penalty
#
# For every completion token t of completion i, with the policy's log-probability $\log\pi_\theta$,
# the log-probability when the completion was sampled $\log\pi_{old}$, and the reference model's
# $\log\pi_{ref}$:
#
# $$\rho_{i,t} = e^{\log\pi_\theta - \log\pi_{old}},\qquad
# \ell_{i,t} = -\min\big(\rho_{i,t} A_i,\ \operatorname{clip}(\rho_{i,t}, 1-\varepsilon_{low}, 1+\varepsilon_{high})\,A_i\big)
# + \beta\, \mathrm{KL}_{i,t}$$
#
# $$\mathrm{KL}_{i,t} = e^{\log\pi_{ref} - \log\pi_\theta} - (\log\pi_{ref} - \log\pi_\theta) - 1$$
#
# - The **min** is PPO's pessimism: with A > 0 the gain stops once ρ passes 1 + ε; with A < 0 it
#   stops once ρ drops below 1 − ε. Taking the max instead lets a negative-advantage token be
#   pushed down without limit.
# - The KL term is Schulman's "k3" estimator of KL(π_θ‖π_ref) from samples of π_θ: always ≥ 0,
#   unbiased, zero when the two agree. Flipping the log-ratio's sign estimates a different divergence.
#   The samples come from π_old, not π_θ, so TRL 1.16 by default (`use_bias_correction_kl=True`, after
#   DeepSeek-V3.2) multiplies the KL term by the same ratio ρ, which makes its gradient the unbiased
#   gradient of the reverse KL; `bias_correction_kl=False` gives the original GRPO paper's term.
# - Normalisation (TRL's `loss_type`), with the mask m selecting real completion tokens:
#   `grpo` averages each completion over its own tokens, then over completions (long completions get less
#   weight per token); `bnpo` averages over all tokens of the batch; `dr_grpo` sums and divides by
#   B × `max_completion_length` (a constant, so no length bias). TRL's default, `dapo`, is `bnpo` with
#   the token count taken over the whole generation batch across gradient-accumulation steps; with one
#   batch and no accumulation it equals `bnpo`.
# - At the first optimisation step after sampling, π_old = π_θ, so ρ = 1 and the gradient is plain
#   policy gradient with the group baseline; the clip matters when a batch is reused (`num_iterations` > 1).

# %% nbgrader={"grade": false, "grade_id": "ex_grpo_loss", "locked": false, "schema_version": 3, "solution": true, "task": false}
def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, beta: float = 0.04, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
              loss_type: str = "grpo", max_completion_length: int | None = None,
              bias_correction_kl: bool = True) -> torch.Tensor:
    """The GRPO loss, a scalar tensor (differentiable with respect to logps).

    logps, old_logps, ref_logps: (B, T) per-token log-probabilities of the completions under the
    policy, the sampling policy and the reference. advantages: (B,). mask: (B, T), 1 on completion
    tokens. Per token: -min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A), plus
    beta * KL when beta != 0, KL = exp(ref - logp) - (ref - logp) - 1, times the ratio when
    bias_correction_kl (TRL's default). loss_type "grpo": mean over each row's
    masked tokens, then over rows; "bnpo": sum over masked tokens / their count; "dr_grpo": sum over
    masked tokens / (B * max_completion_length, default T). Token counts are clamped to at least 1.
    """
    ### BEGIN SOLUTION
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if beta != 0.0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        if bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        length = max_completion_length if max_completion_length is not None else logps.shape[1]
        return (per_token * mask).sum() / (logps.shape[0] * length)
    raise ValueError(f"unknown loss_type {loss_type!r}")
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_grpo_loss", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
gen = torch.Generator().manual_seed(0)
B, T = 4, 6
logps = -torch.rand(B, T, generator=gen) * 3
old = logps + (torch.rand(B, T, generator=gen) - 0.5)  # ratios from about 0.6 to 1.6: both clips bite
ref = logps + (torch.rand(B, T, generator=gen) - 0.5)
adv = torch.tensor([1.5, -1.0, 0.5, -0.7])
mask = torch.ones(B, T)
mask[0, 4:] = 0
mask[2, 2:] = 0
for loss_type in ("grpo", "bnpo", "dr_grpo"):
    got = grpo_loss(logps, old, ref, adv, mask, beta=0.04, loss_type=loss_type)
    want = reasoning.trl_grpo_loss(TRL_TRAINER, logps, old, ref, adv, mask, beta=0.04, loss_type=loss_type)
    assert got.dim() == 0, got.shape
    assert abs(float(got) - float(want)) < 1e-6, f"{loss_type}: got {float(got):.7f}, TRL {float(want):.7f}"
x = logps.clone().requires_grad_(True)
grpo_loss(x, old, ref, adv, mask).backward()
assert x.grad is not None and torch.isfinite(x.grad).all()
print("grpo_loss: OK (matches TRL's GRPOTrainer._compute_loss)")
### BEGIN HIDDEN TESTS
for seed in (1, 2):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(3, 5, generator=g) * 2
    od = lp + (torch.rand(3, 5, generator=g) - 0.5) * 1.5
    rf = lp + (torch.rand(3, 5, generator=g) - 0.5) * 2
    ad = torch.randn(3, generator=g)
    mk = (torch.rand(3, 5, generator=g) > 0.3).float()
    mk[:, 0] = 1
    for beta, lo, hi, lt, mcl, bc in [(0.0, 0.2, 0.2, "grpo", None, True), (0.1, 0.2, 0.28, "bnpo", None, True),
                                      (0.04, 0.1, 0.3, "dr_grpo", 8, True), (0.5, 0.2, 0.2, "grpo", None, False),
                                      (0.3, 0.2, 0.2, "bnpo", None, False)]:
        got = grpo_loss(lp, od, rf, ad, mk, beta=beta, epsilon_low=lo, epsilon_high=hi, loss_type=lt,
                        max_completion_length=mcl, bias_correction_kl=bc)
        want = reasoning.trl_grpo_loss(TRL_TRAINER, lp, od, rf, ad, mk, beta=beta, epsilon_low=lo, epsilon_high=hi,
                                       loss_type=lt, max_completion_length=mcl, bias_correction_kl=bc)
        assert abs(float(got) - float(want)) < 1e-6, (seed, beta, lt, float(got), float(want))
# on-policy (ratio 1) with beta 0: the loss is minus the mean advantage over completions
same = grpo_loss(lp, lp, lp, ad, torch.ones(3, 5), beta=0.0)
assert abs(float(same) + float(ad.mean())) < 1e-6
# the KL term alone: zero when the policy equals the reference, positive otherwise
zero_adv = torch.zeros(3)
assert abs(float(grpo_loss(lp, lp, lp, zero_adv, torch.ones(3, 5), beta=1.0))) < 1e-7
assert float(grpo_loss(lp, lp, rf, zero_adv, torch.ones(3, 5), beta=1.0)) > 0
### END HIDDEN TESTS

# %% [markdown]
# ## 10. A short GRPO run with TRL, and the format-only control
#
# TRL's `GRPOTrainer` does the whole loop: sample `num_generations` completions per prompt (with HF
# `generate` on this CPU; vLLM on a GPU), score them with the reward functions, compute the
# advantages and the loss above, step. Facts found by running it here (trl 1.16):
# `GRPOConfig` needs `use_cpu=True, bf16=False, gradient_checkpointing=False` on this machine; its
# default `loss_type` is `dapo` and its default `beta` is 0 (no KL, so no reference model); with
# `beta > 0` it needs a reference, which with LoRA is the model with the adapter switched off; and
# `per_device_train_batch_size` counts **completions** (16 = 4 prompts × 4 generations).
#
# Two runs with the same settings and budget (a fresh LoRA adapter, `loss_type="grpo"`,
# β = `CFG["beta"]`, the same steps, groups, learning rate and problems), different rewards:
# 1. **verifier reward**, from the CoT model (merged), 0-shot: 1 if `verify(completion, answer)`, else 0;
# 2. **format-only reward** (the control): 1 if the completion is well formed (`reasoning.format_ok`),
#    whatever the answer. It starts from the **base model, 1-shot**, because a control must have room
#    to show its effect: the CoT model already writes the format nearly always (section 4's table),
#    while the base model often does not, and answers few problems right.
#
# Each run is scored by the verifier on the held-out problems against the model it started from.
# The control is there because a reward that can be earned by formatting will be: format compliance
# rises, and only the verifier shows whether the answers did. (At `ci` budget the runs use a tiny
# random Llama, to exercise the code path in seconds.)

# %%
def completion_text(completion):
    return completion[0]["content"] if isinstance(completion, list) else completion


def verifier_reward(prompts, completions, answer, **kwargs):
    return [float(verify(completion_text(c), a)) for c, a in zip(completions, answer)]


def format_reward(prompts, completions, **kwargs):
    return [float(reasoning.format_ok(completion_text(c))) for c in completions]


grpo_rows = train_rows[-CFG["grpo_rows"]:]


def grpo_run(reward, start_model, shots, name):
    """A GRPO run with LoRA on a copy of start_model (a tiny random Llama at ci), prompted with shots."""
    if CFG["tiny_grpo"]:
        policy = models.student_from_config(tok, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                                            intermediate_size=128, seed=0)
    else:
        policy = copy.deepcopy(start_model)
    lora = LoraConfig(**{**LORA, "r": 8, "lora_alpha": 16})
    trainer = reasoning.grpo_trainer(
        policy, tok, grpo_rows, [reward], peft_config=lora, shots=shots, loss_type="grpo", beta=CFG["beta"],
        num_generations=CFG["grpo_gens"], per_device_train_batch_size=CFG["grpo_batch"],
        max_completion_length=CFG["grpo_tokens"], temperature=CFG["temperature"], learning_rate=CFG["grpo_lr"],
        max_steps=CFG["grpo_steps"], logging_steps=1, disable_tqdm=False)
    start = time.perf_counter()
    trainer.train()
    seconds = (time.perf_counter() - start) / CFG["grpo_steps"]
    logs = [h for h in trainer.state.log_history if "reward" in h]
    zero_std = [h.get("frac_reward_zero_std", float("nan")) for h in logs]
    # how far the policy moved: LoRA's B starts at zero, so its norm is the adapter's size; TRL logs
    # the per-token KL to the reference (the adapter switched off) at each step when beta > 0
    kl = [f"{h.get('kl', 0.0):.1e}" for h in logs]
    lora_b = torch.sqrt(sum((p.detach() ** 2).sum() for n, p in trainer.model.named_parameters()
                            if "lora_B" in n)).item()
    print(f"{name}: {CFG['grpo_steps']} steps, {seconds:.1f} s/step; mean reward per step "
          f"{[round(h['reward'], 2) for h in logs]}; zero-std groups {[round(z, 2) for z in zero_std]} "
          f"(mean {np.mean(zero_std):.2f}); KL to the start per step {kl}; "
          f"|LoRA B| {lora_b:.2e}")
    return trainer.model.merge_and_unload().eval(), logs, seconds


grpo_model, grpo_logs, GRPO_STEP_S = grpo_run(verifier_reward, cot_model, 0, "GRPO from CoT SFT, verifier reward")
control_model, control_logs, CONTROL_STEP_S = grpo_run(format_reward, model, 1, "GRPO from base, format-only reward")
fig, ax = plots.new_axes("GRPO training reward (per step)", "step", "mean reward of the batch")
ax.plot([h["reward"] for h in grpo_logs], marker="o", label="verifier reward (correct answer)")
ax.plot([h["reward"] for h in control_logs], marker="o", label="format-only reward")
ax.set_ylim(-0.05, 1.05)
ax.legend()
plt.show()

# %%
grpo = evaluate(grpo_model, "CoT SFT + GRPO", shots=0)
control = evaluate(control_model, "base + GRPO (format-only)", shots=1)
d_grpo = reasoning.paired_bootstrap(grpo["correct"], cot["correct"])
f_grpo = reasoning.paired_bootstrap(grpo["format"], cot["format"])
d_control = reasoning.paired_bootstrap(control["correct"], base["correct"])
f_control = reasoning.paired_bootstrap(control["format"], base["format"])
print(f"GRPO (verifier) - CoT SFT:      accuracy {d_grpo[0]:+.3f} [{d_grpo[1]:+.3f}, {d_grpo[2]:+.3f}]; "
      f"format compliance {f_grpo[0]:+.3f} [{f_grpo[1]:+.3f}, {f_grpo[2]:+.3f}]")
print(f"GRPO (format) - base (1-shot):  accuracy {d_control[0]:+.3f} [{d_control[1]:+.3f}, {d_control[2]:+.3f}]; "
      f"format compliance {f_control[0]:+.3f} [{f_control[1]:+.3f}, {f_control[2]:+.3f}]")
for after, before, label in [("CoT SFT + GRPO", "CoT SFT", "verifier run"),
                             ("base + GRPO (format-only)", "base (1-shot)", "format-only run")]:
    changed = sum(a != b for a, b in zip(RESULTS[after]["replies"], RESULTS[before]["replies"]))
    print(f"{label}: {changed} of {len(golds)} greedy held-out replies differ from {before}'s"
          + (" (ci: the policy was a tiny random Llama, not a copy of it)" if CFG["tiny_grpo"] else ""))

names = list(RESULTS)
summary = pd.DataFrame({
    "accuracy": [RESULTS[k]["correct"].mean() for k in names],
    "95% interval": ["[{:.3f}, {:.3f}]".format(*reasoning.wilson(int(RESULTS[k]["correct"].sum()), len(golds)))
                     for k in names],
    "format compliance": [RESULTS[k]["format"].mean() for k in names],
    "no answer": [RESULTS[k]["no_answer"].mean() for k in names]}, index=names)
display(summary.round(3))
fig, ax = plt.subplots(figsize=(8, 3.5))
x = np.arange(len(names))
ax.bar(x - 0.2, summary["accuracy"], 0.4, label="accuracy (verifier)", color="C0")
ax.bar(x + 0.2, summary["format compliance"], 0.4, label="format compliance", color="C7")
ax.set_xticks(x, [k.replace(" (", "\n(").replace(" + ", "\n+ ") for k in names], fontsize=8)
ax.set_ylim(0, 1.05)
ax.set_title(f"held-out problems (n = {len(golds)})")
ax.grid(alpha=0.3, axis="y")
ax.legend()
plt.show()

# %% [markdown]
# **Reading the two runs.** Look at four printed things, not at the training reward alone:
# - the **zero-std groups** per step: a group of `grpo_gens` samples that are all right or all wrong
#   has zero advantage everywhere and contributes nothing but the KL term. The verifier run wastes
#   every such group; the format-only control has fewer (compare the printed means), because the
#   format is easy to hit sometimes and miss sometimes. A dense, easy reward gives more gradient than
#   a sparse, correct one; that is exactly why it is tempting;
# - **whether the policy moved at all**, before reading "no change" as a finding: the KL to the
#   starting model and the adapter's size (LoRA's B starts at zero) say how far training went, and
#   the count of held-out greedy replies that differ says whether that was enough to change a single
#   argmax. A run whose KL is ~0 did not train; one that moved but changed no reply was too short;
# - the **paired differences** against each run's starting model, accuracy and format side by side:
#   a format reward can move format compliance while accuracy stays put or falls;
# - the interval: a handful of steps on two prompts per step is a small nudge, and an interval that
#   covers 0 says "no measurable change", not "GRPO does not work". The papers' gains come from
#   hundreds of steps with groups of 8 to 64.

# %% [markdown]
# **Seconds per GRPO step.** Each step above generated `grpo_batch` completions of up to
# `grpo_tokens` tokens with HF `generate` on 2 CPU cores, then ran the policy, the reference (the
# adapter switched off) and a backward pass over them. Generation dominates. On a GPU, TRL would
# generate with vLLM (`use_vllm=True`): continuous batching and paged attention make sampling
# dozens to hundreds of times faster, so the step cost moves to the forward and backward passes, and
# groups of 8 to 64 with hundreds of steps, the scale at which GRPO papers report gains, become
# affordable. That is a statement about the hardware, not something this notebook measured.

# %% [markdown]
# ## What we measured
#
# Every value below was computed in this run (the intervals are 95 %: Wilson for accuracies,
# paired bootstrap over problems for differences, bootstrap over problems for best-of-N).

# %%
rows = [
    {"quantity": "held-out problems", "value": len(golds), "unit": "problems",
     "note": "levels 1-3; unseen names, objects and phrasings"},
]
for k in names:
    lo, hi = reasoning.wilson(int(RESULTS[k]["correct"].sum()), len(golds))
    rows.append({"quantity": f"accuracy: {k}", "value": round(float(RESULTS[k]["correct"].mean()), 3),
                 "unit": "fraction", "note": f"95% [{lo:.3f}, {hi:.3f}]; format compliance "
                                             f"{RESULTS[k]['format'].mean():.3f}"})
rows += [
    {"quantity": "CoT SFT - answer-only SFT", "value": round(D_COT[0], 3), "unit": "accuracy",
     "note": f"paired, 95% [{D_COT[1]:+.3f}, {D_COT[2]:+.3f}]"},
    {"quantity": "GRPO (verifier) - CoT SFT", "value": round(d_grpo[0], 3), "unit": "accuracy",
     "note": f"paired, 95% [{d_grpo[1]:+.3f}, {d_grpo[2]:+.3f}]"},
    {"quantity": "GRPO (format-only) - base (1-shot)", "value": round(d_control[0], 3), "unit": "accuracy",
     "note": f"paired, 95% [{d_control[1]:+.3f}, {d_control[2]:+.3f}]"},
    {"quantity": "GRPO (format-only) - base (1-shot)", "value": round(f_control[0], 3), "unit": "format compliance",
     "note": f"paired, 95% [{f_control[1]:+.3f}, {f_control[2]:+.3f}]"},
    {"quantity": "PRM step AUC (held-out injected errors)", "value": round(PRM_AUC, 3), "unit": "AUC", "note": ""},
    {"quantity": "ORM outcome AUC (held-out injected errors)", "value": round(ORM_AUC, 3), "unit": "AUC", "note": ""},
]
for k in BON:
    for n in BON_SIZES:
        if n in (1, max(BON_SIZES)) or n == 8:
            m_, lo_, hi_ = BON[k][n]
            rows.append({"quantity": f"best-of-{n}: {k}", "value": round(m_, 3), "unit": "accuracy",
                         "note": f"{len(bon_rows)} problems, 95% [{lo_:.3f}, {hi_:.3f}]"})
    d, lo, hi = D_BON[k]
    rows.append({"quantity": f"best-of-{N_BIG} - best-of-1: {k}", "value": round(d, 3), "unit": "accuracy",
                 "note": f"paired over problems, 95% [{lo:+.3f}, {hi:+.3f}]"})
rows += [
    {"quantity": "SFT time (answer-only, CoT)", "value": f"{answer_seconds:.0f}, {cot_seconds:.0f}", "unit": "s",
     "note": f"{CFG['sft_steps']} steps x {CFG['sft_batch']}, LoRA r={CFG['lora_r']}, shared 2-core CPU"},
    {"quantity": "GRPO step (verifier, format)", "value": f"{GRPO_STEP_S:.1f}, {CONTROL_STEP_S:.1f}", "unit": "s/step",
     "note": f"{CFG['grpo_batch']} completions of <= {CFG['grpo_tokens']} tokens; "
             + ("tiny random Llama (ci)" if CFG["tiny_grpo"] else "135M + LoRA, CPU")},
    {"quantity": "sampling for best-of-N", "value": round(SAMPLE_SECONDS, 1), "unit": "s",
     "note": f"{len(flat_t)} samples"},
]
report.record_results("15_reasoning", BUDGET, rows)

# %% [markdown]
# ## What to take away
#
# - **Ground every claim in a verifier.** Accuracy here is a program's verdict on an exact answer,
#   with "no answer" counted wrong. Format compliance sits next to it in every table, and the two
#   move independently: the format-only control shows how a reward that formatting can earn gets
#   earned, and how little that says about the answers.
# - **Chain of thought buys computation with tokens.** The CoT model writes intermediate results it
#   can condition on; the answer-only model must do every step in one forward pass. Read the paired
#   interval, not the two accuracies, to decide whether the difference is real.
# - **A reward model is only as useful as its ranking.** A PRM scores each step, so in principle it can
#   pick the one sample whose steps all hold; in practice best-of-N gains only what the ranking
#   allows, whatever N is. The oracle line shows what the samples hold; each selector's best-of-8
#   minus best-of-1 (paired interval) shows how much of it a linear probe on frozen features
#   recovers. The AUCs were measured on injected errors, not on the model's own mistakes, so two
#   reward models with the same AUC can rank the model's samples very differently. Step labels came free from the generator here; in the wild they are the expensive part,
#   and labelling "in the generator's order" misjudges correct alternative solutions.
# - **GRPO is REINFORCE with a group baseline, a clip and a KL leash.** The group-relative advantage
#   needs no value network; a group whose rewards are all equal teaches nothing, so a task the
#   model always (or never) solves gives it nothing to learn from. A few CPU steps move little:
#   report what the run measured, with its interval, and not what the papers measured at a thousand times the compute.
# - **Honest caveats.** One seed, template-generated problems, a base model that solves few of them,
#   a linear-probe reward model on frozen features, a few GRPO steps on two prompts each. The held-out split differs in names, objects and phrasings, not in
#   kind of reasoning.
