# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown] id="intro"
# # Lesson 12 — Tool use: fine-tuning a small router to call functions
#
# An assistant that books, converts, looks up or sets things does not do it in text. It emits a
# **tool call**: a tool name and its arguments as JSON, which the application executes. The model has
# to learn three things: *when* a tool is needed (and when it is not), *which* tool, and *which
# arguments*, in a format a program can parse and check. A small model can do this job, routing
# requests in front of a bigger one or on a device, if it is trained for it and **measured honestly**.
#
# Our router knows a fixed **catalogue** of four tools. Each tool is declared with a JSON schema, and
# the schemas are rendered into the system message. The reply format (Hermes / SmolLM2 style) is one
# call per reply:
#
# ```
# <tool_call>{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}}</tool_call>
# ```
#
# (compact JSON: every token of the reply costs a decoding step). A request that needs no tool gets the plain reply `No tool needed.` (the **no-tool path**). Any reply
# without a call counts as "no tool".
#
# **You will build** (each exercise is graded on its own)
# 1. `parse_tool_call`: pull the call out of whatever the model wrote, junk around it included.
# 2. `validate_call`: check a call against the catalogue's schemas with `jsonschema`. Parsed is not the
#    same as executable.
# 3. `tool_call_metrics`: the **valid-call rate**, the **argument-match accuracy** (on normalised
#    values) and the no-tool **precision and recall**.
#
# **You will measure**, on the real SmolLM2-135M-Instruct and all 80 held-out requests (unseen cities,
# countries and phrasings), each rate with its 95 % Wilson interval: the model as shipped against the
# same model fine-tuned with LoRA (TRL's `SFTTrainer`), served by llama.cpp; which argument of which tool
# the router gets wrong; what the no-tool path loses when the training set has no negatives; and what
# constrained decoding (a JSON grammar in llama.cpp) does to validity and to argument correctness.

# %% id="parameters" tags=["parameters"]
import os
BUDGET = os.environ.get("BREWSLM_BUDGET", "full")

# %% id="setup" nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
# %matplotlib inline
import functools
import json
import math
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jsonschema
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from brewslm_helpers import budget, models, plots, report, tools

torch.manual_seed(0)
CFG = budget.pick(
    BUDGET,
    ci=dict(train_rows=2, epochs=1, batch_size=2, lr=1e-3, lora_r=8, test_rows=8, max_new_tokens=24,
            check_rows=1),
    full=dict(train_rows=240, epochs=1, batch_size=4, lr=1e-3, lora_r=16, test_rows=None, max_new_tokens=64,
              check_rows=8),
)
CATALOGUE = tools.CATALOGUE

model, tok = models.load_teacher()
print(f"budget {BUDGET}: {CFG}")
print(f"{models.MODEL_NAME}: {model.num_parameters():,} parameters; tools: {', '.join(tools.TOOL_NAMES)}")

# %% [markdown] id="md_catalogue"
# ## 1. The catalogue, the system message and the data
#
# Each tool is an OpenAI-style declaration: a `name`, a `description`, and `parameters`, a JSON schema
# (draft 2020-12) of the arguments object. The schema says which arguments exist, their types, what is
# required, allowed values (`enum`), formats (`pattern`), ranges (`minimum`), and that no other key is
# allowed (`additionalProperties: false`). It lives in `brewslm_helpers/tools.py`.
#
# The model has to see the catalogue, so it goes into the **system message**. Every training step and
# every generated token pays for that message (attention over it, and the prefill). We therefore render
# each schema as a compact signature line rather than pasting the raw JSON. `?` marks an optional
# argument. The cost of this choice: constraints that are not in the signature, such as the `minimum` of
# `minutes`, are checked by the validator but never shown to the model.

# %% id="demo_catalogue"
SYSTEM = tools.system_prompt(CATALOGUE)
system_tokens = len(tok(SYSTEM, add_special_tokens=False)["input_ids"])
raw_tokens = len(tok(json.dumps(CATALOGUE), add_special_tokens=False)["input_ids"])
print(SYSTEM)
print(f"\nsystem message: {system_tokens} tokens (the raw JSON schemas alone would be {raw_tokens})")
print("\nget_weather's schema:", json.dumps(CATALOGUE[0]["parameters"]))

