"""The lesson catalogue: which lessons exist, where their sources and notebooks are, how to name them.

A lesson's only source is ``solutions/NN_slug.py`` (jupytext percent format, see
:mod:`grader.plaintext`); the instructor notebook nbgrader needs, ``solutions/NN_slug.ipynb``, is
built from it on demand (ignored by git) and read through :attr:`Lesson.solution`."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from brewslm_helpers.paths import REPO_ROOT

SOLUTIONS = REPO_ROOT / "solutions"
RELEASE = REPO_ROOT / "notebooks"
MISTAKES = Path(__file__).parent / "mistakes"


class CourseError(Exception):
    """A user-facing error: printed as one line by the CLI, no traceback."""


@dataclass(frozen=True)
class Lesson:
    slug: str  # e.g. "03_kd_loss": the assignment name and the notebook's file stem

    @property
    def number(self) -> int:
        return int(self.slug[:2])

    @property
    def source(self) -> Path:
        """The lesson's source of truth, ``solutions/NN_slug.py`` (jupytext percent format)."""
        return SOLUTIONS / f"{self.slug}.py"

    @property
    def solution(self) -> Path:
        """The instructor notebook (nbgrader markup), built from :attr:`source` if it changed."""
        path = SOLUTIONS / f"{self.slug}.ipynb"
        if not self.source.exists():
            return path  # no text source: whatever notebook is there (read_notebook says if none)
        from .plaintext import built

        return built(self.source, path)

    @property
    def release(self) -> Path:
        return RELEASE / f"{self.slug}.ipynb"

    @property
    def mistakes(self) -> list[dict]:
        """Known-wrong variants (``grader/mistakes/<slug>.json``), [] if none are listed."""
        path = MISTAKES / f"{self.slug}.json"
        return json.loads(path.read_text()) if path.exists() else []


def all_lessons() -> list[Lesson]:
    """Every lesson that has a text source ``solutions/NN_slug.py``, in order."""
    return [Lesson(p.stem) for p in sorted(SOLUTIONS.glob("[0-9][0-9]_*.py"))]


def find_lesson(name: str) -> Lesson:
    """Resolve ``"3"``, ``"03"``, ``"03_kd_loss"`` or ``"kd_loss"`` to a lesson, or fail clearly."""
    lessons = all_lessons()
    key = name.strip().removesuffix(".ipynb").removesuffix(".py")
    for lesson in lessons:
        if key in (lesson.slug, lesson.slug[3:]) or (key.isdigit() and int(key) == lesson.number):
            return lesson
    known = ", ".join(l.slug for l in lessons) or "none"
    raise CourseError(f"unknown lesson {name!r}; known lessons: {known}")


def select_lessons(names: list[str] | None) -> list[Lesson]:
    """``None``, ``[]`` or ``["all"]`` mean every lesson; otherwise resolve each name."""
    if not names or names == ["all"]:
        return all_lessons()
    return [find_lesson(n) for n in names]


def lesson_of_filename(filename: str) -> Lesson | None:
    """The lesson a submitted file's name refers to (``..._03_kd_loss.ipynb`` or ``03_kd_loss.ipynb``)."""
    stem = Path(filename).stem
    for lesson in all_lessons():
        if re.search(rf"(^|[_\-\s]){re.escape(lesson.slug)}($|[_\-\s(])", stem) or stem == lesson.slug:
            return lesson
    return None
