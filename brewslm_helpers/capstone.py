"""Plumbing for lesson 10, the capstone: the course's recorded numbers as named facts, the headline rows
of every lesson, scenario dicts, fake results for tests, the graduation figure and its HTML page.

Everything a lesson records goes through :func:`brewslm_helpers.report.record_results` into
``artifact_dir(budget)/results/<slug>.json``. The capstone reads those files; it never copies a
number into the notebook. Two tables here say *which* recorded row means what, and they are the
only place to edit when a lesson renames a row:

* :data:`FACTS`: fact name -> the lesson and row it is read from (a regular expression matched with
  ``re.fullmatch`` against the row's ``quantity``; the last matching row wins), with a documented
  default used when the lesson has not been run at this budget or no longer records the row;
* :data:`HEADLINES`: for each lesson, the rows that show what its technique bought (quality, size,
  speed), as ``before``/``after`` pairs.

Neither holds an exercise's answer: the decision rules and the graduation table are the student's.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .paths import artifact_dir

# Every lesson of the course but the capstone itself, in order (tests/test_capstone.py checks this
# against solutions/): the graduation report lists each one, run or not.
COURSE: dict[str, str] = {
    "01_toolkit": "the advanced toolkit (baseline)",
    "02_kd_capture": "distillation I: the teacher's capture",
    "03_kd_loss": "distillation II: the KD loss",
    "04_kd_quality": "distillation III: did it work?",
    "05_preference": "preference tuning (DPO, ORPO)",
    "06_quantization": "quantization (GGUF, ONNX, NF4)",
    "07_multitask_curriculum": "multi-task training and curriculum",
    "08_serving": "serving: KV cache, batching, engines",
    "09_observability": "observability and drift",
    "11_feedback_loop": "the production feedback loop",
    "12_tool_use": "tool-use fine-tuning",
    "13_pruning": "structured pruning",
    "14_speculative": "speculative decoding",
    "15_reasoning": "reasoning training (CoT, PRM/ORM, GRPO)",
}

NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def numbers(value) -> list[float]:
    """The numbers in a recorded value: ``[value]`` for a number (not a bool), every number written in
    a string (``"0.512 -> 0.700"`` -> ``[0.512, 0.7]``, ``"1.10 / 1.25"`` -> ``[1.1, 1.25]``), ``[]``
    for anything else (``"yes"``, ``None``, NaN)."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [] if math.isnan(float(value)) else [float(value)]
    if isinstance(value, str):
        return [float(m) for m in NUMBER.findall(value.replace(",", ""))]
    return []


# -- facts ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fact:
    """A number the decision guide compares with, read from the course's recorded results.

    ``rows``: ``(lesson slug, quantity pattern)`` pairs (``re.fullmatch``; the last matching row
    wins, so a lesson that records one row per size gives its largest). ``combine`` turns the rows'
    numbers into the fact (one row: the number itself). ``default`` is used when a row cannot be
    read, and ``default_source`` says where that default comes from."""

    means: str
    unit: str
    rows: tuple[tuple[str, str], ...]
    default: float
    default_source: str
    combine: Callable[..., float] | None = field(default=None, compare=False)


def _relative_increase(new: float, old: float) -> float:
    return new / old - 1.0


def _ratio(new: float, old: float) -> float:
    return new / old


_PLACEHOLDER = "a placeholder of the right order, not a measurement"
_DESIGN = "DESIGN.md's measurement on the reference 2-core machine"

