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
# # Lesson 5 — Preference tuning: DPO and ORPO
#
# Supervised fine-tuning (SFT) teaches a model to imitate good replies. It never shows the model a
# *bad* reply and says "not like this". Many of the failures we care about are exactly that kind: a
# confident wrong value, an unhelpful refusal, a correct answer buried in filler. **Preference tuning**
# learns from pairs: for the same prompt, a reply people preferred (**chosen**, $y_w$) and one they did
# not (**rejected**, $y_l$).
#
# Our model is **BrewBot**, a coffee-shop assistant built on SmolLM2-135M-Instruct. Every question comes
# with the shop's card (two drinks with their prices and sizes, and the opening hours). The chosen reply
# is short, correct and taken from the card. The rejected reply is worse in one of three ways:
# - **wrong**: the wrong value *from the card*, such as the other drink's price, or the closing time
#   when the question was about opening;
# - **refusal**: it declines to answer;
# - **verbose**: the right answer wrapped in filler.
#
# **You will build** (each exercise is graded on its own)
# 1. `sequence_logprob`: the log-probability of a reply given its prompt, with the prompt masked out
#    (the quantity both methods are built on);
# 2. `dpo_loss`: Direct Preference Optimization's loss and its implicit rewards;
# 3. `orpo_loss`: ORPO's single-stage loss, SFT plus an odds-ratio term, with no reference model.
#
# Each is checked against TRL's own implementation on the same batch and models, to 1e-4.
#
# **You will measure**, on held-out pairs (drinks and phrasings never seen in training):
# - a short DPO run with LoRA on the real model (TRL's `DPOTrainer`), with reward-accuracy and margin
#   curves;
# - an ORPO run for contrast;
# - what the replies themselves look like before and after.

# %% id="parameters" tags=["parameters"]
import os
BUDGET = os.environ.get("BREWSLM_BUDGET", "full")

# %% id="setup" nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
# %matplotlib inline
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from peft import LoraConfig

from brewslm_helpers import budget, evaluation, models, preference, report

datasets.disable_progress_bars()  # TRL tokenizes tiny data sets in the checks below: no bars for those
torch.manual_seed(0)
CFG = budget.pick(
    BUDGET,
    ci=dict(train_pairs=4, steps=2, batch_size=2, lr=5e-4, lora_r=8, eval_pairs=3, eval_steps=2,
            test_pairs=4, gen_pairs=2, max_new_tokens=16, beta=0.1, lam=0.1),
    full=dict(train_pairs=48, steps=12, batch_size=4, lr=5e-4, lora_r=16, eval_pairs=24, eval_steps=3,
              test_pairs=45, gen_pairs=30, max_new_tokens=32, beta=0.1, lam=0.1),
)

model, tok = models.load_teacher()
# two pairs of different kinds, and the real model's logits on them: the checks' fixed batch
CHECK_ROWS = [next(r for r in preference.load_preference_data("train") if r["kind"] == kind)
              for kind in ("verbose", "wrong")]
CHECK_BATCH = preference.collate_pairs(tok, CHECK_ROWS)
CHECK_LOGITS = preference.pair_logits(model, CHECK_BATCH)
print(f"budget {BUDGET}: {CFG}")
print(f"{models.MODEL_NAME}: {model.num_parameters():,} parameters")

# %% [markdown] id="data_md"
# ## 1. The preference pairs
#
# Each row holds a user message (the card and a question), the chosen reply, the rejected reply and its
# `kind`. In a **wrong** pair both values are on the card, so copying a number is not enough: the
# model has to read which one was asked for. The data are generated from templates (`brewslm_helpers/data/make_preference_data.py`). The
# held-out split uses drinks and phrasings that never occur in training, so a model that only memorised
# the training replies gains nothing there.

# %% id="data"
train_all = preference.load_preference_data("train")
test_all = preference.load_preference_data("test")
for name, rows in (("train", train_all), ("test (held out)", test_all)):
    kinds = pd.Series([r["kind"] for r in rows]).value_counts()
    print(f"{name}: {len(rows)} pairs: " + ", ".join(f"{k} {v}" for k, v in kinds.items()))
print("\nsystem:", preference.SYSTEM)
for kind in preference.KINDS:
    row = next(r for r in test_all if r["kind"] == kind)
    print(f"\n[{kind}] user: {row['user']!r}\n  chosen:   {row['chosen']!r}\n  rejected: {row['rejected']!r}")

# %% [markdown] id="batch_md"
# ### How a batch of pairs is laid out
#
# A batch of $B$ pairs becomes $2B$ token sequences, laid out the way TRL's `DataCollatorForPreference`
# lays them out: the $B$ chosen ones first, then the $B$ rejected ones. Each row is the prompt (the chat
# template up to the assistant's turn) followed by one reply, right-padded. Three tensors of shape
# `(2B, T)` go with it:
# - `input_ids`, the tokens;
# - `attention_mask`, which is 1 on real tokens and 0 on padding;
# - `completion_mask`, which is 1 on the **reply's** tokens only.
#
# Both methods compare how likely the *reply* is, so the prompt's tokens must not count. They are the
# same for the chosen and the rejected reply, and they would only add the same noise to both sides.

# %% id="batch"
for name, row in (("chosen", 0), ("rejected", len(CHECK_ROWS))):
    ids, reply = CHECK_BATCH["input_ids"][row], CHECK_BATCH["completion_mask"][row]
    real = int(CHECK_BATCH["attention_mask"][row].sum())
    print(f"{name}: {int(reply.sum())} reply tokens of {real}: {tok.decode(ids[reply.bool()])!r}")
print({k: tuple(v.shape) for k, v in CHECK_BATCH.items()})


