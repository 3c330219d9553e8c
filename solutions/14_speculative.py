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
# # Lesson 14 — Speculative decoding: draft, verify, accept
#
# A language model writes one token per forward pass, and each pass reads every weight of the model.
# At batch size 1 that is wasteful: the hardware could score several positions in the time it takes
# to score one, because it is waiting for weights rather than doing arithmetic. **Speculative decoding**
# (Leviathan, Kalman and Matias 2023; Chen et al. 2023) turns that spare capacity into speed:
#
# 1. a small **draft** model proposes the next $K$ tokens, one cheap step at a time;
# 2. the big **target** model scores all $K$ proposals in **one** forward pass;
# 3. an accept/reject rule keeps a prefix of the proposals and adds one token of the target's own.
#
# The rule is built so that the output has **exactly the target's distribution**: greedy decoding gives
# the target's greedy text token for token, and sampling gives samples from the target. Speculation
# changes the speed, never the text. Whether it is faster depends on two numbers: how often the
# target accepts a draft token ($\alpha$), and how cheap a draft step is compared with a target step.
#
# **You will build** (each exercise is graded on its own)
# 1. `simulate_tokens_per_round`: the acceptance arithmetic, simulated and compared with its closed form.
# 2. `verify_draft`: the accept/resample step, $\min(1, p/q)$ and the residual $\mathrm{norm}(\max(0, p-q))$.
# 3. `speculative_generate`: the whole loop, with a KV cache for the draft and for the target.
# 4. `prompt_lookup_draft`: a draft with no model at all, copying from the context (transformers' rule).
#
# **You will check** that greedy output equals the target's greedy output, that sampled output has
# the target's distribution (a $\chi^2$ test on a toy vocabulary and on the real model at one
# position), and that your loop agrees with transformers' `generate(assistant_model=...)`.
#
# **You will measure**, on the real SmolLM2-135M-Instruct target, two drafts in the two regimes:
# - a draft **cut from the target's own first layers** (same tokenizer) on free-text replies: $\alpha$,
#   tokens per target forward against the formula, and the wall-clock speedup for several $K$, next to
#   the **KV-cache speedup** and the **batching gain** measured in the same run;
# - **prompt lookup** on lesson 12's tool-call replies, where the reply copies the prompt: $\alpha$ with
#   an interval, tokens per target forward against the formula across $K$, the wall-clock speed-up with
#   repeated timings next to the cut draft's on the same requests, and llama.cpp's own lookup decoding.
#
# Which lever moves latency most on a 135M model on a CPU, and when speculation pays, is the point of
# the lesson, and the notebook measures it rather than asserting it.

# %% id="parameters" tags=["parameters"]
import os
BUDGET = os.environ.get("BREWSLM_BUDGET", "full")

# %% id="setup" nbgrader={"grade": false, "locked": true, "schema_version": 3, "solution": false, "task": false, "grade_id": "setup"}
# %matplotlib inline
import json
import math
import os
import time
import warnings

warnings.filterwarnings("ignore")

import transformers
transformers.logging.set_verbosity_error()  # transformers' own deprecation notices go to stderr
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.generation.utils import _speculative_sampling  # transformers' accept/resample step

from brewslm_helpers import budget, models, report, speculative, tools
from brewslm_helpers.speculative import to_probs

torch.manual_seed(0)
CFG = budget.pick(
    BUDGET,
    ci=dict(sim_rounds=4000, draft_layers=[2, 4], alpha_requests=1, alpha_tokens=8, Ks=[2],
            timing_tokens=8, timing_repeats=1, batch=4, sample_runs=20, temperature=1.0,
            pl_requests=4, pl_batch=4, pl_new_tokens=64, pl_ngram=3, pl_Ks=[1, 2, 4, 8],
            pl_time_requests=2, pl_time_Ks=[8], pl_time_repeats=1, pl_llama_requests=2),
    full=dict(sim_rounds=20000, draft_layers=[2, 4, 8], alpha_requests=2, alpha_tokens=32, Ks=[1, 2, 4],
              timing_tokens=32, timing_repeats=1, batch=8, sample_runs=60, temperature=1.0,
              pl_requests=None, pl_batch=16, pl_new_tokens=64, pl_ngram=3, pl_Ks=[1, 2, 4, 8, 16],
              pl_time_requests=16, pl_time_Ks=[2, 4, 8], pl_time_repeats=3, pl_llama_requests=16),
)
teacher, tok = models.load_teacher()
print(f"budget {BUDGET}: {CFG}")
print(f"target {models.MODEL_NAME}: {teacher.num_parameters():,} parameters, "
      f"{teacher.config.num_hidden_layers} layers, vocabulary {teacher.config.vocab_size:,}")


# %% [markdown] id="c03"
# ## 1. How many tokens does one target forward buy?
#
# One **round** of speculative decoding: the draft proposes $K$ tokens; the target runs once on them and
# accepts a prefix. Say each draft token is accepted with probability $\alpha$, independently. The
# round stops at the first rejection, and it always ends with **one token from the target**: the
# corrected token after a rejection, or, when all $K$ were accepted, a **bonus** token. The target's
# forward pass computed its distribution for the position after the last draft anyway, so the bonus is free.
#
# So a round produces $n+1$ tokens, where $n$ (accepted drafts) is a truncated geometric variable:
# $P(n = i) = \alpha^i (1-\alpha)$ for $i < K$ and $P(n = K) = \alpha^K$. Its mean is
#
# $$\mathbb{E}[\text{tokens per target forward}] \;=\; \sum_{i=0}^{K} \alpha^i \;=\; \frac{1-\alpha^{K+1}}{1-\alpha}.$$
#
# It is at least 1 (a round never does worse than plain decoding, in tokens) and at most $K+1$.
# It saturates: with $\alpha = 0.6$ no $K$ gets past $1/(1-\alpha) = 2.5$ tokens per forward.
#
# **What $\alpha$ is.** For sampling, the acceptance rule of section 2 accepts a draft token with
# probability $\alpha = \sum_v \min(p_v, q_v) = 1 - \mathrm{TV}(p, q)$, where $p$ is the target's
# next-token distribution and $q$ the draft's. For greedy decoding $\alpha$ is how often the two
# models' arg-max agree. Either way it varies from position to position, so the formula is a model.
#
# **Speed is not tokens per forward.** A round costs one target forward plus $K$ draft steps. If a
# draft step costs $c$ target steps, the speedup is about
# $\frac{1-\alpha^{K+1}}{(1-\alpha)(1 + Kc)}$. It is only worth it when $\alpha$ is high and $c$ small.
# There is one more caveat. The target's forward on $K+1$ positions costs about as much as on 1 only
# when decoding is memory-bound (a GPU at batch 1). On a CPU it costs noticeably more.
#
# **Exercise 1.** Simulate `n_rounds` rounds and return the number of tokens each produced. Draw
# every random number from `generator` (`torch.rand(..., generator=generator)`). Tensor code, no Python loop over rounds.

# %% id="ex_simulate_tokens_per_round" nbgrader={"grade": false, "locked": false, "schema_version": 3, "solution": true, "task": false, "grade_id": "ex_simulate_tokens_per_round"}
def simulate_tokens_per_round(alpha: float, K: int, n_rounds: int,
                              generator: torch.Generator | None = None) -> torch.Tensor:
    """Simulate rounds of speculative decoding where each draft token is accepted with probability alpha.

    alpha: acceptance probability of one draft token, in [0, 1] (independent across tokens).
    K: draft tokens proposed per round (>= 0).
    n_rounds: number of rounds to simulate.
    generator: the torch.Generator every random draw uses.
    Returns a LongTensor [n_rounds]: tokens committed in each round = (accepted draft tokens before
    the first rejection) + 1 (the target's correction or bonus token), so each value is in [1, K + 1].
    """
    ### BEGIN SOLUTION
    accepted = torch.rand(n_rounds, K, generator=generator) < alpha
    n_accepted = accepted.long().cumprod(dim=1).sum(dim=1)
    return n_accepted + 1
    ### END SOLUTION


# %% id="test_simulate_tokens_per_round" nbgrader={"grade": true, "locked": true, "schema_version": 3, "solution": false, "task": false, "grade_id": "test_simulate_tokens_per_round", "points": 2}
g = torch.Generator().manual_seed(0)
for alpha, K in [(0.5, 4), (0.8, 3), (0.3, 1), (0.9, 8)]:
    tokens = simulate_tokens_per_round(alpha, K, 20000, g)
    assert tokens.shape == (20000,) and not tokens.is_floating_point(), (tokens.shape, tokens.dtype)
    assert int(tokens.min()) >= 1 and int(tokens.max()) <= K + 1, "each round commits 1 .. K+1 tokens"
    formula = (1 - alpha ** (K + 1)) / (1 - alpha)
    mean = float(tokens.float().mean())
    assert abs(mean - formula) < 0.06, f"alpha={alpha}, K={K}: mean {mean:.3f} tokens/round, formula {formula:.3f}"
    # the whole distribution: all K accepted with probability alpha^K, none with 1 - alpha
    assert abs(float((tokens == K + 1).float().mean()) - alpha ** K) < 0.015, (alpha, K)
    assert abs(float((tokens == 1).float().mean()) - (1 - alpha)) < 0.015, (alpha, K)
assert torch.equal(simulate_tokens_per_round(0.0, 5, 100, g), torch.ones(100, dtype=torch.long)), "alpha=0: 1 token per round"
assert torch.equal(simulate_tokens_per_round(1.0, 5, 100, g), torch.full((100,), 6)), "alpha=1: K+1 tokens per round"
print("simulate_tokens_per_round: OK")
### BEGIN HIDDEN TESTS
# K = 0 is plain decoding: one token per round
assert torch.equal(simulate_tokens_per_round(0.7, 0, 50, g), torch.ones(50, dtype=torch.long))
# seeded: the same generator state gives the same rounds
a = simulate_tokens_per_round(0.6, 4, 300, torch.Generator().manual_seed(7))
b = simulate_tokens_per_round(0.6, 4, 300, torch.Generator().manual_seed(7))
assert torch.equal(a, b), "draw every random number from `generator`"
# the full histogram against the truncated geometric law (chi-square)
alpha, K = 0.65, 5
tokens = simulate_tokens_per_round(alpha, K, 20000, torch.Generator().manual_seed(1))
law = np.array([alpha ** i * (1 - alpha) for i in range(K)] + [alpha ** K])
counts = np.bincount(tokens.numpy() - 1, minlength=K + 1)
assert stats.chisquare(counts, law * counts.sum()).pvalue > 1e-4, counts
### END HIDDEN TESTS

# %% [markdown] id="c06"
# The closed form against your simulation, and what it means for speed. Left: tokens per target forward
# against $K$. Right: the speedup model $\frac{1-\alpha^{K+1}}{(1-\alpha)(1+Kc)}$ for a draft that
# costs $c$ of a target step. The value of $c$ used is the cost of the draft we measure in section 4.

