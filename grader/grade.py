"""``brewslm grade``: a folder (or LMS zip) of submissions in, a CSV gradebook and feedback out.

Accepted layouts (student ids are taken from folder or file names):

* ``SUBMISSIONS/<student>/<NN_slug>.ipynb`` (any depth below the student folder);
* an LMS zip holding either that layout or flat files named ``<student>_<anything>_<NN_slug>.ipynb``
  (Canvas-style; the student id is the part before the first underscore).

Every submission is treated as hostile. Each file is read once, into memory, before any student
code runs, and checked (a regular file, readable JSON notebook, not empty, not huge, the right
lesson). Each one is then graded in its own private working copy under limits (see
``grader/course.py``: two phases, sandboxed subprocesses), ``jobs`` at a time, with a progress bar.
Only this process writes the class gradebook, the CSV files and the feedback, after the children
have finished. A broken submission gets a zero and a one-line reason; the rest of the class is
still graded.

Re-grading is idempotent: each result is kept in ``OUT/results/`` keyed by student, lesson, the
submission's SHA-256 and a fingerprint of the lesson source, budget and grader, and only
submissions that changed are graded again.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .course import Course
from .lessons import CourseError, Lesson, all_lessons, lesson_of_filename
from .notebooks import MAX_BYTES, grade_ids, notebook_from_bytes, read_notebook

GRADER_VERSION = "3"  # part of every cached result's fingerprint: bump when grading changes
# the start of the reason given to submissions of a lesson this machine cannot run
ENVIRONMENT_FAILS = "the course environment fails lesson "
CHECK_STUDENT = "course-check"  # the name a lesson's own solution is graded under before the class


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
    too_big: list[str] = []
    if not folder.exists():
        raise CourseError(f"{folder}: no such folder or zip")
    if folder.is_file():
        if not zipfile.is_zipfile(folder):
            raise CourseError(f"{folder}: not a folder or a zip file")
        tmp = Path(tempfile.mkdtemp(prefix="brewslm-zip-"))
        try:
            with zipfile.ZipFile(folder) as z:
                for info in z.infolist():
                    target = (tmp / info.filename).resolve()
                    if not str(target).startswith(str(tmp.resolve()) + "/") or info.is_dir():
                        continue  # skip folders and path-traversal entries
                    if info.file_size > MAX_BYTES:  # a zip bomb never reaches the disk
                        too_big.append(info.filename)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(info))
        except (zipfile.BadZipFile, OSError, RuntimeError) as e:
            raise CourseError(f"{folder}: unreadable zip ({e})") from None
        folder = tmp
    subs, problems = [], []
    for name in too_big:
        problems.append(Result(_safe_id(Path(name).parts[0].split("_", 1)[0]), Path(name).name,
                               status="not graded",
                               reason=f"{Path(name).name}: over the {MAX_BYTES / 1e6:.0f} MB limit"))
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
    seen: dict[tuple[str, str], Path] = {}
    unique = []
    for sub in subs:  # two files for one student and lesson: grade the first, say so for the other
        key = (sub.student, sub.lesson.slug)
        if key in seen:
            problems.append(Result(sub.student, sub.lesson.slug, status="not graded",
                                   reason=f"{sub.path.name}: a second submission for this lesson "
                                          f"(graded: {seen[key].relative_to(folder)})"))
        else:
            seen[key] = sub.path
            unique.append(sub)
    return unique, problems


def check_submission(sub: Submission, data: bytes | None = None):
    """Read a submission (or its bytes, ``data``) and make sure it is the lesson it claims to be;
    returns the notebook.

    A lesson is recognised by its own exercise and test cell ids (``setup`` and any other id
    every lesson shares says nothing about which lesson a notebook is)."""
    nb = read_notebook(sub.path) if data is None else notebook_from_bytes(data, sub.path.name)
    ids = {l: grade_ids(read_notebook(l.solution)) for l in _lessons_for_check()}
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


def _lessons_for_check() -> list[Lesson]:
    return all_lessons()


def read_submission(path: Path) -> bytes:
    """The submitted file's bytes, read once (size and type checked before reading)."""
    path = Path(path)
    if path.is_symlink():
        raise CourseError(f"{path.name}: is a symbolic link, not a submitted file")
    if not path.is_file():
        raise CourseError(f"{path.name}: not a regular file")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise CourseError(f"{path.name}: {size / 1e6:.0f} MB is over the {MAX_BYTES / 1e6:.0f} MB limit")
    if size == 0:
        raise CourseError(f"{path.name}: empty file")
    return path.read_bytes()


