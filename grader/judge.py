"""The trusted judge: a submission's marks are decided in a process where no student code ran.

Two processes per submission:

* the **worker** (``python -m grader.judge worker``), inside the sandbox (:mod:`grader.sandbox`):
  it runs the lesson's parameters and setup cells, then the student's exercise code (reduced to its
  definitions, :func:`grader.verify.definitions_only`), then waits for calls;
* the **judge** (``python -m grader.judge judge``), started by the grader with a private, empty
  HOME and IPython/Jupyter folders: it runs the lesson's parameters and setup cells itself, binds
  each name the exercise defines (in the *solution*) to a :class:`RemoteFunction`, and runs every
  test cell, visible part then hidden part, with its own clean imports.

Every call of an exercise in a test cell is a message to the worker: the arguments go there by
``pickle`` (the trusted direction: the worker may unpickle what the judge made), with the lesson's
setup objects sent as references to the worker's own copies (a loaded model never crosses), with
functions the test defines (validators, hooks, lambdas) sent as *callbacks* that run back in the
judge, with ``torch.Generator`` states synchronised back after the call, and with every module the test
passed (``torch.nn.Module``, sent with its parameters' gradients) copied back into the judge's own
object after the call and before each callback: the weights, gradients and buffers that changed
(shapes included), plain settings (``in_features``, ``num_key_value_groups``...) and its config,
so that an exercise that changes a model in place (pruning, an optimiser step) is seen as it is in
the notebook. Only values cross, applied by the judge to modules of its own classes; a module the
function added or removed is not copied. An SQLite connection crosses as the file it is open on: one
the student's function returns becomes the judge's *own* connection to that file (so what the test
reads, the triggers and locks it meets, are the database's, not what the student's process says),
and passed back it stands for the worker's connection; one the test opened reaches the worker as the
worker's own connection to the same file (an in-memory database as a copy). What comes back is
data only, in a safe format (:func:`encode` / :func:`decode`: JSON plus raw buffers): ``None``,
bools, numbers, strings, bytes, lists, tuples, dicts, sets, torch tensors, numpy arrays and
scalars, dtypes, and references to objects the judge itself sent. No pickle in that direction,
nothing that can run code in the judge: a value that redefines ``__eq__`` arrives as plain numbers
or as an inert :class:`Opaque`. Tensors that need gradients cross through an autograd function
whose backward asks the worker for the gradients (``loss.backward()`` in a test cell works).

A test cell passes when it runs without an exception in the judge. The verdicts, and for the
feedback page a one-line message (a failure of the visible tests only: a hidden test that fails
says so, never how), are the judge's one result line.
"""
from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import types
import urllib.parse

MAX_MESSAGE = 512 * 2 ** 20    # bytes of one message from the worker
MAX_DEPTH = 200                 # nesting of one decoded value
HIDDEN = "### BEGIN HIDDEN TESTS"

TENSOR_DTYPES = ["float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64",
                 "uint8", "bool", "complex64", "complex128"]
SQLITE_EXCEPTIONS = {"Warning", "Error", "InterfaceError", "DatabaseError", "DataError",
                     "OperationalError", "IntegrityError", "InternalError", "ProgrammingError",
                     "NotSupportedError"}
SAFE_EXCEPTIONS = {n for n in dir(builtins) if isinstance(getattr(builtins, n), type)
                   and issubclass(getattr(builtins, n), Exception)}


class Opaque:
    """Something the worker returned that is not data (shown by its type name; equal to nothing)."""

    def __init__(self, type_name: str):
        self.type_name = type_name

    def __repr__(self):
        return f"<{self.type_name} object from the submission (not data)>"


class WorkerGone(BaseException):  # not an Exception: a test's `except Exception` cannot hide it
    """The worker died, or took longer than the time left for the test cell."""


# -- framing --------------------------------------------------------------------------------------
def send(f, header: dict, blobs: list[bytes] = ()) -> None:
    head = json.dumps(header).encode()
    parts = [struct.pack("<QI", len(head), len(blobs)), head]
    parts += [struct.pack("<Q", len(b)) for b in blobs]
    _write_all(f, b"".join(parts))
    for b in blobs:
        _write_all(f, b)
    f.flush()


def _write_all(f, data: bytes) -> None:
    view = memoryview(data)
    while len(view):
        n = f.write(view)
        if n is None:  # a non-blocking raw file that is full: wait for it
            time.sleep(0.001)
            continue
        view = view[n:]