# %% id="c07"
g = torch.Generator().manual_seed(0)
K_GRID = list(range(0, 9))
ALPHAS = [0.3, 0.6, 0.8, 0.9]
sim = {a: [float(simulate_tokens_per_round(a, K, CFG["sim_rounds"], g).float().mean()) for K in K_GRID] for a in ALPHAS}
closed = {a: [(1 - a ** (K + 1)) / (1 - a) for K in K_GRID] for a in ALPHAS}
SIM_MAX_ERR = max(abs(s - f) for a in ALPHAS for s, f in zip(sim[a], closed[a]))
print(f"largest |simulated - formula| over the grid: {SIM_MAX_ERR:.3f} tokens/round ({CFG['sim_rounds']} rounds each)")


# %% [markdown] id="c08"
# ## 2. The accept/resample step: why the output is exactly the target's
#
# At one position the draft sampled $x \sim q$. The target's distribution there is $p$. The rule:
#
# - **accept** $x$ with probability $\min\!\big(1, \tfrac{p(x)}{q(x)}\big)$: always when the target
#   likes $x$ at least as much as the draft did, otherwise with a random draw;
# - if rejected, **resample** from the residual $\;r = \dfrac{\max(0,\, p - q)}{\sum_v \max(0,\, p_v - q_v)}$
#   and stop the round there;
# - if all $K$ drafts are accepted, sample the **bonus** token from the target's distribution at position $K+1$.
#
# Why the output is distributed as $p$:
# $P(\text{out} = v) = q(v)\min\!\big(1, \tfrac{p(v)}{q(v)}\big) + P(\text{reject})\, r(v)
# = \min(p_v, q_v) + \big(1 - \textstyle\sum_u \min(p_u, q_u)\big)\, \frac{\max(0, p_v - q_v)}{\sum_u \max(0, p_u - q_u)}$.
# Since $\sum_u \max(0, p_u-q_u) = 1 - \sum_u \min(p_u,q_u)$, the factors cancel and $P(\text{out}=v) = \min(p_v,q_v) + \max(0, p_v-q_v) = p_v$.
# The residual puts mass exactly where the draft **under**-proposed. Each ingredient is necessary.
# Skip the random draw and you get the draft's distribution. Resample from $p$ instead of the residual
# and the tokens the draft over-proposes come out too often. Forget the bonus token and every
# fully accepted round is one token short (and the count no longer matches the formula).
#
# **Greedy is a special case.** Write greedy decoding as one-hot distributions
# (`speculative.to_probs(logits, 0.0)`). Then $p(x)/q(x)$ is 1 when the draft's token is the target's
# arg-max and 0 otherwise, and the residual is the target's arg-max. The same function does both.
#
# **Exercise 2.** One round's verification, given the target's distributions at the $K$ draft positions and
# the one after, the draft's distributions and its tokens. Use `generator` for every draw. The
# reference is transformers' `_speculative_sampling` (Algorithm 1 of Leviathan et al.), compared below.

# %% id="ex_verify_draft" nbgrader={"grade": false, "locked": false, "schema_version": 3, "solution": true, "task": false, "grade_id": "ex_verify_draft"}
def verify_draft(p: torch.Tensor, q: torch.Tensor, draft_tokens: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Accept a prefix of the draft and add one token from the target (speculative sampling).

    p: [K + 1, V] float, the target's next-token probabilities: row i (< K) at the position of
       draft token i, row K at the position after the last draft token.
    q: [K, V] float, the draft's probabilities that draft token i was sampled from.
    draft_tokens: [K] long, draft_tokens[i] ~ q[i].
    generator: the torch.Generator every random draw uses.
    Returns a LongTensor [n + 1]: the n accepted draft tokens (the prefix before the first
    rejection), then one more token: after a rejection, a sample of norm(max(0, p[n] - q[n]));
    if all K were accepted (n = K), the bonus token, a sample of p[K].
    Token i is accepted when a uniform draw u ~ U[0, 1) satisfies u < min(1, p[i, x] / q[i, x]).
    """
    ### BEGIN SOLUTION
    K = draft_tokens.shape[0]
    out = []
    for i in range(K):
        x = int(draft_tokens[i])
        accept_prob = torch.clamp(p[i, x] / q[i, x], max=1.0)  # min(1, p/q)
        if torch.rand((), generator=generator) < accept_prob:
            out.append(x)
            continue
        residual = torch.clamp(p[i] - q[i], min=0.0)
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return torch.tensor(out, dtype=torch.long)
    out.append(int(torch.multinomial(p[K], 1, generator=generator)))  # the bonus token
    return torch.tensor(out, dtype=torch.long)
    ### END SOLUTION


# %% id="test_verify_draft" nbgrader={"grade": true, "locked": true, "schema_version": 3, "solution": false, "task": false, "grade_id": "test_verify_draft", "points": 3}
# greedy, written as one-hot distributions: accept while the draft equals the target's arg-max
onehot = lambda ids, V=6: F.one_hot(torch.tensor(ids), V).float()
out = verify_draft(onehot([3, 1, 4, 0]), onehot([3, 1, 2]), torch.tensor([3, 1, 2]))
assert out.tolist() == [3, 1, 4], f"two drafts match, the third is corrected to the target's arg-max: got {out.tolist()}"
out = verify_draft(onehot([3, 1, 4, 5]), onehot([3, 1, 4]), torch.tensor([3, 1, 4]))
assert out.tolist() == [3, 1, 4, 5], f"all K accepted: add the bonus token from p[K]; got {out.tolist()}"
out = verify_draft(onehot([2, 1]), onehot([0]), torch.tensor([0]))
assert out.tolist() == [2], out.tolist()

# sampling on a toy vocabulary: the first output token must be distributed as the target's p
p0 = torch.tensor([0.05, 0.40, 0.10, 0.30, 0.05, 0.10])
q0 = torch.tensor([0.40, 0.05, 0.25, 0.05, 0.20, 0.05])
p1 = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.1, 0.1])
alpha = float(torch.minimum(p0, q0).sum())
g = torch.Generator().manual_seed(0)
N = 1200
drafts = torch.multinomial(q0, N, replacement=True, generator=g)
first, lengths = np.zeros(6), np.zeros(3)
for x in drafts.tolist():
    out = verify_draft(torch.stack([p0, p1]), q0[None], torch.tensor([x]), g)
    assert out.dtype == torch.long and 1 <= len(out) <= 2, out
    first[int(out[0])] += 1
    lengths[len(out)] += 1
law = p0.double().numpy() / float(p0.double().sum())
chi2 = stats.chisquare(first, law * N)
assert chi2.pvalue > 1e-3, f"the output is not distributed as p (chi-square p = {chi2.pvalue:.2g}): counts {first}, expected {law * N}"
acc = lengths[2] / N
assert abs(acc - alpha) < 0.04, f"acceptance rate {acc:.3f}, expected sum(min(p, q)) = {alpha:.3f}"
# every position gets its own uniform draw: with min(1, p/q) = 1/2 at both of K = 2 positions, a round
# accepts 0, 1 or 2 drafts with probabilities 1/2, 1/4, 1/4 (one draw shared by the positions: 1/2, 0, 1/2)
half = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
n_acc = np.zeros(3)
for _ in range(400):
    n_acc[len(verify_draft(torch.stack([half, half, p1]), onehot([0, 0]), torch.tensor([0, 0]), g)) - 1] += 1
assert np.abs(n_acc / 400 - [0.5, 0.25, 0.25]).max() < 0.08, \
    f"drafts accepted per round {n_acc / 400}, expected [0.5, 0.25, 0.25]: draw a new u for every position"
print(f"verify_draft: OK (toy chi-square p = {chi2.pvalue:.2f}, acceptance {acc:.3f} vs {alpha:.3f})")
### BEGIN HIDDEN TESTS
# a draft token the target rules out (p = 0) is always rejected, and the correction lies where p > q
g = torch.Generator().manual_seed(3)
p_zero = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0, 0.0])
for _ in range(40):
    out = verify_draft(torch.stack([p_zero, p1]), q0[None], torch.tensor([0]), g)
    assert len(out) == 1 and float(p_zero[int(out[0])]) > float(q0[int(out[0])]), out
# identical distributions: everything is accepted and the bonus comes from p[K]
same = torch.tensor([[0.5, 0.5, 0, 0, 0, 0], [0, 0.5, 0.5, 0, 0, 0]])
for _ in range(20):
    out = verify_draft(torch.cat([same, onehot([5])]), same, torch.tensor([0, 2]), g)
    assert out.tolist() == [0, 2, 5], out.tolist()
# the second position: given the first draft was accepted, the second output token is distributed as p1
q1 = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
P = torch.stack([onehot([1])[0], p1, onehot([0])[0]])  # the target always accepts draft token 1 first
second = np.zeros(6)
for x in torch.multinomial(q1, 1000, replacement=True, generator=g).tolist():
    out = verify_draft(P, torch.stack([onehot([1])[0], q1]), torch.tensor([1, x]), g)
    second[int(out[1])] += 1
law1 = p1.double().numpy() / float(p1.double().sum())
assert stats.chisquare(second, law1 * second.sum()).pvalue > 1e-3, second
# seeded
a = [verify_draft(torch.stack([p0, p1]), q0[None], torch.tensor([2]), torch.Generator().manual_seed(s)).tolist() for s in range(10)]
b = [verify_draft(torch.stack([p0, p1]), q0[None], torch.tensor([2]), torch.Generator().manual_seed(s)).tolist() for s in range(10)]
assert a == b, "draw every random number from `generator`"
### END HIDDEN TESTS

# %% [markdown] id="c11"
# **Against the reference.** transformers implements the same step as `_speculative_sampling`
# (it takes logits and uses the global random generator). On the same toy, with $K = 2$, both
# produce the same distribution of round outcomes (how many drafts accepted, which token ends the
# round). A two-sample $\chi^2$ test compares the two histograms.

# %% id="c12"
def hf_verify(p, q, draft_tokens, generator=None):
    """transformers' accept/resample step behind the same interface (it uses torch's global RNG)."""
    out, _ = _speculative_sampling(draft_tokens[None], q.log()[None], len(draft_tokens), p.log()[None])
    return out[0]


def round_outcomes(verify, n, seed):
    """Histogram of (accepted count, last token) over n rounds on the toy, K = 2."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    P = torch.stack([p0, p1, p0])
    Q = torch.stack([q0, q0])
    counts = np.zeros((3, 6))
    for _ in range(n):
        draft = torch.stack([torch.multinomial(Q[i], 1, generator=g)[0] for i in range(2)])
        out = verify(P, Q, draft, g)
        counts[len(out) - 1, int(out[-1])] += 1
    return counts


