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
# # Lesson 2 — Knowledge distillation I: the teacher, and capturing its logits
#
# SmolLM2-135M-Instruct answers our coffee-review question ("positive or negative?") well. A student
# cut from it — one of its 30 layers, about a quarter of its parameters — starts out no better than a
# coin flip (lesson 4 puts measured numbers on both). **Knowledge distillation** is how the small
# model learns to behave like the big one, and lessons 2–4 do it end to end:
#
# | lesson | what happens |
# |---|---|
# | **2 (this one)** | run the teacher **once** over the training texts and write down what it believes, per token, to `teacher_capture.jsonl` |
# | 3 | train students from that file with the KD loss |
# | 4 | decide whether the student retained enough quality to ship |
#
# **You will build**
# 1. `topk_logprobs` — the teacher's *k* most likely next tokens and their log-probabilities, from raw logits.
# 2. `check_same_tokenizer` — evidence, not hope, that teacher and student give every token id the same meaning.
# 3. `write_capture` / `read_capture` — the capture file (JSON lines, a fixed schema), and a reader that
#    refuses a file made with another tokenizer.
#
# **You will measure**, on the real teacher: its "dark knowledge" at the answer position, how much
# probability the top-*k* keep as *k* grows, what each *k* costs in bytes, the file's round-trip error,
# and the price of the one expensive teacher pass.

# %% id="parameters" tags=["parameters"]
import os
BUDGET = os.environ.get("BREWSLM_BUDGET", "full")

# %% id="setup" nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
# %matplotlib inline
import copy
import gzip
import json
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm.auto import tqdm

from brewslm_helpers import budget, capture, distill, models, plots, report
from brewslm_helpers.data import load_reviews
from brewslm_helpers.paths import artifact_dir

torch.manual_seed(0)
CFG = budget.pick(
    BUDGET,
    ci={"N_TEXTS": 8, "BATCH": 8, "CAPTURE_K": 8, "K_LIST": [1, 2, 4, 8, 16, 32, 64], "N_SIZE_TEXTS": 4},
    full={"N_TEXTS": 600, "BATCH": 8, "CAPTURE_K": 16, "K_LIST": [1, 2, 4, 8, 16, 32, 64], "N_SIZE_TEXTS": 100},
)
CAPTURE_KEYS = capture.CAPTURE_KEYS    # the schema's keys, in order (see distill's docstring)
SPECIAL_ROLES = capture.SPECIAL_ROLES  # ("bos_token", "eos_token", "pad_token", "unk_token")

teacher, tok = models.load_teacher()
N_PARAMS = sum(p.numel() for p in teacher.parameters())
VOCAB = teacher.config.vocab_size
print(f"budget {BUDGET}: {CFG}")
print(f"teacher {models.MODEL_NAME}: {N_PARAMS:,} parameters, vocabulary {VOCAB:,} tokens")


# %% [markdown] id="why-distillation"
# ## 1. Why distillation works
#
# At every position a language model outputs not a word but a **distribution over its whole
# vocabulary** — 49,152 probabilities for SmolLM2. Ordinary training uses one number from it: the
# probability of the token that actually came next (the **hard label**), which cross-entropy pushes
# towards 1. Everything else the model computed is thrown away.
#
# Hinton, Vinyals and Dean (2015) called the thrown-away part **dark knowledge**. Suppose a teacher
# reads *"the espresso was bitter but the staff were lovely"* and, asked for the sentiment, puts a
# little more probability on "positive" than on "negative". The hard label says "positive, 100 %";
# the teacher says *"nearly a coin flip"*. After *"The coffee was"*, a teacher that spreads its
# probability over "great", "good" and "excellent" is saying *these words are interchangeable here*.
# A student trained to match the teacher's whole distribution — the **soft target** — gets that
# information at every position of every text: far more signal per example than one correct token.
# The student minimises a divergence between the two distributions, position by position:
#
# $$\mathcal{L}_{\text{KD}} = \sum_t \mathrm{KL}\Big(p_{\text{teacher}}(\cdot \mid x_{<t}) \;\Big\|\; p_{\text{student}}(\cdot \mid x_{<t})\Big)$$
#
# (lesson 3 adds the temperature and the mix with the hard label).
#
# **The offline workflow.** On a fixed set of training texts the teacher's distributions do not depend
# on the student. So run the teacher **once**, write its distributions to disk, and train any number
# of students — other sizes, learning rates, seeds — from the file, with no teacher in memory. The
# expensive forward pass is paid once; every student epoch just reads a file. (*Online* distillation
# runs the teacher next to the student at every step instead. You need it when the texts change from
# step to step — e.g. on-policy distillation, where the student generates the text — and you pay the
# teacher's compute at every step.)
#
# **Why only the top-k.** A full distribution is 49,152 floats per position, ~197 KB in float32 — a
# few hundred short texts would take gigabytes. But a trained language model's distribution is
# usually peaked: at most positions most of the mass sits on a handful of tokens. So per position we
# keep the **top-k** token ids with their log-probabilities, plus the probability they cover (`covered_mass`); the remaining
# `1 − covered_mass` is spread over the other ~49 thousand tokens. Section 7 measures how large *k*
# has to be, and where the "usually" fails.
#
# **The same-tokenizer assumption.** A token id in the file means one specific string to the teacher.
# A student trained from the file must give that id the same meaning, and must cut every text into
# the same tokens, so that position *t* is the same piece of text for both. Students cut from the
# teacher share its tokenizer by construction — but "by construction" is a claim; the file stores a
# fingerprint of the tokenizer that produced it, so any reader can check it (section 3).

# %% [markdown] id="topk-idea"
# ## 2. Exercise: the teacher's top-k log-probabilities
#
# A causal LM returns **logits** $z \in \mathbb{R}^{V}$ at every position; the log-probability of token
# $v$ is
#
# $$\log p(v) = z_v - \log\sum_{u=1}^{V} e^{z_u} \qquad (\texttt{log\_softmax}),$$
#
# and we keep the $k$ largest, most likely first, with $\texttt{covered\_mass} = \sum_{\text{kept}} p(v)$.
# Nearly two lines of torch — the exercise is choosing the right two. Three details decide whether the
# file tells the truth:
#
# - **Normalise over the full vocabulary, then select.** Taking the $k$ largest logits first and applying
#   `log_softmax` to those $k$ *renormalises* them: the stored probabilities then always sum to 1,
#   `covered_mass` is always 1, and the file silently forgets how much the top-k missed. The schema
#   says *log-probs under the full softmax*; how to treat the missing mass is lesson 3's decision, and
#   it can only make it if the file keeps the information.
# - **Stay in log space.** `softmax(z).log()` underflows: a probability below float32's smallest
#   positive number (~1e-45) becomes 0 and its log `-inf`. `log_softmax` computes $z - \mathrm{logsumexp}(z)$
#   with the maximum subtracted first, finite for any finite logits.
# - **Compute in float32.** Teachers are often run in bfloat16, whose 8-bit mantissa puts errors of
#   hundredths of a nat into every log-prob. Upcast the logits first.
#
# The reference is `torch.log_softmax` followed by `torch.topk`; the tests compare with exactly that.

