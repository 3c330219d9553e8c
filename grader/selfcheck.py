"""Do a lesson's test cells tell its known mistakes apart? Every variant in one kernel.

Grading a known-wrong variant through the whole pipeline (``grader.course``: nbgrader in a sandbox,
then the trusted judge) costs a kernel start, the lesson's setup and nbgrader's own overhead
per variant. What the known mistakes need checking is narrower: that each wrong variant fails
exactly the test cells it names and passes the others. So this runs the lesson's setup cells once,
then, for each variant (the solution first, each known mistake, the solution again last, which
proves no variant left the kernel in a state that changes later verdicts), redefines every exercise
and re-runs every test cell (the source's, hidden tests included), in notebook order. A test cell's
points are decided by nbgrader's own rule (``nbgrader.utils.determine_grade`` after its
``IgnorePattern`` preprocessor, with the course's pattern): an error, or stderr that is not a
warning or a progress bar, scores 0.

``judge_variants`` asks the same question of the trusted judge (``grader.judge``), which is what
decides a grade: the same variants, one judge process per lesson (its setup run once), each variant's
exercises in a worker process of their own (here without the sandbox: this is an author's check).

The pipeline itself is proved elsewhere (``tests/test_grading.py`` grades the solution, the blank
release and a known mistake of each lesson through it; ``tests/test_hostile.py`` attacks it).
"""
from __future__ import annotations

import os
import tempfile

import nbformat

from .lessons import CourseError, Lesson
from .notebooks import exercises_only, make_submission, mistake_submission, nbgrader_meta, read_notebook, test_cells
from .run import notebook_env

SOLUTION, SOLUTION_AGAIN = "(solution)", "(solution, again)"


def should_fail(lesson: Lesson, variant: str) -> set[str]:
    """The test cells ``variant`` (a key of ``score_variants``) must score 0 on: none for the
    solution, the ``loses`` list for a known mistake."""
    if variant in (SOLUTION, SOLUTION_AGAIN):
        return set()
    return set(next(m for m in lesson.mistakes if m["name"] == variant)["loses"])


def variant_cells(nb) -> tuple[list, list]:
    """Split an exercises-only notebook into its set-up cells (parameters, ``setup``) and the rest
    (exercise and test cells, in order)."""
    head, body = [], []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        gid = nbgrader_meta(cell).get("grade_id")
        (head if gid in (None, "setup") and not body else body).append(cell)
    return head, body


def _variants(lesson: Lesson, mistakes: list[dict] | None) -> list[tuple[str, object]]:
    """``[(name, submission)]``: the solution, each known mistake (all by default), the solution again."""
    mistakes = lesson.mistakes if mistakes is None else mistakes
    return [(SOLUTION, make_submission(lesson))] \
        + [(m["name"], mistake_submission(lesson, m)) for m in mistakes] \
        + [(SOLUTION_AGAIN, make_submission(lesson))]


def score_variants(lesson: Lesson, mistakes: list[dict] | None = None, budget: str = "ci",
                   cell_timeout: int = 600) -> dict[str, dict[str, float]]:
    """``{variant: {test grade_id: points scored}}`` for the solution and each known mistake
    (``lesson.mistakes`` by default), all run in one kernel. The solution is run first and last;
    its two verdicts are keyed ``SOLUTION`` and ``SOLUTION_AGAIN``."""
    from nbclient import NotebookClient
    from nbgrader.preprocessors import IgnorePattern
    from nbgrader.utils import determine_grade

    from .course import IGNORED_STDERR

    variants = _variants(lesson, mistakes)
    source = read_notebook(lesson.solution)
    points = test_cells(source)
    # test cells as nbgrader restores them: the source's, hidden tests included
    tests = {g: c.source for c in source.cells if (g := nbgrader_meta(c).get("grade_id")) in points}

    head, _ = variant_cells(exercises_only(variants[0][1]))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c.source) for c in head]
    for name, sub in variants:
        for cell in variant_cells(exercises_only(sub))[1]:
            gid = nbgrader_meta(cell).get("grade_id")
            new = nbformat.v4.new_code_cell(tests.get(gid, cell.source), metadata=dict(cell.metadata))
            new.metadata["brewslm_variant"] = name
            nb.cells.append(new)

    env = {**os.environ, **notebook_env(budget)}
    with tempfile.TemporaryDirectory(prefix=f"brewslm-selfcheck-{lesson.slug}-") as work:
        client = NotebookClient(nb, timeout=cell_timeout, kernel_name="python3", allow_errors=True,
                                resources={"metadata": {"path": work}})
        with client.setup_kernel(env=env):
            for i, cell in enumerate(nb.cells):
                client.execute_cell(cell, i)
                if i < len(head) and any(o.get("output_type") == "error" for o in cell.outputs):
                    err = next(o for o in cell.outputs if o.get("output_type") == "error")
                    raise CourseError(f"{lesson.slug}: set-up cell {i} failed: "
                                       f"{err['ename']}: {err['evalue']}")
    IgnorePattern(enabled=True, pattern=IGNORED_STDERR).preprocess(nb, {})

    verdicts: dict[str, dict[str, float]] = {name: {} for name, _ in variants}
    for cell in nb.cells[len(head):]:
        gid = nbgrader_meta(cell).get("grade_id")
        if gid in points:
            score, _ = determine_grade(cell)
            verdicts[cell.metadata["brewslm_variant"]][gid] = float(score)
    return verdicts


def judge_variants(lesson: Lesson, mistakes: list[dict] | None = None, budget: str = "ci",
                   cell_timeout: int = 600) -> dict[str, dict[str, float]]:
    """``score_variants``, decided by the trusted judge: ``{variant: {test grade_id: points}}``
    (a test cell scores its points when the judge passes it, else 0)."""
    import sys
    from pathlib import Path

    from .course import judge_job
    from .judge_pool import JudgeProcess

    variants = _variants(lesson, mistakes)
    source = read_notebook(lesson.solution)
    points = test_cells(source)
    verdicts: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix=f"brewslm-judgecheck-{lesson.slug}-") as work:
        root = Path(work)
        env = {**os.environ, **notebook_env(budget), "HOME": str(root),
               "IPYTHONDIR": str(root / "ipython")}
        judge = None
        try:
            for name, sub in variants:
                job = judge_job(source, nbformat.writes(sub).encode())
                if judge is None:
                    judge = JudgeProcess(root, env, job["params"], job["setup"],
                                         ready_timeout=cell_timeout + 120)
                    if judge.error:
                        raise CourseError(f"{lesson.slug}: {judge.error}")
                scratch = Path(tempfile.mkdtemp(dir=root))
                job.update(cell_timeout=cell_timeout, ready_timeout=cell_timeout + 120,
                           scratch=str(scratch),
                           worker={"argv": [sys.executable, "-m", "grader.judge", "worker"],
                                   "env": env, "cwd": str(root), "log": str(root / "worker.log")})
                data = judge.run(job, timeout=cell_timeout * (len(points) + 2))
                if data.get("fatal"):
                    raise CourseError(f"{lesson.slug}: {name}: {data['fatal']}")
                got = data.get("verdicts") or {}
                verdicts[name] = {g: (p if (got.get(g) or {}).get("passed") else 0.0)
                                  for g, p in points.items()}
        finally:
            if judge is not None:
                judge.close()
    return verdicts