# %% [markdown] id="logprob_md"
# ## 2. The log-probability of a reply
#
# A causal LM's logits at position $t-1$ are its prediction for token $t$. The log-probability of a reply
# $y = (y_1..y_m)$ after prompt $x$ is the sum over the reply's tokens:
#
# $$\log \pi(y \mid x) = \sum_{t \in \text{reply}} \log \mathrm{softmax}(\text{logits}_{t-1})[\text{token}_t]$$
#
# Three details matter, and each is a classic bug:
# - **The shift.** The logits at $t-1$ score token $t$, so the first token of a row is never scored.
# - **The mask.** Sum only where `mask[:, t]` is 1. Summing the prompt adds the same large number to
#   chosen and rejected, and summing the padding adds garbage.
# - **Sum or mean.** DPO uses the **sum**: the probability of the whole reply. ORPO uses the **mean**
#   per token (`average=True`), a length-normalised probability. A long reply has a much lower sum even
#   when every one of its tokens is likely. The next cell shows how much that matters here.
#
# Compute the log-softmax in float32 at least. Gather the target token's entry rather than building a
# one-hot.

# %% id="ex_sequence_logprob" nbgrader={"grade": false, "grade_id": "ex_sequence_logprob", "locked": false, "schema_version": 3, "solution": true, "task": false}
def sequence_logprob(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                     average: bool = False) -> torch.Tensor:
    """Log-probability of the masked tokens of each row, given the tokens before them.

    logits: (N, T, V), the model's output on input_ids; input_ids: (N, T) token ids;
    mask: (N, T), 1 (or True) on the tokens to score, e.g. a reply's tokens; mask[:, 0] is never
    scored (nothing predicts the first token).
    Returns (N,) float: for each row, the sum over t >= 1 with mask[:, t] of
    log_softmax(logits[:, t - 1])[input_ids[:, t]] (nats); with average=True, that sum divided by the
    number of scored tokens, the t >= 1 with mask[:, t] (0 for a row with none).
    """
    ### BEGIN SOLUTION
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logp = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    scored = mask[:, 1:].to(token_logp.dtype)
    total = (token_logp * scored).sum(-1)
    if average:
        return total / scored.sum(-1).clamp(min=1)
    return total
    ### END SOLUTION


# %% id="test_sequence_logprob" nbgrader={"grade": true, "grade_id": "test_sequence_logprob", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
def reference_logprob(logits, ids, mask, average):
    """Token by token, in float64: the definition, written independently of your code."""
    out = []
    for n in range(ids.shape[0]):
        total, count = 0.0, 0
        for t in range(1, ids.shape[1]):
            if mask[n, t]:
                total += torch.log_softmax(logits[n, t - 1].double(), -1)[ids[n, t]].item()
                count += 1
        out.append(total / max(count, 1) if average else total)
    return torch.tensor(out, dtype=torch.float64)


torch.manual_seed(0)
logits = torch.randn(3, 8, 13) * 3
ids = torch.randint(13, (3, 8))
mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0],    # prompt, a 3-token reply, padding
                     [0, 0, 1, 1, 1, 1, 1, 1],
                     [0, 0, 0, 0, 0, 0, 1, 1]])
for average in (False, True):
    got = sequence_logprob(logits, ids, mask, average=average)
    assert tuple(got.shape) == (3,), f"expected shape (3,), got {tuple(got.shape)}"
    want = reference_logprob(logits, ids, mask, average)
    assert torch.allclose(got.double(), want, atol=1e-5), f"average={average}: got {got}, expected {want}"
# mask[:, 0] is never scored (nothing predicts the first token): it counts in neither the sum nor the mean
mask0 = mask.clone()
mask0[:, 0] = 1
for average in (False, True):
    got = sequence_logprob(logits, ids, mask0, average=average)
    want = reference_logprob(logits, ids, mask, average)
    assert torch.allclose(got.double(), want, atol=1e-5), \
        f"mask[:, 0] = 1, average={average}: got {got}, expected {want} (count only the scored tokens, t >= 1)"
# TRL's own response log-probability (labels -100 outside the reply), on the real model's logits
for average in (False, True):
    got = sequence_logprob(CHECK_LOGITS, CHECK_BATCH["input_ids"], CHECK_BATCH["completion_mask"], average=average)
    want = preference.trl_sequence_logprob(CHECK_LOGITS, CHECK_BATCH["input_ids"], CHECK_BATCH["completion_mask"], average)
    assert torch.allclose(got, want, atol=1e-4), f"vs TRL, average={average}: got {got}, expected {want}"
print("sequence_logprob: OK")
### BEGIN HIDDEN TESTS
# the prompt and the padding do not count: logits that predict no scored token change nothing
unused = torch.ones(3, 8, dtype=torch.bool)
unused[:, :-1] = mask[:, 1:] == 0
changed = logits.clone()
changed[unused] += 50 * torch.randn(int(unused.sum()), 13)
assert torch.allclose(sequence_logprob(changed, ids, mask), sequence_logprob(logits, ids, mask), atol=1e-5)
# a bool mask works; a row with nothing to score is 0
assert torch.allclose(sequence_logprob(logits, ids, mask.bool()), reference_logprob(logits, ids, mask, False).float(), atol=1e-5)
empty = torch.zeros_like(mask)
for average in (False, True):
    assert torch.allclose(sequence_logprob(logits, ids, empty, average=average), torch.zeros(3), atol=0)
# gradients reach the logits, and only through the scored positions
leaf = logits.clone().requires_grad_(True)
sequence_logprob(leaf, ids, mask).sum().backward()
assert leaf.grad is not None and leaf.grad[unused].abs().sum() == 0 and (leaf.grad[~unused].abs().sum(-1) > 0).all()
# half-precision logits are scored in float32
half = sequence_logprob(logits.bfloat16(), ids, mask)
assert half.dtype == torch.float32 and torch.allclose(half, reference_logprob(logits.bfloat16().float(), ids, mask, False).float(), atol=1e-4)
### END HIDDEN TESTS