def fingerprint(course: Course, lesson: Lesson) -> str:
    """What a cached result depends on besides the submission: lesson source, budget, grader."""
    h = hashlib.sha256()
    h.update(lesson.solution.read_bytes())
    h.update(f"{course.budget}|{GRADER_VERSION}|{course.cell_timeout}|{course.notebook_timeout}"
             .encode())
    return h.hexdigest()


def _cache_path(out_dir: Path, student: str, slug: str) -> Path:
    return out_dir / "results" / student / f"{slug}.json"


def _load_cached(out_dir: Path, student: str, slug: str, sha: str, fp: str) -> "Result | None":
    try:
        data = json.loads(_cache_path(out_dir, student, slug).read_text())
        if data.get("sha256") != sha or data.get("fingerprint") != fp:
            return None
        r = Result(**data["result"])
        r.cells = {k: tuple(v) for k, v in r.cells.items()}
        if r.feedback and not Path(r.feedback).exists():
            return None
        return r
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _outcome_to_json(outcome) -> dict:
    data = asdict(outcome)
    data["timestamp"] = str(outcome.timestamp) if outcome.timestamp is not None else None
    return data


def _outcome_from_json(data: dict):
    from .course import Outcome

    outcome = Outcome(**data)
    outcome.cells = {g: tuple(v) for g, v in outcome.cells.items()}
    return outcome


@dataclass
class LessonCheck:
    """A lesson's own solution, graded on this machine before its class is."""
    lesson: Lesson
    sha256: str                 # of the solution submission (a student's identical file reuses it)
    problem: str = ""           # "" when the solution gets full marks here
    outcome: object = None      # its grading Outcome (None when it could not be graded)
    graded_notebook: Path | None = None  # the executed copy, for feedback
    kept: bool = False          # the verdict of an earlier run on this machine and set-up


def check_lessons(course: Course, lessons: list[Lesson], jobs: int = 1, progress=print,
                  setup_problem: str = "") -> dict[str, LessonCheck]:
    """Grade each lesson's own solution through the same pipeline as the class.

    A course environment that cannot run a lesson (a llama.cpp build that crashes, a missing
    model) must never become students' zeros: a lesson whose solution does not get full marks here
    is not graded. The verdict is cached under a fingerprint of the environment (``grader.doctor``),
    the lesson source, the budget and the grader, so a second run costs nothing.
    """
    from . import doctor
    from .notebooks import make_submission

    env = doctor.fingerprint()
    folder = _check_folder()
    checks, todo = {}, []
    for lesson in lessons:
        data = nbformat_bytes(make_submission(lesson))
        sha = hashlib.sha256(data).hexdigest()
        key = hashlib.sha256(f"{env}|{fingerprint(course, lesson)}|{sha}".encode()).hexdigest()
        check = LessonCheck(lesson, sha)
        checks[lesson.slug] = check
        memo, nb = folder / f"{lesson.slug}.json", folder / f"{lesson.slug}.ipynb"
        try:
            saved = json.loads(memo.read_text())
            if saved["key"] == key and nb.is_file():
                check.outcome = _outcome_from_json(saved["outcome"])
                check.graded_notebook = nb
                check.kept = True
                continue
        except (OSError, ValueError, TypeError, KeyError):
            pass
        todo.append((check, data, key, memo, nb))
    if todo:
        progress(f"checking the course environment: grading the solution of "
                 f"{', '.join(c.lesson.slug for c, *_ in todo)} (once per machine and set-up)")
    if len(todo) < len(checks):
        progress(f"solutions already checked on this machine and set-up: "
                 f"{', '.join(sorted(set(checks) - {c.lesson.slug for c, *_ in todo}))}")

    def run(item):
        check, data, key, memo, nb = item
        outcome = course.grade_private(CHECK_STUDENT, check.lesson, data)
        check.outcome = outcome
        graded = course.root / "autograded" / CHECK_STUDENT / check.lesson.slug \
            / f"{check.lesson.slug}.ipynb"
        full = not outcome.reason and outcome.cells and all(
            s == m for s, m in outcome.cells.values())
        if full and graded.is_file():  # only a clean pass is remembered
            shutil.copyfile(graded, nb)
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "outcome": _outcome_to_json(outcome)}))
            os.replace(tmp, memo)
            check.graded_notebook = nb
        elif graded.is_file():
            check.graded_notebook = graded
        check.problem = _check_problem(outcome, setup_problem)
        progress(check_line(check))  # as each finishes: a lesson's check can take minutes
        return check

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(run, todo))
    for check in checks.values():
        if check.kept:
            check.problem = _check_problem(check.outcome, setup_problem)
    return checks