def _read_exact(f, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = f.read(n - len(out))
        if not chunk:
            raise EOFError("channel closed")
        out += chunk
    return bytes(out)


def receive(f, limit: int = MAX_MESSAGE) -> tuple[dict, list[bytes]]:
    n_head, n_blobs = struct.unpack("<QI", _read_exact(f, 12))
    if n_head > limit or n_blobs > 1_000_000:
        raise ValueError("message too large")
    header = json.loads(_read_exact(f, n_head))
    sizes = [struct.unpack("<Q", _read_exact(f, 8))[0] for _ in range(n_blobs)]
    if n_head + sum(sizes) > limit:
        raise ValueError("message too large")
    if not isinstance(header, dict):
        raise ValueError("malformed message")
    return header, [_read_exact(f, s) for s in sizes]


# -- the safe codec (worker -> judge) -------------------------------------------------------------
def encode(x, blobs: list, refs: dict | None = None, setup: dict | None = None, depth: int = 0,
           keep=None):
    """A JSON tree for ``x`` (buffers appended to ``blobs``). ``refs``: ``{id(obj): n}`` of objects
    the judge sent; ``setup``: ``{id(obj): name}`` of the sender's setup objects; ``keep(obj) -> n``:
    in the worker, keeps an SQLite connection it returns (sent as the file it is open on, ``sq``)."""
    import numpy as np
    import torch

    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if refs and id(x) in refs:
        return {"r": refs[id(x)]}
    if setup and id(x) in setup and not isinstance(x, (bool, int, float, str, type(None))):
        return {"su": setup[id(x)]}
    t = type(x)
    if x is None or t in (bool, str):
        return x
    if t is int:
        return x if abs(x) < 2 ** 62 else {"i": str(x)}
    if t is float:
        return {"f": repr(x)} if x != x or x in (float("inf"), float("-inf")) else x
    rec = lambda v: encode(v, blobs, refs, setup, depth + 1, keep)  # noqa: E731
    if t is list:
        return {"l": [rec(v) for v in x]}
    if t is tuple or (isinstance(x, tuple) and hasattr(x, "_fields")):
        return {"u": [rec(v) for v in x]}
    if t is dict or (isinstance(x, dict) and t.__module__.startswith(("collections", "builtins"))):
        return {"d": [[rec(k), rec(v)] for k, v in dict.items(x)]}
    if t in (set, frozenset):
        return {"s" if t is set else "fs": [rec(v) for v in x]}
    if t in (bytes, bytearray):
        blobs.append(bytes(x))
        return {"b": len(blobs) - 1}
    if t is complex:
        return {"c": [x.real, x.imag]}
    if isinstance(x, torch.Tensor):
        if x.layout != torch.strided or x.is_quantized:
            return {"o": f"torch.Tensor ({x.layout})"}
        d = x.detach().to("cpu")
        if type(d) is not torch.Tensor:
            d = torch.Tensor._make_subclass(torch.Tensor, d)
        dtype = str(d.dtype).removeprefix("torch.")
        blobs.append(d.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                     if d.numel() else b"")
        return {"T": len(blobs) - 1, "dtype": dtype, "shape": list(d.shape),
                "rg": bool(x.requires_grad)}
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biufc":
            return {"o": f"numpy.ndarray ({x.dtype})"}
        a = np.ascontiguousarray(x)
        blobs.append(a.tobytes())
        return {"A": len(blobs) - 1, "dtype": a.dtype.str, "shape": list(a.shape)}
    if isinstance(x, np.generic) and np.dtype(t).kind in "biufc":
        blobs.append(np.asarray(x).tobytes())
        return {"N": len(blobs) - 1, "dtype": np.dtype(t).str}
    if t is torch.dtype:
        return {"dt": str(x).removeprefix("torch.")}
    if t is torch.Size:
        return {"sz": [int(v) for v in x]}
    if t is torch.device:
        return {"dev": str(x)}
    if keep is not None and isinstance(x, sqlite3.Connection):
        desc = _sqlite_settings(x)
        if desc.get("path"):
            return {"sq": {**desc, "ref": keep(x)}}
    return {"o": f"{getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', '?')}"}


def decode(tree, blobs: list[bytes], refs: dict | None = None, setup: dict | None = None,
           depth: int = 0, sqlite=None):
    """The value ``encode`` described: plain types only, built by the judge's own code.
    ``sqlite(settings) -> connection``: the judge's own connection to the file a returned SQLite
    connection is open on (:meth:`Connection.mirror_sqlite`)."""
    import numpy as np
    import torch

    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if tree is None or type(tree) in (bool, int, float, str):
        return tree
    if type(tree) is not dict or len(tree) == 0:
        raise ValueError("malformed value")
    rec = lambda v: decode(v, blobs, refs, setup, depth + 1, sqlite)  # noqa: E731
    kind = next(iter(tree))
    v = tree[kind]
    if kind == "i":
        return int(str(v)[:5000])
    if kind == "f":
        return float(str(v))
    if kind in ("l", "u", "s", "fs"):
        items = [rec(i) for i in _list(v)]
        return {"l": list, "u": tuple, "s": set, "fs": frozenset}[kind](items)
    if kind == "d":
        return {rec(_list(p)[0]): rec(_list(p)[1]) for p in _list(v)}
    if kind == "b":
        return bytes(blobs[int(v)])
    if kind == "c":
        return complex(float(_list(v)[0]), float(_list(v)[1]))
    if kind == "T":
        dtype = str(tree.get("dtype"))
        if dtype not in TENSOR_DTYPES:
            raise ValueError(f"tensor dtype {dtype!r} not accepted")
        dt = getattr(torch, dtype)
        shape = [int(s) for s in _list(tree.get("shape"))]
        buf = blobs[int(v)]
        n = 1
        for s in shape:
            n *= s
        if any(s < 0 for s in shape) or n * torch.empty((), dtype=dt).element_size() != len(buf):
            raise ValueError("tensor size does not match its data")
        if n == 0:
            return torch.empty(shape, dtype=dt)
        return torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(dt).reshape(shape)
    if kind == "A":
        dtype = np.dtype(str(tree.get("dtype")))
        if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
            raise ValueError(f"array dtype {dtype} not accepted")
        shape = tuple(int(s) for s in _list(tree.get("shape")))
        return np.frombuffer(bytearray(blobs[int(v)]), dtype=dtype).reshape(shape)
    if kind == "N":
        dtype = np.dtype(str(tree.get("dtype")))
        if dtype.kind not in "biufc" or dtype.fields is not None:
            raise ValueError("scalar dtype not accepted")
        return np.frombuffer(bytearray(blobs[int(v)]), dtype=dtype)[0]
    if kind == "dt":
        if str(v) not in TENSOR_DTYPES:
            raise ValueError("dtype not accepted")
        return getattr(torch, str(v))
    if kind == "sz":
        return torch.Size([int(s) for s in _list(v)])
    if kind == "dev":
        return torch.device(str(v)[:32])
    if kind == "r":
        if refs is None or v not in refs:
            raise ValueError("unknown reference")
        return refs[v]
    if kind == "su":
        if setup is None or str(v) not in setup:
            raise ValueError("unknown setup name")
        return setup[str(v)]
    if kind == "o":
        return Opaque(str(v)[:200])
    if kind == "sq":
        if sqlite is None or type(v) is not dict:
            return Opaque("sqlite3.Connection")
        return sqlite(v)
    raise ValueError(f"unknown value kind {kind!r}")


def _list(v) -> list:
    if type(v) is not list:
        raise ValueError("malformed value")
    return v


def _sqlite_settings(c) -> dict:
    """What it takes to open another connection like ``c``: its main database file ("" when in
    memory), whether rows come back as ``sqlite3.Row``, its isolation level, busy timeout (ms) and
    whether foreign keys are enforced (per connection in SQLite)."""
    try:
        files = {r[1]: r[2] for r in c.execute("PRAGMA database_list").fetchall()}
        return {"path": str(files.get("main") or ""), "row": c.row_factory is sqlite3.Row,
                "iso": c.isolation_level,
                "timeout_ms": int(c.execute("PRAGMA busy_timeout").fetchone()[0]),
                "fk": bool(c.execute("PRAGMA foreign_keys").fetchone()[0])}
    except Exception:  # closed, or not a real connection
        return {}


def _sqlite_open(target: str, settings: dict, uri: bool = False, factory=sqlite3.Connection):
    """A connection to ``target`` with the ``settings`` of :func:`_sqlite_settings` (checked)."""
    iso = settings.get("iso")
    if iso not in (None, "", "DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
        iso = ""
    timeout = settings.get("timeout_ms")
    timeout = min(max(float(timeout), 0.0), 600_000.0) / 1000 if type(timeout) in (int, float) else 5.0
    c = sqlite3.connect(target, timeout=timeout, isolation_level=iso, check_same_thread=False,
                        uri=uri, factory=factory)
    c.execute("PRAGMA trusted_schema=OFF")
    if settings.get("fk") is True:
        c.execute("PRAGMA foreign_keys=ON")
    if settings.get("row") is True:
        c.row_factory = sqlite3.Row
    return c


class MirrorConnection(sqlite3.Connection):
    """The judge's own connection to the SQLite file a connection the worker returned is open on
    (what the test reads there is in the file, not what the student's process says); passed back
    to the student's function, it stands for the worker's connection (``worker_ref``)."""
    worker_ref = None
    worker_generation = None


def _tensors(x, out: list, depth: int = 0) -> list:
    """Tensors in ``x`` in a fixed order (lists, tuples, dicts), as the codec walks them."""
    import torch

    if depth > MAX_DEPTH:
        return out
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif type(x) in (list, tuple) or isinstance(x, tuple):
        for v in x:
            _tensors(v, out, depth + 1)
    elif isinstance(x, dict):
        for v in dict.values(x):
            _tensors(v, out, depth + 1)
    return out


# -- the worker (in the sandbox, runs the student's code) ----------------------------------------
def _channel():
    """The protocol's ends (the process's original stdin/stdout); print() goes to stderr."""
    rd = os.fdopen(os.dup(0), "rb", buffering=0)
    wr = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return rd, wr


def _shell():
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    c = Config()
    c.HistoryManager.enabled = False
    c.InteractiveShell.colors = "nocolor"
    shell = InteractiveShell.instance(config=c)
    shell.enable_gui = lambda gui=None: None  # `%matplotlib inline` without a kernel: nothing to do
    return shell


def _run(shell, source: str) -> str:
    """Run one cell; "" or the error as one line."""
    result = shell.run_cell(source, store_history=False, silent=False)
    err = result.error_before_exec or result.error_in_exec
    return "" if err is None else f"{type(err).__name__}: {err}"[:500]


class _WorkerUnpickler(pickle.Unpickler):
    def __init__(self, f, worker, payloads):
        super().__init__(f)
        self.worker, self.payloads = worker, payloads

    def persistent_load(self, pid):
        kind = pid[0]
        w = self.worker
        if kind == "setup":
            return w.shell.user_ns[pid[1]]
        if kind == "cb":
            return w.callback_stub(pid[1])
        if kind == "obj":  # a module, sent whole: it replaces the copy kept from earlier calls
            n = pid[1]
            if n not in w.objects:
                obj = w.objects[n] = w.kept[n] = _WorkerUnpickler(
                    io.BytesIO(self.payloads[n]), w, self.payloads).load()
                w.refs[id(obj)] = n
                grads = self.payloads.get(f"grad{n}")
                if grads:  # pickle leaves .grad behind: the judge sends it apart
                    params = dict(obj.named_parameters())
                    for name, g in pickle.loads(grads).items():
                        if name in params:
                            params[name].grad = g
                w.baselines[n] = _signatures(obj)
            return w.objects[n]
        if kind == "keep":  # a module unchanged in the judge since the last call: the copy here
            n = pid[1]
            if n not in w.objects:
                if n not in w.kept:
                    raise pickle.UnpicklingError("a module this process no longer has")
                obj = w.objects[n] = w.kept[n]
                w.refs[id(obj)] = n
                w.baselines[n] = _signatures(obj)
            return w.objects[n]
        if kind == "wconn":  # a connection this process returned earlier: its own object
            obj = w.returned.get(pid[1])
            if obj is None:
                raise pickle.UnpicklingError("a connection this process no longer has")
            return obj
        if kind == "sqlite":  # the judge's own connection: one of ours on the same file
            n, settings = pid[1], pid[2]
            if settings.get("mem") is not None:  # in memory: a copy, fresh for each call
                c = _sqlite_open(":memory:", settings)
                c.deserialize(settings["mem"])
            else:
                c = w.opened.get(n)
                if c is None:
                    c = w.opened[n] = _sqlite_open(settings["path"], settings)
            w.refs[id(c)] = n
            return c
        if kind == "gen":
            import torch

            g = torch.Generator()
            g.set_state(pid[2])
            w.generators[pid[1]] = g
            w.refs[id(g)] = pid[1]
            return g
        raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")


class Worker:
    def __init__(self, rd, wr):
        self.rd, self.wr = rd, wr
        self.shell = None
        self.objects, self.refs, self.generators = {}, {}, {}
        self.baselines = {}  # object number -> _signatures() of a module as it arrived
        self.kept = {}  # module key -> this process's copy, kept across calls (as in a notebook)
        self.graphs = {}  # call id -> (inputs, outputs) kept for backward
        self.local = {}   # callback id -> the judge's function, sent to run here
        self.returned = {}  # number -> an SQLite connection the student's code returned (kept)
        self.opened = {}    # the judge's connection's number -> this process's connection to its file

    def keep(self, obj) -> int:
        for n, c in self.returned.items():
            if c is obj:
                return n
        n = len(self.returned)
        self.returned[n] = obj
        return n

    def callback_stub(self, n):
        def callback(*args, **kwargs):
            if n in self.local:
                return self.local[n](*args, **kwargs)
            blobs = []
            tree = encode([list(args), kwargs], blobs, self.refs, keep=self.keep)
            mods = self.module_states(blobs)
            send(self.wr, {"op": "callback", "cb": n, "args": tree, "mods": mods}, blobs)
            value = self.serve(until_reply=True)
            if isinstance(value, _RunHere):  # the judge sent the function itself: run it here
                self.local[n] = value.fn
                return value.fn(*args, **kwargs)
            return value
        callback.__name__ = f"judge_callback_{n}"
        return callback

    def module_states(self, blobs: list) -> dict:
        """``{object number: state}`` of every module the judge sent in this call (see
        :func:`_module_state`); the tensors' buffers are appended to ``blobs``."""
        out = {}
        for n, obj in self.objects.items():
            if _is_module(obj):
                try:
                    out[str(n)] = _module_state(obj, self.baselines.get(n, {}), blobs, self.refs)
                except Exception:  # not reported: the judge sends its own copy next time
                    pass
        return out

    def start(self) -> None:
        job = json.loads(receive(self.rd)[0]["job"])
        self.shell = _shell()
        errors = {}
        for role in ("params", "setup"):
            err = _run(self.shell, job[role])
            if err:
                errors[role] = err
        for code in job["exercises"]:
            _run(self.shell, code)
        send(self.wr, {"op": "ready", "errors": errors})

    def serve(self, until_reply: bool = False):
        while True:
            header, blobs = receive(self.rd, limit=2 ** 40)
            op = header.get("op")
            if op in ("cbresult", "cberror", "cbvalue"):
                if not until_reply:
                    continue
                if op == "cbvalue":
                    payloads = pickle.loads(blobs[1]) if len(blobs) > 1 else {}
                    return _RunHere(_WorkerUnpickler(io.BytesIO(blobs[0]), self, payloads).load())
                if op == "cberror":
                    raise RuntimeError(header.get("msg", "the judge's callback failed"))
                payloads = pickle.loads(blobs[1]) if len(blobs) > 1 else {}  # the judge's: trusted
                return _WorkerUnpickler(io.BytesIO(blobs[0]), self, payloads).load()
            if op == "quit":
                return None
            try:
                self.handle(op, header, blobs)
            except BaseException as e:  # the student's code raised (or exited): report it
                if isinstance(e, KeyboardInterrupt):
                    raise
                out = []
                send(self.wr, {"op": "error", "type": type(e).__name__,
                               "module": str(getattr(type(e), "__module__", "")), "msg": _safe_str(e),
                               "mods": self.module_states(out) if op == "call" else {}}, out)

    def handle(self, op: str, header: dict, blobs: list[bytes]) -> None:
        import torch

        if op == "get":
            value = self.shell.user_ns[header["name"]]
            out = []
            send(self.wr, {"op": "result", "value": encode(value, out, self.refs, keep=self.keep)},
                 out)
            return
        if op == "call":
            self.objects, self.refs, self.generators, self.local = {}, {}, {}, {}
            self.baselines = {}
            payloads = pickle.loads(blobs[1]) if len(blobs) > 1 else {}
            args, kwargs = _WorkerUnpickler(io.BytesIO(blobs[0]), self, payloads).load()
            fn = self.shell.user_ns.get(header["name"])
            if fn is None:
                raise NameError(f"name {header['name']!r} is not defined")
            grad_inputs = [t for t in _tensors([args, kwargs], []) if t.requires_grad] \
                if header.get("grad") else []
            with torch.enable_grad() if grad_inputs else _nothing():
                value = fn(*args, **kwargs)
            out = []
            tree = encode(value, out, self.refs, keep=self.keep)
            reply = {"op": "result", "value": tree,
                     "gens": {str(n): encode(g.get_state(), out) for n, g in self.generators.items()},
                     "mods": self.module_states(out)}
            if grad_inputs:
                outs = _tensors(value, [])
                self.graphs[header["call"]] = (grad_inputs, outs)
                reply["rg"] = [bool(t.requires_grad) for t in outs]
            send(self.wr, reply, out)
            return
        if op == "backward":
            inputs, outs = self.graphs[header["call"]]
            grads = pickle.loads(blobs[0])
            pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad and g is not None]
            if pairs:
                got = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                                          allow_unused=True, retain_graph=True)
            else:
                got = [None] * len(inputs)
            out = []
            send(self.wr, {"op": "result", "value": encode(list(got), out)}, out)
            return
        raise ValueError(f"unknown request {op!r}")


