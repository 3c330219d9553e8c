"""Lesson 12's plumbing: the tool catalogue, its rendering in the system message, the call format,
the data set, SFT examples and batched greedy generation.

The call format (Hermes / SmolLM2 style), one call per reply::

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>

and the no-tool path: the router replies ``NO_TOOL_REPLY`` ("No tool needed."), any reply without a
call counts as "no tool". In a real system the router's no-tool reply hands the request on to the
chat model; this lesson measures only the routing decision and the call.

Parsing a reply, validating a call against ``CATALOGUE`` and scoring are the lesson's exercises and
are not here.
"""
from __future__ import annotations

import json

from .data import load_split
from .evaluation import generate_chat_replies

NO_TOOL_REPLY = "No tool needed."
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

# OpenAI-style function declarations: name, description, and a JSON schema (draft 2020-12) of the
# arguments object. Every schema forbids unknown keys and lists what is required.
CATALOGUE: list[dict] = [
    {"name": "get_weather", "description": "Current weather in a city.",
     "parameters": {"type": "object",
                    "properties": {"city": {"type": "string", "minLength": 1},
                                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                    "required": ["city"], "additionalProperties": False}},
    {"name": "get_time", "description": "Local time in a city.",
     "parameters": {"type": "object",
                    "properties": {"city": {"type": "string", "minLength": 1}},
                    "required": ["city"], "additionalProperties": False}},
    {"name": "convert_currency", "description": "Convert an amount of money.",
     "parameters": {"type": "object",
                    "properties": {"amount": {"type": "number", "exclusiveMinimum": 0},
                                   "from_currency": {"type": "string", "pattern": "^[A-Z]{3}$",
                                                     "description": "ISO code, e.g. EUR"},
                                   "to_currency": {"type": "string", "pattern": "^[A-Z]{3}$",
                                                   "description": "ISO code"}},
                    "required": ["amount", "from_currency", "to_currency"],
                    "additionalProperties": False}},
    {"name": "set_timer", "description": "Start a countdown timer.",
     "parameters": {"type": "object",
                    "properties": {"minutes": {"type": "integer", "minimum": 1, "maximum": 1440},
                                   "label": {"type": "string"}},
                    "required": ["minutes"], "additionalProperties": False}},
]
TOOL_NAMES = tuple(t["name"] for t in CATALOGUE)


def _render_type(schema: dict) -> str:
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    text = schema.get("type", "any")
    if "description" in schema:
        text += f" ({schema['description']})"
    return text


def render_tool(tool: dict) -> str:
    """One tool as a compact signature line rendered from its schema, e.g.
    ``get_weather(city: string, unit?: "celsius" | "fahrenheit") - Current weather in a city.``
    (``?`` marks an optional argument). About a quarter of the tokens of the JSON schema itself:
    every training and generation step pays for the system message."""
    params = tool["parameters"]
    required = set(params.get("required", []))
    args = ", ".join(f"{name}{'' if name in required else '?'}: {_render_type(schema)}"
                     for name, schema in params.get("properties", {}).items())
    return f"{tool['name']}({args}) - {tool['description']}"


def system_prompt(catalogue: list[dict] = CATALOGUE) -> str:
    """The router's system message: the tools, the call format and the no-tool reply."""
    tools = "\n".join(render_tool(t) for t in catalogue)
    return (f"You route requests to tools. Tools:\n{tools}\n"
            f'If a tool is needed, reply with one call: {CALL_OPEN}{{"name":...,"arguments":{{...}}}}'
            f"{CALL_CLOSE}\nOtherwise reply: {NO_TOOL_REPLY}")


def format_call(call: dict) -> str:
    """The reply that makes ``call`` (``{"name": str, "arguments": dict}``): compact JSON (no spaces,
    about 15 % fewer tokens than ``json.dumps``'s default) between the tags."""
    return CALL_OPEN + json.dumps({"name": call["name"], "arguments": call["arguments"]},
                                  separators=(",", ":"), ensure_ascii=False) + CALL_CLOSE


def target_reply(row: dict) -> str:
    """The router's correct reply for a data row: its call, or ``NO_TOOL_REPLY``."""
    return format_call(row["call"]) if row["call"] is not None else NO_TOOL_REPLY


def messages(request: str, catalogue: list[dict] = CATALOGUE) -> list[dict]:
    """The conversation the router sees: the system message, then the user's request."""
    return [{"role": "system", "content": system_prompt(catalogue)}, {"role": "user", "content": request}]


def load_tool_data(split: str, n: int | None = None) -> list[dict]:
    """Lesson 12's requests (see ``data/make_tool_data.py``).

    ``split``: ``"train"`` (400 rows, 100 of them need no tool) or ``"test"`` (80 held-out rows,
    20 no-tool; unseen cities, countries, topics and one unseen phrasing per tool). ``n`` keeps the
    first ``n`` rows (the files are shuffled). Each row: ``{"id": str, "request": str,
    "call": {"name": str, "arguments": dict} | None}``.
    """
    return load_split("tool", split, n, ("train", "test"))


def sft_examples(rows: list[dict], catalogue: list[dict] = CATALOGUE) -> list[dict]:
    """TRL's conversational prompt/completion format: ``{"prompt": [system, user],
    "completion": [assistant]}``; ``SFTTrainer`` then puts the loss on the completion only."""
    return [{"prompt": messages(r["request"], catalogue),
             "completion": [{"role": "assistant", "content": target_reply(r)}]} for r in rows]


def generate_replies(model, tokenizer, requests: list[str], max_new_tokens: int = 48,
                     batch_size: int = 16, catalogue: list[dict] = CATALOGUE,
                     desc: str = "generate") -> list[str]:
    """The router's greedy reply to each request, in order (see ``evaluation.generate_chat_replies``)."""
    return generate_chat_replies(model, tokenizer, [messages(r, catalogue) for r in requests],
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc)
