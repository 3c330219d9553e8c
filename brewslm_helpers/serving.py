"""Serving plumbing: a llama.cpp OpenAI-compatible server you can start and always stop, a client
that hits it concurrently, request traces, a static-batching baseline, and GGUF variants.

The server is ``python -m llama_cpp.server`` (``llama-cpp-python[server]``) in its own process
group, on a free port, started and stopped by :class:`LlamaServer`::

    with serving.LlamaServer(models.gguf_path()) as server:
        reply = serving.complete(server.base_url, prompt, max_tokens=16)

It is shut down (the whole process group: SIGTERM, then SIGKILL) when the ``with`` block ends,
however it ends, and also by a ``weakref.finalize`` finalizer when the object is collected or the
interpreter exits, so a failing notebook cell never leaves a server behind. Lesson 9's drift checks
reuse it. The client speaks the OpenAI HTTP API with the standard library only, so the same code
talks to vLLM (``vllm serve ...``) or any other OpenAI-compatible server.

Nothing here is the answer to a graded exercise: ``static_batching`` is the *baseline* the lesson's
continuous-batching exercise is compared with.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from .budget import cpu_threads
from .paths import cache_dir

# -------------------------------------------------------------------------------------------------
# The server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stop ``proc``'s whole process group: SIGTERM, wait up to ``grace_s``, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # the group may hold children that outlive the leader: make sure none survive
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class ServerError(RuntimeError):
    """The server did not come up (its log's last lines are in the message)."""


class LlamaServer:
    """llama.cpp's OpenAI-compatible server on ``model_path`` (a GGUF file), in a subprocess.

    Use it as a context manager (``with LlamaServer(path) as s:``) or call :meth:`start` and
    :meth:`stop`. ``base_url`` is ``http://127.0.0.1:PORT/v1``. The server runs in its own process
    group (``start_new_session``), so stopping it kills everything it started. A
    ``weakref.finalize`` finalizer stops it if the object is garbage-collected or the interpreter
    exits while it still runs.

    ``interrupt_requests=False``: llama-cpp-python's server otherwise *cancels* a streaming reply as
    soon as another request arrives, which is not what concurrent clients want. The server still
    runs one request at a time (it holds one ``Llama`` behind a lock): concurrent requests queue.
    """

    def __init__(self, model_path, *, n_threads: int | None = None, n_ctx: int = 1024, port: int | None = None,
                 startup_timeout_s: float = 120.0, extra_args: list[str] | None = None):
        self.model_path = Path(model_path)
        if not self.model_path.exists():
            raise FileNotFoundError(self.model_path)
        self.n_threads = n_threads or cpu_threads()
        self.n_ctx = n_ctx
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._finalizer = None
        self.startup_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model_path),
                "--host", "127.0.0.1", "--port", str(self.port), "--n_threads", str(self.n_threads),
                "--n_threads_batch", str(self.n_threads), "--n_ctx", str(self.n_ctx),
                "--interrupt_requests", "False", "--verbose", "False", *self.extra_args]

    def start(self) -> "LlamaServer":
        if self.running():
            return self
        self.port = self.port or free_port()
        logs = cache_dir() / "server_logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"llama_server_{self.port}.log"
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self._finalizer = weakref.finalize(self, _kill_group, self.proc)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"llama.cpp server exited with code {self.proc.returncode}:\n"
                                  + self.log_tail())
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, socket.timeout, http.client.HTTPException):
                pass
            time.sleep(0.1)
        raise ServerError(f"llama.cpp server not healthy after {self.startup_timeout_s:.0f} s:\n"
                          + self.log_tail())

    def log_tail(self, n: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()          # runs _kill_group once, then detaches
        self._finalizer = None

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"LlamaServer({self.model_path.name}, {self.base_url}, pid={self.pid}, {state})"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id still exists (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited: it only waits for its parent to reap it
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


# -------------------------------------------------------------------------------------------------
# The client (OpenAI HTTP API, standard library only)


def complete(base_url: str, prompt: str, max_tokens: int = 32, *, temperature: float = 0.0,
             model: str | None = None, stop: list[str] | None = None,
             timeout_s: float = 300.0) -> dict:
    """One streamed ``POST {base_url}/completions`` (raw prompt, greedy by default).

    Returns ``{"text", "tokens", "start_s", "first_token_s", "finish_s", "ttft_s", "latency_s"}``:
    times are ``time.perf_counter()`` values of this process; ``tokens`` counts the streamed chunks
    that carried text (one per token for llama.cpp and vLLM).
    """
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "stream": True}
    if model is not None:
        body["model"] = model
    if stop:
        body["stop"] = stop
    req = urllib.request.Request(base_url.rstrip("/") + "/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    pieces = []
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        for raw in resp:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            text = chunk["choices"][0].get("text", "")
            if text:
                if first is None:
                    first = time.perf_counter()
                pieces.append(text)
    finish = time.perf_counter()
    first = first if first is not None else finish
    return {"text": "".join(pieces), "tokens": len(pieces), "start_s": start,
            "first_token_s": first, "finish_s": finish, "ttft_s": first - start,
            "latency_s": finish - start}


def run_concurrent(base_url: str, prompts: list[str], concurrency: int, max_tokens: int,
                   **kwargs) -> dict:
    """Send every prompt with ``concurrency`` client threads at once (a closed loop: each thread
    sends its next request when the previous one returns).

    Returns ``{"requests": [complete() results, in prompt order], "wall_s": float,
    "tokens": int, "tokens_per_s": float}``: throughput is all tokens over the wall time.
    """
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda p: complete(base_url, p, max_tokens, **kwargs), prompts))
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"requests": results, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall}


