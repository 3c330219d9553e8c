"""A headless nbgrader course directory, built in a work folder (never in the repo).

Layout (nbgrader's own): ``source/``, ``release/``, ``submitted/``, ``autograded/``, ``feedback/``
and ``gradebook.db`` (SQLite) under one root, with an ``nbgrader_config.py`` written here.

Every submission is treated as hostile. :meth:`Course.grade_private` never runs student code in this
course directory, and no two submissions share anything: each process a submission runs is
started in its own fresh folder under :mod:`grader.sandbox` (limits, and where bubblewrap works an
unprivileged user in its own namespaces, ``/`` read-only, its own empty HOME, TMPDIR,
IPython/Jupyter folders and ``/tmp``, the model read-only and checksum-verified, of the repository
only what the release ships). Two things run per submission, side by side:

1. ``nbgrader autograde`` in the sandbox (cells restored from the gradebook by checksum, per-cell
   timeout, output capped): the executed notebook for the feedback, and a ceiling on the scores.
   Its gradebook and notebook are read back as data (never through a link it made), then its
   folder is deleted: nothing it wrote reaches a later process;
2. the **trusted judge** (:mod:`grader.judge`): a process of this grader, where no student code
   runs, executes every test cell; each call of a student's function runs in a sandboxed worker
   that returns only data. The judge decides the marks.

Only the parent process (this one) writes the class gradebook, after both have finished: a cell
scores its points only if the judge passed it and nbgrader did not fail it. The grader's own
nbgrader runs (``generate_assignment`` on the lesson's source) get a private, empty HOME too, and
feedback pages are written by :mod:`grader.feedback` from data, never by nbgrader.
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
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from . import sandbox, verify
from .lessons import CourseError, Lesson
from .notebooks import nbgrader_meta, read_notebook
from .run import notebook_env

from brewslm_helpers.paths import cache_dir

# what a submission's sandbox sees of the repository (read-only): what the release ships
RELEASED = ["brewslm_helpers", "grader", "notebooks", "pyproject.toml", "README.md"]
# variables that point a process at configuration or state outside its own private folders
# (PYTHONPATH is kept: it is the instructor's, like the venv, and the sandbox sees it read-only)
_PRIVATE_VARS = ("HOME", "TMPDIR", "TMP", "TEMP", "PYTHONSTARTUP", "PYTHONHOME",
                 "PYTHONUSERBASE", "PYTHONSAFEPATH", "MPLCONFIGDIR", "HF_HOME", "BREWSLM_CACHE",
                 "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR",
                 "XDG_CONFIG_DIRS", "XDG_DATA_DIRS", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def private_env(base: dict[str, str], home: Path, tmp: str) -> dict[str, str]:
    """``base`` with every HOME-derived and configuration-path variable replaced by folders under
    ``home`` (created empty): nothing is read from a place another process could have written."""
    env = {k: v for k, v in base.items() if k not in _PRIVATE_VARS
           and not k.startswith(("JUPYTER", "IPYTHON", "NBGRADER", "PYTHONBREAKPOINT"))}
    home = Path(home)
    dirs = {"HOME": home, "IPYTHONDIR": home / ".ipython",
            "JUPYTER_CONFIG_DIR": home / ".jupyter", "JUPYTER_DATA_DIR": home / ".local/share/jupyter",
            "JUPYTER_RUNTIME_DIR": home / ".local/share/jupyter/runtime",
            "XDG_CONFIG_HOME": home / ".config", "XDG_DATA_HOME": home / ".local/share",
            "XDG_CACHE_HOME": home / ".cache", "MPLCONFIGDIR": home / ".config/matplotlib",
            "HF_HOME": home / ".cache/huggingface", "BREWSLM_CACHE": home / ".cache/brewslm"}
    for key, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        env[key] = str(path)
    env.update(TMPDIR=tmp, PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def safe_read(root: Path, relpath: str, max_bytes: int) -> bytes:
    """Read ``root/relpath`` without following any link in ``relpath`` (each folder is opened
    relative to the last with ``O_NOFOLLOW``): a file a sandbox wrote, never what it points at."""
    parts = [p for p in relpath.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise OSError("bad path")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        ffd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)
    with os.fdopen(ffd, "rb") as f:
        import stat

        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            raise OSError("not a regular file of a sane size")
        return f.read(max_bytes + 1)[:max_bytes]


def defined_names(source: str) -> tuple[list[str], list[str]]:
    """``(functions and classes, other names)`` a (solution) exercise cell defines at top level."""
    import ast

    try:
        tree = ast.parse(verify.definitions_only(source))
    except SyntaxError:
        return [], []
    funcs, values = [], []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            funcs.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                values += [n.id for n in ast.walk(t) if isinstance(n, ast.Name)]
    funcs = [f for f in funcs if not f.startswith("_")]
    return funcs, [v for v in dict.fromkeys(values) if v not in funcs and not v.startswith("_")]


def _stat_manifest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.is_dir() else {}


def _hash_manifest(folder: Path) -> dict:
    import hashlib

    out = {}
    for p in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            out[str(p.relative_to(folder))] = h.hexdigest()
    return out

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
    phases: dict = field(default_factory=dict)        # "autograde"/"judge" -> seconds
    messages: dict = field(default_factory=dict)      # grade_id -> the judge's message ("" = pass)


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
        self.recheck = recheck  # phase 2 (the judge); off only to compare with plain nbgrader
        self.hide = [Path(p).resolve() for p in (hide or [])]  # more folders a submission must not see
        self.threads = threads  # math-library threads per graded kernel (None: the library default)
        self._template: dict[str, bytes] = {}   # lesson slug -> empty gradebook (assignment only)
        self._sources: dict[str, nbformat.NotebookNode] = {}  # lesson slug -> source notebook
        self.last_outcome: dict[tuple[str, str], Outcome] = {}
        # the grader's own nbgrader runs get an empty HOME of their own, never a shared one
        self._grader_home = Path(tempfile.mkdtemp(prefix="brewslm-grader-home-"))
        self._model_manifest: dict | None = None
        weakref.finalize(self, shutil.rmtree, str(self._grader_home), True)
        # (student, slug) -> (submission bytes, executed notebook bytes, outcome): the feedback
        self._feedback_data: dict[tuple[str, str], tuple] = {}
        self.engine = None  # grader.distributed.DaskEngine: grade on Dask workers instead of here
        self._judges: dict[str, list] = {}  # lesson slug -> idle judge processes (judge_pool)
        self._judges_lock = threading.Lock()
        self._judge_count = 0
        weakref.finalize(self, _close_all, self._judges)
        self._model_stat: dict | None = None

    # -- plumbing -----------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """The environment of the grader's own nbgrader runs: its private, empty HOME and
        IPython/Jupyter folders (a file a submission planted in some HOME is never read)."""
        env = private_env(dict(os.environ), self._grader_home, tempfile.gettempdir())
        env.update(notebook_env(self.budget))
        env["BREWSLM_CACHE"] = str(cache_dir())  # the grader's own: the model is converted there
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        return env

    def nbgrader(self, *args: str, timeout: int | None = None) -> subprocess.CompletedProcess:
        """Run ``nbgrader ARGS`` in the course root; on time-out the whole process group is killed.
        Only on the lesson's own notebooks: never on a submission (that runs in the sandbox)."""
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
    def kernel_env(self, home: Path, tmp: str) -> dict[str, str]:
        """A sandboxed process's environment: its own HOME (with the course cache inside: the
        model bound read-only, no artefacts), TMPDIR, IPython and Jupyter folders."""
        env = private_env(dict(os.environ), home, tmp)
        env.update(notebook_env(self.budget))
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env["BREWSLM_SANDBOX"] = "1"
        fonts = self._font_cache()
        if fonts is not None:  # matplotlib's font list, built once here, not in every fresh HOME
            shutil.copyfile(fonts, Path(env["MPLCONFIGDIR"]) / fonts.name)
        if self.threads:  # kernels graded side by side must not each spin a thread per core
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env.setdefault(var, str(self.threads))
        return env

    def _font_cache(self) -> Path | None:
        folder = self._grader_home / "mpl"
        with self._judges_lock:
            if folder.exists():
                found = sorted(folder.glob("fontlist-*.json"))
                return found[0] if found else None
            folder.mkdir()
            subprocess.run([sys.executable, "-c", "import matplotlib.font_manager"],
                           env={**self.env(), "MPLCONFIGDIR": str(folder)}, capture_output=True,
                           timeout=300)
            found = sorted(folder.glob("fontlist-*.json"))
        return found[0] if found else None

    def source(self, lesson: Lesson) -> nbformat.NotebookNode:
        if lesson.slug not in self._sources:
            self._sources[lesson.slug] = read_notebook(self.root / "source" / lesson.slug
                                                       / f"{lesson.slug}.ipynb")
        return self._sources[lesson.slug]

    def limits(self, wall_s: float) -> sandbox.Limits:
        from brewslm_helpers.paths import REPO_ROOT

        return sandbox.Limits(wall_s=wall_s, memory_bytes=self.memory_bytes,
                              cpu_s=int(max(wall_s, 60) * 4),
                              readonly=(str(REPO_ROOT), str(self._model_dir())))

    def spec(self) -> dict:
        """This course's grading settings (what a Dask worker needs to grade as it would)."""
        return {"budget": self.budget, "cell_timeout": self.cell_timeout,
                "notebook_timeout": self.notebook_timeout, "memory_bytes": self.memory_bytes,
                "max_output_bytes": self.max_output_bytes, "recheck": self.recheck,
                "threads": self.threads}

    def grade_private(self, student: str, lesson: Lesson, notebook: bytes) -> Outcome:
        """Grade one notebook (its bytes) in private working folders; touches nothing of this
        course but the copy of its graded notebook kept for the feedback. With an ``engine``
        (:class:`grader.distributed.DaskEngine`) the grading runs on a Dask worker."""
        if self.engine is not None:
            outcome, graded = self.engine.grade(student, lesson, notebook)
            self._keep_graded_notebook(graded, student, lesson.slug)
            self._feedback_data[(student, lesson.slug)] = (
                self._known_cells_only(lesson, notebook), graded, outcome)
            return outcome
        start = time.perf_counter()
        self._verify_model()
        work = Path(tempfile.mkdtemp(prefix="brewslm-grade-"))  # 0700, this process's
        try:
            outcome = self._grade_in(work, student, lesson, notebook)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        outcome.seconds = time.perf_counter() - start
        return outcome

    def _box(self, folder: Path) -> tuple[sandbox.View, dict[str, str]]:
        """A fresh sandbox folder: the view a process started there gets, and its environment."""
        home = folder / "home"
        cache = home / ".cache" / "brewslm"
        (cache / "models").mkdir(parents=True)
        bwrap = sandbox.bwrap() is not None
        if not bwrap:  # no bind mounts: the model through a link (read-only where namespaces work)
            (cache / "models").rmdir()
            (cache / "models").symlink_to(self._model_dir())
        view = sandbox.View(work=folder, hide=self._hidden(), expose=self._exposed(cache),
                            mask=self._masked())
        tmp = "/tmp" if bwrap else str(folder / "tmp")
        if not bwrap:
            (folder / "tmp").mkdir()
        return view, self.kernel_env(home, tmp)

    def _grade_in(self, work: Path, student: str, lesson: Lesson, notebook: bytes) -> Outcome:
        slug = lesson.slug
        box1 = work / "phase1"
        priv = box1 / "course"
        folder = priv / "submitted" / student / slug
        folder.mkdir(parents=True)
        (priv / "source" / slug).mkdir(parents=True)  # no source notebook here: nothing to read
        submission = self._known_cells_only(lesson, notebook)
        (folder / f"{slug}.ipynb").write_bytes(submission)
        timestamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        (folder / "timestamp.txt").write_text(timestamp)
        (priv / "nbgrader_config.py").write_text(PRIVATE_CONFIG.format(
            root=str(priv), course_id=COURSE_ID, cell_timeout=self.cell_timeout,
            ignored=IGNORED_STDERR, max_output_bytes=self.max_output_bytes))
        template = self._template.get(slug)
        if template is None:
            self._template[slug] = template = self._empty_gradebook()
        (priv / "gradebook.db").write_bytes(template)
        parent = work / "parent"  # this process's only: no sandbox sees it
        parent.mkdir()
        # the judge (the marks) needs only the submission: it runs while phase 1 runs
        judged: dict = {}

        def judge():
            t0 = time.perf_counter()
            try:
                judged["verdicts"] = self._judge(work, lesson, submission)
            except Exception as e:  # a bug of ours: every cell fails with the reason
                judged["error"] = f"the judge failed: {type(e).__name__}: {e}"[:300]
            judged["seconds"] = round(time.perf_counter() - t0, 1)

        thread = threading.Thread(target=judge, daemon=True) if self.recheck else None
        if thread is not None:
            thread.start()
        try:
            return self._phase1_then_merge(work, student, lesson, submission, timestamp, judged,
                                           thread)
        finally:
            if thread is not None:
                thread.join()

    def _phase1_then_merge(self, work: Path, student: str, lesson: Lesson, submission: bytes,
                           timestamp: str, judged: dict, thread) -> Outcome:
        slug = lesson.slug
        box1, parent = work / "phase1", work / "parent"
        priv = box1 / "course"

        # phase 1: nbgrader autograde in the sandbox (for the feedback; its scores are a ceiling)
        view, env = self._box(box1)
        run = sandbox.run_limited([_bin("nbgrader"), "autograde", slug, "--student", student,
                                   "--force"], cwd=priv, env=env,
                                  limits=self.limits(self.notebook_timeout), hide=view.hide,
                                  view=view, log_path=parent / "phase1.log")
        phases = {"autograde": round(run.seconds, 1)}
        reason = _phase1_reason(run, self.notebook_timeout, self.memory_bytes)
        if reason:
            return Outcome(reason=reason, phases=phases)
        # what phase 1 wrote is read as data, never by following a link the submission made
        db = parent / "gradebook.db"
        graded = None
        try:
            db.write_bytes(safe_read(box1, f"course/gradebook.db", 256 * 2 ** 20))
            phase1, comments = _read_private_scores(db, slug, student)
        except Exception as e:  # a gradebook the submission damaged or replaced
            return Outcome(reason=f"the grading copy's gradebook is unreadable ({type(e).__name__})",
                           phases=phases)
        if phase1 is None:
            return Outcome(reason=f"autograde failed: {_last_error(run.output)}", phases=phases)
        try:
            graded = safe_read(box1, f"course/autograded/{student}/{slug}/{slug}.ipynb",
                               50_000_000)
        except OSError:
            graded = None
        shutil.rmtree(box1, ignore_errors=True)  # nothing of phase 1 reaches a later process

        # trusted: points and test sources from the source notebook this process holds
        source = self.source(lesson)
        points = {m["grade_id"]: float(m.get("points", 0)) for c in source.cells
                  if (m := nbgrader_meta(c)).get("grade") and not m.get("solution")}
        failures = {g: "fails (see the feedback)" for g in points if phase1.get(g, 0.0) <= 0}
        messages: dict[str, str] = {}
        if thread is not None:
            thread.join()
            phases["judge"] = judged.get("seconds", 0.0)
            verdicts = judged.get("verdicts") or {
                g: {"passed": False, "message": judged.get("error", "not judged")} for g in points}
            for g in points:
                v = verdicts.get(g) or {"passed": False, "message": "not judged"}
                messages[g] = v["message"]
                if not v["passed"]:
                    failures[g] = v["message"] or "fails"
        cells = {g: ((min(phase1.get(g, 0.0), p) if g not in failures else 0.0), p)
                 for g, p in points.items()}
        self._keep_graded_notebook(graded, student, slug)
        outcome = Outcome(cells=cells, failures=failures, comments=comments, timestamp=timestamp,
                          phases=phases, messages=messages)
        self._feedback_data[(student, slug)] = (submission, graded, outcome)
        return outcome

    def _judge(self, work: Path, lesson: Lesson, submission: bytes) -> dict[str, dict]:
        """Phase 2, the marks: the trusted judge (grader.judge) runs every test cell, calling the
        student's functions in a sandboxed worker. ``{test_id: {"passed", "message"}}``.

        The judge is a process of this grader with its own empty HOME; one is kept per lesson and
        grading thread (its setup runs once), and each job starts from the state its setup left."""
        job = self.judge_job(lesson, submission)
        box = work / "worker"
        box.mkdir()
        view, env = self._box(box)
        scratch = work / "scratch"  # the test's temporary files, which the student's code may write
        scratch.mkdir()
        view.shared.append(scratch)
        limits = self.limits(self.notebook_timeout)
        job.update(cell_timeout=self.cell_timeout, ready_timeout=self.notebook_timeout,
                   scratch=str(scratch),
                   worker={"argv": sandbox.command([sys.executable, "-m", "grader.judge", "worker"],
                                                   limits, hide=view.hide, view=view, stdio=True),
                           "env": env, "cwd": str(box), "log": str(work / "parent" / "worker.log")})
        failed = lambda why: {g: {"passed": False, "message": why[:300]}  # noqa: E731
                              for g in job["test_ids"]}
        judge = self._take_judge(lesson, job)
        if isinstance(judge, str):
            return failed(judge)
        try:
            data = judge.run(job, timeout=self.notebook_timeout * 2 + 120)
        except Exception as e:  # died or hung: never reused
            judge.close()
            return failed(f"the judge failed ({type(e).__name__}: {e})")
        with self._judges_lock:
            self._judges.setdefault(lesson.slug, []).append(judge)
        if data.get("fatal"):
            return failed(str(data["fatal"]))
        verdicts = data.get("verdicts") or {}
        return {g: verdicts.get(g) or {"passed": False, "message": "not judged"}
                for g in job["test_ids"]}

    def _take_judge(self, lesson: Lesson, job: dict):
        """A ready judge for ``lesson`` (from the pool, or started), or the reason there is none."""
        from .judge_pool import JudgeProcess

        with self._judges_lock:
            pool = self._judges.setdefault(lesson.slug, [])
            if pool:
                return pool.pop()
            self._judge_count += 1
            home = self._grader_home / f"judge-{self._judge_count}"
        (home / "tmp").mkdir(parents=True)
        env = self.kernel_env(home / "home", str(home / "tmp"))  # makes HOME and the cache
        env.pop("BREWSLM_SANDBOX", None)
        (Path(env["BREWSLM_CACHE"]) / "models").symlink_to(self._model_dir())
        try:
            return JudgeProcess(home, env, job["params"], job["setup"],
                                ready_timeout=self.notebook_timeout + 120)
        except Exception as e:
            return f"the judge could not start ({type(e).__name__}: {e})"

    def close(self) -> None:
        """Stop the judges this course keeps."""
        with self._judges_lock:
            judges = [j for pool in self._judges.values() for j in pool]
            self._judges.clear()
        for j in judges:
            j.close()

    def judge_job(self, lesson: Lesson, submission: bytes) -> dict:
        """What the judge needs: the lesson's own cells (from the source this process holds), the
        names each exercise defines in the solution, and the student's exercise code."""
        return judge_job(self.source(lesson), submission)

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
        """What a submission must not see: this course, the repository (bound back in part by
        :meth:`_exposed`), the grader's HOME and cache, the class and output folders."""
        from .lessons import SOLUTIONS

        from brewslm_helpers.paths import REPO_ROOT, cache_dir

        tmp = Path(tempfile.gettempdir()).resolve()
        paths = [Path.home(), cache_dir(), REPO_ROOT, self.root, SOLUTIONS, cache_dir() / "runs",
                 *self.hide]
        if sandbox.bwrap() is None:  # the namespace fallback hides folders, it binds none back
            paths = [self.root, SOLUTIONS, REPO_ROOT / ".git", REPO_ROOT / "tests",
                     REPO_ROOT / "grader" / "mistakes", cache_dir() / "runs",
                     cache_dir() / "artifacts", *self.hide]
        # never hide the folder the private working copies live in
        return [p.resolve() for p in paths if not (tmp == p.resolve() or p.resolve() in tmp.parents)]

    def _exposed(self, cache: Path) -> list:
        """Read-only, after hiding: the environment, what the release needs of the repository, and
        the model (checksum-verified) at the private cache's models folder."""
        from brewslm_helpers.paths import REPO_ROOT

        keep = [Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()]
        keep += [REPO_ROOT / n for n in RELEASED]
        keep += sorted(REPO_ROOT.glob("*.egg-info"))
        return [*keep, (self._model_dir(), cache / "models")]

    def _masked(self) -> list[Path]:
        """Hidden again inside what :meth:`_exposed` bound: the known mistakes."""
        from brewslm_helpers.paths import REPO_ROOT

        return [REPO_ROOT / "grader" / "mistakes"]

    def _model_dir(self) -> Path:
        from brewslm_helpers.paths import cache_dir

        return (cache_dir() / "models").resolve()

    def _verify_model(self) -> None:
        """The model files are the ones set-up hashed (re-hashed only if their size or time
        changed); a changed model stops the grading instead of grading a class with it."""
        now = _stat_manifest(self._model_dir())
        if self._model_manifest is None or now != self._model_stat:
            digests = _hash_manifest(self._model_dir())
            if self._model_manifest is None:
                self._model_manifest = digests
            elif digests != self._model_manifest:
                raise CourseError("the cached model changed while grading (checksum mismatch): "
                                  "delete $BREWSLM_CACHE/models and run `brewslm doctor`")
            self._model_stat = now

    def adopt(self, student: str, lesson: Lesson, notebook: bytes, graded: bytes | None,
              outcome: Outcome) -> None:
        """Take ``outcome`` (and its executed notebook) for ``student``'s ``notebook`` without
        grading it: the same bytes were graded already (the lesson's own solution, by the
        environment check), and grading depends only on the bytes and the lesson."""
        self._keep_graded_notebook(graded, student, lesson.slug)
        self._feedback_data[(student, lesson.slug)] = (self._known_cells_only(lesson, notebook),
                                                       graded, outcome)

    def _keep_graded_notebook(self, graded: bytes | None, student: str, slug: str) -> None:
        """Keep the executed notebook (its bytes, read without following links) in the course,
        for the feedback, if it is a sane notebook."""
        dest = self.root / "autograded" / student / slug / f"{slug}.ipynb"
        if dest.parent.exists():
            shutil.rmtree(dest.parent)
        try:
            if graded:
                nb = nbformat.reads(graded.decode("utf-8"), as_version=4)
                dest.parent.mkdir(parents=True, exist_ok=True)
                nbformat.write(nb, dest)
        except Exception:
            pass

    def record(self, student: str, lesson: Lesson, outcome: Outcome) -> None:
        """Write one submission's final scores into the class gradebook (this process only)."""
        from nbgrader.api import Gradebook

        import warnings

        slug = lesson.slug
        if (student, slug) not in self._feedback_data:  # a copy of a file graded for another
            twin = next((v for v in list(self._feedback_data.values()) if v[2] is outcome), None)
            if twin is not None:
                self._feedback_data[(student, slug)] = twin
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
        dest = self.root / "feedback" / student / lesson.slug / f"{lesson.slug}.html"
        return dest if self.write_feedback(student, lesson.slug, dest) else None

    def write_feedback(self, student: str, slug: str, dest: Path) -> bool:
        """Write one graded submission's feedback page (:mod:`grader.feedback`: built here from
        data, sanitised, without hidden tests; nbgrader never runs on a submission out here)."""
        from . import feedback
        from .lessons import Lesson as _Lesson

        data = self._feedback_data.get((student, slug))
        if data is None:
            return False
        submission, graded, outcome = data
        try:
            student_nb = nbformat.reads(submission.decode("utf-8"), as_version=4)
        except Exception:
            student_nb = None
        try:
            graded_nb = nbformat.reads(graded.decode("utf-8"), as_version=4) if graded else None
        except Exception:
            graded_nb = None
        release = read_notebook(self.released(_Lesson(slug)))
        score = sum(s for s, _ in outcome.cells.values())
        top = sum(m for _, m in outcome.cells.values())
        text = feedback.page(f"{slug} - feedback for {student}", release, student_nb, graded_nb,
                             outcome.cells, outcome.messages, score, top)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        return True

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


