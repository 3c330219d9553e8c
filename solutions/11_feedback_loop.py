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
# # Lesson 11 — The production feedback loop: log → tag → augment → retrain
#
# Lesson 9 watched a served model and said *when* something changed. This lesson closes the loop:
# the requests the model got wrong become the data that fixes it. Every step has a way to go wrong
# that no error message reports:
#
# 1. **Logging** the requests keeps what the users typed, and users type their e-mail address, their
#    phone number, their card number. What reaches the disk must be **redacted before it is
#    written** (not "cleaned later": the write-ahead log and every backup already hold it).
# 2. **A sampling budget.** Logging everything costs storage and review time, and a traffic spike
#    (a promotion, a bot) must not fill the log with one day. A reservoir per day keeps a uniform
#    sample of each day, whatever its size.
# 3. **Tagging bad rows** three ways: a reviewer's audit of a random sample (the manual tag file),
#    rows the drift signal of lesson 9 flags, and rows whose users pressed thumbs-down.
# 4. **Tags → SFT examples**: the reviewer's *correction*, never the model's bad reply;
#    deduplicated; no PII; nothing that is in the evaluation sets.
# 5. **The retrain trigger**: a rule that says when (enough new examples, time since the last
#    retrain, drift severity) and why, written as an event.
# 6. **A small retrain** that fixes the tagged slice without breaking the rest, measured with
#    intervals and against a control.
#
# **You will build** (each exercise is graded on its own)
# 1. `luhn_valid`: the card-number checksum that tells a card from an order number;
# 2. `redact`: findings → placeholders, overlapping findings merged, nothing of a value left;
# 3. `daily_reservoir`: a uniform sample of at most `cap` requests per day, in one pass;
# 4. `sft_examples`: reviewed tags → chat-format SFT examples;
# 5. `retrain_decision`: the cadence rule, with its reason.
#
# **You will measure**: redaction recall and precision per entity type on a labelled set of support
# messages with realistic PII in five locales (made by Faker) and hard negatives (order numbers,
# versions, dates, prices); the sampling budget under a traffic spike; how many of the model's
# mistakes each tag source finds; and, on the real SmolLM2-135M-Instruct served by llama.cpp, a LoRA
# retrain's effect on the tagged slice and on the gold set, with intervals, next to a control run
# trained without the tags. At the end a test greps the whole store, write-ahead log included, for
# the raw PII of the week.

# %% id="parameters" tags=["parameters"]
import os
BUDGET = os.environ.get("BREWSLM_BUDGET", "full")

# %% id="setup" nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
# %matplotlib inline
import collections
import json
import random
import re
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scipy.stats
import torch
import transformers
from IPython.display import display
from presidio_analyzer.predefined_recognizers import CreditCardRecognizer

from brewslm_helpers import budget, drift, evaluation, events, feedback, models, paths, reasoning, report, serving
from brewslm_helpers.data import load_reviews, sentiment_answer, sentiment_question
from brewslm_helpers.events import EVENTS_TABLE, GENESIS, canonical_json, digest
from brewslm_helpers.feedback import ENTITIES, normalise_text

datasets.disable_progress_bars()
transformers.logging.set_verbosity_error()
torch.manual_seed(0)
np.random.seed(0)
# only sizes differ between budgets: every cell runs in both
CFG = budget.pick(
    BUDGET,
    ci=dict(pii_docs=120, days=4, per_day=16, spike_day=2, spike_factor=4, cap=8, cap_down=4, audit=3,
            slice_n=24, gold_n=24, replay=16, sft_steps=3, sft_batch=4, lr=1e-3, lora_r=8,
            min_examples=6, min_days=1, max_days=7, drift_threshold=0.3, min_drift_examples=3,
            n_boot=500),
    full=dict(pii_docs=600, days=8, per_day=50, spike_day=5, spike_factor=5, cap=30, cap_down=20, audit=12,
              slice_n=160, gold_n=120, replay=120, sft_steps=60, sft_batch=8, lr=5e-4, lora_r=8,
              min_examples=60, min_days=2, max_days=7, drift_threshold=0.3, min_drift_examples=20,
              n_boot=2000),
)
WORK = paths.artifact_dir(BUDGET) / "feedback_loop"
WORK.mkdir(parents=True, exist_ok=True)
THREADS = budget.cpu_threads()
print(f"budget {BUDGET}: {CFG}")

# %% [markdown] id="md-pii"
# ## 1. What users put in a support log
#
# A coffee chain's app sends every review and support message to the model. People sign with their
# name, paste their e-mail address for the receipt, give a phone number to be called back and, every
# day, someone pastes a card number. `feedback.pii_corpus` makes a labelled set of such messages:
# the PII comes from **Faker** in five locales (US, UK, German, French and Spanish phone formats,
# seven card brands and lengths from 14 to 19 digits, grouped or not, IPv4 and IPv6), each value with
# its character span. A third of the messages hold only **hard negatives**: numbers a redactor must
# leave alone because support needs them — 16-digit order numbers grouped like a card (they fail
# Luhn), order ids, app versions, dates, times, prices, SKUs, parcel tracking numbers.
#
# **The recogniser** is Microsoft **Presidio**, the maintained open-source PII library, in its
# recogniser-only mode: no NLP model (no spaCy model ships on the package registry), so names come
# from a deny-list of the CRM's customers; e-mail, phone (Google's `phonenumbers`, in the five
# regions), IP and card numbers from its pattern recognisers with validation. Presidio's card
# recogniser validates with Luhn, and its shipped pattern stops at 17 digits, so
# `feedback.presidio_analyzer` adds a 12–19-digit pattern with the same validation. What it cannot
# know: the name of someone who is not a customer (a barista, a friend), and a phone number outside
# any range a country has assigned.

# %%
ROSTER = feedback.customer_roster()
PII_DOCS = feedback.pii_corpus(CFG["pii_docs"], seed=0, roster=ROSTER)
ANALYZER = feedback.presidio_analyzer(ROSTER)
for doc in PII_DOCS[:4]:
    print(doc["text"])
    print("   PII:", [(e, v) for _, _, e, v in doc["spans"]], " decoys:", [(k, v) for _, _, k, v in doc["decoys"]])

# %% [markdown] id="md-luhn"
# ## 2. Exercise: the Luhn check
#
# A card number ends with a **check digit** chosen so that the Luhn sum is a multiple of 10
# (ISO/IEC 7812). Starting from the **rightmost** digit (the check digit itself) and moving left,
# every **second** digit is doubled, and a doubled digit above 9 has 9 subtracted (the same as adding
# its two digits); the number is valid when the sum of all the digits is divisible by 10.
#
# ```
# 4539 1488 0343 6467 → from the right: 7 6 4 6 3 4 3 0 8 8 4 1 9 3 5 4
#                       doubled:        7 12 4 12 3 8 3 0 8 16 4 2 9 6 5 8  → 12→3, 16→7 ...
# ```
#
# It catches every single-digit typo and most swaps of neighbours — and it is why a redactor can
# tell a card from an order number of the same length: a random 16-digit number passes one time in
# ten. The parity counts from the **right**: counted from the left, a 16-digit number gives the same
# answer, and a 15-digit Amex or a 19-digit Visa the wrong one.
#
# Write `luhn_valid(number)`: spaces and dashes are separators (any number of them, anywhere); any
# other character (a tab, a non-breaking space, a digit of another script such as `٤`), or fewer than
# 12 or more than 19 digits, is not a card number (`False`). The test compares with Presidio's own
# check.

# %% id="ex-luhn" nbgrader={"grade": false, "grade_id": "ex_luhn_valid", "locked": false, "schema_version": 3, "solution": true, "task": false}
def luhn_valid(number: str) -> bool:
    """True when ``number`` (digits, optionally separated by spaces or dashes) has 12-19 digits and
    passes the Luhn check (ISO/IEC 7812): from the rightmost digit leftwards, double every second
    digit (subtract 9 from a result above 9), sum all; valid if the sum is divisible by 10."""
    ### BEGIN SOLUTION
    if not re.fullmatch(r"[0-9 -]+", number):
        return False
    digits = [int(c) for c in number if c.isdigit()]
    if not 12 <= len(digits) <= 19:
        return False
    total = 0
    for position, d in enumerate(reversed(digits)):
        if position % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0
    ### END SOLUTION


