"""A headless nbgrader course directory, built in a work folder (never in the repo).

Layout (nbgrader's own): ``source/``, ``release/``, ``submitted/``, ``autograded/``, ``feedback/``
and ``gradebook.db`` (SQLite) under one root, with an ``nbgrader_config.py`` written here.

Every submission is treated as hostile. :meth:`Course.autograde` never runs student code in this
course directory: it grades in a private working copy (its own temp folder, its own copy of the
empty gradebook, no source notebooks) under :mod:`grader.sandbox` limits (memory, CPU, file size,
wall clock, process-group kill, orphan reaping, and where the OS allows, a mount namespace that
hides the course, the solutions and the other submissions), in two phases:

1. ``nbgrader autograde`` (cells restored from the gradebook by checksum, per-cell timeout, output
   capped while it runs by :class:`grader.nbexec.LimitedExecute`, ``LimitOutput`` after);
2. :mod:`grader.verify`: every test cell that passed is re-run in a fresh kernel holding only the
   lesson's setup, the student's definitions and the restored test, behind an integrity check.

Only the parent process (this one) writes the class gradebook, after reading the child's result:
a cell scores its points only if it passed both phases.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from . import sandbox, verify
from .lessons import CourseError, Lesson
from .notebooks import nbgrader_meta, read_notebook
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

# the private working copy's config: nbgrader's autograde pipeline with the output-capped Execute
PRIVATE_CONFIG = CONFIG + """\
from nbconvert.preprocessors import ClearMetadataPreprocessor
from nbgrader.preprocessors import (AssignLatePenalties, CheckCellMetadata, IgnorePattern,
                                    LimitOutput, SaveAutoGrades)
from grader.nbexec import LimitedExecute
c.Autograde.autograde_preprocessors = [LimitedExecute, IgnorePattern, ClearMetadataPreprocessor,
                                       LimitOutput, SaveAutoGrades, AssignLatePenalties,
                                       CheckCellMetadata]
