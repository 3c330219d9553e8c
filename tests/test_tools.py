"""Lesson 12's plumbing: the tool catalogue, its rendering, the call format and the shipped data."""
from __future__ import annotations

import json
import math

import jsonschema
import numpy as np
import pytest
import torch

from brewslm_helpers import models, tools
from brewslm_helpers.budget import cpu_threads
from brewslm_helpers.data import DATA_DIR, make_tool_data

TRAIN = tools.load_tool_data("train")
TEST = tools.load_tool_data("test")


def schema_ok(call: dict) -> bool:
    tool = {t["name"]: t for t in tools.CATALOGUE}[call["name"]]
    return jsonschema.Draft202012Validator(tool["parameters"]).is_valid(call["arguments"])


def test_catalogue_schemas_are_valid_and_strict():
    assert len(tools.CATALOGUE) == len(set(tools.TOOL_NAMES)) >= 4
    for tool in tools.CATALOGUE:
        assert set(tool) == {"name", "description", "parameters"}
        jsonschema.Draft202012Validator.check_schema(tool["parameters"])
        assert tool["parameters"]["additionalProperties"] is False
        assert set(tool["parameters"]["required"]) <= set(tool["parameters"]["properties"])


def test_system_prompt_renders_every_tool_and_argument():
    text = tools.system_prompt()
    for tool in tools.CATALOGUE:
        line = tools.render_tool(tool)
        assert line in text and line.startswith(tool["name"] + "(")
        for arg in tool["parameters"]["properties"]:
            optional = arg not in tool["parameters"]["required"]
            assert f"{arg}{'?' if optional else ''}: " in line
    assert '"celsius" | "fahrenheit"' in text
    assert tools.NO_TOOL_REPLY in text and tools.CALL_OPEN in text


def test_format_call_round_trips():
    call = {"name": "convert_currency", "arguments": {"amount": 12.5, "from_currency": "EUR", "to_currency": "JPY"}}
    text = tools.format_call(call)
    assert text.startswith(tools.CALL_OPEN) and text.endswith(tools.CALL_CLOSE)
    assert json.loads(text[len(tools.CALL_OPEN):-len(tools.CALL_CLOSE)]) == call
    assert " " not in text  # compact
    assert tools.target_reply({"call": None}) == tools.NO_TOOL_REPLY


@pytest.mark.parametrize("rows,n,n_none", [(TRAIN, 400, 100), (TEST, 80, 20)], ids=["train", "test"])
def test_splits_sizes_and_gold_calls_are_valid(rows, n, n_none):
    assert len(rows) == n and sum(r["call"] is None for r in rows) == n_none
    assert len({r["id"] for r in rows}) == n
    assert {r["call"]["name"] for r in rows if r["call"]} == set(tools.TOOL_NAMES)
    for r in rows:
        assert set(r) == {"id", "request", "call"} and r["request"].strip()
        if r["call"] is not None:
            assert schema_ok(r["call"]), r


def test_held_out_split_is_disjoint_from_train():
    train_requests = {r["request"] for r in TRAIN}
    assert not train_requests & {r["request"] for r in TEST}
    train_cities = {r["call"]["arguments"]["city"] for r in TRAIN if r["call"] and "city" in r["call"]["arguments"]}
    test_cities = {r["call"]["arguments"]["city"] for r in TEST if r["call"] and "city" in r["call"]["arguments"]}
    assert test_cities and not train_cities & test_cities


