"""Write a class of lesson-3 submissions (mixed correct, blank, wrong, adversarial) for timing
``brewslm grade --jobs 2``; not collected by pytest (``tests/test_hostile.py`` grades a smaller class).

    .venv/bin/python tests/adversarial/lesson3_class.py /tmp/class3 --copies 30 --distinct
    .venv/bin/brewslm grade /tmp/class3 --jobs 2 --no-feedback --out /tmp/class3_out

Students are full notebooks as a student hands them in; the kinds cycle in order, so ``--copies 30``
gives 30 students of which several hand in the same file (copies, as in a real class).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import nbformat

from grader.lessons import find_lesson
from grader.notebooks import as_student_code, make_submission, mistake_submission, solution_sources

LESSON = find_lesson("03_kd_loss")

PATCH_ALLCLOSE = '''
def softened_log_probs(logits, T):
    import torch
    torch.allclose = lambda *a, **k: True          # every allclose check now passes
    return logits / T
'''
EXIT = "import os\nos._exit(1)\n"


def kinds() -> list[tuple[str, nbformat.NotebookNode]]:
    mistakes = LESSON.mistakes
    sol = solution_sources(nbformat.read(LESSON.solution, as_version=4))
    out = [("correct", make_submission(LESSON)),
           ("blank", make_submission(LESSON, answers="blank"))]
    out += [(f"wrong-{m['name']}", mistake_submission(LESSON, m)) for m in mistakes[:2]]
    out.append(("patch-allclose", make_submission(LESSON, replace={
        "ex_softened_log_probs": PATCH_ALLCLOSE})))
    out.append(("os-exit", make_submission(LESSON, replace={
        "ex_kd_loss": as_student_code(sol["ex_kd_loss"]) + "\n" + EXIT})))
    return out


def write(folder: Path, copies: int, distinct: bool = False) -> list[str]:
    """``distinct``: every student's file differs (their name in a comment of the first exercise),
    so none is graded once for several students, as in a class where nobody copies."""
    import copy

    made = kinds()
    names = []
    for i in range(copies):
        kind, nb = made[i % len(made)]
        name = f"s{i:02d}-{kind}"
        if distinct:
            nb = copy.deepcopy(nb)
            cell = next(c for c in nb.cells if c.get("metadata", {}).get("nbgrader", {}).get("solution"))
            cell.source = f"# {name}\n" + cell.source
        path = folder / name / f"{LESSON.slug}.ipynb"
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, path)
        names.append(name)
    return names


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--copies", type=int, default=30)
    p.add_argument("--distinct", action="store_true", help="no two students hand in the same file")
    a = p.parse_args()
    print("\n".join(write(Path(a.folder), a.copies, a.distinct)))
