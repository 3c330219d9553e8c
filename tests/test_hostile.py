"""The grader treats every submission as hostile and still grades the whole class.

One class holds every case of ``tests/adversarial/corpus.py`` next to a correct, a blank and a
correct-but-noisy student; it is graded once, two submissions at a time, through
``grade_folder`` (what ``brewslm grade`` runs). Each case must get exactly its stated outcome, no
attack may score more than the blank release, and the other students keep their scores.
Then the same folder is graded again: nothing is re-run unless a file changed.
"""
from __future__ import annotations

import csv
import dataclasses
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from adversarial.corpus import CASES, LESSON, Ctx, write_class  # noqa: E402

from grader import sandbox  # noqa: E402
from grader.grade import grade_folder, summary_table  # noqa: E402

ISOLATION = sandbox.isolation_available()
TIMEOUTS = dict(cell_timeout=90, notebook_timeout=240)  # generous: the setup cell imports torch


PLANTED = [".ipython/profile_default/startup/00-pass-everything.py", ".jupyter/nbgrader_config.py",
           ".local/etc/jupyter/nbgrader_config.py", "PWNED"]


def _model_files():
    from brewslm_helpers.paths import cache_dir

    folder = cache_dir() / "models"
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def graded_class(tmp_path_factory):
    """The class, graded with the grader's HOME set to a folder of the test (so what a submission
    would plant there is seen, and nothing lands in the real one) and an executed solution in the
    cache, as `brewslm run` leaves it."""
    import os
    import shutil

    from brewslm_helpers.paths import cache_dir

    root = tmp_path_factory.mktemp("hostile")
    cache = cache_dir().resolve()
    ctx = Ctx(submissions=root / "class", out=root / "out", marker=root / "daemon.marker",
              home=root / "grader-home", cache=cache)
    ctx.home.mkdir()
    executed = cache / "runs" / "ci" / f"{LESSON.slug}.ipynb"
    planted_run = not executed.exists()
    if planted_run:
        executed.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(LESSON.solution, executed)
    write_class(ctx.submissions, ctx, CASES)
    models = _model_files()
    saved = {k: os.environ.get(k) for k in ("HOME", "BREWSLM_CACHE")}
    os.environ.update(HOME=str(ctx.home), BREWSLM_CACHE=str(cache))
    real_home = Path(saved["HOME"] or "/root")
    before = {p: (real_home / p).exists() for p in PLANTED}
    try:
        start = time.perf_counter()
        results = grade_folder(ctx.submissions, ctx.out, feedback=True, jobs=2, **TIMEOUTS)
        seconds = time.perf_counter() - start
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        if planted_run:
            executed.unlink()
        leaked = [p for p in PLANTED if (real_home / p).exists() and not before[p]]
        for p in leaked:  # never leave a planted file in the machine's real HOME
            (real_home / p).unlink()
    ctx.leaked = leaked
    ctx.models_before, ctx.models_after = models, _model_files()
    print("\n" + summary_table(results) + f"\n({len(CASES)} submissions, {seconds:.0f} s, --jobs 2)")
    return ctx, {r.student: r for r in results}, seconds


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_gets_its_outcome(graded_class, case):
    ctx, results, _ = graded_class
    if case.needs_isolation and not ISOLATION:
        pytest.skip("needs a mount namespace (run the grader as root or allow unshare)")
    r = results[case.name]
    want = case.expect if ISOLATION or case.without_isolation is None else case.without_isolation
    assert r.status == want.status or r.status in want.status_any, (r.status, r.reason)
    assert r.score == want.score, (r.score, r.reason, r.cells)
    assert r.max_score == 9.0
    if want.cells is not None and r.status == "graded":
        assert {g: s for g, (s, _) in r.cells.items()} == want.cells, r.reason
    if want.reason:
        assert want.reason in r.reason, r.reason
    if want.reason_any:
        assert any(s in r.reason for s in want.reason_any), r.reason
    if case.kind == "attack":
        assert r.score <= results["blank"].score
    assert "\n" not in r.reason and len(r.reason) <= 400


def test_no_grade_is_lost(graded_class):
    ctx, results, _ = graded_class
    assert set(results) == {c.name for c in CASES}
    rows = list(csv.DictReader(open(ctx.out / "gradebook.csv")))
    assert sorted(r["student"] for r in rows) == sorted(c.name for c in CASES)
    for row in rows:  # the CSV is what the grader computed, whatever the vandal wrote
        r = results[row["student"]]
        assert float(row["score"]) == r.score and row["status"] == r.status
        assert row["status"] == "graded" or row["reason"]


