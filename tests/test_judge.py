"""The trusted judge (grader/judge.py): what crosses from a submission's process is data only, and
a test cell run in the judge sees the student's function work as it would in the notebook.

The codec is tested in this process; the judge and its worker as ``python -m grader.judge`` (the
worker here without the sandbox: the sandbox is ``tests/test_hostile.py``'s business)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from grader.judge import Opaque, decode, encode, split_test


def roundtrip(x):
    blobs = []
    tree = json.loads(json.dumps(encode(x, blobs)))
    return decode(tree, blobs)


def test_data_round_trips():
    values = [None, True, 3, -2 ** 70, 1.5, float("nan"), "s", b"\x00b", (1, [2, {"k": (3,)}]),
              {1: "int key", (2, 3): "tuple key"}, {1, 2}, frozenset({3}), 2 + 3j,
              torch.float16, torch.Size([2, 3]), np.float32(1.25), np.int64(7)]
    for v in values:
        got = roundtrip(v)
        assert type(got) is type(v) and (got == v or (v != v and got != got)), (v, got)
    for t in [torch.arange(6.0).reshape(2, 3), torch.tensor(3), torch.zeros(0, 4),
              torch.randn(3, 5).bfloat16(), torch.tensor([True, False]), torch.arange(10)[::2]]:
        got = roundtrip(t)
        assert type(got) is torch.Tensor and got.dtype == t.dtype and torch.equal(got, t)
    a = np.arange(12, dtype=np.float64).reshape(3, 4).T
    got = roundtrip(a)
    assert type(got) is np.ndarray and got.dtype == a.dtype and np.array_equal(got, a)


def test_what_is_not_data_arrives_inert():
    class Liar:
        def __eq__(self, other):
            return True

    class LyingTensor(torch.Tensor):
        def __eq__(self, other):
            return True

    got = roundtrip([Liar(), np.array([Liar()], dtype=object)])
    assert all(isinstance(g, Opaque) for g in got) and got[0] != 0
    t = roundtrip(torch.zeros(2).as_subclass(LyingTensor))
    assert type(t) is torch.Tensor and not bool((t == 1).any())


@pytest.mark.parametrize("tree,blobs", [
    ({"T": 0, "dtype": "float32", "shape": [3]}, [b"\x00" * 8]),         # size does not match
    ({"T": 0, "dtype": "object", "shape": [1]}, [b"\x00" * 8]),          # no such tensor dtype
    ({"A": 0, "dtype": "|O", "shape": [1]}, [b"\x00" * 8]),              # object arrays: no
    ({"A": 0, "dtype": "V8", "shape": [1]}, [b"\x00" * 8]),
    ({"pickle": "gASVBQAAAAAAAACMAXiULg=="}, []),                          # unknown kind
    ({"r": 0}, []),                                                       # no such reference
    ({"su": "teacher"}, []),
    ([1, 2], []),                                                         # bare lists are not values
])
def test_malformed_values_are_refused(tree, blobs):
    with pytest.raises((ValueError, TypeError, KeyError, IndexError)):
        decode(tree, blobs)


def test_split_test():
    vis, hid = split_test("a = 1\n### BEGIN HIDDEN TESTS\nassert a\n### END HIDDEN TESTS\n")
    assert vis == "a = 1\n" and "assert a" in hid and "BEGIN" not in hid and "END" not in hid
    assert split_test("x") == ("x", "")


SETUP = """
import torch, numpy as np, math
SCALE = torch.tensor(2.0)
"""
STUDENT = '''
import torch
import numpy as np

def double(x):
    return x * 2

def pair(x):
    return x * 3, {"ids": x.argmax(-1), "n": int(x.numel())}

def apply(f, v):
    return f(v)

def draw(g):
    return torch.rand(3, generator=g)

def is_setup(x):
    return x is SCALE

def run_model(m, x):
    return m(x)

def boom(kind):
    raise {"value": ValueError, "key": KeyError, "exit": SystemExit}[kind]("nope")

def liar():
    class L:
        def __eq__(self, o): return True
    return L()

def patcher():
    torch.allclose = lambda *a, **k: True
    math_mod = __import__("math"); math_mod.isclose = lambda *a, **k: True
    return 0.0

def forever():
    while True:
        pass

def as_array(n):
    return np.arange(n, dtype=np.float32)

def write_file(path):
    import os
    open(path, "w").write("the student's data")
    os.symlink("/etc/hostname", os.path.join(os.path.dirname(path), "evil"))

def shrink(lin, k):
    lin.weight = torch.nn.Parameter(lin.weight[:k].clone())
    lin.bias.data = lin.bias.data[:k].clone()
    lin.out_features = k
    lin.forward = lambda x: x  # not data: never copied back
    return lin

def accumulate(lin):
    lin.weight.sum().backward()  # no zero_grad: adds to what .grad held
    with torch.no_grad():
        lin.bias.add_(1.0)

def set_size(m, k):
    m.config.size = k
    m.config.hook = print  # not data

def count_calls(m):
    m.__dict__["_calls"] = m.__dict__.get("_calls", 0) + 1  # state kept on the object, not data
    return m._calls

def grad_of(model, loss_fn):
    model.zero_grad()
    loss_fn(model).backward()
    return model.weight.grad

def open_db(path):
    import sqlite3
    class StudentConnection(sqlite3.Connection):  # the student's own class: never crosses
        def execute(self, *a, **k):
            return super().execute(*a, **k)
    c = sqlite3.connect(path, isolation_level=None, timeout=7, factory=StudentConnection)
    c.row_factory = sqlite3.Row
    c.execute("PRAGMA foreign_keys=ON")
    c.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    c.fake = "a connection that says anything"
    return c

def insert(c, x):
    c.execute("INSERT INTO t VALUES (?)", (x,))
    c.seen = getattr(c, "seen", 0) + 1  # the same connection object across calls
    return c.seen

def leave_open(c):
    c.execute("BEGIN IMMEDIATE")

def count_rows(c):
    return c.execute("SELECT COUNT(*) FROM t").fetchone()[0]

def memory_db():
    import sqlite3
    return sqlite3.connect(":memory:")
'''
TESTS = {
    "t_values": "assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0))\n"
                "a, d = pair(torch.tensor([[1.0, 5.0], [7.0, 2.0]]))\n"
                "assert torch.equal(d['ids'], torch.tensor([1, 0])) and d['n'] == 4\n"
                "assert np.array_equal(as_array(3), np.arange(3, dtype=np.float32))",
    "t_grad": "z = torch.ones(3, requires_grad=True)\n"
              "double(z).sum().backward()\n"
              "assert torch.equal(z.grad, torch.full((3,), 2.0))\n"
              "a, d = pair(torch.ones(2, 2, requires_grad=True))\n"
              "assert a.requires_grad and not d['ids'].requires_grad\n"
              "(g,) = torch.autograd.grad(pair(z)[0].sum(), z)\n"
              "assert torch.equal(g, torch.full((3,), 3.0))",
    "t_callback": "seen = []\nassert apply(lambda v: seen.append(v) or v + 1, 3) == 4 and seen == [3]",
    "t_callback_assert": "def check(v):\n    assert v == 99, 'the validator saw the wrong value'\n"
                         "    return v\napply(check, 3)",
    "t_generator": "g = torch.Generator().manual_seed(0)\na = draw(g)\nb = draw(g)\n"
                   "assert not torch.equal(a, b)\n"
                   "assert torch.equal(a, torch.rand(3, generator=torch.Generator().manual_seed(0)))",
    "t_setup_ref": "assert is_setup(SCALE) is True and is_setup(torch.tensor(2.0)) is False",
    "t_model_hook": "m = torch.nn.Linear(2, 2)\ncalls = []\n"
                    "m.register_forward_pre_hook(lambda mod, args: calls.append(mod is m))\n"
                    "out = run_model(m, torch.ones(1, 2))\n"
                    "assert calls == [True] and torch.allclose(out, m(torch.ones(1, 2)))\n"
                    "run_model(m, torch.ones(1, 2))  # the worker kept its copy: the hook still calls back\n"
                    "assert calls == [True, True, True]",
    "t_exceptions": "for kind, exc in (('value', ValueError), ('key', KeyError)):\n"
                    "    try:\n        boom(kind)\n    except exc:\n        pass\n"
                    "    else:\n        raise AssertionError(kind)\n"
                    "try:\n    boom('exit')\nexcept SystemExit:\n    raise AssertionError('exit')\n"
                    "except Exception:\n    pass",
    "t_liar": "assert liar() == 42",
    "t_hidden_in_block": "for i in range(2):\n    assert double(i) == 2 * i\n    ### BEGIN HIDDEN TESTS\n"
                         "    assert double(i) == 99, 'SECRET'\n    ### END HIDDEN TESTS\n",
    "t_visible_in_block": "for i in range(2):\n    assert double(i) == 7, 'visible message'\n"
                          "    ### BEGIN HIDDEN TESTS\n    assert True\n    ### END HIDDEN TESTS\n",
    "t_files": "import os, tempfile\nd = tempfile.mkdtemp()\nwrite_file(os.path.join(d, 'out.txt'))\n"
               "assert open(os.path.join(d, 'out.txt')).read() == \"the student's data\"\n"
               "assert not os.path.lexists(os.path.join(d, 'evil'))",
    "t_loss_callback": "lin = torch.nn.Linear(2, 1)\nloss = lambda m: (m(torch.ones(1, 2)) ** 2).sum()\n"
                       "ref = torch.autograd.grad(loss(lin), lin.weight)[0]\n"
                       "assert torch.allclose(grad_of(lin, loss), ref)",
    "t_module_inplace": "lin = torch.nn.Linear(3, 4)\nw = lin.weight\nout = shrink(lin, 2)\n"
                        "assert out is lin and lin.weight.shape == (2, 3) and lin.out_features == 2\n"
                        "assert w.shape == (2, 3) and lin.bias.shape == (2,)\n"
                        "assert lin(torch.ones(1, 3)).shape == (1, 2)",
    "t_module_grad": "lin = torch.nn.Linear(2, 2)\nlin.weight.grad = torch.full((2, 2), 5.0)\n"
                     "b = lin.bias.detach().clone()\naccumulate(lin)\n"
                     "assert torch.equal(lin.weight.grad, torch.full((2, 2), 6.0))\n"
                     "assert torch.equal(lin.bias, b + 1) and lin.bias.grad is None",
    "t_module_config": "import types\nm = torch.nn.Linear(2, 2)\n"
                       "m.config = types.SimpleNamespace(size=2, hook=None)\nset_size(m, 5)\n"
                       "assert m.config.size == 5 and m.config.hook is None",
    "t_module_kept": "m, m2 = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)\n"
                     "assert count_calls(m) == 1 and count_calls(m) == 2 and count_calls(m2) == 1\n"
                     "assert count_calls(m) == 3, 'the same object across calls, as in a notebook'",
    "t_sqlite": "import os, sqlite3, tempfile\np = os.path.join(tempfile.mkdtemp(), 'db.sqlite')\n"
                "c = open_db(p)\nassert type(c).__name__ == 'MirrorConnection' and not hasattr(c, 'fake')\n"
                "assert c.execute('PRAGMA busy_timeout').fetchone()[0] == 7000\n"
                "assert c.execute('PRAGMA foreign_keys').fetchone()[0] == 1\n"
                "assert insert(c, 1) == 1 and insert(c, 2) == 2, 'the worker uses its own connection'\n"
                "assert [r['x'] for r in c.execute('SELECT x FROM t')] == [1, 2], 'read from the file'\n"
                "mine = sqlite3.connect(p, isolation_level=None)\nmine.execute('INSERT INTO t VALUES (3)')\n"
                "assert count_rows(mine) == 3 and count_rows(c) == 3\n"
                "mem = sqlite3.connect(':memory:')\n"
                "mem.executescript('CREATE TABLE t (x); INSERT INTO t VALUES (1);')\n"
                "assert count_rows(mem) == 1\n"
                "assert type(memory_db()).__name__ == 'Opaque', 'an in-memory database cannot be shared'\n"
                "leave_open(c)\nprobe = sqlite3.connect(p, timeout=0)\n"
                "try:\n    probe.execute('BEGIN IMMEDIATE')\nexcept sqlite3.OperationalError:\n    pass\n"
                "else:\n    raise AssertionError('the worker holds the write lock')",
    "t_sqlite_threads": "import os, sqlite3, tempfile, threading\n"
                        "p = os.path.join(tempfile.mkdtemp(), 'db.sqlite')\nopen_db(p)\n"
                        "def w(i):\n    c = open_db(p)\n    for k in range(5):\n        insert(c, i)\n"
                        "ts = [threading.Thread(target=w, args=(i,)) for i in range(3)]\n"
                        "[t.start() for t in ts]\n[t.join() for t in ts]\n"
                        "assert sqlite3.connect(p).execute('SELECT COUNT(*) FROM t').fetchone()[0] == 15",
    "t_patcher": "patcher()\nassert not torch.allclose(torch.zeros(1), torch.ones(1))\n"
                 "assert not math.isclose(0.0, 1.0)",
    "t_forever": "forever()",
    "t_after_forever": "assert double(2) == 4\n### BEGIN HIDDEN TESTS\nassert double(2) == 5, 'SECRET'\n"
                       "### END HIDDEN TESTS",
}
EXPECT = {"t_values": True, "t_grad": True, "t_callback": True, "t_callback_assert": False,
          "t_generator": True, "t_setup_ref": True, "t_model_hook": True, "t_exceptions": True,
          "t_liar": False, "t_hidden_in_block": False, "t_visible_in_block": False,
          "t_files": True, "t_loss_callback": True, "t_patcher": True,
          "t_module_inplace": True, "t_module_grad": True, "t_module_config": True,
          "t_module_kept": True, "t_sqlite": True, "t_sqlite_threads": True,
          "t_forever": False, "t_after_forever": False}


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("judge")
    (tmp / "scratch").mkdir()
    env = {**os.environ, "HOME": str(tmp), "IPYTHONDIR": str(tmp / "ipython"),
           "OMP_NUM_THREADS": "1"}
    names = ["double", "pair", "apply", "draw", "is_setup", "run_model", "boom", "liar",
             "patcher", "forever", "as_array", "grad_of", "write_file", "shrink", "accumulate",
             "set_size", "count_calls", "open_db", "insert", "leave_open", "count_rows", "memory_db"]
    job = {"token": "t", "params": "BUDGET = 'ci'", "setup": SETUP, "exercises": [STUDENT],
           "functions": names, "values": [], "cell_timeout": 15, "ready_timeout": 120,
           "tests": [{"id": k, "source": textwrap.dedent(v)} for k, v in TESTS.items()],
           "scratch": str(tmp / "scratch"),
           "worker": {"argv": [sys.executable, "-m", "grader.judge", "worker"], "env": env,
                      "cwd": str(tmp), "log": str(tmp / "worker.log")}}
    proc = subprocess.run([sys.executable, "-m", "grader.judge", "judge"], input=json.dumps(job),
                          capture_output=True, text=True, env=env, timeout=300)
    line = [l for l in proc.stdout.splitlines() if l.startswith("{")][-1]
    out = json.loads(line)
    assert "verdicts" in out, (out, proc.stderr[-2000:])
    return out["verdicts"]


@pytest.mark.parametrize("test_id", list(EXPECT))
def test_judge_verdict(verdicts, test_id):
    v = verdicts[test_id]
    assert v["passed"] is EXPECT[test_id], v


def test_messages(verdicts):
    assert "longer than" in verdicts["t_forever"]["message"]
    assert verdicts["t_after_forever"]["message"] == "a hidden test failed"  # never the hidden text
    assert "SECRET" not in json.dumps(verdicts)
    assert "wrong value" in verdicts["t_callback_assert"]["message"]
    assert verdicts["t_hidden_in_block"]["message"] == "a hidden test failed"
    assert "visible message" in verdicts["t_visible_in_block"]["message"]


def test_dask_engine_grades_exactly_as_local(tmp_path):
    """The same two submissions graded in this process and on a local Dask cluster: identical
    results, and the gradebook and feedback are written by this process in both cases."""
    import csv

    import nbformat

    from grader.grade import grade_folder
    from grader.lessons import find_lesson
    from grader.notebooks import exercises_only, make_submission, mistake_submission

    lesson = find_lesson("01")
    folder = tmp_path / "class"
    for student, nb in [("good", make_submission(lesson)),
                        ("wrong", mistake_submission(lesson, lesson.mistakes[0]))]:
        (folder / student).mkdir(parents=True)
        nbformat.write(exercises_only(nb), folder / student / f"{lesson.slug}.ipynb")
    timeouts = dict(cell_timeout=90, notebook_timeout=240, progress_bar=False,
                    progress=lambda *_: None, setup_problem="")
    local = grade_folder(folder, tmp_path / "local", jobs=2, **timeouts)
    dask = grade_folder(folder, tmp_path / "dask", jobs=2, scheduler="local", **timeouts)
    key = lambda rs: sorted((r.student, r.status, r.score, r.reason, sorted(r.cells.items()))  # noqa: E731
                            for r in rs)
    assert key(local) == key(dask)
    assert {r.student: r.score for r in dask} == {"good": 9.0, "wrong": 6.0}
    for out in ("local", "dask"):
        rows = list(csv.DictReader(open(tmp_path / out / "gradebook.csv")))
        assert {r["student"]: float(r["score"]) for r in rows} == {"good": 9.0, "wrong": 6.0}
        assert (tmp_path / out / "feedback" / "good" / f"{lesson.slug}.html").exists()


def test_module_state_from_a_worker_is_applied_as_data_only():
    """What a worker reports of a module it changed is copied into the judge's own module only as
    values: no method, private field or object is replaced, and a malformed report is refused."""
    import types

    from grader.judge import _apply_module_state

    lin = torch.nn.Linear(2, 3)
    lin.config = types.SimpleNamespace(size=3, extra=None)
    forward, params = lin.forward, lin._parameters
    state = {"tensors": [["", "p", "weight", torch.ones(1, 2), torch.ones(5), True],   # grad of a wrong shape
                         ["", "p", "added", torch.ones(1), None, True],                # a parameter the judge lacks
                         ["nope", "p", "weight", torch.ones(1), None, True]],          # a module it lacks
             "attrs": [["", {"out_features": 1, "forward": "x", "_parameters": {}, "added": 3}]],
             "configs": [["", {"size": 1, "extra": {"k": [1, 2]}, "__class__": "x"}]]}
    _apply_module_state(lin, state)
    assert lin.weight.shape == (1, 2) and lin.weight.grad is None and lin.weight.requires_grad
    assert lin.out_features == 1 and lin.forward == forward and lin._parameters is params
    assert not hasattr(lin, "added") and "added" not in lin._parameters
    assert lin.config.size == 1 and lin.config.extra == {"k": [1, 2]} and type(lin.config) is types.SimpleNamespace
    for bad in ([], {"tensors": [["", "p"]]}, {"attrs": [["", "not a dict"]]}, {"configs": "x"}):
        with pytest.raises(TypeError):
            _apply_module_state(lin, bad)