def test_data_files_are_reproducible(tmp_path):
    make_tool_data.main(tmp_path)
    for name in ("tool_train.jsonl", "tool_test.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name


def test_load_and_sft_examples():
    assert tools.load_tool_data("test", 5) == TEST[:5]
    with pytest.raises(ValueError):
        tools.load_tool_data("dev")
    ex = tools.sft_examples(TEST[:2])
    for e, r in zip(ex, TEST[:2]):
        assert [m["role"] for m in e["prompt"]] == ["system", "user"]
        assert e["prompt"][0]["content"] == tools.system_prompt() and e["prompt"][1]["content"] == r["request"]
        assert e["completion"] == [{"role": "assistant", "content": tools.target_reply(r)}]


# ----------------------------------------------------------------------------------------------
# Intervals and the per-argument breakdown
# ----------------------------------------------------------------------------------------------

def C(name, **arguments):
    return {"name": name, "arguments": arguments}


def wilson_closed_form(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval written out (Wilson 1927), independent of scipy."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_wilson_matches_the_closed_form():
    # the example: argument match 0.591 on 44 rows is about [0.44, 0.72]
    low, high = tools.wilson(26, 44)
    assert (round(low, 2), round(high, 2)) == (0.44, 0.72)
    for k, n in [(26, 44), (0, 10), (10, 10), (1, 3), (57, 60), (30, 60)]:
        assert tools.wilson(k, n) == pytest.approx(wilson_closed_form(k, n), abs=1e-9), (k, n)
    assert tools.wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert tools.wilson(10, 10)[1] == pytest.approx(1.0, abs=1e-12)
    assert tools.wilson(0, 0) == (0.0, 1.0)


def test_metrics_with_intervals_counts():
    refs = [C("get_time", city="Rome"), C("get_time", city="Oslo"), C("set_timer", minutes=3), None, None]
    preds = [C("get_time", city="Rome"), None, C("set_timer", minutes=4), None, C("get_time", city="Kyiv")]
    metrics = {"valid_call_rate": 2 / 3, "name_accuracy": 2 / 3, "argument_match": 1 / 3,
               "no_tool_precision": 1 / 2, "no_tool_recall": 1 / 2}
    out = tools.metrics_with_intervals(metrics, preds, refs)
    assert {key: (cell["k"], cell["n"]) for key, cell in out.items()} == {
        "valid_call_rate": (2, 3), "name_accuracy": (2, 3), "argument_match": (1, 3),
        "no_tool_precision": (1, 2), "no_tool_recall": (1, 2)}
    for key, cell in out.items():
        assert cell["value"] == metrics[key]
        assert (cell["low"], cell["high"]) == tools.wilson(cell["k"], cell["n"])
        assert cell["low"] <= cell["value"] <= cell["high"]
    assert tools.format_interval(out["argument_match"]) == "0.333 [0.06, 0.79] (1/3)"
    # a router that calls a tool every time: no reply without a call, so no-tool precision measured nothing
    out = tools.metrics_with_intervals({**metrics, "no_tool_precision": 0.0}, [C("get_time", city="Rome")] * 5, refs)
    assert (out["no_tool_precision"]["k"], out["no_tool_precision"]["n"]) == (0, 0)
    assert (out["no_tool_precision"]["low"], out["no_tool_precision"]["high"]) == (0.0, 1.0)


def test_argument_outcomes_per_argument():
    seen = []

    def match(pred_value, gold_value):
        seen.append((pred_value, gold_value))
        return str(pred_value).casefold() == str(gold_value).casefold()

    refs = [C("get_weather", city="Paris", unit="celsius"),
            C("convert_currency", amount=20, from_currency="USD", to_currency="EUR"),
            C("get_time", city="Rome"), None, C("set_timer", minutes=5), C("get_time", city="Lima")]
    preds = [C("get_weather", city="paris", label="x"),                          # correct, missing, extra
             C("convert_currency", amount=2, from_currency="USD", to_currency="EUR"),  # a wrong value
             C("get_weather", city="Rome"),                                       # wrong tool: skipped
             C("get_time", city="Oslo"),                                          # no tool needed: skipped
             None,                                                                # no call: skipped
             {"name": "get_time", "arguments": "Lima"}]                           # not a dict: gold keys missing
    got = tools.argument_outcomes(preds, refs, match)
    assert got == [
        {"tool": "get_weather", "argument": "city", "outcome": "correct"},
        {"tool": "get_weather", "argument": "unit", "outcome": "missing"},
        {"tool": "get_weather", "argument": "label", "outcome": "extra"},
        {"tool": "convert_currency", "argument": "amount", "outcome": "wrong value"},
        {"tool": "convert_currency", "argument": "from_currency", "outcome": "correct"},
        {"tool": "convert_currency", "argument": "to_currency", "outcome": "correct"},
        {"tool": "get_time", "argument": "city", "outcome": "missing"}]
    assert seen[0] == ("paris", "Paris") and seen[1] == (2, 20)  # match(predicted, gold)


# ----------------------------------------------------------------------------------------------
# llama.cpp: the reply grammar and a GGUF of a changed model
# ----------------------------------------------------------------------------------------------

PROMPT = "The capital of France is Paris, and the capital of Italy is"


@pytest.fixture(scope="module")
def teacher():
    return models.load_teacher()


def llama_logits(path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of ``ids`` (``[len(ids), vocab]``)."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=cpu_threads(), logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])
    finally:
        llm.close()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_strict_call():
    assert tools.strict_call(tools.format_call(C("get_time", city="Rome"))) == C("get_time", city="Rome")
    assert tools.strict_call('<tool_call> {"name": "set_timer", "arguments": {"minutes": 3}} </tool_call>') == \
        C("set_timer", minutes=3)
    for text in [tools.NO_TOOL_REPLY, 'Sure: <tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
                 '<tool_call>{"name": "get_time", "arguments": {}}', '<tool_call>{"name": "get_time"}</tool_call>',
                 '<tool_call>{"name": 3, "arguments": {}}</tool_call>', '<tool_call>{"name": "get_time", </tool_call>']:
        assert tools.strict_call(text) is None, text


def test_reply_grammar_compiles_and_constrains_generation(teacher):
    import llama_cpp
    _, tok = teacher
    for no_tool in (True, False):
        grammar = tools.reply_grammar(no_tool=no_tool)
        assert llama_cpp.LlamaGrammar.from_string(grammar, verbose=False) is not None
        assert (json.dumps(tools.NO_TOOL_REPLY) in grammar.splitlines()[0]) == no_tool
    llm = tools.load_llama(models.gguf_path(), n_ctx=512)
    request = ["What time is it in Istanbul?"]
    # with the no-tool exit: the shipped model's reply ends, and is the no-tool reply or a catalogue call
    (reply,), (finish,) = tools.llama_replies(llm, tok, request, max_new_tokens=40, grammar=tools.reply_grammar(),
                                              return_finish=True)
    assert finish == "stop" and (reply == tools.NO_TOOL_REPLY or tools.strict_call(reply) is not None), reply
    # without it the model must call a catalogue tool, with its required keys and no others
    (reply,), (finish,) = tools.llama_replies(llm, tok, request, max_new_tokens=64,
                                              grammar=tools.reply_grammar(no_tool=False), return_finish=True)
    call = tools.strict_call(reply)
    assert finish == "stop" and call is not None and call["name"] in tools.TOOL_NAMES, reply
    params = {t["name"]: t["parameters"] for t in tools.CATALOGUE}[call["name"]]
    assert set(params["required"]) <= set(call["arguments"]) <= set(params["properties"]), call


def test_permute_qk_inverts_transformers_gguf_loader():
    """transformers un-permutes q/k when it loads a GGUF; tools._permute_qk must be its inverse
    (9 query heads, 3 key/value heads of head size 64, as in SmolLM2-135M)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    rng = np.random.default_rng(0)
    for rows, n_head, n_kv in [(9 * 64, 9, 9), (3 * 64, 9, 3)]:
        w = rng.standard_normal((rows, 16)).astype(np.float32)
        permuted = tools._permute_qk(w, n_kv)
        assert not np.array_equal(permuted, w)
        assert np.array_equal(proc._reverse_permute_weights(permuted, n_head, n_kv), w)


def test_write_merged_gguf_of_an_unchanged_model_copies_every_tensor(teacher, tmp_path):
    import gguf
    model, tok = teacher
    n_tensors = len(gguf.GGUFReader(str(models.gguf_path())).tensors)
    counts = tools.write_merged_gguf(model.state_dict(), model.config, tmp_path / "same.gguf", progress=False)
    assert counts == {"copied": n_tensors, "rewritten": 0}
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    # it loads in llama.cpp and computes exactly what the shipped file computes
    assert np.array_equal(llama_logits(tmp_path / "same.gguf", ids), llama_logits(models.gguf_path(), ids))


def test_write_merged_gguf_rewrites_a_changed_projection_in_llama_cpp_order(teacher, tmp_path):
    """A perturbed q_proj and k_proj (layer 0) are rewritten as Q8_0, and llama.cpp's logits on the
    changed file match transformers' on the changed model: the rows are in the order llama.cpp's rotary
    embedding expects (9 query heads, 3 key/value heads).

    Measured on a 13-token prompt (logits' std about 6): the shipped Q4_1 file in llama.cpp vs
    transformers (same weights) differ by at most 1.36; the perturbed file vs the perturbed model by
    1.37; the perturbation itself moves transformers' logits by up to 20.5; written without the
    permutation, the perturbed file is off by 18 already at a perturbation a third this size."""
    model, tok = teacher
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    base = hf_logits(model, ids)
    state = model.state_dict()
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"]
    original = {name: state[name].clone() for name in names}
    generator = torch.Generator().manual_seed(0)
    try:
        for name in names:
            state[name].add_(torch.randn(state[name].shape, generator=generator) * 3 * original[name].std())
        changed = hf_logits(model, ids)
        counts = tools.write_merged_gguf(model.state_dict(), model.config, tmp_path / "changed.gguf", progress=False)
    finally:
        for name in names:
            state[name].copy_(original[name])
    assert counts["rewritten"] == 2 and counts["copied"] > 200
    got = llama_logits(tmp_path / "changed.gguf", ids)
    assert np.abs(changed - base).max() > 10  # the perturbation is visible in the logits
    assert np.abs(got - changed).max() < 2.0, np.abs(got - changed).max()
    assert np.abs(got - base).max() > 10
