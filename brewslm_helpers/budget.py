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