N_REF = 1000 if BUDGET == "full" else 200
ours, theirs = round_outcomes(verify_draft, N_REF, 1), round_outcomes(hf_verify, N_REF, 2)
keep = (ours + theirs).ravel() > 0
REF_P = stats.chi2_contingency(np.stack([ours.ravel()[keep], theirs.ravel()[keep]])).pvalue
print(f"accepted 0/1/2 drafts: yours {ours.sum(1).astype(int).tolist()}, transformers' {theirs.sum(1).astype(int).tolist()}")
print(f"two-sample chi-square over (accepted, last token): p = {REF_P:.3f} (a small p would mean the two differ)")


# %% [markdown] id="c13"
# ## 3. The loop, with two KV caches
#
# A round on real models (sequence `seq` of committed tokens, $K$ drafts):
#
# 1. **Draft** $K$ tokens autoregressively. Feed the draft the committed tokens its cache has not
#    seen (normally just the last one), then each new draft token. Keep $q_i$, the draft's distribution
#    each token came from (`to_probs(logits, temperature)`; at temperature 0 it is one-hot and you take the arg-max).
# 2. **Verify in one target forward.** Feed the target the committed tokens its cache has not seen
#    plus the $K$ drafts. The logits at the last $K+1$ positions give $p_1, \dots, p_{K+1}$
#    (`logits_to_keep=K + 1` saves computing the rest).
# 3. **Accept**: `verify(p, q, drafts, generator)` returns the $n$ accepted drafts plus one target token. Append them.
# 4. **Roll the caches back.** The target's cache now holds all $K$ drafts, but only $n$ were
#    accepted: `cache.crop(-(K - n))` drops the rest. Its next input is the token `verify` added.
#    The draft's cache holds the committed tokens and its first $K-1$ drafts: crop it to the committed
#    length minus one. When all $K$ were accepted it is *short* (it never saw draft $K$), so the
#    next round feeds it two tokens; that is why step 1 says "the tokens its cache has not seen".
#
# A cache is a `transformers.DynamicCache()`; pass it as `model(input_ids=..., cache=cache, use_cache=True)`.
# The model appends the new keys and values and takes the positions from `cache.get_seq_length()`.
# Stale entries left after a rejection are the classic bug. Nothing crashes: the target attends to
# tokens that are not in the text, and greedy output quietly stops matching.
#
# **Exercise 3.** Write the loop. It takes `verify` as an argument: the tests pass transformers'
# step (wrapped as `hf_verify` above) so that this exercise is graded on its own, and the demo passes yours.

# %% id="ex_speculative_generate" nbgrader={"grade": false, "locked": false, "schema_version": 3, "solution": true, "task": false, "grade_id": "ex_speculative_generate"}
@torch.inference_mode()
def speculative_generate(target, draft, input_ids: torch.Tensor, max_new_tokens: int, K: int, verify,
                         temperature: float = 0.0, eos_token_id: int | None = None,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """Speculative decoding of one sequence with a draft that shares the target's tokenizer.

    target, draft: causal LMs over the same vocabulary (transformers models, eval mode).
    input_ids: [1, T] long, the prompt.
    max_new_tokens: stop after this many new tokens (the output is cut to exactly this many at most).
    K: draft tokens per round (the last round drafts min(K, tokens still wanted)).
    verify: verify(p [k+1, V], q [k, V], draft_tokens [k], generator) -> LongTensor [n + 1] of
        accepted drafts plus one target token (exercise 2's signature).
    temperature: 0 for greedy (one-hot distributions, arg-max drafts), > 0 to sample.
    eos_token_id: if given, stop after this token is committed (it is kept in the output).
    generator: the torch.Generator for the draft's samples and for verify.
    Both models keep a DynamicCache; the target runs ONE forward per round on the tokens its
    cache lacks plus the k drafts, and both caches are cropped back to the committed text.
    Returns (output_ids [1, T + n_new], stats) with stats = {"target_forwards": rounds,
    "drafted": draft tokens proposed, "accepted": draft tokens accepted}.
    """
    ### BEGIN SOLUTION
    seq = input_ids[0].tolist()
    n_prompt = len(seq)
    t_cache, d_cache = DynamicCache(), DynamicCache()
    stats = {"target_forwards": 0, "drafted": 0, "accepted": 0}
    while len(seq) - n_prompt < max_new_tokens:
        k = min(K, max_new_tokens - (len(seq) - n_prompt))
        # 1. draft k tokens, one at a time, on the draft's cache
        d_in = seq[d_cache.get_seq_length():]
        drafted, q = [], []
        for _ in range(k):
            logits = draft(input_ids=torch.tensor([d_in]), cache=d_cache, use_cache=True, logits_to_keep=1).logits[0, -1]
            q_i = to_probs(logits, temperature)
            x = int(torch.multinomial(q_i, 1, generator=generator)) if temperature > 0 else int(q_i.argmax())
            drafted.append(x)
            q.append(q_i)
            d_in = [x]
        # 2. the target scores all k drafts in one forward pass
        t_in = seq[t_cache.get_seq_length():] + drafted
        logits = target(input_ids=torch.tensor([t_in]), cache=t_cache, use_cache=True,
                        logits_to_keep=k + 1).logits[0]
        stats["target_forwards"] += 1
        p = to_probs(logits, temperature)
        # 3. accept a prefix, plus one token from the target
        new = verify(p, torch.stack(q), torch.tensor(drafted), generator).tolist()
        n = len(new) - 1
        stats["drafted"] += k
        stats["accepted"] += n
        seq += new
        # 4. roll both caches back to the committed text (minus its last token, fed next round)
        t_cache.crop(-(k - n))
        extra = d_cache.get_seq_length() - (len(seq) - 1)
        if extra > 0:
            d_cache.crop(-extra)
        if eos_token_id is not None and eos_token_id in new:
            del seq[len(seq) - len(new) + new.index(eos_token_id) + 1:]
            break
    return torch.tensor([seq[:n_prompt + max_new_tokens]]), stats
    ### END SOLUTION


# %% id="test_speculative_generate" nbgrader={"grade": true, "locked": true, "schema_version": 3, "solution": false, "task": false, "grade_id": "test_speculative_generate", "points": 4}
def _hf_verify(p, q, draft_tokens, generator=None):  # transformers' step, so this test grades only the loop
    out, _ = _speculative_sampling(draft_tokens[None], q.log()[None], len(draft_tokens), p.log()[None])
    return out[0]


with speculative.threads(1):
    tiny = speculative.tiny_llama(vocab_size=32, num_layers=2, seed=0)
    tiny_drafts = {"exact copy": speculative.noisy_copy(tiny, 0.0), "noisy copy": speculative.noisy_copy(tiny, 0.5, seed=1),
                   "unrelated": speculative.tiny_llama(vocab_size=32, num_layers=1, seed=5)}
    prompt = torch.tensor([[1, 5, 7, 3, 9]])
    N = 12
    ref = tiny.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N, do_sample=False)
    calls, d_calls = [], []  # tokens fed per forward call: to the target, to the draft
    fed = lambda a, kw: (kw["input_ids"] if "input_ids" in kw else a[0]).shape[1]
    hooks = [tiny.register_forward_pre_hook(lambda m, a, kw: calls.append(fed(a, kw)), with_kwargs=True)]
    hooks += [d.register_forward_pre_hook(lambda m, a, kw: d_calls.append(fed(a, kw)), with_kwargs=True)
              for d in tiny_drafts.values()]
    try:
        for name, K in [("exact copy", 3), ("noisy copy", 1), ("noisy copy", 3), ("unrelated", 2)]:
            d = tiny_drafts[name]
            calls.clear()
            d_calls.clear()
            out, st = speculative_generate(tiny, d, prompt, N, K, _hf_verify)
            assert torch.equal(out, ref), f"{name} draft, K={K}: greedy output differs from the target's:\n{out[0, 5:].tolist()}\n{ref[0, 5:].tolist()}"
            assert st["target_forwards"] == len(calls), f"one target forward per round: {len(calls)} calls, {st['target_forwards']} rounds"
            assert calls[0] == prompt.shape[1] + K, f"round 1 feeds the prompt and the K drafts: {calls[0]} tokens"
            assert max(calls[1:], default=0) <= K + 2, f"later rounds feed only the new tokens (KV cache): {calls}"
            assert max(d_calls[1:], default=0) <= 2, \
                f"the draft keeps its own KV cache: after the prompt, only the one or two tokens it has not seen; fed {d_calls}"
            if name == "exact copy":
                assert st["accepted"] == st["drafted"] == N - st["target_forwards"], st
                assert st["target_forwards"] == math.ceil(N / (K + 1)), st
    finally:
        for hook in hooks:
            hook.remove()
    # never more than max_new_tokens: here the last round drafts 2 tokens, accepts both and adds a third
    out, _ = speculative_generate(tiny, tiny_drafts["exact copy"], prompt, 6, 3, _hf_verify)
    assert out.shape == (1, 5 + 6) and torch.equal(out, ref[:, :5 + 6]), f"max_new_tokens=6: {out.shape[1] - 5} new tokens"
    print("speculative_generate: OK (greedy output = target's, one target forward per round, KV caches used)")
### BEGIN HIDDEN TESTS
with speculative.threads(1):
    # the accepted counts match an independent replay of greedy drafting on the target's own text
    d = tiny_drafts["noisy copy"]
    for K in (4,):
        out, st = speculative_generate(tiny, d, prompt, N, K, _hf_verify)
        full_ref = ref[0].tolist()
        L, rounds, accepted = prompt.shape[1], 0, 0
        while L - prompt.shape[1] < N:
            k = min(K, N - (L - prompt.shape[1]))
            guess = d.generate(torch.tensor([full_ref[:L]]), attention_mask=torch.ones(1, L, dtype=torch.long),
                               max_new_tokens=k, do_sample=False)[0, L:].tolist()
            n = 0
            while n < k and L + n < len(full_ref) and guess[n] == full_ref[L + n]:
                n += 1
            rounds, accepted, L = rounds + 1, accepted + n, L + n + 1
        assert (st["target_forwards"], st["accepted"]) == (rounds, accepted), (st, rounds, accepted)
        # and transformers' assisted generation with the same draft and K agrees
        speculative.configure_assistant(d, K)
        hf = tiny.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N, do_sample=False, assistant_model=d)
        assert torch.equal(out, hf)
    # eos: stop right after it, like generate
    eos = int(ref[0, prompt.shape[1] + 6])
    tiny.generation_config.eos_token_id = eos
    try:
        ref_eos = tiny.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N, do_sample=False)
    finally:
        tiny.generation_config.eos_token_id = None
    out, _ = speculative_generate(tiny, tiny_drafts["unrelated"], prompt, N, 3, _hf_verify, eos_token_id=eos)
    assert torch.equal(out, ref_eos), (out, ref_eos)
    # sampling with an exact copy as the draft: p == q, so every draft is accepted; seeded
    a, st = speculative_generate(tiny, tiny_drafts["exact copy"], prompt, 8, 3, _hf_verify, temperature=1.0,
                                 generator=torch.Generator().manual_seed(0))
    assert a.shape == (1, 5 + 8) and st["accepted"] == st["drafted"], st
    # max_new_tokens is respected for every K
    for K in (2, 5):
        out, _ = speculative_generate(tiny, tiny_drafts["unrelated"], prompt, 5, K, _hf_verify)
        assert out.shape == (1, 5 + 5) and torch.equal(out, ref[:, :5 + 5]), (K, out)
