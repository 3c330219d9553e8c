"""Lesson 12's plumbing: the tool catalogue, its rendering, the call format and the shipped data."""
from __future__ import annotations

import json

import jsonschema
import pytest

from brewslm_helpers import tools
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