# %% id="test-luhn" nbgrader={"grade": true, "grade_id": "test_luhn_valid", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
assert luhn_valid("4539 1488 0343 6467") is True
assert luhn_valid("4539 1488 0343 6468") is False        # one digit changed
assert luhn_valid("4539-1488-0343-6467") is True
assert luhn_valid("378282246310005") is True               # Amex, 15 digits
assert luhn_valid("4111 1111 1111 1111") is True
assert luhn_valid("4539 1488 0343 646a") is False
assert luhn_valid("4242") is False                          # too short to be a card
### BEGIN HIDDEN TESTS
_rng = random.Random(11)
_ref = CreditCardRecognizer()
_checked = 0
for _length in range(12, 20):
    for _ in range(150):
        _s = "".join(str(_rng.randrange(10)) for _ in range(_length))
        assert luhn_valid(_s) == bool(_ref.validate_result(_s)), (_s, "disagrees with Presidio's Luhn")
        _checked += 1
        _fix = next(c for c in "0123456789" if _ref.validate_result(_s[:-1] + c))   # a valid number of this length
        assert luhn_valid(_s[:-1] + _fix), _s[:-1] + _fix
for _odd in ("6011000990139424", "3530111333300000", "30569309025904", "4000056655665556", "5105105105105100",
             "371449635398431", "4716 0841 2353 5891 236", "6759 6498 2643 8453"):
    assert luhn_valid(_odd) == bool(_ref.validate_result(_odd.replace(" ", ""))), _odd
_v19 = "4716 0841 2353 5891 23"
_v19 += next(c for c in "0123456789" if _ref.validate_result((_v19 + c).replace(" ", "")))
assert luhn_valid(_v19) is True, _v19                        # a grouped 19-digit card (23 characters)
assert luhn_valid("4539 1488 0343 6467".replace(" ", "-")) is True
assert luhn_valid("\u0664\u0665\u0663\u0669\u0661\u0664\u0668\u0668\u0660\u0663\u0664\u0663\u0666\u0664\u0666\u0667") is False
assert luhn_valid("\uff14\uff15\uff13\uff19148803436467") is False  # other scripts' digits are not ASCII digits
assert luhn_valid("4539\t1488\n0343\u00a06467") is False         # only spaces and dashes separate
assert luhn_valid("0000 0000 0000 0000") is True            # passes Luhn (it is still no card: brand ranges are another check)
assert luhn_valid("4539 1488 0343 6467 1234 5") is False    # 21 digits
assert luhn_valid("") is False and luhn_valid("    ") is False
assert luhn_valid("4539.1488.0343.6467") is False
assert luhn_valid("ORD-2026-4539148803436467") is False
### END HIDDEN TESTS

# %% [markdown] id="md-luhn-check"
# Checked against the library: Presidio's card recogniser validates every candidate with its own
# Luhn check. The same candidates through yours must agree, and without the check the order numbers
# would be "cards" (a tenth of them pass by chance, which is why the decoys in the corpus were drawn
# to fail it).

# %%
_cands = [m.group(0) for d in PII_DOCS for m in re.finditer(r"\b\d{4}(?:[ -]?\d{2,6}){2,4}\b", d["text"])
          if 12 <= len(re.sub(r"\D", "", m.group(0))) <= 19]
_agree = sum(luhn_valid(c) == bool(CreditCardRecognizer().validate_result(re.sub(r"\D", "", c))) for c in _cands)
_order16 = [v for d in PII_DOCS for _, _, k, v in d["decoys"] if k == "ORDER16"]
print(f"{len(_cands)} card-like candidates of 12-19 digits in the corpus: your Luhn agrees with Presidio's on {_agree}")
print(f"order numbers grouped like cards: {len(_order16)}, passing your Luhn: {sum(map(luhn_valid, _order16))}")
assert _agree == len(_cands)

# %% [markdown] id="md-redact"
# ## 3. Exercise: redaction from findings
#
# A recogniser returns **findings**: `(start, end, entity, score)` character spans, and they overlap:
# a card number is often also a "possible phone number" (at a lower score), a name on the deny-list
# can sit inside an e-mail address. Redaction turns findings into text that is safe to write:
#
# - findings that **overlap** (share at least one character) are merged into one span, covering all
#   of them; its label is that of the merged finding with the highest score (a tie goes to the
#   longer finding, then the one that starts earlier, then the one earlier in the list);
# - each merged span is replaced by `[LABEL]`, e.g. `[CARD]`, and **nothing of the value stays**:
#   no "last four digits", no e-mail domain (our policy: the log is for debugging the model, it
#   does not need them; a policy that keeps them must say so and is not this one);
# - the rest of the text is untouched, character for character.
#
# Return the redacted text and the number of placeholders per label, `{label: count}` (labels with
# no placeholder left out).

# %% id="ex-redact" nbgrader={"grade": false, "grade_id": "ex_redact", "locked": false, "schema_version": 3, "solution": true, "task": false}
def redact(text: str, findings: list[tuple[int, int, str, float]]) -> tuple[str, dict[str, int]]:
    """Replace each group of overlapping findings ``(start, end, label, score)`` (character offsets,
    end exclusive) in ``text`` by ``"[LABEL]"``, the label of the group's highest-scoring finding
    (ties: the longer, then the earlier one). Returns ``(redacted_text, {label: placeholders})``."""
    ### BEGIN SOLUTION
    groups = []  # [start, end, best finding]
    for f in sorted(findings, key=lambda f: (f[0], f[1])):
        s, e = f[0], f[1]
        if groups and s < groups[-1][1]:
            group = groups[-1]
            group[1] = max(group[1], e)
            if (f[3], f[1] - f[0]) > (group[2][3], group[2][1] - group[2][0]):
                group[2] = f
        else:
            groups.append([s, e, f])
    out, counts, cursor = [], collections.Counter(), 0
    for s, e, best in groups:
        out.append(text[cursor:s])
        out.append(f"[{best[2]}]")
        counts[best[2]] += 1
        cursor = e
    out.append(text[cursor:])
    return "".join(out), dict(counts)
    ### END SOLUTION


# %% id="test-redact" nbgrader={"grade": true, "grade_id": "test_redact", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
def _at(text, value, label, score, start=0):
    """The finding (start, end, label, score) of ``value`` in ``text``."""
    i = text.index(value, start)
    return (i, i + len(value), label, score)


_t = "Mail ana@example.com or call 0151 2345678."
_f = [_at(_t, "ana@example.com", "EMAIL", 1.0), _at(_t, "0151 2345678", "PHONE", 0.75)]
assert redact(_t, _f) == ("Mail [EMAIL] or call [PHONE].", {"EMAIL": 1, "PHONE": 1})
assert redact(_t, []) == (_t, {})
_t = "card 4539 1488 0343 6467 thanks"
_r, _c = redact(_t, [_at(_t, "4539 1488 0343 6467", "CARD", 1.0), _at(_t, "1488 0343 6467", "PHONE", 0.4)])
assert (_r, _c) == ("card [CARD] thanks", {"CARD": 1}), (_r, _c)     # a card is also a possible phone
### BEGIN HIDDEN TESTS
assert "6467" not in _r and "4539" not in _r
_t = "Reply to jo.smith@mail.co.uk please"
_r, _c = redact(_t, [_at(_t, "jo.smith@mail.co.uk", "EMAIL", 1.0)])
assert _r == "Reply to [EMAIL] please" and "mail.co.uk" not in _r and _c == {"EMAIL": 1}, _r
# findings unsorted, the lower score first; a name inside an e-mail address
_t = "From Ana Lopez <ana.lopez@example.es>, call +34 612 345 678 or +34 699 000 111."
_f = [_at(_t, "+34 612 345 678", "PHONE", 0.75), _at(_t, "ana.lopez@example.es", "EMAIL", 1.0),
      _at(_t, "Ana Lopez", "PERSON", 1.0), _at(_t, "ana.lopez", "PERSON", 0.6), _at(_t, "+34 699 000 111", "PHONE", 0.75)]
