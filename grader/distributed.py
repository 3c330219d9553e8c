"""Grading on Dask distributed: the same per-submission jobs, on a local cluster or a real one.

``brewslm grade --scheduler local`` starts a ``LocalCluster`` (``--jobs`` worker processes, one
thread each); ``--scheduler tcp://HOST:8786`` uses a running cluster (see the README: ``dask
scheduler`` on one machine, ``dask worker tcp://HOST:8786 --nthreads 1 --nworkers N`` on each
grading machine, every one with this course installed at the same version and ``bwrap``).

Each task is one submission's :meth:`grader.course.Course.grade_private` on a worker: the worker
keeps its own course folder per lesson (built once, from its own copy of the lesson, which must be
the parent's byte for byte: the task carries the lesson's SHA-256 and a worker with another
version refuses it), grades in its own sandbox and returns the :class:`~grader.course.Outcome`,
the executed notebook (for the feedback) and nothing else. The parent records every outcome: the
gradebook, the CSV files and the feedback pages are written only by it, exactly as for local
grading, so the results are identical.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from pathlib import Path

_COURSES: dict[str, object] = {}
_LOCK = threading.Lock()


def lesson_sha(lesson) -> str:
    return hashlib.sha256(lesson.solution.read_bytes()).hexdigest()


def remote_grade(spec: dict, student: str, slug: str, notebook: bytes, sha: str) -> dict:
    """Runs on a Dask worker: grade one submission there; returns data for the parent."""
    from .course import Course
    from .lessons import CourseError, Lesson

    lesson = Lesson(slug)
    if not lesson.solution.exists() or lesson_sha(lesson) != sha:
        raise CourseError(f"this grading worker has another version of lesson {slug} "
                          "(install the same course version on every worker)")
    key = json.dumps(spec, sort_keys=True)
    with _LOCK:
        course = _COURSES.get(key)
        if course is None:
            root = Path(tempfile.mkdtemp(prefix="brewslm-dask-course-")) / "course"
            course = _COURSES[key] = Course(root, **spec)
        if slug not in course._template:
            course.setup([lesson])
    outcome = course.grade_private(student, lesson, notebook)
    data = course._feedback_data.pop((student, slug), None)
    return {"outcome": outcome, "graded": data[1] if data else None}


class DaskEngine:
    """Where a :class:`~grader.course.Course` sends its submissions when grading on Dask."""

    def __init__(self, scheduler: str, workers: int, spec: dict):
        import logging

        from distributed import Client, LocalCluster

        self.spec = spec
        self.cluster = None
        if scheduler in ("", "local", None):
            self.cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1,
                                        processes=True, dashboard_address=None,
                                        silence_logs=logging.ERROR)
            self.client = Client(self.cluster)
        else:
            self.client = Client(scheduler)

    def grade(self, student: str, lesson, notebook: bytes):
        fut = self.client.submit(remote_grade, self.spec, student, lesson.slug, notebook,
                                 lesson_sha(lesson), pure=False, retries=0)
        data = fut.result()
        return data["outcome"], data["graded"]

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()
