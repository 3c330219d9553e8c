"""One linter over the packages, the tests and the lessons' text sources: ruff, configured in
pyproject.toml (``[tool.ruff]``). Run it yourself with ``.venv/bin/ruff check`` (``--fix`` mends
imports and the like)."""
from __future__ import annotations

import subprocess
import sys

from brewslm_helpers.paths import REPO_ROOT


def test_ruff_passes():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format",
                             "concise", str(REPO_ROOT)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, "ruff check found problems:\n" + result.stdout + result.stderr


def test_ruff_reads_the_lessons():
    """The lessons are linted as code (their imports of brewslm_helpers included), not skipped."""
    listed = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--show-files",
                             str(REPO_ROOT)], cwd=REPO_ROOT, capture_output=True, text=True).stdout
    files = {line.strip() for line in listed.splitlines()}
    lessons = sorted((REPO_ROOT / "solutions").glob("[0-9][0-9]_*.py"))
    assert lessons and all(str(p) in files for p in lessons)
    assert not any(line.endswith(".ipynb") for line in files)  # notebooks are built from the text