def _check_problem(o, setup_problem: str) -> str:
    """Why a lesson's solution, graded here with outcome ``o``, shows this environment cannot
    grade the lesson ("" when it got full marks)."""
    problem = ""
    if o.reason:
        problem = o.reason
    elif not o.cells or any(s != m for s, m in o.cells.values()):
        lost = [g for g, (s, m) in sorted(o.cells.items()) if s != m]
        why = "; ".join(f"{g}: {o.failures.get(g, 'fails')}" for g in lost)
        got = sum(s for s, _ in o.cells.values())
        problem = f"it scores {got:g}/{sum(m for _, m in o.cells.values()):g} here, {why}"[:300]
    if problem and setup_problem:
        problem += f"; {setup_problem}"
    return problem


def check_line(check: LessonCheck) -> str:
    """One line on a lesson's environment check: its verdict and where its time went."""
    o = check.outcome
    where = ", ".join(f"{k} {v:.0f} s" for k, v in (o.phases or {}).items())
    verdict = f"NOT GRADED: {check.problem}" if check.problem else "full marks"
    return f"  {check.lesson.slug:<26} {verdict}  ({o.seconds:.0f} s: {where})"


def _check_folder() -> Path:
    from brewslm_helpers.paths import cache_dir

    folder = cache_dir() / "course-check"
    folder.mkdir(parents=True, exist_ok=True)
    return folder.resolve()


def nbformat_bytes(nb) -> bytes:
    """The bytes ``nbformat.write`` puts in a file (it ends the text with a newline), so that a
    student's file written that way is recognised as the same file."""
    import nbformat

    text = nbformat.writes(nb)
    return (text if text.endswith("\n") else text + "\n").encode()


