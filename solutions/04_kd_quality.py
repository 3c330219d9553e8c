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
# # Lesson 4 — Knowledge distillation III: did it work?
#
# Lesson 2 ran the teacher (SmolLM2-135M-Instruct) once and captured its soft predictions; lesson 3
# trained small students that share its tokenizer three ways, several seeds each: on a few hand
# labels, with the teacher's soft targets on the whole capture (KD), and on every label (the control).
# Every distillation project ends on the same question:
#
# > *Is the student good enough to ship instead of the teacher — and how sure are we?*
#
# "The KD student scored 0.79" is not an answer. An answer says **how much of the teacher's quality
# the student keeps**, **how precisely the eval measured that**, and **what we get in return**
# (size, speed), and then applies a decision rule that was written down *before* looking at the
# numbers.
#
# **You will build**
#
# 1. `quality_retained(student_score, teacher_score)`: the headline ratio, with the edge cases that
#    make it lie;
# 2. `paired_bootstrap_ci(student_correct, teacher_correct, ...)`: a confidence interval for that
#    ratio, resampling gold examples *paired* across the two models;
# 3. `ship_decision(candidate, policy)`: ship or not, with a reason for every failed criterion.
#
# **You will measure**, on the real teacher and lesson 3's students, on **one** gold set (and on
# reviews with phrasings no student saw): accuracy with Wilson intervals per run, the constant-predictor
# check, parameters, decode tokens/s, quality retained with its 95 % interval, whether KD beats a few
# labels (a paired interval over gold reviews, seeds averaged), a size/speed-vs-quality frontier plot,
# and the ship decision under two example policies.

# %% id="parameters" tags=["parameters"]
import os
BUDGET = os.environ.get("BREWSLM_BUDGET", "full")

# %% id="setup" nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
import math
import time
import warnings

warnings.filterwarnings("ignore")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scipy.stats
import torch

from brewslm_helpers import budget, data, evaluation, models, plots, report, students, timing

torch.manual_seed(0)
CFG = budget.pick(
    BUDGET,
    ci={"gold_rows": 24, "novel_rows": 24, "new_tokens": 8, "timing_reps": 1, "n_boot": 1000},
    full={"gold_rows": 120, "novel_rows": 80, "new_tokens": 48, "timing_reps": 3, "n_boot": 2000},
)
print(f"budget {BUDGET!r}: {CFG}")


# %% [markdown] id="md-retained"
# ## 1. Quality retained: one number for "how much did we keep?"
#
# The distillation literature reports students as a fraction of their teacher: DistilBERT "retains
# 97 % of BERT's language understanding while being 40 % smaller and 60 % faster". The number is
#
# $$\text{quality retained} = \frac{\text{student score}}{\text{teacher score}}$$
#
# with both scores measured **on the same eval, by the same scorer**. That last clause does all the
# work: a student scored on an easier set, or with a more forgiving answer parser, "retains" whatever
# you like. Here both come from `evaluation.score_sentiment` (choice log-likelihood, no sampling) on
# the same gold rows.
#
# Why a ratio rather than a difference? It reads the same across tasks of different difficulty
# ("keeps 95 %") and it composes with the other ratios of the trade (params ratio, speedup).
#
# **The edge cases are where the ratio lies**, so the function must refuse them loudly:
#
# * `teacher_score == 0`: the ratio is undefined. Nothing can be "retained" from nothing.
# * `NaN`: an eval that crashed or divided 0 by 0 upstream. It must not turn into a number
#   silently, and beware: *every* comparison with NaN is `False`, so `if score < 0 or score > 1:
#   raise` happily lets a NaN through. Test for it explicitly (`math.isnan`).
# * a score outside `[0, 1]`: almost always a unit bug (a percentage, 92 instead of 0.92, or a loss
#   passed where an accuracy was expected).
# * a ratio **above 1 is legal**: a student can beat its teacher on a given eval (the hard labels
#   correct some of the teacher's mistakes; or, on a small gold set, luck). Do not clip it to 1:
#   that hides exactly the information the next section quantifies.
#
# *Honest caveat.* For a two-way classification, chance is 0.5, so a student that knows nothing
# still "retains" 0.5 / 0.92 = 54 % of the teacher. The ratio is only meaningful when the teacher is
# well above chance, and it is worth also reading the *skill above chance*,
# (student − 0.5) / (teacher − 0.5), which we print in the measurements.

