"""Lessons are authored as plain text (``solutions/NN_slug.py``, jupytext percent format).

* The conversion of the nine notebook-authored lessons is lossless: each lesson's text source
  builds a notebook equal, cell by cell (id, type, source, nbgrader metadata, tags), to the
  notebook that was its source before (read from git at ``CONVERTED_FROM``), but for the lint
  mends listed in ``MENDS``; and the converter round-trips those notebooks exactly.
* The build is deterministic and follows the text: a one-line change is a one-line change.
* The text source is what jupytext's contents manager (JupyterLab) opens as a notebook, with the
  nbgrader metadata the assignment toolbar reads, and saving it back changes nothing.
* Only the text is committed: ``solutions/*.ipynb`` are built, ignored by git.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from brewslm_helpers.paths import REPO_ROOT
from grader.lessons import SOLUTIONS, Lesson, all_lessons
from grader.notebooks import nbgrader_meta, read_notebook
from grader.plaintext import built, notebook_bytes, notebook_from_text, text_from_notebook

# the last commit whose solutions/NN_slug.ipynb were the lessons' source (issue 13 converted them)
CONVERTED_FROM = "cae9bfd6862b1f419519e2dec9bc52494f68968c"
# (lessons 1-5 left the list when issue 14 reworked them, lessons 6, 8, 12 and 14 when issue 20
# mended their prose and tests: their conversion had long been settled)
CONVERTED: list[str] = []
# edits made to a lesson's text since the conversion, by lesson and cell id: (old, new), each old
# text occurring once in that cell of the old notebook. Add an entry when you edit a converted
# lesson on purpose (or drop the lesson from CONVERTED once its conversion is long settled).
MENDS: dict[str, dict[str, list[tuple[str, str]]]] = {}


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True)


def _old_notebook(slug: str) -> nbformat.NotebookNode:
    if _git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout: the pre-conversion notebooks are read from git history")
    if _git("cat-file", "-e", f"{CONVERTED_FROM}^{{commit}}").returncode != 0:
        pytest.skip(f"commit {CONVERTED_FROM[:10]} (the last notebook-JSON lessons) is not in this "
                    "clone (a shallow clone? `git fetch --unshallow` to run the conversion check)")
    shown = _git("show", f"{CONVERTED_FROM}:solutions/{slug}.ipynb")
    assert shown.returncode == 0, shown.stderr.strip()
    return nbformat.reads(shown.stdout, as_version=4)


def _cells(nb) -> list[dict]:
    return [{"id": c.get("id"), "type": c.cell_type, "source": c.source,
             "nbgrader": nbgrader_meta(c), "tags": c.get("metadata", {}).get("tags", [])}
            for c in nb.cells]


def _mended(slug: str, nb) -> nbformat.NotebookNode:
    mends = MENDS.get(slug, {})
    by_id = {c.id: c for c in nb.cells}
    assert set(mends) <= set(by_id), f"MENDS names cells {set(mends) - set(by_id)} that {slug} never had"
    for cell_id, edits in mends.items():
        for old, new in edits:
            assert by_id[cell_id].source.count(old) == 1, f"{slug}/{cell_id}: {old!r} is not there once"
            by_id[cell_id].source = by_id[cell_id].source.replace(old, new)
    return nb


def test_every_lesson_is_a_text_source_and_the_nine_were_converted():
    slugs = [l.slug for l in all_lessons()]
    assert set(CONVERTED) <= set(slugs)
    for slug in slugs:
        assert (SOLUTIONS / f"{slug}.py").is_file()


@pytest.mark.parametrize("slug", CONVERTED)
def test_text_source_builds_the_old_notebook_cell_by_cell(slug):
    old = _cells(_mended(slug, _old_notebook(slug)))
    new = _cells(read_notebook(Lesson(slug).solution))
    assert len(new) == len(old), f"{slug}: {len(new)} cells built, {len(old)} before"
    for i, (a, b) in enumerate(zip(old, new)):
        assert b == a, f"{slug}: cell {i} ({a['id']}) differs from the notebook it was converted from"


@pytest.mark.parametrize("slug", CONVERTED)
def test_converter_round_trips_the_old_notebooks_exactly(slug):
    old = _old_notebook(slug)
    again = notebook_from_text(text_from_notebook(old))
    assert _cells(again) == _cells(old)
    # the whole notebook, not only what the grader reads: same JSON as nbformat writes the old one
    assert notebook_bytes(text_from_notebook(old)) == (nbformat.writes(old) + "\n").encode()


def test_build_is_deterministic_and_cached(tmp_path):
    lesson = all_lessons()[0]
    text = lesson.source.read_text()
    assert notebook_bytes(text) == notebook_bytes(text)
    source, target = tmp_path / lesson.source.name, tmp_path / f"{lesson.slug}.ipynb"
    source.write_text(text)
    first = built(source, target).read_bytes()
    stamp = target.stat().st_mtime_ns
    assert built(source, target).stat().st_mtime_ns == stamp  # nothing changed: not rewritten
    target.write_text("{}")  # a stale or hand-edited build is replaced
    assert built(source, target).read_bytes() == first


def test_a_one_line_change_is_one_cell_and_one_line(tmp_path):
    lesson = Lesson("03_kd_loss") if (SOLUTIONS / "03_kd_loss.py").exists() else all_lessons()[0]
    lines = lesson.source.read_text().splitlines(keepends=True)
    i = next(n for n, line in enumerate(lines) if line.startswith("torch.manual_seed("))
    lines[i] = lines[i].replace("torch.manual_seed(", "torch.manual_seed(1 + ")
    before = notebook_from_text(lesson.source.read_text())
    after = notebook_from_text("".join(lines))
    changed = [(a.id, a.source, b.source) for a, b in zip(before.cells, after.cells) if a != b]
    assert len(before.cells) == len(after.cells) and len(changed) == 1
    _, old, new = changed[0]
    assert sum(x != y for x, y in zip(old.splitlines(), new.splitlines())) == 1


def test_a_lesson_written_as_text_only_gets_stable_valid_ids(tmp_path):
    text = ('# %% [markdown]\n# # A new lesson\n\n# %% tags=["parameters"]\nimport os\n'
            'BUDGET = os.environ.get("BREWSLM_BUDGET", "full")\n\n'
            '# %% nbgrader={"grade": false, "grade_id": "ex_f", "locked": false, "schema_version": 3, '
            '"solution": true, "task": false}\ndef f():\n    ### BEGIN SOLUTION\n    return 1\n'
            '    ### END SOLUTION\n\n# %%\nprint(1)\n\n# %%\nprint(1)\n')
    nb = notebook_from_text(text)
    nbformat.validate(nb)
    assert notebook_bytes(text) == notebook_bytes(text)
    ids = [c.id for c in nb.cells]
    assert len(set(ids)) == len(ids) and ids[2] == "ex-f"
    assert nb.cells[1].metadata == {"tags": ["parameters"]}
    assert nb.metadata == {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                           "language_info": {"name": "python"}}


def test_jupyterlab_opens_the_text_as_a_notebook_and_saves_it_unchanged(tmp_path):
    """jupytext's server extension (enabled by installing jupytext) swaps in its contents manager,
    which is what JupyterLab reads and writes ``.py`` notebooks through."""
    config = Path(sys.prefix) / "etc" / "jupyter" / "jupyter_server_config.d" / "jupytext.json"
    assert json.loads(config.read_text())["ServerApp"]["jpserver_extensions"]["jupyterlab_jupytext"]
    from jupytext import TextFileContentsManager  # the server extension derives the same class

    lesson = all_lessons()[0]
    (tmp_path / lesson.source.name).write_bytes(lesson.source.read_bytes())
    cm = TextFileContentsManager(root_dir=str(tmp_path))
    model = cm.get(lesson.source.name, content=True, type="notebook")
    nb = model["content"]
    assert [nbgrader_meta(c).get("grade_id") for c in nb.cells] == \
        [nbgrader_meta(c).get("grade_id") for c in read_notebook(lesson.solution).cells]
    cm.save({"type": "notebook", "content": nb}, "saved.py")
    assert (tmp_path / "saved.py").read_text() == lesson.source.read_text()


def test_only_the_text_is_committed():
    ignored = _git("check-ignore", "-q", "--no-index", "solutions/01_toolkit.ipynb")
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0, "solutions/*.ipynb must be ignored by git (.gitignore)"
    tracked = _git("ls-files", "solutions/*.ipynb").stdout.split()
    assert not tracked, f"built notebooks are tracked: git rm --cached {' '.join(tracked)}"
