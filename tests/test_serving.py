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


# -------------------------------------------------------------------------------------------------
# the batched llama.cpp engine and the scheduler-driven replay


@pytest.fixture(scope="module")
def engine():
    with serving.BatchedLlama(gguf_path(), n_seqs=4, n_ctx_per_seq=96, n_threads=1) as eng:
        yield eng


@pytest.fixture(scope="module")
def prompt_ids():
    tok = load_tokenizer()
    return [tok(chat_prompt(tok, q), add_special_tokens=False)["input_ids"]
            for q in ("What is the capital of France?", "Name a colour.", "Say hello.")]


def test_batched_greedy_equals_each_prompt_alone(engine, prompt_ids):
    alone = [engine.generate(p, 6) for p in prompt_ids]
    assert all(len(a) == 6 for a in alone)
    engine.reset()
    nxt = engine.step({s: p for s, p in enumerate(prompt_ids)})      # three prompts in one llama_decode
    out = {s: [t] for s, t in nxt.items()}
    for _ in range(5):
        nxt = engine.step({s: [t] for s, t in nxt.items()})
        for s, t in nxt.items():
            out[s].append(t)
    assert [out[s] for s in range(3)] == alone
    assert engine.n_past[0] == len(prompt_ids[0]) + 5
    engine.release(0)
    assert engine.n_past[0] == 0
    import llama_cpp
    assert llama_cpp.llama_memory_seq_pos_max(engine.mem, 0) == -1      # its KV cells are gone
    assert llama_cpp.llama_memory_seq_pos_max(engine.mem, 1) == len(prompt_ids[1]) + 4
    engine.reset()
    with pytest.raises(ValueError, match="KV cells"):
        engine.step({0: list(range(100, 200))})
    with pytest.raises(ValueError, match="seq_id"):
        engine.step({4: [1]})
    engine.reset()


def test_measure_step_times_shape(engine):
    m = engine.measure_step_times([1, 2], context_len=8, steps=2, repeats=2, prefill_len=8)
    assert m["batch_sizes"] == [1, 2] and len(m["step_s"]) == 2 and len(m["step_s_all"][1]) == 2
    assert all(s > 0 for s in m["step_s"]) and m["prefill_s_per_token"] > 0
    serving.cost_model(m)(3, 10)                                     # the shape cost_model takes


def test_make_trace_with_prompts_all_at_once(prompt_ids):
    tr = serving.make_trace(5, float("inf"), output_tokens=(2, 4), seed=0, prompts=prompt_ids)
    assert [r["arrival_s"] for r in tr] == [0.0] * 5
    assert [r["prompt_ids"] for r in tr] == [prompt_ids[i % 3] for i in range(5)]
    assert all(r["prompt_tokens"] == len(r["prompt_ids"]) for r in tr)


def _trace(prompt_ids, outs):
    return [{"id": i, "arrival_s": 0.1 * i, "prompt_ids": prompt_ids[i % len(prompt_ids)],
             "prompt_tokens": len(prompt_ids[i % len(prompt_ids)]), "output_tokens": o}
            for i, o in enumerate(outs)]


def test_engine_steps_serves_a_static_schedule_with_padding(engine, prompt_ids):
    trace = _trace(prompt_ids, [3, 1, 2])
    steps = serving.EngineSteps(engine, trace)
    records = serving.static_batching(trace, 2, steps)
    outputs = steps.close()
    assert {i: len(t) for i, t in outputs.items()} == {0: 3, 1: 1, 2: 2}
    for r in trace:
        assert outputs[r["id"]] == engine.generate(r["prompt_ids"], r["output_tokens"])
    # request 0 arrives first and is alone in the first batch (static: 1 arrived at 0.1 s > 0)
    assert [(b, p) for b, p, _ in steps.log][:1] == [(1, len(prompt_ids[0]))]
    assert all(s > 0 for _, _, s in steps.log)
    assert records[-1]["finish_s"] == pytest.approx(sum(s for _, _, s in steps.log), rel=1e-6, abs=0.2)


def test_engine_steps_evicts_and_admits_like_continuous_batching(engine, prompt_ids):
    trace = _trace(prompt_ids, [3, 1, 2])
    p = [len(prompt_ids[i]) for i in range(3)]
    steps = serving.EngineSteps(engine, trace)
    steps(2, p[0] + p[1])          # 0 and 1 admitted; 1 is done after this iteration
    steps(2, p[2])                 # 1 evicted, 2 admitted into its slot, 0 decodes
    steps(2, 0)                    # 0 finishes, 2 finishes
    outputs = steps.close()
    for r in trace:
        assert outputs[r["id"]] == engine.generate(r["prompt_ids"], r["output_tokens"])


def test_engine_steps_refuses_calls_that_contradict_the_queue(engine, prompt_ids):
    trace = _trace(prompt_ids, [3, 2])
    steps = serving.EngineSteps(engine, trace)
    with pytest.raises(RuntimeError, match="FIFO"):
        steps(1, len(prompt_ids[0]) + 1)
    steps = serving.EngineSteps(engine, trace)
    steps(1, len(prompt_ids[0]))
    with pytest.raises(RuntimeError, match="unfinished"):
        steps(1, len(prompt_ids[1]))          # request 0 is not done: it cannot leave the batch
    steps = serving.EngineSteps(engine, trace)
    steps(1, len(prompt_ids[0]))
    with pytest.raises(RuntimeError, match="not completed"):
        steps.close()
    with pytest.raises(ValueError, match="prompt_tokens"):
        serving.EngineSteps(engine, [{**trace[0], "prompt_tokens": 1}])
