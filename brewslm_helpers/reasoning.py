"""Lesson 15's plumbing: the word problems, their worked traces, SFT examples, sampling, injected
errors for process supervision, hidden-state reward heads, TRL's GRPO computations on our tensors
(the reference the exercises are checked against), a GRPO trainer for this CPU, and intervals.

A worked trace (what the chain-of-thought model is trained to write) is one line per step, then the
answer line::

    Step 1: 12 + 5 = 17
    Step 2: 17 - 3 = 14
    Answer: 14

Answer extraction and the verifier, step labels, group-relative advantages, the GRPO loss and
majority voting are the lesson's exercises and are not here.
"""
from __future__ import annotations

import math
import os
import random
import re
import tempfile

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm

from .data import DATA_DIR, load_jsonl
from .training import require_trl

SYSTEM = ("Solve the math word problem. Work step by step, one line per step like 'Step 1: 3 + 4 = 7', "
          "then end with the line 'Answer: <number>'.")
TRL_TESTED = "1.16.0"  # the TRL whose GRPOTrainer the checks were written for
ANSWER_LINE = re.compile(r"^Answer: -?\d+$")
STEP_LINE = re.compile(r"^Step \d+: .*=\s*-?\d+$")


def load_reasoning_data(split: str, n: int | None = None) -> list[dict]:
    """Lesson 15's word problems (see ``data/make_reasoning_data.py``).

    ``split``: ``"train"`` (600 problems) or ``"test"`` (150 held-out: unseen names, objects and one
    phrasing per operation); a third of each at each level 1, 2, 3 (the number of steps). ``n`` keeps
    the first ``n`` rows (the files are shuffled). Each row: ``{"id", "level", "question",
    "steps": [{"expr": "12 + 5", "value": 17}, ...], "answer": int}``.
    """
    path = DATA_DIR / f"reasoning_{split}.jsonl"
    if not path.exists():
        raise ValueError(f"unknown reasoning split {split!r}: use 'train' or 'test'")
    rows = load_jsonl(path)
    return rows[:n] if n is not None else rows


def format_trace(steps: list[dict], answer: int) -> str:
    """The worked trace: ``Step k: <expr> = <value>`` per step, then ``Answer: <answer>``."""
    lines = [f"Step {k}: {s['expr']} = {s['value']}" for k, s in enumerate(steps, 1)]
    return "\n".join(lines + [f"Answer: {answer}"])


def target(row: dict, cot: bool = True) -> str:
    """The SFT target for a row: the worked trace (``cot``) or the answer line alone."""
    return format_trace(row["steps"], row["answer"]) if cot else f"Answer: {row['answer']}"


# one worked example shown before the problem (a 1-shot prompt): the model as shipped ignores the
# format when it is only described, and rambles past any token budget. Fine-tuned models are prompted
# without it (``shots=0``): they learned the format from their targets, and the prompt is half as long.
EXAMPLE_QUESTION = "Zoe has 4 pens. She buys 3 more. Then she doubles the pile. How many pens does Zoe have now?"
EXAMPLE_TRACE = "Step 1: 4 + 3 = 7\nStep 2: 7 * 2 = 14\nAnswer: 14"


def messages(question: str, shots: int = 0) -> list[dict]:
    """The conversation the model sees: the system message, with ``shots=1`` one worked example (user
    and assistant turns), then the problem. ``shots`` is 0 or 1."""
    if shots not in (0, 1):
        raise ValueError(f"shots must be 0 or 1, got {shots!r}")
    example = [{"role": "user", "content": EXAMPLE_QUESTION},
               {"role": "assistant", "content": EXAMPLE_TRACE}] if shots else []
    return [{"role": "system", "content": SYSTEM}, *example, {"role": "user", "content": question}]


def sft_examples(rows: list[dict], cot: bool = True, shots: int = 0) -> list[dict]:
    """TRL's conversational prompt/completion format; ``SFTTrainer`` puts the loss on the completion."""
    return [{"prompt": messages(r["question"], shots),
             "completion": [{"role": "assistant", "content": target(r, cot)}]} for r in rows]


def grpo_examples(rows: list[dict], shots: int = 0) -> list[dict]:
    """``GRPOTrainer``'s data: a conversational ``prompt`` plus the gold ``answer`` (handed to the reward
    functions as a keyword argument)."""
    return [{"prompt": messages(r["question"], shots), "answer": r["answer"]} for r in rows]