# %% [markdown] id="logprob_demo_md"
# What does the model as shipped think of the pairs? Below are the sum and the per-token mean of each
# reply's log-probability on a few training pairs. If the sum is higher for the chosen reply, the model
# already prefers it. Look at the **verbose** pairs: the rejected reply contains the whole chosen one, so
# its *sum* is lower simply because it is longer. Its *mean* tells a different story.

# %% id="logprob_demo"
def logps_table(m, rows, batch_size=8):
    """Per pair: the summed and the mean log-probability of the chosen and the rejected reply under m."""
    out = []
    for chunk in preference.batches(rows, batch_size):
        batch = preference.collate_pairs(tok, chunk)
        logits = preference.pair_logits(m, batch)
        total = sequence_logprob(logits, batch["input_ids"], batch["completion_mask"]).chunk(2)
        mean = sequence_logprob(logits, batch["input_ids"], batch["completion_mask"], average=True).chunk(2)
        out += [{"kind": r["kind"], "sum_c": total[0][i].item(), "sum_r": total[1][i].item(),
                 "mean_c": mean[0][i].item(), "mean_r": mean[1][i].item()} for i, r in enumerate(chunk)]
    return pd.DataFrame(out)


shipped = logps_table(model, train_all[:CFG["eval_pairs"]])
shipped["prefers chosen (sum)"] = shipped.sum_c > shipped.sum_r
shipped["prefers chosen (mean)"] = shipped.mean_c > shipped.mean_r
print(f"the shipped model on {len(shipped)} training pairs (log-probabilities in nats):")
display(shipped.groupby("kind").mean().round(2))


# %% [markdown] id="dpo_md"
# ## 3. DPO: the loss and the implicit reward
#
# RLHF maximises a reward while staying close to a reference model $\pi_{\text{ref}}$ (the model before
# tuning): $\max_\pi \mathbb{E}[r(x,y)] - \beta\,\mathrm{KL}(\pi \,\|\, \pi_{\text{ref}})$. This objective
# has a closed-form optimum, $\pi^*(y|x) \propto \pi_{\text{ref}}(y|x)\,e^{r(x,y)/\beta}$. Turn it around and
# every policy defines an **implicit reward**:
#
# $$r(x,y) = \beta \log \frac{\pi(y|x)}{\pi_{\text{ref}}(y|x)} + \text{const}(x)$$
#
# Put that into the Bradley–Terry model of a preference, $P(y_w \succ y_l) = \sigma(r_w - r_l)$. The
# constant cancels. What remains is a classification loss on the pair, with no reward model and no
# sampling:
#
# $$\mathcal{L}_{\text{DPO}} = -\log \sigma\Big(\beta\big[(\log\pi(y_w|x) - \log\pi_{\text{ref}}(y_w|x)) - (\log\pi(y_l|x) - \log\pi_{\text{ref}}(y_l|x))\big]\Big)$$
#
# averaged over the batch. Some consequences worth checking in your head:
# - At the start $\pi = \pi_{\text{ref}}$, so every reward is 0 and the loss is $\log 2 \approx 0.693$.
# - The loss only cares about the **margin** $r_w - r_l$. DPO may lower both log-probabilities, as long as
#   the rejected one falls faster. Watch the chosen reward in the plots below.
# - $\beta$ sets how far from the reference the policy may go: a small $\beta$ needs large log-ratios to
#   reach the same margin.
# - Without the reference terms, DPO would just push $\log\pi(y_w)$ up and $\log\pi(y_l)$ down, with nothing
#   holding the model near what it knew.
#
# Return the loss and the two implicit rewards $\beta \log\frac{\pi}{\pi_{\text{ref}}}$, one per pair, as
# TRL logs them. The rewards are for reporting, so return them detached.