### END HIDDEN TESTS

# %% [markdown] id="c16"
# ## 4. The real model: a draft that shares the tokenizer
#
# Speculation needs a draft over the **same vocabulary**: the target scores the draft's token ids as
# its own. (transformers can also bridge two tokenizers, "universal assisted generation", at a
# cost in acceptance.) The cheapest same-tokenizer draft is the target itself with most of its
# layers cut: keep the first $L$ decoder layers, the final norm and the tied head, an **early exit**.
# LayerSkip (Elhoushi et al. 2024) drafts this way, after training the target (layer dropout and an
# early-exit loss) so that its early layers predict well; we use the exit untrained. Self-speculative
# decoding in the sense of Draft & Verify (Zhang et al. 2023) builds its draft differently: it skips a
# searched-for subset of the *intermediate* layers and keeps the rest, so no extra model is trained.
# `speculative.cut_draft(teacher, L)` builds the early exit.
#
# We measure three candidates on the teacher's own greedy replies (the text the draft will have to guess):
# - **greedy α**: how often the draft's arg-max equals the target's,
# - **sampling α**: $\sum_v \min(p_v, q_v)$ at temperature 1, averaged over positions,
# - **c**: the wall-clock cost of one draft decode step relative to one target step (KV cache, batch 1).
#
# All three cuts keep the full 49,152 × 576 embedding and output head (28M of the 135M parameters).
# That puts a floor under $c$ that no amount of layer cutting removes.

# %% id="c17"
requests = speculative.EVAL_REQUESTS[:CFG["alpha_requests"]]
replies = speculative.teacher_replies(teacher, tok, requests, CFG["alpha_tokens"])
prompt_lens = [speculative.chat_ids(tok, r).shape[1] for r in requests]
with torch.inference_mode():
    target_logits = [teacher(input_ids=s[None]).logits[0, P - 1:-1].float() for s, P in zip(replies, prompt_lens)]


@torch.inference_mode()
def step_seconds(model, n_steps=8):
    """Median seconds of one cached decode step (batch 1, a ~40-token context)."""
    cache = DynamicCache()
    model(input_ids=replies[0][None, :40], cache=cache, use_cache=True)
    times = []
    for i in range(n_steps):
        start = time.perf_counter()
        model(input_ids=replies[0][None, 40 + i:41 + i], cache=cache, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


T_STEP = step_seconds(teacher)
candidates = {}
for L in tqdm(CFG["draft_layers"], desc="draft candidates"):
    d = speculative.cut_draft(teacher, L)
    with torch.inference_mode():
        greedy_hits, overlap = [], []
        for s, P, t_log in zip(replies, prompt_lens, target_logits):
            d_log = d(input_ids=s[None]).logits[0, P - 1:-1].float()
            greedy_hits.append((d_log.argmax(-1) == t_log.argmax(-1)).float())
            overlap.append(torch.minimum(d_log.softmax(-1), t_log.softmax(-1)).sum(-1))
    candidates[L] = dict(model=d, params=d.num_parameters(), alpha_greedy=float(torch.cat(greedy_hits).mean()),
                         alpha_sample=float(torch.cat(overlap).mean()), c=step_seconds(d) / T_STEP)


def predicted_speedup(alpha, K, c):
    return (1 - alpha ** (K + 1)) / (1 - alpha) / (1 + K * c) if alpha < 1 else (K + 1) / (1 + K * c)


n_pos = sum(len(t) for t in target_logits)
print(f"measured on {n_pos} reply positions of {len(requests)} teacher replies")
print(f"{'layers':>6} {'params':>12} {'greedy α':>9} {'sampling α':>11} {'c':>6}  best predicted speedup (K)")
for L, r in candidates.items():
    best_K = max(range(1, 9), key=lambda K: predicted_speedup(r["alpha_greedy"], K, r["c"]))
    r["best"] = (predicted_speedup(r["alpha_greedy"], best_K, r["c"]), best_K)
    print(f"{L:>6} {r['params']:>12,} {r['alpha_greedy']:>9.3f} {r['alpha_sample']:>11.3f} {r['c']:>6.2f}  "
          f"{r['best'][0]:.2f}x (K={best_K})")
DRAFT_LAYERS = max(candidates, key=lambda L: candidates[L]["best"][0])
draft = candidates[DRAFT_LAYERS]["model"]
ALPHA_G, ALPHA_S, C_DRAFT = (candidates[DRAFT_LAYERS][k] for k in ("alpha_greedy", "alpha_sample", "c"))
print(f"\nchosen draft: the first {DRAFT_LAYERS} layers (greedy α {ALPHA_G:.3f}, c {C_DRAFT:.2f})")

# %% [markdown] id="c18"
# Read the table before the timings. A cut draft that was never trained to exit early agrees with the
# target rarely, and with the $\alpha$ and $c$ measured here the speedup model above already predicts
# the outcome. Drafts trained for the job (a distilled small model; EAGLE or Medusa heads on the
# target's own features, section 7) guess far better; `speculative.load_draft(teacher, tok, L,
# steps=...)` distils the cut draft on the teacher's replies (KL to the teacher, embeddings frozen) and
# caches it, if you want to see how far a few minutes of training move $\alpha$. It is not run here
# because it takes longer than this lesson's budget. Section 7 instead shows a draft that needs no
# training at all, on a task that suits it.
#
# The left plot is section 1's simulation; the right is the speedup model with this draft's $c$.

# %% id="c19"
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for i, a in enumerate(ALPHAS):
    axes[0].plot(K_GRID, closed[a], color=f"C{i}", label=f"α = {a} (formula)")
    axes[0].plot(K_GRID, sim[a], "o", color=f"C{i}", ms=4)
    axes[1].plot(K_GRID[1:], [predicted_speedup(a, K, C_DRAFT) for K in K_GRID[1:]], color=f"C{i}", label=f"α = {a}")
axes[1].plot(K_GRID[1:], [predicted_speedup(ALPHA_G, K, C_DRAFT) for K in K_GRID[1:]], "k--",
             label=f"our draft, α = {ALPHA_G:.2f}")
axes[0].set(title="tokens per target forward (dots: your simulation)", xlabel="K (draft tokens per round)", ylabel="tokens")
axes[1].axhline(1, color="gray", lw=0.8)
axes[1].set(title=f"predicted speedup, draft cost c = {C_DRAFT:.2f}", xlabel="K", ylabel="× plain decoding")
for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
plt.show()

# %% [markdown] id="c20"
# ## 5. Greedy: identical text, and the clock
#
# For each $K$ we decode the same request three ways, all greedy, all with a KV cache:
# plain `teacher.generate`, your `speculative_generate` (with your `verify_draft`), and
# `teacher.generate(assistant_model=draft)` with the same draft and the same fixed $K$
# (`speculative.configure_assistant` pins transformers to $K$ drafts per round; by default it
# adapts $K$ and stops drafting early when the draft is unsure). All three must produce the same tokens.
#
# In the same run we measure the two things speculation competes with:
# - the **KV-cache speedup**: `generate(use_cache=False)` recomputes the whole prefix at every step;
# - the **batching gain**: tokens/s of `generate` on a batch of `CFG["batch"]` requests against one.
# Timings are the best of `CFG["timing_repeats"]` runs. Other processes on the machine add noise,
# so compare the ratios measured side by side here. Other runs' absolute numbers will differ.

# %% id="c21"
prompt_ids = speculative.chat_ids(tok, speculative.EVAL_REQUESTS[0])
ones = torch.ones_like(prompt_ids)
N_NEW, REPS = CFG["timing_tokens"], CFG["timing_repeats"]
EOS = tok.eos_token_id
results = {}


def run_generate(ids=prompt_ids, **kw):
    with torch.inference_mode():
        out = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW,
                               do_sample=False, pad_token_id=EOS, **kw)
    results["last"] = out
    return (out.shape[1] - ids.shape[1]) * ids.shape[0]


def run_mine(K):
    out, st = speculative_generate(teacher, draft, prompt_ids, N_NEW, K, verify_draft, temperature=0.0, eos_token_id=EOS)
    results["last"], results["stats"] = out, st
    return out.shape[1] - prompt_ids.shape[1]


tps_base, _ = speculative.tokens_per_second(run_generate, REPS)
base_out = results["last"]
n_new = base_out.shape[1] - prompt_ids.shape[1]
print(f"plain greedy generate (KV cache): {n_new} tokens, {tps_base:.2f} tokens/s")
print("reply:", repr(tok.decode(base_out[0, prompt_ids.shape[1]:])))

SPEC = {}
for K in tqdm(CFG["Ks"], desc="K"):
    tps_mine, _ = speculative.tokens_per_second(lambda: run_mine(K), REPS)
    mine_out, st = results["last"], results["stats"]
    speculative.configure_assistant(draft, K)
    tps_hf, _ = speculative.tokens_per_second(lambda: run_generate(assistant_model=draft), REPS)
    hf_out = results["last"]
    assert torch.equal(mine_out, base_out), f"K={K}: your speculative output differs from the target's greedy output"
    assert torch.equal(hf_out, base_out), f"K={K}: transformers' assisted output differs from plain greedy"
    SPEC[K] = dict(tps_mine=tps_mine, tps_hf=tps_hf, tokens_per_forward=n_new / st["target_forwards"],
                   formula=(1 - ALPHA_G ** (K + 1)) / (1 - ALPHA_G), accepted=st["accepted"], drafted=st["drafted"],
                   rounds=st["target_forwards"])

tps_nocache, _ = speculative.tokens_per_second(lambda: run_generate(use_cache=False), 1)
assert torch.equal(results["last"], base_out)
batch_ids = prompt_ids.repeat(CFG["batch"], 1)
tps_batch, _ = speculative.tokens_per_second(lambda: run_generate(ids=batch_ids), REPS)
KV_SPEEDUP, BATCH_GAIN = tps_base / tps_nocache, tps_batch / tps_base
LOAD = os.getloadavg()[0]