def _close_all(judges: dict) -> None:
    for pool in list(judges.values()):
        for j in pool:
            j.close()


def judge_job(source: nbformat.NotebookNode, submission: bytes) -> dict:
    """The judge's job for ``submission`` (notebook bytes) of the lesson whose source notebook is
    ``source``: its parameters and setup cells, the names each exercise defines in the solution,
    the student's exercise code (definitions only) and the test cells."""
    student = _student_code(submission)
    params = next((c.source for c in source.cells
                   if "parameters" in c.get("metadata", {}).get("tags", [])), "")
    setup, exercises, functions, values, tests = "", [], [], [], []
    for cell in source.cells:
        meta = nbgrader_meta(cell)
        if meta.get("grade_id") == "setup":
            setup = cell.source
        elif meta.get("solution") and cell.cell_type == "code":
            exercises.append(verify.definitions_only(student.get(meta["grade_id"], "")))
            f, v = defined_names(cell.source)
            functions += f
            values += v
        elif meta.get("grade") and not meta.get("solution"):
            tests.append({"id": meta["grade_id"], "source": cell.source})
    return {"params": params, "setup": setup, "exercises": exercises, "functions": functions,
            "values": values, "tests": tests, "test_ids": [t["id"] for t in tests]}


def _student_code(notebook: bytes) -> dict[str, str]:
    """``{grade_id: source}`` of a submission's code cells (the first of each id; {} if unreadable)."""
    code: dict[str, str] = {}
    try:
        for cell in nbformat.reads(notebook.decode("utf-8"), as_version=4).cells:
            gid = nbgrader_meta(cell).get("grade_id")
            if gid and cell.get("cell_type") == "code" and gid not in code:
                code[gid] = cell.get("source", "")
    except Exception:
        return {}
    return code


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