# -------------------------------------------------------------------------------------------------
# Request traces and the static-batching baseline


def make_trace(n_requests: int, rate_per_s: float, *, prompt_tokens: tuple[int, int] = (16, 128),
               output_tokens: tuple[int, int] = (8, 128), seed: int = 0,
               prompts: list[list[int]] | None = None) -> list[dict]:
    """A synthetic request trace: Poisson arrivals at ``rate_per_s`` (``float("inf")``: all at
    once), prompt and output lengths drawn log-uniformly from the inclusive ranges (many short
    replies, a few long ones, as in chat traffic).

    Returns dicts ``{"id": int, "arrival_s": float, "prompt_tokens": int, "output_tokens": int}``
    sorted by arrival; the first request arrives at 0. With ``prompts`` (token-id lists), request
    ``i`` carries ``"prompt_ids": prompts[i % len(prompts)]`` and ``prompt_tokens`` is its length,
    for a real engine (:class:`EngineSteps`).
    """
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate_per_s, size=n_requests)
    arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])])

    def loguniform(lo, hi):
        return np.round(np.exp(rng.uniform(np.log(lo), np.log(hi), size=n_requests))).astype(int)

    p = loguniform(*prompt_tokens)
    o = loguniform(*output_tokens)
    trace = [{"id": i, "arrival_s": float(a), "prompt_tokens": int(pi), "output_tokens": int(oi)}
             for i, (a, pi, oi) in enumerate(zip(arrivals, p, o))]
    for r in trace if prompts else []:
        r["prompt_ids"] = list(prompts[r["id"] % len(prompts)])
        r["prompt_tokens"] = len(r["prompt_ids"])
    return trace


def static_batching(trace: list[dict], max_batch: int,
                    step_time: Callable[[int, int], float]) -> list[dict]:
    """The baseline: request-level (static) batching, as ``model.generate`` on a padded batch.

    When the engine is idle it takes up to ``max_batch`` requests that have arrived (FIFO), runs
    them together until the *longest* is done (finished rows keep their slot: padding), and returns
    all of them at once; requests that arrive meanwhile wait for the next batch. Each iteration
    costs ``step_time(batch_size, prefill_tokens)`` (prefill of the whole batch in the first one).

    Returns one dict per request, in trace order: the trace's fields plus ``first_token_s`` and
    ``finish_s`` (simulated seconds).
    """
    waiting = sorted(trace, key=lambda r: (r["arrival_s"], r["id"]))
    out = {}
    t = 0.0
    i = 0
    while i < len(waiting):
        t = max(t, waiting[i]["arrival_s"])
        batch = []
        while i < len(waiting) and len(batch) < max_batch and waiting[i]["arrival_s"] <= t:
            batch.append(waiting[i])
            i += 1
        steps = max(r["output_tokens"] for r in batch)
        first = None
        for s in range(steps):
            t += step_time(len(batch), sum(r["prompt_tokens"] for r in batch) if s == 0 else 0)
            first = t if first is None else first
        for r in batch:
            out[r["id"]] = {**r, "first_token_s": first, "finish_s": t}
    return [out[r["id"]] for r in trace]