class _RunHere:
    def __init__(self, fn):
        self.fn = fn


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _safe_str(e) -> str:
    try:
        return str(e)[:2000]
    except BaseException:
        return "(unprintable)"


def _is_module(obj) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)


def _signature(t):
    """What identifies a tensor's contents without reading them: object, storage, shape, version."""
    if t is None:
        return None
    try:
        return (id(t), t.data_ptr(), tuple(t.shape), t._version)
    except Exception:  # no storage (a meta tensor...): always sent
        return ("?", id(t))


def _signatures(module) -> dict:
    """``{(path, kind, name): (signature of the tensor, signature of its .grad)}``."""
    out = {}
    for path, m in module.named_modules():
        for kind, table in (("p", m._parameters), ("b", m._buffers)):
            for name, t in table.items():
                out[(path, kind, name)] = (_signature(t), _signature(getattr(t, "grad", None)))
    return out


def _fingerprint(module) -> tuple:
    """In the judge: what would tell that the test changed ``module`` since the worker last
    reported it (tensors, gradients, hooks, settings, config); equal means the worker's copy is
    still the same module."""
    out = []
    for path, m in module.named_modules():
        d = vars(m)
        out.append((path, id(m), type(m), _signatures(m) if m is module else None,
                    tuple((k, tuple(v)) for k, v in d.items() if "hook" in k and isinstance(v, dict)),
                    tuple(sorted((k, repr(v)) if _plain(v) else (k, id(v)) for k, v in d.items()
                                 if not k.startswith("_")))))
        cfg = d.get("config")
        if cfg is not None and not _is_module(cfg):
            out.append((path, "config", tuple(sorted((k, repr(v)) for k, v in _vars(cfg).items()
                                                     if _plain(v)))))
    return tuple(out)


