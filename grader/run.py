"""``brewslm run``: execute lessons headless with papermill at a budget, outside the repo."""
from __future__ import annotations

import os
import time
from pathlib import Path

from brewslm_helpers.budget import resolve
from brewslm_helpers.paths import cache_dir

from .lessons import Lesson
from .notebooks import read_notebook


def notebook_env(budget: str) -> dict[str, str]:
    """Environment for executing notebooks: the budget, inline figures (kept in the executed
    copy and the feedback page), offline hub, no warnings noise."""
    env = {"BREWSLM_BUDGET": budget, "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return env


def run_lessons(lessons: list[Lesson], budget: str, out_dir: Path | None = None,
                source: str = "solutions", timeout: int = 1800) -> list[dict]:
    """Execute each lesson's notebook with papermill (parameter ``BUDGET``) into ``out_dir``.

    ``source`` is ``"solutions"`` or ``"notebooks"`` (the release; its exercises raise
    ``NotImplementedError``). Returns one row per lesson: ``lesson``, ``status``, ``seconds``,
    ``output`` and ``error`` (first line of the failure, if any).
    """
    import papermill as pm  # slow import: only when running

    budget = resolve(budget)
    out_dir = Path(out_dir) if out_dir else cache_dir() / "runs" / budget
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = dict(os.environ)
    os.environ.update(notebook_env(budget))  # the kernel inherits this process's environment
    try:
        rows = [_run_one(pm, lesson, budget, out_dir, source, timeout) for lesson in lessons]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return rows


def _run_one(pm, lesson: Lesson, budget: str, out_dir: Path, source: str, timeout: int) -> dict:
    src = lesson.solution if source == "solutions" else lesson.release
    read_notebook(src)  # clear error on a missing or corrupt notebook
    out = out_dir / src.name
    start = time.perf_counter()
    status, error = "ok", ""
    try:
        pm.execute_notebook(str(src), str(out), parameters={"BUDGET": budget},
                            kernel_name="python3", cwd=str(out_dir), progress_bar=False,
                            execution_timeout=timeout, log_output=False)
    except pm.PapermillExecutionError as e:
        status, error = "failed", f"cell {e.exec_count}: {e.ename}: {e.evalue}"[:300]
    except Exception as e:  # kernel died, timeout...
        status, error = "failed", f"{type(e).__name__}: {e}".splitlines()[0][:300]
    row = {"lesson": lesson.slug, "status": status,
           "seconds": round(time.perf_counter() - start, 1), "output": str(out), "error": error}
    print(f"  {lesson.slug:<28} {status:<7} {row['seconds']:>7.1f} s  {error}", flush=True)
    return row