FACTS: dict[str, Fact] = {
    "sft_labels": Fact(
        "labelled examples lesson 3's 'CE, all labels' arm trained on (the labels SFT had when it worked)",
        "examples", (("03_kd_loss", r"capture texts used"),), 600, "lesson 3's full-budget size (ARM_SIZES)"),
    "kd_gain_few_labels": Fact(
        "KD minus CE on the few labels, gold accuracy (lesson 4)", "accuracy",
        (("04_kd_quality", r"KD - CE, few labels: gold accuracy"),), 0.05, _PLACEHOLDER),
    "kd_retained": Fact(
        "quality the KD student retained of the teacher's (lesson 4)", "ratio",
        (("04_kd_quality", r"KD on the capture: quality retained"),), 0.9, _PLACEHOLDER),
    "student_params_ratio": Fact(
        "the distilled student's parameters / the teacher's (lesson 4)", "ratio",
        (("04_kd_quality", r"student params ratio"),), 0.25, "LESSONS.md: a student of <= 25 % of the teacher"),
    "min_preference_pairs": Fact(
        "preference pairs lesson 5 trained DPO and ORPO on", "pairs",
        (("05_preference", r"training pairs"),), 480, "the size of preference_train.jsonl (README)"),
    "dpo_reward_accuracy": Fact(
        "DPO's held-out reward accuracy (lesson 5; 0.5 is chance)", "fraction",
        (("05_preference", r"held-out reward accuracy, DPO"),), 0.7, _PLACEHOLDER),
    "q8_0_bits_per_weight": Fact(
        "bits per weight of the Q8_0 GGUF file (lesson 6)", "bits/weight",
        (("06_quantization", r"GGUF Q8_0: bits/weight"),), 8.5, "the Q8_0 format: 34 bytes per 32 weights"),
    "q4_k_m_bits_per_weight": Fact(
        "bits per weight of the Q4_K_M GGUF file (lesson 6; more than 4.5 on SmolLM2: the 576 fallback)",
        "bits/weight", (("06_quantization", r"GGUF Q4_K_M: bits/weight"),), 5.5, _PLACEHOLDER),
    "q8_0_ppl_increase": Fact(
        "relative perplexity increase of Q8_0 over PyTorch fp32 (lesson 6)", "fraction",
        (("06_quantization", r"GGUF Q8_0: perplexity"), ("06_quantization", r"PyTorch fp32: perplexity")),
        0.002, _PLACEHOLDER, _relative_increase),
    "q4_k_m_ppl_increase": Fact(
        "relative perplexity increase of Q4_K_M over PyTorch fp32 (lesson 6)", "fraction",
        (("06_quantization", r"GGUF Q4_K_M: perplexity"), ("06_quantization", r"PyTorch fp32: perplexity")),
        0.04, _PLACEHOLDER, _relative_increase),
    "engine_speedup": Fact(
        "llama.cpp on the shipped Q4_1 GGUF / PyTorch fp32, decode tokens/s (lesson 6)", "x",
        (("06_quantization", r"GGUF Q4_1 \(shipped\): decode speed"),
         ("06_quantization", r"PyTorch fp32: decode speed")),
        6.75, _DESIGN + " (108 vs 16 tokens/s)", _ratio),
    "kv_cache_speedup": Fact(
        "decode speed-up of the KV cache at the longest generation measured (lesson 8)", "x",
        (("08_serving", r"KV-cache speed-up, \d+ new tokens"),), 2.9, _DESIGN + " (16 vs 5.5 tokens/s)"),
    "batching_speedup": Fact(
        "continuous / static batching throughput on one request trace (lesson 8)", "x",
        (("08_serving", r"continuous / static throughput"),), 1.5, _PLACEHOLDER),
    "pruning_ppl_increase": Fact(
        "relative perplexity increase of the pruned and recovered model (lesson 13)", "fraction",
        (("13_pruning", r"recovered / unpruned perplexity"),), 0.3, _PLACEHOLDER,
        lambda ratio: ratio - 1.0),
    "break_even_alpha": Fact(
        "greedy acceptance rate above which the cut draft pays for itself (lesson 14)", "alpha",
        (("14_speculative", r"break-even greedy α at the cut draft's cost c"),), 0.75, _PLACEHOLDER),
    "prompt_lookup_speedup": Fact(
        "best wall-clock speed-up of prompt lookup on tool calls (lesson 14)", "x",
        (("14_speculative", r"tool calls, prompt lookup: best wall-clock speedup"),), 1.3, _PLACEHOLDER),
    "reasoning_gain": Fact(
        "CoT SFT minus answer-only SFT, held-out accuracy (lesson 15)", "accuracy",
        (("15_reasoning", r"CoT SFT - answer-only SFT"),), 0.05, _PLACEHOLDER),
}

