"""The ``brewslm`` command: one-line errors, and grading a class with broken submissions in it."""
from __future__ import annotations

import csv
import subprocess
import sys
import zipfile

import nbformat
import pytest

from grader.grade import collect, grade_folder
from grader.lessons import CourseError, all_lessons, find_lesson
from grader.notebooks import make_submission

LESSON = all_lessons()[0]


def brewslm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "grader", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.mark.parametrize("args,message", [
    (["run", "99"], "unknown lesson '99'"),
    (["run", "no_such_lesson"], "unknown lesson"),
    (["grade", "/no/such/folder"], "no such folder"),
])
def test_user_errors_are_one_line(args, message):
    result = brewslm(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_validate_rejects_a_corrupt_notebook(tmp_path):
    bad = tmp_path / f"{LESSON.slug}.ipynb"
    bad.write_text('{"cells": [')
    result = brewslm("validate", str(bad))
    assert result.returncode == 2 and "not a valid notebook" in result.stderr


def test_find_lesson_accepts_number_slug_and_name():
    assert find_lesson("1") == find_lesson("01") == find_lesson(LESSON.slug) == LESSON
    assert find_lesson(LESSON.slug[3:]) == LESSON
    with pytest.raises(CourseError):
        find_lesson("42")


def test_a_broken_class_is_graded_with_reasons(tmp_path):
    """Corrupt, empty, wrong-lesson and unnamed files get zero and a reason; the good student
    is graded as usual, from a folder and from a Canvas-style zip alike."""
    other = all_lessons()[1]
    subs = tmp_path / "class"
    good = make_submission(LESSON)
    for student, name, content in [
        ("good", f"{LESSON.slug}.ipynb", nbformat.writes(good)),
        ("corrupt", f"{LESSON.slug}.ipynb", nbformat.writes(good)[:500]),
        ("empty", f"{LESSON.slug}.ipynb", ""),
        ("wrong", f"{LESSON.slug}.ipynb", nbformat.writes(make_submission(other))),
        ("unnamed", "homework.ipynb", nbformat.writes(good)),
    ]:
        (subs / student).mkdir(parents=True)
        (subs / student / name).write_text(content)
    results = {r.student: r for r in grade_folder(subs, tmp_path / "out", feedback=True)}
    assert results["good"].score == results["good"].max_score > 0
    assert results["good"].feedback
    assert "corrupt JSON" in results["corrupt"].reason
    assert "empty file" in results["empty"].reason
    assert f"lesson {other.slug}" in results["wrong"].reason
    assert "names no known lesson" in results["unnamed"].reason
    for name in ("corrupt", "empty", "wrong", "unnamed"):
        assert results[name].score == 0 and results[name].status == "not graded"
    rows = list(csv.DictReader(open(tmp_path / "out" / "gradebook.csv")))
    assert {r["student"] for r in rows} == set(results)

    # the same good submission in an LMS zip (flat, <student>_<id>_<slug>.ipynb)
    archive = tmp_path / "canvas.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(f"zoe_1234_{LESSON.slug}.ipynb", nbformat.writes(good))
    subs_found, problems = collect(archive)
    assert [(s.student, s.lesson) for s in subs_found] == [("zoe", LESSON)] and not problems


def test_mistakes_command_shows_what_each_known_mistake_fails():
    result = brewslm("mistakes", LESSON.slug)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for m in LESSON.mistakes:
        row = next(l for l in lines if f" {m['name']} " in l)
        assert row.lstrip().startswith("ok") and ", ".join(sorted(m["loses"])) in row, row
    assert sum("passes every test" in l for l in lines) == 2  # the solution, before and after