_r, _c = redact(_t, _f)
assert _r == "From [PERSON] <[EMAIL]>, call [PHONE] or [PHONE].", _r
assert _c == {"PERSON": 1, "EMAIL": 1, "PHONE": 2}, _c
# a chain of overlaps is one span; the best label wins even when it comes last
_t = "x 1234567890123 y"
assert redact(_t, [(2, 8, "PHONE", 0.4), (6, 12, "PHONE", 0.4), (10, 15, "CARD", 0.9)]) == ("x [CARD] y", {"CARD": 1})
# the phone finding starts first and the card wins on its score
_t = "Refund 3056 930902 5904 now"
_f = [_at(_t, "3056 930902 5904", "CARD", 1.0), (_t.index("3056"), _t.index("3056") + 11, "PHONE", 0.4)]
assert redact(_t, _f[::-1]) == ("Refund [CARD] now", {"CARD": 1}) and redact(_t, _f) == redact(_t, _f[::-1])
# a finding nested inside a longer one does not shrink the group
assert redact("a 4539148803436467 b", [(2, 18, "CARD", 1.0), (4, 10, "PHONE", 0.4), (12, 16, "PHONE", 0.4)]) == \
    ("a [CARD] b", {"CARD": 1})
# the finding's own position, not the first occurrence of its value
assert redact("Ana wrote: please call Ana", [(23, 26, "PERSON", 1.0)]) == ("Ana wrote: please call [PERSON]", {"PERSON": 1})
# ties: the longer finding, then the one that starts earlier, then the earlier in the list
assert redact("ab 12345 cd", [(3, 8, "CARD", 0.5), (3, 8, "PHONE", 0.5)]) == ("ab [CARD] cd", {"CARD": 1})
assert redact("xx 0123456789 yy", [(7, 12, "B", 0.5), (3, 8, "A", 0.5)]) == ("xx [A]9 yy", {"A": 1})
assert redact("ab 12345 cd", [(3, 6, "IP", 0.5), (3, 8, "PHONE", 0.5)]) == ("ab [PHONE] cd", {"PHONE": 1})
assert redact("ab 12345 cd", [(3, 8, "PHONE", 0.5), (3, 8, "CARD", 0.5)]) == ("ab [PHONE] cd", {"PHONE": 1})
# touching but not overlapping spans stay two placeholders
assert redact("0123456789", [(0, 5, "PHONE", 0.5), (5, 10, "PHONE", 0.5)]) == ("[PHONE][PHONE]", {"PHONE": 2})
# unicode text is kept character for character outside the spans
_t = "Grüße von Jürgen Müller, Tel. 030 1234567 — danke!"
_r, _c = redact(_t, [_at(_t, "Jürgen Müller", "PERSON", 1.0), _at(_t, "030 1234567", "PHONE", 0.75)])
assert _r == "Grüße von [PERSON], Tel. [PHONE] — danke!", _r
### END HIDDEN TESTS

# %% [markdown] id="md-redaction-scores"
# ### How good is the redactor? Recall and precision per entity type
#
# **Recall** of a type: the share of its gold values of which no letter or digit survives redaction
# (whatever label hid it: a card hidden as `[PHONE]` is still hidden). **Precision**: the share of
# findings with that label that overlap real PII. **Decoys untouched**: the share of each hard
# negative that no finding touched. Intervals are 95 % Wilson intervals. The shipped card pattern
# (at most 17 digits) is the contrast.

# %%
def _score_table(findings_per_doc):
    per_entity, per_decoy = feedback.span_scores(PII_DOCS, findings_per_doc)
    for col, n in (("recall", "gold"), ("precision", "found")):
        per_entity[f"{col} 95%"] = [
            "[{:.3f}, {:.3f}]".format(*reasoning.wilson(int(round(v * k)), int(k))) if k else ""
            for v, k in zip(per_entity[col], per_entity[n])]
    return per_entity, per_decoy


t0 = time.perf_counter()
FINDINGS = [feedback.presidio_findings(ANALYZER, d["text"]) for d in PII_DOCS]
FIND_S = (time.perf_counter() - t0) / len(PII_DOCS)
PER_ENTITY, PER_DECOY = _score_table(FINDINGS)
_shipped = feedback.presidio_analyzer(ROSTER, extended=False)
SHIPPED_ENTITY, _ = _score_table([feedback.presidio_findings(_shipped, d["text"]) for d in PII_DOCS])
display(PER_ENTITY.round(3))
display(PER_DECOY.round(3).T)
print(f"card recall with Presidio's shipped pattern: {SHIPPED_ENTITY.loc['CARD', 'recall']:.3f}; "
      f"with the 12-19-digit pattern: {PER_ENTITY.loc['CARD', 'recall']:.3f}")
DECOY_KEPT = float(sum(PER_DECOY["untouched"] * PER_DECOY["decoys"]) / PER_DECOY["decoys"].sum())
print(f"decoys untouched overall: {DECOY_KEPT:.3f}; Presidio took {1000 * FIND_S:.1f} ms per message")

# what the recogniser missed, by type: read them
_missed = collections.defaultdict(list)
for d, fs in zip(PII_DOCS, FINDINGS):
    red, _ = redact(d["text"], fs)
    for *_, ent, v in d["spans"]:
        if feedback.leaks(red, [v]):
            _missed[ent].append(v)
for ent in ENTITIES:
    print(f"missed {ent:6s} ({len(_missed[ent])}):", _missed[ent][:6])

# %% [markdown] id="md-budget"
# ## 4. Exercise: a sampling budget per day
#
# The log keeps a sample, not everything: reviewing costs people's time and every stored row is a
# liability. A **per-day cap** makes the cost predictable, and a spike — a promotion day with six
# times the traffic, a bot — cannot fill the log with one day and drown the days around it.
#
# Within a day the sample must be **uniform**: every request of the day equally likely to be kept,
# whenever it came. Requests arrive one by one and the day's total is not known in advance, so
# "keep the first `cap`" is biased (towards mornings), and "keep every n-th" needs the total.
# **Reservoir sampling** (Algorithm R, Vitter 1985) does it in one pass with `cap` slots: keep the
# first `cap` requests; the `i`-th (1-based, `i > cap`) replaces a uniformly chosen slot with
# probability `cap / i` — draw `j = rng.randrange(i)` and replace slot `j` if `j < cap`. Each request
# ends in the reservoir with probability `cap / n`, whatever `n` turns out to be.
#
# Write `daily_reservoir(requests, cap, seed)`: the requests come in arrival order, days in order;
# a new day starts a new reservoir; `random.Random(seed)` is the only randomness (one generator for
# the whole stream). Return the kept request ids, day by day, in arrival order within each day.
# The cap is applied **as you sample**: sampling the whole stream first and capping each day after
# is not uniform within the day and starves quiet days.

# %% id="ex-reservoir" nbgrader={"grade": false, "grade_id": "ex_daily_reservoir", "locked": false, "schema_version": 3, "solution": true, "task": false}
def daily_reservoir(requests: list[dict], cap: int, seed: int) -> list[str]:
    """A uniform sample of at most ``cap`` requests per day, in one pass (Algorithm R per day).

    requests: dicts with ``"request_id"`` and ``"day"``, in arrival order (days non-decreasing).
    Returns the kept ``request_id``s, day by day, each day's in arrival order."""
    ### BEGIN SOLUTION
    rng = random.Random(seed)
    kept: list[str] = []
    reservoir: list[tuple[int, str]] = []
    day, seen = None, 0
    for index, r in enumerate(requests):
        if r["day"] != day:
            kept.extend(rid for _, rid in sorted(reservoir))
            reservoir, day, seen = [], r["day"], 0
        seen += 1
        if len(reservoir) < cap:
            reservoir.append((index, r["request_id"]))
        else:
            j = rng.randrange(seen)
            if j < cap:
                reservoir[j] = (index, r["request_id"])
    kept.extend(rid for _, rid in sorted(reservoir))
    return kept
    ### END SOLUTION


# %% id="test-reservoir" nbgrader={"grade": true, "grade_id": "test_daily_reservoir", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
def _stream(sizes):
    return [{"request_id": f"d{d}-{i:03d}", "day": d} for d, n in enumerate(sizes) for i in range(n)]


