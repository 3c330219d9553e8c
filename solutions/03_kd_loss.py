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
# # Lesson 3 — Knowledge distillation II: the KD loss
#
# In lesson 2 the teacher, SmolLM2-135M-Instruct, read every training text **once**. At every position it
# wrote down its *k* most likely next tokens and their log-probabilities, in `teacher_capture.jsonl`.
# This lesson turns that file into a training signal for a student a quarter of the teacher's size.
# Lesson 4 then checks whether the student is good enough to ship.
#
# Hinton, Vinyals and Dean (2015) wrote the loss down in one line:
#
# $$\mathcal{L} \;=\; \alpha\,\mathrm{CE}\big(y,\; q\big) \;+\; (1-\alpha)\,T^2\,\mathrm{KL}\big(p^{T} \,\big\|\, q^{T}\big)$$
#
# Here $y$ is the hard label (the token that actually came next), $q$ the student's next-token
# distribution and $p$ the teacher's. $p^T$ and $q^T$ are the same two distributions softened by a
# temperature $T$. Every symbol in that line is a design decision, and each one is a bug when it is
# wrong. Two of them fail silently: the loss still goes down when the KL points the wrong way or when
# the $T^2$ is missing.
#
# **You will build** (each exercise is graded on its own)
# 1. `softened_log_probs`: temperature-softened log-probabilities.
# 2. `kd_loss`: the loss above on full-vocabulary logits, with padding masked. It is checked against
#    `torch.nn.functional` and against TRL's distillation loss (`GKDTrainer.generalized_jsd_loss`).
# 3. `topk_kd_loss`: the same loss when all we have of the teacher is its captured top-*k*.
#
# **You will measure**, on the real model:
# - what temperature does to the teacher's distribution at the answer token;
# - why the $T^2$ is there (gradient norm against $T$, with and without it);
# - how far the top-*k* loss is from the full-vocabulary loss;
# - when KD beats labels: students cut from the teacher (one of its 30 layers, about 24 % of its
#   parameters), trained three ways from the same weights, three seeds each: cross-entropy on a few
#   hand-labelled texts, your top-*k* KD loss on the whole capture (soft labels where nobody labelled),
#   and cross-entropy on every label (the control); with the diagnostics that tell a training failure
#   from a finding. All are saved for lesson 4.

# %% id="parameters" tags=["parameters"]
import os
BUDGET = os.environ.get("BREWSLM_BUDGET", "full")

# %% id="setup" nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
# %matplotlib inline
import copy
import functools
import json
import os
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from brewslm_helpers import budget, capture, data, distill, evaluation, models, plots, report, students
from brewslm_helpers.paths import artifact_dir

try:  # TRL's distillation loss is the reference in test_kd_loss; importing it takes a few seconds,
    import trl.experimental.gkd  # noqa: F401  so do it here. (If the import fails, that test says so.)
except ImportError:
    pass

torch.manual_seed(0)
CFG = budget.pick(
    BUDGET,
    ci=dict(n_texts=8, capture_k=8, labels=4, seeds=[0], batch_size=4, steps=4, lr=1e-3, alpha=0.5, T=1.0,
            gold_rows=16, novel_rows=16, ablation_steps=2, t_grid=[1, 2, 4, 8], timing_texts=1, timing_steps=1,
            gap_texts=2),
    full=dict(n_texts=600, capture_k=16, labels=32, seeds=[0, 1, 2], batch_size=8, steps=400, lr=1e-3, alpha=0.5,
              T=1.0, gold_rows=120, novel_rows=80, ablation_steps=150, t_grid=[1, 1.5, 2, 3, 4, 6, 8, 12, 16],
              timing_texts=8, timing_steps=3, gap_texts=16),
)
STUDENT_LAYERS = [0]  # the teacher layer the student keeps (section 5 says why)

teacher, tok = models.load_teacher()
TEACHER_PARAMS = teacher.num_parameters()
VOCAB = teacher.config.vocab_size
print(f"budget {BUDGET}: {CFG}")
print(f"teacher {models.MODEL_NAME}: {TEACHER_PARAMS:,} parameters, vocabulary {VOCAB:,}")

# %% [markdown] id="capture-idea"
# ## 1. The input: lesson 2's capture, checked before it is trusted
#
# Lesson 2 wrote `teacher_capture.jsonl` to `artifact_dir(BUDGET)`; its schema is in
# `brewslm_helpers/distill.py`. We read it with plain `json`. Reading it is lesson 2's exercise, and
# lessons don't import each other's answers. Then we check before using it. A stale or foreign capture
# does not crash anything: the student quietly learns to imitate the wrong thing. So:
#
# 1. every record has the schema's keys, one *k*, and *T* rows of *k* entries;
# 2. the teacher named in the file is ours, and its **tokenizer fingerprint** equals
#    `capture.tokenizer_fingerprint(tok)` (the same-tokenizer assumption, checked);
# 3. the `input_ids` are today's tokenization of those training rows (the data or the chat template
#    may have changed since the file was written);
# 4. a spot check: our teacher recomputes the first record's log-probabilities at its top-k ids.
#
# If any check fails, the next cell says which and **recreates the capture** with plain code: a teacher
# forward pass, `torch.topk` on `log_softmax`, one JSON line per text, written atomically. That way the
# notebook also runs from a fresh clone.

# %% id="capture-load"
CAPTURE_PATH = artifact_dir(BUDGET) / distill.CAPTURE_FILE
FINGERPRINT = capture.tokenizer_fingerprint(tok)
TRAIN_BY_ID = {row["id"]: row for row in data.load_reviews("train")}


@functools.lru_cache(maxsize=4)
def teacher_logits(ids: tuple) -> torch.Tensor:
    """The teacher's logits [T, V] (float32) for one token-id sequence (cached: reused by later demos)."""
    with torch.no_grad():
        return teacher(input_ids=torch.tensor([list(ids)])).logits[0].float()


def capture_problems(records: list[dict]) -> list[str]:
    """Reasons why these capture records cannot be used here ([] if they can)."""
    if not records:
        return ["the file holds no record"]
    for n, r in enumerate(records):
        missing = [key for key in capture.CAPTURE_KEYS if key not in r]
        if missing:
            return [f"record {n} lacks {missing}"]
    problems = []
    if {r["teacher"] for r in records} != {models.MODEL_NAME}:
        problems.append(f"made by teacher(s) {sorted({str(r['teacher']) for r in records})}, not {models.MODEL_NAME}")
    fingerprints = {r["tokenizer_fingerprint"] for r in records}
    if fingerprints != {FINGERPRINT}:
        problems.append(f"made with another tokenizer: fingerprint(s) {sorted(f[:19] + '...' for f in fingerprints)}, "
                        f"ours is {FINGERPRINT[:19]}...")
    if len({r["k"] for r in records}) != 1:
        problems.append(f"mixes several k: {sorted({r['k'] for r in records})}")
    for n, r in enumerate(records):
        T_len, k = len(r["input_ids"]), r["k"]
        if (len(r["topk_ids"]) != T_len or len(r["topk_logprobs"]) != T_len
                or any(len(row) != k for row in r["topk_ids"]) or any(len(row) != k for row in r["topk_logprobs"])):
            problems.append(f"record {n} ({r['id']}): topk_ids/topk_logprobs are not {T_len} x {k}")
            break
    if problems:
        return problems
    rows = [TRAIN_BY_ID.get(r["id"]) for r in records]
    if any(row is None for row in rows):
        return ["some ids are not rows of the train split"]
    if distill.kd_token_ids(tok, rows) != [r["input_ids"] for r in records]:
        return ["its input_ids are not today's tokenization of those rows (stale: data or chat template changed)"]
    first = records[0]
    logprobs = torch.log_softmax(teacher_logits(tuple(first["input_ids"])), -1)
    recomputed = logprobs.gather(-1, torch.tensor(first["topk_ids"]))
    err = float((recomputed - torch.tensor(first["topk_logprobs"])).abs().max())
    if err > 1e-3:
        problems.append(f"our teacher's log-probs differ from the file's by up to {err:.3g} nats (another teacher?)")
    return problems


records, problems = [], []
if not CAPTURE_PATH.exists():
    problems = [f"{CAPTURE_PATH} does not exist (lesson 2 has not run at budget {BUDGET!r})"]
else:
    try:
        with open(CAPTURE_PATH) as f:
            records = [json.loads(line) for line in f if line.strip()]
        records = records[:CFG["n_texts"]]
        problems = capture_problems(records)
    except (json.JSONDecodeError, TypeError, KeyError, ValueError) as e:
        problems = [f"unreadable: {type(e).__name__}: {e}"]
if problems:
    CAPTURE_SOURCE = "recreated here"
    print("The capture at", CAPTURE_PATH, "is NOT used:\n  - " + "\n  - ".join(problems))
else:
    CAPTURE_SOURCE = "lesson 2"
    print(f"Using lesson 2's capture: {CAPTURE_PATH} ({len(records)} texts, k = {records[0]['k']}); all checks passed.")

