"""Lesson 7's plumbing: three tasks of very different sizes, one shared model, mixed batches.

The tasks (each a prompt and a short answer; the loss and the metric are on the answer's tokens):

============  ==========================================  =====  =====  =========================
task          prompt -> answer                            train  eval   shipped as
============  ==========================================  =====  =====  =========================
``arith``     ``"Add: 372+561="`` -> ``"933"``             4000   200    ``data/arith_*.jsonl``
``sentiment`` ``"Review: ...\\nSentiment:"`` -> ``" positive"``  600    120    ``data/reviews_*.jsonl``
``tool``      ``"Request: ...\\nTool:"`` -> ``" get_time"``     400     80    ``data/tool_*.jsonl``
============  ==========================================  =====  =====  =========================

``arith`` is the high-resource task (generated, so cheap: ``data/make_arith_data.py``) and has a
natural difficulty axis (digits, carries); ``tool`` is the low-resource one (which tool of lesson
12's catalogue a request needs, or ``none``). Each has its own held-out split.

The model is a small Llama built from config that shares SmolLM2's tokenizer
(``models.student_from_config``, ``MODEL_SIZE``: 6.6 M parameters, most of them the tied
embeddings); every parameter is shared by all tasks, and is what each task's gradient lands on.
A schedule is a list of steps, each a list of
``(task, example_index)`` pairs; ``train`` runs it, ``evaluate`` scores a held-out split by exact
match of the answer under teacher forcing (every answer token is the argmax) and its loss.

None of this is an exercise's answer: the mixing weights, the sampler, the difficulty score, the
curriculum, the gradient cosine and the A/B test are the lesson's exercises. ``pcgrad`` is the
mitigation the lesson measures, checked there against ``torchjd``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import models
from .data import DATA_DIR, load_jsonl, load_reviews
from .distill import IGNORE_INDEX, collate
from .tools import load_tool_data

TASKS = ("arith", "sentiment", "tool")
EVAL_SPLIT = {"arith": "test", "sentiment": "gold", "tool": "test"}


def load_arith(split: str) -> list[dict]:
    """Lesson 7's addition problems (``split``: ``"train"``, 4000 rows, or ``"test"``, 200)."""
    path = DATA_DIR / f"arith_{split}.jsonl"
    if not path.exists():
        raise ValueError(f"unknown arith split {split!r}: use 'train' or 'test'")
    return load_jsonl(path)


def task_rows(task: str, split: str) -> list[dict]:
    """Rows of ``task`` as ``{"prompt", "answer", ...}``; ``split`` is ``"train"`` or ``"eval"``.

    The original record's fields are kept (``a``, ``b``, ``digits`` for arith; ``label``; ``call``).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if task == "arith":
        rows = load_arith("train" if split == "train" else "test")
        return [{**r, "prompt": f"Add: {r['question']}", "answer": r["answer"]} for r in rows]
    if task == "sentiment":
        rows = load_reviews("train" if split == "train" else "gold")
        return [{**r, "prompt": f"Review: {r['text']}\nSentiment:", "answer": " " + r["label"]}
                for r in rows]
    if task == "tool":
        rows = load_tool_data("train" if split == "train" else "test")
        return [{**r, "prompt": f"Request: {r['request']}\nTool:",
                 "answer": " " + (r["call"]["name"] if r["call"] else "none")} for r in rows]
    raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")


@dataclass
class Example:
    """One tokenised example: ``ids`` = prompt + answer tokens, the answer starts at ``n_prompt``."""

    ids: list[int]
    n_prompt: int


def encode(tokenizer, rows: list[dict]) -> list[Example]:
    """Tokenise prompt and answer separately (so the boundary is exact) and join them."""
    out = []
    for r in rows:
        prompt = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
        if not answer:
            raise ValueError(f"empty answer in {r}")
        out.append(Example(prompt + answer, len(prompt)))
    return out


def make_batch(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """``distill.collate``'s tensors with labels only on the answer tokens."""
    batch = collate([e.ids for e in examples], pad_id)
    for b, e in enumerate(examples):
        batch["labels"][b, :e.n_prompt - 1] = IGNORE_INDEX
    return batch