def _plain(v, depth: int = 0) -> bool:
    """A setting that can cross as data: None, bools, numbers, strings, and lists/tuples/dicts of them."""
    if v is None or type(v) in (bool, int, float, str):
        return True
    if depth < 4 and type(v) in (list, tuple):
        return len(v) <= 1000 and all(_plain(x, depth + 1) for x in v)
    if depth < 4 and type(v) is dict:
        return len(v) <= 1000 and all(type(k) is str and _plain(x, depth + 1) for k, x in v.items())
    return False


def _module_state(module, baseline: dict, blobs: list, refs: dict) -> dict:
    """In the worker: what changed in ``module`` since it arrived, as data for :func:`encode`.

    ``{"tensors": [[path, "p"|"b", name, tensor, grad, requires_grad]], "attrs": [[path, {name:
    value}]], "configs": [[path, {name: value}]]}``: every parameter or buffer whose tensor or
    gradient changed (replaced, resized, written in place), every module's public plain settings,
    and each config object once (at the first module that holds it)."""
    tensors, attrs, configs, seen = [], [], [], set()
    for path, m in module.named_modules():
        attrs.append([path, {k: v for k, v in vars(m).items()
                             if not k.startswith("_") and _plain(v)}])
        for kind, table in (("p", m._parameters), ("b", m._buffers)):
            for name, t in table.items():
                grad = getattr(t, "grad", None) if kind == "p" else None
                if t is None or baseline.get((path, kind, name)) == (_signature(t), _signature(grad)):
                    continue
                tensors.append([path, kind, name, t, grad, bool(t.requires_grad)])
        cfg = vars(m).get("config")
        if cfg is not None and id(cfg) not in seen and not _is_module(cfg):
            seen.add(id(cfg))
            configs.append([path, {k: v for k, v in _vars(cfg).items()
                                   if not k.startswith("_") and _plain(v)}])
    return encode({"tensors": tensors, "attrs": attrs, "configs": configs}, blobs, refs)