# %% id="capture-recreate"
# RECREATE THE CAPTURE (plain code, only when the check above failed): one teacher pass over the
# training texts, torch.topk on log_softmax, the schema of brewslm_helpers/distill.py, plain json.
if problems:
    rows = distill.load_kd_rows(CFG["n_texts"])
    sequences = distill.kd_token_ids(tok, rows)
    k = CFG["capture_k"]
    records = []
    start = time.perf_counter()
    for chunk in tqdm(distill.batches(list(zip(rows, sequences)), 8), desc="teacher capture"):
        batch = distill.collate([seq for _, seq in chunk], tok.pad_token_id)
        with torch.no_grad():
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        top_lp, top_ids = torch.log_softmax(logits.float(), -1).topk(k, dim=-1)
        for b, (row, seq) in enumerate(chunk):
            n = len(seq)
            records.append({"id": row["id"], "input_ids": seq, "k": k,
                            "topk_ids": top_ids[b, :n].tolist(), "topk_logprobs": top_lp[b, :n].tolist(),
                            "covered_mass": top_lp[b, :n].exp().sum(-1).tolist(),
                            "tokenizer_fingerprint": FINGERPRINT, "teacher": models.MODEL_NAME})
    tmp = CAPTURE_PATH.with_name(CAPTURE_PATH.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, CAPTURE_PATH)
    still = capture_problems(records)
    assert not still, still
    print(f"recreated {CAPTURE_PATH}: {len(records)} texts, k = {k}, in {time.perf_counter() - start:.0f} s")
K = records[0]["k"]
covered = np.concatenate([r["covered_mass"] for r in records])
print(f"capture from {CAPTURE_SOURCE}: {len(records)} texts, k = {K}, "
      f"covered mass per position: mean {covered.mean():.3f}, 10th percentile {np.percentile(covered, 10):.3f}")


# %% [markdown] id="temperature-idea"
# ## 2. Softened distributions: the temperature
#
# A language model's last layer produces one score (logit) $z_v$ per vocabulary token. The softmax turns
# the scores into probabilities. Dividing the logits by a **temperature** $T$ first gives
#
# $$p_v(T) \;=\; \frac{\exp(z_v / T)}{\sum_{u} \exp(z_u / T)} .$$
#
# $T = 1$ is the model's own distribution. $T > 1$ flattens it, and as $T \to \infty$ it tends to
# uniform. $T < 1$ sharpens it, towards the arg-max as $T \to 0$. The effect is easiest to see on the
# log-odds of two tokens: $\log(p_i/p_j) = (z_i - z_j)/T$. Temperature divides every log-odds by $T$ and
# keeps the ranking.
#
# **Why distillation needs it.** A trained teacher is often confident. At the answer position of a
# clearly positive review it may put 0.99 on " positive" and spread the last 0.01 over " negative", " great",
# " Positive" and so on. That small remainder is the **dark knowledge**: the teacher's ranking of the
# wrong answers, e.g. that " great" is a better wrong answer than " negative". At $T = 1$ it hardly
# affects a loss, because tokens with probability $10^{-4}$ contribute next to nothing to a KL
# divergence. At $T = 2$–$4$ the runners-up get visible probability, so the student is taught the
# ranking as well as the winner.
#
# **Caveat.** Temperature lifts everything in the tail, the junk included. Hinton et al. used large $T$
# on small MNIST networks. DistilBERT used $T = 2$. Many LLM recipes (TRL's GKD, MiniLLM) use $T = 1$.
# Treat $T$ as a hyperparameter; there is no universally right value.
#
# **Implementation.** Work in log space: `log_softmax(z / T)` is one numerically stable operation.
# `log(softmax(z / T))` is not. A probability that underflows to 0 becomes $-\infty$, and later
# $0 \cdot (-\infty)$ turns the KL into `nan`.

# %% id="ex-softened-log-probs" nbgrader={"grade": false, "grade_id": "ex_softened_log_probs", "locked": false, "schema_version": 3, "solution": true, "task": false}
def softened_log_probs(logits: torch.Tensor, T: float) -> torch.Tensor:
    """Log-probabilities of the temperature-softened distribution over the last axis.

    logits: [..., V] float tensor of raw scores z (any leading shape, e.g. [B, L, V] or [V]).
    T: the temperature, a float > 0. T = 1 gives the model's own distribution, T > 1 a flatter
       one, T < 1 a sharper one.
    Returns a [..., V] tensor of the same dtype: log softmax(z / T) along the last axis, so
    exp(result) sums to 1 over V. Compute it in log space in one stable step, with no
    log(0) = -inf where a probability underflows.
    """
    ### BEGIN SOLUTION
    return torch.log_softmax(logits / T, dim=-1)
    ### END SOLUTION


# %% id="test-softened-log-probs" nbgrader={"grade": true, "grade_id": "test_softened_log_probs", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
torch.manual_seed(0)
x = torch.randn(3, 5, 17) * 3
for T in (0.5, 1.0, 2.0, 4.0):
    out = softened_log_probs(x, T)
    assert out.shape == x.shape and out.dtype == x.dtype, (out.shape, out.dtype)
    assert torch.allclose(out, F.log_softmax(x / T, dim=-1), atol=1e-5), \
        f"T={T}: differs from torch.nn.functional.log_softmax(logits / T, dim=-1)"
    assert torch.allclose(out.exp().sum(-1), torch.ones(3, 5), atol=1e-5), "exp(result) must sum to 1"

# a higher temperature gives a flatter distribution: the entropy grows with T
entropies = [float(-(softened_log_probs(x, T).exp() * softened_log_probs(x, T)).sum(-1).mean())
             for T in (0.5, 1.0, 2.0, 4.0, 8.0)]
assert all(a < b for a, b in zip(entropies, entropies[1:])), f"entropy should grow with T: {entropies}"
print("softened_log_probs: OK")
### BEGIN HIDDEN TESTS
# extreme logits: every value stays finite (no log(softmax) underflow to -inf)
big = torch.tensor([[0.0, -200.0, 50.0, 10.0], [300.0, -300.0, 0.0, 1.0]])
for T in (0.5, 1.0, 3.0):
    out = softened_log_probs(big, T)
    assert torch.isfinite(out).all(), f"T={T}: non-finite log-probabilities {out}"
    assert torch.allclose(out, F.log_softmax(big / T, dim=-1), atol=1e-4)
# a 1-D input, float64 kept, shift invariance
v = torch.randn(11, dtype=torch.float64)
assert softened_log_probs(v, 3.0).dtype == torch.float64
assert torch.allclose(softened_log_probs(v, 3.0), softened_log_probs(v + 100.0, 3.0), atol=1e-9)
assert torch.allclose(softened_log_probs(v, 3.0), F.log_softmax(v / 3.0, dim=-1), atol=1e-12)
# a very high temperature approaches the uniform distribution, a very low one the arg-max
assert torch.allclose(softened_log_probs(x, 1e4).exp(), torch.full_like(x, 1 / 17), atol=1e-3)
sharp = softened_log_probs(x, 1e-3).exp()
assert torch.equal(sharp.argmax(-1), x.argmax(-1)) and (sharp.max(-1).values > 0.99).all()
# differentiable
z = x.clone().requires_grad_(True)
softened_log_probs(z, 2.0)[..., 3].sum().backward()
assert z.grad is not None and torch.isfinite(z.grad).all()
### END HIDDEN TESTS

# %% [markdown] id="temperature-demo-intro"
# **On the real teacher.** We take the first text of the capture, run the teacher over it, and look at
# the position where it chooses the answer word, the token after *"This review is"*. Then we soften
# that distribution at a few temperatures with your function. The last bar is everything outside the
# 8 most likely tokens: about 49 thousand tokens together.

# %% id="temperature-demo"
ASSISTANT_HEADER = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]


def reply_start(input_ids: list[int]) -> int:
    """Index of the first token of the assistant's reply (just after the last assistant header)."""
    h = len(ASSISTANT_HEADER)
    for s in range(len(input_ids) - h, -1, -1):
        if input_ids[s:s + h] == ASSISTANT_HEADER:
            return s + h
    raise ValueError("this text has no assistant turn")


demo = records[0]
demo_ids = demo["input_ids"]
# the reply is "This review is <label>.<|im_end|>": the answer word is predicted at the position of " is"
answer_pos = reply_start(demo_ids) + len(tok("This review is", add_special_tokens=False)["input_ids"]) - 1
demo_logits = teacher_logits(tuple(demo_ids))[answer_pos]
captured_ids = torch.tensor(demo["topk_ids"][answer_pos])
print(f"review {demo['id']}: {TRAIN_BY_ID[demo['id']]['text']!r} (label: {TRAIN_BY_ID[demo['id']]['label']})")
print(f"next token to predict: {tok.decode(demo_ids[answer_pos + 1])!r}")