_s = _stream([3, 10, 5])
_k = daily_reservoir(_s, cap=4, seed=0)
_by_day = collections.Counter(rid.split("-")[0] for rid in _k)
assert _by_day == {"d0": 3, "d1": 4, "d2": 4}, _by_day
assert len(set(_k)) == len(_k) and set(_k) <= {r["request_id"] for r in _s}
assert _k == sorted(_k), "day by day, in arrival order within each day"
assert daily_reservoir(_s, cap=4, seed=0) == _k, "deterministic for a seed"
assert daily_reservoir(_s, cap=20, seed=0) == [r["request_id"] for r in _s]
### BEGIN HIDDEN TESTS
assert daily_reservoir([], cap=3, seed=0) == []
assert any(daily_reservoir(_s, cap=4, seed=s) != _k for s in range(1, 5)), "the seed must matter"
# uniform within a day: over many seeds, every position of a 20-request day is kept equally often
_s = _stream([20])
_counts = collections.Counter(rid for seed in range(3000) for rid in daily_reservoir(_s, cap=5, seed=seed))
_obs = np.array([_counts[r["request_id"]] for r in _s])
assert _obs.sum() == 3000 * 5
_p = scipy.stats.chisquare(_obs).pvalue
assert _p > 1e-3, f"inclusion is not uniform over arrival order (chi-square p = {_p:.2g}): {_obs.tolist()}"
# a spike day does not eat the quiet days' share, and each day is uniform on its own
_s = _stream([6, 60, 12])
_counts = collections.Counter()
for seed in range(2000):
    _k = daily_reservoir(_s, cap=6, seed=seed)
    assert collections.Counter(rid.split("-")[0] for rid in _k) == {"d0": 6, "d1": 6, "d2": 6}
    _counts.update(_k)
for _d, _n in ((1, 60), (2, 12)):
    _obs = np.array([_counts[f"d{_d}-{i:03d}"] for i in range(_n)])
    _p = scipy.stats.chisquare(_obs).pvalue
    assert _p > 1e-3, f"day {_d} is not uniform (chi-square p = {_p:.2g})"
# one generator for the whole stream: two days of the same size do not keep the same positions
_s = _stream([12, 12])
assert any(daily_reservoir(_s, cap=4, seed=s)[:4] != [r.replace("d1", "d0") for r in daily_reservoir(_s, cap=4, seed=s)[4:]]
           for s in range(20)), "each day restarts the generator: every day keeps the same positions"
# arrival order, not the ids' sort order; the global random state is left alone
_s = [{"request_id": f"r{i}", "day": 0} for i in range(12)]
for _seed in range(20):
    _k = daily_reservoir(_s, cap=11, seed=_seed)
    assert _k == [r["request_id"] for r in _s if r["request_id"] in _k], _k
_st = random.getstate()
daily_reservoir(_stream([30, 30]), cap=5, seed=3)
assert random.getstate() == _st, "use random.Random(seed), not the global generator"
# the days are not aligned to the caller's list positions: a day in the middle of a list still works
_s = [{"request_id": f"x{i}", "day": 3} for i in range(4)] + [{"request_id": f"y{i}", "day": 7} for i in range(2)]
assert daily_reservoir(_s, cap=2, seed=1)[2:] == ["y0", "y1"]
### END HIDDEN TESTS

# %% [markdown] id="md-week"
# ## 5. A week in production, through the live endpoint
#
# The simulated week (`feedback.week_traffic`): reviews like the training data, lesson 9's shifted
# stream (other languages, coffee machines), and from day 2 a new in-app prompt — "what did you
# expect, and what did you get?" — whose answers are **contrast and negation** reviews ("I expected
# the latte to be bitter, but it was smooth"), the slice a 135M model that reads words and not
# sentences gets wrong. Day `spike_day` is a promotion with several times the traffic. Some users
# sign their review or paste an e-mail, a phone or a card number.
#
# Every request goes to **llama.cpp's server** on the course's GGUF (lesson 8's endpoint), which
# answers with the label token and its probability (lesson 9's `drift.score_requests`). Then, for
# the requests the budget keeps, and for every request whose user pressed thumbs-down (they have a
# budget of their own), the log row is **redacted first and written second**, in one transaction,
# into the store's `requests` table next to lesson 9's `events` table. Only hashes of redacted text
# ever go into an event.

# %%
WEEK = feedback.week_traffic(CFG["days"], CFG["per_day"], seed=11, spike_day=CFG["spike_day"],
                             spike_factor=CFG["spike_factor"], roster=ROSTER)
TRUTH = {r["request_id"]: r["label"] for r in WEEK}
BY_ID = {r["request_id"]: r for r in WEEK}
tok = models.load_tokenizer()
with serving.LlamaServer(models.gguf_path(), n_threads=THREADS) as server:
    t0 = time.perf_counter()
    SERVED = drift.score_requests(server.base_url, tok, WEEK, progress=True, desc="the week's requests")
    SERVE_S = time.perf_counter() - t0
PRED = dict(zip(TRUTH, SERVED["predicted"]))
P_POS = dict(zip(TRUTH, SERVED["p_positive"]))
_streams = pd.DataFrame({"stream": [r["stream"] for r in WEEK], "correct": SERVED["correct"]})
print(f"{len(WEEK)} requests served in {SERVE_S:.1f} s ({1000 * np.median(SERVED['latency_s']):.0f} ms median); "
      f"errors: {int(SERVED['error'].sum())}")
display(_streams.groupby("stream")["correct"].agg(["count", "mean"]).rename(columns={"mean": "accuracy"}).round(3))

# %%
DOWN = set(feedback.thumbs_down(WEEK, SERVED["predicted"].tolist(), seed=5))
SAMPLED = daily_reservoir(WEEK, CFG["cap"], seed=1)
DOWN_LOGGED = daily_reservoir([r for r in WEEK if r["request_id"] in DOWN], CFG["cap_down"], seed=2)
LOGGED = sorted(set(SAMPLED) | set(DOWN_LOGGED), key=list(TRUTH).index)

STORE = WORK / "store.sqlite"
for suffix in ("", "-wal", "-shm"):
    STORE.with_name(STORE.name + suffix).unlink(missing_ok=True)
conn = events.connect(STORE)
conn.executescript(EVENTS_TABLE + feedback.REQUEST_LOG)
START = events.SimClock().now()


def log_event(kind: str, day: int, inputs, outputs, metrics: dict, parent=None) -> int:
    """Lesson 9's append, for one writer: the record, chained to the last row's hash."""
    record = {"run_id": f"week-{BUDGET}", "kind": kind, "actor": "feedback-loop",
              "time": events.iso(START + pd.Timedelta(days=day, hours=23, minutes=59)),
              "inputs_hash": digest(inputs), "outputs_hash": digest(outputs),
              "metrics": canonical_json(metrics), "parent": parent}
    conn.execute("BEGIN IMMEDIATE")
    last = conn.execute("SELECT hash FROM events ORDER BY id DESC LIMIT 1").fetchone()
    prev = last[0] if last else GENESIS
    cur = conn.execute("INSERT INTO events (run_id, kind, time, actor, inputs_hash, outputs_hash, metrics, parent, "
                       "prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (*[record[k] for k in events.RECORD_FIELDS], prev, digest(prev + canonical_json(record))))
    conn.execute("COMMIT")
    return cur.lastrowid


REDACTIONS = collections.Counter()
SERVE_EVENT = {}
t0 = time.perf_counter()
for day in range(CFG["days"]):
    todays = [rid for rid in LOGGED if BY_ID[rid]["day"] == day]
    rows = []
    for rid in todays:
        r = BY_ID[rid]
        text, counts = redact(r["text"], feedback.presidio_findings(ANALYZER, r["text"]))  # redact first
        REDACTIONS.update(counts)
        i = list(TRUTH).index(rid)
        rows.append((rid, day, f"{r['second']:.0f}", text, PRED[rid], float(P_POS[rid]),
                     1000 * float(SERVED["latency_s"][i]), json.dumps(counts, sort_keys=True)))
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)   # ... write second
    conn.execute("COMMIT")
    arrived = sum(r["day"] == day for r in WEEK)
    SERVE_EVENT[day] = log_event("serve", day, [row[3] for row in rows], [row[4] for row in rows],
                                 {"requests": arrived, "logged": len(rows),
                                  "thumbs_down": sum(BY_ID[rid]["day"] == day for rid in DOWN),
                                  "redactions": dict(collections.Counter(
                                      k for row in rows for k, v in json.loads(row[7]).items() for _ in range(v)))})