# %% id="ex-topk-logprobs" nbgrader={"grade": false, "grade_id": "ex_topk_logprobs", "locked": false, "schema_version": 3, "solution": true, "task": false}
def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    '''The k most likely next tokens at every position, with log-probs under the FULL softmax.

    logits: [..., V] float tensor (any float dtype, any number of leading dimensions).
    k:      tokens to keep per position, 1 <= k <= V (otherwise raise ValueError).

    Returns (ids, logprobs, covered_mass):
      ids          [..., k] long     token ids, most likely first
      logprobs     [..., k] float32  log p(token) under the softmax over all V tokens (nats, <= 0),
                                     sorted descending
      covered_mass [...]    float32  exp(logprobs).sum(-1): the probability the k tokens cover, in (0, 1]
    Computed in float32 whatever the input dtype; finite for any finite logits.
    '''
    ### BEGIN SOLUTION
    V = logits.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, {V}], got {k}")
    logprobs_full = torch.log_softmax(logits.float(), dim=-1)
    top_lp, top_ids = torch.topk(logprobs_full, k, dim=-1)
    covered_mass = top_lp.exp().sum(dim=-1)
    return top_ids, top_lp, covered_mass
    ### END SOLUTION


# %% id="test-topk-logprobs" nbgrader={"grade": true, "grade_id": "test_topk_logprobs", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
# 1. A distribution you can check by hand: p = (1/2, 1/4, 1/8, 1/8), given as logits (log p + any constant).
p = torch.tensor([0.5, 0.25, 0.125, 0.125])
ids, lp, mass = topk_logprobs(p.log() + 3.0, 2)
assert ids.tolist() == [0, 1], ids
assert torch.allclose(lp, torch.tensor([0.5, 0.25]).log(), atol=1e-6), f"log-probs under the FULL softmax: {lp}"
assert abs(float(mass) - 0.75) < 1e-6, f"the top-2 cover 3/4 of the full distribution, got {float(mass)}"

# 2. Against torch's reference on a batch of positions [B, T, V].
torch.manual_seed(0)
logits = torch.randn(2, 5, 100) * 3
ids, lp, mass = topk_logprobs(logits, 8)
ref_lp, ref_ids = torch.log_softmax(logits, dim=-1).topk(8, dim=-1)
assert ids.shape == (2, 5, 8) and lp.shape == (2, 5, 8) and mass.shape == (2, 5), (ids.shape, lp.shape, mass.shape)
assert ids.dtype == torch.long and lp.dtype == torch.float32 and mass.dtype == torch.float32
assert torch.equal(ids, ref_ids)
assert torch.allclose(lp, ref_lp, atol=1e-5)
assert torch.allclose(mass, ref_lp.exp().sum(-1), atol=1e-5)
assert (lp[..., :-1] >= lp[..., 1:]).all(), "most likely first"
assert (mass < 1).all(), "8 of 100 tokens cannot cover all the mass"
print("topk_logprobs: visible tests passed")
### BEGIN HIDDEN TESTS
# k = V keeps everything
_, _, m_all = topk_logprobs(torch.randn(3, 17), 17)
assert torch.allclose(m_all, torch.ones(3), atol=1e-5)
# one position, no leading dimensions
i1, l1, m1 = topk_logprobs(torch.tensor([2.0, 0.0, 1.0]), 2)
assert i1.tolist() == [0, 2] and m1.shape == () and l1.shape == (2,)
# huge logits: log-space, finite
_, lh, mh = topk_logprobs(torch.tensor([[1000.0, 0.0, -1000.0]]), 3)
assert torch.isfinite(lh).all(), lh
assert torch.allclose(lh, torch.tensor([[0.0, -1000.0, -2000.0]]), atol=1e-3), lh
# bfloat16 in, float32 out, computed in float32
xb = (torch.randn(4, 6, 300) * 4).bfloat16()
ib, lb, mb = topk_logprobs(xb, 5)
full_b = torch.log_softmax(xb.float(), dim=-1)
assert lb.dtype == torch.float32 and mb.dtype == torch.float32 and ib.dtype == torch.long
assert torch.allclose(lb, full_b.topk(5, dim=-1).values, atol=1e-5)
assert torch.allclose(full_b.gather(-1, ib), lb, atol=1e-5)
assert torch.allclose(mb, lb.exp().sum(-1), atol=1e-5)
# 4-D input
i4, l4, m4 = topk_logprobs(torch.randn(2, 2, 3, 40), 4)
assert i4.shape == (2, 2, 3, 4) and m4.shape == (2, 2, 3)
# k out of range
for bad_k in (0, 301):
    try:
        topk_logprobs(xb, bad_k)
    except ValueError:
        pass
    else:
        raise AssertionError(f"k={bad_k} must raise ValueError")
### END HIDDEN TESTS

# %% [markdown] id="tokenizer-idea"
# ## 3. Exercise: checking the same-tokenizer assumption
#
# Token-level distillation assumes teacher and student tokenize identically. When they don't, **nothing
# crashes**: the teacher's id for " positive" is some other token to the student, position *t* of the
# teacher is a different piece of text from position *t* of the student, and the student dutifully
# learns noise while its loss goes down. So check — three things, each a different way to be wrong:
#
# 1. **The vocabulary: the same token → id map.** Not merely the same *size*: swap two ids and the size
#    and the set of tokens are unchanged while two tokens have traded meanings. Compare the maps.
#    (The everyday case is milder: someone adds a pad token to the student's tokenizer — one more
#    token, every other id unchanged, but an id the teacher never produced.)
# 2. **The special tokens** (`bos_token`, `eos_token`, `pad_token`, `unk_token`): they decide where chat
#    turns end, where generation stops, and which positions are padding — i.e. where the loss is masked.
# 3. **Behaviour on real text.** Two tokenizers with identical vocabularies can still cut a text
#    differently (another normaliser, pre-tokeniser or merge list). Only encoding some probe texts with
#    both and comparing the ids catches that; no inspection of the vocabulary can.
#
# Your check collects every difference and raises **one** `ValueError` that *names* them. "Tokenizers
# differ" alone sends someone hunting for an hour; "`'<|pad|>'` only in the second" ends the hunt.
#
# The capture file will carry a compact fingerprint of (1) and (2) — `capture.tokenizer_fingerprint(tok)`,
# the sha256 of the id-sorted vocabulary and the special tokens, in `brewslm_helpers/capture.py` — so that
# a reader can verify a file against its own tokenizer without the teacher's at hand. A fingerprint can
# only say *whether* two tokenizers differ; your check says *how*, and (3) covers what a fingerprint of
# the vocabulary cannot see.

# %% id="ex-check-tokenizer" nbgrader={"grade": false, "grade_id": "ex_check_tokenizer", "locked": false, "schema_version": 3, "solution": true, "task": false}
def check_same_tokenizer(a, b, probe_texts: list[str] = ()) -> None:
    '''Raise ValueError if tokenizers `a` and `b` could disagree about what a token id means.

    a, b: transformers tokenizers. Use a.get_vocab() (dict token -> id, added tokens included),
          the attributes named in SPECIAL_ROLES (a string, or None when unset), and
          a(text, add_special_tokens=False)["input_ids"] to encode.
    probe_texts: texts to encode with both tokenizers; their ids must be equal.

    Collect every problem, then raise ONE ValueError whose message names them:
      - the vocabulary sizes, if they differ;
      - tokens in one vocabulary and not the other (name them; up to 5 per side is enough);
      - tokens in both with different ids (name them; up to 5 is enough);
      - each role in SPECIAL_ROLES whose token differs (name the role, e.g. "eos_token");
      - each probe text whose ids differ (quote the text).
    Return None when nothing differs.
    '''
    ### BEGIN SOLUTION
    problems = []
    va, vb = a.get_vocab(), b.get_vocab()
    if len(va) != len(vb):
        problems.append(f"vocabulary size {len(va)} vs {len(vb)}")
    only_a, only_b = sorted(set(va) - set(vb)), sorted(set(vb) - set(va))
    if only_a:
        problems.append(f"{len(only_a)} token(s) only in the first: {only_a[:5]}")
    if only_b:
        problems.append(f"{len(only_b)} token(s) only in the second: {only_b[:5]}")
    moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])
    if moved:
        problems.append(f"{len(moved)} token(s) with different ids: "
                        + ", ".join(f"{t!r} {va[t]} vs {vb[t]}" for t in moved[:5]))
    for role in SPECIAL_ROLES:
        token_a, token_b = getattr(a, role, None), getattr(b, role, None)
        if token_a != token_b:
            problems.append(f"{role} {token_a!r} vs {token_b!r}")
    for text in probe_texts:
        ids_a = a(text, add_special_tokens=False)["input_ids"]
        ids_b = b(text, add_special_tokens=False)["input_ids"]
        if ids_a != ids_b:
            problems.append(f"probe {text!r} encodes as {ids_a[:8]} vs {ids_b[:8]}")
    if problems:
        raise ValueError("tokenizers differ: " + "; ".join(problems))
    ### END SOLUTION