def _apply_module_state(module, state) -> None:
    """In the judge: copy a worker's :func:`_module_state` (decoded, plain data) into the judge's
    own ``module``. Tensors are written into the judge's parameters and buffers (``.data``, so a
    reference the test holds sees them; shapes may change), gradients set, settings and config
    entries set where they are plain data (never replacing a method or an object)."""
    import torch

    if type(state) is not dict:
        raise TypeError("malformed module state")
    mods = dict(module.named_modules())
    for entry in state.get("tensors") or []:
        if type(entry) is not list or len(entry) != 6:
            raise TypeError("malformed module state")
        path, kind, name, value, grad, requires_grad = entry
        m = mods.get(path) if type(path) is str else None
        table = None if m is None else {"p": m._parameters, "b": m._buffers}.get(kind)
        if table is None or name not in table or table[name] is None or type(value) is not torch.Tensor:
            continue  # a module, parameter or buffer the function added: not copied
        t = table[name]
        with torch.no_grad():
            t.data = value.to(t.dtype) if value.dtype != t.dtype and value.is_floating_point() else value
        if kind == "p":
            t.requires_grad_(requires_grad is True)
            t.grad = grad.to(t.dtype) if type(grad) is torch.Tensor and grad.shape == t.shape else None
    for path, settings in _pairs(state.get("attrs")):
        m = mods.get(path)
        if m is None:
            continue
        for k, v in settings.items():
            if type(k) is str and not k.startswith("_") and k in vars(m) and _plain(vars(m)[k]) \
                    and _plain(v):
                object.__setattr__(m, k, v) if k != "training" else m.train(v is True)
    for path, settings in _pairs(state.get("configs")):
        cfg = vars(mods[path]).get("config") if path in mods else None
        if cfg is None or _is_module(cfg):
            continue
        for k, v in settings.items():
            if type(k) is str and not k.startswith("_") and _plain(v) \
                    and (k not in _vars(cfg) or _plain(_vars(cfg)[k])) \
                    and not callable(getattr(type(cfg), k, None)):
                setattr(cfg, k, v)


def _vars(obj) -> dict:
    d = getattr(obj, "__dict__", None)
    return d if type(d) is dict else {}


def _pairs(x) -> list:
    if not x:
        return []
    if type(x) is not list or not all(type(e) is list and len(e) == 2 and type(e[0]) is str
                                       and type(e[1]) is dict for e in x):
        raise TypeError("malformed module state")
    return x


def worker_main() -> int:
    rd, wr = _channel()
    w = Worker(rd, wr)
    try:
        w.start()
        w.serve()
    except (EOFError, OSError):  # the judge closed the channel (done, or it stopped this worker)
        pass
    return 0


# -- the judge (trusted) -------------------------------------------------------------------------
try:  # functions and classes a test defines, by value, where one must run in the worker
    from cloudpickle import Pickler as _Pickler
except ImportError:  # pragma: no cover
    _Pickler = pickle.Pickler


class _JudgePickler(_Pickler):
    """Pickles a call's arguments for the worker: setup objects by name, the test's own functions
    as callbacks, modules and generators by reference (so they can be named back)."""

    def __init__(self, f, conn, payloads, by_value=None):
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self.conn, self.payloads, self.root = conn, payloads, None
        self.by_value = by_value  # a function sent as code, not as a callback

    def persistent_id(self, obj):
        import torch

        conn = self.conn
        if obj is self.root:
            return None
        name = conn.setup_ids.get(id(obj))
        if name is not None and not isinstance(obj, (bool, int, float, str, type(None))):
            return ("setup", name)
        if obj is self.by_value:
            return None
        if isinstance(obj, (types.FunctionType, types.MethodType)) and _test_defined(obj):
            return ("cb", conn.register(obj))
        if isinstance(obj, types.BuiltinFunctionType) and obj.__module__ in (None, "__main__"):
            return ("cb", conn.register(obj))
        if isinstance(obj, torch.Generator):
            return ("gen", conn.register(obj), obj.get_state())
        if isinstance(obj, sqlite3.Connection):
            if isinstance(obj, MirrorConnection) and obj.worker_generation == conn.generation:
                return ("wconn", obj.worker_ref)
            settings = _sqlite_settings(obj)
            if not settings:
                raise pickle.PicklingError("a closed SQLite connection")
            if not settings["path"]:
                settings["mem"] = obj.serialize()
            return ("sqlite", conn.register(obj), settings)
        if isinstance(obj, torch.nn.Module) and self.root is None:
            n = conn.module_key(obj)
            if n not in self.payloads and conn.fingerprints.get(n) == _fingerprint(obj):
                self.payloads[n] = None  # unchanged since the worker last reported it: kept there
            if self.payloads.get(n, b"") is None:
                return ("keep", n)
            if n not in self.payloads:
                conn.fingerprints.pop(n, None)  # the worker's copy is replaced (or changes) now
                self.payloads[n] = b""  # placeholder: a module may refer to itself
                buf = io.BytesIO()
                p = _JudgePickler(buf, conn, self.payloads)
                p.root = obj
                p.dump(obj)
                self.payloads[n] = buf.getvalue()
                grads = {k: v.grad.detach().clone() for k, v in obj.named_parameters()
                         if v.grad is not None}
                if grads:
                    self.payloads[f"grad{n}"] = pickle.dumps(grads)
            return ("obj", n)
        return None


def _test_defined(fn) -> bool:
    """A function the test cell or setup defined (not importable by the worker)."""
    f = getattr(fn, "__func__", fn)
    mod = getattr(f, "__module__", None)
    return mod in (None, "__main__", "builtins") or "<locals>" in getattr(f, "__qualname__", "") \
        or "<lambda>" in getattr(f, "__qualname__", "")