def test_nothing_a_submission_started_survives(graded_class):
    ctx, _, _ = graded_class
    before = ctx.marker.stat().st_size if ctx.marker.exists() else 0
    time.sleep(1.5)
    after = ctx.marker.stat().st_size if ctx.marker.exists() else 0
    assert after == before, "the daemon a submission started is still running"


@pytest.mark.skipif(not ISOLATION, reason="needs a mount namespace")
def test_the_class_folder_and_course_are_out_of_reach(graded_class):
    ctx, _, _ = graded_class
    assert not (ctx.submissions / "zz_fake_student").exists()
    assert (ctx.submissions / "good" / f"{LESSON.slug}.ipynb").read_bytes()[:1] == b"{"


def test_regrading_is_idempotent_and_only_regrades_what_changed(graded_class, tmp_path):
    import shutil

    ctx, first, _ = graded_class
    # on copies of the class and of the grader's output, so the other tests see the first run as it was
    submissions, out = tmp_path / "class", tmp_path / "out"
    shutil.copytree(ctx.submissions, submissions, symlinks=True)
    shutil.copytree(ctx.out, out, symlinks=True)
    ctx = dataclasses.replace(ctx, submissions=submissions, out=out)
    lines = []
    start = time.perf_counter()
    again = {r.student: r for r in grade_folder(ctx.submissions, ctx.out, feedback=False, jobs=2,
                                                progress=lines.append, progress_bar=False,
                                                **TIMEOUTS)}
    assert time.perf_counter() - start < 120
    assert {k: (r.status, r.score, r.reason) for k, r in again.items()} == \
        {k: (r.status, r.score, r.reason) for k, r in first.items()}
    assert not [l for l in lines if l.startswith("[")], lines  # nothing was executed again

    # one student hands in again: only that submission is graded
    good = ctx.submissions / "good" / f"{LESSON.slug}.ipynb"
    (ctx.submissions / "blank" / f"{LESSON.slug}.ipynb").write_bytes(good.read_bytes())
    lines.clear()
    third = {r.student: r for r in grade_folder(ctx.submissions, ctx.out, feedback=False, jobs=2,
                                                progress=lines.append, progress_bar=False,
                                                **TIMEOUTS)}
    graded_lines = [l for l in lines if l.startswith("[")]
    assert len(graded_lines) == 1 and " blank " in graded_lines[0], lines
    assert third["blank"].score == 9.0 and third["good"].score == 9.0


def test_nothing_is_planted_in_the_graders_home(graded_class):
    ctx, _, _ = graded_class
    assert not ctx.leaked, ctx.leaked
    planted = [p for p in PLANTED if (ctx.home / p).exists()]
    assert not planted, planted


def test_the_cached_model_is_untouched(graded_class):
    ctx, _, _ = graded_class
    assert ctx.models_after == ctx.models_before


def test_feedback_pages_hold_no_hidden_test_no_solution_no_markup(graded_class):
    import html

    from grader.judge import split_test
    from grader.notebooks import nbgrader_meta, read_notebook

    ctx, results, _ = graded_class
    source = read_notebook(LESSON.solution)
    hidden = [line.strip() for c in source.cells if nbgrader_meta(c).get("grade")
              for line in split_test(c.source)[1].splitlines() if line.strip().startswith("assert")]
    assert hidden
    pages = sorted((ctx.out / "feedback").rglob("*.html"))
    assert len(pages) == sum(r.status == "graded" for r in results.values())
    for page in pages:
        text = page.read_text()
        # a page shows the student's own code, which may spell the markers itself (an attack that
        # searches for the solution does): only markers the submission does not hold are a leak
        own = ctx.submissions / page.parent.name / f"{LESSON.slug}.ipynb"
        submitted = "" if own.is_symlink() or not own.is_file() else own.read_text()
        assert "<script" not in text.lower() and "<img src=x" not in text.lower(), page
        for marker in ("BEGIN SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
            assert marker not in text or marker in submitted, (page, marker)
        for line in hidden:
            assert html.escape(line, quote=True) not in text and line not in text, (page, line)


def test_a_rerun_reproduces_the_honest_gradebook(graded_class):
    """The cached results and the CSVs are the grader's: nothing a submission planted rewrote them."""
    import json

    ctx, results, _ = graded_class
    for path in (ctx.out / "results").rglob("*.json"):
        data = json.loads(path.read_text())
        assert data["result"]["score"] == results[data["result"]["student"]].score
    assert "forged" not in (ctx.out / "gradebook.csv").read_text()
    assert "forged" not in (ctx.out / "grades_by_cell.csv").read_text()