# The values every fact takes when no lesson has been run: what the tests and the visible examples use.
DEFAULT_FACTS: dict[str, float] = {name: float(f.default) for name, f in FACTS.items()}


def _match(rows: list[dict], pattern: str) -> dict | None:
    """The last row whose ``quantity`` fully matches ``pattern``, or None."""
    found = [r for r in rows if isinstance(r.get("quantity"), str) and re.fullmatch(pattern, r["quantity"])]
    return found[-1] if found else None


def read_fact(name: str, results: dict[str, dict]) -> tuple[float, str, str | None]:
    """``(value, source, problem)`` of fact ``name`` from ``results`` (``{slug: payload}``, as
    :func:`brewslm_helpers.report.load_payloads` returns). ``problem`` is None when the value was
    read; otherwise it says why the default was used (lesson not run, row missing, not a number)."""
    fact = FACTS[name]
    values, where = [], []
    for slug, pattern in fact.rows:
        payload = results.get(slug)
        if payload is None:
            return float(fact.default), f"default ({fact.default_source})", \
                f"lesson {slug} has no recorded results at this budget (not run yet)"
        row = _match(payload.get("rows", []), pattern)
        if row is None:
            return float(fact.default), f"default ({fact.default_source})", \
                f"lesson {slug} ran but recorded no row matching {pattern!r} (renamed or removed?)"
        got = numbers(row.get("value"))
        if not got:
            return float(fact.default), f"default ({fact.default_source})", \
                f"lesson {slug}'s row {row['quantity']!r} holds no number ({row.get('value')!r})"
        values.append(got[0])
        where.append(f"{slug}: {row['quantity']!r} = {row.get('value')}")
    try:
        value = fact.combine(*values) if fact.combine else values[0]
    except ZeroDivisionError:
        return float(fact.default), f"default ({fact.default_source})", \
            f"lesson {fact.rows[0][0]}'s rows give a division by zero: {'; '.join(where)}"
    return float(value), "; ".join(where), None


def course_facts(budget: str | None = None,
                 results: dict[str, dict] | None = None) -> tuple[dict[str, float], list[dict]]:
    """Every fact of :data:`FACTS`, read from the results recorded at ``budget`` (or from ``results``).

    Returns ``(facts, provenance)``: ``facts`` is ``{name: float}`` (the default where a row could not
    be read); ``provenance`` one dict per fact: ``fact``, ``value``, ``unit``, ``means``, ``read``
    (``"recorded"``: read from a lesson's results; ``"DEFAULT"``: a documented default, not measured
    here), ``source`` and ``missing`` (None, or why the default was used)."""
    if results is None:
        from .report import load_payloads

        results = load_payloads(budget)
    facts, provenance = {}, []
    for name, fact in FACTS.items():
        value, source, problem = read_fact(name, results)
        facts[name] = value
        provenance.append({"fact": name, "value": value, "unit": fact.unit, "means": fact.means,
                           "read": "recorded" if problem is None else "DEFAULT", "source": source,
                           "missing": problem})
    return facts, provenance


def defaults_named(text: str, provenance: list[dict]) -> str:
    """The facts named in ``text`` (by key, as the guide's reasons name them) that are documented
    defaults rather than recorded results, each with why: ``""`` when every named fact was read
    from the course. What the notebook and the page show next to a reason, so that a placeholder
    never reads as a measurement."""
    out = [f"{p['fact']} = {p['value']:g} is a DEFAULT ({p['missing']})" for p in provenance
           if p["missing"] and re.search(rf"\b{re.escape(p['fact'])}\b", str(text))]
    return "; ".join(out)


# -- headlines -----------------------------------------------------------------------------------
def _h(axis, what, after, better, before=None, before_index=0, after_index=0):
    return {"axis": axis, "what": what, "before": before, "before_index": before_index,
            "after": after, "after_index": after_index, "better": better}