# %% id="ex-quality-retained" nbgrader={"grade": false, "grade_id": "ex_quality_retained", "locked": false, "schema_version": 3, "solution": true, "task": false}
def quality_retained(student_score: float, teacher_score: float) -> float:
    """Fraction of the teacher's quality the student keeps: student_score / teacher_score.

    student_score, teacher_score: scores in [0, 1] (e.g. accuracies) measured on the SAME eval;
        plain floats or numpy scalars.
    Returns a Python float; it may exceed 1 (the student beat the teacher on this eval).
    Raises ValueError, with a message naming the offending argument ("student_score" or
    "teacher_score") and not the other one, if either score is NaN or outside [0, 1], or if
    teacher_score is 0.
    """
    ### BEGIN SOLUTION
    for name, value in (("student_score", student_score), ("teacher_score", teacher_score)):
        value = float(value)
        if math.isnan(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a score in [0, 1], got {value!r}")
    if float(teacher_score) <= 0.0:
        raise ValueError("teacher_score is 0: quality retained is undefined for a teacher that "
                         "gets nothing right")
    return float(student_score) / float(teacher_score)
    ### END SOLUTION


# %% id="test-quality-retained" nbgrader={"grade": true, "grade_id": "test_quality_retained", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
def _raises_value_error(fn, *args):
    try:
        fn(*args)
    except ValueError as err:
        return str(err)
    raise AssertionError(f"{fn.__name__}{args} should raise ValueError")


assert math.isclose(quality_retained(0.6, 0.8), 0.75, rel_tol=1e-12)
assert math.isclose(quality_retained(0.9, 0.8), 1.125, rel_tol=1e-12), "a ratio above 1 is legal: do not clip"
assert quality_retained(0.0, 0.5) == 0.0
out = quality_retained(np.float64(0.46), np.float64(0.92))
assert type(out) is float and math.isclose(out, 0.5, rel_tol=1e-12)


def _names_only(msg, name):
    """The message names `name` and not the other argument."""
    other = {"student_score": "teacher_score", "teacher_score": "student_score"}[name]
    return name in msg and other not in msg


# the message names the one offending argument, and only that one
msg = _raises_value_error(quality_retained, 0.5, 0.0)
assert _names_only(msg, "teacher_score"), f"name teacher_score, and not student_score, in the message: {msg!r}"
msg = _raises_value_error(quality_retained, 0.5, float("nan"))
assert _names_only(msg, "teacher_score"), f"name teacher_score, and not student_score, in the message: {msg!r}"
msg = _raises_value_error(quality_retained, 1.5, 0.9)
assert _names_only(msg, "student_score"), f"name student_score, and not teacher_score, in the message: {msg!r}"
print("visible tests passed")

### BEGIN HIDDEN TESTS
assert quality_retained(1.0, 1.0) == 1.0
assert math.isclose(quality_retained(0.45, 0.9), 0.5, rel_tol=1e-12)
assert math.isclose(quality_retained(1.0, 0.5), 2.0, rel_tol=1e-12)
assert _names_only(_raises_value_error(quality_retained, float("nan"), 0.9), "student_score")
assert _names_only(_raises_value_error(quality_retained, np.float64("nan"), 0.9), "student_score")
assert _names_only(_raises_value_error(quality_retained, 1.2, 0.9), "student_score")
assert _names_only(_raises_value_error(quality_retained, -0.1, 0.9), "student_score")
assert _names_only(_raises_value_error(quality_retained, 0.5, 92.0), "teacher_score")
assert _names_only(_raises_value_error(quality_retained, 0.5, -0.3), "teacher_score")
assert _names_only(_raises_value_error(quality_retained, 0.0, 0.0), "teacher_score")   # a student score of 0 is fine
_ = _raises_value_error(quality_retained, float("nan"), float("nan"))
### END HIDDEN TESTS

# %% [markdown] id="md-bootstrap"
# ## 2. How sure are we? A paired bootstrap interval
#
# The gold set has 120 reviews (24 at `ci` budget). One review flipping from wrong to right moves an
# accuracy by 0.8 points (4 points at `ci`), so a ratio like 0.86 could easily have been 0.82 or 0.90
# on another 120 reviews from the same distribution. Before any decision rests on it, put an interval
# around it.
#
# **The bootstrap** (Efron, 1979) treats the gold set as a stand-in for the population: draw $n$
# examples *with replacement* from the $n$ we have, recompute the statistic, repeat $B$ times. The
# spread of the $B$ replicates estimates the sampling spread of the statistic; the **percentile
# interval** takes their $\alpha/2$ and $1-\alpha/2$ quantiles, $\alpha = 1 - \text{confidence}$.
#
# **Why paired.** Both models answered the *same* reviews, and reviews differ in difficulty: on an
# easy one both are right, on a sarcastic one both may be wrong. Their per-example correctness is
# correlated, and that correlation makes the *ratio* far more stable than either accuracy alone. A
# resample must therefore keep each example's pair of outcomes together: **one set of indices per
# replicate, used for both models**:
#
# $$ i^{(b)}_1, \dots, i^{(b)}_n \sim \mathcal{U}\{0, \dots, n-1\}, \qquad
#    r^{(b)} = \frac{\tfrac1n \sum_j s_{i^{(b)}_j}}{\tfrac1n \sum_j t_{i^{(b)}_j}}, \qquad b = 1..B $$
#
# Resampling the two vectors *independently* answers a different question (two models evaluated on
# two different random test sets) and gives a much wider interval; we measure how much wider below.
# A quick sanity check of pairing: a model compared with itself gives a ratio of exactly 1 in every
# paired resample, so its interval is exactly (1, 1, 1).
#
# **Details that matter**
#
# * The point estimate is the statistic on the **original** data, mean(s) / mean(t), not the mean
#   of the bootstrap replicates.
# * Draw all indices in one call, `rng.integers(0, n, size=(n_boot, n))` with
#   `rng = np.random.default_rng(seed)`: fancy indexing `s[idx]` is then `[n_boot, n]`, and the
#   whole thing is vectorised and reproducible per seed.
# * The interval is the replicates' own quantiles, not the normal approximation (point ± 1.96 sd of
#   the replicates) and not the "basic" bootstrap interval (2·point − upper quantile, 2·point − lower
#   quantile). When the ratio's replicates are skewed (a weak teacher on a small gold set: a few
#   resamples where the teacher got few right give large ratios), the three differ by a lot.
# * The reference implementation is `scipy.stats.bootstrap(..., paired=True, method="percentile")`;
#   the tests compare with it (its random draws differ, so within a Monte-Carlo tolerance).
#
# **Honest caveats.** The percentile interval is approximate for small $n$ and skewed statistics
# (scipy's default, BCa, corrects for bias and skew). It covers only the *sampling of gold
# examples*: train the student again with another seed and the number moves too, often by more than
# this interval, and no amount of resampling the gold set can tell you that. And a resample in which
# the teacher gets nothing right makes the ratio undefined (impossible in practice with a teacher at
# ~0.9; we only require that the teacher gets at least one example right).

# %% id="ex-bootstrap" nbgrader={"grade": false, "grade_id": "ex_paired_bootstrap_ci", "locked": false, "schema_version": 3, "solution": true, "task": false}
def paired_bootstrap_ci(student_correct, teacher_correct, n_boot: int = 2000,
                        confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Percentile bootstrap interval for mean(student_correct) / mean(teacher_correct).

    student_correct, teacher_correct: 1-D arrays of the same length n; entry i says whether each
        model got gold example i right (bool or 0/1; or a fraction, a model's correctness on example i
        averaged over training seeds); same examples, same order.
    n_boot: number of resamples B. confidence: e.g. 0.95 for a 95 % interval.
    seed: for np.random.default_rng(seed); the same seed gives the same interval.

    Each resample draws n example indices with replacement (one [n] row of
    rng.integers(0, n, size=(n_boot, n))) and uses THE SAME indices for both models (paired).
    Returns (point, low, high) as Python floats: point = mean(student) / mean(teacher) on the
    original data; low, high = the (1 - confidence) / 2 and 1 - (1 - confidence) / 2 quantiles
    (np.quantile, default linear interpolation) of the B resampled ratios.
    Raises ValueError if the arrays are empty, not 1-D or of different lengths, or if the teacher
    got no example right.
    """
    ### BEGIN SOLUTION
    s = np.asarray(student_correct, dtype=float)
    t = np.asarray(teacher_correct, dtype=float)
    if s.ndim != 1 or s.shape != t.shape or s.size == 0:
        raise ValueError(f"need two non-empty 1-D arrays of the same length, got shapes "
                         f"{s.shape} and {t.shape}")
    if t.sum() <= 0:
        raise ValueError("the teacher got no example right: the ratio is undefined")
    n = s.size
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))  # one row of example indices per resample
    s_idx, t_idx = idx, idx  # paired: both models are resampled on the same examples
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = s[s_idx].mean(axis=1) / t[t_idx].mean(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    point = s.mean() / t.mean()
    return float(point), float(low), float(high)
    ### END SOLUTION


# %% id="test-bootstrap" nbgrader={"grade": true, "grade_id": "test_paired_bootstrap_ci", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
_rng = np.random.default_rng(1)
_teacher = _rng.random(200) < 0.9                      # a strong teacher
_student = _teacher & (_rng.random(200) < 0.85)          # mostly right where the teacher is right
_student |= ~_teacher & (_rng.random(200) < 0.3)         # ... and sometimes where it is not

# a model against itself: every paired resample gives exactly 1
assert paired_bootstrap_ci(_teacher, _teacher, n_boot=500) == (1.0, 1.0, 1.0)

point, low, high = paired_bootstrap_ci(_student, _teacher, n_boot=1000, seed=0)
assert all(type(v) is float for v in (point, low, high))
assert math.isclose(point, _student.mean() / _teacher.mean(), rel_tol=1e-12), "point = ratio on the original data"
assert low <= point <= high and high - low > 0.02
assert paired_bootstrap_ci(_student, _teacher, n_boot=1000, seed=0) == (point, low, high), "deterministic per seed"
assert paired_bootstrap_ci(_student, _teacher, n_boot=1000, seed=1) != (point, low, high)

# four times the data: the interval narrows (roughly by half)
_, low4, high4 = paired_bootstrap_ci(np.tile(_student, 4), np.tile(_teacher, 4), n_boot=1000, seed=0)
assert high4 - low4 < 0.7 * (high - low)
print(f"ratio {point:.3f}, 95% CI [{low:.3f}, {high:.3f}]; with 4x the data [{low4:.3f}, {high4:.3f}]")


def _scipy_ci(s, t, confidence, n_resamples=4000):
    res = scipy.stats.bootstrap(
        (np.asarray(s, float), np.asarray(t, float)),
        lambda a, b, axis=-1: a.mean(axis=axis) / b.mean(axis=axis),
        paired=True, vectorized=True, method="percentile", n_resamples=n_resamples,
        confidence_level=confidence, random_state=0)
    return res.confidence_interval.low, res.confidence_interval.high


# a skewed case: a weak teacher (12 of 40 right), the student right on 5 of those and 6 others. The
# replicates reach far above the ratio 11/12: the percentile interval is [0.46, 1.75], where
# point +- 1.96 sd would give about [0.25, 1.58] and the basic interval about [0.06, 1.37]
_tw = np.arange(40) < 12
_sw = (np.arange(40) < 5) | ((np.arange(40) >= 12) & (np.arange(40) < 18))
ref_low, ref_high = _scipy_ci(_sw, _tw, 0.95, n_resamples=20000)
_, low, high = paired_bootstrap_ci(_sw, _tw, n_boot=20000, confidence=0.95, seed=0)
assert abs(low - ref_low) < 0.03 and abs(high - ref_high) < 0.1, (
    f"skewed replicates: got [{low:.3f}, {high:.3f}], the percentile interval is about [{ref_low:.3f}, {ref_high:.3f}] "
    "(tolerance 0.03 / 0.1): take the replicates' quantiles, not point +- z sd or 2 * point - quantiles")
print("visible tests passed")

### BEGIN HIDDEN TESTS
# against scipy's paired percentile bootstrap (different random draws: Monte-Carlo tolerance)
for conf in (0.95, 0.8, 0.5):
    ref_low, ref_high = _scipy_ci(_student, _teacher, conf)
    _, low, high = paired_bootstrap_ci(_student, _teacher, n_boot=4000, confidence=conf, seed=0)
    assert abs(low - ref_low) < 0.006 and abs(high - ref_high) < 0.006, (conf, low, high, ref_low, ref_high)
    assert low < high, conf

# a small gold set (40 rows): the point is still the plain ratio, the interval is wider
_t40, _s40 = _teacher[:40], _student[:40]
p40, low, high = paired_bootstrap_ci(_s40, _t40, n_boot=2000, confidence=0.9, seed=3)
assert math.isclose(p40, _s40.mean() / _t40.mean(), rel_tol=1e-12)
assert low <= p40 <= high

# 0/1 integer lists work like bools; a student better than its teacher gives a ratio > 1
_pt, _ps = [1, 0, 1, 1, 0, 1, 0, 1], [1, 1, 1, 1, 0, 1, 1, 1]
p, low, high = paired_bootstrap_ci(_ps, _pt, n_boot=300, seed=0)
assert math.isclose(p, 7 / 5) and low <= p <= high
assert paired_bootstrap_ci(_ps, _ps, n_boot=300, seed=5) == (1.0, 1.0, 1.0)
# per-example correctness averaged over seeds (fractions, as section 5 passes) is not rounded to bool
_fs, _ft = np.array([1, 2 / 3, 1 / 3, 0, 1, 1 / 3]), np.array([1, 1, 1, 0, 1, 1.0])
p, low, high = paired_bootstrap_ci(_fs, _ft, n_boot=500, seed=0)
assert math.isclose(p, _fs.mean() / _ft.mean()) and low <= p <= high, (p, low, high)

for bad in (([], []), ([1, 0], [1, 0, 1]), ([1, 1], [0, 0]), (np.ones((3, 2)), np.ones((3, 2)))):
    try:
        paired_bootstrap_ci(*bad, n_boot=10)
    except ValueError:
        pass
    else:
        raise AssertionError(f"paired_bootstrap_ci{bad} should raise ValueError")
### END HIDDEN TESTS

# %% [markdown] id="md-ship"
# ## 3. Ship or not: a decision from a written policy
#
# A ship decision is only honest if its rule was fixed *before* the numbers came in; otherwise the
# threshold quietly moves to wherever the student landed. So the rule is data, a **policy**, and the
# decision is a function of (candidate, policy):
#
# | criterion | policy key | passes when |
# |---|---|---|
# | quality | `min_retained` | the **lower bound** of the quality-retained interval ≥ `min_retained` |
# | size | `max_params_ratio` | student params / teacher params ≤ `max_params_ratio` |
# | speed | `min_speedup` | student decode tokens/s / teacher decode tokens/s ≥ `min_speedup` |
#
# **Why the lower bound, not the point estimate.** A student whose true retained quality sits exactly
# at the threshold passes a point-estimate rule about half the time, on noise alone. Applying the
# threshold to the interval's lower bound puts the burden of proof on the student: ship only if the
# eval shows, with the stated confidence, that it keeps at least `min_retained`. The flip side is the
# honest caveat: with a small gold set the interval is wide and *nothing* ships. That is the eval
# telling you it is too small to decide, not a verdict on the student; the fix is more gold
# examples, not a lower bar.
#
# **Reasons.** "No" is not actionable. Return one reason per failed criterion (all of them, not just
# the first), each starting with the policy key, so a dashboard can group them and an engineer knows
# whether to train longer (quality), cut more (size) or fix the serving stack (speed).

# %% id="ex-ship" nbgrader={"grade": false, "grade_id": "ex_ship_decision", "locked": false, "schema_version": 3, "solution": true, "task": false}
def ship_decision(candidate: dict, policy: dict) -> tuple[bool, list[str]]:
    """Decide whether to ship a distilled student, and say why not.

    candidate: {"retained": point estimate of quality retained,
                "retained_low": lower bound of its confidence interval,
                "params_ratio": student params / teacher params,
                "speedup": student decode tokens/s / teacher decode tokens/s}  (floats; other keys ignored)
    policy: {"min_retained": float, "max_params_ratio": float, "min_speedup": float}

    Criteria (a value equal to its threshold passes): retained_low >= min_retained,
    params_ratio <= max_params_ratio, speedup >= min_speedup.
    Returns (ship, reasons): ship is a bool, True iff every criterion passes; reasons is a list
    with one string per FAILED criterion, in the order above, each starting with the policy key
    and a colon, e.g. "min_speedup: speedup 1.40x < 2.00x". Empty when ship is True.
    """
    ### BEGIN SOLUTION
    reasons = []
    low = candidate["retained_low"]
    if low < policy["min_retained"]:
        reasons.append(f"min_retained: quality retained is only >= {low:.3f} (CI lower bound), "
                       f"policy needs {policy['min_retained']:.3f}")
    if candidate["params_ratio"] > policy["max_params_ratio"]:
        reasons.append(f"max_params_ratio: params ratio {candidate['params_ratio']:.3f} > "
                       f"{policy['max_params_ratio']:.3f}")
    if candidate["speedup"] < policy["min_speedup"]:
        reasons.append(f"min_speedup: speedup {candidate['speedup']:.2f}x < "
                       f"{policy['min_speedup']:.2f}x")
    return len(reasons) == 0, reasons
    ### END SOLUTION


# %% id="test-ship" nbgrader={"grade": true, "grade_id": "test_ship_decision", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
_policy = {"min_retained": 0.90, "max_params_ratio": 0.30, "min_speedup": 2.0}
_good = {"retained": 0.97, "retained_low": 0.93, "params_ratio": 0.24, "speedup": 3.1}


def _keys(reasons):
    assert all(isinstance(r, str) and ":" in r for r in reasons), reasons
    return [r.split(":")[0].strip() for r in reasons]


ok, reasons = ship_decision(_good, _policy)
assert ok is True and reasons == []

# the point estimate clears the bar, the interval's lower bound does not: do not ship
ok, reasons = ship_decision(dict(_good, retained=0.95, retained_low=0.85), _policy)
assert ok is False and _keys(reasons) == ["min_retained"], reasons

# every failed criterion is named, in order
ok, reasons = ship_decision({"retained": 0.7, "retained_low": 0.6, "params_ratio": 0.5, "speedup": 1.2}, _policy)
assert ok is False and _keys(reasons) == ["min_retained", "max_params_ratio", "min_speedup"], reasons
print("visible tests passed")

### BEGIN HIDDEN TESTS
# thresholds themselves pass
ok, reasons = ship_decision({"retained": 0.95, "retained_low": 0.90, "params_ratio": 0.30, "speedup": 2.0}, _policy)
assert ok is True and reasons == [], reasons
# each criterion alone
ok, reasons = ship_decision(dict(_good, params_ratio=0.31), _policy)
assert ok is False and _keys(reasons) == ["max_params_ratio"]
ok, reasons = ship_decision(dict(_good, speedup=1.99), _policy)
assert ok is False and _keys(reasons) == ["min_speedup"]
ok, reasons = ship_decision(dict(_good, retained_low=0.8999), _policy)
assert ok is False and _keys(reasons) == ["min_retained"]
# quality and size fail, speed passes
ok, reasons = ship_decision(dict(_good, retained_low=0.5, params_ratio=0.9), _policy)
assert _keys(reasons) == ["min_retained", "max_params_ratio"], reasons
# a point estimate below the bar with a (nonsensically) high lower bound still ships: only the bound counts
ok, reasons = ship_decision(dict(_good, retained=0.5, retained_low=0.95, name="x"), _policy)
assert ok is True and reasons == []
# a lenient policy
ok, reasons = ship_decision({"retained": 0.8, "retained_low": 0.7, "params_ratio": 0.24, "speedup": 3.0},
                            {"min_retained": 0.7, "max_params_ratio": 1.0, "min_speedup": 1.0})
assert ok is True and reasons == []
### END HIDDEN TESTS

# %% [markdown] id="md-measure"
# ## 4. Measure: the teacher and lesson 3's students, on one gold set
#
# Now the real thing. Everything below is computed in this run, on the same gold rows (all 120 at
# `full` budget, the first 24 at `ci`) and the same 80 **novel** reviews (phrasings that occur in no
# training text; 24 at `ci`), with the same scorer: the log-likelihood of "This review is positive" vs
# "... negative" as the assistant's reply (`evaluation.score_sentiment`), so no answer parsing can
# favour one model.
#
# First the teacher. **Read its score before anything else**: quality retained is only meaningful if
# the teacher is good at the task. A teacher at chance (0.5) would make any student "retain ~100 %".

# %% id="teacher"
teacher, tok = models.load_teacher()
gold = data.load_reviews("gold", CFG["gold_rows"])
novel = data.load_reviews("novel", CFG["novel_rows"])
t0 = time.perf_counter()
teacher_eval = evaluation.score_sentiment(teacher, tok, gold, progress=True)
teacher_novel = evaluation.score_sentiment(teacher, tok, novel)
teacher_acc = teacher_eval["accuracy"]
print("=" * 64)
print(f"  TEACHER (SmolLM2-135M-Instruct) gold accuracy: {teacher_acc:.3f}"
      f"  ({int(teacher_eval['correct'].sum())}/{len(gold)} rows, {time.perf_counter() - t0:.1f} s)")
print(f"  novel phrasings: {teacher_novel['accuracy']:.3f} ({len(novel)} rows)")
print("=" * 64)
if teacher_acc < 0.7:
    print("WARNING: the teacher is close to chance (0.5) here; quality retained means little.")

# %% [markdown] id="md-students"
# Next the students. Lesson 3 trained three arms from the same layer-cut copy of the teacher
# (embeddings + decoder layer 0 + final norm), with the same steps and batches, several seeds each:
# **CE, few labels** (cross-entropy on 32 hand-labelled texts), **KD on the capture** (lesson 3's
# top-*k* loss on all the capture's texts, the KL alone where nobody labelled) and **CE, all labels**
# (the control), and saved them in `artifact_dir(BUDGET)/students`. If they are not there (a fresh
# clone, or lesson 3 not run at this budget), `students.load_or_train_students` trains the same arms,
# seeds and sizes without lesson 3's graded code. The one difference: its KL term is TRL's
# `GKDTrainer.generalized_jsd_loss(beta=0)` on the captured top-*k* instead of your `topk_kd_loss`
# (the same loss, tested equal in `tests/test_students.py`). The cell says which path it took and
# shows the training record of every run.

# %% id="students"
trained = students.load_or_train_students(BUDGET, teacher=teacher, tokenizer=tok)
print("students:", trained.describe())
meta_keys = ["arm", "seed", "labels", "steps", "batch_size", "lr", "alpha", "T", "k", "positions",
             "final_train_loss", "trained_by"]
meta_table = pd.DataFrame.from_dict(
    {name: {k: trained.meta[name].get(k, "") for k in meta_keys} for name in trained.meta}, orient="index")
with pd.option_context("display.max_colwidth", 60):
    display(meta_table)
ARMS = [arm for arm in students.ARMS if trained.runs(arm)]
TITLE = {arm: students.ARM_TITLES[arm] for arm in ARMS}

# %% [markdown] id="md-score"
# **Every run, scored.** For each run: gold accuracy with its **Wilson** 95 % interval (the binomial
# interval that stays sensible at 0 % and 100 %, where the plain $\hat p \pm 1.96\sqrt{\hat p(1-\hat p)/n}$
# collapses to a point; `scipy.stats.binomtest(...).proportion_ci(method="wilson")`), the share of
# "positive" answers (the constant-predictor check: a run outside 0.2 .. 0.8 is flagged) and the
# accuracy on novel phrasings. Per arm, the per-example correctness **averaged over seeds** is what
# the intervals of section 5 resample: it keeps the pairing (the same gold review for every model)
# and it carries the seed-to-seed spread into the estimate.

# %% id="score-students"
def wilson(correct) -> tuple[float, float]:
    ci = scipy.stats.binomtest(int(np.sum(correct)), len(correct)).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)


evals, runs_table = {}, []
for arm in ARMS:
    for name in trained.runs(arm):
        g = evaluation.score_sentiment(trained.models[name], tok, gold)
        n = evaluation.score_sentiment(trained.models[name], tok, novel)
        evals[name] = {"gold": g, "novel": n}
        share = float((g["p_positive"] > 0.5).mean())
        low, high = wilson(g["correct"])
        runs_table.append({"run": name, "arm": TITLE[arm], "gold accuracy": g["accuracy"], "Wilson low": low,
                           "Wilson high": high, "novel accuracy": n["accuracy"], "share positive": share,
                           "flag": "COLLAPSED?" if not 0.2 <= share <= 0.8 else ""})
runs_table = pd.DataFrame(runs_table).set_index("run")
display(runs_table.style.format({c: "{:.3f}" for c in runs_table.columns if c not in ("arm", "flag")}))
COLLAPSED = list(runs_table.index[runs_table["flag"] != ""])
print("collapsed runs: " + (", ".join(COLLAPSED) if COLLAPSED else "none"))

# per arm: the per-example correctness averaged over its seeds, and the mean accuracy
CORRECT = {arm: np.mean([evals[n]["gold"]["correct"] for n in trained.runs(arm)], axis=0) for arm in ARMS}
NOVEL_CORRECT = {arm: np.mean([evals[n]["novel"]["correct"] for n in trained.runs(arm)], axis=0) for arm in ARMS}
acc = {arm: float(CORRECT[arm].mean()) for arm in ARMS}
first = {arm: trained.models[trained.runs(arm)[0]] for arm in ARMS}
params = {"teacher": teacher.num_parameters(), "student": first[ARMS[0]].num_parameters()}
for arm in ARMS:
    print(f"{TITLE[arm]:>18}: gold accuracy {acc[arm]:.3f} (mean of {len(trained.runs(arm))} seed(s)), "
          f"novel {float(NOVEL_CORRECT[arm].mean()):.3f}")
print(f"{'student':>18}: {params['student'] / 1e6:.2f} M parameters "
      f"({params['student'] / params['teacher']:.1%} of the teacher), the same for every arm")

# %% [markdown] id="md-speed"
# **Speed.** Every arm has the same architecture, so one student stands for all. The same prompt (the
# first gold review) and the same number of new tokens for both models, greedy, with the KV cache
# (`timing.timed_generate`). We report **decode** tokens/s: the tokens after the first, divided by the
# time between the first and the last, so the prompt's prefill does not blur the per-token cost. Each
# model gets a short warm-up generation first, and at `full` budget we take the median of three runs
# (the machine is shared; single timings are noisy).
#
# What to expect is less obvious than the parameter ratio suggests. Per token, the student does
# about a quarter of the teacher's multiply-adds, and most of those are the teacher's full
# 49,152 × 576 output projection (28 M of its 32 M parameters), which it kept. At batch size 1 on a
# CPU, though, each of the teacher's 30 layers also costs a fixed overhead (a dozen small kernel
# calls), which the 1-layer student mostly avoids, while `generate`'s own per-step bookkeeping does
# not shrink at all. The speedup can land above or below the 4.2× of the parameter ratio: measure,
# don't assume.

# %% id="timing"
prompt_ids = tok(evaluation.sentiment_prompt(tok, gold[0]["text"]), return_tensors="pt",
                 add_special_tokens=False)["input_ids"]


def decode_tokens_per_s(model, new_tokens: int, reps: int) -> float:
    """Median decode tokens/s of greedy generation of exactly ``new_tokens`` tokens."""
    timing.timed_generate(model, prompt_ids, 2)  # warm-up
    rates = []
    for _ in range(reps):
        _, _, times = timing.timed_generate(model, prompt_ids, new_tokens)
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    return float(np.median(rates))


speed = {"teacher": decode_tokens_per_s(teacher, CFG["new_tokens"], CFG["timing_reps"]),
         "student": decode_tokens_per_s(first[ARMS[0]], CFG["new_tokens"], CFG["timing_reps"])}
for name, s in speed.items():
    print(f"{name:>16}: {s:6.1f} decode tokens/s  (speedup {s / speed['teacher']:.2f}x)")


# %% [markdown] id="md-retained-measured"
# ## 5. How much is kept, and does KD beat the labels?
#
# **Quality retained, with its interval.** Your `quality_retained` and `paired_bootstrap_ci` on each
# arm's per-example correctness (averaged over seeds) against the teacher's. Alongside, the *skill
# above chance* (the caveat of section 1) and, as a check on what pairing buys, scipy's percentile
# interval with the two vectors resampled **independently** (`paired=False`): same data, same
# statistic, a different (wrong) question.
#
# **KD against a few labels.** The question lesson 3 set up: with only 32 labelled texts, does the
# capture add anything? The difference of gold accuracy, KD − CE(few labels), with a paired percentile
# bootstrap interval over gold reviews (`scipy.stats.bootstrap(..., paired=True)`), next to the same
# for KD − CE(all labels), the control. A difference whose interval includes 0 is not evidence either way.

# %% id="retained"
def _scipy_unpaired(s, t, n_boot):
    res = scipy.stats.bootstrap((s.astype(float), t.astype(float)),
                                lambda a, b, axis=-1: a.mean(axis=axis) / b.mean(axis=axis),
                                paired=False, vectorized=True, method="percentile",
                                n_resamples=n_boot, random_state=0)
    return res.confidence_interval.low, res.confidence_interval.high


retained = {}
t_correct = teacher_eval["correct"]
for arm in ARMS:
    ratio = quality_retained(acc[arm], teacher_acc)
    point, low, high = paired_bootstrap_ci(CORRECT[arm], t_correct, n_boot=CFG["n_boot"], seed=0)
    u_low, u_high = _scipy_unpaired(CORRECT[arm], t_correct, CFG["n_boot"])
    skill = (acc[arm] - 0.5) / (teacher_acc - 0.5)
    retained[arm] = {"retained": ratio, "low": low, "high": high, "skill": skill, "unpaired_width": u_high - u_low}
    print(f"{TITLE[arm]:>18}: quality retained {ratio:.3f}  95% CI [{low:.3f}, {high:.3f}] "
          f"(paired width {high - low:.3f}; unpaired {u_high - u_low:.3f});  skill above chance {skill:.2f}")


def paired_difference(a, b, n_boot):
    """mean(a) - mean(b) and its paired percentile bootstrap 95 % interval (scipy)."""
    res = scipy.stats.bootstrap((a.astype(float), b.astype(float)),
                                lambda x, y, axis=-1: x.mean(axis=axis) - y.mean(axis=axis),
                                paired=True, vectorized=True, method="percentile",
                                n_resamples=n_boot, random_state=0)
    return float(a.mean() - b.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


DIFFS = {}
for other in ("ce_few", "ce_all"):
    for split, correct in (("gold", CORRECT), ("novel", NOVEL_CORRECT)):
        if "kd" in correct and other in correct:
            DIFFS[(other, split)] = paired_difference(correct["kd"], correct[other], CFG["n_boot"])
for (other, split), (d, low, high) in DIFFS.items():
    verdict = "KD better" if low > 0 else "KD worse" if high < 0 else "no evidence either way"
    print(f"KD - {TITLE[other]:<16} on {split:<5}: {d:+.3f}  paired 95% CI [{low:+.3f}, {high:+.3f}]  -> {verdict}")
if "kd" in ARMS and "ce_few" in ARMS:
    per_seed = [evals[k]["gold"]["accuracy"] - evals[c]["gold"]["accuracy"]
                for k, c in zip(trained.runs("kd"), trained.runs("ce_few"))]
    print("KD - CE(few) per seed (same labelled texts): " + ", ".join(f"{d:+.3f}" for d in per_seed))

# %% [markdown] id="md-frontier"
# **The frontier.** Where each model sits in the size/speed-vs-quality plane: every run of every arm,
# with its Wilson 95 % interval (spread slightly sideways so they do not hide each other). A student is
# worth having only if it moves *left* (smaller) or *right* (faster) without dropping too far *down*.
# The dotted line is chance.

# %% id="frontier"
colors = {"teacher": "tab:blue", "ce_few": "tab:green", "kd": "tab:orange", "ce_all": "tab:purple"}
points = [("teacher", "teacher", teacher_eval["correct"], 0.0)]
for i, arm in enumerate(ARMS):
    for j, name in enumerate(trained.runs(arm)):
        points.append((arm, name, evals[name]["gold"]["correct"], (i - 1) * 0.06 + j * 0.015))
fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for ax, (xlabel, xs) in zip(axes, [("parameters (millions)", {k: v / 1e6 for k, v in params.items()}),
                                   ("decode tokens/s", speed)]):
    shown = set()
    for arm, _name, correct, dx in points:
        x = xs["teacher" if arm == "teacher" else "student"]
        a, (low, high) = float(np.mean(correct)), wilson(correct)
        ax.errorbar(x * (1 + dx), a, yerr=[[a - low], [high - a]], fmt="o", capsize=4, color=colors[arm],
                    label=None if arm in shown else ("teacher" if arm == "teacher" else TITLE[arm]), markersize=6)
        shown.add(arm)
    ax.axhline(0.5, ls=":", color="gray")
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
axes[0].set_ylabel(f"gold accuracy ({len(gold)} rows), Wilson 95%")
axes[0].set_title("size vs quality")
axes[1].set_title("speed vs quality")
axes[0].legend(loc="lower right", fontsize=8)
axes[0].set_ylim(0.3, 1.05)
fig.tight_layout()
display(fig)  # works under any matplotlib backend (papermill runs with Agg)
plt.close(fig)

# %% [markdown] id="md-ship-measured"
# **Ship decisions.** Two example policies, fixed here before we read the result cells above (in a
# real project: in the design doc, before training):
#
# * **edge device (strict)**: keep at least 95 % of the teacher's quality (CI lower bound), at most
#   30 % of its parameters, at least 2× faster decode;
# * **internal prototype (lenient)**: keep at least 80 %, at most half the parameters, 1.5× faster.

# %% id="ship"
POLICIES = {
    "edge device (strict)": {"min_retained": 0.95, "max_params_ratio": 0.30, "min_speedup": 2.0},
    "internal prototype (lenient)": {"min_retained": 0.80, "max_params_ratio": 0.50, "min_speedup": 1.5},
}
candidates = {arm: {"retained": retained[arm]["retained"], "retained_low": retained[arm]["low"],
                    "params_ratio": params["student"] / params["teacher"],
                    "speedup": speed["student"] / speed["teacher"]} for arm in ARMS}
decisions = []
for policy_name, policy in POLICIES.items():
    for arm, cand in candidates.items():
        ok, reasons = ship_decision(cand, policy)
        decisions.append({"policy": policy_name, "student": TITLE[arm], "ship": "SHIP" if ok else "no",
                          "reasons": "; ".join(reasons) or "all criteria pass"})
with pd.option_context("display.max_colwidth", 200):
    display(pd.DataFrame(decisions))

# %% id="retained-plot"
fig, ax = plots.new_axes("Quality retained (95% paired bootstrap CI, seeds averaged) vs policy bars",
                         "quality retained = student accuracy / teacher accuracy", "", figsize=(8, 3.2))
for row, arm in enumerate(ARMS):
    r = retained[arm]
    ax.errorbar(r["retained"], row, xerr=[[r["retained"] - r["low"]], [r["high"] - r["retained"]]],
                fmt="o", capsize=6, color=colors[arm], markersize=8)
for policy_name, policy in POLICIES.items():
    ax.axvline(policy["min_retained"], ls="--", color="black" if "strict" in policy_name else "gray")
    ax.annotate(f"min_retained ({policy_name.split(' (')[0]})", (policy["min_retained"], len(ARMS) - 0.5),
                rotation=0, ha="right", fontsize=8)
ax.axvline(0.5 / teacher_acc, ls=":", color="red")
ax.annotate("chance", (0.5 / teacher_acc, -0.4), ha="left", fontsize=8, color="red")
ax.set_yticks(range(len(ARMS)), [TITLE[a] for a in ARMS])
ax.set_ylim(-0.6, len(ARMS) - 0.3)
fig.tight_layout()
display(fig)
plt.close(fig)

# %% [markdown] id="md-honest"
# ## 6. Reading the result
#
# The summary cell below states what this run measured; read these points with it.
#
# * **A training failure is not a finding.** A run flagged `COLLAPSED?` above answers (almost) one
#   label for everything, and its accuracy says nothing about its loss. At `ci` budget every run is a
#   handful of steps and usually collapses: that budget only exercises the code. At `full`, lesson 3's
#   ablation shows that KD stopped early collapses too: always check before comparing.
# * **KD against labels is a comparison across seeds.** The intervals resample gold reviews with each
#   arm's correctness averaged over its seeds; the per-seed differences show how much "which 32 texts
#   got labelled" moves the result. One seed can mislead in either direction.
# * **Where KD helps, and where it cannot.** KD's soft labels exist for the texts the teacher read
#   (the capture). The novel reviews use phrasings no student saw, labelled or not: whatever the gold
#   comparison says, the novel one tells you whether the student learned the teacher's *sense* of
#   sentiment or only what the teacher said about the training texts. Compare both with the teacher.
# * **"Retains X %" is "X % on this eval".** Sentiment of templated reviews is a narrow,
#   keyword-driven task; the teacher's general abilities (chat, world knowledge, instructions) are not
#   measured here, and a one-layer student keeps none of them. Real distillation (DistilBERT, MiniLM,
#   Minitron) keeps a third to a half of the layers and trains for billions of tokens.
# * **The size is not the speed**, and **the policy, not the mood, decides**: the reasons list says
#   what to fix: more training or more layers (quality), a smaller head (speed), or a larger gold set
#   (a lower bound that is low only because the interval is wide).

# %% id="summary"
for arm in ARMS:
    r = retained[arm]
    print(f"{TITLE[arm]}: gold accuracy {acc[arm]:.3f} vs teacher {teacher_acc:.3f} -> retains "
          f"{r['retained']:.1%} (95% CI {r['low']:.1%} to {r['high']:.1%}), skill above chance "
          f"{r['skill']:.0%}, with {params['student'] / params['teacher']:.1%} of the parameters and "
          f"{speed['student'] / speed['teacher']:.2f}x the decode speed")
for (other, split), (d, low, high) in DIFFS.items():
    if low > 0:
        said = "KD is better, and the interval excludes 0"
    elif high < 0:
        said = "KD is worse, and the interval excludes 0"
    else:
        said = "the interval includes 0: no evidence of a difference"
    print(f"KD - {TITLE[other]} on {split}: {d:+.3f} [{low:+.3f}, {high:+.3f}]: {said}")
print(f"collapsed runs: {', '.join(COLLAPSED) if COLLAPSED else 'none'}")
print(f"students: {trained.source} ({trained.describe()})")

# %% [markdown] id="md-results"
# ## What we measured
#
# Every number below was computed in this run (and saved for `brewslm bench`).

# %% id="results"
rows = [
    {"quantity": "teacher gold accuracy", "value": round(teacher_acc, 4), "unit": "fraction",
     "note": f"SmolLM2-135M-Instruct, {len(gold)} gold rows"},
    {"quantity": "teacher novel accuracy", "value": round(teacher_novel["accuracy"], 4), "unit": "fraction",
     "note": f"{len(novel)} reviews with phrasings in no training text"},
    {"quantity": "students source", "value": trained.source, "unit": "", "note": trained.describe()},
    {"quantity": "student params ratio", "value": round(params["student"] / params["teacher"], 4), "unit": "ratio",
     "note": f"{params['student'] / 1e6:.2f} M of {params['teacher'] / 1e6:.2f} M"},
    {"quantity": "student decode speedup", "value": round(speed["student"] / speed["teacher"], 3), "unit": "x",
     "note": f"{speed['student']:.1f} vs {speed['teacher']:.1f} tokens/s, {CFG['new_tokens']} new tokens"},
    {"quantity": "collapsed runs", "value": len(COLLAPSED), "unit": "runs", "note": ", ".join(COLLAPSED)},
]
for arm in ARMS:
    r = retained[arm]
    each = ", ".join(f"{evals[n]['gold']['accuracy']:.3f}" for n in trained.runs(arm))
    rows += [
        {"quantity": f"{TITLE[arm]}: gold accuracy, mean of seeds", "value": round(acc[arm], 4),
         "unit": "fraction", "note": f"seeds: {each}"},
        {"quantity": f"{TITLE[arm]}: novel accuracy, mean of seeds", "value": round(float(NOVEL_CORRECT[arm].mean()), 4),
         "unit": "fraction"},
        {"quantity": f"{TITLE[arm]}: quality retained", "value": round(r["retained"], 4), "unit": "ratio",
         "note": f"95% paired bootstrap CI [{r['low']:.3f}, {r['high']:.3f}]"},
        {"quantity": f"{TITLE[arm]}: skill above chance", "value": round(r["skill"], 4), "unit": "ratio",
         "note": "(acc - 0.5) / (teacher acc - 0.5)"},
        {"quantity": f"{TITLE[arm]}: unpaired / paired CI width", "value":
         round(r["unpaired_width"] / max(r["high"] - r["low"], 1e-12), 2), "unit": "x",
         "note": "what independent resampling would have claimed"},
    ]
for (other, split), (d, low, high) in DIFFS.items():
    rows.append({"quantity": f"KD - {TITLE[other]}: {split} accuracy", "value": round(d, 4), "unit": "difference",
                 "note": f"paired bootstrap 95% CI [{low:+.3f}, {high:+.3f}]"})
for d in decisions:
    rows.append({"quantity": f"ship {d['student']} under {d['policy']}", "value": d["ship"], "unit": "",
                 "note": d["reasons"]})
with pd.option_context("display.max_colwidth", 120):
    display(report.record_results("04_kd_quality", BUDGET, rows))
