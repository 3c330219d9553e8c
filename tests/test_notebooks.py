"""The papermill pipeline runs a lesson headless at ci budget; the committed notebooks are clean and in sync.

Every lesson's clean ci-budget execution is proved by grading its solution (tests/test_grading.py),
which executes it top to bottom in a fresh kernel; here papermill (``brewslm run``) is exercised on
the first lesson only, so CI does not execute every notebook twice."""
from __future__ import annotations

import json

import pytest

from grader.lessons import all_lessons
from grader.release import generate_release
from grader.run import run_lessons

LESSONS = all_lessons()
IDS = [l.slug for l in LESSONS]


def test_there_are_lessons():
    assert [l.slug[:2] for l in LESSONS[:4]] == ["01", "02", "03", "04"]


@pytest.mark.parametrize("lesson", LESSONS[:1], ids=IDS[:1])
def test_solution_runs_at_ci_budget(lesson, tmp_path):
    (row,) = run_lessons([lesson], "ci", tmp_path)
    assert row["status"] == "ok", row["error"]
    executed = json.loads((tmp_path / f"{lesson.slug}.ipynb").read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors


def test_release_notebooks_are_in_sync_with_solutions():
    generated = generate_release(LESSONS)
    for lesson in LESSONS:
        assert lesson.release.exists(), f"{lesson.release} missing: run `brewslm release`"
        assert lesson.release.read_text() == generated[lesson.slug], \
            f"{lesson.release.name} is out of date: run `brewslm release`"


@pytest.mark.parametrize("lesson", LESSONS, ids=IDS)
def test_committed_notebooks_are_clean(lesson):
    for path in (lesson.solution, lesson.release):
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            assert not cell.get("outputs"), f"{path.name} has outputs committed"
    release_text = "".join("".join(c["source"]) for c in json.loads(lesson.release.read_text())["cells"])
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
        assert marker not in release_text
    solution_nb = json.loads(lesson.solution.read_text())
    params = [c for c in solution_nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(params) == 1 and "BREWSLM_BUDGET" in "".join(params[0]["source"])
