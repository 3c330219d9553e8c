"""Running untrusted notebook code under limits: ``python -m grader.sandbox [limits] -- CMD ...``.

The supervisor is a small trusted process between the grader and everything a submission runs
(nbgrader, its kernel, whatever the kernel starts):

* resource limits (``setrlimit``) inherited by every descendant: address space (memory hog),
  CPU seconds, size of any file written (gigabytes of output), open files, core dumps off;
* a wall-clock limit: on expiry the whole process group is killed (``SIGKILL``);
* where the OS lets it (root, or a mount namespace is allowed), it runs the command in a private
  mount namespace in which the given folders (the class gradebook and course, the solutions, the
  other submissions, the output folder) are hidden under empty read-only mounts and the repository
  is read-only, then drops the capabilities that would undo that (``CAP_SYS_ADMIN``) or lift the
  limits (``CAP_SYS_RESOURCE``) or read other processes (``CAP_SYS_PTRACE``);
* it registers itself as a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``), so a process that
  escapes the group by double-forking or ``setsid`` is re-parented to the supervisor instead of
  init, and is killed with the rest when the command ends: nothing a submission starts outlives it.

The grader calls :func:`run_limited`, which starts the supervisor in its own session and keeps a
second, slightly longer time limit of its own in case the supervisor itself is killed.

**The view** (:class:`View`, where ``bubblewrap`` is installed: Debian's ``bwrap``, which needs no
root where user namespaces are allowed): the command then runs as an unprivileged user (uid 1000 of
its own user namespace, no capabilities) in its own mount, PID, IPC, network and UTS namespaces,
where ``/`` is read-only, ``/tmp`` and ``/dev/shm`` are private empty tmpfs mounts (gone when it
ends), the real ``$HOME``, the repository and every folder the grader names are replaced by empty
folders, and only what the release needs (the environment, ``brewslm_helpers/``, ``grader/``
without its known mistakes, ``notebooks/``, the model, read-only) is bound back. The one folder it
may write is its own work folder (its ``HOME`` is in there), which the grader deletes after.
Without bubblewrap (a laptop without it): the older in-process mount namespace where the OS allows
it (root), else only the limits and a private ``HOME``/``TMPDIR`` (see :func:`isolation_level`).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import resource
import signal
import subprocess
import sys
import time
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
TIMEOUT_RC = 124  # what ``timeout(1)`` returns; run_limited reports it as timed_out
GiB = 2 ** 30


@dataclass
class Limits:
    """Limits for one grading step (all inherited by every process it starts)."""
    wall_s: float = 900          # whole step, wall clock
    memory_bytes: int = 8 * GiB  # RLIMIT_AS per process
    cpu_s: int = 3600            # RLIMIT_CPU per process
    file_bytes: int = 512 * 2 ** 20  # RLIMIT_FSIZE: no file written grows beyond this
    open_files: int = 4096       # RLIMIT_NOFILE
    log_bytes: int = 256 * 1024  # how much of the step's output is kept (the tail)
    readonly: tuple = ()         # folders made read-only (the repository)

    def argv(self) -> list[str]:
        return [f"--wall={self.wall_s}", f"--memory={self.memory_bytes}", f"--cpu={self.cpu_s}",
                f"--fsize={self.file_bytes}", f"--nofile={self.open_files}",
                f"--keep={self.log_bytes}", *[f"--readonly={p}" for p in self.readonly]]


@dataclass
class View:
    """What a sandboxed command sees of the file system (bubblewrap only).

    ``work``: its only writable folder (bound read-write at the same path). ``hide``: folders made
    empty (files: /dev/null). ``expose``: host paths bound back read-only after hiding (at the same
    path, or ``(host, inside)``), e.g. the environment below a hidden home, the model."""
    work: Path
    hide: list = field(default_factory=list)
    expose: list = field(default_factory=list)
    mask: list = field(default_factory=list)   # hidden again after ``expose`` (inside it)
    shared: list = field(default_factory=list)  # more folders bound read-write (same path)
    tmp_bytes: int = 2 * GiB

    def argv(self, cwd: Path | None = None) -> list[str]:
        a = ["--die-with-parent", "--new-session", "--unshare-user", "--uid", "1000", "--gid",
             "1000", "--unshare-pid", "--as-pid-1", "--unshare-ipc", "--unshare-net", "--unshare-uts",
             "--unshare-cgroup-try", "--hostname", "sandbox",
             "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
             "--size", str(self.tmp_bytes), "--tmpfs", "/tmp",
             "--size", str(self.tmp_bytes), "--tmpfs", "/dev/shm"]
        # empty folders first (made read-only last: what is bound back below them needs its
        # mount point created), then the work folder, what is bound back, what is masked again
        hidden = []
        for p in sorted({os.path.abspath(str(p)) for p in self.hide}, key=len):
            if any(p == h or p.startswith(h + os.sep) for h in hidden):
                continue
            if os.path.isdir(p):
                a += ["--tmpfs", p]
                hidden.append(p)
            elif os.path.lexists(p):
                a += ["--ro-bind", "/dev/null", p]
        work = str(self.work)
        a += ["--bind", work, work]
        for p in self.shared:
            a += ["--bind", str(p), str(p)]
        for item in self.expose:
            host, inside = (item if isinstance(item, tuple) else (item, item))
            if os.path.lexists(str(host)):
                a += ["--ro-bind", str(host), str(inside)]
        for p in self.mask:
            p = str(p)
            if os.path.isdir(p):
                a += ["--tmpfs", p]
                hidden.append(p)
            elif os.path.lexists(p):
                a += ["--ro-bind", "/dev/null", p]
        for p in hidden:
            a += ["--remount-ro", p]
        a += ["--chdir", str(cwd or work)]
        return a


@lru_cache(maxsize=1)
def bwrap() -> str | None:
    """The ``bwrap`` binary, if it is installed and can build the view here, else None."""
    path = shutil.which("bwrap")
    if path is None:
        return None
    with __import__("tempfile").TemporaryDirectory(prefix="brewslm-bwrap-probe-") as tmp:
        probe = subprocess.run([path, *View(Path(tmp)).argv(), "--", "/bin/sh", "-c",
                                "touch /tmp/x && ! touch /usr/x 2>/dev/null"],
                               capture_output=True, timeout=60)
    return path if probe.returncode == 0 else None


def isolation_level() -> str:
    """``"bwrap"`` (the full view), ``"namespace"`` (hidden folders only: root without bwrap) or
    ``"none"`` (limits and a private HOME/TMPDIR only)."""
    if bwrap():
        return "bwrap"
    return "namespace" if _namespace_available() else "none"


@dataclass
class Completed:
    returncode: int
    output: str      # the tail of stdout+stderr
    timed_out: bool
    seconds: float


def command(argv: list[str], limits: Limits, hide: list[Path] = (), view: View | None = None,
            stdio: bool = False, cwd: Path | None = None) -> list[str]:
    """The supervisor's command line for ``argv`` (inside ``view`` where bubblewrap works)."""
    if view is not None and bwrap():
        return [sys.executable, "-m", "grader.sandbox", *limits.argv(), *(["--stdio"] if stdio else []),
                "--", bwrap(), *view.argv(cwd), "--", *argv]
    hide = list(hide) + (list(view.hide) if view is not None else [])
    return [sys.executable, "-m", "grader.sandbox", *limits.argv(), *(["--stdio"] if stdio else []),
            *[f"--hide={p}" for p in hide], "--", *argv]