def format_ok(text: str) -> bool:
    """Format compliance: the reply's non-empty lines are ``Step k: ... = <int>`` lines followed by one
    final ``Answer: <int>`` line (what the CoT model was trained to write). Says nothing about
    correctness."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return bool(lines) and bool(ANSWER_LINE.match(lines[-1])) and all(STEP_LINE.match(x) for x in lines[:-1])


def step_values(text: str) -> list[int | None]:
    """The result of each ``Step`` line of a trace, in order: the integer after the line's last ``=``
    (``None`` when the line has none). Lines that are not steps are skipped."""
    out = []
    for line in text.splitlines():
        if not re.match(r"\s*Step\s*\d+\s*:", line):
            continue
        tail = line.rsplit("=", 1)[1] if "=" in line else ""
        found = re.match(r"\s*(-?\d+)", tail.replace(",", ""))
        out.append(int(found.group(1)) if found else None)
    return out


# --- injected errors (process supervision data) --------------------------------------------------

def _apply(value: int, op: str, b: int) -> int:
    return {"+": value + b, "-": value - b, "*": value * b, "/": value // b if b else value}[op]


def corrupt(row: dict, rng: random.Random) -> dict:
    """A wrong trace for ``row``: one step (drawn at random) goes wrong and the later steps carry the
    wrong value on, computed correctly from it (as a model that slipped once would continue).

    The error is one of ``"slip"`` (the step's result is off by 1 to 3, or by 10), ``"operand"``
    (the step uses a wrong number from 1 to 9) or ``"operator"`` (``+`` and ``-`` swapped, or ``*`` and
    ``/``). Returns ``{"trace": str, "values": [int] (each step's result), "error_step": int (0-based),
    "kind": str}``.
    """
    steps = row["steps"]
    k = rng.randrange(len(steps))
    kind = rng.choice(["slip", "operand", "operator"])
    value = int(steps[0]["expr"].split()[0])
    out = []
    for i, s in enumerate(steps):
        _, op, b = s["expr"].split()
        b = int(b)
        right = _apply(value, op, b)
        if i == k and kind == "operand":
            b = rng.choice([x for x in range(1, 10) if x != b])
        if i == k and kind == "operator":
            op = {"+": "-", "-": "+", "*": "/", "/": "*"}[op]
            if op == "/" and value % b:
                op = "-"
        result = _apply(value, op, b)
        if i == k and (kind == "slip" or result == right):
            result = right + rng.choice([-3, -2, -1, 1, 2, 3, 10])
        out.append({"expr": f"{value} {op} {b}", "value": result})
        value = result
    return {"trace": format_trace(out, value), "values": [s["value"] for s in out], "error_step": k,
            "kind": kind}


# --- generation ----------------------------------------------------------------------------------

@torch.no_grad()
def generate(model, tokenizer, questions: list[str], n: int = 1, temperature: float = 0.0,
             max_new_tokens: int = 64, batch_size: int = 32, seed: int = 0, shots: int = 0,
             desc: str = "generate") -> list[list[str]]:
    """``n`` replies per question (greedy when ``temperature`` is 0, else sampled with that
    temperature, top-p 1), special tokens dropped. Returns one list of ``n`` strings per question.
    ``batch_size`` counts sequences (a batch holds ``batch_size // n`` questions); ``shots``: the
    prompt (``messages``)."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    per_batch = max(1, batch_size // n)
    torch.manual_seed(seed)
    out = []
    try:
        for start in tqdm(range(0, len(questions), per_batch), desc=desc):
            texts = [tokenizer.apply_chat_template(messages(q, shots), tokenize=False, add_generation_prompt=True)
                     for q in questions[start:start + per_batch]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            sample = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 \
                else dict(do_sample=False)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=n,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **sample)
            replies = [t.strip() for t in tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:],
                                                                 skip_special_tokens=True)]
            out += [replies[i:i + n] for i in range(0, len(replies), n)]
    finally:
        tokenizer.padding_side = side
    return out


# --- hidden-state reward heads (PRM and ORM) -----------------------------------------------------

def step_end_chars(trace: str) -> list[int]:
    """Character index of the last character of each ``Step`` line of ``trace``, then of its last
    non-blank character (the end of the answer: where an outcome reward model reads)."""
    ends, pos = [], 0
    for line in trace.split("\n"):
        if re.match(r"\s*Step\s*\d+\s*:", line) and line.strip():
            ends.append(pos + len(line.rstrip()) - 1)
        pos += len(line) + 1
    stripped = trace.rstrip()
    return ends + [max(len(stripped) - 1, 0)]


@torch.no_grad()
def trace_features(model, tokenizer, questions: list[str], traces: list[str], layer: int = -1,
                   batch_size: int = 16, shots: int = 0, desc: str = "features") -> list[torch.Tensor]:
    """The model's hidden state (``layer`` of ``output_hidden_states``) at the end of each step of
    each trace, and at its last character, with the problem as the prompt (``messages(q, shots)``).

    Returns one float32 tensor per trace, ``(steps + 1, hidden)``: row k is the state on the token
    holding the last character of step k (``step_end_chars``), the last row the state on the trace's
    final token. The model reads the whole prompt and trace once (teacher forcing); nothing is generated.
    """
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for start in tqdm(range(0, len(traces), batch_size), desc=desc):
        chunk = list(zip(questions[start:start + batch_size], traces[start:start + batch_size]))
        ids, where = [], []
        for q, t in chunk:
            prompt = tokenizer.apply_chat_template(messages(q, shots), tokenize=False, add_generation_prompt=True)
            enc = tokenizer(prompt + t, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
            positions = []
            for c in step_end_chars(t):
                c += len(prompt)
                positions.append(next((i for i, (a, b) in enumerate(offsets) if a <= c < b), len(offsets) - 1))
            ids.append(enc["input_ids"])
            where.append(positions)
        length = max(len(x) for x in ids)
        batch = torch.full((len(ids), length), pad)
        mask = torch.zeros(len(ids), length, dtype=torch.long)
        for i, x in enumerate(ids):
            batch[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        hidden = model(input_ids=batch, attention_mask=mask, output_hidden_states=True,
                       use_cache=False).hidden_states[layer].float()
        out += [hidden[i, p] for i, p in enumerate(where)]
    return out


def train_head(features: torch.Tensor, labels: torch.Tensor, steps: int = 300, lr: float = 1e-2,
               weight_decay: float = 1e-3, seed: int = 0) -> torch.nn.Module:
    """A logistic-regression head ``P(correct | hidden state)`` fitted with AdamW on ``features``
    ``(N, H)`` and 0/1 ``labels`` ``(N,)``: features are standardised with the training set's mean and
    std (kept inside the head), classes weighted to balance. Returns a module mapping ``(..., H)``
    states to probabilities ``(...)``."""
    torch.manual_seed(seed)
    mean, std = features.mean(0), features.std(0) + 1e-6
    linear = torch.nn.Linear(features.shape[1], 1)
    opt = torch.optim.AdamW(linear.parameters(), lr=lr, weight_decay=weight_decay)
    y = labels.float()
    pos = y.mean().clamp(1e-3, 1 - 1e-3)
    weight = torch.where(y > 0.5, 0.5 / pos, 0.5 / (1 - pos))
    x = (features - mean) / std
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(linear(x).squeeze(-1), y, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()

    class Head(torch.nn.Module):
        def forward(self, h):
            return torch.sigmoid(linear((h - mean) / std).squeeze(-1))

    return Head().eval()


def auc(scores, labels) -> float:
    """Area under the ROC curve (the probability a random positive outscores a random negative; ties
    count a half). ``nan`` when one class is missing."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))


# --- intervals -----------------------------------------------------------------------------------

def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion ``successes / n``."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap(a, b, samples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired items (0/1 correctness per problem) and its 95 % percentile
    bootstrap interval (problems resampled with replacement): ``(diff, low, high)``."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(samples, len(a)))
    diffs = (a[idx] - b[idx]).mean(1)
    return float((a - b).mean()), float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def bootstrap_mean(x, samples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``x`` (one value per problem) and its 95 % percentile bootstrap interval."""
    x = np.asarray(x, float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(samples, len(x)))].mean(1)
    return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


# --- TRL's GRPO on our tensors: what the exercises are checked against ---------------------------

def check_trl_version() -> None:
    """Fail loudly if the installed TRL is not the one the GRPO comparisons were written against."""
    require_trl(TRL_TESTED, "lesson 15 compares your GRPO advantages and loss with "
                "trl=={tested}'s GRPOTrainer", "brewslm_helpers/reasoning.py")


def trl_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """TRL's group-relative advantages for a flat ``(B,)`` reward vector (``B = groups * num_generations``,
    each group's completions adjacent).

    The computation is inline in ``GRPOTrainer._generate_and_score_completions`` (not callable on its
    own), so these lines mirror trl 1.16.0 ``trl/trainer/grpo_trainer.py`` lines 2764-2788 (the
    ``multi_objective_aggregation == "sum_then_normalize"`` branch, one reward function) and 2805
    (``nan_to_num``), calling TRL's own ``nanstd`` (``trl.trainer.utils``, Bessel-corrected).
    """
    check_trl_version()
    from trl.trainer.utils import nanstd

    rewards = rewards.float()
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        if num_generations > 1:
            std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
            std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        else:
            std_rewards = torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def _cpu_grpo_config(**kwargs):
    """A ``GRPOConfig`` for this CPU: fp32, no gradient checkpointing, nothing saved or reported."""
    from trl import GRPOConfig

    out = os.path.join(tempfile.gettempdir(), "brewslm-15-grpo")  # nothing is saved there
    return GRPOConfig(output_dir=out, use_cpu=True, bf16=False, gradient_checkpointing=False,
                      report_to="none", save_strategy="no", dataloader_num_workers=0, **kwargs)


def _constant_reward(prompts, completions, **kwargs):
    return [0.0] * len(completions)


def trl_loss_trainer(tokenizer):
    """A ``GRPOTrainer`` around a tiny random Llama, built only to run TRL's own ``_compute_loss`` on
    tensors we hand it (``trl_grpo_loss``); a second to build, never trained."""
    check_trl_version()
    from trl import GRPOTrainer

    from .models import student_from_config

    model = student_from_config(tokenizer, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                intermediate_size=64, seed=1)
    data = Dataset.from_list([{"prompt": "1 + 1 ="}] * 4)
    args = _cpu_grpo_config(num_generations=2, per_device_train_batch_size=2, max_completion_length=8,
                            max_steps=1, logging_steps=1)
    return GRPOTrainer(model=model, reward_funcs=_constant_reward, args=args, train_dataset=data,
                       processing_class=tokenizer)


def trl_grpo_loss(trainer, per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor,
                  ref_per_token_logps: torch.Tensor, advantages: torch.Tensor, completion_mask: torch.Tensor,
                  beta: float, epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_type: str = "grpo",
                  max_completion_length: int | None = None, bias_correction_kl: bool = True) -> torch.Tensor:
    """TRL's GRPO loss (``GRPOTrainer._compute_loss``, run as is) on our tensors, ``(B, T)`` each but
    ``advantages`` ``(B,)``: the trainer's own forward pass is replaced, on this trainer object only,
    by one that returns ``per_token_logps``, so every line from the importance ratio to the loss
    normalisation is TRL's. Evaluated in eval mode (no gradient-accumulation scaling).
    ``bias_correction_kl`` is ``GRPOConfig.use_bias_correction_kl`` (default True: the KL term is
    multiplied by the importance ratio)."""
    b, t = per_token_logps.shape
    trainer.args.use_bias_correction_kl = bias_correction_kl
    trainer.beta, trainer.loss_type = beta, loss_type
    trainer.epsilon_low, trainer.epsilon_high = epsilon_low, epsilon_high
    trainer.max_completion_length = max_completion_length if max_completion_length is not None else t
    trainer._get_per_token_logps_and_entropies = (
        lambda *args, **kwargs: (per_token_logps, torch.zeros_like(per_token_logps), None))
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": completion_mask.long(),
              "advantages": advantages, "old_per_token_logps": old_per_token_logps,
              "ref_per_token_logps": ref_per_token_logps, "num_items_in_batch": completion_mask.sum()}
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        with torch.no_grad():
            return trainer._compute_loss(trainer.model, inputs).detach()
    finally:
        trainer.model.train(was_training)


def grpo_trainer(model, tokenizer, rows: list[dict], reward_funcs, peft_config=None, shots: int = 0, **config):
    """A TRL ``GRPOTrainer`` on this CPU around ``model`` for the problems ``rows``; ``reward_funcs``
    are TRL reward functions ``f(prompts, completions, answer, **kw) -> list[float]``. ``config`` goes
    to ``GRPOConfig`` (``num_generations``, ``per_device_train_batch_size`` (it counts completions),
    ``max_completion_length``, ``beta``, ``loss_type``, ``max_steps``...); ``shots``: the prompt
    (``messages``)."""
    check_trl_version()
    from trl import GRPOTrainer

    args = _cpu_grpo_config(seed=0, **config)
    return GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args,
                       train_dataset=Dataset.from_list(grpo_examples(rows, shots)), processing_class=tokenizer,
                       peft_config=peft_config)