# -------------------------------------------------------------------------------------------------
# Measurements on the real model


def measure_step_times(model, batch_sizes: list[int], context_len: int = 64, steps: int = 4,
                       prefill_len: int = 64, repeats: int = 2) -> dict:
    """Seconds per decode iteration of ``model`` for each batch size, and per prefill token.

    For each ``b``: a batch of ``b`` random sequences of ``context_len`` tokens is prefilled into a
    ``DynamicCache``, then ``steps`` one-token decode iterations are timed (best of ``repeats``).
    The prefill cost is one forward pass over ``prefill_len`` tokens (batch 1), per token.

    Returns ``{"batch_sizes": [...], "step_s": [...], "prefill_s_per_token": float}``.
    """
    import torch
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    step_s = []
    with torch.inference_mode():
        for b in batch_sizes:
            best = float("inf")
            for _ in range(repeats):
                ids = torch.randint(0, vocab, (b, context_len), generator=gen)
                cache = DynamicCache(config=model.config)
                out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                t0 = time.perf_counter()
                for _ in range(steps):
                    out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                best = min(best, (time.perf_counter() - t0) / steps)
            step_s.append(best)
        ids = torch.randint(0, vocab, (1, prefill_len), generator=gen)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            best = min(best, time.perf_counter() - t0)
    return {"batch_sizes": list(batch_sizes), "step_s": step_s,
            "prefill_s_per_token": best / prefill_len}


def cost_model(measured: dict) -> Callable[[int, int], float]:
    """``step_time(batch_size, prefill_tokens)`` from :func:`measure_step_times`: the decode
    iteration time interpolated (linearly, extrapolated from the last two points) over the measured
    batch sizes, plus the prefill tokens' cost."""
    bs = np.asarray(measured["batch_sizes"], dtype=float)
    st = np.asarray(measured["step_s"], dtype=float)
    per_token = float(measured["prefill_s_per_token"])
    slope = (st[-1] - st[-2]) / (bs[-1] - bs[-2]) if len(bs) > 1 else 0.0

    def step_time(batch_size: int, prefill_tokens: int = 0) -> float:
        if batch_size <= bs[-1]:
            decode = float(np.interp(batch_size, bs, st))
        else:
            decode = float(st[-1] + slope * (batch_size - bs[-1]))
        return decode + per_token * prefill_tokens

    return step_time