print("\ngreedy outputs identical to plain generate for every K: True (asserted)")
print(f"{'K':>3} {'yours tok/s':>12} {'HF tok/s':>9} {'yours/HF':>9} {'speedup':>8} {'tokens/forward':>15} {'formula':>8}")
for K, r in SPEC.items():
    print(f"{K:>3} {r['tps_mine']:>12.2f} {r['tps_hf']:>9.2f} {r['tps_mine'] / r['tps_hf']:>9.2f} "
          f"{r['tps_mine'] / tps_base:>7.2f}x {r['tokens_per_forward']:>15.2f} {r['formula']:>8.2f}")
print(f"\nKV cache: {tps_base:.2f} vs {tps_nocache:.2f} tokens/s without it -> {KV_SPEEDUP:.2f}x")
print(f"batching: {tps_batch:.2f} tokens/s at batch {CFG['batch']} vs {tps_base:.2f} at batch 1 -> {BATCH_GAIN:.2f}x")
print(f"(1-minute load average during the run: {LOAD:.1f} on {os.cpu_count()} cores)")

# %% id="c22"
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
Ks = list(SPEC)
axes[0].plot(Ks, [SPEC[K]["tokens_per_forward"] for K in Ks], "o-", label="measured (your loop)")
axes[0].plot(Ks, [SPEC[K]["formula"] for K in Ks], "s--", label=f"formula, greedy α = {ALPHA_G:.2f}")
axes[0].set(title="tokens per target forward", xlabel="K", ylabel="tokens")
labels = ["no KV cache", "KV cache\n(baseline)"] + [f"spec K={K}" for K in Ks] + [f"batch {CFG['batch']}"]
values = [1 / KV_SPEEDUP, 1.0] + [SPEC[K]["tps_mine"] / tps_base for K in Ks] + [BATCH_GAIN]
colors = ["C7", "C0"] + ["C1"] * len(Ks) + ["C2"]
axes[1].bar(labels, values, color=colors)
axes[1].axhline(1, color="k", lw=0.8)
axes[1].set(title="tokens/s relative to greedy generate with a KV cache", ylabel="×")
axes[1].tick_params(axis="x", labelsize=8)
for ax in axes:
    ax.grid(alpha=0.3, axis="y")
axes[0].legend()
plt.show()

# %% [markdown] id="c23"
# ## 6. Sampling: the target's distribution, on the real model at one position
#
# The promise for sampling is distributional: each speculative sample is a sample from the target.
# We run your loop (your `verify_draft`, temperature 1) for one new token `CFG["sample_runs"]` times
# from the same prompt. Each run drafts from the cut draft, whose distribution $q$ is far from the
# target's $p$, and the count of each first token is compared with the target's exact $p$ at that
# position ($\chi^2$ goodness of fit; tokens with an expected count below 5 are pooled). A
# $p$-value that is not tiny means no evidence of a difference. It does not prove equality; the
# toy test in section 2 has the power for that.

# %% id="c24"
K_S = CFG["Ks"][-1]
with torch.inference_mode():
    p_pos = to_probs(teacher(input_ids=prompt_ids).logits[0, -1], CFG["temperature"])
    q_pos = to_probs(draft(input_ids=prompt_ids).logits[0, -1], CFG["temperature"])
gen = torch.Generator().manual_seed(0)
counts, accepted = {}, 0
for _ in tqdm(range(CFG["sample_runs"]), desc="sampled runs"):
    out, st = speculative_generate(teacher, draft, prompt_ids, 1, K_S, verify_draft, temperature=CFG["temperature"], generator=gen)
    tok_id = int(out[0, -1])
    counts[tok_id] = counts.get(tok_id, 0) + 1
    accepted += st["accepted"]
n_runs = CFG["sample_runs"]
expected = p_pos.numpy().astype(np.float64) * n_runs
big = [int(v) for v in np.nonzero(expected >= 5)[0]]
obs = [counts.get(v, 0) for v in big] + [n_runs - sum(counts.get(v, 0) for v in big)]
exp = [expected[v] for v in big] + [n_runs - expected[big].sum()]
SAMPLE_P = float(stats.chisquare(obs, np.array(exp) * sum(obs) / sum(exp)).pvalue) if len(obs) > 1 else float("nan")
ALPHA_POS = float(torch.minimum(p_pos, q_pos).sum())
print(f"at this position: sampling α = sum(min(p, q)) = {ALPHA_POS:.3f}; draft accepted in {accepted}/{n_runs} runs")
print(f"{'token':>14} {'observed':>9} {'expected':>9}")
for v, o, e in zip(big, obs, exp):
    print(f"{tok.decode([v])!r:>14} {o:>9} {e:>9.1f}")
print(f"{'(all others)':>14} {obs[-1]:>9} {exp[-1]:>9.1f}")
print(f"chi-square goodness of fit against the target's p: p-value {SAMPLE_P:.3f}")

# %% [markdown] id="pl_intro"
# ## 7. A draft that fits the task: prompt lookup on tool calls
#
# The cut draft lost for two reasons measured above: it rarely guesses the target's token (low
# $\alpha$), and it is not cheap (its head alone sets $c$). Both change when the text to be written
# is largely **already in the context**. Lesson 12's router replies are such a text: in
#
# `<tool_call>{"name":"get_weather","arguments":{"city":"Lisbon"}}</tool_call>`
#
# the format comes from the worked examples in the prompt, the tool name and the argument keys from the
# tool catalogue in the system message, and "Lisbon" from the user's request. **Prompt lookup
# decoding** (Saxena 2023, `apoorvumang/prompt-lookup-decoding`; transformers'
# `generate(prompt_lookup_num_tokens=K)`; llama.cpp's lookup decoding) drafts without any model: find
# the last few tokens of the text earlier in the context, and propose the tokens that followed them
# there. A draft step is a search over a few hundred token ids, so $c \approx 0$, and when the reply
# copies, the proposals are right.
#
# **Exercise 4.** `prompt_lookup_draft(context, K, max_ngram, eos_token_id)`, the rule transformers'
# `PromptLookupCandidateGenerator` applies (the tests compare you with it on thousands of contexts):
#
# 1. Try n-gram sizes $n$ from `min(max_ngram, len(context) - 1)` **down to** 1 (a longer match is
#    stronger evidence). The n-gram is the last $n$ tokens of `context`.
# 2. For one $n$, look at the places where that n-gram occurs in `context`, **earliest first** (the
#    occurrence at the very end is the n-gram itself and has nothing after it). The first occurrence
#    with at least one token after it wins: propose the up to $K$ tokens that follow it (never past the
#    end of `context`).
# 3. Cut the proposal before its first `eos_token_id` (a draft that ran past the end of an earlier turn
#    would let the target accept the end of a turn and keep going). Return what is left, which may be
#    empty; do not go on searching after a winner has been cut to nothing.
# 4. No occurrence with a continuation for any $n$: return `[]` (that round is plain decoding).

# %% id="ex_prompt_lookup_draft" nbgrader={"grade": false, "locked": false, "schema_version": 3, "solution": true, "task": false, "grade_id": "ex_prompt_lookup_draft"}
def prompt_lookup_draft(context: list[int], K: int, max_ngram: int = 3, eos_token_id: int | None = None) -> list[int]:
    """Propose up to K draft tokens by copying what followed the context's last n-gram earlier in it.

    context: the token ids so far (prompt + committed reply), a list of ints.
    K: the most tokens to propose (>= 1).
    max_ngram: the longest n-gram to match (>= 1); shorter ones are tried when it has no match.
    eos_token_id: if given, the proposal is cut before its first occurrence.
    Returns a list of at most K ints, [] when nothing matched (transformers' rule, see above).
    """
    ### BEGIN SOLUTION
    L = len(context)
    for n in range(min(max_ngram, L - 1), 0, -1):
        tail = context[L - n:]
        for i in range(L - n + 1):
            if context[i:i + n] == tail and i + n < L:
                proposal = context[i + n:min(i + n + K, L)]
                if eos_token_id is not None and eos_token_id in proposal:
                    proposal = proposal[:proposal.index(eos_token_id)]
                return list(proposal)
    return []
    ### END SOLUTION


# %% id="test_prompt_lookup_draft" nbgrader={"grade": true, "locked": true, "schema_version": 3, "solution": false, "task": false, "grade_id": "test_prompt_lookup_draft", "points": 2}
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator


def _hf_lookup(context, K, max_ngram, eos=None):
    """transformers' prompt-lookup proposal for `context` (the reference)."""
    gen = PromptLookupCandidateGenerator(eos_token_id=None if eos is None else torch.tensor([eos]),
                                         num_output_tokens=K, max_matching_ngram_size=max_ngram, max_length=10 ** 9)
    ids, _ = gen.get_candidates(torch.tensor([context]))
    return ids[0, len(context):].tolist()


# the last 2-gram (7, 8) occurred at position 1: propose what followed it
assert prompt_lookup_draft([5, 7, 8, 9, 4, 7, 8], K=2, max_ngram=2) == [9, 4], prompt_lookup_draft([5, 7, 8, 9, 4, 7, 8], 2, 2)
assert prompt_lookup_draft([5, 7, 8, 9, 4, 7, 8], K=10, max_ngram=2) == [9, 4, 7, 8], "at most K, never past the end"
assert prompt_lookup_draft([1, 2, 3, 4], K=3, max_ngram=3) == [], "no earlier occurrence: no proposal"
assert prompt_lookup_draft([3, 1, 2, 6, 3], K=2, max_ngram=3) == [1, 2], "falls back to shorter n-grams"
assert prompt_lookup_draft([3, 2, 0, 9, 2, 5, 9, 2], K=4, max_ngram=3, eos_token_id=5) == [], "cut before eos"
for ctx, K, n in [([5, 7, 8, 9, 4, 7, 8], 2, 2), ([3, 1, 2, 6, 3], 2, 3), ([1, 1, 1, 1], 2, 1)]:
    assert prompt_lookup_draft(ctx, K, n) == _hf_lookup(ctx, K, n), (ctx, K, n)
print("prompt_lookup_draft: OK")
### BEGIN HIDDEN TESTS
# the earliest occurrence wins, not the latest: (4, 6) is followed by 1 first, then by 2
assert prompt_lookup_draft([4, 6, 1, 0, 4, 6, 2, 0, 4, 6], K=1, max_ngram=2) == [1]
# the longest n-gram wins: 1-gram 6 occurs at 1 (-> 1), the 3-gram (0, 4, 6) only at 3 (-> 2)
assert prompt_lookup_draft([9, 6, 1, 0, 4, 6, 2, 0, 4, 6], K=1, max_ngram=3) == [2]
# the copy starts after the n-gram, not at it
assert prompt_lookup_draft([7, 3, 5, 7, 3], K=2, max_ngram=2) == [5, 7]
# a winner cut to nothing by eos ends the search (transformers does not look further)
assert prompt_lookup_draft([4, 2, 4, 9, 4], K=3, max_ngram=1, eos_token_id=2) == []
g_pl = torch.Generator().manual_seed(0)
for trial in range(3000):
    L_ = int(torch.randint(1, 40, (1,), generator=g_pl))
    V_ = int(torch.randint(2, 9, (1,), generator=g_pl))
    ctx = torch.randint(0, V_, (L_,), generator=g_pl).tolist()
    K_, n_ = int(torch.randint(1, 7, (1,), generator=g_pl)), int(torch.randint(1, 5, (1,), generator=g_pl))
    eos_ = None if trial % 3 == 0 else int(torch.randint(0, V_, (1,), generator=g_pl))
    got = prompt_lookup_draft(ctx, K_, n_, eos_)
    assert isinstance(got, list) and all(isinstance(t, int) for t in got), type(got)
    assert got == _hf_lookup(ctx, K_, n_, eos_), (ctx, K_, n_, eos_, got, _hf_lookup(ctx, K_, n_, eos_))