temps = [1.0, 2.0, 4.0]
top_ids = demo_logits.topk(8).indices
fig, ax = plots.new_axes("Teacher's next-token distribution after 'This review is'", "token",
                         "probability (log scale)", figsize=(9, 3.5))
width = 0.8 / len(temps)
for j, T in enumerate(temps):
    logp = softened_log_probs(demo_logits, T)
    probs = logp.exp()
    heights = probs[top_ids].tolist() + [1.0 - float(probs[top_ids].sum())]
    ax.bar(np.arange(9) + j * width, heights, width, label=f"T = {T:g}")
    entropy = float(-(probs * logp).sum())
    print(f"T = {T:g}: p(top-1) = {float(probs[top_ids[0]]):.3f}, the captured top-{len(captured_ids)} hold "
          f"{float(probs[captured_ids].sum()):.3f}, entropy {entropy:.2f} nats (uniform: ln V = {np.log(VOCAB):.2f})")
ax.set_xticks(np.arange(9) + width * (len(temps) - 1) / 2)
ax.set_xticklabels([repr(tok.decode([i])) for i in top_ids.tolist()] + [f"other {VOCAB - 8:,}"], rotation=30)
ax.set_yscale("log")
ax.legend()
plt.show()


# %% [markdown] id="temperature-demo-after"
# There are two things to read off this. The **ranking** is the same at every $T$; only the contrast
# changes. And on a 49,152-token vocabulary the **tail is huge**. Each of the ~49 thousand unlikely tokens
# gains only a little, but together they can take most of the mass already at $T = 2$: compare the
# entropy with $\ln V$, the entropy of the uniform distribution. Some of that tail is dark knowledge and
# most of it is junk. A top-*k* capture has none of it, and section 4 comes back to that. This is why
# LLM distillation usually runs at $T$ between 1 and 2, far below the values used on 10-class
# image models.

# %% [markdown] id="kd-idea"
# ## 3. The KD loss
#
# For one position, with student logits $z$, teacher logits $v$ and hard label $y$:
#
# $$\ell \;=\; \alpha\,\big(-\log q_y\big) \;+\; (1-\alpha)\,T^2 \sum_{w} p^T_w \big(\log p^T_w - \log q^T_w\big),
# \qquad q = \mathrm{softmax}(z),\; q^T = \mathrm{softmax}(z/T),\; p^T = \mathrm{softmax}(v/T).$$
#
# The batch loss is the **mean of $\ell$ over the real (unmasked) token positions**. Five decisions
# hide in that formula.
#
# **1. Two terms.** The hard-label term (at $T = 1$, the student's actual distribution) keeps the
# student tied to the data. This matters because the teacher is sometimes wrong: SmolLM2 misclassifies
# some of our gold reviews. The soft term transfers what the teacher believes. $\alpha$ trades one off
# against the other.
#
# **2. KL, and which way round.** $\mathrm{KL}(p\,\|\,q) = \sum_w p_w \log(p_w/q_w)$ is the soft
# cross-entropy $-\sum_w p_w \log q_w$ minus the teacher's entropy. The entropy does not depend on the
# student, so both give the same gradients. KL has the more readable value: 0 when the student matches
# the teacher. The direction matters:
# - **Forward** $\mathrm{KL}(p_\text{teacher}\,\|\,q_\text{student})$ averages under the *teacher*.
#   Wherever the teacher puts mass, a student that puts little there pays heavily, so it learns to
#   cover all of the teacher's plausible tokens ("mode-covering"). This is Hinton's KD, and the right
#   default when you distill on fixed texts.
# - **Reverse** $\mathrm{KL}(q\,\|\,p)$ averages under the *student*. It punishes mass where the teacher
#   has none, so the student concentrates on one mode ("mode-seeking"). MiniLLM and on-policy GKD argue
#   for it when the student generates its own text. It is a different objective, not a drop-in swap.
#
# `torch.nn.functional.kl_div(input, target)` computes $\mathrm{KL}(\text{target}\,\|\,\text{input})$
# with `input` in log space. That argument order is the most common distillation bug, and the loss
# still goes down when you get it wrong.
#
# **3. The temperature** softens both distributions in the KL term and never the hard-label term.
#
# **4. Why $T^2$.** Differentiate the soft term with respect to a student logit:
# $\partial\,\mathrm{KL}(p^T\|q^T)/\partial z_i = (q^T_i - p^T_i)/T$. For large $T$,
# $q^T_i - p^T_i \approx (z_i - v_i)/(V\,T)$ (with zero-mean logits), so the soft term's gradients
# **shrink as $1/T^2$**. Without correction, raising $T$ to get more dark knowledge would also quietly
# turn the soft term down relative to the hard one, mixing up two knobs. Multiplying by $T^2$ keeps the
# soft term's gradients at the same scale as you change $T$ (Hinton et al., 2015, §2), at least in that
# large-$T$ regime. Section 3b measures it, and how far real LLM logits are from that regime.
#
# **5. Masking and the mean.** `labels` come pre-shifted from `distill.collate`: `labels[b, t]` is the
# target of `logits[b, t]`, and `-100` marks padding and the last token, which have nothing to predict.
# *Both* terms skip those positions. The usual mistake is to mask the cross-entropy (which
# `F.cross_entropy` does for you) and then average the KL over every position, padding included. We
# average over the real tokens of the whole batch (TRL does the same). Averaging per sequence first
# would weight short sequences more.
#
# **The teacher is a constant.** Its logits carry no gradient. Detach them: if you distill online (the
# teacher running next to the student), also run the teacher under `torch.no_grad()`, or autograd keeps
# its whole graph in memory.
#
# **Reference.** TRL's `GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels,
# beta=0, temperature=T)` is this KL term (forward KL, temperature on both sides, mean over unmasked
# tokens) *without* the $T^2$ and without the hard-label term. The test checks your loss against it.

# %% id="ex-kd-loss" nbgrader={"grade": false, "grade_id": "ex_kd_loss", "locked": false, "schema_version": 3, "solution": true, "task": false}
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            alpha: float, T: float) -> torch.Tensor:
    """Hinton's distillation loss on full-vocabulary logits, averaged over the unmasked tokens.

        loss = alpha * CE(hard labels, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

    student_logits: [B, L, V] float, the student's raw scores (the loss is differentiated w.r.t. these).
    teacher_logits: [B, L, V] float, the teacher's raw scores at the same positions (a constant).
    labels: [B, L] long, already shifted: labels[b, t] is the target token of position t, and
        -100 marks positions with no target (padding, the last token). Both terms ignore them.
    alpha: weight of the hard-label term, in [0, 1].  T: temperature, > 0.
    The CE term uses the student at temperature 1. The KL term compares the temperature-T
    distributions, per position, summed over the vocabulary:
        KL = sum_w p_w * (log p_w - log q_w), p = softmax(teacher / T), q = softmax(student / T).
    Each term is the mean over all unmasked positions of the batch; with no unmasked position the
    loss is 0.
    Returns a scalar tensor, in nats. (Write it with torch ops: do not call softened_log_probs.)
    """
    ### BEGIN SOLUTION
    mask = labels != -100
    n_tokens = mask.sum().clamp_min(1)
    V = student_logits.shape[-1]
    ce = F.cross_entropy(student_logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100,
                         reduction="sum") / n_tokens
    log_q = torch.log_softmax(student_logits / T, dim=-1)
    log_p = torch.log_softmax(teacher_logits.detach() / T, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [B, L]: one KL per position
    kl = kl.masked_fill(~mask, 0.0).sum() / n_tokens
    return alpha * ce + (1 - alpha) * T ** 2 * kl
    ### END SOLUTION


# %% id="test-kd-loss" nbgrader={"grade": true, "grade_id": "test_kd_loss", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
torch.manual_seed(0)
B, L, V = 2, 6, 13
s = torch.randn(B, L, V) * 2
t = torch.randn(B, L, V) * 2
labels = torch.randint(0, V, (B, L))
labels[0, 4:] = -100  # padding
labels[1, -1] = -100  # last token: nothing to predict


def reference_kd(s, t, labels, alpha, T):
    """The same loss, written with torch.nn.functional's reference ops."""
    ce = F.cross_entropy(s.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                  reduction="none").sum(-1)  # KL(teacher_T || student_T) per position
    return alpha * ce + (1 - alpha) * T ** 2 * kl[labels != -100].mean()


for alpha, T in [(0.5, 2.0), (0.0, 1.0), (0.0, 3.0), (1.0, 3.0), (0.3, 4.0)]:
    got = kd_loss(s, t, labels, alpha, T)
    want = reference_kd(s, t, labels, alpha, T)
    assert got.shape == (), f"kd_loss must return a scalar, got shape {tuple(got.shape)}"
    assert torch.allclose(got, want, atol=1e-5), f"alpha={alpha}, T={T}: {got.item():.6f} != {want.item():.6f}"
# alpha = 1 is plain cross-entropy; a student equal to its teacher has no soft loss
assert torch.allclose(kd_loss(s, t, labels, 1.0, 2.0),
                      F.cross_entropy(s.reshape(-1, V), labels.reshape(-1), ignore_index=-100), atol=1e-6)
assert abs(kd_loss(t, t, labels, 0.0, 2.0).item()) < 1e-6

# TRL's distillation loss: generalized_jsd_loss with beta=0 is the forward KL(teacher_T || student_T),
# averaged over unmasked tokens, without the T^2 factor
import trl
try:
    from trl.experimental.gkd import GKDTrainer
except ImportError as e:
    raise AssertionError(
        f"TRL {trl.__version__} has no trl.experimental.gkd.GKDTrainer ({e}): the reference moved; "
        "update this check to TRL's new location of generalized_jsd_loss") from None
for T in (1.0, 2.0, 5.0):
    trl_kl = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=0.0, temperature=T,
                                             reduction="batchmean")
    ours = kd_loss(s, t, labels, 0.0, T)
    assert torch.allclose(ours, T ** 2 * trl_kl, atol=1e-5), \
        f"T={T}: kd_loss(alpha=0) = {ours.item():.6f}, expected T^2 * TRL's KL = {(T ** 2 * trl_kl).item():.6f}"