# What each lesson's technique bought, as recorded rows. ``before``/``after`` are quantity patterns
# (re.fullmatch, last matching row); ``*_index`` picks a number in the value (see :func:`numbers`);
# ``before`` None means ``after`` is already a ratio new/old. ``better`` says which way is a gain.
HEADLINES: dict[str, list[dict]] = {
    "01_toolkit": [
        _h("speed", "llama.cpp Q4_1 vs transformers fp32, decode", r"llama\.cpp Q4_1, prompt \d+: decode", "higher",
           before=r"transformers fp32, prompt \d+: decode"),
        _h("size", "Q4_1 GGUF file vs fp32 weights", r"Q4_1 GGUF file", "lower", before=r"weights, fp32"),
    ],
    "02_kd_capture": [
        _h("size", "top-k capture (gzip) vs the full distribution, per position", r"JSONL gzip size, k=\d+", "lower",
           before=r"full float32 distribution"),
    ],
    "03_kd_loss": [
        _h("quality", "KD vs CE on the few labels, gold accuracy", r"gold accuracy: KD on the capture, mean of seeds",
           "higher", before=r"gold accuracy: CE, few labels, mean of seeds"),
    ],
    "04_kd_quality": [
        _h("quality", "KD student: quality retained", r"KD on the capture: quality retained", "higher"),
        _h("size", "KD student: parameters", r"student params ratio", "lower"),
        _h("speed", "KD student: decode speed", r"student decode speedup", "higher"),
    ],
    "05_preference": [
        _h("quality", "good replies, shipped -> DPO", r"good replies, DPO", "higher", before=r"good replies, shipped"),
    ],
    "06_quantization": [
        _h("size", "Q4_K_M vs fp32, bits per weight", r"GGUF Q4_K_M: bits/weight", "lower",
           before=r"PyTorch fp32: bits/weight"),
        _h("quality", "Q4_K_M vs fp32, perplexity", r"GGUF Q4_K_M: perplexity", "lower",
           before=r"PyTorch fp32: perplexity"),
        _h("speed", "Q4_K_M (llama.cpp) vs fp32 (PyTorch), decode", r"GGUF Q4_K_M: decode speed", "higher",
           before=r"PyTorch fp32: decode speed"),
    ],
    "07_multitask_curriculum": [
        _h("quality", "curriculum vs random order, arith exact match", r"arith exact match, curriculum order", "higher",
           before=r"arith exact match, random order"),
    ],
    "08_serving": [
        _h("speed", "KV cache, decode", r"KV-cache speed-up, \d+ new tokens", "higher"),
        _h("speed", "continuous vs static batching, throughput (simulated)", r"continuous / static throughput",
           "higher"),
        _h("speed", "continuous vs static batching on llama.cpp, throughput",
           r"llama\.cpp engine: continuous / static throughput", "higher"),
    ],
    "09_observability": [
        _h("quality", "canary accuracy the drift check saw fall (Q4_1 -> damaged Q2_K)",
           r"gold canary accuracy, damaged Q2_K", "higher", before=r"gold canary accuracy, shipped Q4_1 \(baseline\)"),
    ],
    "11_feedback_loop": [
        _h("quality", "retrain on tagged rows, accuracy on the slice", r"accuracy on slice: tags \+ replay", "higher",
           before=r"accuracy on slice: base"),
        _h("quality", "retrain on tagged rows, accuracy on the gold set", r"accuracy on gold: tags \+ replay", "higher",
           before=r"accuracy on gold: base"),
    ],
    "12_tool_use": [
        _h("quality", "valid tool-call rate, base -> fine-tuned", r"valid call rate: fine-tuned", "higher",
           before=r"valid call rate: base"),
        _h("quality", "argument match, base -> fine-tuned", r"argument match: fine-tuned", "higher",
           before=r"argument match: base"),
    ],
    "13_pruning": [
        _h("size", "MLP -25 % and 6 query heads, parameters", r"reloaded pruned model \(MLP -25 %, 6 query heads\)",
           "lower", before=r"unpruned parameters"),
        _h("quality", "pruned and recovered, perplexity", r"recovered / unpruned perplexity", "lower"),
        _h("speed", "pruned MLP (recovered), decode", r"MLP -\d+% \(recovered\): decode / prefill speed-up", "higher"),
    ],
    "14_speculative": [
        _h("speed", "prompt lookup on tool calls, wall clock", r"tool calls, prompt lookup: best wall-clock speedup",
           "higher"),
        _h("speed", "cut draft on tool calls, wall clock", r"tool calls, cut draft: wall-clock speedup", "higher"),
    ],
    "15_reasoning": [
        _h("quality", "answer-only SFT -> CoT SFT + GRPO, accuracy", r"accuracy: CoT SFT \+ GRPO", "higher",
           before=r"accuracy: answer-only SFT"),
    ],
}


