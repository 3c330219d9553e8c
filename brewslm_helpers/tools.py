"""Lesson 12's plumbing: the tool catalogue, its rendering in the system message, the call format,
the data set, SFT examples, batched greedy generation (transformers and llama.cpp), Wilson intervals
for the metrics, the per-argument error breakdown, a llama.cpp grammar (GBNF) for the reply format,
and a GGUF copy of a fine-tuned (merged) model that llama.cpp can run.

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
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .budget import cpu_threads
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


# ----------------------------------------------------------------------------------------------
# Intervals and breakdowns
# ----------------------------------------------------------------------------------------------

def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of the proportion ``successes / n`` (scipy's ``binomtest``);
    ``(0.0, 1.0)`` when ``n`` is 0 (nothing measured)."""
    from scipy.stats import binomtest
    if n == 0:
        return (0.0, 1.0)
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def metric_denominators(predictions: list, references: list) -> dict[str, int]:
    """How many rows each of lesson 12's metrics is a fraction of (the definitions in the lesson):
    the requests that need a tool for ``valid_call_rate``, ``name_accuracy`` and ``argument_match``;
    the replies without a call for ``no_tool_precision``; the requests that need none for
    ``no_tool_recall``."""
    n_tool = sum(r is not None for r in references)
    return {"valid_call_rate": n_tool, "name_accuracy": n_tool, "argument_match": n_tool,
            "no_tool_precision": sum(p is None for p in predictions),
            "no_tool_recall": sum(r is None for r in references)}


def metrics_with_intervals(metrics: dict[str, float], predictions: list, references: list) -> dict[str, dict]:
    """Each metric (a fraction of its denominator, see ``metric_denominators``) with its count and
    95 % Wilson interval: ``{name: {"value", "k", "n", "low", "high"}}``."""
    out = {}
    for name, n in metric_denominators(predictions, references).items():
        value = float(metrics[name])
        k = int(round(value * n))
        low, high = wilson(k, n)
        out[name] = {"value": value, "k": k, "n": n, "low": low, "high": high}
    return out


def format_interval(cell: dict) -> str:
    """``"0.733 [0.61, 0.83] (44/60)"`` for one entry of ``metrics_with_intervals``."""
    return f"{cell['value']:.3f} [{cell['low']:.2f}, {cell['high']:.2f}] ({cell['k']}/{cell['n']})"


def argument_outcomes(predictions: list, references: list, match) -> list[dict]:
    """One record per (request, argument) where the router called the right tool, for a breakdown of
    argument errors by tool and argument.

    ``predictions``/``references``: parsed calls or None, as in the lesson's metrics. Rows whose
    reference is None, or whose prediction is None or names another tool, are not argument errors
    and are skipped. For the others, every key of the gold or the predicted arguments gives
    ``{"tool", "argument", "outcome"}`` with outcome ``"correct"``, ``"wrong value"`` (both have it,
    ``match(pred_value, gold_value)`` is False), ``"missing"`` (only the gold has it) or ``"extra"``
    (only the prediction has it). Predicted arguments that are not a dict count every gold key as
    missing. ``match``: callable(pred_value, gold_value) -> bool, the comparison the metrics use.
    """
    records = []
    for pred, ref in zip(predictions, references):
        if ref is None or pred is None or pred.get("name") != ref["name"]:
            continue
        got = pred.get("arguments") if isinstance(pred.get("arguments"), dict) else {}
        gold = ref["arguments"]
        for key in list(gold) + [k for k in got if k not in gold]:
            if key not in got:
                outcome = "missing"
            elif key not in gold:
                outcome = "extra"
            else:
                outcome = "correct" if match(got[key], gold[key]) else "wrong value"
            records.append({"tool": ref["name"], "argument": key, "outcome": outcome})
    return records


# ----------------------------------------------------------------------------------------------
# llama.cpp: the reply format as a grammar, generation, a GGUF of a fine-tuned model
# ----------------------------------------------------------------------------------------------

def call_schema(catalogue: list[dict] = CATALOGUE) -> dict:
    """A JSON schema of one call to a catalogue tool: ``oneOf`` one object per tool,
    ``{"name": <const>, "arguments": <the tool's parameters schema>}``."""
    return {"oneOf": [{"type": "object",
                       "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
                       "required": ["name", "arguments"], "additionalProperties": False}
                      for t in catalogue]}


def reply_grammar(catalogue: list[dict] = CATALOGUE, no_tool: bool = True) -> str:
    """A GBNF grammar (llama.cpp) of the router's replies: ``NO_TOOL_REPLY`` (unless ``no_tool`` is
    False), or one call in tags, ``<tool_call>{...}</tool_call>``, whose JSON follows
    ``call_schema(catalogue)``.

    The JSON part comes from llama-cpp-python's own converter (``json_schema_to_gbnf``), which
    enforces names, required and allowed keys, key order, types, enums and ``pattern``; it does not
    enforce numeric bounds (``minimum``, ``exclusiveMinimum``), so the validator still has the last word.
    """
    from llama_cpp.llama_grammar import json_schema_to_gbnf
    gbnf = json_schema_to_gbnf(json.dumps(call_schema(catalogue)))
    lines = [line.replace("root ::=", "call-json ::=", 1) if line.startswith("root ::=") else line
             for line in gbnf.splitlines()]
    call = f"{json.dumps(CALL_OPEN)} call-json {json.dumps(CALL_CLOSE)}"
    root = f"root ::= {json.dumps(NO_TOOL_REPLY)} | {call}" if no_tool else f"root ::= {call}"
    return "\n".join([root, *lines]) + "\n"