def memory_bandwidth_gbs(megabytes: int = 256, repeats: int = 5) -> float:
    """This machine's read bandwidth in GB/s as torch sees it: the best of ``repeats`` sums over a
    ``megabytes`` float32 buffer (much larger than the CPU caches), with torch's threads."""
    import torch

    x = torch.ones(megabytes * 2 ** 20 // 4, dtype=torch.float32)
    x.sum()  # touch every page first
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


# -------------------------------------------------------------------------------------------------
# A real batching engine: llama.cpp's batched decode through llama-cpp-python's low-level API


class BatchedLlama:
    """llama.cpp running up to ``n_seqs`` sequences in one ``llama_decode`` call, greedy.

    The GGUF file is loaded with the C API (``llama_model_load_from_file``, ``llama_init_from_model``
    with ``n_seq_max = n_seqs`` and at least ``n_ctx_per_seq`` KV cells per sequence,
    ``kv_unified=False``). :meth:`step` takes ``{seq_id: new token ids}`` for any subset of the
    sequences, puts every token in one ``llama_batch`` (its position and ``seq_id``; logits only for
    each sequence's last token), runs one ``llama_decode`` (llama.cpp's batched kernels: every weight
    matrix is read once for all the tokens) and returns ``{seq_id: argmax token}``. :meth:`release`
    drops a sequence's KV cells (``llama_memory_seq_rm``) so its ``seq_id`` can serve a new request.
    This is the same machinery ``llama-server --parallel N`` uses for its slots. ``n_threads``
    (default :func:`cpu_threads`) is fixed for the engine's life: llama.cpp's threads meet at a
    barrier after every operation of the graph, so where other processes keep the cores busy each
    barrier waits for a descheduled thread and more than one thread can be far slower than one.
    Freed with :meth:`close` (also on garbage collection).
    """

    def __init__(self, model_path, *, n_seqs: int = 8, n_ctx_per_seq: int = 512, n_threads: int | None = None,
                 n_batch: int = 2048, n_ubatch: int = 512):
        import logging

        import llama_cpp

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load log
        self._ll = llama_cpp
        self.model_path = Path(model_path)
        if not self.model_path.exists():
            raise FileNotFoundError(self.model_path)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {self.model_path}")
        cparams = llama_cpp.llama_context_default_params()
        # llama.cpp gives each sequence a multiple of 256 KV cells: ask for that (no rounding warning);
        # step() still holds every sequence to n_ctx_per_seq
        cparams.n_ctx = n_seqs * -(-n_ctx_per_seq // 256) * 256
        cparams.n_batch, cparams.n_ubatch, cparams.n_seq_max = n_batch, min(n_ubatch, n_batch), n_seqs
        cparams.n_threads = cparams.n_threads_batch = n_threads or cpu_threads()
        cparams.kv_unified = False                      # each sequence its own KV stream
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError("llama.cpp could not create a context")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.n_seqs, self.n_ctx_per_seq, self.n_batch = n_seqs, n_ctx_per_seq, n_batch
        self.n_threads = cparams.n_threads
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.n_past = [0] * n_seqs                      # tokens in each sequence's KV cache
        self._finalizer = weakref.finalize(self, _free_llama, llama_cpp, self.batch, self.ctx, self.model)

    def step(self, inputs: dict[int, list[int]]) -> dict[int, int]:
        """One ``llama_decode`` over ``inputs`` ``{seq_id: token ids to append}`` (a prompt to
        prefill, or the one token sampled last); returns ``{seq_id: greedy next token}``."""
        b, n, last = self.batch, 0, []
        for seq, tokens in inputs.items():
            if not 0 <= seq < self.n_seqs:
                raise ValueError(f"seq_id {seq} outside 0..{self.n_seqs - 1}")
            if self.n_past[seq] + len(tokens) > self.n_ctx_per_seq:
                raise ValueError(f"sequence {seq} would exceed its {self.n_ctx_per_seq} KV cells")
            if n + len(tokens) > self.n_batch:
                raise ValueError(f"more than n_batch={self.n_batch} tokens in one step")
            for j, t in enumerate(tokens):
                b.token[n], b.pos[n], b.n_seq_id[n] = t, self.n_past[seq] + j, 1
                b.seq_id[n][0] = seq
                b.logits[n] = j == len(tokens) - 1
                n += 1
            last.append((seq, n - 1))
            self.n_past[seq] += len(tokens)
        b.n_tokens = n
        rc = self._ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        get = self._ll.llama_get_logits_ith
        return {seq: int(np.ctypeslib.as_array(get(self.ctx, i), shape=(self.n_vocab,)).argmax())
                for seq, i in last}

    def release(self, seq: int) -> None:
        """Forget sequence ``seq``: its KV cells are freed for the next request."""
        self._ll.llama_memory_seq_rm(self.mem, seq, -1, -1)
        self.n_past[seq] = 0

    def reset(self) -> None:
        for seq in range(self.n_seqs):
            self.release(seq)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, seq: int = 0) -> list[int]:
        """Greedy decoding of one prompt alone (batch of one sequence), exactly ``max_new_tokens``."""
        self.release(seq)
        out = [self.step({seq: list(prompt_ids)})[seq]]
        while len(out) < max_new_tokens:
            out.append(self.step({seq: [out[-1]]})[seq])
        self.release(seq)
        return out[:max_new_tokens]

    def measure_step_times(self, batch_sizes: list[int], context_len: int = 64, steps: int = 8,
                           repeats: int = 3, prefill_len: int = 64, seed: int = 0) -> dict:
        """Seconds per decode iteration at each batch size, and per prefill token, on this engine.

        For each ``b``: ``b`` sequences of ``context_len`` random tokens are prefilled, then
        ``steps`` iterations (one token for each of the ``b`` sequences per ``llama_decode``) are
        timed, ``repeats`` times. Returns ``{"batch_sizes", "step_s" (median of the repeats),
        "step_s_all" ([b][repeat]), "prefill_s_per_token" (median over repeats of one
        ``prefill_len``-token prompt)}``, the shape :func:`cost_model` takes.
        """
        rng = np.random.default_rng(seed)
        median, all_s = [], []
        for b in batch_sizes:
            if b > self.n_seqs:
                raise ValueError(f"batch {b} > n_seqs={self.n_seqs}")
            self.reset()
            nxt = self.step({s: rng.integers(0, self.n_vocab, context_len).tolist() for s in range(b)})
            times = []
            for _ in range(repeats):
                if self.n_past[0] + steps > self.n_ctx_per_seq:
                    self.reset()
                    nxt = self.step({s: rng.integers(0, self.n_vocab, context_len).tolist() for s in range(b)})
                t0 = time.perf_counter()
                for _ in range(steps):
                    nxt = self.step({s: [t] for s, t in nxt.items()})
                times.append((time.perf_counter() - t0) / steps)
            all_s.append(times)
            median.append(float(np.median(times)))
        prefill = []
        for _ in range(repeats):
            self.reset()
            ids = rng.integers(0, self.n_vocab, prefill_len).tolist()
            t0 = time.perf_counter()
            self.step({0: ids})
            prefill.append((time.perf_counter() - t0) / prefill_len)
        self.reset()
        return {"batch_sizes": list(batch_sizes), "step_s": median, "step_s_all": all_s,
                "prefill_s_per_token": float(np.median(prefill))}

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "BatchedLlama":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _free_llama(llama_cpp, batch, ctx, model) -> None:
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)