# -- scenarios -----------------------------------------------------------------------------------
METRICS = ("quality", "decode_tokens_per_s", "throughput_tokens_per_s", "memory_mb")

BASE_SCENARIO: dict = {
    "hardware": "cpu",
    "quality": {"current": 0.9, "target": None},
    "decode_tokens_per_s": {"current": 20.0, "target": None},
    "throughput_tokens_per_s": {"current": 20.0, "target": None},
    "memory_mb": {"current": 540.0, "target": None},
    "bits_per_weight": 32.0,
    "max_ppl_increase": 0.02,
    "labelled_examples": 0,
    "unlabelled_texts": 0,
    "teacher": None,
    "private_data": False,
    "preference_pairs": 0,
    "tasks": 1,
    "tool_calls": False,
    "knowledge_changes": False,
    "verifiable_answers": False,
    "serving": {"engine": "transformers", "kv_cache": True, "batching": "none"},
    "concurrent_requests": 1,
    "structured_output": False,
    "draft_alpha": None,
}


def scenario(**changes) -> dict:
    """A complete scenario: :data:`BASE_SCENARIO` (every target met or absent) with ``changes``.

    A metric may be given as ``(current, target)``; ``serving`` may give only the keys it changes.
    Unknown keys are refused, so a typo cannot silently leave a default in place."""
    out = json.loads(json.dumps(BASE_SCENARIO))
    for key, value in changes.items():
        if key not in out:
            raise KeyError(f"unknown scenario key {key!r}; known: {', '.join(out)}")
        if key in METRICS and isinstance(value, tuple):
            value = {"current": value[0], "target": value[1]}
        if key == "serving":
            unknown = set(value) - set(out["serving"])
            if unknown:
                raise KeyError(f"unknown serving keys {sorted(unknown)}")
            value = {**out["serving"], **value}
        out[key] = value
    return out


# -- fake results (tests, and the notebook's graded cells) ----------------------------------------
def _example_quantity(pattern: str) -> str:
    """A quantity string that ``pattern`` fully matches (the patterns here use only \\d+, escapes
    and literal text)."""
    text = pattern.replace(r"\d+", "128")
    text = re.sub(r"\\(.)", r"\1", text)
    assert re.fullmatch(pattern, text), (pattern, text)
    return text


def fake_payloads(slugs, seed: int = 0, budget: str = "ci") -> dict[str, dict]:
    """``{slug: payload}`` with made-up (seeded) values for every row :data:`FACTS` and
    :data:`HEADLINES` read from each lesson in ``slugs``: what a run of those lessons would have
    recorded, for tests. Values are positive numbers; rows read by index are ``"a -> b"`` strings."""
    rng = random.Random(seed)
    out = {}
    for slug in slugs:
        rows: list[dict] = []

        def add(pattern, value, rows=rows):
            q = _example_quantity(pattern)
            if all(r["quantity"] != q for r in rows):
                rows.append({"quantity": q, "value": value, "unit": "", "note": "fake"})

        for h in HEADLINES.get(slug, []):
            if h["before_index"] or h["after_index"] or (h["before"] == h["after"] and h["before"]):
                add(h["after"], f"{rng.uniform(0.2, 0.5):.3f} -> {rng.uniform(0.6, 0.95):.3f}")
            else:
                if h["before"]:
                    add(h["before"], round(rng.uniform(1.0, 10.0), 3))
                add(h["after"], round(rng.uniform(0.5, 2.0) if h["before"] is None else rng.uniform(1.0, 10.0), 3))
        for fact in FACTS.values():
            for s, pattern in fact.rows:
                if s == slug:
                    add(pattern, round(rng.uniform(0.5, 2.0), 3))
        out[slug] = {"lesson": slug, "budget": budget, "time": "2026-01-01 00:00:00", "rows": rows}
    return out