print("kd_loss: OK (matches torch.nn.functional and TRL's generalized_jsd_loss)")
### BEGIN HIDDEN TESTS
mask = labels != -100
# what sits at masked positions must not matter, in either term
s2, t2 = s.clone(), t.clone()
s2[~mask] = torch.randn(int((~mask).sum()), V) * 10
t2[~mask] = torch.randn(int((~mask).sum()), V) * 10
for alpha, T in [(0.0, 2.0), (0.5, 1.0)]:
    assert torch.allclose(kd_loss(s2, t2, labels, alpha, T), kd_loss(s, t, labels, alpha, T), atol=1e-5), \
        "the loss changed when only masked (-100) positions changed"
# nothing unmasked: a zero loss, not nan
none = torch.full((B, L), -100)
z0 = kd_loss(s, t, none, 0.5, 2.0)
assert torch.isfinite(z0) and abs(z0.item()) < 1e-7, f"all positions masked: expected 0, got {z0}"
# gradient w.r.t. the student logits: T * (q_T - p_T) / N at unmasked positions, 0 elsewhere
for T in (1.0, 4.0):
    z = s.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kd_loss(z, t, labels, 0.0, T), z)
    want = T * (F.softmax(s / T, -1) - F.softmax(t / T, -1)) / mask.sum()
    want[~mask] = 0
    assert torch.allclose(g, want, atol=1e-6), f"T={T}: wrong gradient"
# large logits stay finite; another shape; the KL is not symmetric, the direction is checked
big_s, big_t = torch.randn(1, 3, 40) * 60, torch.randn(1, 3, 40) * 60
lab = torch.tensor([[1, 2, -100]])
for alpha, T in [(0.2, 1.0), (0.7, 3.0)]:
    got = kd_loss(big_s, big_t, lab, alpha, T)
    ce = F.cross_entropy(big_s.reshape(-1, 40), lab.reshape(-1), ignore_index=-100)
    kl = F.kl_div(F.log_softmax(big_s / T, -1), F.log_softmax(big_t / T, -1), log_target=True,
                  reduction="none").sum(-1)[lab != -100].mean()
    assert torch.isfinite(got) and torch.allclose(got, alpha * ce + (1 - alpha) * T ** 2 * kl, rtol=1e-4, atol=1e-4)
### END HIDDEN TESTS

# %% [markdown] id="t2-idea"
# ### 3b. Why $T^2$, measured
#
# We measure the norm of the soft term's gradient with respect to the student's logits at several
# temperatures, using your `kd_loss` with `alpha = 0`. Each point is computed twice: as is (with $T^2$)
# and divided by $T^2$ (the loss without the factor). There are two settings:
#
# - **(a) the regime of Hinton's argument**, a toy: small, zero-mean random logits ($\sigma = 1$) over a
#   1,000-token vocabulary;
# - **(b) the real thing**: the teacher's logits on the capture's first text against those of an
#   untrained cut student (the student of section 5).
#
# The dashed line is the gradient norm of the hard-label term alone, which is what the soft term
# competes with.

# %% id="t2-plot"
def logit_grad_norm(student_logits, teacher_logits, labels, alpha, T):
    """Norm of d kd_loss / d student_logits."""
    z = student_logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kd_loss(z, teacher_logits, labels, alpha, T), z)
    return float(g.norm())


init_student = models.cut_student(teacher, STUDENT_LAYERS)
real_labels = distill.collate([demo_ids], tok.pad_token_id)["labels"]
with torch.no_grad():
    real_student = init_student(input_ids=torch.tensor([demo_ids])).logits.float()
real_teacher = teacher_logits(tuple(demo_ids)).unsqueeze(0)
gen = torch.Generator().manual_seed(0)
toy_student, toy_teacher = torch.randn(1, 16, 1000, generator=gen), torch.randn(1, 16, 1000, generator=gen)
toy_labels = torch.randint(0, 1000, (1, 16), generator=gen)