# %% id="ex_dpo_loss" nbgrader={"grade": false, "grade_id": "ex_dpo_loss", "locked": false, "schema_version": 3, "solution": true, "task": false}
def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss on a batch of B pairs.

    All four inputs: (B,) sequence log-probabilities (summed over the reply's tokens, nats) of the
    chosen / rejected replies under the policy being trained and under the frozen reference.
    beta: the KL strength.
    Returns (loss, chosen_rewards, rejected_rewards): loss is a scalar, the batch mean of
    -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)); the rewards are (B,),
    beta * (policy - reference) log-probability, detached.
    """
    ### BEGIN SOLUTION
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    margin = beta * (chosen_logratios - rejected_logratios)
    loss = -F.logsigmoid(margin).mean()
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return loss, chosen_rewards, rejected_rewards
    ### END SOLUTION


# %% id="test_dpo_loss" nbgrader={"grade": true, "grade_id": "test_dpo_loss", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
pc = torch.tensor([-12.0, -30.5, -8.0, -20.0])   # policy, chosen
pr = torch.tensor([-15.0, -29.0, -9.5, -26.0])   # policy, rejected
rc = torch.tensor([-13.0, -30.0, -7.0, -21.0])   # reference, chosen
rr = torch.tensor([-14.0, -31.0, -9.0, -22.0])   # reference, rejected
loss, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.5)
margins = [0.5 * ((a - c) - (b - d)) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
want = sum(np.log1p(np.exp(-m)) for m in margins) / len(margins)
assert loss.dim() == 0, f"the loss must be a scalar, got shape {tuple(loss.shape)}"
assert abs(loss.item() - want) < 1e-5, f"loss {loss.item():.6f}, expected {want:.6f}"
assert torch.allclose(chosen_rewards, 0.5 * (pc - rc), atol=1e-6), f"chosen rewards {chosen_rewards}"
assert torch.allclose(rejected_rewards, 0.5 * (pr - rr), atol=1e-6), f"rejected rewards {rejected_rewards}"
# policy == reference: every reward 0, loss log 2
loss0, c0, r0 = dpo_loss(pc, pr, pc, pr, beta=0.1)
assert abs(loss0.item() - np.log(2)) < 1e-6 and c0.abs().max() == 0 and r0.abs().max() == 0
# TRL's DPOTrainer on the same batch and models (two tiny random Llamas as policy and reference)
policy, reference = preference.tiny_models(tok)
trainer = preference.trl_dpo_trainer(policy, tok, CHECK_ROWS, beta=0.25, ref_model=reference)
trl = preference.trl_dpo_loss(trainer, CHECK_BATCH)
ids, completion = CHECK_BATCH["input_ids"], CHECK_BATCH["completion_mask"]
(tpc, tpr), (trc, trr) = [preference.trl_sequence_logprob(preference.pair_logits(m, CHECK_BATCH), ids, completion).chunk(2)
                          for m in (policy, reference)]
loss, chosen_rewards, rejected_rewards = dpo_loss(tpc, tpr, trc, trr, beta=0.25)
assert abs(loss.item() - trl["loss"]) < 1e-4, f"vs TRL: loss {loss.item():.6f}, TRL {trl['loss']:.6f}"
assert abs(chosen_rewards.mean().item() - trl["chosen_reward"]) < 1e-4, (chosen_rewards, trl)
assert abs(rejected_rewards.mean().item() - trl["rejected_reward"]) < 1e-4, (rejected_rewards, trl)
print(f"dpo_loss: OK (TRL's loss {trl['loss']:.5f}, yours {loss.item():.5f})")
### BEGIN HIDDEN TESTS
# gradients: raising the chosen log-prob lowers the loss, raising the rejected one raises it
a, b = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
dpo_loss(a, b, rc, rr, beta=0.3)[0].backward()
assert (a.grad < 0).all() and (b.grad > 0).all(), (a.grad, b.grad)
# the rewards carry no graph
a = pc.clone().requires_grad_(True)
_, c1, r1 = dpo_loss(a, pr, rc, rr, beta=0.3)
assert not c1.requires_grad and not r1.requires_grad
# only the log-ratios matter: shifting a pair's policy and reference log-probs together changes nothing
shift = torch.tensor([5.0, -3.0, 0.5, 10.0])
l1 = dpo_loss(pc + shift, pr, rc + shift, rr, beta=0.7)[0]
l2 = dpo_loss(pc, pr, rc, rr, beta=0.7)[0]
assert abs(l1.item() - l2.item()) < 1e-5
# large margins stay finite (log-sigmoid, not log of a sigmoid)
big = dpo_loss(torch.tensor([0.0, -2000.0]), torch.tensor([-2000.0, 0.0]), torch.zeros(2), torch.zeros(2), beta=1.0)[0]
assert torch.isfinite(big) and abs(big.item() - 1000.0) < 1e-3, big
# batch of one, float64
l64, c64, _ = dpo_loss(pc[:1].double(), pr[:1].double(), rc[:1].double(), rr[:1].double(), beta=0.5)
assert abs(l64.item() - np.log1p(np.exp(-margins[0]))) < 1e-9 and c64.shape == (1,)
### END HIDDEN TESTS

# %% [markdown] id="orpo_md"
# ## 4. ORPO: preference tuning without a reference model
#
# DPO needs a reference model: a second forward pass per pair, and a model that was already fine-tuned
# (the reference *is* your SFT model). **ORPO** (Hong et al., 2024) folds the two stages into one. It
# adds a penalty to the ordinary SFT loss on the chosen reply, a penalty that grows when the rejected
# reply is not much less likely than the chosen one. Likelihood is measured by **odds**:
#
# $$\text{odds}(y|x) = \frac{P(y|x)}{1 - P(y|x)}, \qquad P(y|x) = \exp\Big(\tfrac{1}{|y|}\sum_t \log \pi(y_t \mid x, y_{<t})\Big)$$
#
# $P$ is the **length-normalised** (per-token mean) probability. With the plain sum, $P$ of any real
# reply is about 0, the odds equal $P$, and the term collapses into a raw log-probability difference that
# penalises length. The loss, for a batch of $B$ pairs ($2B$ rows: $B$ chosen, then $B$ rejected), is
#
# $$\mathcal{L}_{\text{ORPO}} = \mathcal{L}_{\text{SFT}} + \lambda \cdot \underbrace{\text{mean}_{\text{pairs}}\Big[-\log\sigma\big(\log\text{odds}(y_w|x) - \log\text{odds}(y_l|x)\big)\Big]}_{\mathcal{L}_{\text{OR}}}$$
#
# and $\log\text{odds} = \log P - \log(1 - P)$. Compute $\log(1-P)$ as `torch.log(-torch.expm1(log_p))`. It
# stays accurate when $P$ is close to 1, where `1 - exp(log_p)` loses every digit: in float32, `exp(-1e-7)`
# is rounded to a neighbour of 1 before anything is subtracted, so `torch.log1p(-torch.exp(log_p))` (the
# form TRL uses) is no better there. The test checks near-certain replies against float64.
#
# **The SFT term, as TRL computes it.** $\mathcal{L}_{\text{SFT}}$ is the mean negative log-likelihood
# per token of the **chosen** rows. TRL's `ORPOTrainer` counts every real token (`attention_mask`), the
# prompt as well as the reply, with the usual shift, averaged over all those tokens of the batch. The
# paper's formula conditions on the prompt. Training on the prompt's tokens too is a choice TRL makes,
# and we follow it here so that the check against TRL is exact.
#
# Write the log-probabilities out here again, not with `sequence_logprob`: each exercise is graded on its
# own.

# %% id="ex_orpo_loss" nbgrader={"grade": false, "grade_id": "ex_orpo_loss", "locked": false, "schema_version": 3, "solution": true, "task": false}
def orpo_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              completion_mask: torch.Tensor, lam: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO's loss on a batch of B pairs laid out as 2B rows (B chosen, then the B rejected).

    logits: (2B, T, V); input_ids, attention_mask, completion_mask: (2B, T) (see section 1).
    lam: the weight of the odds-ratio term.
    Returns (loss, log_odds_ratio): loss = SFT + lam * OR (a scalar), where SFT is the mean per-token
    NLL of the chosen rows over every real token after the first (attention_mask, shifted), and OR is
    the pairs' mean of -log sigmoid(log_odds_ratio); log_odds_ratio is (B,), log odds(chosen) -
    log odds(rejected), each from the reply's mean per-token log-probability log P (over the t >= 1
    with completion_mask[:, t]; position 0 is never scored), with log(1 - P) = log(-expm1(log P)),
    accurate (float32) even for a near-certain reply, log P close to 0.
    """
    ### BEGIN SOLUTION
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logp = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    reply = completion_mask[:, 1:].to(token_logp.dtype)
    mean_logp = (token_logp * reply).sum(-1) / reply.sum(-1).clamp(min=1)
    chosen, rejected = mean_logp.chunk(2)
    log_odds_ratio = (chosen - rejected) - (torch.log(-torch.expm1(chosen)) - torch.log(-torch.expm1(rejected)))
    or_term = -F.logsigmoid(log_odds_ratio).mean()
    n_chosen = chosen.shape[0]
    real = attention_mask[:n_chosen, 1:].to(token_logp.dtype)
    sft = -(token_logp[:n_chosen] * real).sum() / real.sum()
    return sft + lam * or_term, log_odds_ratio
    ### END SOLUTION