def write_payloads(payloads: dict[str, dict], budget: str) -> Path:
    """Write ``payloads`` as ``artifact_dir(budget)/results/<slug>.json`` (what record_results writes)."""
    folder = artifact_dir(budget) / "results"
    folder.mkdir(parents=True, exist_ok=True)
    for slug, payload in payloads.items():
        (folder / f"{slug}.json").write_text(json.dumps(payload, indent=1))
    return folder


# -- the graduation figure and page --------------------------------------------------------------
AXES = ("quality", "size", "speed")


def graduation_figure(table: list[dict], title: str = "What each technique bought on this machine"):
    """One panel per axis (quality, size, speed): each headline's gain as a horizontal bar on a log
    scale (1 = no change; right of 1 = better), measured rows in colour, the others written in grey
    with their status ("not run", "row missing", ...), so a missing lesson is seen, not dropped."""
    import matplotlib.pyplot as plt

    per_axis = {a: [r for r in table if r.get("axis") == a] for a in AXES}
    heights = [max(1, len(v)) for v in per_axis.values()]
    fig, axes = plt.subplots(len(AXES), 1, figsize=(9, 0.32 * sum(heights) + 2.2),
                             gridspec_kw={"height_ratios": heights})
    gains = [r["gain"] for r in table if isinstance(r.get("gain"), (int, float)) and r["gain"] > 0]
    lo = min([0.5] + [g / 1.5 for g in gains])
    hi = max([2.0] + [g * 1.5 for g in gains])
    colours = {"quality": "C0", "size": "C2", "speed": "C1"}
    for ax, axis in zip(axes, AXES):
        rows = per_axis[axis]
        labels = [f"{r['lesson'][:2]} {r['what']}" for r in rows]
        for y, r in enumerate(rows):
            g = r.get("gain")
            if r.get("status") == "measured" and isinstance(g, (int, float)) and g > 0:
                colour = colours[axis] if g >= 1 else "C3"
                ax.barh(y, math.log10(g), left=0, color=colour, alpha=0.85)
                ax.text(math.log10(g), y, f" {g:.2f}x ", va="center", fontsize=7,
                        ha="left" if g >= 1 else "right")
            else:
                said = r.get("status") if r.get("status") != "measured" else "measured, no ratio (a zero value)"
                ax.text(0, y, f"  {said}", va="center", fontsize=7, color="0.45", style="italic")
        ax.axvline(0, color="0.3", lw=0.8)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylim(max(1, len(rows)) - 0.4, -0.6)
        ax.set_xlim(math.log10(lo), math.log10(hi))
        ticks = [t for t in (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32) if lo <= t <= hi]
        ax.set_xticks([math.log10(t) for t in ticks], [f"{t:g}x" for t in ticks], fontsize=7)
        ax.set_title(f"{axis} (gain, better to the right)", fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
        if not rows:
            ax.set_yticks([])
    fig.suptitle(title, fontsize=11)
    not_run = sorted({r["lesson"] for r in table if r.get("status") == "not run"})
    other = sorted({r["lesson"] for r in table if r.get("status") in ("row missing", "not a number")})
    notes = [f"not run at this budget (grey; their gains are unknown, not zero): {', '.join(not_run)}" if not_run
             else "every lesson has recorded results at this budget"]
    if other:
        notes.append(f"ran, but a headline row is missing or not a number: {', '.join(other)}")
    fig.text(0.01, 0.005, "\n".join(notes), fontsize=7, color="0.3", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.02 + 0.012 * len(notes), 1, 1))
    return fig


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _table_html(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape("" if v is None else str(v))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_graduation_page(path: Path, *, budget: str, table: list[dict], figure: bytes, lessons: list[dict],
                          provenance: list[dict], advice: list[dict]) -> Path:
    """A self-contained HTML page (the figure embedded as PNG): the lessons run and not run, the
    figure, the headline table, the guide's facts with their sources, and the guide's advice."""
    css = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}"
           "table{border-collapse:collapse;font-size:12px;margin:1em 0}td,th{border:1px solid #ccc;"
           "padding:3px 6px;text-align:left;vertical-align:top}th{background:#f3f3f3}.missing{color:#a33}")
    not_run = [l for l in lessons if l["status"] != "run"]
    missing_line = ("every lesson has recorded results at this budget" if not not_run else
                    "<span class='missing'>not run at this budget: "
                    + ", ".join(html.escape(l["lesson"]) for l in not_run)
                    + "</span> (their rows below say so; run them and rebuild this page)")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>BrewSLM Academy: graduation report"
             f"</title><style>{css}</style></head><body>",
             f"<h1>BrewSLM Academy — graduation report</h1><p>budget <b>{html.escape(budget)}</b>; "
             f"{sum(l['status'] == 'run' for l in lessons)} of {len(lessons)} lessons run. {missing_line}.</p>",
             f"<img alt='gains per technique' style='max-width:100%' src='data:image/png;base64,"
             f"{base64.b64encode(figure).decode()}'>",
             "<h2>Lessons</h2>", _table_html(lessons, ["lesson", "title", "status", "time"]),
             "<h2>What each technique bought</h2>",
             _table_html(table, ["lesson", "axis", "what", "before", "after", "gain", "status"]),
             "<h2>The decision guide's facts</h2>",
             f"<p>{sum(p['read'] == 'recorded' for p in provenance)} of {len(provenance)} read from the lessons' "
             "recorded results; the others are <span class='missing'>DEFAULTS</span>, documented placeholders, not "
             "measurements of this machine (the <i>missing</i> column says why).</p>",
             _table_html(provenance, ["fact", "value", "unit", "read", "means", "source", "missing"]),
             "<h2>The decision guide on the course's scenarios</h2>",
             _table_html(advice, ["scenario", "rank", "technique", "reason", "defaults"]),
             "</body></html>"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def lesson_status(payloads: dict[str, dict]) -> list[dict]:
    """One row per lesson of :data:`COURSE`: ``lesson``, ``title``, ``status`` ("run" or "not run")
    and ``time`` (when its results were recorded)."""
    return [{"lesson": slug, "title": title, "status": "run" if slug in payloads else "not run",
             "time": payloads.get(slug, {}).get("time")} for slug, title in COURSE.items()]


