"""A headless nbgrader course directory, built in a work folder (never in the repo).

Layout (nbgrader's own): ``source/``, ``release/``, ``submitted/``, ``autograded/``, ``feedback/``
and ``gradebook.db`` (SQLite) under one root, with an ``nbgrader_config.py`` written here. Every
nbgrader step runs as a subprocess with a time limit, so a submission that hangs or kills its
kernel cannot take the grader down with it.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat

from .lessons import CourseError, Lesson
from .run import notebook_env

COURSE_ID = "brewslm-advanced"
# stderr lines nbgrader should not count against a test cell: Python warnings and progress bars
IGNORED_STDERR = r"(?i)(warning|\d+%\|)"

CONFIG = """\
c = get_config()
c.CourseDirectory.root = {root!r}
c.CourseDirectory.course_id = {course_id!r}
c.ClearSolutions.code_stub = {{"python": "# YOUR CODE HERE\\nraise NotImplementedError()"}}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
c.Execute.timeout = {cell_timeout}
c.Execute.interrupt_on_timeout = True
c.Execute.allow_errors = True
c.Execute.kernel_name = "python3"
c.OverwriteCells.add_missing_cells = True
c.IgnorePattern.enabled = True
c.IgnorePattern.pattern = {ignored!r}
c.LimitOutput.max_lines = 1000
c.LimitOutput.max_traceback = 100
c.NbGraderApp.logfile = ""
"""


def _bin(name: str) -> str:
    """A console script of this environment (nbgrader calls ``alembic``, so PATH must have it too)."""
    return str(Path(sys.executable).parent / name)


class Course:
    """One nbgrader course directory for a set of lessons."""

    def __init__(self, root: Path, budget: str = "ci", cell_timeout: int = 300,
                 notebook_timeout: int = 900):
        self.root = Path(root).resolve()
        self.budget = budget
        self.cell_timeout = cell_timeout
        self.notebook_timeout = notebook_timeout

    # -- plumbing -----------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(notebook_env(self.budget))
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        return env

    def nbgrader(self, *args: str, timeout: int | None = None) -> subprocess.CompletedProcess:
        """Run ``nbgrader ARGS`` in the course root; on time-out the whole process group is killed."""
        proc = subprocess.Popen([_bin("nbgrader"), *args], cwd=self.root, env=self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return subprocess.CompletedProcess(proc.args, -9, out + "\n[timed out]", None)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)

    # -- set-up --------------------------------------------------------------------------------
    def setup(self, lessons: list[Lesson]) -> None:
        """Write the config and generate each lesson's release (registers it in the gradebook)."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "nbgrader_config.py").write_text(CONFIG.format(
            root=str(self.root), course_id=COURSE_ID, cell_timeout=self.cell_timeout,
            ignored=IGNORED_STDERR))
        for lesson in lessons:
            src = self.root / "source" / lesson.slug / f"{lesson.slug}.ipynb"
            src.parent.mkdir(parents=True, exist_ok=True)
            if not src.exists() or src.read_bytes() != lesson.solution.read_bytes():
                shutil.copyfile(lesson.solution, src)
                result = self.nbgrader("generate_assignment", lesson.slug, "--force", timeout=300)
                if result.returncode != 0:
                    raise CourseError(f"{lesson.slug}: nbgrader generate_assignment failed: "
                                      f"{_last_error(result.stdout)}")

    def released(self, lesson: Lesson) -> Path:
        return self.root / "release" / lesson.slug / f"{lesson.slug}.ipynb"

    # -- grading -------------------------------------------------------------------------------
    def submit(self, student: str, lesson: Lesson, nb: nbformat.NotebookNode) -> None:
        folder = self.root / "submitted" / student / lesson.slug
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        nbformat.write(nb, folder / f"{lesson.slug}.ipynb")
        (folder / "timestamp.txt").write_text(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))

    def autograde(self, student: str, lesson: Lesson) -> str:
        """Autograde one submission; returns "" on success or a one-line reason."""
        result = self.nbgrader("autograde", lesson.slug, "--student", student, "--force",
                               timeout=self.notebook_timeout)
        if result.returncode == -9:
            return f"grading took longer than {self.notebook_timeout} s and was stopped"
        if result.returncode != 0:
            return f"autograde failed: {_last_error(result.stdout)}"
        return ""

    def feedback(self, student: str, lesson: Lesson) -> Path | None:
        self.nbgrader("generate_feedback", lesson.slug, "--student", student, "--force",
                      timeout=300)
        html = self.root / "feedback" / student / lesson.slug / f"{lesson.slug}.html"
        return html if html.exists() else None

    def scores(self, student: str, lesson: Lesson) -> dict | None:
        """``{"score", "max_score", "cells": {grade_id: (score, max)}}`` or None if not graded."""
        from nbgrader.api import Gradebook, MissingEntry

        with Gradebook(f"sqlite:///{self.root / 'gradebook.db'}") as gb:
            try:
                nb = gb.find_submission_notebook(lesson.slug, lesson.slug, student)
            except MissingEntry:
                return None
            cells = {g.name: (float(g.score), float(g.max_score)) for g in nb.grades
                     if g.max_score > 0}
            return {"score": float(nb.score), "max_score": float(nb.max_score), "cells": cells,
                    "needs_manual_grade": bool(nb.needs_manual_grade)}


def _last_error(log: str) -> str:
    """The most informative line of an nbgrader log."""
    lines = [l.strip() for l in log.splitlines() if l.strip()]
    for line in reversed(lines):
        if "ERROR" in line or "Error" in line:
            return line[:300]
    return (lines[-1] if lines else "no output")[:300]
