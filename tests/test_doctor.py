"""The set-up self-check (``brewslm doctor``) and what the grader does on a broken course environment.

A llama.cpp build that dies with SIGILL (AMX kernels compiled in, a VM that does not let them run)
is simulated by a stub ``llama_cpp`` package earlier on ``PYTHONPATH`` that kills its own process with
SIGILL on import, as the real crash does on the first matrix multiply.
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest

from grader import doctor
from grader.lessons import find_lesson
from grader.notebooks import exercises_only, make_submission

CRASH = "import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n"


@pytest.fixture
def sigill_llama():
    """An environment in which ``import llama_cpp`` dies with SIGILL."""
    # outside /tmp, HOME, the cache and the repository: a graded kernel's sandbox sees it (read-only)
    stub = Path(tempfile.mkdtemp(prefix="brewslm-sigill-", dir="/var/tmp")) / "llama_cpp"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(CRASH)
    (stub / "server.py").write_text(CRASH)
    path = os.pathsep.join(p for p in [str(stub.parent), os.environ.get("PYTHONPATH", "")] if p)
    yield dict(os.environ, PYTHONPATH=path)
    shutil.rmtree(stub.parent, ignore_errors=True)


def brewslm(*args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "grader", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_doctor_passes_here_and_says_the_build_is_portable():
    result = brewslm("doctor")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "brewslm doctor: the course can run on this machine"
    llama = next(line for line in lines if "llama.cpp" in line)
    assert "portable build" in llama and "NOT portable" not in llama, llama
    assert any("transformers" in line and "134.5M parameters" in line for line in lines)


def test_compiled_features_are_read_from_the_system_info():
    info = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 0 | AMX_INT8 = 1 | OPENMP = 1 |"
    assert doctor.compiled_features(info) == ["SSE3", "AVX", "AVX2", "AMX_INT8", "OPENMP"]


def test_a_sigill_build_is_one_line_naming_llama_cpp_and_the_fix(sigill_llama):
    result = brewslm("doctor", env=sigill_llama)
    assert result.returncode == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "llama.cpp crashed with SIGILL" in err and doctor.REBUILD in err, err
    # the commands that need a working course stop with the same line before doing anything
    result = brewslm("run", "14", env=sigill_llama)
    assert result.returncode == 2 and "SIGILL" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_grading_on_a_broken_environment_gives_no_student_a_zero(tmp_path, sigill_llama):
    """Lesson 1 needs llama.cpp, lesson 3 does not: lesson 1's submissions are not graded, with the
    reason, lesson 3's are graded as usual, and the command exits non-zero."""
    needs, fine = find_lesson("01"), find_lesson("03")
    folder = tmp_path / "class"
    for student, lesson, nb in [("ada", needs, make_submission(needs)),
                                ("ada", fine, make_submission(fine)),
                                ("blake", needs, make_submission(needs, answers="blank")),
                                ("blake", fine, exercises_only(make_submission(fine, answers="blank")))]:
        (folder / student).mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, folder / student / f"{lesson.slug}.ipynb")
    out = tmp_path / "out"
    result = brewslm("grade", str(folder), "--out", str(out), "--jobs", "2", "--no-feedback",
                     env=sigill_llama, timeout=1200)
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-2000:]
    assert "llama.cpp crashed with SIGILL" in result.stderr and "Traceback" not in result.stderr
    rows = {(r["student"], r["lesson"]): r for r in csv.DictReader(open(out / "gradebook.csv"))}
    for student in ("ada", "blake"):
        row = rows[(student, needs.slug)]
        assert row["status"] == "not graded", row
        assert row["reason"].startswith("the course environment fails lesson 1's solution"), row
        assert "SIGILL" in row["reason"], row
    assert rows[("ada", fine.slug)]["status"] == "graded"
    assert rows[("ada", fine.slug)]["score"] == rows[("ada", fine.slug)]["max_score"] != "0"
    assert rows[("blake", fine.slug)]["status"] == "graded" and rows[("blake", fine.slug)]["score"] == "0"