settings = {
    "(a) toy: zero-mean logits, sigma = 1, V = 1,000": (toy_student, toy_teacher, toy_labels, [1, 2, 4, 8, 16, 32, 64]),
    "(b) SmolLM2 teacher vs untrained cut student": (real_student, real_teacher, real_labels, CFG["t_grid"]),
}
GRAD = {}
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for ax, (title, (s_, t_, labels_, grid)) in zip(axes, settings.items()):
    grid = np.array(grid, dtype=float)
    with_t2 = np.array([logit_grad_norm(s_, t_, labels_, 0.0, T) for T in grid])
    without_t2 = with_t2 / grid ** 2
    ce_norm = logit_grad_norm(s_, t_, labels_, 1.0, 1.0)
    GRAD[title[:3]] = (grid, with_t2, without_t2)
    ax.loglog(grid, with_t2, "o-", label="T² · KL")
    ax.loglog(grid, without_t2, "s-", label="KL alone (no T²)")
    ax.loglog(grid, without_t2[0] / grid ** 2, "k:", label="∝ 1/T² guide")
    ax.axhline(ce_norm, color="grey", ls="--", label="hard-label CE term")
    ax.set_title(title, fontsize=10)
    ax.set_xticks(grid)
    ax.set_xticklabels([f"{T:g}" for T in grid])
    ax.minorticks_off()
    ax.set_xlabel("temperature T")
    ax.set_ylabel("gradient norm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
plt.show()
for key, (grid, with_t2, without_t2) in GRAD.items():
    print(f"{key} gradient norm at T={grid[-1]:g} relative to T=1: without T^2 x{without_t2[-1] / without_t2[0]:.3g}, "
          f"with T^2 x{with_t2[-1] / with_t2[0]:.3g}   (1/T^2 = {1 / grid[-1] ** 2:.3g})")
T_HI = float(GRAD["(b)"][0][-1])
grad_ratio_without = float(GRAD["(b)"][2][-1] / GRAD["(b)"][2][0])
grad_ratio_with = float(GRAD["(b)"][1][-1] / GRAD["(b)"][1][0])
toy_ratio_with = float(GRAD["(a)"][1][-1] / GRAD["(a)"][1][0])


# %% [markdown] id="t2-after"
# **(a) is the textbook picture.** Without the factor the gradient follows the $1/T^2$ guide. With it,
# the gradient levels off at a constant once $T$ is large compared with the spread of the logits.
#
# **(b) is what you meet in practice, and it is less tidy.** The $T^2 \cdot$KL curve still falls. The
# teacher's logits span tens of nats, so $T$ from 1 to 16 is nowhere near the large-$T$ limit, and the
# softened distributions spread their difference over 49 thousand tokens. The factor still does its job
# in both panels: it removes the $1/T^2$ part. Without it, the soft term's gradient at high $T$ would be
# another $T^2$ times smaller (the gap between the two curves), and "raise $T$" would quietly switch the
# teacher off. So keep the $T^2$, but don't expect it to make $T$ a free knob on LLM logits. Changing
# $T$ still changes how much the teacher weighs against the hard labels: tune `alpha` and `T` together.

# %% [markdown] id="topk-idea"
# ## 4. The KD loss on the captured top-k
#
# A full teacher distribution is 49,152 numbers per position. Lesson 2 kept the top *k* (8 at `ci`,
# 16 at `full`): their ids and their log-probabilities $\ell_j = \log p_{\text{id}_j}$ under the teacher's
# **full** softmax at $T = 1$. On the k ids those probabilities sum to the *covered mass*, which is
# below 1. So the loss needs two explicit decisions about the missing tail.
#
# **The teacher: renormalise over the k ids, at temperature $T$.**
# $$\tilde p_j \;=\; \frac{\exp(\ell_j / T)}{\sum_{i=1}^{k} \exp(\ell_i / T)} .$$
# Because $\ell_j = v_j - \log Z$, the constant $\log Z$ cancels. This is *exactly* the softened
# teacher $\mathrm{softmax}(v/T)$ restricted to the k ids and renormalised, so we can apply the
# temperature afterwards without the teacher's logits. What we lose is the tail: we pretend the teacher
# puts no mass outside its top-k. Using $\exp(\ell_j/T)$ as is, without renormalising, is wrong twice:
# it does not sum to 1, and at $T \ne 1$ it is not even proportional to the softened teacher's
# probabilities.
#
# **The student: its full-vocabulary distribution, read at the k ids.**
# $\log q^T_{\text{id}_j} = \big[\log\mathrm{softmax}(z/T)\big]_{\text{id}_j}$, **not** renormalised
# over the k. Then
#
# $$\mathrm{KL}\big(\tilde p\,\|\,q^T\big) \;=\; \sum_{j=1}^{k} \tilde p_j \big(\log \tilde p_j - \log q^T_{\text{id}_j}\big)$$
#
# is a true KL divergence ($\tilde p$ is zero off the k ids). It is $\ge 0$, and 0 only when the student
# puts exactly $\tilde p$ on the k ids and nothing anywhere else. Mass the student spends on other
# tokens lowers $q^T$ at the k ids and is paid for. If you renormalised the student over the k ids as
# well, that mass would cost nothing and the student could spend it on junk.
#
# The hard-label term, the $T^2$, the masking and the mean are as in `kd_loss`. With $k = V$ (the
# whole vocabulary captured) this loss *is* `kd_loss`, and the test checks exactly that.
#
# **The honest caveat.** $\tilde p$ overstates the teacher's confidence in its top-k. The bigger $T$,
# the more mass the dropped tail would have received, so the error grows with $T$ and shrinks with $k$
# and the covered mass. Alternatives: add a $(k{+}1)$-th "everything else" bucket with mass
# $1 - \text{covered}$, matched against the student's mass outside the top-k; capture a bigger $k$; or
# sample tokens from the teacher instead of taking its top-k. Section 6 measures the gap on real data.

# %% id="ex-topk-kd-loss" nbgrader={"grade": false, "grade_id": "ex_topk_kd_loss", "locked": false, "schema_version": 3, "solution": true, "task": false}
def topk_kd_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                 labels: torch.Tensor, alpha: float, T: float) -> torch.Tensor:
    """The KD loss of kd_loss when the teacher is known only on its captured top-k tokens.

    student_logits: [B, L, V] float, the student's raw scores.
    topk_ids: [B, L, k] long, the teacher's k most likely next tokens at each position.
    topk_logprobs: [B, L, k] float, the teacher's log-probabilities of those tokens under its FULL
        softmax at temperature 1, as captured (over the k ids they sum to less than 1).
    labels: [B, L] long, shifted hard targets; -100 = no target (as in kd_loss).
    alpha: weight of the hard-label term, in [0, 1].  T: temperature, > 0.
    Teacher side: renormalised over the k ids at temperature T,
        p_j = exp(lp_j / T) / sum_i exp(lp_i / T)   (lp = the captured log-probs; sums to 1).
    Student side: log of its FULL-vocabulary softmax at temperature T, read at the k ids (not
        renormalised over the k).
    Per position: KL = sum_j p_j * (log p_j - log q_student[id_j]); the CE term is as in kd_loss.
        loss = alpha * CE + (1 - alpha) * T^2 * KL, each term the mean over unmasked positions
    (0 if none). Returns a scalar tensor, in nats. (Self-contained: do not call the other exercises.)
    """
    ### BEGIN SOLUTION
    mask = labels != -100
    n_tokens = mask.sum().clamp_min(1)
    V = student_logits.shape[-1]
    ce = F.cross_entropy(student_logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100,
                         reduction="sum") / n_tokens
    log_p = torch.log_softmax(topk_logprobs / T, dim=-1)  # teacher: renormalised over its k ids
    log_q = torch.log_softmax(student_logits / T, dim=-1).gather(-1, topk_ids)  # student: full softmax, at the k ids
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [B, L]
    kl = kl.masked_fill(~mask, 0.0).sum() / n_tokens
    return alpha * ce + (1 - alpha) * T ** 2 * kl
    ### END SOLUTION


# %% id="test-topk-kd-loss" nbgrader={"grade": true, "grade_id": "test_topk_kd_loss", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
torch.manual_seed(1)
B, L, V = 2, 5, 12
s = torch.randn(B, L, V) * 2
t = torch.randn(B, L, V) * 2
labels = torch.randint(0, V, (B, L))
labels[0, 3:] = -100
labels[1, -1] = -100


def full_vocab_kd(s, t, labels, alpha, T):
    """kd_loss's value, written independently with torch.nn.functional."""
    ce = F.cross_entropy(s.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                  reduction="none").sum(-1)
    return alpha * ce + (1 - alpha) * T ** 2 * kl[labels != -100].mean()


def capture_of(t, k):
    """What lesson 2's capture stores: top-k ids and their log-probs under the full softmax (T = 1)."""
    logprobs = F.log_softmax(t, -1)
    values, ids = logprobs.topk(k, dim=-1)
    return ids, values


# k = V: the capture holds the whole distribution, so the top-k loss is the full-vocabulary loss
ids, lps = capture_of(t, V)
for alpha, T in [(0.5, 2.0), (0.0, 1.0), (0.0, 3.0), (1.0, 2.0), (0.25, 4.0)]:
    got = topk_kd_loss(s, ids, lps, labels, alpha, T)
    want = full_vocab_kd(s, t, labels, alpha, T)
    assert got.shape == (), f"topk_kd_loss must return a scalar, got shape {tuple(got.shape)}"
    assert torch.allclose(got, want, atol=1e-5), \
        f"k=V, alpha={alpha}, T={T}: {got.item():.6f} != full-vocabulary KD {want.item():.6f}"

