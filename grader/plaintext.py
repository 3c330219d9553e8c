"""Lesson sources as plain text: ``solutions/NN_slug.py`` (jupytext percent format) <-> notebooks.

The text file is the lesson's only source. Every cell starts with a ``# %%`` header that carries its
notebook metadata as ``key=value`` pairs (JSON values): the cell ``id``, the ``nbgrader`` metadata,
the ``tags`` (``tags=["parameters"]``); markdown cells are ``# %% [markdown]`` with each line
commented. :func:`notebook_from_text` builds the instructor notebook nbgrader needs from it, the
same bytes every time (cell ids come from the headers, or are derived from the cell when a header
has none; the notebook metadata is fixed). :func:`built` keeps ``solutions/NN_slug.ipynb`` (ignored
by git) equal to that build, rewriting it only when the text changed.
"""
from __future__ import annotations

import copy
import hashlib
import os
import re
import threading
from pathlib import Path

import nbformat

FORMAT = "py:percent"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"name": "python"}
# what jupytext may add to a cell's metadata about the text layout; never part of the notebook
JUPYTEXT_CELL_KEYS = ("cell_marker", "lines_to_next_cell", "lines_to_end_of_cell_marker",
                      "skipline", "noskipline")
_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # nbformat 4.5's rule for a cell id


def notebook_from_text(text: str, name: str = "lesson.py") -> nbformat.NotebookNode:
    """The notebook a percent-format source describes, deterministically (nbformat 4.5)."""
    import jupytext

    from .lessons import CourseError

    try:
        parsed = jupytext.reads(text, fmt=FORMAT)
    except Exception as e:  # jupytext raises assorted errors on a malformed header
        raise CourseError(f"{name}: not a jupytext percent-format lesson ({type(e).__name__}: "
                          f"{str(e)[:120]})") from None
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": dict(KERNELSPEC),
                                            "language_info": dict(LANGUAGE_INFO)})
    taken: set[str] = set()
    for cell in parsed.cells:
        meta = {k: v for k, v in cell.metadata.items() if k not in JUPYTEXT_CELL_KEYS}
        cell_id = meta.pop("id", None)
        if cell_id is not None:
            if not isinstance(cell_id, str) or not _ID.match(cell_id):
                raise CourseError(f"{name}: cell id {cell_id!r} is not 1-64 letters, digits, - or _")
            if cell_id in taken:
                raise CourseError(f"{name}: two cells have the id {cell_id!r}")
        else:
            cell_id = _derived_id(cell.cell_type, cell.source, meta, taken)
        taken.add(cell_id)
        if cell.cell_type == "code":
            new = nbformat.v4.new_code_cell(cell.source, metadata=meta)
        elif cell.cell_type == "markdown":
            new = nbformat.v4.new_markdown_cell(cell.source, metadata=meta)
        else:
            new = nbformat.v4.new_raw_cell(cell.source, metadata=meta)
        new.id = cell_id
        nb.cells.append(new)
    return nb


def _derived_id(cell_type: str, source: str, meta: dict, taken: set[str]) -> str:
    """A stable id for a cell whose header gives none: from its ``grade_id``, else its content."""
    grade_id = (meta.get("nbgrader") or {}).get("grade_id")
    if isinstance(grade_id, str) and _ID.match(grade_id.replace("_", "-")):
        base = grade_id.replace("_", "-")
    else:
        base = "cell-" + hashlib.sha1(f"{cell_type}\n{source}".encode()).hexdigest()[:8]
    cell_id, n = base, 1
    while cell_id in taken:
        n += 1
        cell_id = f"{base[:60]}-{n}"
    return cell_id


def notebook_bytes(text: str, name: str = "lesson.py") -> bytes:
    """The instructor notebook file for a source text (what :func:`built` writes)."""
    return (nbformat.writes(notebook_from_text(text, name)) + "\n").encode("utf-8")


def text_from_notebook(nb: nbformat.NotebookNode) -> str:
    """The percent-format source of a notebook: every cell's id and metadata in its header.

    The inverse of :func:`notebook_from_text` (the conversion of the notebook-authored lessons, and
    what jupytext writes when an instructor saves the text source from JupyterLab).
    """
    import jupytext

    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        cell.metadata = {"id": cell.get("id"), **cell.metadata} if cell.get("id") else cell.metadata
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata = {"kernelspec": nb.metadata.get("kernelspec", dict(KERNELSPEC))}
    return jupytext.writes(nb, fmt=FORMAT)


_LOCK = threading.Lock()
_FRESH: dict[Path, tuple] = {}  # target -> (source stat, target stat) when last found up to date


def _stat(path: Path) -> tuple | None:
    try:
        s = path.stat()
    except OSError:
        return None
    return s.st_mtime_ns, s.st_size, s.st_ino


def built(source: Path, target: Path) -> Path:
    """``target``, (re)built from ``source`` if it is missing or differs from the build.

    Cheap when nothing changed: one ``stat`` of each file per call once a process has checked the
    pair; otherwise one jupytext parse and a byte comparison. Written atomically (concurrent
    builders of the same lesson each write whole, identical files).
    """
    from .lessons import CourseError

    with _LOCK:
        key = (_stat(source), _stat(target))
        if key[0] is None:
            raise CourseError(f"{source}: no such lesson source")
        if _FRESH.get(target) == key:
            return target
        data = notebook_bytes(source.read_text(encoding="utf-8"), source.name)
        if target.is_symlink() or not target.is_file() or target.read_bytes() != data:
            tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        _FRESH[target] = (_stat(source), _stat(target))
    return target
