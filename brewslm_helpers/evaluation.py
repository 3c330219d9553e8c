"""Evaluation harness: chat prompts, choice scoring by log-likelihood, greedy generation.

The gold tasks are classification questions with a fixed set of answers, scored the way
multiple-choice benchmarks are: the model's log-probability of each answer as the assistant's
reply, highest wins. No sampling, no answer parsing, the same for teacher and students.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import SENTIMENT_LABELS, sentiment_answer, sentiment_question


def chat_prompt(tokenizer, user: str, system: str | None = None) -> str:
    """``user`` (and an optional ``system`` message) in the model's own chat template,
    ending where the assistant's reply starts."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def sentiment_prompt(tokenizer, text: str) -> str:
    """The chat prompt asking for the sentiment of review ``text``."""
    return chat_prompt(tokenizer, sentiment_question(text))


@torch.no_grad()
def choice_logprobs(model, tokenizer, prompts: list[str], choices: list[str],
                    batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Log-probability of each choice as the continuation of each prompt.

    Returns a float tensor ``[len(prompts), len(choices)]``: the sum over the choice's tokens of
    ``log p(token | prompt, earlier choice tokens)``. Choices that share a token prefix and differ
    in one last token (``"This review is positive"`` / ``"... negative"``) cost one forward pass
    per prompt; other choices cost one per (prompt, choice).
    """
    model.eval()
    choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    common = 0
    while all(len(c) > common + 1 for c in choice_ids) and len({c[common] for c in choice_ids}) == 1:
        common += 1
    single_step = all(len(c) == common + 1 for c in choice_ids)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if single_step:  # one sequence per prompt: prompt + shared prefix, then the choices' last token
        seqs = [(i, None, p, choice_ids[0][:common]) for i, p in enumerate(prompt_ids)]
    else:
        seqs = [(i, j, p, c) for i, p in enumerate(prompt_ids) for j, c in enumerate(choice_ids)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    last = torch.tensor([c[-1] for c in choice_ids])
    out = torch.empty(len(prompts), len(choices))
    for start in tqdm(range(0, len(seqs), batch_size), disable=not progress, desc="scoring"):
        chunk = seqs[start:start + batch_size]
        length = max(len(p) + len(c) for _, _, p, c in chunk)
        ids = torch.full((len(chunk), length), pad)
        mask = torch.zeros(len(chunk), length, dtype=torch.long)
        for row, (_, _, p, c) in enumerate(chunk):
            ids[row, :len(p) + len(c)] = torch.tensor(p + c)
            mask[row, :len(p) + len(c)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for row, (i, j, p, c) in enumerate(chunk):
            n = len(p) + len(c)
            prefix = logp[row, torch.arange(len(p) - 1, n - 1), torch.tensor(c, dtype=torch.long)].sum()
            if single_step:
                out[i] = prefix + logp[row, n - 1, last]
            else:
                out[i, j] = prefix
    return out


def score_sentiment(model, tokenizer, rows: list[dict], batch_size: int = 16,
                    progress: bool = False) -> dict:
    """Accuracy of ``model`` on sentiment ``rows`` (see ``data.load_reviews``).

    The answers scored are the teacher's own phrasing, "This review is positive|negative", so
    the comparison comes down to the label token after a shared prefix.

    Returns ``{"accuracy": float, "correct": np.ndarray[bool] (one per row),
    "p_positive": np.ndarray[float]}``; ``p_positive`` is P(positive) renormalised over the two
    answers.
    """
    prompts = [sentiment_prompt(tokenizer, r["text"]) for r in rows]
    answers = [sentiment_answer(label) for label in SENTIMENT_LABELS]
    lp = choice_logprobs(model, tokenizer, prompts, answers, batch_size, progress)
    predicted = [SENTIMENT_LABELS[k] for k in lp.argmax(-1).tolist()]
    correct = np.array([p == r["label"] for p, r in zip(predicted, rows)])
    p_pos = torch.softmax(lp, -1)[:, 0].numpy()
    return {"accuracy": float(correct.mean()), "correct": correct, "p_positive": p_pos}


@torch.no_grad()
def greedy_reply(model, tokenizer, user: str, max_new_tokens: int = 32) -> str:
    """The model's greedy reply to one user message (transformers ``generate``)."""
    prompt = chat_prompt(tokenizer, user)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@torch.no_grad()
def generate_chat_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 48,
                          batch_size: int = 16, desc: str = "generate") -> list[str]:
    """The model's greedy reply (special tokens dropped, stripped) to each conversation, in order.

    ``conversations``: chat messages (``[{"role": ..., "content": ...}, ...]``) ending with the user's
    turn. Batched with left padding; generation stops at the end-of-turn token or after
    ``max_new_tokens``, so a rambling reply is cut there.
    """
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    replies = []
    try:
        for start in tqdm(range(0, len(conversations), batch_size), desc=desc):
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in conversations[start:start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            replies += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return replies
