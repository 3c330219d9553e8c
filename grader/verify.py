"""Phase 2 of grading: re-run every test cell in a fresh kernel the submission never touched.

nbgrader's autograde (phase 1) runs the student's cells and the restored test cells in ONE kernel,
so student code can patch whatever the tests rely on. Phase 2 does not trust that kernel: for each
test cell it builds a new kernel session containing only

1. the lesson's own parameters and setup cells (from the source, never from the submission),
2. a locked grader preamble that snapshots what the checks depend on (the builtins, ``torch``,
   ``torch.testing``, ``numpy.testing``, ``math``, the setup's names, the IPython shell's hooks,
   ``sys`` hooks...) before any student code runs,
3. the student's exercise code reduced to definitions (:func:`definitions_only`: imports, ``def``,
   ``class`` and plain ``name = value`` lines; top-level calls, loops and attribute writes are
   dropped), with every student function wrapped so it may only hand the tests values whose type
   does not redefine comparison, arithmetic or the tensor protocols,
4. the test cell restored from the source (hidden tests included),
5. a check cell that compares everything to the snapshot and prints a one-time nonce that no cell
   before it contains.

A test cell passes phase 2 only if it ran without error and its check cell printed its nonce.
The runner (``python -m grader.verify``, under :mod:`grader.sandbox` limits) reads its job as JSON
on stdin and writes one result line, tagged with a token it also got on stdin.
"""
from __future__ import annotations

import ast
import json
import secrets
import sys
import textwrap

MARK = "BREWSLM-INTEGRITY-OK"

# modules whose attributes a check may use: any existing attribute replaced or removed = tampering
WATCHED_MODULES = [
    "builtins", "math", "cmath", "operator", "functools", "itertools", "numbers", "re", "json",
    "copy", "random", "statistics", "inspect", "types", "warnings", "traceback", "unittest",
    "numpy", "numpy.testing", "numpy.testing._private.utils", "numpy.linalg", "numpy.random",
    "numpy.core.numeric", "numpy._core.numeric",
    "torch", "torch.testing", "torch.testing._comparison", "torch.nn", "torch.nn.functional",
    "torch.autograd", "torch.linalg", "torch.overrides", "torch._tensor", "torch.nn.modules.module",
    "pandas", "pandas.testing", "IPython", "IPython.core.interactiveshell", "ipykernel.zmqshell",
]
# names in sys that decide how errors and output are reported
WATCHED_SYS = ["displayhook", "stdout", "stderr", "settrace", "setprofile",
               "gettrace", "getprofile", "exc_info", "exit", "modules", "meta_path", "path_hooks"]
# dunders that decide a comparison, a truth value, a number or a tensor op: a value handed to the
# tests may not have a type defined after the setup cell that redefines one of them
JUDGING_DUNDERS = {
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__len__", "__hash__",
    "__float__", "__int__", "__index__", "__complex__", "__round__", "__trunc__", "__floor__",
    "__ceil__", "__abs__", "__neg__", "__pos__", "__invert__", "__add__", "__radd__", "__sub__",
    "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__floordiv__",
    "__rfloordiv__", "__mod__", "__rmod__", "__pow__", "__rpow__", "__matmul__", "__rmatmul__",
    "__and__", "__rand__", "__or__", "__ror__", "__xor__", "__rxor__", "__contains__",
    "__getattr__", "__getattribute__", "__class__", "__instancecheck__", "__subclasscheck__",
    "__torch_function__", "__torch_dispatch__", "__array__", "__array_ufunc__",
    "__array_function__", "__array_priority__", "__array_interface__", "__format__", "__str__",
    "__repr__", "__iter__", "__next__", "__getitem__", "__reversed__", "__enter__", "__exit__",
    "__del__",
}