def run_limited(argv: list[str], cwd: Path, env: dict[str, str], limits: Limits,
                stdin: bytes | None = None, log_path: Path | None = None,
                hide: list[Path] = (), view: View | None = None) -> Completed:
    """Run ``argv`` under the supervisor; never raises for anything the command does.
    ``hide``: folders the command must not see (best effort: needs a mount namespace);
    ``view``: the bubblewrap view (used where bwrap works; else its ``hide`` list is)."""
    cwd = Path(cwd)
    log_path = Path(log_path or cwd / ".sandbox.log")
    cmd = command(argv, limits, hide, view, cwd=cwd)
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE if stdin is not None
                                else subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timed_out = False
        try:
            if stdin is not None:
                try:
                    proc.stdin.write(stdin)
                    proc.stdin.close()
                except (BrokenPipeError, OSError):
                    pass
            rc = proc.wait(timeout=limits.wall_s + 30)
        except subprocess.TimeoutExpired:  # the supervisor itself hangs or was stopped: kill all
            _stop(proc)
            rc = proc.wait()
            timed_out = True
        except BaseException:  # the grader is interrupted (Ctrl-C): leave nothing running
            _stop(proc)
            raise
    if rc == TIMEOUT_RC:
        timed_out = True
    return Completed(rc, _tail(log_path, limits.log_bytes), timed_out, time.perf_counter() - start)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the supervisor (it kills everything below it), then SIGKILL its group."""
    try:
        proc.terminate()
        proc.wait(timeout=5)
    except (subprocess.TimeoutExpired, OSError):
        pass
    _killpg(proc.pid)


def _tail(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def start_limited(argv: list[str], cwd: Path, env: dict[str, str], limits: Limits,
                  log_path: Path, view: View | None = None, hide: list[Path] = ()):
    """Start ``argv`` under the supervisor with its stdin and stdout as pipes to the caller (a
    protocol channel); its stderr goes to ``log_path``. Returns ``(Popen, log file)``: the caller
    closes both (:func:`stop`)."""
    log = open(log_path, "wb")
    proc = subprocess.Popen(command(argv, limits, hide, view, stdio=True), cwd=cwd, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                            start_new_session=True)
    return proc, log


def stop(proc: subprocess.Popen) -> None:
    """Stop what :func:`start_limited` started, and everything below it."""
    if proc.poll() is None:
        _stop(proc)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for f in (proc.stdin, proc.stdout):
        try:
            f and f.close()
        except OSError:
            pass


def isolation_available() -> bool:
    """Whether the supervisor can hide folders here (bubblewrap, or a private mount namespace:
    root, or a system that lets this user unshare one)."""
    return bwrap() is not None or _namespace_available()


@lru_cache(maxsize=1)
def _namespace_available() -> bool:
    probe = subprocess.run([sys.executable, "-c", (
        "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
        "sys.exit(0 if libc.unshare(0x00020000) == 0 and "
        "libc.mount(None, b'/', None, 16384 | (1 << 18), None) == 0 else 1)")],
        capture_output=True, timeout=60)
    return probe.returncode == 0


# -- the supervisor ---------------------------------------------------------------------------
def _set_limits(args) -> None:
    for which, value in [(resource.RLIMIT_AS, args.memory), (resource.RLIMIT_CPU, args.cpu),
                         (resource.RLIMIT_FSIZE, args.fsize), (resource.RLIMIT_NOFILE, args.nofile),
                         (resource.RLIMIT_CORE, 0)]:
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 32, 4096, 16384, 1 << 18)
CLONE_NEWNS, CLONE_NEWPID = 0x00020000, 0x20000000
PR_CAPBSET_DROP = 24
# CAP_SYS_ADMIN (mount/umount), CAP_SYS_RESOURCE (raise limits), CAP_SYS_PTRACE (read other
# processes), CAP_SYS_MODULE, CAP_SYS_RAWIO, CAP_SYS_BOOT, CAP_SYS_TIME, CAP_NET_ADMIN, CAP_MKNOD,
# CAP_SYS_CHROOT, CAP_SETPCAP
DROPPED_CAPS = (21, 24, 19, 16, 17, 22, 25, 12, 27, 18, 8)


def _isolate(hide: list[str], readonly: list[str]) -> bool:
    """Private mount namespace: ``hide`` under empty read-only tmpfs, ``readonly`` read-only.
    Returns False (and changes nothing) where the OS does not allow it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNS) != 0:
            return False
        if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            return False
        for path in readonly:
            if os.path.isdir(path):
                p = path.encode()
                if libc.mount(p, p, None, MS_BIND | MS_REC, None) == 0:
                    libc.mount(None, p, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)
        for path in hide:
            if os.path.isdir(path):
                libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV,
                           b"size=4k")
            elif os.path.isfile(path):
                libc.mount(b"/dev/null", path.encode(), None, MS_BIND, None)
        return True
    except (OSError, AttributeError):
        return False