class Connection:
    """The judge's end of one worker, restarted after it dies or times out."""

    def __init__(self, start, ready_timeout: float):
        self._start, self.ready_timeout = start, ready_timeout
        self.proc = None
        self.deadline = float("inf")
        self.setup_ids: dict[int, str] = {}
        self.setup_objs: dict[str, object] = {}
        self.table: dict = {}  # number or module key -> the judge's object, for the whole job
        self.ids: dict[int, int] = {}
        self._numbered = -1
        self.calls = 0
        self.ready_errors: dict = {}
        self.cb_error = None
        # modules the test passed: a key per module for the whole job ("m0", "m1"...), and the
        # fingerprint each had when the worker last reported its copy (then it is not sent again)
        self.modules: dict[str, object] = {}
        self.module_keys: dict[int, str] = {}
        self.fingerprints: dict[str, tuple] = {}
        self.cell_timeout = 120.0
        self.scratch = ""  # a folder the test and the student's function share (both may write)
        self.generation = 0  # the worker's number (restarts): its kept connections are its own
        self.mirrors: list = []  # the judge's connections to files the worker's connections use
        self.lock = threading.RLock()  # one call at a time (a test may call from several threads)

    def launch(self) -> None:
        self.generation += 1
        self.proc = self._start()
        self.ready_at = time.monotonic()

    def wait_ready(self) -> dict:
        header, _ = self._receive(time.monotonic() + self.ready_timeout)
        if header.get("op") != "ready":
            raise WorkerGone("the submission's process did not start")
        self.ready_errors = header.get("errors") or {}
        if not isinstance(self.ready_errors, dict):
            self.ready_errors = {"setup": "malformed"}
        return self.ready_errors

    def ensure(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.kill()
            self.launch()
            self.wait_ready()
            # the restart (the lesson's setup, again) is not the test cell's time
            self.deadline = max(self.deadline, time.monotonic() + self.cell_timeout)

    def mirror_sqlite(self, settings: dict):
        """The judge's own connection to the file of an SQLite connection the worker returned, if
        that file is a plain file inside the shared scratch folder; else an :class:`Opaque`."""
        path = settings.get("path")
        ref = settings.get("ref")
        if type(path) is not str or type(ref) is not int or not self.scratch:
            return Opaque("sqlite3.Connection")
        root = os.path.realpath(self.scratch)
        real = os.path.realpath(path)
        if os.path.commonpath([real, root]) != root or os.path.islink(path) or not os.path.isfile(real):
            return Opaque("sqlite3.Connection (its file is not in the test's temporary folder)")
        c = _sqlite_open(f"file:{urllib.parse.quote(real)}?mode=rw", settings, uri=True,
                         factory=MirrorConnection)
        c.worker_ref, c.worker_generation = ref, self.generation
        self.mirrors.append(c)
        return c

    def close_mirrors(self) -> None:
        for c in self.mirrors:
            try:
                c.close()
            except Exception:
                pass
        self.mirrors.clear()

    def module_key(self, obj) -> str:
        """The key of a module for this job (the module is kept alive: the key stays its own)."""
        key = self.module_keys.get(id(obj))
        if key is None or self.modules.get(key) is not obj:
            key = f"m{len(self.modules)}"
            self.modules[key] = obj
            self.module_keys[id(obj)] = key
        self.table[key] = obj
        return key

    def kill(self) -> None:
        self.fingerprints.clear()  # a new worker has no copies
        if self.proc is not None:
            from . import sandbox

            sandbox.stop(self.proc)
            self.proc = None

    def register(self, obj) -> int:
        """The number of a callback or generator for this whole job (a module the worker keeps may
        call a callback it was sent in an earlier call); the table keeps each object alive."""
        if id(obj) not in self.ids:
            n = self._numbered = self._numbered + 1
            self.table[n] = obj
            self.ids[id(obj)] = n
        return self.ids[id(obj)]

    def _receive(self, deadline: float):
        import select

        fd = self.proc.stdout
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            self.kill()
            raise WorkerGone("took longer than the time limit for this test cell")
        try:
            return receive(fd)
        except (EOFError, OSError, ValueError, struct.error) as e:
            self.kill()
            raise WorkerGone(f"the submission's process died ({type(e).__name__})") from None

    def request(self, header: dict, blobs: list[bytes]):
        """Send a request; serve the worker's callbacks until its answer; returns the decoded
        value and the reply's header. Between requests every process of the worker is stopped
        (SIGSTOP) and the shared scratch folder cleaned of links and special files, so what the
        test cell then reads there is what the student's function wrote, nothing it points at."""
        self.ensure()
        self._signal(signal.SIGCONT)
        try:
            send(self.proc.stdin, header, blobs)
        except OSError:
            self.kill()
            raise WorkerGone("the submission's process died") from None
        try:
            return self._answer()
        finally:
            self._signal(signal.SIGSTOP)
            _clean_scratch(self.scratch)

    def _signal(self, sig) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            import psutil

            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except Exception:
            return
        for p in procs:
            try:
                p.send_signal(sig)
            except Exception:
                pass

    def _answer(self):
        while True:
            reply, rblobs = self._receive(self.deadline)
            op = reply.get("op")
            if op == "callback":
                self._serve_callback(reply, rblobs)
                continue
            failed, self.cb_error = self.cb_error, None
            if failed is not None:  # the test's own check inside a callback failed: so does the test
                raise failed
            if op == "error":  # what the function changed before it raised stays changed
                self.sync_modules(reply, rblobs)
                raise _exception(str(reply.get("type", "Error")), str(reply.get("msg", "")),
                                 str(reply.get("module", "")))
            if op != "result":
                self.kill()
                raise WorkerGone("the submission's process broke the protocol")
            self.sync_modules(reply, rblobs)
            try:
                value = decode(reply.get("value"), rblobs, self.table, self.setup_objs,
                               sqlite=self.mirror_sqlite)
            except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
                raise TypeError(f"the function returned something the grader cannot read ({e})") \
                    from None
            return value, reply, rblobs

    def sync_modules(self, reply, rblobs) -> None:
        """Copy the modules' changes the worker reported into the judge's objects."""
        mods = reply.get("mods")
        if not mods:
            return
        if type(mods) is not dict:
            raise TypeError("malformed module states")
        try:
            for n, tree in mods.items():
                obj = self.modules.get(n)
                if _is_module(obj):
                    self.fingerprints.pop(n, None)
                    _apply_module_state(obj, decode(tree, rblobs, self.table, self.setup_objs))
                    self.fingerprints[n] = _fingerprint(obj)
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError, AttributeError) as e:
            raise TypeError(f"the grader cannot copy back what the function did to a module "
                            f"({type(e).__name__}: {e})"[:300]) from None

    def _serve_callback(self, reply, rblobs) -> None:
        try:
            self.sync_modules(reply, rblobs)
            fn = self.table[reply["cb"]] if type(reply.get("cb")) is int else None
            if not callable(fn):
                raise ValueError("unknown callback")
            args, kwargs = decode(reply.get("args"), rblobs, self.table, self.setup_objs,
                                  sqlite=self.mirror_sqlite)
            if type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
                raise ValueError("malformed callback arguments")
            value = fn(*args, **kwargs)
            buf, payloads = io.BytesIO(), {}
            if any(t.requires_grad for t in _tensors(value, [])):
                # a differentiable result (a loss the student's code will backpropagate): the
                # worker must compute it on its own objects, so the function goes there as code
                _JudgePickler(buf, self, payloads, by_value=fn).dump(fn)
                send(self.proc.stdin, {"op": "cbvalue"}, [buf.getvalue(), pickle.dumps(payloads)])
                return
            _JudgePickler(buf, self, payloads).dump(value)
            send(self.proc.stdin, {"op": "cbresult"}, [buf.getvalue(), pickle.dumps(payloads)])
        except Exception as e:  # the test's own helper failed on what the student sent
            self.cb_error = e
            send(self.proc.stdin, {"op": "cberror", "msg": f"{type(e).__name__}: {e}"[:500]})