# k < V: the teacher renormalised over its k ids at temperature T, put back on the full vocabulary
# (zero elsewhere), against the student's full-vocabulary softmax
k = 4
ids, lps = capture_of(t, k)
for alpha, T in [(0.0, 1.0), (0.0, 2.0), (0.5, 3.0)]:
    p_full = torch.zeros(B, L, V).scatter(-1, ids, F.softmax(lps / T, -1))
    kl = F.kl_div(F.log_softmax(s / T, -1), p_full, reduction="none").sum(-1)
    ce = F.cross_entropy(s.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    want = alpha * ce + (1 - alpha) * T ** 2 * kl[labels != -100].mean()
    got = topk_kd_loss(s, ids, lps, labels, alpha, T)
    assert torch.allclose(got, want, atol=1e-5), f"k={k}, alpha={alpha}, T={T}: {got.item():.6f} != {want.item():.6f}"
print("topk_kd_loss: OK")
### BEGIN HIDDEN TESTS
# the order of the k captured ids does not matter
perm = torch.randperm(k)
assert torch.allclose(topk_kd_loss(s, ids[..., perm], lps[..., perm], labels, 0.3, 2.0),
                      topk_kd_loss(s, ids, lps, labels, 0.3, 2.0), atol=1e-6)
# a student that is the renormalised teacher on the k ids (and ~nothing elsewhere) has ~0 soft loss;
# the same student with its tail mass raised pays for it
T = 2.0
match = torch.full((B, L, V), -1e4).scatter(-1, ids, lps)  # softmax(match / T) = renormalised teacher
assert abs(topk_kd_loss(match, ids, lps, labels, 0.0, T).item()) < 1e-5
leaky = torch.zeros(B, L, V).scatter(-1, ids, lps)
assert topk_kd_loss(leaky, ids, lps, labels, 0.0, T).item() > 0.1, \
    "student mass outside the teacher's top-k must cost something (do not renormalise the student)"
# padded positions as distill.collate_capture leaves them (id 0, log-prob 0) do not matter
ids2, lps2 = ids.clone(), lps.clone()
mask = labels != -100
ids2[~mask], lps2[~mask] = 0, 0.0
assert torch.allclose(topk_kd_loss(s, ids2, lps2, labels, 0.5, 2.0), topk_kd_loss(s, ids, lps, labels, 0.5, 2.0), atol=1e-6)
# nothing unmasked: a zero loss, not nan
z0 = topk_kd_loss(s, ids, lps, torch.full((B, L), -100), 0.5, 2.0)
assert torch.isfinite(z0) and abs(z0.item()) < 1e-7
# KL part is non-negative; large logits stay finite; the gradient flows to the student only
for T in (1.0, 4.0):
    assert topk_kd_loss(s, ids, lps, labels, 0.0, T).item() >= -1e-6
big = torch.randn(B, L, V) * 80
assert torch.isfinite(topk_kd_loss(big, ids, lps, labels, 0.5, 1.0))
z = s.clone().requires_grad_(True)
topk_kd_loss(z, ids, lps, labels, 0.5, 2.0).backward()
assert z.grad is not None and torch.isfinite(z.grad).all() and (z.grad[~mask] == 0).all()
### END HIDDEN TESTS

# %% [markdown] id="student-idea"
# ## 5. The student, and three ways to train it
#
# **Size.** `models.cut_student(teacher, [0])` keeps the teacher's token embeddings (tied with the output
# layer), **one** of its 30 decoder layers and its final norm. This is layer dropping, the way DistilBERT
# initialised its student. The student uses the teacher's tokenizer by construction, so every id in the
# capture means the same token to both. Its size as a fraction of the teacher's is computed below. Most
# of it is the 49,152 × 576 embedding matrix, which the layer cut cannot shrink. Layer 0 is the layer
# the teacher trained on raw token embeddings, which is what the student's only layer reads.
#
# **The situation KD is for.** Lesson 2's teacher read every training text once, and nobody had to
# label them for that. Hand labels are the expensive part: here only `CFG["labels"]` of the texts
# (32 at `full`, half of each sentiment) have one. Three arms, each a copy of the same cut model, with
# the same number of steps, batch size and learning rate:
#
# | arm | trains on | loss |
# |---|---|---|
# | **CE, few labels** (`ce_few`) | the 32 labelled texts | cross-entropy on the label |
# | **KD on the capture** (`kd`) | all the capture's texts | your `topk_kd_loss`: with `alpha` where there is a label, `alpha = 0` (the KL alone) where there is none |
# | **CE, all labels** (`ce_all`) | every text, all labelled | cross-entropy: the control. With plenty of labels, is KD still needed? |
#
# **Which position.** The reply is `This review is positive.<|im_end|>`. Only one of its positions
# says anything about the review: the one after *"This review is"*, where the teacher chooses the
# answer word (section 2's plot). The other reply positions predict a fixed wording. And for a text
# nobody labelled, every position *after* the answer word has the capture's own reply in its context,
# a reply lesson 2 wrote with the true label: distilling there would leak the label. So the default is
# the **answer position only**: its context is the review and the fixed prefix, nothing else. The
# ablation in section 6 distils the reply up to the answer instead. `students.arm_batches` marks the
# positions (`hard`: a human label is in play; `soft`: none is), `students.arm_loss` applies your loss,
# `students.train_arm` runs the steps. Read them: they are a dozen lines each.
#
# **Frozen embeddings.** The embedding matrix is most of the student's parameters (the cell below
# prints the share). We freeze it: a step skips its weight gradient and its AdamW update (measured
# below), the student keeps the teacher's token space, the one the captured top-k ids refer to, and a
# few hundred steps could only overfit its 28 M parameters.
#
# **Hyperparameters.** `alpha = 0.5`, `T = 1` (the value TRL's GKD uses; section 2 showed that on a
# 49k vocabulary $T = 2$ already moves most of the softened mass into the tail, which the capture does
# not have), 400 steps of 8 texts at `full`. Three seeds: each draws its own 32 labelled texts and its
# own batch order, so the spread between seeds is what "which 32 texts got labelled" and "which order"
# are worth. Section 6 measures what fewer steps, the reply positions, $T = 2$ and `alpha = 0.9` change.

# %% id="student-setup"
def training_batches(records, batch_size):
    """Capture records -> distill.collate_capture batches, with the prompt's labels set to -100
    (every reply position: used to time a step and to measure the top-k gap)."""
    out = []
    for chunk in distill.batches(records, batch_size):
        batch = distill.collate_capture(chunk, tok.pad_token_id)
        reply = torch.zeros_like(batch["labels"], dtype=torch.bool)
        for b, r in enumerate(chunk):
            reply[b, reply_start(r["input_ids"]) - 1:] = True  # logits[t] predicts token t + 1
        batch["all_labels"] = batch["labels"]  # every position (used only to time the naive setup)
        batch["labels"] = batch["labels"].masked_fill(~reply, distill.IGNORE_INDEX)
        out.append(batch)
    return out


def reply_logits(model, batch):
    """The student's logits at the unmasked positions only, as [1, N, V], and the [B, L] mask used.

    The decoder runs on the whole text (the reply attends to the prompt); the output layer, the
    expensive part, runs on the N reply positions only."""
    keep = batch["labels"] != distill.IGNORE_INDEX
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return model.lm_head(hidden[keep]).unsqueeze(0), keep


ROWS = [TRAIN_BY_ID[r["id"]] for r in records]  # the review behind each capture record
init_student.model.embed_tokens.weight.requires_grad_(False)  # tied: freezes lm_head too
STUDENT_PARAMS = init_student.num_parameters()
TRAINABLE = sum(p.numel() for p in init_student.parameters() if p.requires_grad)
PARAM_RATIO = STUDENT_PARAMS / TEACHER_PARAMS
print(f"student: teacher layer(s) {STUDENT_LAYERS}, {STUDENT_PARAMS:,} parameters = {PARAM_RATIO:.1%} "
      f"of the teacher; {TRAINABLE:,} trainable with the embeddings frozen "
      f"(the embedding matrix is {1 - TRAINABLE / STUDENT_PARAMS:.1%} of the student)")
print(f"capture: {len(records)} texts; hand-labelled per seed: {CFG['labels']}; seeds {CFG['seeds']}; "
      f"{CFG['steps']} steps of {CFG['batch_size']} texts per arm")
assert PARAM_RATIO <= 0.25


# %% [markdown] id="timing-idea"
# **What a step costs.** We time a few optimiser steps on a batch of `CFG["timing_texts"]` texts. Each
# step is a forward pass, a backward pass and an AdamW update with the cross-entropy loss. We time
# three setups: all positions with trainable embeddings (the naive setup), reply positions only, and
# reply positions with the embeddings frozen. The arms train at one position per text with the
# embeddings frozen, cheaper still. Timings on a shared CPU are noisy; look at the ratios.

# %% id="timing"
def seconds_per_step(reply_only: bool, frozen: bool, n_steps: int) -> float:
    model = copy.deepcopy(init_student)
    model.model.embed_tokens.weight.requires_grad_(not frozen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=CFG["lr"])
    model.train()
    times = []
    batch = timing_batch
    for _ in range(n_steps + 1):  # the first step warms up and is not counted
        start = time.perf_counter()
        if reply_only:
            logits, keep = reply_logits(model, batch)
            loss = F.cross_entropy(logits[0], batch["labels"][keep])
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), batch["all_labels"].flatten(),
                                   ignore_index=distill.IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return float(np.mean(times[1:]))


timing_batch = training_batches(records[:CFG["timing_texts"]], CFG["timing_texts"])[0]
STEP_TIMES = {
    "all positions, embeddings trainable": seconds_per_step(False, False, CFG["timing_steps"]),
    "reply only, embeddings trainable": seconds_per_step(True, False, CFG["timing_steps"]),
    "reply only, embeddings frozen": seconds_per_step(True, True, CFG["timing_steps"]),
}
for name, sec in STEP_TIMES.items():
    print(f"{name:<38} {sec:6.2f} s/step")

# %% id="train"
gold = data.load_reviews("gold", CFG["gold_rows"])
novel = data.load_reviews("novel", CFG["novel_rows"])
TEACHER_EVAL = {"gold": evaluation.score_sentiment(teacher, tok, gold),
                "novel": evaluation.score_sentiment(teacher, tok, novel)}


def train_and_score(arm, seed, steps=CFG["steps"], positions="answer", T=CFG["T"], alpha=CFG["alpha"]):
    """Train one arm (same init, steps and batch size for all) and score it on gold and novel."""
    labelled = students.few_label_ids(ROWS, CFG["labels"], seed)
    batches = students.arm_batches(records, ROWS, tok, arm, labelled, steps, CFG["batch_size"], seed, positions)
    start = time.perf_counter()
    model, history = students.train_arm(init_student, batches, arm, topk_kd_loss, alpha, T, CFG["lr"], seed)
    seconds = time.perf_counter() - start
    return model, history, seconds, {split: evaluation.score_sentiment(model, tok, rows)
                                     for split, rows in (("gold", gold), ("novel", novel))}


trained, history, train_seconds, EVALS = {}, {}, {}, {}
for seed in CFG["seeds"]:
    for arm in students.ARMS:
        name = students.run_name(arm, seed)
        trained[name], history[name], train_seconds[name], EVALS[name] = train_and_score(arm, seed)
        print(f"{name:<14} {CFG['steps']} steps in {train_seconds[name]:4.0f} s, loss {history[name][0]:.3f} -> "
              f"{np.mean(history[name][-10:]):.3f}; gold {EVALS[name]['gold']['accuracy']:.3f}, "
              f"novel {EVALS[name]['novel']['accuracy']:.3f}")

