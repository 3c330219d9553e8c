"""The grading round trip through the real pipeline (nbgrader, in subprocesses), for every lesson:
the solution gets full marks, the blank release zero, and each known mistake loses exactly the
points of the test cells it names.

The solution and the blank release are graded as whole notebooks; grading the solution is also the
proof that it runs top to bottom, headless, at ci budget (no cell of the autograded copy may hold an
error), so CI executes each lesson once for both. Known mistakes are graded with
the demo cells removed (``exercises_only``): test cells depend only on the setup cell and their own
exercise, which the ``solution-exercises-only`` case proves by getting full marks that way too.
"""
from __future__ import annotations

import ast

import pytest

from grader.course import Course
from grader.lessons import all_lessons
from grader.notebooks import (as_student_code, exercises_only, make_submission, mistake_submission,
                              read_notebook, solution_sources)
from grader.notebooks import test_cells as points_by_test_cell

LESSONS = all_lessons()
CASES = ([pytest.param(l, "solution", None, id=f"{l.slug}-solution") for l in LESSONS]
         + [pytest.param(l, "solution-exercises-only", None, id=f"{l.slug}-solution-exercises-only")
            for l in LESSONS]
         + [pytest.param(l, "blank", None, id=f"{l.slug}-blank") for l in LESSONS]
         + [pytest.param(l, "mistake", m, id=f"{l.slug}-{m['name']}")
            for l in LESSONS for m in l.mistakes])


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    c = Course(tmp_path_factory.mktemp("grading") / "course", budget="ci")
    c.setup(LESSONS)
    return c


def graded(course, student, lesson, nb) -> dict:
    course.submit(student, lesson, nb)
    assert course.autograde(student, lesson) == ""
    scores = course.scores(student, lesson)
    assert scores is not None and not scores["needs_manual_grade"]
    return scores


@pytest.mark.parametrize("lesson,kind,mistake", CASES)
def test_round_trip(course, lesson, kind, mistake):
    expected_cells = points_by_test_cell(read_notebook(lesson.solution))
    if kind.startswith("solution"):
        nb = make_submission(lesson)
        scores = graded(course, kind, lesson, exercises_only(nb) if kind.endswith("only") else nb)
        assert scores["cells"] == {g: (p, p) for g, p in expected_cells.items()}
        assert scores["score"] == scores["max_score"] == sum(expected_cells.values()) > 0
        executed = read_notebook(course.root / "autograded" / kind / lesson.slug / f"{lesson.slug}.ipynb")
        errors = [f"{o['ename']}: {o['evalue']}" for c in executed.cells for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, f"{lesson.slug} does not run clean at ci budget: {errors}"
    elif kind == "blank":
        scores = graded(course, "blank", lesson, make_submission(lesson, answers="blank"))
        assert scores["score"] == 0
        assert scores["max_score"] == sum(expected_cells.values())
    else:
        nb = exercises_only(mistake_submission(lesson, mistake))
        # phase 1 (nbgrader) is what tells a mistake apart; the fresh-kernel re-check (phase 2) is
        # proved above (a correct solution keeps every point through it) and in test_hostile.py,
        # and can only take points away, so known mistakes skip it to keep CI short
        course.recheck = False
        try:
            scores = graded(course, mistake["name"], lesson, nb)
        finally:
            course.recheck = True
        for grade_id, points in expected_cells.items():
            want = 0.0 if grade_id in mistake["loses"] else points
            assert scores["cells"][grade_id] == (want, points), (mistake["name"], grade_id)


@pytest.mark.parametrize("lesson", LESSONS, ids=[l.slug for l in LESSONS])
def test_every_exercise_has_a_known_mistake(lesson):
    exercises = set(solution_sources(read_notebook(lesson.solution)))
    assert exercises, f"{lesson.slug} has no exercise"
    covered = {m["exercise"] for m in lesson.mistakes}
    assert covered == exercises, f"exercises without a known mistake: {exercises - covered}"
    tests = set(points_by_test_cell(read_notebook(lesson.solution)))
    for m in lesson.mistakes:
        assert m["loses"] and set(m["loses"]) <= tests, m["name"]


def test_correct_answer_that_warns_keeps_full_marks(course):
    """A correct answer that emits a Python warning on every call (as some torch ops do) still gets
    every point: the warning lands in the test cell's stderr, which nbgrader would score 0."""
    lesson = LESSONS[0]
    exercise, source = next(iter(solution_sources(read_notebook(lesson.solution)).items()))
    name = [n for n in ast.parse(as_student_code(source)).body if isinstance(n, ast.FunctionDef)][-1].name
    noisy = (as_student_code(source) + "\n\nimport functools, warnings\n"
             f"_quiet_{name} = {name}\n\n"
             f"@functools.wraps(_quiet_{name})\n"
             f"def {name}(*args, **kwargs):\n"
             "    warnings.simplefilter('always')\n"
             "    warnings.warn('this op is deprecated and will change', UserWarning)\n"
             f"    return _quiet_{name}(*args, **kwargs)\n")
    scores = graded(course, "noisy", lesson, make_submission(lesson, replace={exercise: noisy}))
    assert scores["score"] == scores["max_score"]