LOG_S = time.perf_counter() - t0
print(f"logged {len(LOGGED)} of {len(WEEK)} requests ({len(SAMPLED)} sampled, {len(DOWN_LOGGED)} thumbs-down) "
      f"in {LOG_S:.1f} s; placeholders written: {dict(REDACTIONS)}")

# %%
_days = pd.DataFrame({
    "arrived": collections.Counter(r["day"] for r in WEEK),
    "sampled": collections.Counter(BY_ID[rid]["day"] for rid in SAMPLED),
    "thumbs-down logged": collections.Counter(BY_ID[rid]["day"] for rid in DOWN_LOGGED),
}).fillna(0).astype(int).sort_index()
fig, ax = plt.subplots(figsize=(7, 3))
_days.plot.bar(ax=ax)
ax.axhline(CFG["cap"], color="k", lw=0.8, ls="--", label=f"cap {CFG['cap']}/day")
ax.set_xlabel("day"); ax.set_ylabel("requests"); ax.set_title("The sampling budget under a spike"); ax.legend()
plt.show()
# uniform within the spike day: the kept requests' arrival times against the day's (KS test)
_spike = [r["second"] for r in WEEK if r["day"] == CFG["spike_day"]]
_kept_spike = [BY_ID[rid]["second"] for rid in SAMPLED if BY_ID[rid]["day"] == CFG["spike_day"]]
SPIKE_KS = scipy.stats.ks_2samp(_kept_spike, _spike)
print(f"spike day: {len(_spike)} requests, {len(_kept_spike)} kept; arrival times kept vs all: "
      f"KS = {SPIKE_KS.statistic:.3f}, p = {SPIKE_KS.pvalue:.3f}")
assert (_days["sampled"] <= CFG["cap"]).all()

# %% [markdown] id="md-tags"
# ## 6. Tagging bad rows three ways
#
# Nobody knows which answers were wrong; three signals point at rows worth a person's look, and a
# reviewer then writes the **correction** for every row in the queue:
#
# 1. **Manual audit** — each day the reviewer reads a few rows drawn at random from the log. It is
#    the only signal that is unbiased (it estimates the log's error rate), and the slowest.
# 2. **Drift** — lesson 9's input features per row (`n_words`, out-of-vocabulary rate, non-ASCII
#    share) beyond the training data's 99th percentile, or an answer the model was unsure of
#    (P(positive) between 0.35 and 0.65).
# 3. **Thumbs-down** — what users said. Most presses follow a wrong answer, some do not (a press by
#    mistake, or at the coffee), and most wrong answers get none.
#
# The tags go to a tag file, one JSON object per line: what a reviewer's tool would write and an
# instructor can read.

# %%
_vocab = drift.training_vocabulary()
_base = drift.input_features([r["text"] for r in load_reviews("train")], _vocab)
_q99 = {k: float(np.quantile(v, 0.99)) for k, v in _base.items()}
_logged_text = {rid: conn.execute("SELECT text FROM requests WHERE request_id = ?", (rid,)).fetchone()[0]
                for rid in LOGGED}
_feat = drift.input_features([_logged_text[rid] for rid in LOGGED], _vocab)
_rng = random.Random(3)
SIGNALS = collections.defaultdict(set)   # request id -> sources
for day in range(CFG["days"]):
    todays = [rid for rid in LOGGED if BY_ID[rid]["day"] == day]
    for rid in _rng.sample(todays, min(CFG["audit"], len(todays))):
        SIGNALS[rid].add("audit")
for i, rid in enumerate(LOGGED):
    if any(_feat[k][i] > _q99[k] for k in _q99) or 0.35 < P_POS[rid] < 0.65:
        SIGNALS[rid].add("drift")
    if rid in DOWN:
        SIGNALS[rid].add("thumbs-down")
QUEUE = [rid for rid in LOGGED if rid in SIGNALS]
REVIEWS = feedback.review(QUEUE, TRUTH, seed=4)
TAG_FILE = WORK / "tags.jsonl"
with TAG_FILE.open("w") as f:
    for t in REVIEWS:
        t = {**t, "day": BY_ID[t["request_id"]]["day"], "signals": sorted(SIGNALS[t["request_id"]])}
        f.write(json.dumps(t) + "\n")
TAGS = [json.loads(line) for line in TAG_FILE.open()]

_wrong_logged = {rid for rid in LOGGED if PRED[rid] != TRUTH[rid]}
_rows = []
for source in ("audit", "drift", "thumbs-down"):
    ids = {rid for rid, s in SIGNALS.items() if source in s}
    hit = len(ids & _wrong_logged)
    _rows.append({"source": source, "rows tagged": len(ids), "of them wrong": hit,
                  "precision": hit / max(len(ids), 1), "wrong rows found": f"{hit}/{len(_wrong_logged)}"})
_all = set(SIGNALS)
_rows.append({"source": "any", "rows tagged": len(_all), "of them wrong": len(_all & _wrong_logged),
              "precision": len(_all & _wrong_logged) / max(len(_all), 1),
              "wrong rows found": f"{len(_all & _wrong_logged)}/{len(_wrong_logged)}"})
SOURCES = pd.DataFrame(_rows).set_index("source")
display(SOURCES.round(3))
print(f"{len(QUEUE)} rows reviewed, {len(REVIEWS)} reviews (some rows by two people); tag file {TAG_FILE.name}")

# %% [markdown] id="md-sft"
# ## 7. Exercise: tags → SFT examples
#
# A reviewed row becomes a training example in the chat format TRL's `SFTTrainer` takes
# (conversational prompt/completion): the user's message as the model saw it in the log — the
# **redacted** text — and the reviewer's **correction** as the assistant's answer, in the course's
# phrasing:
#
# ```python
# {"prompt": [{"role": "user", "content": sentiment_question(text)}],
#  "completion": [{"role": "assistant", "content": sentiment_answer(label)}],
#  "request_id": rid}
# ```
#
# The rules, each of which a real pipeline has broken:
# - the label is the **correction** — the model's own answer is what was wrong;
# - only text **from the log** (redacted) is used; a tag whose request is not in the log is skipped;
# - a request whose reviewers **disagree** is dropped (nobody knows its label) — this comes first,
#   request by request, before the duplicates below are looked at;
# - **duplicates** under `normalise_text` (people retype the same review with other case and
#   punctuation) become one example, the first in tag order; if they carry different labels, all of
#   them are dropped;
# - a text that is, normalised, one of the **evaluation sets'** texts is dropped: training on the
#   test set makes the "after" number a lie. The comparison is on normalised text, not exact strings
#   — a retyped test review is still the test review.
#
# Return the examples in the order their first tag appears.

# %% id="ex-sft" nbgrader={"grade": false, "grade_id": "ex_sft_examples", "locked": false, "schema_version": 3, "solution": true, "task": false}
def sft_examples(tags: list[dict], log: dict[str, dict], eval_texts: list[str]) -> list[dict]:
    """Reviewed ``tags`` (``{"request_id", "correction", ...}``) → chat-format SFT examples
    ``{"prompt": [user message], "completion": [assistant message], "request_id"}``.

    log: request id → the logged row ``{"text" (redacted), "predicted", ...}``.
    eval_texts: the evaluation sets' texts (none of them, normalised, may be trained on)."""
    ### BEGIN SOLUTION
    held_out = {normalise_text(t) for t in eval_texts}
    labels: dict[str, set] = {}
    for t in tags:
        if t["request_id"] in log and t.get("correction") is not None:
            labels.setdefault(t["request_id"], set()).add(t["correction"])
    by_text: dict[str, list] = {}
    for rid, corrections in labels.items():
        if len(corrections) != 1:
            continue
        key = normalise_text(log[rid]["text"])
        if key in held_out:
            continue
        by_text.setdefault(key, []).append((rid, next(iter(corrections))))
    out = []
    for items in by_text.values():
        if len({label for _, label in items}) != 1:
            continue
        rid, label = items[0]
        out.append({"prompt": [{"role": "user", "content": sentiment_question(log[rid]["text"])}],
                    "completion": [{"role": "assistant", "content": sentiment_answer(label)}],
                    "request_id": rid})
    return out
    ### END SOLUTION