train_all, test_all = tools.load_tool_data("train"), tools.load_tool_data("test")
for name, rows in (("train", train_all), ("test (held out)", test_all)):
    counts = pd.Series([r["call"]["name"] if r["call"] else "(no tool)" for r in rows]).value_counts()
    print(f"\n{name}: {len(rows)} requests: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
for r in test_all[:4]:
    print(f"  {r['request']!r:60} -> {tools.target_reply(r)}")


# %% [markdown] id="md_parse"
# ## 2. Parsing a call out of model text
#
# What a model writes is not always the clean reply it was trained on. Real outputs include a sentence
# before the call ("Sure! Here is the call:"), a Markdown code fence around the JSON, a missing closing
# tag because generation hit its token limit, a second call after the first, and chatter after it. A
# parser that runs `json.loads` on the whole reply turns all of these into "no call". The router is
# then scored on the parser's brittleness, not on the model.
#
# The rule here is simple and stated up front:
# 1. If the text contains `<tool_call>`, search only what follows its first occurrence, up to the next
#    `</tool_call>` (or the end of the text if the tag is never closed). Otherwise search the whole text.
#    Where the tag occurs, nothing before it counts, even a complete call (a model often echoes an
#    example call before its own), and nothing after the closing tag counts either: a tagged region that
#    holds no call means "no call", not "look elsewhere".
# 2. The call is the **first JSON object** in that region that has a string `"name"`. Try every `{` in
#    turn, and decode a JSON value that starts there with `json.JSONDecoder().raw_decode(text, i)`. It
#    returns the object and where it ended, and ignores what follows. Braces inside JSON strings are
#    handled for you.
# 3. The arguments are the object's `"arguments"` (`{}` if absent). Some APIs (OpenAI's) send them as a
#    JSON *string*: decode it if it decodes, else keep the string and let the validator reject it.
#
# The caveat: a forgiving parser is right for *measuring* and for *serving*. You still validate
# everything it returns (next exercise) before anything is executed.

# %% id="ex_parse_tool_call" nbgrader={"grade": false, "grade_id": "ex_parse_tool_call", "locked": false, "schema_version": 3, "solution": true, "task": false}
def parse_tool_call(text: str) -> dict | None:
    """The first tool call in a model's reply, or None if it holds none.

    text: the model's reply (any string: prose, code fences, tags, truncated output).
    Search region: after the first "<tool_call>" up to the next "</tool_call>" (or the end of the
    text) if the tag occurs, else the whole text. The call is the first JSON object (decoded with
    json.JSONDecoder().raw_decode starting at a "{") whose "name" is a string; text around it is ignored.
    Returns {"name": str, "arguments": args}: args is the object's "arguments" ({} if missing); an
    "arguments" string that holds JSON is decoded, any other value is returned as found.
    Returns None when the region holds no such object (plain prose, broken JSON, no name).
    """
    ### BEGIN SOLUTION
    start = text.find("<tool_call>")
    if start >= 0:
        text = text[start + len("<tool_call>"):]
        end = text.find("</tool_call>")
        if end >= 0:
            text = text[:end]
    decoder = json.JSONDecoder()
    for start in [i for i, ch in enumerate(text) if ch == "{"]:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            arguments = obj.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    pass
            return {"name": obj["name"], "arguments": arguments}
    return None
    ### END SOLUTION


# %% id="test_parse_tool_call" nbgrader={"grade": true, "grade_id": "test_parse_tool_call", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
call = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
clean = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>'
assert parse_tool_call(clean) == call, parse_tool_call(clean)
# junk around it: prose before, a code fence inside the tags, chatter (with braces) after
messy = ('Sure! Here is the call you need:\n<tool_call>\n```json\n'
         '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n```\n</tool_call>\n'
         'Let me know if you need anything else {:-}')
assert parse_tool_call(messy) == call, f"junk around the call: got {parse_tool_call(messy)}"
# no tags: the first JSON object with a name, in the middle of prose
assert parse_tool_call('I will call {"name": "get_time", "arguments": {"city": "Rome"}} now.') == \
    {"name": "get_time", "arguments": {"city": "Rome"}}
# with a tag, only the tagged region counts: an example call before it is not the call
echo = ('Format: {"name": "get_time", "arguments": {"city": "Paris"}}\n'
        '<tool_call>{"name": "set_timer", "arguments": {"minutes": 3}}</tool_call>')
assert parse_tool_call(echo) == {"name": "set_timer", "arguments": {"minutes": 3}}, \
    f"the search starts after <tool_call>: got {parse_tool_call(echo)}"
# two calls: the first one wins
two = ('{"name": "get_time", "arguments": {"city": "Oslo"}} and then '
       '{"name": "get_weather", "arguments": {"city": "Oslo"}}')
assert parse_tool_call(two) == {"name": "get_time", "arguments": {"city": "Oslo"}}, parse_tool_call(two)
# braces inside a JSON string are not structure
braces = '<tool_call>{"name": "set_timer", "arguments": {"minutes": 5, "label": "a {b} c"}}</tool_call>'
assert parse_tool_call(braces) == {"name": "set_timer", "arguments": {"minutes": 5, "label": "a {b} c"}}
# no call at all
for text in ["No tool needed.", "", "The weather in Paris is sunny.", '<tool_call>{"name": "get_time", </tool_call>']:
    assert parse_tool_call(text) is None, f"{text!r} holds no call, got {parse_tool_call(text)}"
print("parse_tool_call: OK")
### BEGIN HIDDEN TESTS
# generation stopped before the closing tag
assert parse_tool_call('ok <tool_call>{"name": "get_time", "arguments": {"city": "Lima"}}') == \
    {"name": "get_time", "arguments": {"city": "Lima"}}
# arguments sent as a JSON string (OpenAI style), missing arguments, undecodable string kept as is
assert parse_tool_call('{"name": "get_time", "arguments": "{\\"city\\": \\"Lima\\"}"}') == \
    {"name": "get_time", "arguments": {"city": "Lima"}}
assert parse_tool_call('<tool_call>{"name": "get_time"}</tool_call>') == {"name": "get_time", "arguments": {}}
assert parse_tool_call('{"name": "get_time", "arguments": "Lima"}') == {"name": "get_time", "arguments": "Lima"}
# objects without a (string) name are skipped; the call after them is found
assert parse_tool_call('{"note": 1} {"name": 3} {"name": "get_time", "arguments": {"city": "Kyiv"}} {"x": 2}') == \
    {"name": "get_time", "arguments": {"city": "Kyiv"}}
# a brace before the tag is outside the search region; a second tagged call is ignored
tagged = ('Plan {step 1}: <tool_call>{"name": "set_timer", "arguments": {"minutes": 3}}</tool_call> '
          '<tool_call>{"name": "get_time", "arguments": {"city": "Riga"}}</tool_call> }')
assert parse_tool_call(tagged) == {"name": "set_timer", "arguments": {"minutes": 3}}
# the region starts at the tag even when the tag is never closed
assert parse_tool_call('e.g. {"name": "get_time", "arguments": {"city": "Oslo"}} -> '
                       '<tool_call>{"name": "set_timer", "arguments": {"minutes": 4}}') == \
    {"name": "set_timer", "arguments": {"minutes": 4}}
# a tagged region without a call is no call: neither the text before the tag nor after its end is searched
for text in ['Like {"name": "get_time", "arguments": {"city": "Oslo"}} <tool_call>{"name": </tool_call>',
             '<tool_call>{"name": "get_time", </tool_call> {"name": "set_timer", "arguments": {"minutes": 2}}',
             '{"name": "get_time", "arguments": {}} <tool_call>No tool needed.']:
    assert parse_tool_call(text) is None, f"{text!r}: the tagged region holds no call, got {parse_tool_call(text)}"
# nested arguments and unicode survive
nested = 'x {"name": "get_weather", "arguments": {"city": "São Paulo", "extra": {"a": [1, {"b": 2}]}}} y }'
assert parse_tool_call(nested) == {"name": "get_weather", "arguments": {"city": "São Paulo", "extra": {"a": [1, {"b": 2}]}}}
# a JSON list or a broken object is not a call
assert parse_tool_call('[{"name": 1}]') is None
assert parse_tool_call('{"name": "get_time", "arguments": {"city": "Rome"}') is None
### END HIDDEN TESTS

# %% [markdown] id="md_validate"
# ## 3. Validating a call against the catalogue
#
# A parsed call is only JSON. Before anything is executed, check that it names a tool in the
# catalogue and that its arguments satisfy that tool's schema. The arguments must be of the right
# types (`"minutes": "5"` is a string, not an integer), have every required key and no unknown one,
# take allowed values (`"unit": "kelvin"` is not in the enum) and match formats (`"from_currency":
# "euros"` is not a 3-letter code). `jsonschema` is the reference implementation of the standard:
# `jsonschema.Draft202012Validator(schema).iter_errors(instance)` yields one error per violation.
#
# Two details matter. Validate the arguments against the tool's **`parameters`** schema. The whole
# declaration (`{"name": ..., "description": ..., "parameters": ...}`) is also a dict, but as a schema it
# constrains nothing, so every call would pass. And a reply with **no call** is not a valid call: it has
# nothing to execute.
#
# The validator checks; it never repairs. A missing required argument is a problem even when the schema
# declares a `default` for it: in JSON Schema `default` is an annotation, which `jsonschema` does not
# fill in, and a call the model did not complete is not the call it meant. Do not change the call you
# are given (the caller may log or execute exactly what was validated).

# %% id="ex_validate_call" nbgrader={"grade": false, "grade_id": "ex_validate_call", "locked": false, "schema_version": 3, "solution": true, "task": false}
def validate_call(call: dict | None, catalogue: list[dict]) -> list[str]:
    """The problems that stop `call` from being executed; [] means it is a valid call.

    call: a parsed call {"name": ..., "arguments": ...} (any values), or None when the reply held no call.
    catalogue: tool declarations {"name": str, "description": str, "parameters": JSON schema}.
    Checks, in order, returning at the first failing one: call is a dict (None or anything else: one
    problem); its "name" is a string naming a catalogue tool (one problem); its "arguments" is a dict
    (one problem). Then one problem per jsonschema error of the arguments against that tool's
    "parameters" schema (jsonschema.Draft202012Validator(...).iter_errors). Messages are free text.
    Nothing is filled in or changed: a missing required argument is a problem even if the schema gives
    it a "default", and `call` is left as it was.
    """
    ### BEGIN SOLUTION
    if not isinstance(call, dict):
        return ["not a tool call: no JSON object with a name"]
    tools_by_name = {tool["name"]: tool for tool in catalogue}
    name = call.get("name")
    if not isinstance(name, str) or name not in tools_by_name:
        return [f"unknown tool {name!r}"]
    arguments = call.get("arguments")
    if not isinstance(arguments, dict):
        return [f"{name}: arguments must be a JSON object, got {type(arguments).__name__}"]
    validator = jsonschema.Draft202012Validator(tools_by_name[name]["parameters"])
    return [f"{name}: {error.message}" for error in validator.iter_errors(arguments)]
    ### END SOLUTION


# %% id="test_validate_call" nbgrader={"grade": true, "grade_id": "test_validate_call", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
def reference_ok(call, catalogue):
    """jsonschema's verdict, written independently: is `call` executable?"""
    if not isinstance(call, dict) or not isinstance(call.get("arguments"), dict):
        return False
    schemas = {t["name"]: t["parameters"] for t in catalogue}
    if not isinstance(call.get("name"), str) or call["name"] not in schemas:
        return False
    try:
        jsonschema.validate(call["arguments"], schemas[call["name"]], cls=jsonschema.Draft202012Validator)
        return True
    except jsonschema.ValidationError:
        return False


def W(**args):
    return {"name": "get_weather", "arguments": args}


cases = [
    (W(city="Paris"), True), (W(city="Paris", unit="fahrenheit"), True),
    (W(city="Paris", unit="kelvin"), False),             # not in the enum
    (W(unit="celsius"), False),                           # required city missing
    (W(city="Paris", country="FR"), False),               # unknown key
    (W(city=42), False),                                  # wrong type
    ({"name": "convert_currency", "arguments": {"amount": 20, "from_currency": "USD", "to_currency": "EUR"}}, True),
    ({"name": "convert_currency", "arguments": {"amount": 20, "from_currency": "dollars", "to_currency": "EUR"}}, False),
    ({"name": "convert_currency", "arguments": {"amount": "20", "from_currency": "USD", "to_currency": "EUR"}}, False),
    ({"name": "set_timer", "arguments": {"minutes": 10, "label": "tea"}}, True),
    ({"name": "set_timer", "arguments": {"minutes": "10"}}, False),
    ({"name": "book_flight", "arguments": {"to": "Paris"}}, False),  # not in the catalogue
]
for call, ok in cases:
    problems = validate_call(call, CATALOGUE)
    assert isinstance(problems, list), f"validate_call must return a list, got {type(problems).__name__}"
    assert reference_ok(call, CATALOGUE) == ok  # the test's own expectation agrees with jsonschema
    assert (problems == []) == ok, f"{call}: expected {'valid' if ok else 'invalid'}, got problems {problems}"
# a reply without a call is not a valid call
assert validate_call(None, CATALOGUE), "None (no call in the reply) must not be a valid call"
print("validate_call: OK (agrees with jsonschema)")
### BEGIN HIDDEN TESTS
import random
rng = random.Random(0)
values = ["Paris", "", 3, 2.5, -1, 0, 1441, "USD", "usd", "celsius", "kelvin", None, True, [1], {"a": 1}]
keys = {"get_weather": ["city", "unit", "x"], "get_time": ["city", "tz"],
        "convert_currency": ["amount", "from_currency", "to_currency", "rate"], "set_timer": ["minutes", "label"]}
for _ in range(300):  # random calls: same verdict as jsonschema
    name = rng.choice(list(keys) + ["nope"])
    pool = keys.get(name, ["city"])
    args = {k: rng.choice(values) for k in rng.sample(pool, rng.randint(0, len(pool)))}
    call = {"name": name, "arguments": args}
    assert (validate_call(call, CATALOGUE) == []) == reference_ok(call, CATALOGUE), call
# every schema error is reported: a missing required key AND an unknown key are two problems
assert len(validate_call(W(unit="kelvin", country="FR"), CATALOGUE)) == 3
# malformed calls: one problem each
for bad in [None, "get_time", [1], {"arguments": {"city": "Rome"}}, {"name": 1, "arguments": {}},
            {"name": "get_time", "arguments": "Rome"}, {"name": "get_time", "arguments": None},
            {"name": "get_time"}]:
    problems = validate_call(bad, CATALOGUE)
    assert isinstance(problems, list) and len(problems) == 1, (bad, problems)
# the catalogue passed in is the one used
tiny = [{"name": "ping", "description": "", "parameters": {"type": "object", "properties": {},
                                                           "additionalProperties": False}}]
assert validate_call({"name": "ping", "arguments": {}}, tiny) == []
assert validate_call({"name": "ping", "arguments": {"x": 1}}, tiny)
assert validate_call({"name": "get_time", "arguments": {"city": "Rome"}}, tiny)
# defaults are annotations: a missing required argument is reported, never filled in; the call is not changed
alarm = [{"name": "set_alarm", "description": "", "parameters": {
    "type": "object", "properties": {"hour": {"type": "integer", "default": 7},
                                     "label": {"type": "string", "default": "alarm"}, "note": {"type": "string"}},
    "required": ["hour", "note"], "additionalProperties": False}}]
for args, n_problems in [({}, 2), ({"note": "x"}, 1), ({"hour": 6}, 1), ({"label": "gym"}, 2),
                         ({"hour": 6, "note": ""}, 0), ({"hour": 6, "note": "", "label": "gym"}, 0)]:
    call = {"name": "set_alarm", "arguments": dict(args)}
    problems = validate_call(call, alarm)
    assert isinstance(problems, list) and len(problems) == n_problems, (args, problems)
    assert call == {"name": "set_alarm", "arguments": args}, f"validate_call changed the call: {call}"
for call in [W(unit="celsius"), {"name": "set_timer", "arguments": {"label": "tea"}}]:
    before = json.loads(json.dumps(call))
    assert validate_call(call, CATALOGUE) and call == before, call
### END HIDDEN TESTS

# %% [markdown] id="md_metrics"
# ## 4. The metrics: two numbers, plus the no-tool path
#
# A router has two ways to fail on a request that needs a tool. It can produce something the
# application cannot execute, or it can execute the wrong thing. Report both:
#
# - **valid-call rate**: over the requests that need a tool, the fraction whose reply holds a call that
#   passes validation. A reply without a call scores 0 here; it is a miss, not a pass.
# - **argument-match accuracy**: over the same requests, the fraction whose call names the right tool
#   *and* whose arguments equal the gold arguments, key for key, after **normalising values**: strings
#   are compared with surrounding whitespace stripped, inner runs of whitespace collapsed, and case
#   folded (`" new  York "` = `"New York"`). A string that reads as a finite number is that number, and
#   numbers compare as floats (`"20"` = `20` = `20.0`). That is the only leniency across types: values
#   otherwise match only if their JSON types match. A boolean equals only the same boolean (`true` is
#   not `1`, though Python says `True == 1`, and not `"true"`). `float()` also reads `"nan"`, `"inf"` and
#   `"Infinity"`, but they are not finite numbers, so they stay strings: `"Nan"` (a city in Thailand)
#   = `"NAN"`, while `"inf"` is not the number `1e309` (too big for a float, JSON decodes it to
#   infinity). Lists and dicts are compared element by element. Keys are not normalised and are
#   case-sensitive (`"City"` is not `"city"`), and a key present on one side only is a mismatch. This score is deliberately lenient: it asks whether the model extracted the right
#   information. The valid-call rate asks whether the result is executable. A call can pass one and
#   fail the other, which is why you report both.
#
# And the no-tool path, scored like a classifier whose positive class is "no tool needed":
# - **no-tool precision**: of the replies with no call, the fraction where none was needed;
# - **no-tool recall**: of the requests that need no tool, the fraction answered without a call.
#
# A model that never calls anything gets perfect no-tool recall and a valid-call rate of 0; one that
# calls a tool on everything gets the opposite. Neither number alone tells you which you have. The
# function also reports **name accuracy** (right tool, whatever the arguments), which the confusion
# table later breaks down.
#
# Your function takes the already-parsed predictions and a `validate` function (in the lesson, your
# `validate_call` with the catalogue bound), so it does not depend on how they were produced.

# %% id="ex_tool_call_metrics" nbgrader={"grade": false, "grade_id": "ex_tool_call_metrics", "locked": false, "schema_version": 3, "solution": true, "task": false}
def tool_call_metrics(predictions: list, references: list, validate) -> dict:
    """Score a router's parsed replies against the gold calls.

    predictions: one per request, a parsed call {"name": str, "arguments": ...} or None (no call).
    references: one per request, the gold call {"name": str, "arguments": dict} or None (no tool needed).
    validate: callable(call) -> list of problems ([] = valid); call it only on predictions that are not None.
    Returns a dict of floats in [0, 1] (0.0 whenever a denominator is 0):
      "valid_call_rate": over rows whose reference is a call, predictions that are not None and valid;
      "name_accuracy":   over the same rows, predictions that are not None and name the reference's tool;
      "argument_match":  over the same rows, predictions that name the reference's tool AND whose
                         normalised arguments equal the normalised reference arguments (validity not required);
      "no_tool_precision": over rows whose prediction is None, those whose reference is None;
      "no_tool_recall":    over rows whose reference is None, those whose prediction is None.
    Normalising a value: bool -> itself; int/float -> float; str -> float if float(s) works and is
    finite, else " ".join(s.split()).casefold(); dict -> same keys (case-sensitive, not normalised),
    values normalised; list -> items normalised; anything else as is. Two normalised values match only
    if their JSON types match too: a boolean is not a number (True != 1), a number is not a string.
    """
    ### BEGIN SOLUTION
    def norm(value):
        """(JSON type, normalised value): the type tag keeps True apart from 1 and "inf" apart from inf."""
        if isinstance(value, bool):
            return ("boolean", value)
        if isinstance(value, (int, float)):
            return ("number", float(value))
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and math.isfinite(number):
                return ("number", number)
            return ("string", " ".join(value.split()).casefold())
        if isinstance(value, dict):
            return ("object", {key: norm(v) for key, v in value.items()})
        if isinstance(value, list):
            return ("array", [norm(v) for v in value])
        return ("other", value)

    def rate(hits, total):
        return hits / total if total else 0.0

    n_tool = valid_hits = name_hits = arg_hits = 0
    pred_none = ref_none = both_none = 0
    for pred, ref in zip(predictions, references):
        pred_none += pred is None
        if ref is None:
            ref_none += 1
            both_none += pred is None
            continue
        n_tool += 1
        valid = pred is not None and not validate(pred)
        right_tool = pred is not None and pred["name"] == ref["name"]
        valid_hits += valid
        name_hits += right_tool
        arg_hits += right_tool and norm(pred["arguments"]) == norm(ref["arguments"])
    return {"valid_call_rate": rate(valid_hits, n_tool), "name_accuracy": rate(name_hits, n_tool),
            "argument_match": rate(arg_hits, n_tool), "no_tool_precision": rate(both_none, pred_none),
            "no_tool_recall": rate(both_none, ref_none)}
    ### END SOLUTION


# %% id="test_tool_call_metrics" nbgrader={"grade": true, "grade_id": "test_tool_call_metrics", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
def schema_validate(call):
    """The test's own validator (jsonschema on the catalogue), independent of your validate_call."""
    tool = {t["name"]: t for t in CATALOGUE}.get(call.get("name"))
    if tool is None or not isinstance(call.get("arguments"), dict):
        return ["bad call"]
    return [e.message for e in jsonschema.Draft202012Validator(tool["parameters"]).iter_errors(call["arguments"])]


def C(name, **args):
    return {"name": name, "arguments": args}


references = [C("get_weather", city="Paris"), C("get_time", city="Rome"),
              C("convert_currency", amount=20, from_currency="USD", to_currency="EUR"), None, None,
              C("set_timer", minutes=5), C("get_time", city="Lima")]
predictions = [C("get_weather", city="  paris "),                                        # valid, args match
               None,                                                                     # missed call
               C("convert_currency", amount="20", from_currency="USD", to_currency="EUR"),  # invalid, args match
               None,                                                                     # correct no-tool
               C("get_time", city="Oslo"),                                               # a call nobody asked for
               C("set_timer", minutes=5, label="tea"),                                   # valid, extra key
               C("get_time", city="Lisbon")]                                             # valid, wrong city
got = tool_call_metrics(predictions, references, schema_validate)
want = {"valid_call_rate": 3 / 5, "name_accuracy": 4 / 5, "argument_match": 2 / 5,
        "no_tool_precision": 1 / 2, "no_tool_recall": 1 / 2}
assert isinstance(got, dict) and set(want) <= set(got), f"missing keys: {set(want) - set(got or {})}"
for key, value in want.items():
    assert math.isclose(got[key], value, abs_tol=1e-9), f"{key}: got {got[key]}, expected {value}"
print("tool_call_metrics: OK")
### BEGIN HIDDEN TESTS
calls = []
def counting_validate(call):
    assert call is not None, "validate was called on a None prediction"
    calls.append(call)
    return schema_validate(call)
tool_call_metrics(predictions, references, counting_validate)
# normalisation: numbers as strings and floats, whitespace runs, case
refs = [C("convert_currency", amount=12.5, from_currency="GBP", to_currency="JPY"), C("get_time", city="New York"),
        C("set_timer", minutes=30, label="Pasta")]
preds = [C("convert_currency", amount=" 12.50", from_currency="gbp", to_currency="JPY"),
         C("get_time", city=" new   YORK "), C("set_timer", minutes="30", label="pasta ")]
got = tool_call_metrics(preds, refs, schema_validate)
assert math.isclose(got["argument_match"], 1.0), got
assert math.isclose(got["valid_call_rate"], 1 / 3), got  # "12.50", "gbp" and "30" break the schema
got = tool_call_metrics([C("set_timer", minutes=30.0)], [C("set_timer", minutes=30)], schema_validate)
assert got["argument_match"] == 1.0 and got["valid_call_rate"] == 1.0, got
# JSON types must match: a boolean is not a number (Python's True == 1 is not JSON's), nor a string
T = "set_timer"
for pred, ref in [(True, 1), (1, True), (False, 0), (0.0, False), ("1", True), ("true", True), ([True], [1]),
                  ({"on": True}, {"on": 1})]:
    got = tool_call_metrics([C(T, minutes=pred)], [C(T, minutes=ref)], schema_validate)
    assert got["argument_match"] == 0.0, f"{pred!r} must not match {ref!r}: {got}"
got = tool_call_metrics([C(T, minutes=True, label=[False])], [C(T, minutes=True, label=[False])], schema_validate)
assert got["argument_match"] == 1.0, got
# keys are case-sensitive
got = tool_call_metrics([C("get_weather", City="Paris"), C("get_weather", city="Paris", UNIT="celsius")],
                        [C("get_weather", city="Paris"), C("get_weather", city="Paris", unit="celsius")], schema_validate)
assert got["argument_match"] == 0.0, f"keys are not normalised: {got}"
# "nan", "inf", "Infinity" are not finite numbers: they stay strings
inf_json = json.loads('{"amount": 1e309}')["amount"]  # JSON's 1e309 decodes to float infinity
for pred, ref, match in [("Nan", "NAN", True), (" nan ", "NaN", True), ("Infinity", "infinity", True),
                         ("inf", inf_json, False), ("Infinity", inf_json, False), ("-inf", -inf_json, False),
                         ("1e309", inf_json, False), ("nan", float("nan"), False), ("inf", "Infinity", False)]:
    got = tool_call_metrics([C("get_time", city=pred)], [C("get_time", city=ref)], schema_validate)
    assert got["argument_match"] == float(match), f"{pred!r} vs {ref!r}: expected {'a match' if match else 'no match'}"
got = tool_call_metrics([C("convert_currency", amount=inf_json)], [C("convert_currency", amount=inf_json)], schema_validate)
assert got["argument_match"] == 1.0, got  # numbers compare as floats, infinity included
# a missing key, a different value, a different tool are mismatches
got = tool_call_metrics([C("get_weather", city="Paris"), C("get_weather", city="Paris", unit="celsius"),
                         C("get_time", city="Paris")],
                        [C("get_weather", city="Paris", unit="celsius"), C("get_weather", city="Paris", unit="fahrenheit"),
                         C("get_weather", city="Paris")], schema_validate)
assert math.isclose(got["argument_match"], 0.0) and math.isclose(got["name_accuracy"], 2 / 3), got
assert math.isclose(got["valid_call_rate"], 1.0), got
# a model that never calls: valid 0, no-tool recall 1; empty denominators give 0.0
got = tool_call_metrics([None, None, None], [C("get_time", city="Rome"), None, None], schema_validate)
assert math.isclose(got["valid_call_rate"], 0.0) and math.isclose(got["no_tool_recall"], 1.0), got
assert math.isclose(got["no_tool_precision"], 2 / 3), got
got = tool_call_metrics([C("get_time", city="Rome")], [C("get_time", city="Rome")], schema_validate)
assert got["no_tool_precision"] == 0.0 and got["no_tool_recall"] == 0.0 and got["valid_call_rate"] == 1.0, got
# the validator passed in decides validity
got = tool_call_metrics([C("get_time", city="Rome")], [C("get_time", city="Rome")], lambda call: ["rejected"])
assert got["valid_call_rate"] == 0.0 and got["argument_match"] == 1.0, got
### END HIDDEN TESTS

# %% [markdown] id="md_before"
# ## 5. Before: the model as shipped
#
# SmolLM2-135M-Instruct was not trained on our catalogue or our format. It gets the same system message
# and **all** the held-out requests, and we decode greedily (`max_new_tokens` from `CFG`; replies are
# cut there). Your parser, validator and metrics turn its replies into numbers.
#
# The replies are generated by **llama.cpp** on the shipped GGUF file: the same weights transformers
# dequantizes (the prompt is rendered by the transformers tokenizer and handed over as token ids), and
# the runtime a router would be served with. On a laptop CPU it decodes several times faster than
# transformers' `generate` (section 7 times both on the same requests), which is what lets us score
# every held-out row, several models, with and without a grammar, in one run.
#
# **Intervals.** 80 requests is a small test set: 60 of them need a tool and 20 need none. Each rate
# below is printed with its 95 % **Wilson** interval (`scipy.stats.binomtest(k, n).proportion_ci(method=
# "wilson")`) and its count `k/n`. Two models whose intervals overlap widely have not been told apart.

# %% id="demo_before"
test_rows = tools.load_tool_data("test", CFG["test_rows"])
requests = [r["request"] for r in test_rows]
references = [r["call"] for r in test_rows]
validate = functools.partial(validate_call, catalogue=CATALOGUE)
GRAMMAR = tools.reply_grammar(CATALOGUE)


def evaluate(llm, desc, grammar=None):
    """Replies of the llama.cpp model `llm` to the held-out requests, parsed and scored with intervals."""
    start = time.perf_counter()
    replies, finish = tools.llama_replies(llm, tok, requests, max_new_tokens=CFG["max_new_tokens"], grammar=grammar,
                                          desc=desc, return_finish=True)
    parsed = [parse_tool_call(reply) for reply in replies]
    metrics = tool_call_metrics(parsed, references, validate)
    return {"replies": replies, "parsed": parsed, "metrics": metrics, "cut": [f == "length" for f in finish],
            "intervals": tools.metrics_with_intervals(metrics, parsed, references),
            "seconds": time.perf_counter() - start}


def interval_table(results):
    """One column per model: each metric as 'value [low, high] (k/n)'."""
    return pd.DataFrame({name: {key: tools.format_interval(cell) for key, cell in r["intervals"].items()}
                         for name, r in results.items()})


base_llm = tools.load_llama(models.gguf_path())
before = evaluate(base_llm, "base model")
print(f"{len(test_rows)} held-out requests ({sum(r is None for r in references)} need no tool), "
      f"generated in {before['seconds']:.0f} s by llama.cpp")
display(interval_table({"base model": before}))
for request, reply in list(zip(requests, before["replies"]))[:3]:
    print(f"\n{request!r}\n  -> {reply[:160]!r}")

# %% [markdown] id="md_train"
# ## 6. Fine-tuning the router with LoRA (TRL `SFTTrainer`)
#
# The training set holds requests in the same format as the test set: the system message, the user's
# request, and the correct reply as the assistant's turn (a call, or `No tool needed.`). A quarter of
# the requests need no tool. These **negatives** are meant to teach the no-tool path; section 8 measures
# what happens without them.
#
# We use TRL's conversational **prompt/completion** format, `{"prompt": [system, user], "completion":
# [assistant]}`. `SFTTrainer` then puts the loss on the completion tokens only (`completion_only_loss`),
# so the model is not trained to reproduce the system message. **LoRA** (PEFT) freezes the 135M weights
# and trains low-rank updates of every attention and MLP projection. That is well under 10 % of the
# parameters, enough to learn a format and an extraction task, and the adapter is a few MB to ship per
# router.
#
# **How long to train.** A step costs the forward and backward pass of the whole sequence, and the
# system message is most of it (about 150 of the ~200 tokens), so on a 2-core CPU each training request
# costs about two seconds, and this lesson trains twice (section 8 repeats the recipe without the
# negatives). We therefore train on the first `CFG["train_rows"]` of the 400 training requests (the file
# is shuffled; a quarter of them need no tool) for `CFG["epochs"]` epoch(s) with a cosine learning-rate
# decay, and let the loss curve say whether that is enough: the training cell prints the mean loss of
# the first, third and last quarter of the steps. If the last quarter is still clearly below the third,
# the model was still learning when we stopped. The next cell checks which tokens carry the loss before
# we spend any time training.

# %% id="demo_train_setup"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_trainer(rows, base_model):
    """TRL's SFTTrainer for LoRA on `base_model` with this lesson's recipe (CFG), on data rows `rows`."""
    steps = math.ceil(CFG["epochs"] * len(rows) / CFG["batch_size"])
    lora = LoraConfig(r=CFG["lora_r"], lora_alpha=2 * CFG["lora_r"], lora_dropout=0.0, bias="none",
                      target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="brewslm-12-"), use_cpu=True, bf16=False,
                     gradient_checkpointing=False, seed=0, max_steps=steps,
                     per_device_train_batch_size=CFG["batch_size"], learning_rate=CFG["lr"],
                     lr_scheduler_type="cosine", warmup_steps=min(5, steps // 5), max_length=384,
                     logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
                     dataloader_num_workers=0)
    return SFTTrainer(model=base_model, args=args, train_dataset=Dataset.from_list(tools.sft_examples(rows, CATALOGUE)),
                      processing_class=tok, peft_config=lora)


def train(trainer):
    """Run the trainer; returns (per-step losses, seconds)."""
    start = time.perf_counter()
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], time.perf_counter() - start