def _unshare(flags: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).unshare(flags) == 0
    except (OSError, AttributeError):
        return False


def _private_proc() -> None:
    """In the child (PID 1 of its namespace): its own /proc, so ``psutil``, ``/proc/self`` and
    ``os.kill`` agree on process ids, and the grader's processes are not even listed."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) == 0 and libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0:
        libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | 8, None)


def _pump(child: subprocess.Popen, keep: int, wall: float) -> tuple[bytes, bool]:
    """Read the child's output until it exits or ``wall`` seconds pass, keeping the last ``keep``
    bytes (no threads: a process that entered a new PID namespace cannot start any)."""
    import collections
    import selectors

    chunks: collections.deque = collections.deque()
    size, deadline = 0, time.monotonic() + wall
    fd = (child.stdout or child.stderr).fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    open_ = True
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks)[-keep:], True
        if not open_:
            try:
                child.wait(timeout=min(left, 0.5))
                return b"".join(chunks)[-keep:], False
            except subprocess.TimeoutExpired:
                continue
        if sel.select(timeout=min(left, 1.0)):
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:  # every writer closed it (usually: the command exited)
                open_ = False
                sel.unregister(fd)
                continue
            chunks.append(chunk)
            size += len(chunk)
            while size - len(chunks[0]) >= keep:
                size -= len(chunks.popleft())


def _drop_capabilities() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in DROPPED_CAPS:
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _kill_descendants() -> None:
    """Kill every process below this one (re-parented orphans included), then reap them."""
    import psutil

    me = psutil.Process()
    for _ in range(20):  # a fork bomb keeps spawning: repeat until nothing is left
        kids = me.children(recursive=True)
        if not kids:
            break
        for kid in kids:
            try:
                kid.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(kids, timeout=1)
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def supervise(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m grader.sandbox")
    p.add_argument("--wall", type=float, default=900)
    p.add_argument("--memory", type=int, default=8 * GiB)
    p.add_argument("--cpu", type=int, default=3600)
    p.add_argument("--fsize", type=int, default=512 * 2 ** 20)
    p.add_argument("--nofile", type=int, default=4096)
    p.add_argument("--hide", action="append", default=[])
    p.add_argument("--readonly", action="append", default=[])
    p.add_argument("--keep", type=int, default=256 * 1024, help="bytes of output kept (the tail)")
    p.add_argument("--stdio", action="store_true",
                   help="stdin/stdout are the command's own (a protocol channel); stderr is kept")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    _become_subreaper()
    isolated = _isolate(args.hide, args.readonly) if (args.hide or args.readonly) else False
    # a new PID namespace: the command is its PID 1, sees and can signal only its own processes,
    # and when it exits the kernel kills everything left in it
    own_pids = isolated and _unshare(CLONE_NEWPID)
    _drop_capabilities()  # after execve the command keeps none of these: no umount, no raised limits
    signal.signal(signal.SIGTERM, lambda *_: (_kill_descendants(), os._exit(143)))
    # the supervisor's own limits are inherited by the command it starts (and its kernels)
    _set_limits(args)
    # output goes through this process, which keeps only the tail: unlimited printing to the raw
    # stdout/stderr of any process costs CPU, never disk or memory
    child = subprocess.Popen(cmd, process_group=0, stdout=None if args.stdio else subprocess.PIPE,
                             stderr=subprocess.PIPE if args.stdio else subprocess.STDOUT,
                             preexec_fn=_private_proc if own_pids else None)
    if args.stdio:  # the protocol's end is the command's; this process keeps only its stderr
        os.close(0)
        os.dup2(2, 1)
    out, timed_out = _pump(child, args.keep, args.wall)
    if timed_out:
        _killpg(child.pid)
        child.kill()
    rc = child.wait()
    if timed_out:
        rc = TIMEOUT_RC
    _kill_descendants()
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    if rc < 0:  # killed by a signal (e.g. SIGKILL by the kernel's OOM killer, SIGXCPU)
        print(f"[sandbox] command killed by signal {signal.Signals(-rc).name}", flush=True)
    if rc == TIMEOUT_RC:
        print(f"[sandbox] stopped after {args.wall:g} s", flush=True)
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(supervise())
