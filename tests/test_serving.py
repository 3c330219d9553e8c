"""brewslm_helpers.serving: the llama.cpp server is always shut down; client, traces, baseline."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import pytest

from brewslm_helpers import serving
from brewslm_helpers.evaluation import chat_prompt
from brewslm_helpers.models import gguf_path, load_tokenizer
from brewslm_helpers.paths import REPO_ROOT


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def prompt():
    return chat_prompt(load_tokenizer(), "What is the capital of France?")


def test_server_answers_and_is_gone_after_an_exception_inside_with(prompt):
    server = serving.LlamaServer(gguf_path(), n_threads=1, n_ctx=256)
    with pytest.raises(RuntimeError, match="a cell failed"):
        with server:
            pid = server.pid
            pgid = os.getpgid(pid)
            assert pgid == pid != os.getpgid(0)          # its own process group
            assert server.running() and serving.pid_alive(pid)
            reply = serving.complete(server.base_url, prompt, max_tokens=3)
            assert reply["tokens"] == 3 and reply["text"].strip()
            assert 0 <= reply["ttft_s"] <= reply["latency_s"]
            load = serving.run_concurrent(server.base_url, [prompt, prompt], concurrency=2, max_tokens=2)
            assert [r["tokens"] for r in load["requests"]] == [2, 2]
            assert load["tokens"] == 4 and load["tokens_per_s"] > 0
            raise RuntimeError("a cell failed")
    assert not server.running()
    assert not serving.pid_alive(pid)
    assert not group_alive(pgid)
    server.stop()                                         # idempotent


def test_server_is_stopped_when_the_object_is_dropped():
    server = serving.LlamaServer(gguf_path(), n_threads=1, n_ctx=256).start()
    pid = server.pid
    assert serving.pid_alive(pid)
    del server
    gc.collect()
    assert not serving.pid_alive(pid)


def test_server_is_stopped_when_the_interpreter_exits():
    """A kernel that dies without stopping its server (no with-block, no stop) leaves nothing behind."""
    code = textwrap.dedent(f"""
        from brewslm_helpers import serving
        keep = serving.LlamaServer({str(gguf_path())!r}, n_threads=1, n_ctx=256).start()
        print(keep.pid, flush=True)
        raise SystemExit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                          cwd=REPO_ROOT)
    assert proc.returncode == 3, proc.stderr
    pid = int(proc.stdout.split()[0])
    assert not serving.pid_alive(pid)


def test_a_server_that_cannot_start_raises_and_leaves_nothing(tmp_path):
    bad = tmp_path / "not_a_model.gguf"
    bad.write_bytes(b"this is not a GGUF file")
    server = serving.LlamaServer(bad, n_threads=1, startup_timeout_s=60)
    with pytest.raises(serving.ServerError):
        server.start()
    assert server.pid is not None and not serving.pid_alive(server.pid)
    with pytest.raises(FileNotFoundError):
        serving.LlamaServer(tmp_path / "missing.gguf")


def test_make_trace_is_seeded_sorted_and_in_range():
    a = serving.make_trace(200, 5.0, prompt_tokens=(16, 64), output_tokens=(4, 32), seed=3)
    assert a == serving.make_trace(200, 5.0, prompt_tokens=(16, 64), output_tokens=(4, 32), seed=3)
    assert a != serving.make_trace(200, 5.0, prompt_tokens=(16, 64), output_tokens=(4, 32), seed=4)
    assert [r["id"] for r in a] == list(range(200)) and a[0]["arrival_s"] == 0.0
    arrivals = [r["arrival_s"] for r in a]
    assert arrivals == sorted(arrivals)
    assert 20 < arrivals[-1] < 60                                   # ~ 199 gaps of 0.2 s
    assert all(16 <= r["prompt_tokens"] <= 64 and 4 <= r["output_tokens"] <= 32 for r in a)


def test_static_batching_waits_for_the_longest_request():
    trace = [{"id": 0, "arrival_s": 0.0, "prompt_tokens": 10, "output_tokens": 3},
             {"id": 1, "arrival_s": 0.0, "prompt_tokens": 20, "output_tokens": 1},
             {"id": 2, "arrival_s": 0.5, "prompt_tokens": 5, "output_tokens": 2}]
    seen = []

    def step(b, p):
        seen.append((b, p))
        return 1.0

    out = serving.static_batching(trace, 2, step)
    # batch {0, 1} runs 3 iterations (padding keeps 1's slot); 2 waits for it, then runs alone
    assert [(r["id"], r["first_token_s"], r["finish_s"]) for r in out] == [(0, 1.0, 3.0), (1, 1.0, 3.0),
                                                                          (2, 4.0, 5.0)]
    assert seen == [(2, 30), (2, 0), (2, 0), (1, 5), (1, 0)]
    assert out[2]["arrival_s"] == 0.5 and out[2]["output_tokens"] == 2


def test_cost_model_interpolates_and_extrapolates():
    step = serving.cost_model({"batch_sizes": [1, 4, 8], "step_s": [0.1, 0.2, 0.4],
                               "prefill_s_per_token": 0.01})
    assert step(1, 0) == pytest.approx(0.1)
    assert step(2, 0) == pytest.approx(0.1 + 0.1 / 3)
    assert step(8, 10) == pytest.approx(0.5)
    assert step(16, 0) == pytest.approx(0.8)                      # slope of the last segment


def test_gguf_variant_names_and_the_shipped_file():
    assert serving.gguf_variant("q4_1") == gguf_path()
    with pytest.raises(ValueError, match="unknown GGUF type"):
        serving.gguf_variant("Q3_K_XS")


def test_free_port_is_bindable():
    import socket

    port = serving.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