# %% id="test_orpo_loss" nbgrader={"grade": true, "grade_id": "test_orpo_loss", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
def reference_orpo(logits, ids, attention, completion, lam):
    """ORPO from its definition, in float64, written independently of your code."""
    logp = torch.log_softmax(logits.double(), -1)
    tok_lp = torch.stack([logp[:, t - 1].gather(-1, ids[:, t:t + 1]).squeeze(-1) for t in range(1, ids.shape[1])], 1)
    n = ids.shape[0] // 2
    p = torch.exp((tok_lp * completion[:, 1:]).sum(1) / completion[:, 1:].sum(1))
    odds = p / (1 - p)
    ratio = torch.log(odds[:n]) - torch.log(odds[n:])
    sft = -(tok_lp[:n] * attention[:n, 1:]).sum() / attention[:n, 1:].sum()
    return sft + lam * torch.log1p(torch.exp(-ratio)).mean(), ratio


# peaked logits, so per-token probabilities are far from 0 (odds differ from probabilities); replies of different lengths
torch.manual_seed(1)
ids = torch.randint(11, (4, 9))
logits = torch.randn(4, 9, 11)
logits.scatter_(-1, torch.roll(ids, -1, 1).unsqueeze(-1), 4.0)   # the next token is likely
attention = torch.tensor([[1] * 9, [1] * 7 + [0] * 2, [1] * 9, [1] * 5 + [0] * 4])
completion = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 0, 0],
                           [0, 0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0, 0]])
loss, ratio = orpo_loss(logits, ids, attention, completion, lam=0.3)
want_loss, want_ratio = reference_orpo(logits, ids, attention, completion, 0.3)
assert loss.dim() == 0 and tuple(ratio.shape) == (2,), f"shapes: loss {tuple(loss.shape)}, log-odds ratio {tuple(ratio.shape)}"
assert torch.allclose(ratio.double(), want_ratio, atol=1e-5), f"log-odds ratio {ratio}, expected {want_ratio}"
assert abs(loss.item() - want_loss.item()) < 1e-5, f"loss {loss.item():.6f}, expected {want_loss.item():.6f}"
# completion_mask[:, 0] is never scored: it counts in neither the reply's sum nor its length
completion0 = completion.clone()
completion0[:, 0] = 1
ratio0 = orpo_loss(logits, ids, attention, completion0, lam=0.3)[1]
assert torch.allclose(ratio0.double(), want_ratio, atol=1e-5), \
    f"completion_mask[:, 0] = 1: log-odds ratio {ratio0}, expected {want_ratio} (count only the scored tokens, t >= 1)"


def near_certain_batch(odds):
    """Replies the model is all but sure of: a 2-token vocabulary where, at reply position j of row i,
    the wrong token has odds odds[i][j] * 2**-23 against the right one (0: about e**-60)."""
    T = 1 + max(len(row) for row in odds)
    lg = torch.zeros(len(odds), T, 2)
    lg[:, :, 1] = -60.0
    reply = torch.zeros(len(odds), T, dtype=torch.long)
    for i, row in enumerate(odds):
        reply[i, 1:1 + len(row)] = 1
        for t, k in enumerate(row, start=1):
            if k:
                lg[i, t - 1, 1] = float(np.log(k * 2.0 ** -23))
    return lg, torch.zeros(len(odds), T, dtype=torch.long), torch.ones(len(odds), T, dtype=torch.long), reply


# mean log-probs from -2.4e-8 to -7.9e-5 (float32 logits): chosen rows first, then rejected
near = near_certain_batch([[1, 0, 0, 0, 0], [1, 0, 0], [100, 0, 0, 0], [839, 0, 0], [17, 0], [1000, 1000, 0]])
near_ratio = orpo_loss(*near, lam=0.3)[1]
want_near = reference_orpo(*near, 0.3)[1]
assert torch.isfinite(near_ratio).all() and torch.allclose(near_ratio.double(), want_near, atol=1e-4), (
    f"near-certain replies: log-odds ratio {near_ratio}, expected {want_near} (float64); "
    "compute log(1 - P) as torch.log(-torch.expm1(log_p)), not from exp(log_p)")
# TRL's ORPOTrainer on the same batch and model: the real SmolLM2 on the fixed check batch
trainer = preference.trl_orpo_trainer(preference.tiny_models(tok, seeds=(1,))[0], tok, CHECK_ROWS, lam=0.2)
trl = preference.trl_orpo_loss(trainer, CHECK_BATCH, model=model)
loss, ratio = orpo_loss(CHECK_LOGITS, CHECK_BATCH["input_ids"], CHECK_BATCH["attention_mask"],
                        CHECK_BATCH["completion_mask"], lam=0.2)
