"""The grading round trip, for every lesson.

* One class goes through the real pipeline, ``grade_folder`` (what ``brewslm grade`` runs: nbgrader
  in a sandbox, then the trusted judge), two submissions at a time. Per lesson it holds the
  solution, the blank release and one known mistake. The solution gets full marks, and its
  autograded copy holds no error: grading it is the proof that the lesson runs top to bottom,
  headless, at ci budget. The blank release gets zero. The mistake loses exactly the points of the
  test cells it names. A correct answer that warns keeps full marks. (The blank release is graded
  whole for lesson 1; for the others without its demo cells, which only cost time.)
* Every known mistake of every lesson (``grader/mistakes/NN_slug.json``) is checked in one kernel per
  lesson (``grader.selfcheck``): it scores 0 on exactly the test cells it names and full points on
  the others, by nbgrader's own rule, and the solution passes every test cell before and after.
"""
from __future__ import annotations

import ast

import nbformat
import pytest

from grader.grade import grade_folder, summary_table
from grader.lessons import all_lessons
from grader.notebooks import (
    as_student_code,
    exercises_only,
    make_submission,
    mistake_submission,
    read_notebook,
    solution_sources,
)
from grader.notebooks import test_cells as points_by_test_cell
from grader.selfcheck import SOLUTION, score_variants, should_fail

LESSONS = all_lessons()
IDS = [l.slug for l in LESSONS]
SOLUTION_STUDENT, MISTAKE_STUDENT, BLANK_STUDENT, NOISY_STUDENT = "1_solution", "2_mistake", "3_blank", "4_noisy"


def noisy_submission(lesson):
    """The solution, with the first exercise wrapped so it emits a Python warning on every call (as
    some torch ops do): the warning lands in the test cell's stderr, which nbgrader would score 0."""
    exercise, source = next(iter(solution_sources(read_notebook(lesson.solution)).items()))
    code = as_student_code(source)
    name = [n for n in ast.parse(code).body if isinstance(n, ast.FunctionDef)][-1].name
    noisy = (code + "\n\nimport functools, warnings\n"
             f"_quiet_{name} = {name}\n\n"
             f"@functools.wraps(_quiet_{name})\n"
             f"def {name}(*args, **kwargs):\n"
             "    warnings.simplefilter('always')\n"
             "    warnings.warn('this op is deprecated and will change', UserWarning)\n"
             f"    return _quiet_{name}(*args, **kwargs)\n")
    return exercises_only(make_submission(lesson, replace={exercise: noisy}))


@pytest.fixture(scope="module")
def graded_class(request, tmp_path_factory):
    """``({(student, slug): Result}, out_dir)`` for the class above, graded once with ``jobs=2``.

    Only the lessons of the tests pytest selected are in the class (``-k 03_kd_loss`` grades one).
    Student folders are numbered so the long jobs (whole solutions) start first."""
    wanted = {item.callspec.params["lesson"].slug for item in request.session.items
              if "graded_class" in item.fixturenames and hasattr(item, "callspec")
              and "lesson" in item.callspec.params}
    lessons = [l for l in LESSONS if l.slug in wanted] or LESSONS[:1]
    root = tmp_path_factory.mktemp("grading")
    folder = root / "class"
    subs = {}
    for lesson in lessons:
        subs[(SOLUTION_STUDENT, lesson)] = make_submission(lesson)
    for lesson in lessons:
        if lesson.mistakes:
            subs[(MISTAKE_STUDENT, lesson)] = exercises_only(mistake_submission(lesson, lesson.mistakes[0]))
        # the whole blank release for lesson 1; the others without their demo cells, which run
        # library code (training, exports) whatever the answers and cannot change a test's verdict
        blank = make_submission(lesson, answers="blank")
        subs[(BLANK_STUDENT, lesson)] = blank if lesson == LESSONS[0] else exercises_only(blank)
    if LESSONS[0] in lessons:
        subs[(NOISY_STUDENT, LESSONS[0])] = noisy_submission(LESSONS[0])
    for (student, lesson), nb in subs.items():
        (folder / student).mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, folder / student / f"{lesson.slug}.ipynb")
    results = grade_folder(folder, root / "out", budget="ci", feedback=False, jobs=2)
    print("\n" + summary_table(results))
    return {(r.student, r.lesson): r for r in results}, root / "out"


def expected_cells(lesson) -> dict[str, float]:
    return points_by_test_cell(read_notebook(lesson.solution))


@pytest.mark.parametrize("lesson", LESSONS, ids=IDS)
def test_solution_full_marks_and_runs_clean(graded_class, lesson):
    results, out = graded_class
    r = results[(SOLUTION_STUDENT, lesson.slug)]
    cells = expected_cells(lesson)
    assert r.status == "graded", r.reason
    assert r.cells == {g: (p, p) for g, p in cells.items()}, r.reason
    assert r.score == r.max_score == sum(cells.values()) > 0
    executed = read_notebook(out / "course" / "autograded" / SOLUTION_STUDENT / lesson.slug
                             / f"{lesson.slug}.ipynb")
    errors = [f"{o['ename']}: {o['evalue']}" for c in executed.cells for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, f"{lesson.slug} does not run clean at ci budget: {errors}"


@pytest.mark.parametrize("lesson", LESSONS, ids=IDS)
def test_blank_release_scores_zero(graded_class, lesson):
    r = graded_class[0][(BLANK_STUDENT, lesson.slug)]
    assert r.status == "graded", r.reason
    assert r.score == 0
    assert r.max_score == sum(expected_cells(lesson).values())


@pytest.mark.parametrize("lesson", LESSONS, ids=IDS)
def test_known_mistake_through_the_pipeline(graded_class, lesson):
    mistake = lesson.mistakes[0]
    r = graded_class[0][(MISTAKE_STUDENT, lesson.slug)]
    assert r.status == "graded", r.reason
    for grade_id, points in expected_cells(lesson).items():
        want = 0.0 if grade_id in mistake["loses"] else points
        assert r.cells[grade_id] == (want, points), (mistake["name"], grade_id, r.reason)


def test_correct_answer_that_warns_keeps_full_marks(graded_class):
    r = graded_class[0][(NOISY_STUDENT, LESSONS[0].slug)]
    assert r.status == "graded" and r.score == r.max_score > 0, r.reason


@pytest.mark.parametrize("lesson", LESSONS, ids=IDS)
def test_every_known_mistake_loses_exactly_its_points(lesson):
    cells = expected_cells(lesson)
    got = score_variants(lesson)
    want = {name: {g: (0.0 if g in should_fail(lesson, name) else p) for g, p in cells.items()}
            for name in got}
    assert len(got) == len(lesson.mistakes) + 2 and got[SOLUTION] == want[SOLUTION]
    assert got == want


@pytest.mark.parametrize("lesson", LESSONS, ids=IDS)
def test_every_exercise_has_a_known_mistake(lesson):
    exercises = set(solution_sources(read_notebook(lesson.solution)))
    assert exercises, f"{lesson.slug} has no exercise"
    covered = {m["exercise"] for m in lesson.mistakes}
    assert covered == exercises, f"exercises without a known mistake: {exercises - covered}"
    tests = set(expected_cells(lesson))
    for m in lesson.mistakes:
        assert m["loses"] and set(m["loses"]) <= tests, m["name"]