def graduation_report(budget: str, graduation_table, advice: list[dict] = (), path: Path | None = None) -> dict:
    """The whole graduation report for ``budget``: read every lesson's recorded results, build the
    headline table with ``graduation_table(payloads, course, headlines)`` (the lesson's exercise),
    draw the figure and write the HTML page (``artifact_dir(budget)/graduation_report.html`` unless
    ``path``); each advice row gets ``defaults`` (:func:`defaults_named`, from the facts read here).
    Returns ``table``, ``lessons``, ``facts``, ``provenance``, ``figure`` and ``path``."""
    from .report import load_payloads

    payloads = {k: v for k, v in load_payloads(budget).items() if k in COURSE}
    table = graduation_table(payloads, list(COURSE), HEADLINES)
    lessons = lesson_status(payloads)
    facts, provenance = course_facts(results=payloads)
    fig = graduation_figure(table, title=f"What each technique bought on this machine (budget {budget})")
    # every reason that names a fact read as a default says so on the page too
    advice = [{**a, "defaults": defaults_named(a.get("reason", ""), provenance)} for a in advice]
    out = write_graduation_page(path or artifact_dir(budget) / "graduation_report.html", budget=budget,
                                table=table, figure=figure_png(fig), lessons=lessons,
                                provenance=provenance, advice=advice)
    return {"table": table, "lessons": lessons, "facts": facts, "provenance": provenance,
            "figure": fig, "path": out}