def answer_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example mean answer NLL ``[B]``, per-example exact match ``[B]`` (bool), token count ``[B]``.

    The output head (49,152 rows) runs only at the labelled positions, as in
    ``students.reply_logits``.
    """
    keep = batch["labels"] != IGNORE_INDEX
    hidden = model.model(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).last_hidden_state
    logits = model.get_output_embeddings()(hidden[keep]).float()
    labels = batch["labels"][keep]
    rows = keep.nonzero()[:, 0]
    B = keep.shape[0]
    nll = F.cross_entropy(logits, labels, reduction="none")
    counts = keep.sum(1)
    per_row = torch.zeros(B, dtype=nll.dtype).index_add(0, rows, nll) / counts.clamp(min=1)
    wrong = torch.zeros(B).index_add(0, rows, (logits.argmax(-1) != labels).float())
    return per_row, wrong == 0, counts


MODEL_SIZE = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256)


def make_model(tokenizer, seed: int = 0, **size):
    """A small Llama built from config (``models.student_from_config``) that shares ``tokenizer``.

    ``size`` overrides ``MODEL_SIZE``; the initial weights depend only on ``seed``, so two arms run
    with the same seed start from the same model. Returned in train mode.
    """
    model = models.student_from_config(tokenizer, seed=seed, **{**MODEL_SIZE, **size})
    model.train()
    return model


def shared_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters every task trains (those with ``requires_grad``), in a fixed order."""
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def evaluate(model, examples: list[Example], pad_id: int, batch_size: int = 100) -> dict:
    """``{"accuracy", "loss", "correct"}`` on ``examples`` (exact match; mean answer NLL, nats/token)."""
    was_training = model.training
    model.eval()
    correct, losses = [], []
    for start in range(0, len(examples), batch_size):
        batch = make_batch(examples[start:start + batch_size], pad_id)
        nll, exact, _ = answer_losses(model, batch)
        correct += exact.tolist()
        losses += nll.tolist()
    model.train(was_training)
    return {"accuracy": sum(correct) / len(correct), "loss": sum(losses) / len(losses),
            "correct": correct}


def pcgrad(grads: torch.Tensor) -> torch.Tensor:
    """PCGrad (Yu et al. 2020, "Gradient surgery for multi-task learning"), Algorithm 1.

    grads: ``[K, D]``, one flattened gradient per task. For each task i, start from g_i and, for
    every other task j in a random order (``torch.randperm``, one permutation per i, as torchjd
    draws them), if ``g_i . g_j < 0`` remove from g_i its component along g_j. Returns the sum of
    the K projected gradients ``[D]``. With no conflict it is the plain sum.
    """
    K = grads.shape[0]
    out = torch.zeros_like(grads[0])
    for i in range(K):
        g = grads[i].clone()
        for j in torch.randperm(K).tolist():
            if j == i:
                continue
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        out += g
    return out


@dataclass
class RunResult:
    """What ``train`` returns: per-step losses and, every ``eval_every`` steps, per-task evals."""

    losses: list[float]
    task_losses: dict[str, list[tuple[int, float]]]  # task -> [(step, train loss on its rows)]
    curves: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)  # (step, acc, loss)
    final: dict[str, dict] = field(default_factory=dict)  # task -> evaluate(...) at the end
    seconds: float = 0.0
    conflicts: int = 0  # PCGrad only: steps with at least one negative task-pair dot product