# %% id="test-sft" nbgrader={"grade": true, "grade_id": "test_sft_examples", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
_log = {"r1": {"text": "The latte was not bitter at all.", "predicted": "negative"},
        "r2": {"text": "Lovely staff, but the mocha was stale. Regards, [PERSON]", "predicted": "positive"},
        "r3": {"text": "Great espresso.", "predicted": "positive"}}
_tags = [{"request_id": "r1", "source": "thumbs-down", "reviewer": "ana", "correction": "positive"},
         {"request_id": "r2", "source": "manual", "reviewer": "ana", "correction": "negative"}]
_ex = sft_examples(_tags, _log, eval_texts=[])
assert [e["request_id"] for e in _ex] == ["r1", "r2"]
assert _ex[0] == {"prompt": [{"role": "user", "content": sentiment_question("The latte was not bitter at all.")}],
                  "completion": [{"role": "assistant", "content": sentiment_answer("positive")}],
                  "request_id": "r1"}
assert _ex[1]["completion"][0]["content"] == "This review is negative"   # the correction, not the model's answer
### BEGIN HIDDEN TESTS
assert sft_examples([], _log, []) == []
# the text comes from the log only; a tag for a request that was never logged is skipped
assert [e["request_id"] for e in sft_examples(_tags + [{"request_id": "r9", "correction": "positive"}], _log, [])] == ["r1", "r2"]
assert "[PERSON]" in _ex[1]["prompt"][0]["content"]
# reviewers disagree on r1: dropped; a second reviewer who agrees changes nothing
_two = _tags + [{"request_id": "r1", "source": "manual", "reviewer": "ben", "correction": "negative"},
                {"request_id": "r2", "source": "manual", "reviewer": "ben", "correction": "negative"}]
assert [e["request_id"] for e in sft_examples(_two, _log, [])] == ["r2"]
# a tag without a correction (not reviewed yet) is no label
assert [e["request_id"] for e in sft_examples(_tags + [{"request_id": "r3", "source": "drift"}], _log, [])] == ["r1", "r2"]
# duplicates under normalisation: one example, the first in tag order
_log2 = {**_log, "r4": {"text": "the LATTE was not bitter at all!!", "predicted": "negative"},
         "r5": {"text": "The  latte was not bitter at all", "predicted": "positive"}}
_t2 = [{"request_id": "r4", "correction": "positive"}, {"request_id": "r1", "correction": "positive"},
       {"request_id": "r5", "correction": "positive"}, {"request_id": "r3", "correction": "positive"}]
_e2 = sft_examples(_t2, _log2, [])
assert [e["request_id"] for e in _e2] == ["r4", "r3"], [e["request_id"] for e in _e2]
assert _e2[0]["prompt"][0]["content"] == sentiment_question("the LATTE was not bitter at all!!")
# the same text with conflicting labels: all copies dropped
_t3 = [{"request_id": "r4", "correction": "positive"}, {"request_id": "r5", "correction": "negative"},
       {"request_id": "r3", "correction": "positive"}]
assert [e["request_id"] for e in sft_examples(_t3, _log2, [])] == ["r3"]
# disagreement is settled per request first: r4's two reviewers disagree, so r4 is gone before dedupe
assert [e["request_id"] for e in sft_examples([{"request_id": "r4", "correction": "positive"},
                                               {"request_id": "r4", "correction": "negative"},
                                               {"request_id": "r1", "correction": "positive"}], _log2, [])] == ["r1"]
# leakage is equality of normalised texts, not containment
assert [e["request_id"] for e in sft_examples(_tags + [{"request_id": "r3", "correction": "positive"}], _log,
                                              ["Great espresso, friendly staff."])] == ["r1", "r2", "r3"]
# leakage: an evaluation text, retyped, is still the evaluation text
assert [e["request_id"] for e in sft_examples(_tags, _log, ["THE LATTE WAS NOT BITTER AT ALL"])] == ["r2"]
assert [e["request_id"] for e in sft_examples(_tags, _log, ["The latte was not bitter at all."])] == ["r2"]
assert [e["request_id"] for e in sft_examples(_tags, _log, ["The latte was not bitter."])] == ["r1", "r2"]
### END HIDDEN TESTS

# %% [markdown] id="md-sft-check"
# The week's tags through your function, and the checks a pipeline runs before training: every
# example's label is the correction, no raw PII of the week is in any example (`feedback.leaks`
# looks for each raw value, and for long digit strings with separators removed), no example is an
# evaluation text.

# %%
SLICE = feedback.contrast_eval(CFG["slice_n"])
GOLD = load_reviews("gold", CFG["gold_n"])
EVAL_TEXTS = [r["text"] for r in SLICE + GOLD]
LOG = {row["request_id"]: dict(row) for row in conn.execute("SELECT * FROM requests")}
_week_pii = sorted({v for r in WEEK for v in r["pii"]})


def examples_until(day: int) -> list[dict]:
    """The SFT examples from the tags of days ``<= day``."""
    return sft_examples([t for t in TAGS if t["day"] <= day], LOG, EVAL_TEXTS)


EXAMPLES = examples_until(CFG["days"] - 1)
_leaked = [e["request_id"] for e in EXAMPLES if feedback.leaks(json.dumps(e, ensure_ascii=False), _week_pii)]
_in_eval = {normalise_text(t) for t in EVAL_TEXTS} & {normalise_text(LOG[e["request_id"]]["text"]) for e in EXAMPLES}
_eval_hits = [rid for rid in LOG if normalise_text(LOG[rid]["text"]) in {normalise_text(t) for t in EVAL_TEXTS}]
_ex_streams = collections.Counter(BY_ID[e["request_id"]]["stream"] for e in EXAMPLES)
_ex_fix = sum(PRED[e["request_id"]] != e["completion"][0]["content"].split()[-1] for e in EXAMPLES)
print(f"{len(EXAMPLES)} SFT examples from {len(TAGS)} reviews: by stream {dict(_ex_streams)}; "
      f"{_ex_fix} correct a wrong answer, the rest confirm a right one")
print(f"logged rows that are evaluation texts (dropped): {len(_eval_hits)}; examples with raw PII: {len(_leaked)}")
assert not _leaked and not _in_eval

# %% [markdown] id="md-trigger"
# ## 8. Exercise: the retrain trigger
#
# Retraining has a cost (compute, a new deploy, a new evaluation, the risk of a regression), so it
# runs on a **cadence rule**, not on a feeling. Given the number of new examples since the last
# retrain, the days since it, and the day's drift severity, decide — in this order:
#
# 1. fewer than `min_days` since the last retrain → **no**, `"cooldown"` (a deploy needs time to
#    show its effect; retraining daily chases noise);
# 2. no new examples → **no**, `"no_new_examples"` (drift alone gives nothing to learn from: that is
#    an alarm for a person, lesson 9);
# 3. drift severity at or above `drift_threshold` and at least `min_drift_examples` new examples →
#    **yes**, `"drift"`;
# 4. at least `min_examples` new examples → **yes**, `"enough_examples"`;
# 5. `max_days` or more since the last retrain → **yes**, `"stale"` (a model must not go
#    unrefreshed for ever while some examples wait);
# 6. otherwise **no**, `"waiting"`.
#
# Return `{"retrain": bool, "reason": str}`: the reason is what the event records, and what the
# person on call reads.