### END HIDDEN TESTS

# %% [markdown] id="pl_task_md"
# ### The task: the router's replies to held-out requests
#
# The target is the model as shipped, prompted as lesson 12's router with **worked examples**: the
# system message with the tool catalogue, then four requests with their correct replies as earlier
# turns of the conversation (`speculative.tool_call_messages`: one weather call, one currency
# conversion, one request that needs no tool, one timer), then a held-out request from lesson 12's test
# split. The examples are what lesson 12's fine-tuning replaces; here they are what the draft copies
# from. The target writes its greedy reply (batched, left-padded; up to `CFG["pl_new_tokens"]` tokens).
# Whether those replies are *correct* calls is lesson 12's question; speculation only has to reproduce
# them exactly, faster. We print how many are well formed and how many call the right tool.

# %% id="pl_task"
tool_train, tool_test = tools.load_tool_data("train"), tools.load_tool_data("test", CFG["pl_requests"])
SHOTS = speculative.few_shot_rows(tool_train)
EOS = tok.eos_token_id
pl_messages = [speculative.tool_call_messages(r["request"], SHOTS) for r in tool_test]
pl_seqs = speculative.teacher_replies(teacher, tok, pl_messages, CFG["pl_new_tokens"], batch_size=CFG["pl_batch"])
pl_prompts = [speculative.chat_ids(tok, m)[0].tolist() for m in pl_messages]
pl_replies = [s[len(p):].tolist() for s, p in zip(pl_seqs, pl_prompts)]


def reply_call(text):
    """The call in a reply of lesson 12's format: a dict, None for the no-tool reply, "malformed" otherwise."""
    text = text.strip()
    if text == tools.NO_TOOL_REPLY:
        return None
    if text.startswith(tools.CALL_OPEN) and text.endswith(tools.CALL_CLOSE):
        try:
            call = json.loads(text[len(tools.CALL_OPEN):-len(tools.CALL_CLOSE)])
            return call if isinstance(call, dict) else "malformed"
        except ValueError:
            return "malformed"
    return "malformed"


pl_calls = [reply_call(tok.decode(r, skip_special_tokens=True)) for r in pl_replies]
WELL_FORMED = sum(c != "malformed" for c in pl_calls)
RIGHT_TOOL = sum((c["name"] if isinstance(c, dict) else c) == (r["call"]["name"] if r["call"] else None)
                 for c, r in zip(pl_calls, tool_test) if c != "malformed")
PL_TOKENS = sum(len(r) for r in pl_replies)
print(f"{len(tool_test)} held-out requests, prompts of {min(map(len, pl_prompts))}-{max(map(len, pl_prompts))} "
      f"tokens ({len(SHOTS)} worked examples); {PL_TOKENS} reply tokens in all")
print(f"well-formed replies: {WELL_FORMED}/{len(pl_calls)}; the right tool (or rightly none): {RIGHT_TOOL}/{len(pl_calls)}")
for r, rep in list(zip(tool_test, pl_replies))[:3]:
    print(f"  {r['request']!r} -> {tok.decode(rep)!r}")

# %% [markdown] id="pl_alpha_md"
# ### Acceptance and tokens per target forward, across $K$
#
# Greedy verification keeps the longest prefix of a proposal that equals the target's own greedy
# continuation. The proposal is a function of the text so far, so the target's reply fixes every round,
# and `speculative.replay_greedy_rounds` replays them exactly, with your `prompt_lookup_draft` as the
# proposer, for each $K$: per round the tokens proposed $k_r$ (0 when nothing matched) and the drafts
# kept $n_r$. From those:
#
# - **$\alpha$**, the acceptance rate per verified position: $\sum_r n_r$ over the positions the
#   verification reached, $\sum_r \big(n_r + [n_r < k_r]\big)$ (every kept draft, and the first
#   rejected one; the drafts after a rejection are never looked at). This is the $\alpha$ of section
#   1's formula. Its 95 % interval resamples **requests** (a bootstrap over replies: positions within a
#   reply are not independent);
# - the share of proposed tokens that were kept, $\sum n_r / \sum k_r$ (what serving engines report as
#   the draft acceptance rate; it falls with $K$ by construction);
# - **tokens per target forward**, measured, against section 1's formula with this $\alpha$, and
#   against the same formula averaged over the proposals actually made,
#   $\frac{1}{R}\sum_r \frac{1-\alpha^{k_r+1}}{1-\alpha}$: a round without a match buys one token
#   whatever $\alpha$ is.

# %% id="pl_alpha"
def lookup(context, K):
    return prompt_lookup_draft(context, K, CFG["pl_ngram"], EOS)


def tokens_formula(alpha, k):
    return (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1


def alpha_of(acc, tested):
    return float(np.sum(acc) / max(np.sum(tested), 1))


PL = {}
for K in CFG["pl_Ks"]:
    runs = [speculative.replay_greedy_rounds(p, r, lookup, K, CFG["pl_new_tokens"]) for p, r in zip(pl_prompts, pl_replies)]
    acc = np.array([s["accepted"] for s in runs])
    tested = np.array([sum(n + (n < k) for n, k in zip(s["kept"], s["proposed"])) for s in runs])
    proposed = [k for s in runs for k in s["proposed"]]
    alpha = alpha_of(acc, tested)
    rounds = sum(s["rounds"] for s in runs)
    PL[K] = dict(alpha=alpha, interval=speculative.bootstrap_interval(alpha_of, acc, tested),
                 kept_share=float(acc.sum() / max(sum(proposed), 1)), positions=int(tested.sum()),
                 matched=float(np.mean([k > 0 for k in proposed])), tokens_per_forward=PL_TOKENS / rounds,
                 formula=tokens_formula(alpha, K), formula_proposals=float(np.mean([tokens_formula(alpha, k) for k in proposed])),
                 kept=[n for s in runs for n, k in zip(s["kept"], s["proposed"]) if k == K])

print(f"{'K':>3} {'α per position [95% CI]':>25} {'positions':>9} {'kept/proposed':>13} {'rounds w/ match':>15} "
      f"{'tokens/forward':>14} {'formula':>8} {'formula on proposals':>20}")
for K, r in PL.items():
    lo, hi = r["interval"]
    print(f"{K:>3} {r['alpha']:>9.3f} [{lo:.3f}, {hi:.3f}] {r['positions']:>9} {r['kept_share']:>13.3f} {r['matched']:>15.2f} "
          f"{r['tokens_per_forward']:>14.2f} {r['formula']:>8.2f} {r['formula_proposals']:>20.2f}")
K_BIG = max(PL)
print(f"\nthe cut draft's greedy α was {ALPHA_G:.3f}; prompt lookup's α at K={K_BIG} is {PL[K_BIG]['alpha']:.3f}")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
Ks_pl = list(PL)
axes[0].plot(Ks_pl, [PL[K]["tokens_per_forward"] for K in Ks_pl], "o-", label="measured (replay)")
axes[0].plot(Ks_pl, [PL[K]["formula"] for K in Ks_pl], "s--", label="formula, α of that K")
axes[0].plot(Ks_pl, [PL[K]["formula_proposals"] for K in Ks_pl], "^:", label="formula on the proposals made")
axes[0].set(title="prompt lookup: tokens per target forward", xlabel="K", ylabel="tokens", xscale="log")
axes[0].set_xticks(Ks_pl, [str(K) for K in Ks_pl])
kept = np.bincount(np.array(PL[K_BIG]["kept"], dtype=int), minlength=K_BIG + 1)
a = PL[K_BIG]["alpha"]
law = np.array([a ** i * (1 - a) for i in range(K_BIG)] + [a ** K_BIG]) * kept.sum()
axes[1].bar(np.arange(K_BIG + 1) - 0.2, kept, 0.4, label="measured")
axes[1].bar(np.arange(K_BIG + 1) + 0.2, law, 0.4, label=f"independent acceptances, α = {a:.2f}")
axes[1].set(title=f"drafts kept in rounds that proposed K = {K_BIG}", xlabel="drafts kept", ylabel="rounds")
for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
plt.show()
ALL_OR_NOTHING = (kept[0] + kept[-1]) / max(kept.sum(), 1)
print(f"K={K_BIG}: {ALL_OR_NOTHING:.0%} of the full-length proposals were kept entirely or not at all "
      f"(independent acceptances at α = {a:.2f} predict {(law[0] + law[-1]) / max(law.sum(), 1e-9):.0%})")

# %% [markdown] id="pl_clock_md"
# ### The clock: prompt lookup and the cut draft against plain decoding
#
# Tokens per forward is not speed. Verifying $k$ drafts means one target forward on $k+1$ positions,
# and on a CPU that costs more than a forward on one. We measure that cost first
# (`speculative.forward_seconds`: a cached forward on $n$ new positions after a tool-call prompt), and
# the prefill of the prompt, which every method pays once.
#
# Then on `CFG["pl_time_requests"]` of the requests we time, interleaved, `CFG["pl_time_repeats"]`
# times each (the median counts): plain greedy `generate`; `generate(prompt_lookup_num_tokens=K,
# max_matching_ngram_size=...)` for each $K$ in `CFG["pl_time_Ks"]`; and `generate(assistant_model=
# draft)` with section 4's cut draft at its best predicted $K$. Every output must equal plain
# decoding's, token for token. A forward hook counts the target's forward calls in each prompt-lookup
# run; they must equal the rounds your proposer gives in the replay of that run's reply, which checks
# the replay (and your `prompt_lookup_draft`) against transformers' own loop. The speed-up is the ratio
# of total times, with a 95 % bootstrap interval over requests. The same costs give a prediction:
# prefill, then one forward on $k_r + 1$ positions per round, against prefill and one single-position
# forward per token.

# %% id="pl_clock"
time_ids = [torch.tensor([p]) for p in pl_prompts[:CFG["pl_time_requests"]]]
N_POS = list(range(1, max(CFG["pl_time_Ks"]) + 2))
T_POS = {n: speculative.forward_seconds(teacher, time_ids[0], n) for n in N_POS}
prefill_times = []
with torch.inference_mode():
    for _ in range(3):
        start = time.perf_counter()
        teacher(input_ids=time_ids[0], logits_to_keep=1)
        prefill_times.append(time.perf_counter() - start)
T_PREFILL = float(np.median(prefill_times))
print(f"target forward, {time_ids[0].shape[1]}-token context: prefill {T_PREFILL * 1e3:.0f} ms; on n new positions: "
      + ", ".join(f"n={n} {T_POS[n] * 1e3:.0f} ms ({T_POS[n] / T_POS[1]:.2f}x)" for n in N_POS if n in (1, 2, 3, 5, 9, 17)))

K_CUT = candidates[DRAFT_LAYERS]["best"][1]
speculative.configure_assistant(draft, K_CUT)
methods = {"plain": {}} | {f"prompt lookup K={K}": {"prompt_lookup_num_tokens": K, "max_matching_ngram_size": CFG["pl_ngram"]}
                           for K in CFG["pl_time_Ks"]} | {f"cut draft ({DRAFT_LAYERS} layers) K={K_CUT}": {"assistant_model": draft}}
forwards = []
hook = teacher.register_forward_pre_hook(lambda m, a, kw: forwards.append(1), with_kwargs=True)
times = {name: [[] for _ in time_ids] for name in methods}
outputs, calls = {}, {}
try:
    for rep in tqdm(range(CFG["pl_time_repeats"]), desc="timing repeats"):
        order = list(methods)[rep % len(methods):] + list(methods)[:rep % len(methods)]  # rotate the order
        for i, ids in enumerate(time_ids):
            for name in order:
                forwards.clear()
                with torch.inference_mode():
                    start = time.perf_counter()
                    out = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=CFG["pl_new_tokens"],
                                           do_sample=False, pad_token_id=EOS, **methods[name])
                    times[name][i].append(time.perf_counter() - start)
                outputs[name, i], calls[name, i] = out, len(forwards)