# %% [markdown] id="diagnostics-idea"
# ## 6. Did the teacher's knowledge transfer? First, did training work?
#
# Accuracy alone hides the most common failure of a small classifier: a **constant predictor**, which
# answers "positive" to everything and scores exactly 0.5 on a balanced set. Before comparing arms,
# the diagnostics a practitioner looks at, per run, on gold:
#
# - **share of "positive" answers** (0.5 on this balanced set for a model that tracks the labels; a run
#   outside 0.2 .. 0.8 is flagged `COLLAPSED?`);
# - **agreement with the teacher**: how often the student gives the teacher's answer, what KD optimises;
# - **KL(teacher ‖ student)** over the two answers (P(positive) against P(negative), in nats): how close
#   the student's belief is to the teacher's, not just its argmax;
# - and, on **novel** reviews (opinion phrases and closing sentences that occur in no training text),
#   whether what the student learned carries beyond the phrasings it saw.
#
# All models are scored the same way (`evaluation.score_sentiment`: the log-probability of "This review
# is positive" against "... negative" as the reply, highest wins). Lesson 4 puts intervals on these
# numbers and decides; here we look.

# %% id="diagnostics"
def two_answer_kl(p_teacher, p_student):
    """Mean KL(teacher || student) over the two answers, nats; p_* = P(positive) per review."""
    p, q = np.clip(p_teacher, 1e-6, 1 - 1e-6), np.clip(p_student, 1e-6, 1 - 1e-6)
    return float(np.mean(p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))))


def diagnose(ev):
    g, t = ev["gold"], TEACHER_EVAL["gold"]
    share = float((g["p_positive"] > 0.5).mean())
    return {"gold accuracy": g["accuracy"], "novel accuracy": ev["novel"]["accuracy"],
            "share positive": share,
            "agreement with teacher": float(((g["p_positive"] > 0.5) == (t["p_positive"] > 0.5)).mean()),
            "KL(teacher||student)": two_answer_kl(t["p_positive"], g["p_positive"]),
            "flag": "COLLAPSED?" if not 0.2 <= share <= 0.8 else ""}


DIAG = pd.DataFrame({name: diagnose(ev) for name, ev in EVALS.items()}).T
DIAG.loc["teacher"] = {"gold accuracy": TEACHER_EVAL["gold"]["accuracy"],
                       "novel accuracy": TEACHER_EVAL["novel"]["accuracy"],
                       "share positive": float((TEACHER_EVAL["gold"]["p_positive"] > 0.5).mean()),
                       "agreement with teacher": 1.0, "KL(teacher||student)": 0.0, "flag": ""}
COLLAPSED = [n for n in EVALS if DIAG.loc[n, "flag"]]
print(f"gold: {len(gold)} reviews, novel: {len(novel)} reviews")
display(DIAG.style.format({c: "{:.3f}" for c in DIAG.columns if c != "flag"}))
print("collapsed runs: " + (", ".join(COLLAPSED) if COLLAPSED else "none"))
MEAN = {arm: {split: float(np.mean([EVALS[students.run_name(arm, s)][split]["accuracy"] for s in CFG["seeds"]]))
              for split in ("gold", "novel")} for arm in students.ARMS}
for arm in students.ARMS:
    print(f"{students.ARM_TITLES[arm]:<18} mean over {len(CFG['seeds'])} seed(s): gold {MEAN[arm]['gold']:.3f}, "
          f"novel {MEAN[arm]['novel']:.3f}")
print(f"{'teacher':<18} gold {TEACHER_EVAL['gold']['accuracy']:.3f}, novel {TEACHER_EVAL['novel']['accuracy']:.3f}")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
colors = {"ce_few": "C1", "kd": "C0", "ce_all": "C2"}
for i, arm in enumerate(students.ARMS):
    for j, split in enumerate(("gold", "novel")):
        accs = [EVALS[students.run_name(arm, s)][split]["accuracy"] for s in CFG["seeds"]]
        axes[0].scatter([i + 0.2 * j - 0.1] * len(accs), accs, color=colors[arm], marker="o" if split == "gold" else "x",
                        label=f"{split}" if i == 0 else None)
for split in ("gold", "novel"):
    axes[0].axhline(TEACHER_EVAL[split]["accuracy"], color="k", ls="--" if split == "gold" else ":", lw=1,
                    label=f"teacher, {split}")
axes[0].axhline(0.5, color="gray", lw=0.8)
axes[0].set_xticks(range(3), [students.ARM_TITLES[a] for a in students.ARMS])
axes[0].set_ylim(0.3, 1.05)
axes[0].set_ylabel("accuracy (one point per seed)")
axes[0].set_title("gold (o) and novel phrasings (x)")
axes[0].legend(fontsize=8)
for arm in students.ARMS:
    name = students.run_name(arm, CFG["seeds"][0])
    axes[1].scatter(TEACHER_EVAL["gold"]["p_positive"], EVALS[name]["gold"]["p_positive"], s=12, color=colors[arm],
                    alpha=0.7, label=students.ARM_TITLES[arm])
axes[1].plot([0, 1], [0, 1], "k:", lw=1)
axes[1].set_xlabel("teacher's P(positive)")
axes[1].set_ylabel("student's P(positive)")
axes[1].set_title(f"does the student believe what the teacher believes? (seed {CFG['seeds'][0]})")
axes[1].legend(fontsize=8)
for ax in axes:
    ax.grid(alpha=0.3)
plt.show()

# %% [markdown] id="loss-by-position-idea"
# **Where the KD loss lives.** The KL between the teacher's captured top-k and a student, at each reply
# position of the first `CFG["gap_texts"]` capture texts, for the first KD student and the first CE
# student. Both were trained at the answer position only, so that is the one row where training could
# bring the KL down; read it against the others. The other rows show what that choice costs: nothing
# taught the student the reply's fixed wording, so it scores an answer well without being able to
# write the reply (the reply-positions ablation below trains those positions too).

# %% id="loss-by-position"
pos_batch = training_batches(records[:CFG["gap_texts"]], CFG["gap_texts"])[0]
REPLY_WORDS = ["This", " review", " is", "<answer>", ".", "<|im_end|>"]  # the token each position predicts
KL_BY_POSITION = {}
with torch.no_grad():
    for arm in ("kd", "ce_few"):
        s_logits, keep = reply_logits(trained[students.run_name(arm, CFG["seeds"][0])], pos_batch)
        log_p = torch.log_softmax(pos_batch["topk_logprobs"][keep], -1)  # [N, k]: every reply position
        log_q = torch.log_softmax(s_logits[0].float(), -1).gather(-1, pos_batch["topk_ids"][keep])
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        KL_BY_POSITION[arm] = kl.reshape(keep.shape[0], -1).mean(0).tolist()  # every reply has 6 positions
print(pd.DataFrame(KL_BY_POSITION, index=REPLY_WORDS).round(4)
      .rename(columns={"kd": "KD student: KL (nats)", "ce_few": "CE(few) student: KL (nats)"}))

# %% [markdown] id="ablation-idea"
# **Four choices, measured** (one seed, the first; the same labelled texts as that seed above):
#
# 1. **fewer steps** (`CFG["ablation_steps"]`, 150 at `full`): KD's target is a whole distribution,
#    most of whose mass is on tokens that are not the answer (" neutral", " not", " a"...). The
#    student first learns the teacher's *average* answer distribution and only later what changes
#    from one review to the next. Stopped early, it can lean heavily to one answer (watch the share of
#    "positive" answers): a training failure that looks exactly like "KD does not work";
# 2. **the reply up to the answer** instead of the answer position alone (`positions="reply"`);
# 3. **T = 2** instead of 1;
# 4. **alpha = 0.9** instead of 0.5: more weight on the hand label where there is one. It can only
#    matter on the labelled texts (the others get the KL alone), a few percent of the capture.

# %% id="ablation"
ABLATION = {}
first = CFG["seeds"][0]
for label, kwargs in ((f"KD, {CFG['ablation_steps']} steps", {"steps": CFG["ablation_steps"]}),
                      ("KD, reply positions up to the answer", {"positions": "reply"}),
                      ("KD, T = 2", {"T": 2.0}),
                      ("KD, alpha = 0.9", {"alpha": 0.9})):
    _, _, secs, ev = train_and_score("kd", first, **kwargs)
    ABLATION[label] = {**diagnose(ev), "seconds": secs}
ABLATION[f"KD, {CFG['steps']} steps, answer position, T = {CFG['T']:g}, alpha = {CFG['alpha']:g} (above)"] = {
    **diagnose(EVALS[students.run_name("kd", first)]), "seconds": train_seconds[students.run_name("kd", first)]}
ABLATION = pd.DataFrame(ABLATION).T
display(ABLATION.style.format({c: "{:.3f}" for c in ABLATION.columns if c not in ("flag", "seconds")} | {"seconds": "{:.0f}"}))

# %% [markdown] id="gap-idea"
# **How good was the top-k approximation?** On the first `CFG["gap_texts"]` training texts we compare
# your `topk_kd_loss` on the capture with your `kd_loss` on the teacher's *full* logits (recomputed
# live), for the first KD student, at the reply positions. The gap is what renormalising over the top-k
# changes in the loss we optimised.