train_rows = tools.load_tool_data("train", CFG["train_rows"])
trainer = make_trainer(train_rows, model)
STEPS = trainer.args.max_steps
trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
TRAINABLE_FRACTION = trainable / sum(p.numel() for p in trainer.model.parameters())
example = trainer.train_dataset[0]
mask = np.array(example["labels"]) != -100  # TRL turned the completion mask into labels: -100 = no loss
lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
print(f"LoRA r={CFG['lora_r']}: {trainable:,} trainable parameters ({TRAINABLE_FRACTION:.2%} of the model)")
print(f"training sequences: {len(lengths)}, {min(lengths)}-{max(lengths)} tokens; {STEPS} steps of "
      f"{CFG['batch_size']} = {STEPS * CFG['batch_size'] / len(lengths):.2f} epochs; "
      f"loss on {mask.sum()} of {len(mask)} tokens of the first one:")
print(repr(tok.decode(np.array(example["input_ids"])[mask])))
assert tok.decode(np.array(example["input_ids"])[mask]).startswith(tools.target_reply(train_rows[0]))

# %% id="demo_train"
losses, TRAIN_SECONDS = train(trainer)
q = max(1, len(losses) // 4)
QUARTERS = [float(np.mean(losses[:q])), float(np.mean(losses[-2 * q:-q] or losses[-q:])), float(np.mean(losses[-q:]))]
print(f"{STEPS} steps of {CFG['batch_size']} in {TRAIN_SECONDS:.0f} s ({TRAIN_SECONDS / STEPS:.1f} s/step); "
      f"mean loss over the first quarter of the steps {QUARTERS[0]:.3f}, the third {QUARTERS[1]:.3f}, "
      f"the last {QUARTERS[2]:.3f} nats/token (last vs third quarter: {QUARTERS[2] / QUARTERS[1] - 1:+.0%})")
fig, ax = plots.new_axes("SFT loss on the completion (LoRA)", "step", "loss (nats/token)")
ax.plot(range(1, len(losses) + 1), losses, alpha=0.4, label="per step")
ax.plot(range(1, len(losses) + 1), plots.smooth(losses, max(1, len(losses) // 10)), label="smoothed")
ax.set_yscale("log")
ax.legend()
plt.show()

# %% [markdown] id="md_after"
# ## 7. After: the same held-out requests, the same metrics
#
# The fine-tuned router is the base model plus the LoRA adapter. To serve it with llama.cpp we merge the
# adapter into the weights (PEFT's `merge_and_unload`) and write a GGUF file: the shipped file's metadata
# and tokenizer, each unchanged tensor copied byte for byte, each changed projection stored as `Q8_0`
# (`tools.write_merged_gguf`). Before that, transformers generates the first few replies with the
# unmerged adapter, so we can check that the GGUF gives the same greedy replies. Then the fine-tuned
# router is scored by exactly the same code path as the base model.

# %% id="demo_after"
check = requests[:CFG["check_rows"]]
start = time.perf_counter()
hf_replies = tools.generate_replies(trainer.model, tok, check, max_new_tokens=CFG["max_new_tokens"],
                                    batch_size=CFG["check_rows"], desc="transformers (check)")
HF_SECONDS = time.perf_counter() - start


def gguf_of(peft_model, name):
    """Merge the LoRA adapter into `peft_model`'s weights (in place) and write them as a GGUF file."""
    merged = peft_model.merge_and_unload()
    path = os.path.join(tempfile.mkdtemp(prefix="brewslm-12-"), f"{name}.gguf")
    counts = tools.write_merged_gguf(merged.state_dict(), merged.config, path, qtype="Q8_0")
    print(f"{name}.gguf: {counts['rewritten']} tensors rewritten (Q8_0), {counts['copied']} copied, "
          f"{os.path.getsize(path) / 1e6:.0f} MB")
    return path


tuned_path = gguf_of(trainer.model, "router")
tuned_llm = tools.load_llama(tuned_path)
tuned = evaluate(tuned_llm, "fine-tuned router")
AGREE = sum(a == b for a, b in zip(hf_replies, tuned["replies"]))
print(f"llama.cpp: {tuned['seconds'] / len(requests):.2f} s per reply ({len(requests)} requests, one at a time); "
      f"transformers: {HF_SECONDS / len(check):.2f} s per reply ({len(check)} requests in one batch)")
print(f"llama.cpp (merged, Q8_0) and transformers (adapter) give the same reply on {AGREE} of {len(check)} "
      "requests checked")
for request, a, b in zip(check, hf_replies, tuned["replies"]):
    if a != b:
        print(f"  {request!r}\n    transformers: {a[:120]!r}\n    llama.cpp:    {b[:120]!r}")
display(interval_table({"base model": before, "fine-tuned (LoRA)": tuned}))


def bar_chart(results, title):
    """Grouped bars of every metric, one colour per model, with 95 % Wilson intervals as error bars."""
    keys = list(next(iter(results.values()))["intervals"])
    fig, ax = plt.subplots(figsize=(9, 3.5))
    x = np.arange(len(keys))
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        cells = [r["intervals"][k] for k in keys]
        values = np.array([c["value"] for c in cells])
        err = np.array([[c["value"] - c["low"] for c in cells], [c["high"] - c["value"] for c in cells]])
        ax.bar(x + (i - (len(results) - 1) / 2) * width, values, width, yerr=err, capsize=3, label=name)
    ax.set_xticks(x, [k.replace("_", "\n") for k in keys])
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    plt.show()


bar_chart({"base model": before, "fine-tuned (LoRA)": tuned},
          f"held-out requests (n = {len(test_rows)}), 95% Wilson intervals")
for request, reply in list(zip(requests, tuned["replies"]))[:4]:
    print(f"{request!r}\n  -> {reply[:160]!r}")

# %% [markdown] id="md_confusion"
# **Which tool was called?** Rows are what the request needed, columns what the router did. The
# diagonal is the right tool (arguments aside). `(no tool)` is a reply without a call. `(unknown)` is a
# call to a tool that is not in the catalogue. Off-diagonal cells are the errors worth reading.
# Confusing `get_weather` and `get_time` is a different bug from calling a tool on small talk.
#
# **Which argument is wrong?** Where the router called the right tool, each gold or predicted argument
# is correct, a wrong value, missing (the gold has it, the call does not) or extra (the call has it, the
# gold does not). Values are compared with your `tool_call_metrics`, applied to one argument at a time,
# so "correct" here means exactly what the argument-match accuracy means.

# %% id="demo_confusion"
LABELS = list(tools.TOOL_NAMES) + ["(no tool)"]


def label_of(call):
    if call is None:
        return "(no tool)"
    return call["name"] if call["name"] in tools.TOOL_NAMES else "(unknown)"


def confusion(parsed):
    table = pd.crosstab(pd.Categorical([label_of(c) for c in references], categories=LABELS),
                        pd.Categorical([label_of(c) for c in parsed], categories=LABELS + ["(unknown)"]),
                        rownames=["needed"], colnames=["called"], dropna=False)
    return table


for name, result in (("base model", before), ("fine-tuned router", tuned)):
    print(name)
    display(confusion(result["parsed"]))


def same_value(pred_value, gold_value):
    """One argument compared as the argument-match accuracy compares whole calls."""
    one = lambda v: [{"name": "x", "arguments": {"v": v}}]
    return tool_call_metrics(one(pred_value), one(gold_value), lambda call: [])["argument_match"] == 1.0


def argument_table(parsed):
    """Per tool and argument: how often each outcome occurred among right-tool calls."""
    records = pd.DataFrame(tools.argument_outcomes(parsed, references, same_value),
                           columns=["tool", "argument", "outcome"])
    table = pd.crosstab([records["tool"], records["argument"]], records["outcome"])
    return table.reindex(columns=["correct", "wrong value", "missing", "extra"], fill_value=0)


ARG_ERRORS = argument_table(tuned["parsed"])
print("fine-tuned router, arguments of right-tool calls:")
display(ARG_ERRORS)
wrong = [(r["request"], p["arguments"], r["call"]["arguments"]) for r, p in zip(test_rows, tuned["parsed"])
         if r["call"] and p and p["name"] == r["call"]["name"]
         and not tool_call_metrics([p], [r["call"]], validate)["argument_match"]]
for request, got, gold in wrong[:6]:
    print(f"  {request!r}: called with {json.dumps(got)}, gold {json.dumps(gold)}")

problems = pd.Series([p.split(":")[-1].strip()[:60] for call in tuned["parsed"] if call is not None
                      for p in validate(call)])
print("why the fine-tuned router's calls were invalid:",
      "none" if problems.empty else "\n" + problems.value_counts().to_string())

# %% [markdown] id="md_ablation"
# ## 8. Ablation: remove the negatives
#
# Do the no-tool rows earn their place? Train the same recipe (same LoRA, learning rate, schedule and
# number of epochs) on the training rows **without** the requests that need no tool, starting again from
# the model as shipped, and score it on the same held-out split. The number to watch is the no-tool
# path: recall (small talk answered without a call) and precision (a reply without a call really needed
# none).

# %% id="demo_ablation"
tool_only_rows = [r for r in train_rows if r["call"] is not None]
ablation_model, _ = models.load_teacher()
ablation_trainer = make_trainer(tool_only_rows, ablation_model)
ablation_losses, ABLATION_SECONDS = train(ablation_trainer)
qa = max(1, len(ablation_losses) // 4)
print(f"{len(tool_only_rows)} training rows (no negatives), {ablation_trainer.args.max_steps} steps "
      f"in {ABLATION_SECONDS:.0f} s; mean loss over the first quarter {np.mean(ablation_losses[:qa]):.3f}, "
      f"the last {np.mean(ablation_losses[-qa:]):.3f} nats/token")
ablation_llm = tools.load_llama(gguf_of(ablation_trainer.model, "router-no-negatives"))
ablation = evaluate(ablation_llm, "no negatives")
display(interval_table({"full recipe": tuned, "without negatives": ablation}))
bar_chart({"base model": before, "full recipe": tuned, "without negatives": ablation},
          "the negatives ablation, 95% Wilson intervals")
no_tool_replies = [reply for r, reply in zip(test_rows, ablation["replies"]) if r["call"] is None]
print("without negatives, replies to requests that need no tool:")
for reply in no_tool_replies[:4]:
    print(f"  {reply[:120]!r}")

# %% [markdown] id="md_grammar"
# ## 9. Constrained decoding: a grammar forces the format, not the answer
#
# Instead of training the format in, we can **force** it. llama.cpp samples under a grammar (GBNF): at
# every step, tokens that would take the reply outside the grammar are masked out. `tools.reply_grammar`
# builds one for our replies: either `No tool needed.` or `<tool_call>` + a JSON object + `</tool_call>`,
# where the JSON part is generated from the catalogue's schemas by llama-cpp-python's own JSON-schema
# converter (`json_schema_to_gbnf`): the tool names, the argument keys, their types, the enum of `unit`
# and the three capital letters of a currency code are all in it. Numeric bounds (`minimum` of
# `minutes`, `amount > 0`) are not, so the validator still has the last word.
#
# What a grammar guarantees is structural, and the cell below asserts it: every reply that *finishes*
# is either exactly `No tool needed.` or exactly a tagged JSON call to a catalogue tool with allowed keys.
# A reply cut off at `max_new_tokens` is unfinished, grammar or not (a city name may run on). What it
# cannot guarantee is content: it does not make the model pick the right tool, the right city or the
# right amount, and since the no-tool reply is one of the allowed answers, it cannot make the model
# call a tool at all. We score both models with and without the grammar, and the tables say how much
# each of these matters here.

# %% id="demo_grammar"
print("\n".join(GRAMMAR.splitlines()[:4]), "\n...", len(GRAMMAR.splitlines()), "rules")
constrained = {"base model + grammar": evaluate(base_llm, "base model + grammar", grammar=GRAMMAR),
               "fine-tuned + grammar": evaluate(tuned_llm, "fine-tuned + grammar", grammar=GRAMMAR)}
grammar_results = {"base model": before, "base model + grammar": constrained["base model + grammar"],
                   "fine-tuned": tuned, "fine-tuned + grammar": constrained["fine-tuned + grammar"]}
display(interval_table(grammar_results))
bar_chart(grammar_results, "with and without a grammar (llama.cpp), 95% Wilson intervals")


def in_format(reply):
    """Exactly the no-tool reply, or exactly <tool_call>{JSON with a name and arguments}</tool_call>."""
    return reply == tools.NO_TOOL_REPLY or tools.strict_call(reply) is not None


FORMAT_RATE = {name: float(np.mean([in_format(reply) for reply in r["replies"]])) for name, r in grammar_results.items()}
print("replies exactly in the format (a tagged JSON call or the no-tool reply):",
      ", ".join(f"{name} {rate:.3f}" for name, rate in FORMAT_RATE.items()))
GRAMMAR_STATS = {}
for name in ("base model + grammar", "fine-tuned + grammar"):
    r = grammar_results[name]
    # what the grammar guarantees: every reply that ended (was not cut at max_new_tokens) is in the format
    finished = [reply for reply, cut in zip(r["replies"], r["cut"]) if not cut]
    assert all(in_format(reply) for reply in finished), [x for x in finished if not in_format(x)][:3]
    calls = [c for c in map(tools.strict_call, r["replies"]) if c is not None]
    invalid = [c for c in calls if validate(c)]
    GRAMMAR_STATS[name] = {"cut": sum(r["cut"]), "calls": len(calls), "invalid": len(invalid),
                           "no_tool": sum(reply == tools.NO_TOOL_REPLY for reply in r["replies"])}
    print(f"{name}: {len(finished)} of {len(r['replies'])} replies finished, all in the format; "
          f"{GRAMMAR_STATS[name]['no_tool']} took the no-tool exit; {len(calls)} complete calls, "
          f"{len(invalid)} fail the schema" + (f" (e.g. {json.dumps(invalid[0])})" if invalid else ""))
    for request, reply in list(zip(requests, r["replies"]))[:3]:
        print(f"  {request!r}\n    -> {reply[:140]!r}")

# %% [markdown] id="md_results"
# ## What we measured
#
# Every value below was computed in this run. The valid-call rate, the argument-match accuracy and the
# name accuracy are fractions of the requests that needed a tool; no-tool recall is a fraction of the
# requests that needed none, no-tool precision of the replies without a call. Each comes with its 95 %
# Wilson interval and its count.

# %% id="results"
rows = [
    {"quantity": "held-out requests", "value": len(test_rows), "unit": "requests",
     "note": f"{sum(r is None for r in references)} need no tool; unseen cities, countries, phrasings"},
    {"quantity": "training requests", "value": len(train_rows), "unit": "requests",
     "note": f"{sum(r['call'] is None for r in train_rows)} need no tool"},
    {"quantity": "system message", "value": system_tokens, "unit": "tokens", "note": f"raw JSON schemas: {raw_tokens}"},
    {"quantity": "LoRA trainable parameters", "value": round(TRAINABLE_FRACTION, 4), "unit": "fraction",
     "note": f"r={CFG['lora_r']}, all projections"},
    {"quantity": "fine-tuning time", "value": round(TRAIN_SECONDS, 1), "unit": "s",
     "note": f"{STEPS} steps x {CFG['batch_size']} = {STEPS * CFG['batch_size'] / len(train_rows):.2f} epochs, CPU"},
    {"quantity": "final training loss", "value": round(QUARTERS[2], 4), "unit": "nats/token",
     "note": f"mean of the last {q} steps (first {q}: {QUARTERS[0]:.3f}, third quarter: {QUARTERS[1]:.3f})"},
    {"quantity": "fine-tuning time, no negatives", "value": round(ABLATION_SECONDS, 1), "unit": "s",
     "note": f"{ablation_trainer.args.max_steps} steps, {len(tool_only_rows)} rows, same recipe"},
    {"quantity": "GGUF vs transformers replies", "value": f"{AGREE}/{len(check)}", "unit": "identical",
     "note": "fine-tuned router, merged Q8_0 GGUF in llama.cpp vs the adapter in transformers"},
]
for name, result in [("base", before), ("fine-tuned", tuned), ("no negatives", ablation),
                     ("base + grammar", constrained["base model + grammar"]),
                     ("fine-tuned + grammar", constrained["fine-tuned + grammar"])]:
    for key in ("valid_call_rate", "argument_match", "name_accuracy", "no_tool_precision", "no_tool_recall"):
        rows.append({"quantity": f"{key.replace('_', ' ')}: {name}", "value": round(result["metrics"][key], 4),
                     "unit": "fraction", "note": "95% Wilson " + tools.format_interval(result["intervals"][key]).split(" ", 1)[1]})
for name, stats in GRAMMAR_STATS.items():
    rows.append({"quantity": f"replies in the format: {name.replace(' model', '')}", "value": round(FORMAT_RATE[name], 4),
                 "unit": "fraction", "note": f"{stats['no_tool']} no-tool replies, {stats['calls']} complete calls "
                                             f"({stats['invalid']} fail the schema), {stats['cut']} cut at "
                                             f"{CFG['max_new_tokens']} tokens"})
for (tool, argument), counts in ARG_ERRORS.iterrows():
    errors = int(counts["wrong value"] + counts["missing"] + counts["extra"])
    rows.append({"quantity": f"argument errors: {tool}.{argument}", "value": errors, "unit": "calls",
                 "note": f"fine-tuned; wrong {counts['wrong value']}, missing {counts['missing']}, "
                         f"extra {counts['extra']}, correct {counts['correct']}"})
report.record_results("12_tool_use", BUDGET, rows)

# %% [markdown] id="takeaways"
# ## What to take away
#
# - **Report two numbers, not one, each with its interval.** The valid-call rate says whether the
#   application can execute what the router wrote. Argument-match accuracy says whether the call does
#   what the user asked. They disagree exactly where it matters: a valid call to the wrong city, or the
#   right amount as the string `"20"`. Add the no-tool precision and recall, or a router that calls
#   nothing (or everything) hides behind one good number. With 60 tool requests a Wilson interval is
#   about ±0.1 wide: read differences smaller than that as noise.
# - **Parse forgivingly, validate strictly.** Your parser finds the call in messy text. The schema check
#   decides what is executable. A pipeline that parses JSON and then trusts it executes
#   `{"minutes": "ten"}`.
# - **Look at the errors by argument.** The per-argument table shows which argument of which tool the
#   router gets wrong, and whether it is a wrong value, a missing optional argument or an invented one.
#   That is where the next hour of data work goes.
# - **The negatives ablation and the grammar are measured above, not assumed.** Compare the no-tool
#   recall of the full recipe and of the recipe without negatives, and the valid-call rate and argument
#   match with and without the grammar, in this run's tables: a grammar makes every call parse and
#   (almost) every call valid, but it does not choose the right arguments, and it lets the model take the
#   no-tool exit.
# - **Honest caveats.** One seed, a small template-generated data set, and a held-out split that differs
#   from the training set in entities and one phrasing per tool, not in kind. Real user requests are
#   messier: ambiguous, multi-call, or needing a question back. Templates also make argument extraction
#   easier than it is in the wild, so read the "after" numbers as a ceiling for this catalogue. The
#   fine-tuned router is scored as a merged `Q8_0` GGUF in llama.cpp; the agreement check above says how
#   often that matches the adapter in transformers.