finally:
    hook.remove()

for name in methods:
    for i in range(len(time_ids)):
        assert torch.equal(outputs[name, i], outputs["plain", i]), f"{name}, request {i}: output differs from plain greedy"
plain_replies = [outputs["plain", i][0, ids.shape[1]:].tolist() for i, ids in enumerate(time_ids)]
for K in CFG["pl_time_Ks"]:
    for i, ids in enumerate(time_ids):
        replay = speculative.replay_greedy_rounds(ids[0].tolist(), plain_replies[i], lookup, K, CFG["pl_new_tokens"])
        assert replay["rounds"] == calls[f"prompt lookup K={K}", i], \
            f"K={K}, request {i}: generate ran {calls[f'prompt lookup K={K}', i]} target forwards, the replay {replay['rounds']} rounds"
print(f"every output identical to plain greedy; prompt lookup's target forwards = the replay's rounds "
      f"on all {len(time_ids)} requests (asserted)")

med = {name: np.array([np.median(t) for t in ts]) for name, ts in times.items()}


def total_ratio(a, b):
    return float(np.sum(a) / np.sum(b))


CLOCK = {}
for name in methods:
    if name == "plain":
        continue
    CLOCK[name] = dict(speedup=total_ratio(med["plain"], med[name]),
                       interval=speculative.bootstrap_interval(total_ratio, med["plain"], med[name]),
                       per_request=med["plain"] / med[name])
for K in CFG["pl_time_Ks"]:   # what the measured forward costs predict for these replies
    pred_plain, pred = 0.0, 0.0
    for i, ids in enumerate(time_ids):
        replay = speculative.replay_greedy_rounds(ids[0].tolist(), plain_replies[i], lookup, K, CFG["pl_new_tokens"])
        pred_plain += T_PREFILL + (len(plain_replies[i]) - 1) * T_POS[1]
        pred += T_PREFILL + sum(T_POS[k + 1] for k in replay["proposed"][1:])
    CLOCK[f"prompt lookup K={K}"]["predicted"] = pred_plain / pred
n_tok = sum(len(r) for r in plain_replies)
print(f"{len(time_ids)} requests, {n_tok} reply tokens, median of {CFG['pl_time_repeats']} timing(s) each; "
      f"plain greedy: {n_tok / med['plain'].sum():.1f} tokens/s")
print(f"{'method':>28} {'speed-up [95% CI]':>22} {'per request (min-max)':>22} {'predicted':>9}")
for name, r in CLOCK.items():
    lo, hi = r["interval"]
    print(f"{name:>28} {r['speedup']:>7.2f}x [{lo:.2f}, {hi:.2f}] {r['per_request'].min():>12.2f}-{r['per_request'].max():.2f}x "
          + (f"{r['predicted']:>8.2f}x" if "predicted" in r else f"{'-':>9}"))
PL_BEST = max((n for n in CLOCK if n.startswith("prompt lookup")), key=lambda n: CLOCK[n]["speedup"])
CUT_NAME = next(n for n in CLOCK if n.startswith("cut draft"))
print(f"best: {PL_BEST} at {CLOCK[PL_BEST]['speedup']:.2f}x; the cut draft: {CLOCK[CUT_NAME]['speedup']:.2f}x "
      f"(1-minute load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")

fig, ax = plt.subplots(figsize=(8, 3.4))
names = list(CLOCK)
vals = [CLOCK[n]["speedup"] for n in names]
err = np.array([[v - CLOCK[n]["interval"][0] for n, v in zip(names, vals)], [CLOCK[n]["interval"][1] - v for n, v in zip(names, vals)]])
ax.barh(names, vals, xerr=np.nan_to_num(err), color=["C1" if n.startswith("prompt") else "C7" for n in names], capsize=3)
ax.axvline(1, color="k", lw=0.8)
ax.set(title="wall-clock speed-up over plain greedy decoding on tool calls (95% CI)", xlabel="×")
ax.grid(alpha=0.3, axis="x")
plt.show()

# %% [markdown] id="pl_llama_md"
# ### One real engine's speculative path: llama.cpp with a prompt-lookup draft
#
# llama-cpp-python ships the same idea as a draft model, `LlamaPromptLookupDecoding(num_pred_tokens=K,
# max_ngram_size=...)` (the same earliest-match rule, without the cut at end-of-turn), passed as
# `Llama(..., draft_model=...)`. Its loop evaluates the committed token and the drafts in one
# `llama_decode`, samples at each position and drops the KV cells after the first mismatch. We run
# the shipped Q4_1 GGUF file with and without it on the same requests at temperature 0, interleaved,
# and count the replies that match, each other and transformers' greedy replies. Both engines are
# warmed up on another prompt first, so both reuse the KV cache of the shared prefix (system message and
# examples) from one request to the next. Note what this engine does to support drafts: with a
# `draft_model` it keeps the logits of **every** evaluated position (`logits_all`), which costs a
# vocabulary-sized row per token.
#
# Speculation is exact only if scoring $k+1$ positions in one call gives the same logits as scoring
# them one at a time. In exact arithmetic it does; in floating point, llama.cpp's kernels for a batch of
# tokens may sum in another order than its one-token path, and a greedy choice between two nearly tied
# tokens can flip. Where the two llama.cpp replies part, we print the target's gap between its two
# best logits at that position (from transformers, same weights in fp32), next to the gaps over all
# reply positions: a gap far below the typical one says the replies parted at a near tie.

# %% id="pl_llama"
K_LLAMA = max(CFG["pl_time_Ks"])
engines = {"llama.cpp": speculative.load_llama_lookup(models.gguf_path(), None),
           f"llama.cpp + prompt lookup K={K_LLAMA}": speculative.load_llama_lookup(models.gguf_path(), K_LLAMA, CFG["pl_ngram"])}
plain_name, lookup_name = list(engines)
n_llama = min(CFG["pl_llama_requests"], len(pl_prompts) - 1)
for llm in engines.values():
    speculative.llama_greedy(llm, pl_prompts[-1], 4)  # warm-up: the shared prefix is now in the KV cache
l_times = {name: [] for name in engines}
l_out = {name: [] for name in engines}
for i in tqdm(range(n_llama), desc="llama.cpp"):
    for name in (list(engines) if i % 2 == 0 else list(engines)[::-1]):
        ids, seconds = speculative.llama_greedy(engines[name], pl_prompts[i], CFG["pl_new_tokens"])
        l_times[name].append(seconds)
        l_out[name].append(ids)
del engines
L_SPEEDUP = total_ratio(l_times[plain_name], l_times[lookup_name])
L_INTERVAL = speculative.bootstrap_interval(total_ratio, l_times[plain_name], l_times[lookup_name])
L_MATCH = sum(a == b for a, b in zip(l_out[plain_name], l_out[lookup_name]))
L_AS_HF = {name: sum(a == b for a, b in zip(out, pl_replies)) for name, out in l_out.items()}
print(f"{n_llama} requests: {plain_name} {sum(l_times[plain_name]):.2f} s, {lookup_name} {sum(l_times[lookup_name]):.2f} s "
      f"-> speed-up {L_SPEEDUP:.2f}x [{L_INTERVAL[0]:.2f}, {L_INTERVAL[1]:.2f}]")
print(f"replies identical with and without the draft: {L_MATCH}/{n_llama}; identical to transformers' greedy reply: "
      + ", ".join(f"{name} {k}/{n_llama}" for name, k in L_AS_HF.items()))
# where the two llama.cpp replies part, is the target nearly tied? (transformers' fp32 logits, same weights)
margins_all = torch.cat([speculative.top2_margins(teacher, p + r, len(p)) for p, r in zip(pl_prompts, pl_replies)])
split = [(i, speculative.first_difference(a, b)) for i, (a, b) in enumerate(zip(l_out[plain_name], l_out[lookup_name]))]
split = [(i, d) for i, d in split if d is not None and d < min(len(l_out[plain_name][i]), len(l_out[lookup_name][i]))]
L_SPLIT_MARGINS = [float(speculative.top2_margins(teacher, pl_prompts[i] + l_out[plain_name][i][:d + 1], len(pl_prompts[i]) + d)[0])
                   for i, d in split]
print(f"top-2 logit gap of the target over all reply positions: median {margins_all.median():.2f}, "
      f"10th percentile {margins_all.quantile(0.1):.2f}; at the {len(split)} first point(s) where the two llama.cpp "
      f"replies part: " + (", ".join(f"{m:.2f}" for m in L_SPLIT_MARGINS) or "none"))
print("a reply:", repr(tok.decode(l_out[lookup_name][0])))