# %% id="topk-gap"
gap_batch = training_batches(records[:CFG["gap_texts"]], CFG["gap_texts"])[0]
with torch.no_grad():
    s_logits, keep = reply_logits(trained[students.run_name("kd", first)], gap_batch)
    t_logits = teacher(input_ids=gap_batch["input_ids"], attention_mask=gap_batch["attention_mask"]).logits
    t_logits = t_logits[keep].unsqueeze(0).float()
    gap_labels = gap_batch["labels"][keep].unsqueeze(0)
    gap_ids = gap_batch["topk_ids"][keep].unsqueeze(0)
    gap_lps = gap_batch["topk_logprobs"][keep].unsqueeze(0)
    TOPK_GAP = {}
    for T in sorted({1.0, 2.0, 4.0, float(CFG["T"])}):
        full = float(kd_loss(s_logits, t_logits, gap_labels, 0.0, T))
        topk = float(topk_kd_loss(s_logits, gap_ids, gap_lps, gap_labels, 0.0, T))
        TOPK_GAP[T] = (full, topk)
        print(f"T = {T:g}: soft term (T^2 KL) full vocabulary {full:.4f}, top-{K} {topk:.4f}, "
              f"relative gap {abs(topk - full) / max(full, 1e-12):.1%}")
reply_cover = float(gap_lps.exp().sum(-1).mean())
print(f"mean covered mass at these reply positions: {reply_cover:.4f}")

# %% [markdown] id="save-idea"
# ## 7. Hand the students to lesson 4
#
# Every run is saved with `save_pretrained`, with the tokenizer, to `artifact_dir(BUDGET)/students/<arm>-seed<seed>`,
# and its training record to `students.json` there (`students.save_students`: each folder swapped in
# whole, the record last). Lesson 4 loads them from there and puts intervals on the comparison.

# %% id="save"
folder = students.students_folder(BUDGET)
meta = {}
for name in trained:
    arm, seed = name.rsplit("-seed", 1)
    meta[name] = {"arm": arm, "seed": int(seed), "trained_by": "lesson 3 (03_kd_loss)", "budget": BUDGET,
                  "loss": (f"topk_kd_loss: {CFG['alpha']} * CE + {1 - CFG['alpha']} * T^2 * KL(teacher top-k "
                           f"renormalised || student), T={CFG['T']}, k={K}; the KL alone where no label")
                          if arm == "kd" else "cross-entropy on the hand labels",
                  "positions": "answer", "labels": len(records) if arm == "ce_all" else CFG["labels"],
                  "capture_texts": len(records), "capture": CAPTURE_SOURCE, "steps": CFG["steps"],
                  "batch_size": CFG["batch_size"], "lr": CFG["lr"], "alpha": CFG["alpha"] if arm == "kd" else 1.0,
                  "T": CFG["T"] if arm == "kd" else None, "k": K if arm == "kd" else None,
                  "teacher_layers": list(STUDENT_LAYERS), "params": STUDENT_PARAMS, "trainable_params": TRAINABLE,
                  "params_ratio": PARAM_RATIO, "frozen_embeddings": True,
                  "first_train_loss": history[name][0], "final_train_loss": float(np.mean(history[name][-10:])),
                  "gold_accuracy": EVALS[name]["gold"]["accuracy"], "train_seconds": round(train_seconds[name], 1)}
students.save_students(trained, tok, meta, folder)
print(f"saved {len(trained)} students and students.json to {folder}")

# %% id="results"
rows = [
    {"quantity": "teacher parameters", "value": TEACHER_PARAMS, "unit": "params"},
    {"quantity": "student parameters (teacher layer " + ",".join(map(str, STUDENT_LAYERS)) + ")",
     "value": STUDENT_PARAMS, "unit": "params", "note": f"{TRAINABLE:,} trainable (embeddings frozen)"},
    {"quantity": "student / teacher parameters", "value": round(PARAM_RATIO, 4), "unit": "ratio"},
    {"quantity": "capture texts used", "value": len(records), "unit": "texts", "note": f"k = {K}, from {CAPTURE_SOURCE}"},
    {"quantity": "hand-labelled texts (CE, few labels; KD)", "value": CFG["labels"], "unit": "texts"},
    {"quantity": "covered mass of the top-k, mean", "value": round(float(covered.mean()), 4), "unit": "probability"},
    {"quantity": f"soft-term gradient norm, T={T_HI:g} vs T=1, without T^2", "value": round(grad_ratio_without, 4),
     "unit": "ratio", "note": f"1/T^2 = {1 / T_HI ** 2:.4f}"},
    {"quantity": f"soft-term gradient norm, T={T_HI:g} vs T=1, with T^2", "value": round(grad_ratio_with, 4), "unit": "ratio"},
    {"quantity": "toy (zero-mean logits): soft-term gradient norm, T=64 vs T=1, with T^2", "value": round(toy_ratio_with, 4),
     "unit": "ratio", "note": "without T^2 it would be x1/4096"},
]
for T, (full, topk) in TOPK_GAP.items():
    rows.append({"quantity": f"top-{K} vs full-vocabulary soft loss, T={T:g}", "value": round(abs(topk - full) / max(full, 1e-12), 4),
                 "unit": "relative gap", "note": f"{topk:.4f} vs {full:.4f} nats (KD student, reply positions)"})
for name, sec in STEP_TIMES.items():
    rows.append({"quantity": f"step time: {name}", "value": round(sec, 3), "unit": "s/step"})
for split in ("gold", "novel"):
    rows.append({"quantity": f"{split} accuracy: teacher", "value": round(TEACHER_EVAL[split]["accuracy"], 4),
                 "unit": "fraction", "note": f"{len(gold if split == 'gold' else novel)} reviews"})
    for arm in students.ARMS:
        each = ", ".join(f"{EVALS[students.run_name(arm, s)][split]['accuracy']:.3f}" for s in CFG["seeds"])
        rows.append({"quantity": f"{split} accuracy: {students.ARM_TITLES[arm]}, mean of seeds",
                     "value": round(MEAN[arm][split], 4), "unit": "fraction", "note": f"seeds: {each}"})
for name in EVALS:
    rows.append({"quantity": f"agreement with the teacher: {name}", "value": round(DIAG.loc[name, "agreement with teacher"], 4),
                 "unit": "fraction", "note": DIAG.loc[name, "flag"]})
for label, r in ABLATION.iterrows():
    rows.append({"quantity": f"ablation: {label}: gold accuracy", "value": round(r["gold accuracy"], 4), "unit": "fraction",
                 "note": f"share positive {r['share positive']:.2f} {r['flag']}".strip()})
rows.append({"quantity": "collapsed runs (share positive outside 0.2-0.8)", "value": len(COLLAPSED), "unit": "runs",
             "note": ", ".join(COLLAPSED)})
table = report.record_results("03_kd_loss", BUDGET, rows)
table["value"] = [f"{int(v):,}" if isinstance(v, (int, float)) and float(v).is_integer() and abs(v) >= 1000
                  else f"{v:.4g}" if isinstance(v, (int, float)) else v for v in table["value"]]
table.fillna("")

# %% [markdown] id="wrap-up"
# ## What to take away
#
# - **The loss is one line, with five decisions in it:** two terms, KL direction (forward, teacher
#   first), temperature on the soft term only, $T^2$, and masking plus the token mean. Each has a silent
#   failure mode, which is why every one of them was tested against a reference (`torch.nn.functional`,
#   TRL).
# - **$T^2$ is not decoration.** Without it, the soft term's gradient falls at least as fast as
#   $1/T^2$ (measured above), and "raise $T$" quietly means "ignore the teacher". With it, $T$ is still
#   not a free knob on LLM logits: tune it together with `alpha`.
# - **Top-k distillation is an approximation with a stated rule:** renormalise the teacher over its k
#   ids at temperature $T$, and read the student's full distribution at those ids. Its error grows with
#   $T$ and shrinks with the covered mass. Measure it, as above.
# - **What KD can pay for is the texts nobody labelled.** The arms differ only in what they learn
#   from: where only a few texts are labelled, the capture gives the student a soft label for every
#   other text, and the control shows what labels reach when every text has one. Compare the three in
#   the table above (lesson 4 says whether the differences are more than noise). Then read the novel
#   column: if the students stay far below the teacher there, they learned what the teacher said about
#   the texts they were shown, not the teacher's general sense of sentiment.
# - **Check that training worked before you conclude anything.** A student that answers "positive" to
#   everything scores 0.5 on a balanced set and looks like "KD failed". The share-of-positive and
#   agreement columns catch it; the fewer-steps ablation shows how easily it happens.
#
# Next, lesson 4 asks the question that decides whether any of this ships: how much of the teacher's
# quality does the student keep, with what uncertainty over gold reviews and seeds, and at what size
# and speed?