def train(model, data: dict[str, list[Example]], schedule: list[list[tuple[str, int]]], pad_id: int,
          lr: float = 1e-3, eval_sets: dict[str, list[Example]] | None = None,
          eval_every: int | None = None, combine: str = "sum", seed: int = 0,
          desc: str = "train", progress: bool = True, eval_at_start: bool = True) -> RunResult:
    """Run ``schedule`` (one AdamW step per entry) on ``model``; returns a ``RunResult``.

    Each step's loss is the mean over its examples of their mean answer NLL. ``combine="pcgrad"``
    takes one gradient per task present in the step (the mean over that task's examples, times its
    share of the batch, so that with no conflict it equals the plain step) and combines them with
    ``pcgrad``. Gradients are clipped to norm 1. ``eval_sets`` are evaluated every ``eval_every``
    steps (and at the end); ``eval_at_start=False`` skips the step-0 evaluation (when every run
    starts from the same model, score it once outside).
    """
    if combine not in ("sum", "pcgrad"):
        raise ValueError(f"combine must be 'sum' or 'pcgrad', got {combine!r}")
    torch.manual_seed(seed)
    params = shared_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    result = RunResult([], {t: [] for t in data})
    eval_sets = eval_sets or {}

    def run_eval(step):
        for task, examples in eval_sets.items():
            ev = evaluate(model, examples, pad_id)
            result.curves.setdefault(task, []).append((step, ev["accuracy"], ev["loss"]))
            result.final[task] = ev

    start = time.perf_counter()
    if eval_every and eval_at_start:
        run_eval(0)
    for step, entries in enumerate(tqdm(schedule, desc=desc, disable=not progress), start=1):
        examples = [data[t][i] for t, i in entries]
        tasks = [t for t, _ in entries]
        batch = make_batch(examples, pad_id)
        nll, _, _ = answer_losses(model, batch)
        loss = nll.mean()
        optimizer.zero_grad(set_to_none=True)
        present = sorted(set(tasks), key=list(data).index)
        for task in present:
            rows = [b for b, t in enumerate(tasks) if t == task]
            result.task_losses[task].append((step, float(nll[rows].mean().detach())))
        if combine == "sum" or len(present) == 1:
            loss.backward()
        else:
            flat = []
            for k, task in enumerate(present):
                rows = torch.tensor([b for b, t in enumerate(tasks) if t == task])
                part = nll[rows].sum() / len(tasks)
                grads = torch.autograd.grad(part, params, retain_graph=k < len(present) - 1,
                                            allow_unused=True)
                flat.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                       for g, p in zip(grads, params)]))
            G = torch.stack(flat)
            gram = G @ G.T
            result.conflicts += bool((gram < 0).any())
            combined = pcgrad(G)
            offset = 0
            for p in params:
                p.grad = combined[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        result.losses.append(float(loss.detach()))
        if eval_every and step % eval_every == 0 and step != len(schedule):
            run_eval(step)
    if eval_sets:
        run_eval(len(schedule))
    model.eval()
    result.seconds = time.perf_counter() - start
    return result


def task_gradients(model, data: dict[str, list[Example]], pad_id: int, n: int = 32,
                   seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """Each task's gradient of its mean answer loss on ``n`` random examples, per shared parameter.

    Returns ``{task: [grad tensor per shared parameter, in shared_parameters order]}`` (the tensors
    keep their parameter's shape; the model is not updated).
    """
    g = torch.Generator().manual_seed(seed)
    params = shared_parameters(model)
    was_training = model.training
    model.train()
    out = {}
    for task, examples in data.items():
        idx = torch.randperm(len(examples), generator=g)[:n].tolist()
        nll, _, _ = answer_losses(model, make_batch([examples[i] for i in idx], pad_id))
        grads = torch.autograd.grad(nll.mean(), params, allow_unused=True)
        out[task] = [(gr if gr is not None else torch.zeros_like(p)).detach()
                     for gr, p in zip(grads, params)]
    model.train(was_training)
    return out


def t_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: Student-t interval of the mean of ``diffs`` (plumbing for tables)."""
    from scipy import stats

    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half
