"""``brewslm grade``: a folder (or LMS zip) of submissions in, a CSV gradebook and feedback out.

Accepted layouts (student ids are taken from folder or file names):

* ``SUBMISSIONS/<student>/<NN_slug>.ipynb`` (any depth below the student folder);
* an LMS zip holding either that layout or flat files named ``<student>_<anything>_<NN_slug>.ipynb``
  (Canvas-style; the student id is the part before the first underscore).

Each submission is checked (readable JSON notebook, not empty, not huge, the right lesson), then
autograded by nbgrader in a subprocess with a time limit. A broken submission gets a zero and a
one-line reason; the rest of the class is still graded.
"""
from __future__ import annotations

import csv
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .course import Course
from .lessons import CourseError, Lesson, all_lessons, lesson_of_filename
from .notebooks import grade_ids, read_notebook


@dataclass
class Submission:
    student: str
    lesson: Lesson
    path: Path


@dataclass
class Result:
    student: str
    lesson: str
    score: float = 0.0
    max_score: float = 0.0
    status: str = "graded"  # graded | not graded
    reason: str = ""
    cells: dict = field(default_factory=dict)
    feedback: str = ""


def _safe_id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._") or "student"


def collect(folder: Path) -> tuple[list[Submission], list[Result]]:
    """Find submissions under ``folder`` (or in a zip). Returns the gradeable ones and the
    files that could not even be attributed (as not-graded results)."""
    folder = Path(folder)
    if not folder.exists():
        raise CourseError(f"{folder}: no such folder or zip")
    if folder.is_file():
        if not zipfile.is_zipfile(folder):
            raise CourseError(f"{folder}: not a folder or a zip file")
        tmp = Path(tempfile.mkdtemp(prefix="brewslm-zip-"))
        with zipfile.ZipFile(folder) as z:
            for info in z.infolist():
                target = (tmp / info.filename).resolve()
                if not str(target).startswith(str(tmp.resolve())) or info.is_dir():
                    continue  # skip folders and path-traversal entries
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(info))
        folder = tmp
    subs, problems = [], []
    for path in sorted(folder.rglob("*.ipynb")):
        rel = path.relative_to(folder)
        if ".ipynb_checkpoints" in rel.parts:
            continue
        if len(rel.parts) > 1:
            student = _safe_id(rel.parts[0])
        else:  # flat LMS export: <student>_..._<slug>.ipynb
            student = _safe_id(rel.name.split("_", 1)[0])
        lesson = lesson_of_filename(rel.name)
        if lesson is None:
            problems.append(Result(student, rel.name, status="not graded",
                                   reason=f"{rel.name}: file name names no known lesson"))
            continue
        subs.append(Submission(student, lesson, path))
    if not subs and not problems:
        raise CourseError(f"{folder}: no .ipynb submissions found")
    return subs, problems


def check_submission(sub: Submission):
    """Read a submission and make sure it is the lesson it claims to be; returns the notebook.

    A lesson is recognised by its own exercise and test cell ids (``setup`` and any other id
    every lesson shares says nothing about which lesson a notebook is)."""
    nb = read_notebook(sub.path)
    ids = {l: grade_ids(read_notebook(l.solution)) for l in all_lessons()}
    shared = set.intersection(*ids.values()) if len(ids) > 1 else set()
    found = grade_ids(nb) - shared
    if not found & (ids[sub.lesson] - shared):
        for other, other_ids in ids.items():
            if other != sub.lesson and found & (other_ids - shared):
                raise CourseError(f"{sub.path.name}: this is the notebook of lesson {other.slug}, "
                                  f"not {sub.lesson.slug}")
        raise CourseError(f"{sub.path.name}: none of lesson {sub.lesson.slug}'s exercise cells are "
                          "in it (not started from the release notebook?)")
    return nb


def grade_folder(submissions: Path, out_dir: Path, budget: str = "ci", feedback: bool = True,
                 notebook_timeout: int = 900, progress=print) -> list[Result]:
    """Grade every submission under ``submissions``; write ``gradebook.csv``,
    ``grades_by_cell.csv`` and ``feedback/`` into ``out_dir``. Returns one result per submission."""
    subs, results = collect(submissions)
    out_dir = Path(out_dir).resolve()
    course = Course(out_dir / "course", budget=budget, notebook_timeout=notebook_timeout)
    course.setup(sorted({s.lesson for s in subs}, key=lambda l: l.slug))
    for i, sub in enumerate(subs, 1):
        result = Result(sub.student, sub.lesson.slug)
        start = time.perf_counter()
        try:
            nb = check_submission(sub)
            course.submit(sub.student, sub.lesson, nb)
            reason = course.autograde(sub.student, sub.lesson)
            if reason:
                raise CourseError(reason)
            scores = course.scores(sub.student, sub.lesson)
            if scores is None:
                raise CourseError("autograde produced no scores")
            result.score, result.max_score = scores["score"], scores["max_score"]
            result.cells = scores["cells"]
            if feedback:
                html = course.feedback(sub.student, sub.lesson)
                if html:
                    dest = out_dir / "feedback" / sub.student / f"{sub.lesson.slug}.html"
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(html, dest)
                    result.feedback = str(dest)
        except CourseError as e:
            result.status, result.reason = "not graded", str(e)
            result.max_score = _max_points(sub.lesson)
        results.append(result)
        progress(f"[{i}/{len(subs)}] {sub.student:<16} {sub.lesson.slug:<24} "
                 f"{result.score:g}/{result.max_score:g}  {result.reason}"
                 f" ({time.perf_counter() - start:.0f} s)")
    write_gradebook(results, out_dir)
    return results


def _max_points(lesson: Lesson) -> float:
    from .notebooks import test_cells
    return sum(test_cells(read_notebook(lesson.solution)).values())


def write_gradebook(results: list[Result], out_dir: Path) -> Path:
    """``gradebook.csv`` (one row per student and lesson) and ``grades_by_cell.csv``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gradebook.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", "lesson", "score", "max_score", "status", "reason"])
        for r in sorted(results, key=lambda r: (r.student, r.lesson)):
            w.writerow([r.student, r.lesson, f"{r.score:g}", f"{r.max_score:g}", r.status, r.reason])
    with open(out_dir / "grades_by_cell.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", "lesson", "test_cell", "score", "max_score"])
        for r in sorted(results, key=lambda r: (r.student, r.lesson)):
            for cell, (score, max_score) in sorted(r.cells.items()):
                w.writerow([r.student, r.lesson, cell, f"{score:g}", f"{max_score:g}"])
    return path


def summary_table(results: list[Result]) -> str:
    """The gradebook as a fixed-width text table."""
    rows = [("student", "lesson", "score", "status / reason")]
    for r in sorted(results, key=lambda r: (r.student, r.lesson)):
        rows.append((r.student, r.lesson, f"{r.score:g}/{r.max_score:g}",
                     r.reason if r.reason else r.status))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
        if n == 0:
            lines.append("-" * (sum(widths) + 6 + 16))
    return "\n".join(lines)