def load_llama(path: str | Path, n_ctx: int = 1024, n_threads: int | None = None):
    """A ``llama_cpp.Llama`` for generation on the GGUF ``path`` (no logits kept, quiet)."""
    import llama_cpp
    n_threads = n_threads or cpu_threads()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads,
                           n_threads_batch=n_threads, seed=0, verbose=False)


def llama_replies(llm, tokenizer, requests: list[str], max_new_tokens: int = 48, grammar: str | None = None,
                  catalogue: list[dict] = CATALOGUE, desc: str = "llama.cpp",
                  return_finish: bool = False) -> list[str] | tuple[list[str], list[str]]:
    """The router's greedy reply (stripped) to each request, generated by llama.cpp.

    The prompt is the model's own chat template rendered by ``tokenizer`` (the transformers one) and
    handed to llama.cpp as token ids, so both runtimes see the same tokens. ``grammar``: a GBNF
    string (e.g. ``reply_grammar()``); every sampled token must keep the reply inside it. Generation
    stops at the end-of-turn token or after ``max_new_tokens``. llama.cpp reuses the KV cache of the
    shared prefix (the system message) from one request to the next. With ``return_finish``, also
    each reply's finish reason: ``"stop"`` (it ended) or ``"length"`` (cut at ``max_new_tokens``; a
    reply cut off is unfinished, grammar or not).
    """
    import llama_cpp
    compiled = llama_cpp.LlamaGrammar.from_string(grammar, verbose=False) if grammar else None
    replies, finish = [], []
    for request in tqdm(requests, desc=desc):
        ids = tokenizer.apply_chat_template(messages(request, catalogue), tokenize=True,
                                            add_generation_prompt=True, return_dict=False)
        out = llm.create_completion(list(map(int, ids)), max_tokens=max_new_tokens, temperature=0.0,
                                    top_k=1, repeat_penalty=1.0, grammar=compiled)
        replies.append(out["choices"][0]["text"].strip())
        finish.append(out["choices"][0]["finish_reason"])
    return (replies, finish) if return_finish else replies


def strict_call(reply: str) -> dict | None:
    """The call if ``reply`` is exactly the trained format, ``CALL_OPEN`` + one JSON object with a
    string ``"name"`` and an object ``"arguments"`` + ``CALL_CLOSE`` (whitespace around the JSON
    allowed), else None. What a reply under ``reply_grammar()`` is, unless it is ``NO_TOOL_REPLY`` or
    was cut off; not a parser for model text (the lesson writes that one)."""
    text = reply.strip()
    if not (text.startswith(CALL_OPEN) and text.endswith(CALL_CLOSE)):
        return None
    try:
        obj = json.loads(text[len(CALL_OPEN):-len(CALL_CLOSE)])
    except json.JSONDecodeError:
        return None
    if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("arguments"), dict)):
        return None
    return {"name": obj["name"], "arguments": obj["arguments"]}


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp expects for a Llama ``q_proj``/``k_proj`` weight ``[n_head * d, in]``
    (``convert_hf_to_gguf.py``'s ``permute``: rotary halves interleaved per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_merged_gguf(state_dict: dict, config, dst: str | Path, template: str | Path | None = None,
                      qtype: str = "Q8_0", progress: bool = True) -> dict[str, int]:
    """Write a GGUF file llama.cpp can run from a Llama ``state_dict`` (HF names, e.g. a LoRA model
    after ``merge_and_unload()``), with the metadata and tokenizer of ``template`` (default: the
    shipped Q4_1 file).

    Each of the template's tensors is looked up under its HF name (gguf's ``TensorNameMap``);
    ``q_proj``/``k_proj`` rows are permuted as ``convert_hf_to_gguf.py`` does. A tensor equal to the
    template's dequantized one is copied byte for byte; a changed one is stored as ``qtype``
    ("Q8_0", "F16" or "F32"). Returns ``{"copied": int, "rewritten": int}`` (for the unchanged model:
    every tensor copied). Written atomically.
    """
    import gguf

    from .models import gguf_path
    from .quant import finish_gguf, gguf_reader, gguf_writer_like
    reader = gguf_reader(Path(template or gguf_path()).resolve())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    hf_of = {}
    for hf_name in state_dict:
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is not None:
            hf_of[name] = hf_name  # get_name keeps the suffix: "blk.0.attn_q.weight"
    dst = Path(dst)
    tmp = dst.with_name(f".tmp-{os.getpid()}-{dst.name}")
    writer = gguf_writer_like(reader, tmp)
    target = gguf.GGMLQuantizationType[qtype]
    counts = {"copied": 0, "rewritten": 0}
    for t in tqdm(reader.tensors, desc="GGUF tensors", disable=not progress):
        weight = state_dict[hf_of[t.name]].detach().float().cpu().numpy()
        if t.name.endswith("attn_q.weight"):
            weight = _permute_qk(weight, config.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            weight = _permute_qk(weight, config.num_key_value_heads)
        old = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(weight.shape)
        if np.array_equal(old, weight):
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
            counts["copied"] += 1
        else:
            kind = gguf.GGMLQuantizationType.F32 if weight.ndim == 1 else target
            writer.add_tensor(t.name, gguf.quants.quantize(weight, kind), raw_dtype=kind)
            counts["rewritten"] += 1
    finish_gguf(writer, tmp, dst)
    return counts
