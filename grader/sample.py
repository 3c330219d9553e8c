"""The bundled sample class the demo grades: one correct, one blank and one mistaken student."""
from __future__ import annotations

from pathlib import Path

import nbformat

from .lessons import Lesson, find_lesson
from .notebooks import make_submission, mistake_submission, read_notebook, test_cells

SAMPLE_STUDENTS = {
    "ada": "completes every exercise correctly",
    "blake": "submits the release notebook untouched",
    "casey": "makes one realistic mistake per lesson (the first listed in grader/mistakes/)",
}


def expected_scores(slug: str) -> dict[str, float]:
    """The marks each sample student should get in lesson ``slug``: all, none, and all but the
    points of the test cells the first known mistake loses."""
    lesson = find_lesson(slug)
    points = test_cells(read_notebook(lesson.solution))
    lost = set(lesson.mistakes[0]["loses"]) if lesson.mistakes else set()
    return {"ada": sum(points.values()), "blake": 0.0,
            "casey": sum(p for g, p in points.items() if g not in lost)}


def write_sample_class(lessons: list[Lesson], folder: Path) -> Path:
    """Write ``folder/<student>/<slug>.ipynb`` for the three sample students."""
    folder = Path(folder)
    for lesson in lessons:
        notebooks = {"ada": make_submission(lesson),
                     "blake": make_submission(lesson, answers="blank"),
                     "casey": (mistake_submission(lesson, lesson.mistakes[0]) if lesson.mistakes
                               else make_submission(lesson))}
        for student, nb in notebooks.items():
            path = folder / student / f"{lesson.slug}.ipynb"
            path.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, path)
    return folder