assert abs(loss.item() - trl["loss"]) < 1e-4, f"vs TRL: loss {loss.item():.6f}, TRL {trl['loss']:.6f}"
assert abs(ratio.mean().item() - trl["log_odds"]) < 1e-4, f"vs TRL: mean log-odds ratio {ratio.mean().item():.6f}, TRL {trl['log_odds']:.6f}"
print(f"orpo_loss: OK (TRL's loss {trl['loss']:.5f}, yours {loss.item():.5f})")
### BEGIN HIDDEN TESTS
# lam = 0 is plain SFT on the chosen rows (TRL's NLL)
sft_only, _ = orpo_loss(CHECK_LOGITS, CHECK_BATCH["input_ids"], CHECK_BATCH["attention_mask"],
                        CHECK_BATCH["completion_mask"], lam=0.0)
assert abs(sft_only.item() - trl["nll"]) < 1e-4, (sft_only.item(), trl["nll"])
# the rejected rows' tokens do not enter the SFT term
changed = logits.clone()
changed[2:, :3] = torch.randn(2, 3, 11) * 20       # rejected rows' prompt positions only
assert abs(orpo_loss(changed, ids, attention, completion, lam=0.0)[0].item() - orpo_loss(logits, ids, attention, completion, lam=0.0)[0].item()) < 1e-6
# a reply made twice as long by repeating equally likely tokens keeps its odds (length-normalised)
ids2 = torch.tensor([[0, 1, 2, 3, 0, 0], [0, 1, 2, 3, 3, 3]])
lg = torch.zeros(2, 6, 5)
lg[:, :, 3] = 2.0
r_short = orpo_loss(lg, ids2, torch.ones(2, 6), torch.tensor([[0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 1]]))[1]
assert abs(r_short.item()) < 1e-5, r_short
# near-certain replies stay finite
sure = torch.zeros(2, 4, 5)
sure[:, :, 1] = 12.0
l_sure, r_sure = orpo_loss(sure, torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4), torch.tensor([[0, 1, 1, 1]] * 2))
assert torch.isfinite(l_sure) and torch.isfinite(r_sure).all(), (l_sure, r_sure)
# gradients flow to the logits
leaf = logits.clone().requires_grad_(True)
orpo_loss(leaf, ids, attention, completion, lam=0.3)[0].backward()
assert leaf.grad is not None and leaf.grad.abs().sum() > 0
### END HIDDEN TESTS

# %% [markdown] id="train_md"
# ## 5. A short DPO run with LoRA (TRL `DPOTrainer`)
#
# Now train the real model on the training pairs with TRL's `DPOTrainer`. It runs the same loss you
# wrote: the check after training compares the two on a held-out batch. **LoRA** keeps the base weights
# frozen, which gives the reference for free: the reference is the same model with the adapter switched
# off, so no second copy of the model is needed. `precompute_ref_log_probs=True` scores every pair under
# the reference once, before training, instead of at every step and every evaluation.
#
# Every `eval_steps` steps, TRL scores the first `eval_pairs` held-out pairs. Two curves are worth
# watching:
# - the **reward accuracy**, the share of pairs with $r_w > r_l$;
# - the **margin**, the mean of $r_w - r_l$.

# %% id="dpo_train"
LORA = LoraConfig(r=CFG["lora_r"], lora_alpha=2 * CFG["lora_r"], lora_dropout=0.0, bias="none",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                  task_type="CAUSAL_LM")
train_rows = train_all[:CFG["train_pairs"]]
eval_rows = test_all[:CFG["eval_pairs"]]
test_rows = test_all[:CFG["test_pairs"]]
TRAIN = dict(max_steps=CFG["steps"], per_device_train_batch_size=CFG["batch_size"], learning_rate=CFG["lr"],
             lr_scheduler_type="constant", logging_steps=1)

dpo = preference.trl_dpo_trainer(model, tok, train_rows, beta=CFG["beta"], eval_rows=eval_rows, peft_config=LORA,
                                 precompute_ref_log_probs=True, eval_strategy="steps", eval_steps=CFG["eval_steps"],
                                 per_device_eval_batch_size=CFG["eval_pairs"], **TRAIN)
start = time.perf_counter()
at_start = {"step": 0, **dpo.evaluate()}   # the policy is still the reference: every reward is 0
dpo.train()                                 # (train() starts a fresh log, so step 0 is kept aside)
DPO_SECONDS = time.perf_counter() - start
history = pd.DataFrame([at_start] + dpo.state.log_history)
evals = history.dropna(subset=["eval_rewards/accuracies"])
steps_log = history.dropna(subset=["loss"])
print(f"DPO: {CFG['steps']} steps of {CFG['batch_size']} pairs in {DPO_SECONDS:.0f} s (with evaluations)")
print(evals[["step", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins",
             "eval_rewards/chosen", "eval_rewards/rejected"]].round(3).to_string(index=False))

fig, axes = plt.subplots(1, 3, figsize=(13, 3.3))
axes[0].plot(steps_log["step"], steps_log["loss"], alpha=0.5, label="train batch")
axes[0].plot(evals["step"], evals["eval_loss"], "o-", label="held out")
axes[0].axhline(np.log(2), color="gray", ls=":", label="log 2")
axes[0].set_title("DPO loss")
axes[1].plot(evals["step"], evals["eval_rewards/accuracies"], "o-", color="C2")
axes[1].set_ylim(-0.05, 1.05)
axes[1].set_title("held-out reward accuracy")
axes[2].plot(evals["step"], evals["eval_rewards/margins"], "o-", label="margin $r_w - r_l$")
axes[2].plot(evals["step"], evals["eval_rewards/chosen"], "--", label="chosen reward")
axes[2].plot(evals["step"], evals["eval_rewards/rejected"], "--", label="rejected reward")
axes[2].set_title("held-out rewards")
for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
axes[0].legend(fontsize=8)
axes[2].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown] id="check_md"
# ### Your loss against TRL's, on the trained model
#
# The same held-out batch through your `sequence_logprob` and `dpo_loss`, against TRL's `compute_loss`.
# The policy is the trained model, and the reference is the same model with its adapter disabled.