c.LimitedExecute.max_output_bytes = {max_output_bytes}
c.Autograde.create_student = True
"""

_MERGE_LOCK = threading.Lock()  # one writer of a class gradebook at a time (grading threads)


@dataclass
class Outcome:
    """What grading one submission in its private copy produced (read by the parent)."""
    reason: str = ""                                  # "" = graded
    cells: dict = field(default_factory=dict)         # grade_id -> (score, max), final
    failures: dict = field(default_factory=dict)      # grade_id -> one-line reason for 0 points
    comments: dict = field(default_factory=dict)      # solution grade_id -> nbgrader auto comment
    timestamp: object = None
    seconds: float = 0.0
    phases: dict = field(default_factory=dict)        # "autograde"/"recheck" -> seconds


def _bin(name: str) -> str:
    """A console script of this environment (nbgrader calls ``alembic``, so PATH must have it too)."""
    return str(Path(sys.executable).parent / name)


class Course:
    """One nbgrader course directory for a set of lessons."""

    def __init__(self, root: Path, budget: str = "ci", cell_timeout: int = 300,
                 notebook_timeout: int = 900, memory_bytes: int = 8 * sandbox.GiB,
                 max_output_bytes: int = 1_000_000, recheck: bool = True,
                 hide: list[Path] | None = None, threads: int | None = None):
        self.root = Path(root).resolve()
        self.budget = budget
        self.cell_timeout = cell_timeout
        self.notebook_timeout = notebook_timeout
        self.memory_bytes = memory_bytes
        self.max_output_bytes = max_output_bytes
        self.recheck = recheck  # phase 2 (grader.verify); off only to compare with plain nbgrader
        self.hide = [Path(p).resolve() for p in (hide or [])]  # more folders a submission must not see
        self.threads = threads  # math-library threads per graded kernel (None: the library default)
        self._template: dict[str, bytes] = {}   # lesson slug -> empty gradebook (assignment only)
        self._sources: dict[str, nbformat.NotebookNode] = {}  # lesson slug -> source notebook
        self.last_outcome: dict[tuple[str, str], Outcome] = {}

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
        # the model's first-load conversion (~540 MB of safetensors) happens here, in this process:
        # a graded kernel may not write a file that large, and every submission would redo it
        from brewslm_helpers import models

        try:
            models.teacher_dir()
        except models.ModelNotFound as e:
            raise CourseError(str(e)) from None
        # kept in memory: nothing a submission writes on disk can change what later ones are graded by
        for lesson in lessons:
            self._sources[lesson.slug] = read_notebook(self.root / "source" / lesson.slug
                                                       / f"{lesson.slug}.ipynb")
        self._template = {l.slug: self._empty_gradebook() for l in lessons}

    def _empty_gradebook(self) -> bytes:
        """The class gradebook with the assignments and none of the students."""
        from nbgrader.api import Gradebook

        with tempfile.TemporaryDirectory(prefix="brewslm-template-") as tmp:
            db = Path(tmp) / "gradebook.db"
            shutil.copyfile(self.root / "gradebook.db", db)
            with Gradebook(f"sqlite:///{db}") as gb:
                for student in list(gb.students):
                    gb.remove_student(student.id)
            return db.read_bytes()

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
        path = self.root / "submitted" / student / lesson.slug / f"{lesson.slug}.ipynb"
        outcome = self.grade_private(student, lesson, path.read_bytes())
        self.last_outcome[(student, lesson.slug)] = outcome
        if not outcome.reason:
            self.record(student, lesson, outcome)
        return outcome.reason

    # -- grading in a private working copy -------------------------------------------------------
    def kernel_env(self) -> dict[str, str]:
        env = self.env()
        env["BREWSLM_SANDBOX"] = "1"
        if self.threads:  # kernels graded side by side must not each spin a thread per core
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env.setdefault(var, str(self.threads))
        return env

    def source(self, lesson: Lesson) -> nbformat.NotebookNode:
        if lesson.slug not in self._sources:
            self._sources[lesson.slug] = read_notebook(self.root / "source" / lesson.slug
                                                       / f"{lesson.slug}.ipynb")
        return self._sources[lesson.slug]

    def limits(self, wall_s: float) -> sandbox.Limits:
        from brewslm_helpers.paths import REPO_ROOT

        return sandbox.Limits(wall_s=wall_s, memory_bytes=self.memory_bytes,
                              cpu_s=int(max(wall_s, 60) * 4), readonly=(str(REPO_ROOT),))

    def grade_private(self, student: str, lesson: Lesson, notebook: bytes) -> Outcome:
        """Grade one notebook (its bytes) in a private working copy; touches nothing of this course."""
        start = time.perf_counter()
        slug = lesson.slug
        work = Path(tempfile.mkdtemp(prefix="brewslm-grade-"))
        try:
            outcome = self._grade_in(work, student, lesson, notebook)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        outcome.seconds = time.perf_counter() - start
        return outcome

    def _grade_in(self, work: Path, student: str, lesson: Lesson, notebook: bytes) -> Outcome:
        slug = lesson.slug
        priv = work / "course"
        folder = priv / "submitted" / student / slug
        folder.mkdir(parents=True)
        (priv / "source" / slug).mkdir(parents=True)  # no source notebook here: nothing to read
        (folder / f"{slug}.ipynb").write_bytes(self._known_cells_only(lesson, notebook))
        timestamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        (folder / "timestamp.txt").write_text(timestamp)
        (priv / "nbgrader_config.py").write_text(PRIVATE_CONFIG.format(
            root=str(priv), course_id=COURSE_ID, cell_timeout=self.cell_timeout,
            ignored=IGNORED_STDERR, max_output_bytes=self.max_output_bytes))
        template = self._template.get(slug)
        if template is None:
            self._template[slug] = template = self._empty_gradebook()
        (priv / "gradebook.db").write_bytes(template)

        # phase 1: nbgrader autograde, under limits
        run = sandbox.run_limited([_bin("nbgrader"), "autograde", slug, "--student", student,
                                   "--force"], cwd=priv, env=self.kernel_env(),
                                  limits=self.limits(self.notebook_timeout), hide=self._hidden(),
                                  log_path=work / "phase1.log")
        phases = {"autograde": round(run.seconds, 1)}
        reason = _phase1_reason(run, self.notebook_timeout, self.memory_bytes)
        if reason:
            return Outcome(reason=reason, phases=phases)
        graded_nb = priv / "autograded" / student / slug / f"{slug}.ipynb"
        try:
            phase1, comments = _read_private_scores(priv / "gradebook.db", slug, student)
        except Exception as e:  # a gradebook the submission damaged
            return Outcome(reason=f"the grading copy's gradebook is unreadable ({type(e).__name__})")
        if phase1 is None:
            return Outcome(reason=f"autograde failed: {_last_error(run.output)}")

        # trusted: points and test sources from the source notebook this process holds
        source = self.source(lesson)
        points = {m["grade_id"]: float(m.get("points", 0)) for c in source.cells
                  if (m := nbgrader_meta(c)).get("grade") and not m.get("solution")}
        failures = {g: "fails (see the feedback)" for g in points if phase1.get(g, 0.0) <= 0}
        passed = [g for g in points if g not in failures]
        if passed and self.recheck:
            t0 = time.perf_counter()
            verdicts = self._recheck(work, student, lesson, notebook, passed)
            phases["recheck"] = round(time.perf_counter() - t0, 1)
            failures.update({g: v for g, v in verdicts.items() if v})
        cells = {g: ((min(phase1.get(g, 0.0), p) if g not in failures else 0.0), p)
                 for g, p in points.items()}
        self._keep_graded_notebook(graded_nb, student, slug)
        return Outcome(cells=cells, failures=failures, comments=comments, timestamp=timestamp,
                       phases=phases)

    def _known_cells_only(self, lesson: Lesson, notebook: bytes) -> bytes:
        """The submission with nbgrader markup removed from cells the lesson does not have (a
        made-up test cell is then an ordinary student cell: it can neither score nor make
        nbgrader give up on the notebook). Cells the lesson has are restored by nbgrader."""
        try:
            nb = nbformat.reads(notebook.decode("utf-8"), as_version=4)
        except Exception:
            return notebook  # nbgrader reports it
        known = {m["grade_id"]: m for c in self.source(lesson).cells
                 if (m := nbgrader_meta(c)).get("grade_id")}
        changed = False
        for cell in nb.cells:
            meta = cell.get("metadata", {})
            if "nbgrader" not in meta:
                continue
            gid = nbgrader_meta(cell).get("grade_id")
            if gid not in known:
                del meta["nbgrader"]
                changed = True
                continue
            for flag in ("grade", "solution", "locked", "task", "points"):  # the lesson's own
                want = known[gid].get(flag)
                if meta["nbgrader"].get(flag) != want:
                    if want is None:
                        meta["nbgrader"].pop(flag, None)
                    else:
                        meta["nbgrader"][flag] = want
                    changed = True
        return nbformat.writes(nb).encode() if changed else notebook

    def _hidden(self) -> list[Path]:
        """Folders a submission must not see: this course, the solutions, what the caller adds."""
        from .lessons import SOLUTIONS

        from brewslm_helpers.paths import cache_dir

        tmp = Path(tempfile.gettempdir()).resolve()
        paths = [self.root, SOLUTIONS, cache_dir() / "runs", *self.hide]
        # never hide the folder the private working copies live in
        return [p for p in paths if not (tmp == p or p in tmp.parents)]

    def _recheck(self, work: Path, student: str, lesson: Lesson, notebook: bytes,
                 test_ids: list[str]) -> dict[str, str]:
        """Phase 2 (grader.verify) for the test cells that passed phase 1."""
        source = self.source(lesson)
        try:
            submitted = nbformat.reads(notebook.decode("utf-8"), as_version=4)
            student_code = {}
            for cell in submitted.cells:
                gid = nbgrader_meta(cell).get("grade_id")
                if gid and cell.get("cell_type") == "code" and gid not in student_code:
                    student_code[gid] = cell.get("source", "")
        except Exception:
            student_code = {}
        params = next((c.source for c in source.cells
                       if "parameters" in c.get("metadata", {}).get("tags", [])), "")
        setup, exercise, pairs = "", None, []
        for cell in source.cells:
            meta = nbgrader_meta(cell)
            if meta.get("grade_id") == "setup":
                setup = cell.source
            elif meta.get("solution") and cell.cell_type == "code":
                exercise = meta["grade_id"]
            elif meta.get("grade") and not meta.get("solution") and meta["grade_id"] in test_ids:
                pairs.append((meta["grade_id"], student_code.get(exercise, "") if exercise else "",
                              cell.source))
        job, expected = verify.build_job(params, setup, pairs)
        token = secrets.token_hex(16)
        box = work / "recheck"
        box.mkdir()
        job.update(token=token, cell_timeout=self.cell_timeout,
                   max_output_bytes=self.max_output_bytes, workdir=str(box))
        run = sandbox.run_limited([sys.executable, "-m", "grader.verify"], cwd=box,
                                  env=self.kernel_env(), limits=self.limits(self.notebook_timeout),
                                  stdin=json.dumps(job).encode(), hide=self._hidden(),
                                  log_path=work / "phase2.log")
        results, fatal = None, _phase1_reason(run, self.notebook_timeout, self.memory_bytes)
        for line in reversed(run.output.splitlines()):
            if token in line:
                try:
                    data = json.loads(line)
                except ValueError:
                    continue
                if data.get("token") == token:
                    results = data.get("results")
                    fatal = fatal or data.get("error", "")
                    break
        if results is None and not fatal:
            fatal = "the fresh-kernel re-check gave no result"
        return verify.interpret(results, expected, fatal and f"re-check failed: {fatal}")

    def _keep_graded_notebook(self, graded_nb: Path, student: str, slug: str) -> None:
        """Copy the executed notebook into the course (for feedback), if it is a sane notebook."""
        dest = self.root / "autograded" / student / slug / f"{slug}.ipynb"
        if dest.parent.exists():
            shutil.rmtree(dest.parent)
        try:
            if graded_nb.is_file() and graded_nb.stat().st_size < 50_000_000:
                nb = nbformat.read(graded_nb, as_version=4)
                dest.parent.mkdir(parents=True, exist_ok=True)
                nbformat.write(nb, dest)
        except Exception:
            pass

    def record(self, student: str, lesson: Lesson, outcome: Outcome) -> None:
        """Write one submission's final scores into the class gradebook (this process only)."""
        from nbgrader.api import Gradebook

        import warnings

        slug = lesson.slug
        with _MERGE_LOCK, warnings.catch_warnings(), \
                Gradebook(f"sqlite:///{self.root / 'gradebook.db'}") as gb:
            warnings.simplefilter("ignore")
            gb.update_or_create_student(student)
            gb.update_or_create_submission(slug, student)
            nb = gb.find_submission_notebook(slug, slug, student)
            for grade in nb.grades:
                if grade.name in outcome.cells:
                    grade.auto_score = outcome.cells[grade.name][0]
                    grade.manual_score = None
                    grade.needs_manual_grade = False
                else:
                    grade.auto_score, grade.needs_manual_grade = None, grade.max_score > 0
            for comment in nb.comments:
                comment.auto_comment = outcome.comments.get(comment.name)
            gb.db.commit()

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