# %% id="ex-trigger" nbgrader={"grade": false, "grade_id": "ex_retrain_decision", "locked": false, "schema_version": 3, "solution": true, "task": false}
def retrain_decision(new_examples: int, days_since_retrain: float, drift_severity: float, *,
                     min_examples: int, min_days: float, max_days: float, drift_threshold: float,
                     min_drift_examples: int) -> dict:
    """The cadence rule (see above). ``drift_severity`` is in [0, 1] (the largest KS statistic of
    the day's features against the training data). Returns ``{"retrain": bool, "reason": str}``."""
    ### BEGIN SOLUTION
    if days_since_retrain < min_days:
        return {"retrain": False, "reason": "cooldown"}
    if new_examples <= 0:
        return {"retrain": False, "reason": "no_new_examples"}
    if drift_severity >= drift_threshold and new_examples >= min_drift_examples:
        return {"retrain": True, "reason": "drift"}
    if new_examples >= min_examples:
        return {"retrain": True, "reason": "enough_examples"}
    if days_since_retrain >= max_days:
        return {"retrain": True, "reason": "stale"}
    return {"retrain": False, "reason": "waiting"}
    ### END SOLUTION


# %% id="test-trigger" nbgrader={"grade": true, "grade_id": "test_retrain_decision", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
_rule = dict(min_examples=50, min_days=2, max_days=14, drift_threshold=0.3, min_drift_examples=10)
assert retrain_decision(80, 5, 0.1, **_rule) == {"retrain": True, "reason": "enough_examples"}
assert retrain_decision(80, 1, 0.9, **_rule) == {"retrain": False, "reason": "cooldown"}
assert retrain_decision(20, 5, 0.1, **_rule) == {"retrain": False, "reason": "waiting"}
assert retrain_decision(20, 5, 0.5, **_rule) == {"retrain": True, "reason": "drift"}
### BEGIN HIDDEN TESTS
assert retrain_decision(0, 30, 0.9, **_rule) == {"retrain": False, "reason": "no_new_examples"}
assert retrain_decision(5, 5, 0.9, **_rule) == {"retrain": False, "reason": "waiting"}      # drift, too few examples
assert retrain_decision(10, 5, 0.3, **_rule) == {"retrain": True, "reason": "drift"}        # both thresholds inclusive
assert retrain_decision(50, 2, 0.0, **_rule) == {"retrain": True, "reason": "enough_examples"}
assert retrain_decision(49, 2, 0.0, **_rule) == {"retrain": False, "reason": "waiting"}
assert retrain_decision(3, 14, 0.0, **_rule) == {"retrain": True, "reason": "stale"}
assert retrain_decision(3, 13.9, 0.0, **_rule) == {"retrain": False, "reason": "waiting"}
assert retrain_decision(80, 1.99, 0.0, **_rule) == {"retrain": False, "reason": "cooldown"}
assert retrain_decision(80, 30, 0.5, **_rule) == {"retrain": True, "reason": "drift"}        # drift is named first
assert retrain_decision(80, 30, 0.0, **_rule) == {"retrain": True, "reason": "enough_examples"}  # before stale
assert retrain_decision(0, 1, 0.9, **_rule) == {"retrain": False, "reason": "cooldown"}     # cooldown first
assert retrain_decision(5, 14, 0.9, **_rule) == {"retrain": True, "reason": "stale"}        # drift with too few falls through
assert all(type(retrain_decision(n, d, s, **_rule)["retrain"]) is bool for n, d, s in ((80, 5, 0.1), (20, 5, 0.1)))
assert retrain_decision(2, 0, 0.0, **{**_rule, "min_days": 0}) == {"retrain": False, "reason": "waiting"}
### END HIDDEN TESTS

# %% [markdown] id="md-trigger-week"
# The week replayed day by day: the day's drift severity is the largest two-sample KS statistic of
# the logged rows' input features against the training data (lesson 9's features), the new examples
# are those from tags since the last retrain, and each decision is an event whose parent is the
# day's serve event. The retrain below trains on the examples of the last day the rule said yes.

# %%
RULE = {k: CFG[k] for k in ("min_examples", "min_days", "max_days", "drift_threshold", "min_drift_examples")}
last_retrain, used, DECISIONS = -CFG["max_days"], set(), []
for day in range(CFG["days"]):
    ids = [i for i, rid in enumerate(LOGGED) if BY_ID[rid]["day"] == day]
    severity = max(scipy.stats.ks_2samp(_feat[k][ids], _base[k]).statistic for k in _base) if ids else 0.0
    available = {e["request_id"] for e in examples_until(day)}
    decision = retrain_decision(len(available - used), day - last_retrain, float(severity), **RULE)
    DECISIONS.append({"day": day, "new_examples": len(available - used), "days_since": day - last_retrain,
                      "drift_severity": round(float(severity), 3), **decision})
    log_event("retrain_decision", day, sorted(available - used), decision,
              {**DECISIONS[-1], "rule": RULE}, parent=SERVE_EVENT[day])
    if decision["retrain"]:
        last_retrain, used, RETRAIN_DAY = day, used | available, day
display(pd.DataFrame(DECISIONS).set_index("day"))
assert any(d["retrain"] for d in DECISIONS), "the rule never fired this week"
TRAIN_EXAMPLES = examples_until(RETRAIN_DAY)
print(f"retrain on the {len(TRAIN_EXAMPLES)} examples available on day {RETRAIN_DAY}")

# %% [markdown] id="md-retrain"
# ## 9. The retrain: does it fix the slice without breaking the rest?
#
# LoRA SFT with TRL on the real SmolLM2-135M-Instruct (fp32, in transformers; the served file is its
# Q4_1 quantization, so "before" is measured here too, on the same weights that are trained). The
# tagged examples are mixed with an equal number of **replay** examples — rows of the original
# training data — so that the update does not forget what the model already did well.
#
# Two sets, both held out from every example (the leakage check above): the **slice**, fresh contrast
# reviews drawn apart from the week, and the **gold** set of lessons 2-4. Accuracy with 95 % Wilson
# intervals; differences paired over the same rows with a bootstrap interval. The **control** is the
# same training run on replay examples only, the same number of steps: if it moved the slice as
# much, the tags were not what fixed it.

# %%
def as_example(text: str, label: str) -> dict:
    return {"prompt": [{"role": "user", "content": sentiment_question(text)}],
            "completion": [{"role": "assistant", "content": sentiment_answer(label)}]}


model, _ = models.load_teacher()
_train = load_reviews("train")
REPLAY = [as_example(r["text"], r["label"]) for r in random.Random(0).sample(_train, CFG["replay"])]
CONTROL = [as_example(r["text"], r["label"])
           for r in random.Random(1).sample(_train, len(TRAIN_EXAMPLES) + CFG["replay"])]  # as many examples
EVAL = {}


def evaluate(name: str) -> None:
    EVAL[name] = {k: evaluation.score_sentiment(model, tok, rows)["correct"].astype(float)
                  for k, rows in (("slice", SLICE), ("gold", GOLD))}


evaluate("base")
RUNS = {}
for name, data in (("tags + replay", TRAIN_EXAMPLES + REPLAY), ("replay only (control)", CONTROL)):
    t0 = time.perf_counter()
    model, losses = feedback.sft_train(model, tok, data, steps=CFG["sft_steps"], batch_size=CFG["sft_batch"],
                                       lr=CFG["lr"], lora_r=CFG["lora_r"], seed=0)
    RUNS[name] = {"losses": losses, "seconds": time.perf_counter() - t0, "examples": len(data)}
    evaluate(name)
    model = model.unload()          # the base weights back, for the next run
    print(f"{name}: {len(data)} examples, {CFG['sft_steps']} steps in {RUNS[name]['seconds']:.0f} s, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")

# %%
_rows = []
for name, res in EVAL.items():
    for k in ("slice", "gold"):
        n, hit = len(res[k]), int(res[k].sum())
        lo, hi = reasoning.wilson(hit, n)
        _rows.append({"model": name, "set": k, "n": n, "accuracy": hit / n, "95% low": lo, "95% high": hi})
ACC = pd.DataFrame(_rows)
display(ACC.pivot(index="model", columns="set", values=["accuracy", "95% low", "95% high"]).round(3))
DIFF = {(name, k): reasoning.paired_bootstrap(EVAL[name][k], EVAL["base"][k], samples=CFG["n_boot"], seed=0)
        for name in RUNS for k in ("slice", "gold")}
for (name, k), (d, lo, hi) in DIFF.items():
    print(f"{name:24s} - base on {k:5s}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")

fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for name, run in RUNS.items():
    axes[0].plot(run["losses"], label=name)