# -- what runs in the kernel ----------------------------------------------------------------------
PREAMBLE = r'''
def __brewslm_make_guard():
    import builtins, functools, sys, threading, types
    from IPython import get_ipython
    _ip = get_ipython()
    _id, _isinst, _type, _len, _list, _dict, _set = id, isinstance, type, len, list, dict, set
    _vars, _getattr, _sorted, _str = vars, getattr, sorted, str
    WATCHED_MODULES = %(modules)r
    WATCHED_SYS = %(sys_names)r
    JUDGING = frozenset(%(dunders)r)

    def _all_classes():
        seen, todo = {}, [object]
        while todo:
            c = todo.pop()
            try:
                subs = type.__subclasses__(c)
            except TypeError:
                continue
            for s in subs:
                if _id(s) not in seen:
                    seen[_id(s)] = s
                    todo.append(s)
        return seen

    def _module_state():
        return {n: (sys.modules[n], _dict(_vars(sys.modules[n])))
                for n in WATCHED_MODULES if n in sys.modules}

    def _class_state():
        import torch, numpy
        cls = [torch.Tensor, torch._C.TensorBase, torch.nn.Module, torch.nn.Parameter,
               numpy.ndarray, numpy.generic, numpy.floating, numpy.integer, BaseException,
               AssertionError, type(_ip)] + _list(type(_ip).__mro__)
        return {c: _dict(_vars(c)) for c in cls}

    def _shell_state():
        return {
            "instance": _dict(_vars(_ip)),
            "input_transformers_cleanup": _list(_ip.input_transformers_cleanup),
            "input_transformers_post": _list(_ip.input_transformers_post),
            "ast_transformers": _list(_ip.ast_transformers),
            "events": {k: _list(v) for k, v in _ip.events.callbacks.items()},
            "custom_exceptions": _ip.custom_exceptions,
            "sys": {n: _getattr(sys, n, None) for n in WATCHED_SYS},
            "sys.modules": {n: sys.modules.get(n) for n in WATCHED_MODULES},
            "threading.settrace": _getattr(threading, "_trace_hook", None),
            "threading.setprofile": _getattr(threading, "_profile_hook", None),
        }

    MODS, CLASSES, SHELL = _module_state(), _class_state(), _shell_state()
    KNOWN = _all_classes()
    USER = {k: v for k, v in _ip.user_ns.items() if not k.startswith("_")
            and k not in ("In", "Out", "exit", "quit", "get_ipython")}
    INITIAL, _MISSING = _dict(_ip.user_ns), object()
    SHELL_KEYS = ("input_transformers_cleanup", "input_transformers_post", "ast_transformers")

    def _diff_dict(before, after, label, problems, ignore_new=True):
        for k, v in before.items():
            if k not in after:
                problems.append(f"{label}.{k} was deleted")
            elif after[k] is not v and not (k.startswith("__") and k in ("__loader__", "__spec__")):
                problems.append(f"{label}.{k} was replaced")

    def check(assigned=()):
        problems = []
        if sys.gettrace() is not None or sys.getprofile() is not None:
            problems.append("a trace/profile hook (sys.settrace/setprofile) is installed")
        for n, (m, d) in MODS.items():
            if sys.modules.get(n) is not m:
                problems.append(f"sys.modules[{n!r}] was replaced")
            now = _vars(m)
            for k, v in d.items():
                if k in ("__loader__", "__spec__", "__builtins__", "_", "__warningregistry__",
                         "input", "raw_input", "getpass"):  # ipykernel rebinds these per request
                    continue
                if k not in now:
                    problems.append(f"{n}.{k} was deleted")
                elif now[k] is not v:
                    problems.append(f"{n}.{k} was replaced")
        for c, d in CLASSES.items():
            now = _vars(c)
            for k, v in d.items():
                if k not in now or now[k] is not v:
                    problems.append(f"{c.__qualname__}.{k} was replaced")
            for k in now:
                if k not in d and k in JUDGING:
                    problems.append(f"{c.__qualname__}.{k} was added")
        s = _shell_state()
        for key in SHELL_KEYS:
            if s[key] != SHELL[key]:
                problems.append(f"IPython {key} changed")
        if s["events"] != SHELL["events"]:
            problems.append("IPython event callbacks changed")
        if s["custom_exceptions"] != SHELL["custom_exceptions"]:
            problems.append("IPython custom exception handlers changed")
        for k, v in s["instance"].items():
            if k not in SHELL["instance"] and _callable_attr(v):
                problems.append(f"the IPython shell's {k} was replaced")
        for k, v in SHELL["instance"].items():
            if _callable_attr(v) and s["instance"].get(k) is not v:
                problems.append(f"the IPython shell's {k} was replaced")
        for k, v in SHELL["sys"].items():
            if s["sys"][k] is not v:
                problems.append(f"sys.{k} was replaced")
        for k, v in SHELL["sys.modules"].items():
            if s["sys.modules"][k] is not v:
                problems.append(f"sys.modules[{k!r}] was replaced")
        if s["threading.settrace"] is not SHELL["threading.settrace"] or \
                s["threading.setprofile"] is not SHELL["threading.setprofile"]:
            problems.append("a threading trace/profile hook is installed")
        ns = _ip.user_ns
        for k, v in USER.items():
            if k in assigned:
                continue
            if k not in ns or ns[k] is not v:
                problems.append(f"the setup's name {k!r} was rebound")
        bdict = MODS["builtins"][1]
        for k in bdict:
            if k in ns and k not in assigned and not k.startswith("_") and ns[k] is not bdict[k] \
                    and INITIAL.get(k, _MISSING) is not ns[k]:
                problems.append(f"the builtin {k!r} is shadowed")
        return problems

    def _callable_attr(v):
        return _isinst(v, (types.FunctionType, types.MethodType, types.BuiltinFunctionType,
                           functools.partial))

    import os as _os
    from brewslm_helpers.paths import REPO_ROOT as _REPO
    ROOTS = tuple({_os.path.realpath(p) + _os.sep for p in
                   (sys.prefix, sys.base_prefix, sys.exec_prefix, _os.path.dirname(_os.__file__),
                    str(_REPO / "brewslm_helpers"))})

    def _library_file(path):
        return _isinst(path, _str) and _os.path.realpath(path).startswith(ROOTS)

    def _from_library(klass):
        """A class a library defined (imported lazily after the setup), not the student."""
        mod = sys.modules.get(_getattr(klass, "__module__", None) or "")
        if mod is None or klass.__module__ in ("__main__", "builtins") \
                or not _library_file(_getattr(mod, "__file__", None)):
            return False
        for v in _vars(klass).values():
            f = _getattr(v, "__func__", v)
            code = _getattr(f, "__code__", None)
            if code is not None and not _library_file(code.co_filename):
                return False
        return True

    def _generated_by_dataclass(klass, k):
        f = _vars(klass)[k]
        return ("__dataclass_fields__" in _vars(klass)
                and "__create_fn__" in _getattr(f, "__qualname__", ""))

    def _bad_type(t):
        """A type created after the setup cell, by the student, that redefines how values are
        judged (comparison, truth, arithmetic, the tensor and array protocols...)."""
        if _id(t) in KNOWN and KNOWN[_id(t)] is t:
            return None
        for klass in t.__mro__:
            if (_id(klass) in KNOWN and KNOWN[_id(klass)] is klass) or _from_library(klass):
                continue
            for k, v in _vars(klass).items():
                if k not in JUDGING or v is None or _generated_by_dataclass(klass, k):
                    continue
                code = _getattr(_getattr(v, "__func__", v), "__code__", None)
                if code is not None and _library_file(code.co_filename):
                    continue  # e.g. namedtuple's __repr__: written by the library, not the student
                return f"{klass.__qualname__}.{k}"
        if _id(_type(t)) not in KNOWN:  # a new metaclass
            for k in _vars(_type(t)):
                if k in JUDGING or k in ("__instancecheck__", "__subclasscheck__"):
                    return f"metaclass {_type(t).__qualname__}.{k}"
        return None

    def inspect_value(v, depth=0, seen=None):
        seen = set() if seen is None else seen
        if depth > 6 or _id(v) in seen:
            return None
        seen.add(_id(v))
        bad = _bad_type(_type(v))
        if bad:
            return bad
        if _type(v) in (list, tuple, set, frozenset):
            for i, item in enumerate(v):
                if i > 10000:
                    break
                bad = inspect_value(item, depth + 1, seen)
                if bad:
                    return bad
        elif _type(v) is dict:
            for i, (k, item) in enumerate(v.items()):
                if i > 10000:
                    break
                bad = inspect_value(k, depth + 1, seen) or inspect_value(item, depth + 1, seen)
                if bad:
                    return bad
        return None

    def guard_function(f):
        @functools.wraps(f)
        def guarded(*args, **kwargs):
            out = f(*args, **kwargs)
            bad = inspect_value(out)
            if bad:
                raise TypeError(f"{f.__name__} returned a value whose type redefines {bad}: the "
                                "grader does not accept values that decide their own comparisons")
            return out
        guarded.__brewslm_guarded__ = True
        return guarded

    def guard_new_functions(before):
        ns = _ip.user_ns
        for k, v in _list(ns.items()):
            if k.startswith("_") or (k in before and before[k] is v):
                continue
            if _type(v) is types.FunctionType and not _getattr(v, "__brewslm_guarded__", False):
                ns[k] = guard_function(v)

    return check, guard_new_functions


__brewslm_check, __brewslm_guard_new = __brewslm_make_guard()
del __brewslm_make_guard
'''