def _clean_scratch(folder: str) -> None:
    """Remove every link, hard-linked or special file below ``folder`` (never followed)."""
    import stat

    if not folder or not os.path.isdir(folder):
        return
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            bad = stat.S_ISLNK(st.st_mode) or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)) \
                or (stat.S_ISREG(st.st_mode) and st.st_nlink > 1)
            if bad:
                try:
                    os.unlink(path)
                except OSError:
                    pass


def _exception(name: str, msg: str, module: str = "builtins") -> BaseException:
    """The judge's own exception for one the worker reported by name: a builtin one, or one of
    ``sqlite3``'s (a test catches ``sqlite3.DatabaseError``); anything else as a RuntimeError."""
    if module == "sqlite3" and name in SQLITE_EXCEPTIONS:
        return getattr(sqlite3, name)(msg)
    if name in SAFE_EXCEPTIONS and name not in ("SystemExit", "KeyboardInterrupt", "GeneratorExit"):
        cls = getattr(builtins, name)
        try:
            return cls(msg)
        except Exception:
            pass
    return RuntimeError(f"{name[:80]}: {msg}")


class RemoteFunction:
    """Stands in the judge for a function the student defined: each call runs it in the worker."""

    def __init__(self, name: str, conn: Connection):
        self.__name__ = self.name = name
        self.conn = conn

    def __repr__(self):
        return f"<the submission's {self.name}>"

    def __call__(self, *args, **kwargs):
        import torch

        grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in _tensors([args, kwargs], []))
        if grad:
            return _bridge(self, args, kwargs)
        value, _, _ = self._call(args, kwargs, grad=False)
        return value

    def _call(self, args, kwargs, grad: bool):
        with self.conn.lock:  # a test may call from several threads: one call at a time
            conn = self.conn
            conn.calls += 1
            payloads: dict = {}
            buf = io.BytesIO()
            _JudgePickler(buf, conn, payloads).dump((args, kwargs))
            for key in payloads:  # the worker reports these after the call; until then, unknown
                if key in conn.modules:
                    conn.fingerprints.pop(key, None)
            payloads = {k: v for k, v in payloads.items() if v is not None}
            blobs = [buf.getvalue(), pickle.dumps(payloads)]
            value, reply, rblobs = conn.request({"op": "call", "name": self.name, "grad": grad,
                                                 "call": conn.calls}, blobs)
            gens = reply.get("gens") or {}
            if isinstance(gens, dict):
                import torch

                for n, tree in gens.items():
                    g = conn.table.get(int(n)) if str(n).isdigit() else None
                    if isinstance(g, torch.Generator):
                        state = decode(tree, rblobs)
                        if isinstance(state, torch.Tensor) and state.dtype == torch.uint8:
                            try:
                                g.set_state(state)
                            except RuntimeError:
                                pass
            return value, reply, conn.calls


def _bridge(remote: RemoteFunction, args, kwargs):
    """Call ``remote`` so that its tensor outputs carry a graph back to the judge's inputs."""
    import torch

    inputs = [t for t in _tensors([args, kwargs], []) if t.requires_grad]
    box = {}

    class Remote(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *flat):
            swap = {id(t): t.detach().requires_grad_(True) for t in inputs}
            a, k = _replace([args, kwargs], swap)
            value, reply, call = remote._call(a, k, grad=True)
            outs = _tensors(value, [])
            rg = reply.get("rg") if isinstance(reply.get("rg"), list) else []
            box.update(value=value, call=call, n=len(outs))
            ctx.call, ctx.shapes = call, [(t.shape, t.dtype) for t in inputs]
            nd = [o for o, r in zip(outs, rg + [False] * len(outs)) if r is not True]
            if nd:
                ctx.mark_non_differentiable(*nd)
            return tuple(outs)

        @staticmethod
        def backward(ctx, *grads):
            buf = pickle.dumps(list(grads))
            with remote.conn.lock:
                got, _, _ = remote.conn.request({"op": "backward", "call": ctx.call}, [buf])
            if type(got) is not list or len(got) != len(ctx.shapes):
                raise RuntimeError("the submission's backward pass returned malformed gradients")
            out = []
            for g, (shape, dtype) in zip(got, ctx.shapes):
                if g is None:
                    out.append(None)
                elif isinstance(g, torch.Tensor) and g.shape == shape:
                    out.append(g.to(dtype))
                else:
                    raise RuntimeError("the submission's backward pass returned a wrong shape")
            return tuple(out)

    outs = Remote.apply(*inputs)
    if box.get("n", 0) == 0:
        return box["value"]
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    return _replace(box["value"], {id(o): n for o, n in zip(_tensors(box["value"], []), outs)})


def _replace(x, swap: dict, depth: int = 0):
    """``x`` with the tensors whose id is in ``swap`` replaced (lists, tuples, dicts rebuilt)."""
    import torch

    if depth > MAX_DEPTH:
        return x
    if isinstance(x, torch.Tensor):
        return swap.get(id(x), x)
    if type(x) is list:
        return [_replace(v, swap, depth + 1) for v in x]
    if type(x) is tuple:
        return tuple(_replace(v, swap, depth + 1) for v in x)
    if type(x) is dict:
        return {k: _replace(v, swap, depth + 1) for k, v in x.items()}
    return x