# %% id="test-check-tokenizer" nbgrader={"grade": true, "grade_id": "test_check_tokenizer", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
from tokenizers import Tokenizer, models as tk_models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def tiny_tokenizer(vocab, lowercase=False, **special):
    '''A word-level tokenizer over `vocab` (token -> id), built in memory in a millisecond.'''
    t = Tokenizer(tk_models.WordLevel(dict(vocab), unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    if lowercase:
        t.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", **special)


def difference(a, b, probes=()):
    '''The ValueError message of check_same_tokenizer(a, b, probes), or None if it returns.'''
    try:
        result = check_same_tokenizer(a, b, probes)
    except ValueError as e:
        return str(e)
    assert result is None, "return None when the tokenizers agree"
    return None


WORDS = {"[UNK]": 0, "[EOS]": 1, "[SEP]": 2, "great": 3, "bitter": 4, "coffee": 5, "Coffee": 6}
base = tiny_tokenizer(WORDS, eos_token="[EOS]")

# Identical tokenizers pass (the real one too).
assert difference(base, tiny_tokenizer(WORDS, eos_token="[EOS]"), ["great coffee"]) is None
assert difference(tok, tok, ["This review is positive."]) is None

# The real tokenizer against a copy with one added token (a student that got its own pad token).
padded = copy.deepcopy(tok)
padded.add_tokens(["<|brew_pad|>"])
msg = difference(tok, padded)
assert msg is not None, "an added token must be caught"
assert "<|brew_pad|>" in msg, f"name the extra token: {msg}"

# Same size, same tokens, two ids swapped: the vocabulary's SIZE cannot see this.
msg = difference(base, tiny_tokenizer(dict(WORDS, great=4, bitter=3), eos_token="[EOS]"))
assert msg is not None, "swapped ids must be caught"
assert "great" in msg or "bitter" in msg, f"name the tokens whose ids differ: {msg}"
print("check_same_tokenizer: visible tests passed")
### BEGIN HIDDEN TESTS
# a token missing from the second (argument order does not matter)
smaller = tiny_tokenizer({t: i for t, i in WORDS.items() if t != "Coffee"}, eos_token="[EOS]")
msg = difference(base, smaller)
assert msg is not None and "Coffee" in msg, msg
msg = difference(smaller, base)
assert msg is not None and "Coffee" in msg, msg
# special tokens: a different eos, a pad token on one side only
msg = difference(base, tiny_tokenizer(WORDS, eos_token="[SEP]"))
assert msg is not None and "eos_token" in msg, msg
msg = difference(base, tiny_tokenizer(WORDS, eos_token="[EOS]", pad_token="[SEP]"))
assert msg is not None and "pad_token" in msg, msg
# same vocabulary and specials, another normaliser: only a probe text can tell
lower = tiny_tokenizer(WORDS, lowercase=True, eos_token="[EOS]")
msg = difference(base, lower, ["great coffee", "Coffee was bitter"])
assert msg is not None and "Coffee was bitter" in msg, msg
assert difference(base, lower, ["great coffee"]) is None
# several problems at once are all named
many = tiny_tokenizer(dict(WORDS, great=4, bitter=3), eos_token="[SEP]")
msg = difference(base, many)
assert msg is not None and "eos_token" in msg and ("great" in msg or "bitter" in msg), msg
### END HIDDEN TESTS

# %% [markdown] id="tokenizer-demo-intro"
# ### The check on real tokenizers
#
# Three situations a distillation project actually meets:
#
# 1. the teacher's tokenizer **loaded again from disk**, as a student's training script would load it —
#    the same, as it should be (probe texts: a real training text, accents and an emoji, some code);
# 2. the teacher's tokenizer with **one added pad token** — caught, and named;
# 3. a student with **its own tokenizer** (a byte-level BPE trained on our reviews, the way a
#    from-scratch student would get one) — different in every respect. Then we read the student's
#    ids as if they were the teacher's, which is exactly what distilling across tokenizers would do
#    by accident.

# %% id="tokenizer-demo"
from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

probes = [distill.kd_texts(tok, distill.load_kd_rows(1))[0], "Ünïcödé café ☕ 12,345.67", "def f(x):\n    return x ** 2"]

# 1. the teacher's tokenizer, loaded again from disk
reloaded = models.load_tokenizer()
check_same_tokenizer(tok, reloaded, probes)
print("1. reloaded tokenizer: no difference;  fingerprint", capture.tokenizer_fingerprint(reloaded)[:23] + "...")

# 2. one added pad token
tok_with_pad = copy.deepcopy(tok)
tok_with_pad.add_tokens(["<|pad|>"])
try:
    check_same_tokenizer(tok, tok_with_pad, probes)
except ValueError as e:
    print("2. added pad token:", e)

# 3. a student with its own tokenizer: byte-level BPE trained on the review texts
bpe = Tokenizer(tk_models.BPE())
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
bpe.train_from_iterator([r["text"] for r in load_reviews("train")],
                        trainers.BpeTrainer(vocab_size=1000, show_progress=False,
                                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
own = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                              pad_token="<|im_end|>", unk_token="<|endoftext|>")
try:
    check_same_tokenizer(tok, own, probes)
    own_rejected = False
except ValueError as e:
    own_rejected = True
    print(f"3. own BPE tokenizer ({len(own)} tokens):", str(e)[:400], "...")

sentence = "The espresso was bitter but the staff were lovely."
ids_teacher = tok(sentence, add_special_tokens=False)["input_ids"]
ids_student = own(sentence, add_special_tokens=False)["input_ids"]
print(f"\n{sentence!r}")
print(f"  teacher: {len(ids_teacher)} tokens {tok.convert_ids_to_tokens(ids_teacher)}")
print(f"  student: {len(ids_student)} tokens {own.convert_ids_to_tokens(ids_student)}")
print(f"  the student's ids read by the teacher's tokenizer: {tok.decode(ids_student)!r}")

# %% [markdown] id="tokenizer-demo-after"
# The first two cases are the ones that bite: a reloaded tokenizer *should* match and now provably does;
# an added pad token is one line in someone's training script and would otherwise go unnoticed. The
# third is not a bug to fix but a different problem: a student with its own vocabulary cannot be taught
# with token-level KL at all, because the two distributions live on different supports and positions
# don't line up. Cross-tokenizer distillation exists (e.g. Universal Logit Distillation compares sorted
# probability vectors instead of token identities; other methods align tokens by text offsets), but it
# is a lossier, different method. This course keeps the student on the teacher's tokenizer.
#
# **Caveat.** The fingerprint in the file covers the vocabulary and special tokens, not the merges or
# the normaliser: two files with equal fingerprints could still come from tokenizers that cut text
# differently. That is rare in practice (it takes a hand-edited tokenizer) and the probe check above is
# the remedy. Hashing the tokenizer's full serialised JSON would cover everything, but that text changes
# between library versions, so the fingerprint would change with no change in behaviour.

# %% [markdown] id="file-idea"
# ## 4. Exercise: writing and reading the capture file
#
# The schema is fixed, because lesson 3 — written against it — reads whatever this lesson writes.
# It is documented in `brewslm_helpers/distill.py`; here it is:

# %% id="schema"
print(distill.__doc__.split("Labels follow")[0])


# %% [markdown] id="file-rules"
# **Why JSON lines.** One record per line: a file you can `head`, `grep`, stream, append to and read from
# any language. The price is size: a float costs up to ~20 characters of text instead of 4 bytes. Section 8
# measures that price; at our scale (hundreds of texts) it doesn't matter, at a million texts you'd
# switch to a binary container (safetensors, parquet, npz) with the same fields.
#
# **The writer** (`write_capture`):
# - writes **exactly** the schema's keys (a caller's extra keys are dropped);
# - turns tensors and arrays into plain lists, ids as ints, and floats at **full precision**: read back
#   and cast to float32, every number equals the one you wrote. Rounding to save space is a lossy
#   compression decision; take it deliberately and measure what it costs, never as a side effect of a
#   writer;
# - is **all-or-nothing**: validate every record first, then write a temporary file beside the target
#   and `os.replace` it into place (atomic on POSIX). A crash or an invalid record must never leave a
#   half-written capture where lesson 3 will look for one. Validation cannot foresee everything (a value
#   `json` cannot encode only fails while it is being written), so whatever fails, the old file stays
#   byte for byte as it was, and no temporary file is left behind.
#
# **The reader** (`read_capture`) validates instead of trusting:
# - every line has every schema key; `topk_ids`, `topk_logprobs` and `covered_mass` have one entry per
#   input token (*T* = `len(input_ids)`); every row of `topk_ids`/`topk_logprobs` holds *k* entries;
# - all lines share one *k* and one tokenizer fingerprint (a file mixing two tokenizers is corrupt);
# - given `expected_fingerprint` (the fingerprint of *the reader's* tokenizer), a file whose fingerprint
#   differs is **refused** with a `ValueError`. That is where "checked, not assumed" pays: a capture made
#   with another tokenizer stops the run before a student trains on it.
#
# Two exercises, each graded on its own: the tests for the reader use files written with plain `json`,
# not with your writer.

# %% id="ex-write-capture" nbgrader={"grade": false, "grade_id": "ex_write_capture", "locked": false, "schema_version": 3, "solution": true, "task": false}
def write_capture(path, records: list[dict]) -> int:
    '''Write teacher-capture records to `path` as JSON lines: one record per line, in order.

    records: dicts with at least the keys in CAPTURE_KEYS (other keys are not written). Values may
      be torch tensors, numpy arrays or plain Python lists/numbers:
        input_ids [T] ints, k int, topk_ids [T, k] ints, topk_logprobs [T, k] floats,
        covered_mass [T] floats; id, tokenizer_fingerprint and teacher are strings.
    Writes exactly the CAPTURE_KEYS; ids as ints, floats at full precision (read back and cast to
    float32, they equal the input exactly: no rounding). A record that lacks a key raises ValueError;
    a value json cannot encode (a set, say) raises json's own error. Either way any existing file at
    `path` is left byte for byte as it was and no temporary file is left in its folder: validate
    first, then write a temporary file and os.replace it into place (remove it if anything fails).
    Returns the size of the written file in bytes.
    '''
    ### BEGIN SOLUTION
    def plain(value):
        return value.tolist() if hasattr(value, "tolist") else value

    path = Path(path)
    for n, record in enumerate(records):
        missing = [key for key in CAPTURE_KEYS if key not in record]
        if missing:
            raise ValueError(f"record {n} lacks {missing}")
    lines = []
    for record in records:
        row = {key: plain(record[key]) for key in CAPTURE_KEYS}
        lines.append(json.dumps(row) + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, path)
    return path.stat().st_size
    ### END SOLUTION


# %% id="test-write-capture" nbgrader={"grade": true, "grade_id": "test_write_capture", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
def fake_record(i, T=5, k=3):
    '''A capture record with torch tensors, as the capture loop produces them, plus one extra key.'''
    g = torch.Generator().manual_seed(i)
    lp, ids = torch.log_softmax(torch.randn(T, 50, generator=g) * 3, dim=-1).topk(k, dim=-1)
    return {"id": f"train-{i:04d}", "input_ids": torch.randint(0, 50, (T,), generator=g), "k": k,
            "topk_ids": ids, "topk_logprobs": lp, "covered_mass": lp.exp().sum(-1),
            "tokenizer_fingerprint": "sha256:" + "ab" * 32, "teacher": "toy", "note": "not in the schema"}


records = [fake_record(0), fake_record(1, T=7)]
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "capture.jsonl"
    size = write_capture(path, records)
    text = path.read_text()
    assert size == path.stat().st_size, "return the file's size in bytes"
    lines = text.splitlines()
    assert len(lines) == 2 and text.endswith("\n"), "one JSON object per line"
    rows = [json.loads(line) for line in lines]
    for row, rec in zip(rows, records):
        assert set(row) == set(CAPTURE_KEYS), f"exactly the schema's keys, got {sorted(row)}"
        assert row["id"] == rec["id"] and row["k"] == 3 and row["teacher"] == "toy"
        assert row["input_ids"] == rec["input_ids"].tolist()
        assert row["topk_ids"] == rec["topk_ids"].tolist()
        err = np.abs(np.array(row["topk_logprobs"], dtype=np.float32) - rec["topk_logprobs"].numpy()).max()
        assert err <= 1e-6, f"log-probs must survive the round trip: max error {err:.2g}"
        err = np.abs(np.array(row["covered_mass"], dtype=np.float32) - rec["covered_mass"].numpy()).max()
        assert err <= 1e-6, f"covered_mass must survive the round trip: max error {err:.2g}"
    # all-or-nothing: the third record holds a set, which passes the key check but not json.dumps
    before = path.read_bytes()
    unencodable = fake_record(2)
    unencodable["teacher"] = {"toy"}
    try:
        write_capture(path, [fake_record(3), fake_record(4), unencodable])
    except Exception:
        pass
    else:
        raise AssertionError("a set is not JSON: write_capture must raise")
    assert path.read_bytes() == before, \
        "a failed write must leave the existing file byte for byte as it was: write a temporary file, then os.replace it"
    left = sorted(p.name for p in Path(tmp).iterdir())
    assert left == ["capture.jsonl"], f"a failed write must not leave a temporary file behind; the folder holds {left}"
print("write_capture: visible tests passed")
### BEGIN HIDDEN TESTS
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "capture.jsonl"
    rec = fake_record(2, T=4, k=2)
    as_numpy = {key: (v.numpy() if torch.is_tensor(v) else v) for key, v in rec.items()}
    as_lists = {key: (v.tolist() if torch.is_tensor(v) else v) for key, v in rec.items()}
    write_capture(path, [as_numpy, as_lists])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2 and rows[0] == rows[1], "tensors, numpy arrays and lists give the same line"
    assert all(type(i) is int for row in rows for pos in row["topk_ids"] for i in pos)
    assert all(type(i) is int for row in rows for i in row["input_ids"])
    assert np.array_equal(np.array(rows[0]["topk_logprobs"], dtype=np.float32), rec["topk_logprobs"].numpy())
    # an invalid record raises ValueError and leaves the existing file untouched
    before = path.read_text()
    bad = fake_record(3)
    del bad["covered_mass"]
    try:
        write_capture(path, [fake_record(4), bad])
    except ValueError:
        pass
    else:
        raise AssertionError("a record without covered_mass must raise ValueError")
    assert path.read_text() == before, "a failed write must not touch the existing file"
    # overwriting replaces the content
    write_capture(path, [fake_record(5, T=3)])
    assert len(path.read_text().splitlines()) == 1
### END HIDDEN TESTS

# %% id="ex-read-capture" nbgrader={"grade": false, "grade_id": "ex_read_capture", "locked": false, "schema_version": 3, "solution": true, "task": false}
def read_capture(path, expected_fingerprint: str | None = None) -> list[dict]:
    '''Read and validate a teacher-capture JSONL file. Blank lines are skipped.

    Returns the records, in file order, as parsed (dicts of plain lists and numbers).
    Raises ValueError, naming the line number, if a line:
      - lacks a key of CAPTURE_KEYS;
      - has topk_ids, topk_logprobs or covered_mass without exactly T = len(input_ids) entries;
      - has a row of topk_ids or topk_logprobs without exactly k entries;
      - has another k or another tokenizer_fingerprint than the file's first record;
      - has a tokenizer_fingerprint different from `expected_fingerprint` (when that is given):
        the capture was made with another tokenizer.
    '''
    ### BEGIN SOLUTION
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            missing = [key for key in CAPTURE_KEYS if key not in record]
            if missing:
                raise ValueError(f"line {line_no}: missing {missing}")
            T, k = len(record["input_ids"]), record["k"]
            if not len(record["topk_ids"]) == len(record["topk_logprobs"]) == len(record["covered_mass"]) == T:
                raise ValueError(f"line {line_no}: topk_ids, topk_logprobs and covered_mass need {T} entries")
            if any(len(row) != k for row in record["topk_ids"] + record["topk_logprobs"]):
                raise ValueError(f"line {line_no}: every position must hold k={k} entries")
            first = records[0] if records else record
            if (k, record["tokenizer_fingerprint"]) != (first["k"], first["tokenizer_fingerprint"]):
                raise ValueError(f"line {line_no}: k or tokenizer fingerprint differs from the first record")
            if expected_fingerprint is not None and record["tokenizer_fingerprint"] != expected_fingerprint:
                raise ValueError(f"line {line_no}: tokenizer fingerprint {record['tokenizer_fingerprint']} is not "
                                 f"the expected {expected_fingerprint}: this capture was made with another tokenizer")
            records.append(record)
    return records
    ### END SOLUTION


# %% id="test-read-capture" nbgrader={"grade": true, "grade_id": "test_read_capture", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
FP, OTHER_FP = "sha256:" + "ab" * 32, "sha256:" + "cd" * 32


def capture_line(i, T=4, k=3, fp=FP):
    '''One valid record as plain JSON-ready data.'''
    g = torch.Generator().manual_seed(i)
    lp, ids = torch.log_softmax(torch.randn(T, 40, generator=g) * 3, dim=-1).topk(k, dim=-1)
    return {"id": f"train-{i:04d}", "input_ids": list(range(10, 10 + T)), "k": k, "topk_ids": ids.tolist(),
            "topk_logprobs": lp.tolist(), "covered_mass": lp.exp().sum(-1).tolist(),
            "tokenizer_fingerprint": fp, "teacher": "toy"}


def write_lines(path, rows, blank_lines=False):
    '''Written with plain json: independent of your write_capture.'''
    sep = "\n\n" if blank_lines else "\n"
    Path(path).write_text("".join(json.dumps(r) + sep for r in rows))


def read_error(path, **kwargs):
    '''The ValueError message of read_capture, or None if it returns.'''
    try:
        read_capture(path, **kwargs)
    except ValueError as e:
        return str(e)
    return None


with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "capture.jsonl"
    good = [capture_line(0), capture_line(1, T=6)]
    write_lines(path, good)
    assert read_capture(path) == good
    assert read_capture(path, expected_fingerprint=FP) == good
    msg = read_error(path, expected_fingerprint=OTHER_FP)
    assert msg is not None, "a capture made with another tokenizer must be refused"
    assert "fingerprint" in msg.lower(), f"say that the fingerprint differs: {msg}"
    # each per-position field on its own: one entry per input token (T = len(input_ids) = 6 here)
    for field in ("topk_ids", "topk_logprobs", "covered_mass"):
        for label, change in (("T-1", lambda v: v[:-1]), ("T+1", lambda v: v + v[:1])):
            bad = capture_line(1, T=6)
            bad[field] = change(bad[field])
            write_lines(path, [capture_line(0), bad])
            assert read_error(path) is not None, f"{field} with {label} positions (the others right) must be refused"
    # all three agree with each other, but not with input_ids
    bad = capture_line(1, T=6)
    bad["input_ids"] = bad["input_ids"] + [99]
    write_lines(path, [capture_line(0), bad])
    assert read_error(path) is not None, "topk_ids, topk_logprobs and covered_mass must each have len(input_ids) entries"
    # each row of topk_ids and of topk_logprobs on its own: exactly k entries
    for field in ("topk_ids", "topk_logprobs"):
        for label, change in (("k-1", lambda v: v[:-1]), ("k+1", lambda v: v + v[:1])):
            bad = capture_line(1, T=6)
            bad[field][2] = change(bad[field][2])
            write_lines(path, [capture_line(0), bad])
            assert read_error(path) is not None, f"a row of {field} with {label} entries (the rest right) must be refused"
    # rows that agree with each other, but not with the record's k
    bad = capture_line(1, T=6)
    bad["topk_ids"], bad["topk_logprobs"] = [r[:-1] for r in bad["topk_ids"]], [r[:-1] for r in bad["topk_logprobs"]]
    write_lines(path, [bad])
    assert read_error(path) is not None, "rows of k-1 entries in a record that says k must be refused"
print("read_capture: visible tests passed")
### BEGIN HIDDEN TESTS
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "capture.jsonl"
    # blank lines are skipped
    good = [capture_line(2), capture_line(3, T=2)]
    write_lines(path, good, blank_lines=True)
    back = read_capture(path, expected_fingerprint=FP)
    assert back == good
    batch = distill.collate_capture(back, pad_id=0)
    assert batch["topk_logprobs"].shape == (2, 4, 3)
    # a file made entirely with another tokenizer
    write_lines(path, [capture_line(4, fp=OTHER_FP), capture_line(5, fp=OTHER_FP)])
    assert read_error(path, expected_fingerprint=FP) is not None
    # a missing key
    no_mass = capture_line(6)
    del no_mass["covered_mass"]
    write_lines(path, [no_mass])
    assert read_error(path) is not None
    # a position with k-1 ids
    short_row = capture_line(7)
    short_row["topk_ids"][2] = short_row["topk_ids"][2][:-1]
    write_lines(path, [short_row])
    assert read_error(path) is not None
    # covered_mass of the wrong length
    short_mass = capture_line(8)
    short_mass["covered_mass"] = short_mass["covered_mass"][:-1]
    write_lines(path, [short_mass])
    assert read_error(path) is not None
    # topk_ids with an extra position
    long_ids = capture_line(9)
    long_ids["topk_ids"] = long_ids["topk_ids"] + [long_ids["topk_ids"][0]]
    write_lines(path, [long_ids])
    assert read_error(path) is not None
    # two tokenizers, or two k, in one file
    write_lines(path, [capture_line(10), capture_line(11, fp=OTHER_FP)])
    assert read_error(path) is not None
    write_lines(path, [capture_line(12), capture_line(13, k=4)])
    assert read_error(path) is not None
### END HIDDEN TESTS

# %% [markdown] id="capture-intro"
# ## 5. Run the teacher once
#
# Now the real thing. The training texts are the distillation split's reviews, chat-formatted the way
# the teacher was trained (system prompt, the question as the user's turn) with the **true** answer as
# the assistant's turn: `This review is positive.<|im_end|>` — `distill.kd_token_ids` builds them, and
# lesson 3 trains on exactly these. So the capture also records what the teacher thinks at the moment it
# has to name the label.
#
# Texts are batched with right padding. A causal model's position *t* only attends to positions ≤ *t*,
# so padding on the right never changes a real position's logits; we keep the real positions only.
# Per batch we call your `topk_logprobs` twice — at *k* = 64 for the measurements below, and at
# *k* = `CAPTURE_K` for the file — and compare it with torch's reference on every position: the capture
# that lesson 3 trains on is only as good as this function.

# %% id="capture"
rows = distill.load_kd_rows(CFG["N_TEXTS"])
sequences = distill.kd_token_ids(tok, rows)
K, K_MAX = CFG["CAPTURE_K"], max(CFG["K_LIST"])
FINGERPRINT = capture.tokenizer_fingerprint(tok)

captured = []      # one record per text at k = CAPTURE_K: what goes into the file
analysis = []      # per text: the top-K_MAX ids and log-probs, for the measurements
ref_error = 0.0    # max |your top-k - torch reference| over every real position (nats)
forward_s = 0.0    # the teacher's forward passes alone
start = time.perf_counter()
for chunk in tqdm(distill.batches(list(range(len(rows))), CFG["BATCH"]), desc="teacher capture"):
    batch = distill.collate([sequences[i] for i in chunk], tok.pad_token_id)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    forward_s += time.perf_counter() - t0
    ids_max, lp_max, _ = topk_logprobs(logits, K_MAX)
    ids_k, lp_k, mass_k = topk_logprobs(logits, K)
    # the reference, computed independently of your function
    full = torch.log_softmax(logits.float(), dim=-1)
    real = batch["attention_mask"].bool()
    errors = torch.cat([(lp_k - full.topk(K, dim=-1).values)[real].flatten(),
                        (lp_k - full.gather(-1, ids_k))[real].flatten(),
                        (mass_k - lp_k.exp().sum(-1))[real]])
    ref_error = max(ref_error, float(errors.abs().max()))
    for b, i in enumerate(chunk):
        n = len(sequences[i])
        captured.append({"id": rows[i]["id"], "input_ids": sequences[i], "k": K,
                         "topk_ids": ids_k[b, :n], "topk_logprobs": lp_k[b, :n], "covered_mass": mass_k[b, :n],
                         "tokenizer_fingerprint": FINGERPRINT, "teacher": models.MODEL_NAME})
        analysis.append({"ids": ids_max[b, :n], "logprobs": lp_max[b, :n],
                         "label": rows[i]["label"], "text": rows[i]["text"]})
    del logits, full
capture_s = time.perf_counter() - start
n_positions = sum(len(s) for s in sequences)
print(f"{len(captured)} texts, {n_positions:,} positions ({n_positions / len(captured):.1f} tokens per text)")
print(f"teacher forward: {forward_s:.1f} s = {n_positions / forward_s:,.0f} tokens/s; "
      f"whole loop (forward + top-k + reference check): {capture_s:.1f} s")
print(f"max |your top-{K} - torch reference| = {ref_error:.2e} nats")

# %% [markdown] id="dark-intro"
# ## 6. What the teacher knows that the label doesn't
#
# Position *t* holds the teacher's distribution for the token after `input_ids[t]`. In
# `... This review is positive.<|im_end|>` the label word is the third token from the end, so the
# teacher's opinion about it sits at position *T − 4*, the position of " is". For every captured text
# we read the probabilities of " positive" and " negative" there (0 if a word is not among the
# top 64). Below: the text where the teacher is most sure of the true label and the one where it is
# least sure, with its top-8 tokens.

# %% id="dark-knowledge"
LABEL_IDS = {}
for label in ("positive", "negative"):
    (LABEL_IDS[label],) = tok(" " + label, add_special_tokens=False)["input_ids"]  # one token each

answer = []   # per text: the teacher at the position that predicts the label word
for a, rec in zip(analysis, captured):
    t = len(rec["input_ids"]) - 4
    assert rec["input_ids"][t + 1] == LABEL_IDS[a["label"]], "the label word follows position T-4"
    probs = dict(zip(a["ids"][t].tolist(), a["logprobs"][t].exp().tolist()))
    other = "negative" if a["label"] == "positive" else "positive"
    answer.append({"t": t, "p_label": probs.get(LABEL_IDS[a["label"]], 0.0),
                   "p_other": probs.get(LABEL_IDS[other], 0.0), "top": a["ids"][t], "lp": a["logprobs"][t]})

p_label = np.array([x["p_label"] for x in answer])
p_other = np.array([x["p_other"] for x in answer])
agree = float((p_label > p_other).mean())
print(f"the teacher prefers the true label on {agree:.1%} of {len(answer)} training texts; "
      f"mean P(true label word) = {p_label.mean():.3f}, mean P(other label word) = {p_other.mean():.3f}, "
      f"mean P(anything else) = {1 - (p_label + p_other).mean():.3f}")

sure, unsure = int(np.argmax(p_label)), int(np.argmin(np.abs(p_label - p_other)))
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
for ax, i, name in ((axes[0], sure, "most sure"), (axes[1], unsure, "least sure")):
    top_ids, top_p = answer[i]["top"][:8].tolist(), answer[i]["lp"][:8].exp().tolist()
    names = [repr(tok.decode([j])) for j in top_ids]
    colors = ["tab:green" if j == LABEL_IDS[analysis[i]["label"]] else "tab:gray" for j in top_ids]
    ax.barh(names[::-1], top_p[::-1], color=colors[::-1])
    ax.set_xlabel("teacher probability of the next token")
    ax.set_title(f"{name}: label '{analysis[i]['label']}' (green)", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    print(f"\n{name}: {analysis[i]['text']!r}  (label: {analysis[i]['label']})")
    print("  hard label: P(" + repr(" " + analysis[i]["label"]) + ") = 1, everything else 0")
    print("  teacher:    " + ", ".join(f"{n} {p:.3f}" for n, p in zip(names, top_p)))
fig.suptitle("The soft target at the answer position: the teacher's top-8 after '... This review is'")
fig.tight_layout()
plt.show()

# %% [markdown] id="dark-after"
# Compare both panels with the hard label, which puts all its probability on one bar. Even where the
# teacher is most sure, part of its probability goes to the other label and to other ways of going on
# (read the printout: other words, other phrasings). That is the dark knowledge: how close the call
# was, and what else the teacher considered plausible. Distilling the soft target asks the student to
# be *as unsure as the teacher* where the teacher is unsure, instead of confidently copying the label —
# and the same happens at every position of the review, not only at the answer. (The printed summary
# also says how often the teacher actually prefers the true label on these training texts: where it
# does not, the hard label and the soft target pull the student in different directions, which is one
# reason lesson 3 mixes the two.)
#
# One caveat: these distributions are on the texts we **gave** the teacher (teacher forcing). A student
# that generates its own text wanders into prefixes the teacher never scored; on-policy distillation
# (e.g. GKD) scores the student's own samples with the teacher for that reason — online, at the cost
# of running the teacher during training.

# %% [markdown] id="mass-intro"
# ## 7. How much probability does the top-k keep?
#
# For *k* = 1 … 64 we sum the probabilities of the *k* most likely tokens at every captured position:
# the mean over positions, the 10th percentile (the hard positions: one in ten is worse than this), and
# the mean at the answer position alone. The answer position is the one this task is about; the others
# carry the teacher's knowledge of language in general.

# %% id="mass-vs-k"
all_lp = torch.cat([a["logprobs"] for a in analysis])                          # [positions, K_MAX]
answer_lp = torch.stack([a["logprobs"][x["t"]] for a, x in zip(analysis, answer)])  # [texts, K_MAX]
mass_rows = []
for k in CFG["K_LIST"]:
    m = all_lp[:, :k].exp().sum(-1)
    mass_rows.append({"k": k, "mean": float(m.mean()), "p10": float(torch.quantile(m, 0.10)),
                      "median": float(m.median()), "answer position (mean)": float(answer_lp[:, :k].exp().sum(-1).mean())})
mass_table = {r["k"]: r for r in mass_rows}
for r in mass_rows:
    print(f"k={r['k']:>2}: mean {r['mean']:.3f}   p10 {r['p10']:.3f}   median {r['median']:.3f}   "
          f"answer position {r['answer position (mean)']:.3f}")

fig, ax = plots.new_axes("Probability mass kept by the teacher's top-k", "k (tokens kept per position)",
                         "covered mass")
ks = CFG["K_LIST"]
ax.plot(ks, [mass_table[k]["mean"] for k in ks], "o-", label="mean over positions")
ax.plot(ks, [mass_table[k]["p10"] for k in ks], "s--", label="10th percentile over positions")
ax.plot(ks, [mass_table[k]["answer position (mean)"] for k in ks], "^-", label="answer position (mean)")
ax.axvline(K, color="gray", ls=":", label=f"CAPTURE_K = {K}")
ax.set_xscale("log", base=2)
ax.set_xticks(ks, [str(k) for k in ks])
ax.set_ylim(0, 1.02)
ax.legend(loc="lower right")
plt.show()

# One text, token by token: where is the teacher sure, where is it spread out?
i = unsure
toks = [tok.decode([j]) for j in captured[i]["input_ids"]]
m1 = analysis[i]["logprobs"][:, :1].exp().sum(-1).numpy()
mk = analysis[i]["logprobs"][:, :K].exp().sum(-1).numpy()
fig, ax = plots.new_axes(f"Covered mass per position, one training text ({len(toks)} tokens)",
                         "position t (the token whose successor is predicted)", "covered mass", figsize=(14, 3.8))
x = np.arange(len(toks))
ax.bar(x, mk, color="tab:orange", label=f"top-{K}")
ax.bar(x, m1, color="tab:blue", label="top-1")
ax.set_xticks(x, [t.replace(" ", "·").replace("\n", "\\n") for t in toks], rotation=90, fontsize=7)
ax.set_xlim(-0.7, len(toks) - 0.3)
ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
fig.tight_layout()
plt.show()

# %% [markdown] id="mass-after"
# Read the per-token chart left to right. The chat scaffolding between turns (`<|im_end|>`, `<|im_start|>`,
# the role name) is fully predictable: top-1 alone covers everything there. Inside the review the
# distribution spreads out — the teacher can only guess which drink, which café, which adjective comes
# next — and those are the positions where the soft targets say the most and where a small *k* loses
# the most. The first plot summarises all positions: the mean climbs steadily with *k*, but the 10th
# percentile shows a long tail of positions where even the top-16 keep only part of the mass.
#
# So `CAPTURE_K` (16 at full budget, 8 at ci) is a compromise, and the file says exactly how much it
# leaves out: `1 − covered_mass`, per position.
#
# The honest caveat: the top-k **truncate** the teacher. Whatever lesson 3 does with the missing mass —
# renormalise over the top-k, or add one "everything else" bucket — the student never sees the shape of
# the tail. For distillation that is mostly harmless (the tail is spread over tens of thousands of
# tokens, each with a tiny probability and a tiny gradient), but it matters more at a high distillation
# temperature, which flattens the teacher and moves mass into the tail. It is a choice, and the file
# keeps `covered_mass` so that lesson 3 can make it knowingly.

# %% [markdown] id="size-intro"
# ## 8. What each k costs on disk
#
# We write the first `N_SIZE_TEXTS` texts' capture at every *k* with your `write_capture` and measure
# bytes per position, next to the same file gzip-compressed, a tight binary layout (int32 id + float32
# log-prob per kept token, plus the input id and covered mass: 8k + 8 bytes), and the full float32
# distribution we are avoiding (4·V bytes).

# %% id="size-vs-k"
size_rows = []
subset = range(min(CFG["N_SIZE_TEXTS"], len(captured)))
with tempfile.TemporaryDirectory() as tmp:
    for k in CFG["K_LIST"]:
        recs = [{**captured[i], "k": k, "topk_ids": analysis[i]["ids"][:, :k],
                 "topk_logprobs": analysis[i]["logprobs"][:, :k],
                 "covered_mass": analysis[i]["logprobs"][:, :k].exp().sum(-1)} for i in subset]
        path = Path(tmp) / f"capture_k{k}.jsonl"
        nbytes = write_capture(path, recs)
        gz = len(gzip.compress(path.read_bytes(), compresslevel=6))
        positions = sum(len(r["input_ids"]) for r in recs)
        size_rows.append({"k": k, "jsonl": nbytes / positions, "gzip": gz / positions, "binary": 8 * k + 8})
size_table = {r["k"]: r for r in size_rows}
FULL_VOCAB_BYTES = 4 * VOCAB
for r in size_rows:
    print(f"k={r['k']:>2}: JSONL {r['jsonl']:7.0f} B/position   gzip {r['gzip']:6.0f}   binary {r['binary']:4d}   "
          f"-> all {n_positions:,} positions as JSONL: {r['jsonl'] * n_positions / 1e6:6.1f} MB")
print(f"full float32 distribution: {FULL_VOCAB_BYTES:,} B/position -> {FULL_VOCAB_BYTES * n_positions / 1e9:.2f} GB")

fig, ax = plots.new_axes("Capture size per position", "k (tokens kept per position)", "bytes per position")
ax.plot(ks, [size_table[k]["jsonl"] for k in ks], "o-", label="JSON lines (this course)")
ax.plot(ks, [size_table[k]["gzip"] for k in ks], "s-", label="JSON lines, gzip")
ax.plot(ks, [size_table[k]["binary"] for k in ks], "^--", label="binary int32 + float32")
ax.axhline(FULL_VOCAB_BYTES, color="tab:red", ls=":", label=f"full distribution, float32 ({FULL_VOCAB_BYTES:,} B)")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xticks(ks, [str(k) for k in ks])
ax.legend(fontsize=8)
plt.show()

# %% [markdown] id="size-after"
# Size grows linearly in *k*, while the covered mass (previous section) grows only slowly: each doubling
# of *k* doubles the bytes and buys a few points of mean mass. Text costs a roughly constant factor over
# the binary layout, and gzip wins much of it back. All of them are tiny next to the full distribution,
# which is the point of keeping only the top-k.

# %% [markdown] id="roundtrip-intro"
# ## 9. Round trip, the fingerprint guard, and the hand-off to lesson 3
#
# The final capture (*k* = `CAPTURE_K`, every text) is written with your `write_capture` and read back
# with your `read_capture`, passing the teacher tokenizer's fingerprint as the expected one. Then the
# same file is read by someone whose tokenizer has one extra pad token: it must be refused.
#
# Before the file is moved to `artifact_dir(BUDGET) / "teacher_capture.jsonl"`, where lesson 3 looks, it is
# checked once more **independently of your code** — plain `json`, the schema's keys, the torch
# reference from the capture loop. A capture that fails is not published (lesson 3 then recreates
# its own); so a bug in this notebook can't quietly poison the next lesson's training data.

# %% id="roundtrip"
ART = artifact_dir(BUDGET)
incoming = ART / f".incoming-{os.getpid()}-{distill.CAPTURE_FILE}"
t0 = time.perf_counter()
file_bytes = write_capture(incoming, captured)
write_s = time.perf_counter() - t0
t0 = time.perf_counter()
back = read_capture(incoming, expected_fingerprint=FINGERPRINT)
read_s = time.perf_counter() - t0

lp_err = max(float(np.abs(np.array(b["topk_logprobs"], dtype=np.float32) - r["topk_logprobs"].numpy()).max())
             for b, r in zip(back, captured))
mass_err = max(float(np.abs(np.array(b["covered_mass"], dtype=np.float32) - r["covered_mass"].numpy()).max())
               for b, r in zip(back, captured))
id_mismatches = sum(int((torch.tensor(b["topk_ids"]) != r["topk_ids"]).sum()) for b, r in zip(back, captured))
print(f"wrote {len(captured)} records, {file_bytes / 1e6:.2f} MB in {write_s:.2f} s; read back in {read_s:.2f} s")
print(f"round trip: max |log-prob error| = {lp_err:.2e}, max |covered-mass error| = {mass_err:.2e}, "
      f"{id_mismatches} token ids changed")
print(f"reading the file costs {read_s:.2f} s; the teacher's forward passes cost {forward_s:.1f} s "
      f"({forward_s / max(read_s, 1e-9):.0f}x): paid once, not once per student epoch")

try:
    read_capture(incoming, expected_fingerprint=capture.tokenizer_fingerprint(tok_with_pad))
    foreign_rejected = False
    print("!! a reader with another tokenizer accepted the capture")
except ValueError as e:
    foreign_rejected = True
    print("a reader whose tokenizer has an extra pad token is refused:", str(e)[:160], "...")

batch = distill.collate_capture(back[:4], tok.pad_token_id)
print("what lesson 3 gets from distill.collate_capture:",
      {name: tuple(v.shape) for name, v in batch.items()})

# %% id="publish"
# Independent check before the hand-off: plain json, the schema, the torch reference.
problems = []
if ref_error > 1e-4:
    problems.append(f"top-k log-probs differ from torch's reference by {ref_error:.2g} nats")
lines = [line for line in incoming.read_text().splitlines() if line.strip()]
if len(lines) != len(captured):
    problems.append(f"{len(lines)} lines for {len(captured)} texts")
for line, rec in zip(lines, captured):
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        problems.append(f"{rec['id']}: not JSON ({e})")
        break
    if sorted(row) != sorted(CAPTURE_KEYS):
        problems.append(f"{rec['id']}: keys {sorted(row)}")
        break
    if (row["id"], row["input_ids"], row["k"], row["tokenizer_fingerprint"], row["teacher"]) != (
            rec["id"], rec["input_ids"], K, FINGERPRINT, models.MODEL_NAME):
        problems.append(f"{rec['id']}: id, input_ids, k, fingerprint or teacher changed")
        break
    if row["topk_ids"] != rec["topk_ids"].tolist() or (
            np.abs(np.array(row["topk_logprobs"], dtype=np.float32) - rec["topk_logprobs"].numpy()).max() > 1e-6
            or np.abs(np.array(row["covered_mass"], dtype=np.float32) - rec["covered_mass"].numpy()).max() > 1e-6):
        problems.append(f"{rec['id']}: top-k ids, log-probs or covered mass changed on the way to disk")
        break

target = ART / distill.CAPTURE_FILE
if problems:
    incoming.unlink(missing_ok=True)
    published = False
    print("NOT published for lesson 3:", "; ".join(problems))
else:
    os.replace(incoming, target)
    published = True
    print(f"published {target} ({target.stat().st_size / 1e6:.2f} MB, k={K}, {len(captured)} texts)")

# %% [markdown] id="results-intro"
# ## What we measured
#
# Every number below was computed in this run (budget shown in the first cell's output).

# %% id="results"
results = [
    {"quantity": "teacher parameters", "value": N_PARAMS, "unit": "parameters", "note": models.MODEL_NAME},
    {"quantity": "texts captured", "value": len(captured), "unit": "texts", "note": "distillation (train) split"},
    {"quantity": "positions captured", "value": n_positions, "unit": "tokens"},
    {"quantity": "teacher forward time (the one expensive pass)", "value": round(forward_s, 2), "unit": "s"},
    {"quantity": "teacher forward throughput", "value": round(n_positions / forward_s, 1), "unit": "tokens/s",
     "note": "fp32, this machine's CPU"},
    {"quantity": "reading the capture back", "value": round(read_s, 3), "unit": "s"},
    {"quantity": "max |topk_logprobs - torch reference|", "value": ref_error, "unit": "nats"},
    {"quantity": "teacher prefers the true label at the answer position", "value": round(agree, 4),
     "unit": "fraction of texts"},
    {"quantity": "mean P(true label word) at the answer position", "value": round(float(p_label.mean()), 4),
     "unit": "probability"},
    {"quantity": "mean P(other label word) at the answer position", "value": round(float(p_other.mean()), 4),
     "unit": "probability"},
]
for k in (1, K, K_MAX):
    results.append({"quantity": f"mean covered mass, k={k}", "value": round(mass_table[k]["mean"], 4),
                    "unit": "probability", "note": "over all positions"})
results += [
    {"quantity": f"10th-percentile covered mass, k={K}", "value": round(mass_table[K]["p10"], 4), "unit": "probability"},
    {"quantity": f"mean covered mass at the answer position, k={K}",
     "value": round(mass_table[K]["answer position (mean)"], 4), "unit": "probability"},
    {"quantity": f"JSONL size, k={K}", "value": round(size_table[K]["jsonl"], 1), "unit": "bytes/position"},
    {"quantity": f"JSONL gzip size, k={K}", "value": round(size_table[K]["gzip"], 1), "unit": "bytes/position"},
    {"quantity": "full float32 distribution", "value": FULL_VOCAB_BYTES, "unit": "bytes/position"},
    {"quantity": f"capture file (k={K})", "value": round(file_bytes / 1e6, 3), "unit": "MB"},
    {"quantity": "round-trip max |log-prob error|", "value": lp_err, "unit": "nats"},
    {"quantity": "round-trip token ids changed", "value": id_mismatches, "unit": "ids"},
    {"quantity": "capture refused for a tokenizer with one extra token", "value": "yes" if foreign_rejected else "no",
     "unit": ""},
    {"quantity": "student with its own BPE tokenizer rejected", "value": "yes" if own_rejected else "no", "unit": ""},
    {"quantity": "published for lesson 3", "value": "yes" if published else "no", "unit": "",
     "note": distill.CAPTURE_FILE},
]
report.record_results("02_kd_capture", BUDGET, results)

# %% [markdown] id="takeaways"
# ## Takeaways
#
# - **Soft targets carry more than labels**: at the answer position, and at every position of the text,
#   the teacher's distribution says how sure it is and what else was plausible. That's what the student
#   will learn from in lesson 3.
# - **Offline capture pays the teacher once.** Compare the forward time with the read time above: every
#   student run and every epoch pays the second, not the first.
# - **Keep log-probs under the full softmax**, sorted, with the covered mass — the file must say how
#   much it left out. Top-k with a modest *k* keeps most of the mass at a tiny fraction of the size;
#   the plots show what each extra *k* buys on this teacher.
# - **Same tokenizer: check it, don't assume it.** Compare vocabularies as maps (not sizes), special
#   tokens, and encodings of probe texts; store a fingerprint in the artefact and refuse a mismatch
#   when reading.
# - **Artefacts between stages deserve a contract**: a fixed schema, a lossless atomic writer, a reader
#   that validates — and a last independent check before hand-off.
#
# **Next (lesson 3):** the KD loss with temperature, trained from this very file.