def _phase1_reason(run: "sandbox.Completed", timeout: float, memory: int) -> str:
    """One line for a grading step that did not finish normally ("" if it did)."""
    log = run.output
    if run.timed_out:
        return f"grading took longer than {timeout:g} s and was stopped"
    if run.returncode == 0:
        return ""
    if "[sandbox] command killed by signal" in log:
        sig = log.split("[sandbox] command killed by signal", 1)[1].split()[0]
        if sig == "SIGXFSZ":
            return "wrote a file larger than the grader allows; grading stopped"
        return (f"the grading process was killed ({sig}: by the submission, or by the system "
                "for memory), so it could not be graded")
    if "SIGXFSZ" in log or "File too large" in log:
        return "wrote a file larger than the grader allows; grading stopped"
    if "MemoryError" in log or "Cannot allocate memory" in log:
        return f"ran out of memory (the limit is {memory / sandbox.GiB:g} GiB per process)"
    if "DeadKernelError" in log or "Kernel died" in log or "kernel died" in log:
        return ("the notebook's kernel died (os._exit, a killed process, a crash or the memory "
                "limit), so it could not be graded")
    if run.returncode != 0:
        return f"autograde failed: {_last_error(log)}"
    return ""


def _read_private_scores(db: Path, slug: str, student: str):
    """Phase-1 scores from a private gradebook: ``({grade_id: score}, {grade_id: comment})``."""
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(f"sqlite:///{db}") as gb:
        try:
            nb = gb.find_submission_notebook(slug, slug, student)
        except MissingEntry:
            return None, {}
        scores = {g.name: float(g.auto_score or 0.0) for g in nb.grades}
        comments = {c.name: c.auto_comment for c in nb.comments}
        return scores, comments


def _last_error(log: str) -> str:
    """The most informative line of an nbgrader log: the last exception raised, else the last
    line that says error."""
    import re

    lines = [l.strip() for l in log.splitlines() if l.strip()]
    for line in reversed(lines):
        m = re.match(r"^([\w.]*(?:Error|Exception|Exit|MissingEntry)):? (.*)", line)
        if m and "AutogradeApp" not in line:
            name = m.group(1).rsplit(".", 1)[-1]
            if name == "CellTimeoutError":
                return "a cell took longer than the per-cell time limit"
            return f"{name}: {m.group(2)}"[:300]
    for line in reversed(lines):
        if "ERROR" in line or "Error" in line:
            return line[:300]
    return (lines[-1] if lines else "no output")[:300]
