"""Reading notebooks safely and building student-style submissions from the solutions."""
from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat

from .lessons import CourseError, Lesson

_MARKER = re.compile(r"^[ \t]*### (BEGIN|END) SOLUTION[ \t]*\n?", re.MULTILINE)


MAX_BYTES = 50_000_000


def read_notebook(path: Path, max_bytes: int = MAX_BYTES) -> nbformat.NotebookNode:
    """Read and validate a notebook, raising ``CourseError`` with a one-line reason if it is broken."""
    path = Path(path)
    if not path.exists():
        raise CourseError(f"{path}: no such notebook")
    if path.is_symlink():
        raise CourseError(f"{path.name}: is a symbolic link, not a submitted file")
    if not path.is_file():
        raise CourseError(f"{path.name}: not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise CourseError(f"{path.name}: empty file")
    if size > max_bytes:
        raise CourseError(f"{path.name}: {size / 1e6:.0f} MB is over the {max_bytes / 1e6:.0f} MB limit")
    return notebook_from_bytes(path.read_bytes(), path.name, max_bytes)


def notebook_from_bytes(data: bytes, name: str, max_bytes: int = MAX_BYTES) -> nbformat.NotebookNode:
    """``read_notebook`` for a file already in memory (the grader reads each submission once)."""
    if len(data) == 0 or not data.strip():
        raise CourseError(f"{name}: empty file")
    if len(data) > max_bytes:
        raise CourseError(f"{name}: {len(data) / 1e6:.0f} MB is over the {max_bytes / 1e6:.0f} MB limit")
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CourseError(f"{name}: not a valid notebook (corrupt JSON: {str(e)[:120]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("cells"), list):
        raise CourseError(f"{name}: not a valid notebook (no cell list)")
    try:
        nb = nbformat.reads(data.decode("utf-8"), as_version=4)
    except Exception as e:  # nbformat raises assorted errors on malformed structure
        raise CourseError(f"{name}: not a valid notebook ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(nb.get("cells"), list):
        raise CourseError(f"{name}: not a valid notebook (no cell list)")
    for cell in nb.cells:
        if not isinstance(cell, dict) or not isinstance(cell.get("metadata", {}), dict) \
                or not isinstance(cell.get("source", ""), str):
            raise CourseError(f"{name}: not a valid notebook (a malformed cell)")
        meta = cell.get("metadata", {}).get("nbgrader")
        if meta is not None and (not isinstance(meta, dict)
                                 or not isinstance(meta.get("grade_id", ""), str)):
            raise CourseError(f"{name}: not a valid notebook (malformed nbgrader metadata)")
    return nb


def nbgrader_meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def grade_ids(nb) -> set[str]:
    """All nbgrader ``grade_id``s in a notebook."""
    return {m["grade_id"] for c in nb.cells if (m := nbgrader_meta(c)).get("grade_id")}


def test_cells(nb) -> dict[str, float]:
    """``{grade_id: points}`` of the autograded test cells."""
    return {m["grade_id"]: float(m.get("points", 0)) for c in nb.cells
            if (m := nbgrader_meta(c)).get("grade") and not m.get("solution")}


def solution_sources(nb) -> dict[str, str]:
    """``{grade_id: source}`` of the solution (exercise) code cells."""
    return {m["grade_id"]: c.source for c in nb.cells
            if (m := nbgrader_meta(c)).get("solution") and c.cell_type == "code"}


def strip_outputs(nb) -> nbformat.NotebookNode:
    """Remove outputs and execution counts in place (notebooks are committed without outputs)."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
        cell.metadata.pop("papermill", None)
    nb.metadata.pop("papermill", None)
    return nb


def as_student_code(solution_source: str) -> str:
    """A solution cell's source as a student would type it: the nbgrader markers removed."""
    return _MARKER.sub("", solution_source)


def make_submission(lesson: Lesson, replace: dict[str, str] | None = None,
                    answers: str = "solution") -> nbformat.NotebookNode:
    """A student-style notebook for ``lesson``: the release notebook with exercise cells filled.

    ``answers="solution"`` fills every exercise cell with the solution's code; ``"blank"`` leaves
    the release as it is. ``replace`` maps an exercise ``grade_id`` to the code to put there instead.
    """
    release = read_notebook(lesson.release)
    solution = solution_sources(read_notebook(lesson.solution))
    replace = replace or {}
    for cell in release.cells:
        grade_id = nbgrader_meta(cell).get("grade_id")
        if grade_id in replace:
            cell.source = replace[grade_id]
        elif answers == "solution" and grade_id in solution:
            cell.source = as_student_code(solution[grade_id])
    return release


def mistake_submission(lesson: Lesson, mistake: dict) -> nbformat.NotebookNode:
    """The correct submission with one known mistake applied (see ``docs/AUTHORING.md``)."""
    source = solution_sources(read_notebook(lesson.solution))[mistake["exercise"]]
    count = source.count(mistake["old"])
    if count != 1:
        raise CourseError(f"{lesson.slug}: mistake {mistake['name']!r}: 'old' text occurs {count} "
                          f"times in {mistake['exercise']} (must be exactly once)")
    wrong = as_student_code(source.replace(mistake["old"], mistake["new"]))
    return make_submission(lesson, replace={mistake["exercise"]: wrong})


def exercises_only(nb) -> nbformat.NotebookNode:
    """Keep only the parameters cell and the nbgrader cells (setup, exercises, tests).

    The grading tests use it for known-mistake variants: a test cell must depend on nothing but
    the setup cell and its own exercise (docs/AUTHORING.md), so the demo cells can go, and the
    variant grades in seconds instead of re-running every measurement.
    """
    nb.cells = [c for c in nb.cells
                if nbgrader_meta(c) or "parameters" in c.get("metadata", {}).get("tags", [])]
    return nb
