"""Where the course keeps things outside the repository.

Everything a run produces (the cached model, lesson artefacts, executed notebooks, grading
work folders) lives under ``$BREWSLM_CACHE`` (default ``~/.cache/brewslm``), never in the repo.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """The course cache folder, created if missing."""
    path = Path(os.environ.get("BREWSLM_CACHE", Path.home() / ".cache" / "brewslm")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def artifact_dir(budget: str) -> Path:
    """Folder where lessons hand artefacts to later lessons, one per budget.

    Lesson 2 writes ``teacher_capture.jsonl`` here, lesson 3 the trained students; a lesson
    that finds nothing here recreates what it needs.
    """
    path = cache_dir() / "artifacts" / budget
    path.mkdir(parents=True, exist_ok=True)
    return path
