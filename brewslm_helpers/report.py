"""Each lesson ends with a "what we measured" table; ``brewslm bench`` collects them."""
from __future__ import annotations

import json
import time

import pandas as pd

from .paths import artifact_dir


def record_results(lesson: str, budget: str, rows: list[dict]) -> pd.DataFrame:
    """Save and return a lesson's measured results.

    ``rows``: dicts with keys ``quantity`` (str), ``value`` (number or str), ``unit`` (str) and
    optionally ``note``. Every value must have been computed in this run. The table is written to
    ``artifact_dir(budget)/results/<lesson>.json`` and returned as a DataFrame for display.
    """
    for row in rows:
        missing = {"quantity", "value", "unit"} - set(row)
        if missing:
            raise ValueError(f"result row {row} lacks {sorted(missing)}")
    folder = artifact_dir(budget) / "results"
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"lesson": lesson, "budget": budget, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
               "rows": rows}
    (folder / f"{lesson}.json").write_text(json.dumps(payload, indent=1, default=float))
    return pd.DataFrame(rows)


def load_results(budget: str) -> dict[str, pd.DataFrame]:
    """All saved result tables for ``budget``, by lesson name."""
    folder = artifact_dir(budget) / "results"
    tables = {}
    for path in sorted(folder.glob("*.json")):
        payload = json.loads(path.read_text())
        tables[payload["lesson"]] = pd.DataFrame(payload["rows"])
    return tables


def load_payloads(budget: str) -> dict[str, dict]:
    """Every saved result file for ``budget`` as plain data, by lesson name: ``{lesson: payload}``,
    each payload as :func:`record_results` wrote it (``lesson``, ``budget``, ``time``, ``rows``).
    A file that cannot be read as such is skipped (the caller reports the lesson as not run)."""
    folder = artifact_dir(budget) / "results"
    payloads = {}
    for path in sorted(folder.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(payload, dict) and isinstance(payload.get("rows"), list):
            payloads[str(payload.get("lesson", path.stem))] = payload
    return payloads
