"""Distillation plumbing shared by lessons 2-4: the training texts, batching, the capture schema.

The teacher-capture file
------------------------
Lesson 2 runs the teacher once over the distillation texts and writes
``artifact_dir(budget) / "teacher_capture.jsonl"``; lesson 3 trains students from it. One JSON
object per line, one line per text::

    {
      "id": "train-0042",                      # source row id (data.load_reviews)
      "input_ids": [1, 9690, ...],             # T token ids of the chat-formatted text
      "k": 8,                                  # top-k kept per position
      "topk_ids": [[...k ids...], ...],        # T x k: the teacher's k most likely next tokens
      "topk_logprobs": [[...k floats...], ...],# T x k: their log-probs under the FULL softmax
      "covered_mass": [0.97, ...],             # T: sum of the k probabilities (<= 1)
      "tokenizer_fingerprint": "sha256:...",   # of the teacher's tokenizer (vocab + specials)
      "teacher": "SmolLM2-135M-Instruct"
    }

Position ``t`` holds the teacher's distribution for the token *after* ``input_ids[t]``
(``logits[t]`` of a causal LM). The log-probs are not renormalised over the top-k: the missing
mass is ``1 - covered_mass``; lesson 3 decides how to renormalise.

Labels follow the same alignment: ``labels[b, t]`` is the hard target for ``logits[b, t]``
(the next token), ``-100`` where there is none (the last position and padding).
"""
from __future__ import annotations

import torch

from .data import batches, load_reviews, sentiment_answer, sentiment_question  # noqa: F401 (batches: lessons 2-3 chunk with it)
from .evaluation import chat_prompt

CAPTURE_FILE = "teacher_capture.jsonl"
IGNORE_INDEX = -100


def kd_texts(tokenizer, rows: list[dict]) -> list[str]:
    """Chat-formatted training texts: the sentiment question for each review and the true answer
    ("This review is positive.") as the assistant's reply, closed by the end-of-turn token."""
    return [chat_prompt(tokenizer, sentiment_question(r["text"])) + sentiment_answer(r["label"])
            + ".<|im_end|>" for r in rows]


def kd_token_ids(tokenizer, rows: list[dict]) -> list[list[int]]:
    """Token ids of ``kd_texts`` (no extra special tokens: the template already has them)."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in kd_texts(tokenizer, rows)]


def load_kd_rows(n: int) -> list[dict]:
    """The first ``n`` rows of the distillation (train) split."""
    return load_reviews("train", n)


def collate(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token-id lists into ``input_ids``, ``attention_mask`` and shifted ``labels``.

    All three are ``[B, T_max]`` long tensors; ``labels[b, t] = input_ids[b, t + 1]`` for real
    tokens and ``-100`` for the last real position and for padding.
    """
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    labels = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    for b, seq in enumerate(sequences):
        n = len(seq)
        ids[b, :n] = torch.tensor(seq)
        mask[b, :n] = 1
        labels[b, :n - 1] = torch.tensor(seq[1:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_capture(records: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch capture records (dicts as described above) into tensors.

    Returns ``collate``'s three tensors plus ``topk_ids`` (long) and ``topk_logprobs`` (float32),
    both ``[B, T_max, k]``; padded positions get token 0 with log-prob 0 (they are masked by
    ``labels == -100`` anyway).
    """
    batch = collate([r["input_ids"] for r in records], pad_id)
    B, T = batch["input_ids"].shape
    k = records[0]["k"]
    topk_ids = torch.zeros(B, T, k, dtype=torch.long)
    topk_lp = torch.zeros(B, T, k, dtype=torch.float32)
    for b, r in enumerate(records):
        n = len(r["input_ids"])
        topk_ids[b, :n] = torch.tensor(r["topk_ids"], dtype=torch.long)
        topk_lp[b, :n] = torch.tensor(r["topk_logprobs"], dtype=torch.float32)
    batch.update(topk_ids=topk_ids, topk_logprobs=topk_lp)
    return batch