axes[0].set_xlabel("step"); axes[0].set_ylabel("loss (completion tokens)"); axes[0].set_title("LoRA SFT"); axes[0].legend()
for j, k in enumerate(("slice", "gold")):
    sub = ACC[ACC["set"] == k]
    axes[1].errorbar(np.arange(len(sub)) + 0.15 * j, sub["accuracy"],
                     yerr=[sub["accuracy"] - sub["95% low"], sub["95% high"] - sub["accuracy"]],
                     fmt="o", capsize=3, label=k)
axes[1].set_xticks(range(len(EVAL)), list(EVAL), rotation=10); axes[1].set_ylabel("accuracy")
axes[1].set_title("Before and after (95% Wilson)"); axes[1].legend()
plt.tight_layout(); plt.show()
log_event("retrain", RETRAIN_DAY, [e["request_id"] for e in TRAIN_EXAMPLES], canonical_json(ACC.to_dict("records")),
          {"examples": len(TRAIN_EXAMPLES), "replay": len(REPLAY), "steps": CFG["sft_steps"],
           "slice_diff": DIFF[("tags + replay", "slice")], "gold_diff": DIFF[("tags + replay", "gold")]},
          parent=conn.execute("SELECT id FROM events WHERE kind = 'retrain_decision' ORDER BY id DESC LIMIT 1").fetchone()[0])

# %% [markdown] id="md-grep"
# ## 10. Is there PII in the store?
#
# The test that matters for the auditor: read the store's files **as bytes** — the database, its
# write-ahead log (`-wal`, where SQLite keeps recent pages until a checkpoint) and the shared-memory
# index — plus the tag file, and look for every raw PII value the week's users sent (verbatim, and
# for long digit strings with separators removed). A redaction that ran *after* the insert would
# pass a `SELECT` check and fail this one, because the old page is still in the WAL. The chain of
# the events is verified as lesson 9 does.

# %%
_files = [p for p in (STORE, STORE.with_name(STORE.name + "-wal"), STORE.with_name(STORE.name + "-shm"), TAG_FILE)
          if p.exists()]
_blob = b"".join(p.read_bytes() for p in _files).decode("utf-8", errors="replace")
RAW_IN_STORE = feedback.leaks(_blob, _week_pii)
_pii_logged = sorted({v for rid in LOGGED for v in BY_ID[rid]["pii"]})
print(f"{len(_week_pii)} raw PII values sent this week, {len(_pii_logged)} of them in logged requests; "
      f"found in {', '.join(p.name for p in _files)} ({len(_blob) / 1e3:.0f} kB): {len(RAW_IN_STORE)}")
print("left in the store:", RAW_IN_STORE[:10])
_ev = [dict(r) for r in conn.execute("SELECT * FROM events ORDER BY id")]
_prev = GENESIS
for _r in _ev:
    assert _r["prev_hash"] == _prev and _r["hash"] == digest(_prev + canonical_json(events.event_record(_r)))
    _prev = _r["hash"]
print(f"events chain: {len(_ev)} events, verified; kinds {dict(collections.Counter(r['kind'] for r in _ev))}")

# %% [markdown] id="md-results"
# ## What we measured
#
# Every value below was computed in this run.

# %%
_res = [{"quantity": "labelled messages (PII and decoys)", "value": len(PII_DOCS), "unit": "messages",
         "note": "Faker, 5 locales; a third hold only hard negatives"}]
for ent in ENTITIES:
    r = PER_ENTITY.loc[ent]
    _res.append({"quantity": f"redaction recall: {ent}", "value": round(float(r["recall"]), 3), "unit": "fraction",
                 "note": f"{int(r['gold'])} values, 95% {r['recall 95%']}; precision {r['precision']:.3f} "
                         f"({int(r['found'])} findings)"})
_res += [
    {"quantity": "card recall, Presidio's shipped pattern", "value": round(float(SHIPPED_ENTITY.loc["CARD", "recall"]), 3),
     "unit": "fraction", "note": "stops at 17 digits"},
    {"quantity": "hard negatives untouched", "value": round(DECOY_KEPT, 3), "unit": "fraction",
     "note": ", ".join(f"{k} {v:.2f}" for k, v in PER_DECOY["untouched"].items())},
    {"quantity": "requests served / logged", "value": f"{len(WEEK)} / {len(LOGGED)}", "unit": "requests",
     "note": f"cap {CFG['cap']}/day + {CFG['cap_down']} thumbs-down/day; spike day KS p = {SPIKE_KS.pvalue:.2f}"},
    {"quantity": "served accuracy by stream", "value": ", ".join(f"{k} {v:.2f}" for k, v in
                                                                 _streams.groupby("stream")["correct"].mean().items()),
     "unit": "fraction", "note": "llama.cpp, Q4_1"},
    {"quantity": "raw PII values found in the store", "value": len(RAW_IN_STORE), "unit": "values",
     "note": f"of {len(_week_pii)} sent; database, WAL and tag file grepped"},
]
for source, r in SOURCES.iterrows():
    _res.append({"quantity": f"tag precision: {source}", "value": round(float(r["precision"]), 3), "unit": "fraction",
                 "note": f"{r['rows tagged']} rows; wrong rows found {r['wrong rows found']}"})
_res.append({"quantity": "SFT examples (retrain)", "value": len(TRAIN_EXAMPLES), "unit": "examples",
             "note": f"day {RETRAIN_DAY}; + {len(REPLAY)} replay; {CFG['sft_steps']} steps x {CFG['sft_batch']}"})
for name, res in EVAL.items():
    for k in ("slice", "gold"):
        lo, hi = reasoning.wilson(int(res[k].sum()), len(res[k]))
        _res.append({"quantity": f"accuracy on {k}: {name}", "value": round(float(res[k].mean()), 3),
                     "unit": "fraction", "note": f"{len(res[k])} rows, 95% [{lo:.3f}, {hi:.3f}]"})
for (name, k), (d, lo, hi) in DIFF.items():
    _res.append({"quantity": f"{name} - base on {k}", "value": round(d, 3), "unit": "accuracy",
                 "note": f"paired bootstrap 95% [{lo:+.3f}, {hi:+.3f}]"})
_res.append({"quantity": "SFT time per step", "value": round(RUNS["tags + replay"]["seconds"] / CFG["sft_steps"], 2),
             "unit": "s", "note": f"LoRA r={CFG['lora_r']}, batch {CFG['sft_batch']}, 2-core CPU"})
display(report.record_results("11_feedback_loop", BUDGET, _res))
conn.close()
assert not RAW_IN_STORE, RAW_IN_STORE

# %% [markdown] id="md-takeaways"
# ## What to take away
#
# - **Redact before the write, and test the bytes.** A log row is on disk (and in the WAL, and in the
#   next backup) the moment it is written; the test that means something greps the files. Redaction
#   is a recall problem first: read the "missed" lines above — a name that is not on the deny-list,
#   a phone number in a range no country has assigned — and decide which your policy can accept.
#   The hard negatives measure the other side: a redactor that eats order numbers makes the log
#   useless for support.
# - **Validate, do not pattern-match.** Luhn turns "16 digits" into "a card number" with a one-in-ten
#   false-positive rate; the length and the brand ranges narrow it further. The same idea — a
#   checksum, a country's assigned ranges — is what makes Presidio's phone recogniser precise and
#   also why it misses fictional numbers.
# - **Budget by day, uniformly.** A reservoir per day keeps cost flat under a spike and keeps every
#   day represented; the chi-square and KS tests are how you know the sample is what you think it is.
# - **Signals are not labels.** Thumbs-down is precise but sparse, drift flags what is *new*, not
#   what is *wrong*, and only the random audit estimates the error rate. A person's correction is the
#   label; conflicting corrections and duplicates are dropped, and anything in the evaluation sets
#   (normalised) never reaches training.
# - **Retrain on a rule, measure against a control.** The trigger says when and why, in an event.
#   The retrain is judged on a held-out slice and on the gold set, with intervals, next to a run on
#   replay only — read the paired differences, not the two accuracies.
# - **Honest caveats.** A simulated week: the users, their thumbs and the reviewer are random
#   processes with rates we chose; the contrast slice comes from a small set of templates, so the
#   held-out slice differs from the training examples in items and adjectives, not in kind of
#   sentence. One seed per training run.
