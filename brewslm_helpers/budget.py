"""Run budgets: ``full`` for students, ``ci`` for CI and autograding.

Every notebook's parameters cell sets ``BUDGET = os.environ.get("BREWSLM_BUDGET", "full")``;
papermill can override it. Only sizes and step counts differ between budgets, never the code path.
"""
from __future__ import annotations

import os
from typing import Any

BUDGETS = ("ci", "full")


def resolve(budget: str | None = None) -> str:
    """The budget name to use: ``budget`` if given, else ``$BREWSLM_BUDGET``, else ``"full"``."""
    name = budget if budget is not None else os.environ.get("BREWSLM_BUDGET", "full")
    if name not in BUDGETS:
        raise ValueError(f"unknown budget {name!r}: use one of {', '.join(BUDGETS)}")
    return name


def pick(budget: str, *, ci: Any, full: Any) -> Any:
    """Return the ``ci`` or ``full`` value for ``budget`` (validated)."""
    return {"ci": ci, "full": full}[resolve(budget)]


def cpu_threads() -> int:
    """Threads for the native libraries a lesson drives (llama.cpp, onnxruntime): ``$OMP_NUM_THREADS``
    when set, else the cores this process may use.

    The grader sets ``OMP_NUM_THREADS`` when it runs notebooks side by side; llama.cpp threads
    busy-wait for each other, so two of them each asking for every core run several times slower
    than with one thread each (measured: 0.47 s per token instead of 0.07 s)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