def preamble() -> str:
    return PREAMBLE % {"modules": WATCHED_MODULES, "sys_names": WATCHED_SYS,
                       "dunders": sorted(JUDGING_DUNDERS)}


def snapshot_cell() -> str:
    return "__brewslm_before = dict(get_ipython().user_ns)"


def guard_cell() -> str:
    return "__brewslm_guard_new(__brewslm_before)\ndel __brewslm_before"


def check_cell(nonce: str, assigned: list[str]) -> str:
    return textwrap.dedent(f"""\
        __brewslm_problems = __brewslm_check({sorted(set(assigned))!r})
        if __brewslm_problems:
            raise RuntimeError("grader integrity check: " + "; ".join(__brewslm_problems[:3]))
        print({MARK!r}, {nonce!r})
        """)


# -- building the job in the parent ---------------------------------------------------------------
KEEP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def definitions_only(source: str) -> str:
    """The definitions in a student's exercise cell, without its top-level side effects.

    Keeps imports, ``def``, ``class`` and assignments to plain names; drops every other top-level
    statement (calls, loops, ``with``, attribute and item assignments, ``del``...). IPython magics
    and code that does not parse are dropped too (it would fail in phase 1 anyway).
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        try:
            from IPython.core.inputtransformer2 import TransformerManager
            tree = ast.parse(TransformerManager().transform_cell(source))
        except Exception:
            return ""
    kept = []
    for node in tree.body:
        if isinstance(node, KEEP):
            kept.append(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if all(_plain_names(t) for t in targets) and node.value is not None:
                kept.append(node)
    return ast.unparse(ast.Module(body=kept, type_ignores=[]))


def _plain_names(target) -> bool:
    if isinstance(target, ast.Name):
        return True
    if isinstance(target, (ast.Tuple, ast.List)):
        return all(_plain_names(t) for t in target.elts)
    return False


def assigned_names(source: str) -> list[str]:
    """Names a (trusted) test cell binds itself: a test may rebind a setup name."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                names.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return sorted(names)