class EngineSteps:
    """A ``step_time(batch_size, prefill_tokens)`` that *runs* the iteration on a real engine.

    Hand it to a scheduler in place of a cost model (``continuous_batching(trace, B,
    EngineSteps(engine, trace))``, or :func:`static_batching`): the scheduler decides, the engine
    executes, and the scheduler's clock advances by the **measured** wall time since the previous
    iteration ended (the ``llama_decode`` and the scheduler's own bookkeeping). The schedulers'
    contract fixes which requests a call means: admissions are FIFO by ``(arrival_s, id)`` (their
    prompts must sum to ``prefill_tokens``), and the other ``batch_size - admitted`` rows are the
    requests already running; unfinished ones first, then finished ones that a static batch keeps
    as padding (they are decoded for real, their tokens thrown away). A call that contradicts this
    (an unfinished request dropped, more rows than exist) raises.

    trace: dicts with ``"id"``, ``"arrival_s"``, ``"output_tokens"`` and ``"prompt_ids"`` (token
    ids; ``"prompt_tokens"`` must equal their count). After the run, ``outputs[id]`` holds each
    request's first ``output_tokens`` greedy tokens and ``log`` one ``(batch_size,
    prefill_tokens, seconds)`` per iteration.
    """

    def __init__(self, engine: BatchedLlama, trace: list[dict]):
        for r in trace:
            if r["prompt_tokens"] != len(r["prompt_ids"]):
                raise ValueError(f"request {r['id']}: prompt_tokens != len(prompt_ids)")
        self.engine = engine
        self.queue = sorted(trace, key=lambda r: (r["arrival_s"], r["id"]))
        self.next = 0
        self.running: list[dict] = []        # {"req", "seq", "tokens"}
        self.outputs: dict = {}
        self.log: list[tuple[int, int, float]] = []
        self._since = None
        engine.reset()

    def __call__(self, batch_size: int, prefill_tokens: int = 0) -> float:
        start = self._since if self._since is not None else time.perf_counter()
        admitted, total = [], 0
        while total < prefill_tokens:
            if self.next >= len(self.queue):
                raise RuntimeError("prefill_tokens larger than the prompts left in the queue")
            admitted.append(self.queue[self.next])
            total += self.queue[self.next]["prompt_tokens"]
            self.next += 1
        if total != prefill_tokens:
            raise RuntimeError(f"prefill_tokens={prefill_tokens} is no FIFO prefix of the queue's prompts")
        unfinished = [s for s in self.running if len(s["tokens"]) < s["req"]["output_tokens"]]
        padding = [s for s in self.running if len(s["tokens"]) >= s["req"]["output_tokens"]]
        keep = batch_size - len(admitted)
        if not len(unfinished) <= keep <= len(self.running):
            raise RuntimeError(f"batch_size={batch_size} with {len(admitted)} admitted: {len(unfinished)} "
                               f"unfinished and {len(padding)} finished requests are running")
        kept = unfinished + padding[:keep - len(unfinished)]
        for s in padding[keep - len(unfinished):]:
            self._finish(s)
        free = sorted(set(range(self.engine.n_seqs)) - {s["seq"] for s in kept})
        if len(admitted) > len(free):
            raise RuntimeError(f"batch_size={batch_size} > the engine's n_seqs={self.engine.n_seqs}")
        new = [{"req": r, "seq": seq, "tokens": []} for r, seq in zip(admitted, free)]
        inputs = {s["seq"]: [s["tokens"][-1]] for s in kept}
        inputs.update({s["seq"]: list(s["req"]["prompt_ids"]) for s in new})
        nxt = self.engine.step(inputs)
        self.running = kept + new
        for s in self.running:
            s["tokens"].append(nxt[s["seq"]])
        self._since = time.perf_counter()
        seconds = self._since - start
        self.log.append((batch_size, prefill_tokens, seconds))
        return seconds

    def _finish(self, slot: dict) -> None:
        self.outputs[slot["req"]["id"]] = slot["tokens"][:slot["req"]["output_tokens"]]
        self.engine.release(slot["seq"])

    def close(self) -> dict:
        """Flush the last running requests; returns ``outputs`` (every request must be done)."""
        for s in self.running:
            self._finish(s)
        self.running = []
        missing = [r["id"] for r in self.queue if len(self.outputs.get(r["id"], [])) != r["output_tokens"]]
        if missing:
            raise RuntimeError(f"requests not completed: {missing[:10]}")
        return self.outputs