# %% id="dpo_check"
policy = dpo.model                                # the base model with the trained LoRA adapter
check = preference.collate_pairs(tok, eval_rows[:2])


def reply_logps(m, batch):
    return sequence_logprob(preference.pair_logits(m, batch), batch["input_ids"], batch["completion_mask"]).chunk(2)


policy.eval()
with policy.disable_adapter():
    ref_c, ref_r = reply_logps(policy, check)
pol_c, pol_r = reply_logps(policy, check)
mine = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=CFG["beta"])
theirs = preference.trl_dpo_loss(dpo, check)
DPO_CHECK_DIFF = abs(mine[0].item() - theirs["loss"])
print(f"DPO loss on a held-out batch: yours {mine[0].item():.6f}, TRL's {theirs['loss']:.6f} (|diff| {DPO_CHECK_DIFF:.1e})")
print(f"mean rewards: yours {mine[1].mean().item():+.4f} / {mine[2].mean().item():+.4f}, "
      f"TRL's {theirs['chosen_reward']:+.4f} / {theirs['rejected_reward']:+.4f}")
assert DPO_CHECK_DIFF < 1e-4, "your DPO loss and TRL's disagree on the trained model"

# %% [markdown] id="orpo_train_md"
# ## 6. ORPO on the same pairs, for contrast
#
# Same pairs, same LoRA, same steps and learning rate, TRL's `ORPOTrainer` (in `trl.experimental` in TRL
# 1.x). ORPO starts from the same shipped model, but it has no reference. Its SFT term also pulls every
# chosen reply up, where DPO only moves the margin. The model is loaded again, because LoRA is injected
# into the model in place.

# %% id="orpo_train"
orpo_base, _ = models.load_teacher()
orpo = preference.trl_orpo_trainer(orpo_base, tok, train_rows, lam=CFG["lam"], peft_config=LORA, max_length=256, **TRAIN)
start = time.perf_counter()
orpo.train()
ORPO_SECONDS = time.perf_counter() - start
orpo_log = pd.DataFrame(orpo.state.log_history).dropna(subset=["loss"])
print(f"ORPO: {CFG['steps']} steps in {ORPO_SECONDS:.0f} s; loss {orpo_log['loss'].iloc[0]:.3f} -> {orpo_log['loss'].iloc[-1]:.3f} "
      f"(SFT part {orpo_log['nll_loss'].iloc[0]:.3f} -> {orpo_log['nll_loss'].iloc[-1]:.3f})")

orpo.model.eval()
check_logits = preference.pair_logits(orpo.model, check)
mine = orpo_loss(check_logits, check["input_ids"], check["attention_mask"], check["completion_mask"], lam=CFG["lam"])
theirs = preference.trl_orpo_loss(orpo, check)
ORPO_CHECK_DIFF = abs(mine[0].item() - theirs["loss"])
print(f"ORPO loss on a held-out batch: yours {mine[0].item():.6f}, TRL's {theirs['loss']:.6f} (|diff| {ORPO_CHECK_DIFF:.1e})")
assert ORPO_CHECK_DIFF < 1e-4, "your ORPO loss and TRL's disagree on the trained model"

# %% [markdown] id="heldout_md"
# ## 7. Held-out preferences: base, DPO and ORPO
#
# Two ways to ask "does the model prefer the chosen reply?" on the `test_pairs` held-out pairs:
# - **DPO's implicit-reward accuracy**: $r_w > r_l$, with $r = \beta\log\frac{\pi}{\pi_{\text{ref}}}$
#   against the shipped model. For the shipped model itself every reward is 0, so its accuracy is 0 by
#   definition. This is the number DPO optimises.
# - **Mean log-probability preference**: the chosen reply has the higher per-token mean log-probability
#   under the model. It needs no reference, so it applies to all three models, and it is what ORPO's odds
#   are built on.
#
# Both are computed with your functions. They are split by kind, because an average over kinds hides
# which preferences were learned.

# %% id="heldout"
start = time.perf_counter()
with policy.disable_adapter():
    base_t = logps_table(policy, test_rows)
tables = {"shipped": base_t, "DPO": logps_table(policy, test_rows), "ORPO": logps_table(orpo.model, test_rows)}
results = []
for name, t in tables.items():
    _, r_c, r_r = dpo_loss(torch.tensor(t.sum_c.values), torch.tensor(t.sum_r.values),
                           torch.tensor(base_t.sum_c.values), torch.tensor(base_t.sum_r.values), beta=CFG["beta"])
    frame = pd.DataFrame({"kind": t.kind, "reward_acc": (r_c > r_r).numpy(), "margin": (r_c - r_r).numpy(),
                          "mean_logp_pref": (t.mean_c > t.mean_r).values, "mean_logp_chosen": t.mean_c.values})
    for kind, g in [("all", frame)] + list(frame.groupby("kind")):
        results.append({"model": name, "kind": kind, "pairs": len(g), "reward accuracy": g.reward_acc.mean(),
                        "reward margin": g.margin.mean(), "mean-logp preference": g.mean_logp_pref.mean(),
                        "chosen mean logp": g.mean_logp_chosen.mean()})
heldout = pd.DataFrame(results)
print(f"{len(test_rows)} held-out pairs scored under 3 models in {time.perf_counter() - start:.0f} s")
display(heldout.pivot(index="kind", columns="model", values=["reward accuracy", "mean-logp preference"]).round(3))
display(heldout[heldout.kind == "all"].set_index("model")[["reward margin", "chosen mean logp"]].round(3))

# %% [markdown] id="gen_md"
# ## 8. What the replies look like
#
# Rewards and log-probabilities are proxies. What a customer sees is the reply. Each model answers the
# first `gen_pairs` held-out questions greedily, and a rule-based judge (`preference.judge_reply`) checks
# each reply:
# - **correct**: the card's value is in it;
# - **refusal**: it contains a refusal phrase;
# - **words**: its length;
# - **repeats**: it loops, repeating a character or a run of words;
# - **good**: correct, no refusal, no loop, and at most 15 words.