def build_job(params: str, setup: str, pairs: list[tuple[str, str, str]]) -> tuple[dict, dict]:
    """The phase-2 job for one submission.

    ``pairs``: ``(test_id, student_exercise_source, test_source)`` in notebook order.
    Returns ``(job, expected)``: the JSON job for the runner and, per test id, the index of its
    test cell, its check cell and the nonce the check cell must print.
    """
    cells = [{"role": "params", "source": params}, {"role": "setup", "source": setup},
             {"role": "preamble", "source": preamble()}]
    expected = {}
    for test_id, student, test in pairs:
        nonce = secrets.token_hex(16)
        cells.append({"role": "snapshot", "source": snapshot_cell()})
        cells.append({"role": "student", "source": definitions_only(student)})
        cells.append({"role": "guard", "source": guard_cell()})
        test_index = len(cells)
        cells.append({"role": "test", "source": test, "test_id": test_id})
        cells.append({"role": "check", "source": check_cell(nonce, assigned_names(test)),
                      "test_id": test_id})
        expected[test_id] = (test_index, test_index + 1, nonce)
    return {"cells": cells}, expected


def interpret(results: list[dict] | None, expected: dict, fatal: str = "") -> dict[str, str]:
    """``{test_id: ""}`` for a pass, else a one-line reason, from the runner's per-cell results."""
    verdicts = {}
    for test_id, (ti, ci, nonce) in expected.items():
        if results is None or len(results) <= ci:
            verdicts[test_id] = fatal or "the fresh-kernel re-check did not finish"
            continue
        setup_bad = next((r for r in results[:3] if r["status"] != "ok"), None)
        test, check = results[ti], results[ci]
        if setup_bad is not None:
            verdicts[test_id] = f"setup failed in the fresh kernel: {setup_bad['error']}"
        elif test["status"] != "ok":
            verdicts[test_id] = f"fails when re-run in a fresh kernel: {test['error']}"
        elif check["status"] != "ok":
            verdicts[test_id] = check["error"] or "grader integrity check failed"
        elif f"{MARK} {nonce}" not in check["stdout"]:
            verdicts[test_id] = "grader integrity check did not report"
        else:
            verdicts[test_id] = ""
    return verdicts