def split_test(source: str) -> tuple[str, str]:
    """A test cell's visible part and hidden part (nbgrader's markers)."""
    if HIDDEN not in source:
        return source, ""
    visible, hidden = source.split(HIDDEN, 1)
    return visible, hidden.replace("### END HIDDEN TESTS", "")


def judge_main() -> int:
    """One job: read it (JSON) on stdin, write one JSON line of verdicts on the original stdout."""
    job = json.loads(sys.stdin.buffer.read())
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        result = Session(job["params"], job["setup"]).run(job)
    except Exception as e:
        result = {"fatal": f"{type(e).__name__}: {e}"[:500]}
    out.write("\n" + json.dumps({"token": job.get("token"), **result}) + "\n")
    out.flush()
    return 0


def serve_main() -> int:
    """A judge kept for one lesson: the first message holds the lesson's cells (it runs their
    setup once and answers ``ready``), every later message is one submission's job, answered with
    its verdicts. Each job starts from the namespace and random state the setup left."""
    rd, wr = _channel()
    try:
        first, _ = receive(rd)
        session = Session(first["params"], first["setup"])
        send(wr, {"op": "ready", "error": session.error})
        while True:
            job, _ = receive(rd)
            try:
                result = session.run(job)
            except Exception as e:
                result = {"fatal": f"{type(e).__name__}: {e}"[:500]}
            send(wr, {"op": "verdicts", **result})
    except EOFError:
        return 0


class Session:
    """The judge's side of a lesson: its own shell with the lesson's setup, run once."""

    def __init__(self, params: str, setup: str):
        import random

        import numpy as np
        import torch

        self.shell = _shell()
        self.error = ""
        for role, src in (("params", params), ("setup", setup)):
            err = _run(self.shell, src)
            if err:
                self.error = f"the lesson's {role} cell failed in the judge: {err}"
                break
        self.params, self.setup = params, setup
        self.snapshot = dict(self.shell.user_ns)
        self.rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())

    def reset(self) -> None:
        import random

        import numpy as np
        import torch

        ns = self.shell.user_ns
        ns.clear()
        ns.update(self.snapshot)
        torch.set_rng_state(self.rng[0])
        np.random.set_state(self.rng[1])
        random.setstate(self.rng[2])

    def run(self, job: dict) -> dict:
        if self.error:
            return {"fatal": self.error}
        self.reset()
        w = job["worker"]

        def start():
            with open(w["log"], "ab") as log:
                proc = subprocess.Popen(w["argv"], cwd=w["cwd"], env=w["env"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                        start_new_session=True, bufsize=0)
            send(proc.stdin, {"job": json.dumps({"params": self.params, "setup": self.setup,
                                                 "exercises": job["exercises"]})})
            return proc

        conn = Connection(start, ready_timeout=float(job.get("ready_timeout", 600)))
        conn.cell_timeout = float(job.get("cell_timeout", 120))
        conn.scratch = job.get("scratch") or ""
        import tempfile

        saved = tempfile.tempdir, os.environ.get("TMPDIR")
        if conn.scratch:  # the test's temporary files go where the worker can see them
            tempfile.tempdir = conn.scratch
            os.environ["TMPDIR"] = conn.scratch
        conn.launch()
        try:
            return self._judge(conn, job)
        finally:
            tempfile.tempdir = saved[0]
            if saved[1] is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = saved[1]
            try:
                if conn.proc is not None:
                    send(conn.proc.stdin, {"op": "quit"})
            except OSError:
                pass
            conn.kill()
            conn.close_mirrors()

    def _judge(self, conn: Connection, job: dict) -> dict:
        shell = self.shell
        ns = shell.user_ns
        conn.setup_objs = {k: v for k, v in ns.items() if not k.startswith("_")
                           and k not in ("In", "Out", "exit", "quit", "get_ipython")
                           and not isinstance(v, types.ModuleType)}
        conn.setup_ids = {id(v): k for k, v in conn.setup_objs.items()}
        try:
            conn.wait_ready()
        except WorkerGone as e:
            return {"fatal": str(e)}
        if conn.ready_errors:
            why = "; ".join(f"{k}: {v}" for k, v in conn.ready_errors.items())
            return {"fatal": f"the lesson's setup failed in the submission's process: {why}"[:500]}
        for name in job["functions"]:
            ns[name] = RemoteFunction(name, conn)
        for name in job.get("values", []):
            conn.deadline = time.monotonic() + conn.cell_timeout
            try:
                ns[name] = conn.request({"op": "get", "name": name}, [])[0]
            except (Exception, WorkerGone):
                ns.pop(name, None)
        verdicts = {}
        for test in job["tests"]:
            conn.deadline = time.monotonic() + conn.cell_timeout
            verdicts[test["id"]] = self._run_test(test["source"])
        return {"verdicts": verdicts}

    def _run_test(self, source: str) -> dict:
        """Run one test cell: the visible part, then the hidden tests. Where the hidden tests sit
        inside a block of the visible part (they do not compile apart), the cell runs whole and the
        failing line says which part failed. A hidden test's failure never says more."""
        visible, hidden = split_test(source)
        parts = [("visible", visible), ("hidden", hidden)]
        marker = None
        try:
            for _, src in parts:
                compile(src, "<test>", "exec")
        except SyntaxError:
            parts = [("whole", source)]
            marker = source[:source.index(HIDDEN)].count("\n") + 1 if HIDDEN in source else None
        for part, src in parts:
            if not src.strip():
                continue
            result = self.shell.run_cell(src, store_history=False, silent=True)
            err = result.error_before_exec or result.error_in_exec
            if err is None:
                continue
            if isinstance(err, WorkerGone):
                return {"passed": False, "message": str(err)}
            if part == "whole" and marker is not None:
                line = _cell_line(err)
                part = "hidden" if line is None or line >= marker else "visible"
            if part == "hidden":
                return {"passed": False, "message": "a hidden test failed"}
            return {"passed": False, "message": f"{type(err).__name__}: {err}"[:300]}
        return {"passed": True, "message": ""}


def _cell_line(err: BaseException) -> int | None:
    """The line of the test cell where ``err`` was raised (its last frame in the cell)."""
    line, tb = None, err.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name.startswith("<ipython-input") or "/ipykernel_" in name:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker_main()
    if argv[:1] == ["judge"]:
        return judge_main()
    if argv[:1] == ["serve"]:
        return serve_main()
    print("usage: python -m grader.judge worker|judge|serve", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