def grade_folder(submissions: Path, out_dir: Path, budget: str = "ci", feedback: bool = True,
                 notebook_timeout: int = 900, progress=print, jobs: int = 1,
                 cell_timeout: int = 300, memory_gib: float = 8, regrade: bool = False,
                 progress_bar: bool = True, setup_problem: str | None = None,
                 scheduler: str | None = None) -> list[Result]:
    """Grade every submission under ``submissions``; write ``gradebook.csv``,
    ``grades_by_cell.csv`` and ``feedback/`` into ``out_dir``. Returns one result per submission.

    First each lesson's own solution is graded here (:func:`check_lessons`, cached): the
    submissions of a lesson whose solution does not get full marks on this machine are "not
    graded", with the reason, instead of getting zeros. ``setup_problem`` is the set-up check's
    one line (``grader.doctor``; run here when None). ``jobs`` submissions are graded at once
    (each in its own processes); unchanged submissions keep their cached result unless
    ``regrade``. ``scheduler``: grade on Dask distributed (``"local"``: a local cluster of
    ``jobs`` workers; else a scheduler's address), see ``grader/distributed.py``."""
    submissions = Path(submissions).resolve()
    subs, results = collect(submissions)
    out_dir = Path(out_dir).resolve()
    course = Course(out_dir / "course", budget=budget, notebook_timeout=notebook_timeout,
                    cell_timeout=cell_timeout, memory_bytes=int(memory_gib * 2 ** 30),
                    # the environment check's executed solutions are as secret as solutions/
                    hide=[out_dir, submissions, _check_folder()],
                    # kernels side by side, each with a thread per core, would oversubscribe the machine
                    threads=max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None)
    lessons = sorted({s.lesson for s in subs}, key=lambda l: l.slug)
    course.setup(lessons)
    from .sandbox import isolation_level

    if isolation_level() != "bwrap":
        progress("warning: bubblewrap (bwrap) is not available: submissions are isolated less "
                 f"({isolation_level()}); install it (apt-get install bubblewrap), see the README")
    if scheduler:  # the same per-submission jobs on Dask workers (grader/distributed.py)
        from .distributed import DaskEngine

        course.engine = DaskEngine(scheduler, jobs, course.spec())
    if setup_problem is None:
        from . import doctor

        setup_problem = doctor.failure_line(doctor.run_checks())
        if setup_problem:
            progress(f"warning: {setup_problem}")
    checks = check_lessons(course, lessons, jobs=jobs, progress=progress,
                           setup_problem=setup_problem)

    # read everything once, before any student code runs: later writes to these files change nothing
    todo, cached = [], []
    for sub in subs:
        result = Result(sub.student, sub.lesson.slug, max_score=_max_points(sub.lesson))
        check = checks[sub.lesson.slug]
        if check.problem:
            result.status = "not graded"
            result.reason = f"{ENVIRONMENT_FAILS}{sub.lesson.number}'s solution ({check.problem})"
            results.append(result)
            continue
        try:
            data = read_submission(sub.path)
            sha = hashlib.sha256(data).hexdigest()
        except (CourseError, OSError) as e:
            result.status, result.reason = "not graded", str(e) if isinstance(e, CourseError) \
                else f"{sub.path.name}: unreadable ({e.strerror})"
            results.append(result)
            continue
        fp = fingerprint(course, sub.lesson)
        hit = None if regrade else _load_cached(out_dir, sub.student, sub.lesson.slug, sha, fp)
        if hit is not None:
            cached.append(hit)
        else:
            todo.append((sub, data, sha, fp))
    results.extend(cached)
    if cached:
        progress(f"{len(cached)} submission(s) unchanged since the last run: kept their grades")

    def grade_one(item):
        sub, data, sha, fp = item
        result = Result(sub.student, sub.lesson.slug, max_score=_max_points(sub.lesson))
        start = time.perf_counter()
        try:
            check_submission(sub, data)
            check = checks[sub.lesson.slug]
            if sha == check.sha256 and check.outcome is not None:
                # the lesson's own solution, already graded by the environment check: same bytes,
                # same verdict (as for any two identical files)
                outcome = check.outcome
                graded = check.graded_notebook.read_bytes() if check.graded_notebook else None
                course.adopt(sub.student, sub.lesson, data, graded, outcome)
                start = None
            else:
                outcome = course.grade_private(sub.student, sub.lesson, data)
            course.last_outcome[(sub.student, sub.lesson.slug)] = outcome
            if outcome.reason:
                raise CourseError(outcome.reason)
            try:  # the CSV gradebook comes from memory: a damaged course database loses nothing
                course.record(sub.student, sub.lesson, outcome)
            except Exception as e:
                progress(f"warning: {sub.student} {sub.lesson.slug}: not written to the course "
                         f"database ({type(e).__name__}); the CSV gradebook has it")
            result.cells = outcome.cells
            result.score = sum(s for s, _ in outcome.cells.values())
            result.max_score = sum(m for _, m in outcome.cells.values())
            notes = [f"{g}: {why}" for g, why in outcome.failures.items()
                     if not why.startswith("fails (see")]
            result.reason = "; ".join(notes)[:300]
        except CourseError as e:
            result.status, result.reason, result.score = "not graded", str(e), 0.0
        except Exception as e:  # a bug of ours must not stop the class: report it on the row
            result.status, result.score = "not graded", 0.0
            result.reason = f"grader error ({type(e).__name__}: {str(e)[:200]})"
        return item, result, None if start is None else time.perf_counter() - start

    # identical files (copies) are graded once: grading depends only on the bytes and the lesson
    groups: dict[tuple[str, str], list] = {}
    for item in todo:
        groups.setdefault((item[0].lesson.slug, item[2]), []).append(item)
    bar = _bar(len(todo), progress_bar)
    graded, done, started = [], 0, time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(grade_one, items[0]): items for items in groups.values()}
        for fut in as_completed(futures):
            items = futures[fut]
            (sub, data, sha, fp), result, seconds = fut.result()
            outcome = course.last_outcome.get((sub.student, sub.lesson.slug))
            where = ", ".join(f"{k} {v:.0f} s" for k, v in (outcome.phases if outcome else {}).items())
            copies = [(sub, result)]
            for other, _, _, _ in items[1:]:
                twin = Result(**{**asdict(result), "student": other.student})
                if twin.status == "graded":
                    outcome = course.last_outcome.get((sub.student, sub.lesson.slug))
                    try:
                        if outcome is not None:
                            course.record(other.student, other.lesson, outcome)
                    except Exception:
                        pass
                copies.append((other, twin))
            for one, res in copies:
                done += 1
                graded.append((one, sha, fp, res))
                same = f" (same file as {sub.student})" if one is not sub else ""
                took = "the environment check's grading" if seconds is None else f"{seconds:.0f} s"
                line = (f"[{done}/{len(todo)}] {one.student:<16} {one.lesson.slug:<24} "
                        f"{res.score:g}/{res.max_score:g}  {res.reason} ({took}"
                        f"{': ' + where if where and one is sub else ''}){same}")
                if bar is not None:
                    bar.update(1)
                    bar.write(line)
                else:
                    progress(line)
    if bar is not None:
        bar.close()
    if groups:
        took = time.perf_counter() - started
        progress(f"graded {len(groups)} distinct submission(s) in {took:.0f} s "
                 f"({took / len(groups):.1f} s each, {max(1, jobs)} at a time)")

    if feedback:
        _write_feedback(course, out_dir, [r for _, _, _, r in graded if r.status == "graded"])
    results.extend(r for _, _, _, r in graded)
    for sub, sha, fp, result in graded:  # the cache is written after every child has finished
        path = _cache_path(out_dir, sub.student, sub.lesson.slug)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"sha256": sha, "fingerprint": fp, "result": asdict(result)}))
    write_gradebook(results, out_dir)
    if course.engine is not None:
        course.engine.close()
    course.close()
    return results


def _bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="grading", unit="notebook", file=sys.stderr)


def _write_feedback(course: Course, out_dir: Path, graded: list[Result]) -> None:
    """Each graded student's feedback page, written by the grader from data (no nbgrader)."""
    lessons = {}
    for r in graded:
        lessons.setdefault(r.lesson, []).append(r)
    for slug, rows in lessons.items():  # built from data by the grader (grader/feedback.py)
        for r in rows:
            dest = out_dir / "feedback" / r.student / f"{slug}.html"
            if course.write_feedback(r.student, slug, dest):
                r.feedback = str(dest)


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
    """The gradebook as a fixed-width text table: student, lesson, score, max, and the status with
    the reason for anything not graded (or for a test cell the judge failed)."""
    rows = [("student", "lesson", "score", "max", "status / reason")]
    for r in sorted(results, key=lambda r: (r.student, r.lesson)):
        status = r.status + (f": {r.reason}" if r.reason else "")
        rows.append((r.student, r.lesson, f"{r.score:g}", f"{r.max_score:g}",
                     " ".join(status.split())))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
        if n == 0:
            lines.append("-" * (sum(widths) + 8 + 24))
    return "\n".join(lines)
