"""Plumbing for lesson 14 (speculative decoding): drafts, prompts, assisted-generation set-up, timing.

Nothing here verifies a draft or runs a speculative loop: those are the lesson's exercises.

- ``cut_draft`` / ``load_draft``: a draft that shares the teacher's tokenizer, made of the teacher's
  first layers, its final norm and its (tied) head: an early exit, the draft LayerSkip (Elhoushi et
  al. 2024) trains the target to make good (self-speculative decoding in Draft & Verify, Zhang et al.
  2023, skips a chosen set of *intermediate* layers instead); ``load_draft`` can give it a short
  distillation (KL to the teacher on the teacher's own replies) and caches the result under
  ``$BREWSLM_CACHE``.
- ``tool_call_ids`` / ``few_shot_rows``: lesson 12's tool-call prompts with worked examples, for the
  prompt-lookup draft; ``replay_greedy_rounds``: the rounds a greedy speculative decoder makes with
  a given proposal function, replayed on the target's known greedy reply.
- ``forward_seconds``: the time of one cached target forward on ``n`` new positions (verification cost).
- ``configure_assistant``: fix transformers' assisted generation to exactly K draft tokens a round.
- ``to_probs``: next-token probabilities at a temperature (temperature 0 = greedy, one-hot).
- ``tiny_llama`` / ``noisy_copy`` / ``threads``: tiny Llama targets and drafts for fast tests.
- ``tokens_per_second``: best-of-n wall-clock timing of a generation callable.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from .models import MODEL_NAME, cut_student
from .paths import cache_dir

# Chat requests the demo decodes (replies of a few sentences, so speculation has room to work).
EVAL_REQUESTS = [
    "Write a short paragraph about why people like coffee.",
    "Explain in a few sentences how a bicycle works.",
    "Describe a rainy afternoon in a small town.",
    "Give three tips for studying well, with one sentence each.",
]

# Requests the draft is distilled on (disjoint from EVAL_REQUESTS).
_TOPICS = ["tea", "bread", "the moon", "a cat", "the ocean", "trains", "music", "a library", "winter",
           "apples", "friendship", "gardening", "the internet", "volcanoes", "chess", "a market"]
_ASKS = ["Write a short paragraph about {}.", "Tell me three facts about {}.", "Explain {} to a child.",
         "Describe {} in a few sentences."]
TRAIN_REQUESTS = [ask.format(topic) for topic in _TOPICS for ask in _ASKS]


def chat_ids(tokenizer, user: str | list[dict]) -> torch.Tensor:
    """``user`` (a message, or a list of chat messages) in the model's chat template, ending where the
    reply starts: input ids ``[1, T]``."""
    messages = [{"role": "user", "content": user}] if isinstance(user, str) else user
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


# The worked examples of the tool-call prompt: the first training row of each kind, in this order.
FEW_SHOT_KINDS = ("get_weather", "convert_currency", None, "set_timer")


def few_shot_rows(rows: list[dict], kinds=FEW_SHOT_KINDS) -> list[dict]:
    """The first row of ``rows`` (lesson 12's data rows) whose call names each tool in ``kinds``
    (None: a request that needs no tool), in the order of ``kinds``."""
    return [next(r for r in rows if (r["call"]["name"] if r["call"] else None) == kind) for kind in kinds]


def tool_call_messages(request: str, shots: list[dict]) -> list[dict]:
    """Lesson 12's router conversation with worked examples: the system message (the tool catalogue),
    then each row of ``shots`` as a user turn and its correct reply (``tools.target_reply``) as the
    assistant's, then ``request`` as the last user turn."""
    from . import tools

    system, user = tools.messages(request)
    turns = []
    for row in shots:
        turns += [{"role": "user", "content": row["request"]},
                  {"role": "assistant", "content": tools.target_reply(row)}]
    return [system, *turns, user]


def tool_call_ids(tokenizer, request: str, shots: list[dict]) -> torch.Tensor:
    """``tool_call_messages(request, shots)`` as input ids ``[1, T]``, ending where the reply starts."""
    return chat_ids(tokenizer, tool_call_messages(request, shots))


def replay_greedy_rounds(prompt: list[int], reply: list[int], propose: Callable[[list[int], int], list[int]],
                         K: int, max_new_tokens: int) -> dict:
    """The rounds greedy speculative decoding makes with the proposal function ``propose``, replayed
    on the target's own greedy ``reply`` to ``prompt`` (token-id lists; ``reply`` as ``generate``
    returned it: at most ``max_new_tokens`` tokens, ending at the end-of-sequence token or the cap).

    Greedy verification keeps the longest prefix of a proposal that equals the target's greedy
    continuation, plus one token of the target's, so the target's reply fixes every round. A round at
    ``j`` committed tokens proposes ``propose(prompt + reply[:j], K)``, nothing when one token is left
    (as transformers' assisted generation does), and commits the ``n`` matching drafts plus one, cut at
    the reply's end. Returns ``{"rounds": target forwards, "drafted": proposed tokens, "accepted":
    committed drafts, "proposed": [tokens proposed per round], "kept": [drafts committed per round]}``.
    """
    j, proposed, kept = 0, [], []
    while j < len(reply):
        draft = [] if j == max_new_tokens - 1 else [int(t) for t in propose(list(prompt) + list(reply[:j]), K)]
        n = 0
        while n < len(draft) and j + n < len(reply) and draft[n] == reply[j + n]:
            n += 1
        commit = min(n + 1, len(reply) - j)
        proposed.append(len(draft))
        kept.append(commit - 1)
        j += commit
    return {"rounds": len(proposed), "drafted": sum(proposed), "accepted": sum(kept), "proposed": proposed,
            "kept": kept}


@torch.inference_mode()
def forward_seconds(model, context: torch.Tensor, n_new: int, repeats: int = 5) -> float:
    """Median seconds of one cached forward of ``model`` on ``n_new`` new positions after ``context``
    (``[1, T]`` ids, prefilled once), what verifying ``n_new - 1`` drafts costs (``logits_to_keep``
    ``n_new``, as in a verification step). The cache is cropped back after each repeat."""
    from transformers import DynamicCache

    cache = DynamicCache()
    model(input_ids=context[:, :-n_new], cache=cache, use_cache=True, logits_to_keep=1)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=context[:, -n_new:], cache=cache, use_cache=True, logits_to_keep=n_new)
        times.append(time.perf_counter() - start)
        cache.crop(-n_new)
    return float(sorted(times)[len(times) // 2])


def to_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Next-token probabilities ``[..., V]`` (float32) from logits ``[..., V]``.

    ``temperature > 0``: softmax(logits / temperature). ``temperature == 0``: greedy decoding written
    as a distribution, one-hot on the arg-max, so the same accept/resample rule covers both.
    """
    logits = logits.float()
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits / temperature, dim=-1)


def configure_assistant(draft, num_tokens: int) -> None:
    """Make ``generate(assistant_model=draft)`` draft exactly ``num_tokens`` tokens every round.

    transformers reads these from the *assistant's* generation config: the default schedule
    ("constant" in transformers 5, "heuristic" before) and the confidence threshold (0.4 by default:
    the draft stops early when unsure) would both change K behind our back.
    """
    draft.generation_config.num_assistant_tokens = int(num_tokens)
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0


def cut_draft(teacher, n_layers: int) -> LlamaForCausalLM:
    """The teacher's first ``n_layers`` decoder layers + its final norm + its tied head (an early exit)."""
    return cut_student(teacher, list(range(n_layers))).eval()


def _draft_key(teacher, n_layers: int, steps: int, n_requests: int, max_new_tokens: int, lr: float) -> str:
    """Cache key of a distilled draft: the recipe and a fingerprint of the teacher it imitates."""
    weights = teacher.get_input_embeddings().weight
    spec = json.dumps({"teacher": teacher.config.to_json_string(use_diff=False),
                       "embedding_checksum": round(float(weights[:64].detach().double().sum()), 6),
                       "n_layers": n_layers, "steps": steps, "requests": n_requests,
                       "max_new_tokens": max_new_tokens, "lr": lr, "version": 1}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


@torch.no_grad()
def teacher_replies(teacher, tokenizer, requests: list[str], max_new_tokens: int,
                    batch_size: int = 16) -> list[torch.Tensor]:
    """The teacher's greedy replies to ``requests``: one ``[T]`` id tensor (prompt + reply) each."""
    out = []
    for start in range(0, len(requests), batch_size):
        chunk = [chat_ids(tokenizer, r)[0] for r in requests[start:start + batch_size]]
        width = max(len(c) for c in chunk)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, c in enumerate(chunk):  # left padding: every prompt ends where its reply starts
            ids[i, width - len(c):] = c
            mask[i, width - len(c):] = 1
        gen = teacher.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=pad)
        for i, c in enumerate(chunk):
            reply = gen[i, width:]
            stop = (reply == tokenizer.eos_token_id).nonzero()
            if len(stop):
                reply = reply[:int(stop[0]) + 1]
            out.append(torch.cat([c, reply]))
    return out


def distill_draft(draft, teacher, sequences: list[torch.Tensor], prompt_lens: list[int], steps: int,
                  lr: float = 1e-3, batch_size: int = 4, seed: int = 0, progress: bool = True) -> list[float]:
    """Train ``draft``'s decoder layers and final norm (embeddings and tied head frozen) to match the
    teacher's next-token distribution (forward KL) on the reply positions of ``sequences``.

    Returns the loss per step. A few dozen steps already move the acceptance rate; see the lesson.
    """
    from tqdm.auto import tqdm

    if steps <= 0:
        return []
    torch.manual_seed(seed)
    params = []
    for name, p in draft.named_parameters():
        p.requires_grad = name.startswith("model.layers.") or name == "model.norm.weight"
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = torch.randperm(len(sequences)).tolist()
    losses = []
    draft.train()
    for step in tqdm(range(steps), desc="distilling the draft", disable=not progress):
        idx = [order[(step * batch_size + j) % len(order)] for j in range(batch_size)]
        width = max(len(sequences[i]) for i in idx)
        ids = torch.zeros((batch_size, width), dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        target = torch.zeros((batch_size, width), dtype=torch.bool)
        for row, i in enumerate(idx):  # right padding; positions that predict a reply token count
            n = len(sequences[i])
            ids[row, :n] = sequences[i]
            mask[row, :n] = 1
            target[row, prompt_lens[i] - 1:n - 1] = True
        with torch.no_grad():
            t_logp = teacher(input_ids=ids, attention_mask=mask).logits[target].float().log_softmax(-1)
        d_logp = draft(input_ids=ids, attention_mask=mask).logits[target].float().log_softmax(-1)
        loss = F.kl_div(d_logp, t_logp, log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss))
    draft.eval()
    for p in draft.parameters():
        p.requires_grad = False
    return losses


def load_draft(teacher, tokenizer, n_layers: int, steps: int = 0, n_requests: int = 32,
               max_new_tokens: int = 48, lr: float = 1e-3, progress: bool = True) -> tuple[LlamaForCausalLM, dict]:
    """``(draft, info)``: the teacher's first ``n_layers`` layers, distilled for ``steps`` steps.

    ``steps == 0`` is the plain cut. Otherwise the teacher first writes greedy replies to
    ``n_requests`` of ``TRAIN_REQUESTS`` (the draft must imitate the teacher on the teacher's own
    text), the draft is distilled on them, and the result is cached under
    ``$BREWSLM_CACHE/models/draft-...`` so later runs load it in about a second.
    ``info``: how it was made (layers, steps, losses, seconds, whether it came from the cache).
    """
    draft = cut_draft(teacher, n_layers)
    info = {"n_layers": n_layers, "steps": steps, "from_cache": False, "losses": [], "seconds": 0.0}
    if steps <= 0:
        return draft, info
    key = _draft_key(teacher, n_layers, steps, n_requests, max_new_tokens, lr)
    folder = cache_dir() / "models" / f"draft-{MODEL_NAME}-{key}"
    weights = folder / "draft.pt"
    if weights.exists():
        draft.load_state_dict(torch.load(weights, map_location="cpu"))
        saved = json.loads((folder / "info.json").read_text())
        return draft.eval(), {**saved, "from_cache": True}
    start = time.perf_counter()
    requests = TRAIN_REQUESTS[:n_requests]
    sequences = teacher_replies(teacher, tokenizer, requests, max_new_tokens)
    prompt_lens = [chat_ids(tokenizer, r).shape[1] for r in requests]
    info["losses"] = distill_draft(draft, teacher, sequences, prompt_lens, steps, lr=lr, progress=progress)
    info["seconds"] = time.perf_counter() - start
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-draft-"))
    torch.save(draft.state_dict(), tmp / "draft.pt")
    (tmp / "info.json").write_text(json.dumps(info))
    try:
        os.rename(tmp, folder)  # atomic; a concurrent run may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return draft, info


def tiny_llama(vocab_size: int = 32, num_layers: int = 2, hidden_size: int = 64, seed: int = 0,
               eos_token_id: int | None = None) -> LlamaForCausalLM:
    """A tiny random Llama (vocabulary ``vocab_size``) in eval mode: a few milliseconds per forward.

    Its weights are drawn wide (initializer_range 0.5) so its greedy text varies instead of
    repeating one token, which makes it a useful stand-in target in tests.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden_size,
                         max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.5,
                         bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = eos_token_id
    return model


def noisy_copy(model: LlamaForCausalLM, scale: float, seed: int = 0) -> LlamaForCausalLM:
    """A copy of ``model`` whose weights get Gaussian noise (``scale`` x each tensor's std): a draft
    that agrees with ``model`` often but not always. ``scale = 0`` is an exact copy."""
    torch.manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if scale and p.numel() > 1:
                p.add_(torch.randn_like(p) * scale * p.std())
    return out.eval()


@contextmanager
def threads(n: int):
    """``with threads(1): ...`` runs torch on ``n`` threads, then restores the count. Tiny models
    are faster on one thread (and much faster on a busy machine) than on several."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tokens_per_second(fn: Callable[[], int], repeats: int = 1) -> tuple[float, float]:
    """``(tokens/s, seconds)`` of the fastest of ``repeats`` calls of ``fn`` (which returns the number
    of tokens it produced). The best of n is the least disturbed by other processes."""
    best, n_tokens = float("inf"), 0
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        n_tokens = fn()
        best = min(best, time.perf_counter() - start)
    return n_tokens / best, best


def bootstrap_interval(statistic: Callable, *samples, n_resamples: int = 2000, seed: int = 0,
                       confidence: float = 0.95) -> tuple[float, float]:
    """95 % percentile bootstrap interval of ``statistic(*samples)`` resampling the *units* (e.g. one
    value per request in each of ``samples``, paired), with scipy's ``stats.bootstrap``. With fewer
    than two units there is nothing to resample: ``(nan, nan)``."""
    from scipy import stats

    if len(samples[0]) < 2:
        return float("nan"), float("nan")
    res = stats.bootstrap(tuple(np.asarray(s, dtype=float) for s in samples), statistic, paired=True,
                          vectorized=False, n_resamples=n_resamples, method="percentile",
                          confidence_level=confidence, random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def load_llama_lookup(path, K: int | None, max_ngram: int = 3, n_ctx: int = 1024, n_threads: int | None = None):
    """A ``llama_cpp.Llama`` on the GGUF ``path`` for greedy generation; with ``K``, speculative
    decoding with llama-cpp-python's prompt-lookup draft (``LlamaPromptLookupDecoding``:
    ``num_pred_tokens=K``, ``max_ngram_size=max_ngram``). llama-cpp-python then keeps the logits of
    every evaluated position (it needs them to verify drafts), which costs time of its own."""
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    from .budget import cpu_threads

    draft = LlamaPromptLookupDecoding(max_ngram_size=max_ngram, num_pred_tokens=K) if K else None
    n_threads = n_threads or cpu_threads()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                           draft_model=draft, seed=0, verbose=False)


def llama_greedy(llm, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    """``(reply token ids, seconds)``: llama.cpp's greedy continuation of ``prompt_ids``, at most
    ``max_new_tokens``, ending with the end-of-sequence token when it comes (as ``generate`` returns
    it). The KV cache of the prompt prefix shared with the previous call is reused."""
    start = time.perf_counter()
    out = []
    for token in llm.generate([int(t) for t in prompt_ids], top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                              repeat_penalty=1.0):
        out.append(int(token))
        if token == llm.token_eos() or len(out) >= max_new_tokens:
            break
    return out, time.perf_counter() - start


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where token lists ``a`` and ``b`` differ (a length counts), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def top2_margins(model, sequence: list[int], start: int) -> torch.Tensor:
    """``[len(sequence) - start]`` float: the gap between the model's two largest next-token logits at
    each position that predicts ``sequence[start:]`` (one forward pass). A small gap is a near tie:
    a tiny numerical difference can flip the greedy choice there."""
    logits = model(input_ids=torch.tensor([sequence])).logits[0, start - 1:-1].float()
    top = logits.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]