# -------------------------------------------------------------------------------------------------
# GGUF variants

GGUF_TYPES = ("F32", "F16", "Q4_1", "Q8_0")  # served here; llama.cpp file types in quant.FTYPES


def gguf_variant(kind: str, source=None, n_threads: int | None = None) -> Path:
    """The course model as a GGUF file of type ``kind`` (``"F32"``, ``"F16"``, ``"Q8_0"``,
    ``"Q4_1"``), written once by llama.cpp's own quantizer (``llama_model_quantize``) under
    ``cache_dir()/serving/`` and reused after.

    ``"Q4_1"`` is the shipped file itself. The others are *re-typed from the Q4_1 weights*
    (``allow_requantize``): an F16 made this way has F16's size and speed but Q4_1's quality,
    because the information the 4-bit rounding threw away does not come back.
    """
    from .models import gguf_path

    kind = kind.upper()
    if kind not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {kind!r}: use one of {', '.join(GGUF_TYPES)}")
    source = Path(source) if source is not None else gguf_path()
    if kind == "Q4_1" and source == gguf_path():
        return source
    folder = cache_dir() / "serving"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{source.stem.rsplit('.', 1)[0]}.{kind}-from-{source.stem.rsplit('.', 1)[-1]}.gguf"
    if target.exists():
        return target
    from .quant import llama_quantize

    llama_quantize(source, target, kind, nthread=n_threads)  # atomic: concurrent writers agree
    return target