# %% [markdown] id="pl_read"
# ### Reading the results, and where drafts come from in production
#
# Read the rows above side by side. The cut draft and prompt lookup are verified by the same rule and
# give the same text; what differs is $\alpha$ and $c$. The cut draft guesses the next token rarely and
# costs a good fraction of a target step; prompt lookup costs a string search, and on replies that copy
# their context its $\alpha$ is many times the cut draft's. The clock then depends on one more measured
# number, what a forward on $k+1$ positions costs against a forward on one on this CPU; the
# "predicted" column turns those costs and the replayed rounds into the speed-up they imply, and the
# gap to the measured column is what the model leaves out (the Python around each round, the cache
# bookkeeping, noise from other processes). The histogram says how far the independent-acceptance
# model of section 1 is from a copying draft: acceptances come in runs (a copied span is right or
# wrong as a whole), so whole proposals are kept or dropped more often than independent coin flips at
# the same $\alpha$ predict.
#
# The llama.cpp rows are a separate measurement of the same idea in another engine: its loop is
# Python around llama.cpp, and with a draft it computes and copies the logits of every evaluated
# position, costs our transformers loop does not have. Read its speed-up and its identical-reply count
# above rather than assuming the transformers result carries over.
#
# Prompt lookup wins only where the output repeats the input: structured calls, extraction, code edits,
# answers that quote a document (RAG). On free text (section 4's requests) it rarely finds a match and
# degrades to plain decoding at the cost of a search. Drafts that work on any text are trained:
#
# - a **distilled** small model of the same family (`speculative.load_draft(..., steps=...)` distils the
#   cut draft; not run here, its training takes longer than this lesson's budget);
# - **Medusa** (Cai et al. 2024) adds extra decoding heads on the target's last hidden state, head $i$
#   predicting the token $i+1$ positions ahead, and verifies a *tree* of their top candidates in one
#   forward with a tree-shaped attention mask. No second model, but the heads must be trained;
# - **EAGLE** (Li et al. 2024) drafts at the feature level: a one-layer autoregressive head reads the
#   target's second-to-top-layer features together with the embedding of the token sampled, predicts the
#   next feature vector and reuses the target's own LM head to turn it into a token, again with a tree
#   of drafts. Because it sees the target's features, it guesses far better than a small model of its
#   own. Their papers report, on 7B-70B targets on GPUs, 2.2-3.6x (Medusa) and 2.7-3.5x (EAGLE, LLaMA2-
#   Chat 70B) lower latency; none of that was measured here.
#
# Engines ship all of this: vLLM (`speculative_config`: a draft model, n-gram lookup, EAGLE or Medusa
# heads), llama.cpp (`llama-speculative` with `--model-draft`, and `llama-lookup` for n-gram drafts),
# and the llama-cpp-python path run above.


# %% [markdown] id="c25"
# ## What we measured
#
# The break-even $\alpha$ of the cut draft comes from section 1's speedup model with the measured $c$:
# the smallest $\alpha$ at which some $K$ reaches 1.0x. At $K = 1$ the model reads $1 + \alpha = 1 + c$,
# so it is $\alpha = c$ (and no $\alpha$ breaks even when $c \ge 1$, recorded as 1.0); every larger
# $K$ needs more.

# %% id="c26"
from scipy.optimize import brentq

BREAK_EVEN = min((brentq(lambda a, K=K: predicted_speedup(a, K, C_DRAFT) - 1, 1e-9, 1 - 1e-9)
                  for K in range(1, 9) if predicted_speedup(1 - 1e-9, K, C_DRAFT) > 1), default=1.0)
PL_BEST_K = int(PL_BEST.split("K=")[1])
rows = [
    {"quantity": "toy: largest |simulated - formula| tokens per round", "value": round(SIM_MAX_ERR, 4), "unit": "tokens",
     "note": f"{CFG['sim_rounds']} rounds per (α, K)"},
    {"quantity": "toy: your verify_draft vs transformers' _speculative_sampling", "value": round(REF_P, 4),
     "unit": "chi-square p", "note": f"{N_REF} rounds each, K=2"},
]
for L, r in candidates.items():
    rows.append({"quantity": f"draft = first {L} layers: greedy α / sampling α / cost c", "value":
                 f"{r['alpha_greedy']:.3f} / {r['alpha_sample']:.3f} / {r['c']:.2f}", "unit": "-",
                 "note": f"{r['params']:,} params; {n_pos} positions" + (" (chosen)" if L == DRAFT_LAYERS else "")})
for K, r in SPEC.items():
    rows += [
        {"quantity": f"K={K}: tokens per target forward, measured vs formula", "value": round(r["tokens_per_forward"], 3),
         "unit": "tokens", "note": f"formula {r['formula']:.3f} with greedy α {ALPHA_G:.3f}; {r['accepted']}/{r['drafted']} drafts accepted"},
        {"quantity": f"K={K}: speculative speedup (your loop) vs plain generate", "value": round(r["tps_mine"] / tps_base, 3), "unit": "x",
         "note": f"{r['tps_mine']:.2f} vs {tps_base:.2f} tokens/s"},
        {"quantity": f"K={K}: speculative speedup (transformers assisted) vs plain generate", "value": round(r["tps_hf"] / tps_base, 3), "unit": "x"},
        {"quantity": f"K={K}: your loop / transformers' assisted generation", "value": round(r["tps_mine"] / r["tps_hf"], 3),
         "unit": "tokens/s ratio", "note": "same draft, same K, same output"},
    ]
rows += [
    {"quantity": "KV-cache speedup (generate, cache vs none)", "value": round(KV_SPEEDUP, 3), "unit": "x", "note": f"{n_new} new tokens"},
    {"quantity": f"batching gain (generate, batch {CFG['batch']} vs 1)", "value": round(BATCH_GAIN, 3), "unit": "x tokens/s"},
    {"quantity": "greedy output identical to the target's (every K, yours and transformers')", "value": "yes", "unit": "-"},
    {"quantity": "real model, one position: sampled first token vs target's p", "value": round(SAMPLE_P, 4), "unit": "chi-square p",
     "note": f"{n_runs} runs, K={K_S}, α here {ALPHA_POS:.3f}"},
    {"quantity": "load average during the timings", "value": round(LOAD, 2), "unit": "processes", "note": f"{os.cpu_count()} cores"},
    {"quantity": "break-even greedy α at the cut draft's cost c", "value": round(BREAK_EVEN, 4), "unit": "alpha",
     "note": f"c = {C_DRAFT:.3f}; the speedup model (1-α^(K+1))/((1-α)(1+Kc)) reaches 1 first at K=1, where α = c"},
    {"quantity": "tool calls: well-formed replies of the target", "value": f"{WELL_FORMED}/{len(pl_calls)}", "unit": "replies",
     "note": f"{len(SHOTS)} worked examples; right tool (or none) {RIGHT_TOOL}/{len(pl_calls)}"},
]
for K, r in PL.items():
    rows.append({"quantity": f"tool calls, prompt lookup K={K}: α; tokens per target forward (formula)",
                 "value": f"{r['alpha']:.3f}; {r['tokens_per_forward']:.2f} ({r['formula']:.2f}, on proposals {r['formula_proposals']:.2f})",
                 "unit": "-", "note": f"α 95% CI [{r['interval'][0]:.3f}, {r['interval'][1]:.3f}] over {len(pl_replies)} replies, {r['positions']} positions"})
rows += [
    {"quantity": "tool calls, prompt lookup: greedy α", "value": round(PL[PL_BEST_K]["alpha"], 4), "unit": "alpha",
     "note": f"K={PL_BEST_K}; 95% CI [{PL[PL_BEST_K]['interval'][0]:.3f}, {PL[PL_BEST_K]['interval'][1]:.3f}]"},
    {"quantity": "tool calls, prompt lookup: best wall-clock speedup", "value": round(CLOCK[PL_BEST]["speedup"], 4), "unit": "x",
     "note": f"{PL_BEST}; 95% CI [{CLOCK[PL_BEST]['interval'][0]:.2f}, {CLOCK[PL_BEST]['interval'][1]:.2f}], {len(time_ids)} requests, "
             f"predicted {CLOCK[PL_BEST]['predicted']:.2f}x"},
    {"quantity": "tool calls, cut draft: wall-clock speedup", "value": round(CLOCK[CUT_NAME]["speedup"], 4), "unit": "x",
     "note": f"{CUT_NAME}; 95% CI [{CLOCK[CUT_NAME]['interval'][0]:.2f}, {CLOCK[CUT_NAME]['interval'][1]:.2f}]"},
    {"quantity": "tool calls, llama.cpp prompt lookup: wall-clock speedup", "value": round(L_SPEEDUP, 4), "unit": "x",
     "note": f"K={K_LLAMA}; 95% CI [{L_INTERVAL[0]:.2f}, {L_INTERVAL[1]:.2f}]; {n_llama} requests"},
    {"quantity": "tool calls, llama.cpp: replies identical with and without the lookup draft", "value": f"{L_MATCH}/{n_llama}",
     "unit": "replies", "note": "top-2 logit gaps where they part: " + (", ".join(f"{m:.2f}" for m in L_SPLIT_MARGINS) or "none")
     + f" (median over all positions {margins_all.median():.2f})"},
]
report.record_results("14_speculative", BUDGET, rows).fillna("")

# %% [markdown] id="c27"
# ## What to take away
#
# - **The arithmetic.** A round yields $\frac{1-\alpha^{K+1}}{1-\alpha}$ tokens per target forward,
#   at most $1/(1-\alpha)$ however large $K$ is, and the draft's own cost divides that. Speculation
#   pays when $\alpha$ is high **and** the draft is much cheaper than the target.
# - **The rule is exact.** Accept with $\min(1, p/q)$, resample from $\mathrm{norm}(\max(0, p-q))$,
#   add the bonus token when all $K$ pass. The output is then the target's distribution: greedy gave
#   identical text above, and sampling passed the $\chi^2$ tests. Drop any one piece and the
#   statistical test catches it. Nothing else would, because the text still looks fine.
# - **The honest beat.** Compare the rows of the table. On a 135M model on a CPU, the KV cache and
#   batching are the big levers, and a cut draft's speculation is at best a small change and often a
#   slowdown: the target is already small, so a draft cannot be much cheaper (the shared 28M-parameter
#   head alone sets $c$), its $\alpha$ has to clear the break-even $\alpha = c$ recorded above, and a
#   CPU's forward on $K+1$ tokens is not free.
# - **A draft that fits the task changes the answer.** On tool calls, prompt lookup costs a string
#   search and copies names, keys and values from the prompt; compare its $\alpha$ and its measured
#   speed-up with the cut draft's in the table, on the same requests and the same target, with the same
#   output. It pays only where the output copies the input (structured calls, extraction, quoting a
#   retrieved document, code edits); elsewhere it finds few matches and is plain decoding.
# - **Where speculation earns its reputation**: large targets (7B+) on GPUs, where decoding is
#   memory-bound and a forward on $K+1$ positions costs about as much as on one, with drafts trained for
#   the job (distilled models, EAGLE and Medusa heads on the target's features). vLLM
#   (`speculative_config`) and llama.cpp (`llama-speculative`, `llama-lookup`) ship it. For a small
#   model, first cache, then batch, then quantize (lesson 6); measure before you speculate.