# -- the runner (in the sandbox) ------------------------------------------------------------------
def run_job(job: dict, cell_timeout: int, max_output_bytes: int, workdir: str) -> list[dict]:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    from .nbexec import OutputCap

    from traitlets import Integer

    class Client(OutputCap, NotebookClient):
        max_output_bytes = Integer(1_000_000).tag(config=True)

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c["source"]) for c in job["cells"]]
    client = Client(nb, timeout=cell_timeout, kernel_name="python3", allow_errors=True,
                    interrupt_on_timeout=True, resources={"metadata": {"path": workdir}},
                    max_output_bytes=max_output_bytes)
    replies: dict[int, dict] = {}
    client.on_cell_executed = lambda cell, cell_index, execute_reply: replies.__setitem__(
        cell_index, execute_reply["content"])
    results = []
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            try:
                client.execute_cell(cell, i)
            except (DeadKernelError, RuntimeError) as e:
                results.append({"status": "dead", "stdout": "",
                                "error": f"the kernel died ({type(e).__name__})"})
                break
            except CellTimeoutError:
                results.append({"status": "timeout", "stdout": "",
                                "error": f"cell took longer than {cell_timeout} s"})
                continue
            reply = replies.get(i, {})
            errors = [o for o in cell.outputs if o.get("output_type") == "error"]
            stdout = "".join(o.get("text", "") for o in cell.outputs
                             if o.get("output_type") == "stream" and o.get("name") == "stdout")
            if reply.get("status") != "ok" or errors:
                e = errors[0] if errors else reply
                results.append({"status": "error", "stdout": stdout[-2000:],
                                "error": f"{e.get('ename', 'Error')}: {e.get('evalue', '')}"[:300]})
            else:
                results.append({"status": "ok", "stdout": stdout[-2000:], "error": ""})
    return results


def main() -> int:
    job = json.loads(sys.stdin.buffer.read())
    token = job.pop("token")
    try:
        results = run_job(job, job.get("cell_timeout", 120), job.get("max_output_bytes", 1_000_000),
                          job.get("workdir", "."))
        out = {"token": token, "results": results}
    except Exception as e:  # the kernel could not start, ...
        out = {"token": token, "results": None, "error": f"{type(e).__name__}: {e}"[:300]}
    sys.stdout.write("\n" + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