# %% id="generate"
gen_rows = test_all[:CFG["gen_pairs"]]
conversations = [preference.prompt_messages(r) for r in gen_rows]
gen = {}
start = time.perf_counter()
with policy.disable_adapter():
    gen["shipped"] = evaluation.generate_chat_replies(policy, tok, conversations, CFG["max_new_tokens"], desc="shipped")
gen["DPO"] = evaluation.generate_chat_replies(policy, tok, conversations, CFG["max_new_tokens"], desc="DPO")
gen["ORPO"] = evaluation.generate_chat_replies(orpo.model, tok, conversations, CFG["max_new_tokens"], desc="ORPO")
print(f"{len(gen_rows)} questions x 3 models in {time.perf_counter() - start:.0f} s")
judged = pd.DataFrame([{"model": name, **preference.judge_reply(reply, row)}
                       for name, replies in gen.items() for reply, row in zip(replies, gen_rows)])
replies_summary = judged.groupby("model", sort=False)[["good", "correct", "refusal", "repeats", "words"]].mean()
display(replies_summary.round(2))
for row, *replies in list(zip(gen_rows, gen["shipped"], gen["DPO"], gen["ORPO"]))[:3]:
    print(f"\n{row['user']!r}\n  wanted : {row['chosen']!r}")
    for name, reply in zip(gen, replies):
        print(f"  {name:<7}: {reply[:150]!r}")

# %% [markdown] id="results_md"
# ## What we measured
#
# Every value below was computed in this run.

# %% id="results"
overall = heldout[heldout.kind == "all"].set_index("model")
by_kind = heldout.set_index(["model", "kind"])
rows = [
    {"quantity": "training pairs", "value": len(train_rows), "unit": "pairs",
     "note": f"{CFG['steps']} steps x {CFG['batch_size']}, LoRA r={CFG['lora_r']}, lr {CFG['lr']}"},
    {"quantity": "held-out pairs", "value": len(test_rows), "unit": "pairs", "note": "unseen drinks and phrasings"},
    {"quantity": "DPO training time", "value": round(DPO_SECONDS, 1), "unit": "s", "note": "CPU, with evaluations"},
    {"quantity": "ORPO training time", "value": round(ORPO_SECONDS, 1), "unit": "s", "note": "CPU, no reference model"},
    {"quantity": "your DPO loss vs TRL's", "value": float(f"{DPO_CHECK_DIFF:.2e}"), "unit": "|diff|", "note": "trained model, held-out batch"},
    {"quantity": "your ORPO loss vs TRL's", "value": float(f"{ORPO_CHECK_DIFF:.2e}"), "unit": "|diff|", "note": "trained model, held-out batch"},
]
for name in ("DPO", "ORPO"):
    rows.append({"quantity": f"held-out reward accuracy, {name}", "value": round(overall.loc[name, "reward accuracy"], 3),
                 "unit": "fraction", "note": f"beta={CFG['beta']}, vs the shipped model; by kind: " + ", ".join(
                     f"{k} {by_kind.loc[(name, k), 'reward accuracy']:.2f}" for k in preference.KINDS if (name, k) in by_kind.index)})
for name in ("shipped", "DPO", "ORPO"):
    rows.append({"quantity": f"held-out mean-logp preference, {name}", "value": round(overall.loc[name, "mean-logp preference"], 3),
                 "unit": "fraction", "note": "chosen more likely per token"})
for name in ("shipped", "DPO", "ORPO"):
    s = replies_summary.loc[name]
    rows.append({"quantity": f"good replies, {name}", "value": round(s["good"], 3), "unit": "fraction",
                 "note": f"correct {s['correct']:.2f}, refusals {s['refusal']:.2f}, loops {s['repeats']:.2f}, "
                         f"{s['words']:.1f} words; n={len(gen_rows)}"})
report.record_results("05_preference", BUDGET, rows)

# %% [markdown] id="takeaways"
# ## What to take away
#
# - **Both losses are a few lines on top of one quantity**, the reply's log-probability with the prompt
#   masked. Most preference-tuning bugs are in that quantity: the shift, the mask, or sum versus mean.
#   Check it against the library once, as you did, and the rest follows.
# - **DPO moves the margin, not the likelihood.** Its loss only sees $r_w - r_l$. Compare the chosen
#   reward with the margin in the plots: the chosen reply does not have to become more likely for the
#   loss to fall. The reference keeps the policy near what it knew, and $\beta$ sets how near.
# - **Preferences differ in how easy they are to learn.** Refusals and filler are style, and they show
#   in a few tokens of every reply, so they are learned within a handful of steps. A wrong value differs
#   from the right one in one or two tokens, and the model must read the card to tell them apart. Read
#   the table by kind before you quote one accuracy.
# - **Reward accuracy is not reply quality.** The implicit reward ranks two given replies. The replies a
#   model *writes* can still be wrong or rambling. Look at the generations and judge them.
# - **When to use which.**
#   - Use **SFT** when you have good demonstrations and no negatives.
#   - Use **DPO** when you have pairs and a model that is already good (usually after SFT), and you want
#     to shape it without drifting. It needs the reference's log-probabilities, a second forward pass or
#     one precomputed pass.
#   - Use **ORPO** when you have pairs and want one stage from a model that has not been fine-tuned for
#     the task. It needs no reference model at all: no second copy in memory and no reference forward
#     pass. Its SFT term keeps pulling the chosen replies up, so they must be replies you want imitated.
# - **Honest caveats.** One seed, a small template-generated data set, a handful of steps on a CPU, and
#   a judge made of regular expressions. The held-out split changes drinks and phrasings, not the kind
#   of task. Read the numbers as a demonstration of the mechanics, not as a benchmark of DPO against
#   ORPO.
