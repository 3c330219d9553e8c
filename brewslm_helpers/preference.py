"""Lesson 5's plumbing: the preference pairs, their tokenization and batches, TRL's losses on a batch
of ours (the reference the exercises are checked against), and a judge for generated replies.

A batch of B pairs is laid out the way TRL's ``DataCollatorForPreference`` lays it out: 2B rows, the
B chosen sequences first, then the B rejected ones, each row ``prompt + response`` right-padded::

    input_ids       (2B, T)  token ids
    attention_mask  (2B, T)  1 on real tokens, 0 on padding
    completion_mask (2B, T)  1 on the response's tokens only (not the prompt, not padding)

The sequence log-probability, the DPO loss and the ORPO loss are the lesson's exercises and are not
here.
"""
from __future__ import annotations

import os
import re
import tempfile

import torch
from datasets import Dataset

from .data import batches, load_split  # noqa: F401 (batches: the notebook chunks pairs with it)
from .training import require_trl

SYSTEM = "You are BrewBot, the assistant of a coffee shop. Answer in one short sentence, using the card."
KINDS = ("wrong", "refusal", "verbose")
TRL_TESTED = "1.16.0"  # the TRL whose DPOTrainer / experimental ORPOTrainer the checks were written for


def load_preference_data(split: str, n: int | None = None) -> list[dict]:
    """Lesson 5's preference pairs (see ``data/make_preference_data.py``).

    ``split``: ``"train"`` (480 pairs) or ``"test"`` (120 held-out pairs: unseen drinks and phrasings);
    a third of each split is each ``kind`` of rejected reply: ``"wrong"`` (a wrong value),
    ``"refusal"``, ``"verbose"`` (the right answer buried in filler). ``n`` keeps the first ``n`` rows
    (the files are shuffled). Each row: ``{"id", "kind", "field", "user", "answer", "chosen",
    "rejected"}`` (all str).
    """
    return load_split("preference", split, n, ("train", "test"))


def prompt_messages(row: dict) -> list[dict]:
    """The conversation before the reply: BrewBot's system message and the user's card + question."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["user"]}]


def preference_examples(rows: list[dict]) -> list[dict]:
    """TRL's conversational preference format: ``{"prompt": [system, user], "chosen": [assistant],
    "rejected": [assistant]}``, what ``DPOTrainer`` and ``ORPOTrainer`` take as a data set."""
    return [{"prompt": prompt_messages(r),
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_pair(tokenizer, row: dict) -> dict:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` (lists of token ids), as ``DPOTrainer`` cuts them.

    The prompt is the chat template up to the assistant's turn; a response is what the full
    conversation adds after it (the reply, ``<|im_end|>`` and a newline). Where the template's tokens
    merge across the boundary, the prompt ends where the tokenizations diverge.
    """
    from trl.data_utils import common_prefix_length

    prompt = _chat_ids(tokenizer, prompt_messages(row), add_generation_prompt=True)
    ex = preference_examples([row])[0]
    chosen = _chat_ids(tokenizer, ex["prompt"] + ex["chosen"])
    rejected = _chat_ids(tokenizer, ex["prompt"] + ex["rejected"])
    cut = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
    return {"prompt_ids": prompt[:cut], "chosen_ids": chosen[cut:], "rejected_ids": rejected[cut:]}


def collate_pairs(tokenizer, rows: list[dict]) -> dict[str, torch.Tensor]:
    """A batch of ``len(rows)`` pairs, laid out as the module docstring says (TRL's own collator)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataCollatorForPreference(pad_token_id=pad)([tokenize_pair(tokenizer, r) for r in rows])


@torch.no_grad()
def pair_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on a pair batch, without gradients: ``(2B, T, V)`` float32."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 use_cache=False).logits.float()


# --- TRL's losses on our batch: what the exercises are checked against ---------------------------

def check_trl_version() -> None:
    """Fail loudly if the installed TRL is not the one the TRL comparisons were written against."""
    require_trl(TRL_TESTED, "lesson 5 compares your losses with trl=={tested}'s DPOTrainer and "
                "experimental ORPOTrainer", "brewslm_helpers/preference.py")


def _cpu_args(cls, **kwargs):
    """A TRL config for this CPU: fp32, no checkpoints or reports saved, and no gradient checkpointing
    (TRL turns it on by default to save GPU memory; a 135M model does not need it, and it re-runs the
    forward pass during the backward)."""
    out = os.path.join(tempfile.gettempdir(), "brewslm-05-trl")  # nothing is saved there
    return cls(output_dir=out, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
               dataloader_num_workers=0, gradient_checkpointing=False, **kwargs)


def trl_dpo_trainer(model, tokenizer, rows: list[dict], beta: float, ref_model=None, eval_rows=None,
                    peft_config=None, **config):
    """A TRL ``DPOTrainer`` (sigmoid loss, i.e. DPO) around ``model``, trained on ``rows`` and
    evaluated on ``eval_rows`` (optional). With ``peft_config`` (a LoRA config) and ``ref_model=None``
    the reference is the model with its adapter disabled, TRL's default. ``config`` goes to
    ``DPOConfig`` (steps, batch size, learning rate...)."""
    check_trl_version()
    from trl import DPOConfig, DPOTrainer

    args = _cpu_args(DPOConfig, beta=beta, loss_type=["sigmoid"], seed=0, **config)
    evals = Dataset.from_list(preference_examples(eval_rows)) if eval_rows else None
    return DPOTrainer(model=model, ref_model=ref_model, args=args,
                      train_dataset=Dataset.from_list(preference_examples(rows)), eval_dataset=evals,
                      processing_class=tokenizer, peft_config=peft_config)


def trl_orpo_trainer(model, tokenizer, rows: list[dict], lam: float, peft_config=None, **config):
    """A TRL ``ORPOTrainer`` (``trl.experimental.orpo``) around ``model``, trained on ``rows``;
    ``lam`` is ORPO's λ (TRL calls it ``beta``). ``config`` goes to ``ORPOConfig``."""
    check_trl_version()
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = _cpu_args(ORPOConfig, beta=lam, seed=0, remove_unused_columns=False, **config)
    return ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(preference_examples(rows)),
                       processing_class=tokenizer, peft_config=peft_config)


@torch.no_grad()
def trl_dpo_loss(trainer, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """TRL's DPO loss and mean implicit rewards on our ``batch`` (the trainer's policy and reference).

    Returns ``{"loss", "chosen_reward", "rejected_reward"}``: the rewards are batch means, as TRL logs them.
    A trainer that precomputed its reference log-probabilities (``precompute_ref_log_probs``) has them
    only for its own data sets, so here it runs the reference forward itself.
    """
    model = trainer.model
    was_training, precomputed = model.training, trainer.precompute_ref_logps
    model.eval()
    trainer.precompute_ref_logps = False
    try:
        loss = trainer.compute_loss(model, dict(batch))
    finally:
        model.train(was_training)
        trainer.precompute_ref_logps = precomputed
    metrics = trainer._metrics["eval"]  # TRL logs under "eval" when the model is in eval mode
    return {"loss": float(loss), "chosen_reward": metrics["rewards/chosen"][-1],
            "rejected_reward": metrics["rewards/rejected"][-1]}


def trl_sequence_logprob(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                         average: bool = False) -> torch.Tensor:
    """TRL's response log-probability (``ORPOTrainer.get_batch_logps``), ``(N,)``: the labels are the
    ids with -100 wherever ``mask`` is 0; ``average`` divides by the number of scored tokens."""
    check_trl_version()
    from trl.experimental.orpo import ORPOTrainer

    labels = input_ids.masked_fill(mask == 0, -100)
    return ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)


def tiny_models(tokenizer, seeds: tuple[int, ...] = (1, 2), scale: float = 10.0) -> list:
    """Tiny random Llamas over ``tokenizer``'s vocabulary (a second to build), one per seed: stand-ins
    for a policy and a reference in the exercises' TRL checks. Their output weights are scaled by
    ``scale`` so that their next-token distributions are peaked and differ: with two near-uniform
    models every log-ratio is about 0, and a sign error would hide."""
    from .models import student_from_config

    out = []
    for seed in seeds:
        m = student_from_config(tokenizer, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                intermediate_size=64, seed=seed)
        with torch.no_grad():
            m.get_output_embeddings().weight.mul_(scale)
        out.append(m.eval())
    return out


def orpo_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our pair batch in the keys ``ORPOTrainer`` reads (``chosen_input_ids``, ``chosen_labels``...):
    labels are the input ids with -100 outside the response."""
    n = len(batch["input_ids"]) // 2
    out = {}
    for name, rows in (("chosen", slice(None, n)), ("rejected", slice(n, None))):
        ids = batch["input_ids"][rows]
        out[f"{name}_input_ids"] = ids
        out[f"{name}_attention_mask"] = batch["attention_mask"][rows]
        out[f"{name}_labels"] = ids.masked_fill(batch["completion_mask"][rows] == 0, -100)
    return out


@torch.no_grad()
def trl_orpo_loss(trainer, batch: dict[str, torch.Tensor], model=None) -> dict[str, float]:
    """TRL's ORPO loss on our ``batch`` for ``model`` (default: the trainer's own):
    ``{"loss", "nll", "log_odds"}`` (``log_odds`` is the batch mean). ORPO needs no reference model,
    so any trainer can score any causal LM with the same vocabulary."""
    model = trainer.model if model is None else model
    was_training = model.training
    model.eval()
    try:
        loss, metrics = trainer.get_batch_loss_metrics(model, orpo_inputs(batch), train_eval="eval")
    finally:
        model.train(was_training)
    return {"loss": float(loss), "nll": metrics["eval_nll_loss"], "log_odds": metrics["eval_log_odds_chosen"]}


# --- judging generated replies -------------------------------------------------------------------

REFUSAL = re.compile(r"\b(sorry|can't|cannot|can not|unable|not able|don't have access|as an ai)\b", re.I)


def loops(reply: str, times: int = 3, max_words: int = 4) -> bool:
    """Does ``reply`` loop: a character six times in a row, or a run of 1 to ``max_words`` words
    repeated ``times`` times in a row ("to 17:30 to 17:30 to 17:30")?"""
    if re.search(r"(\S)\1{5,}", reply):
        return True
    words = reply.split()
    return any(all(words[i:i + n] == words[i + k * n:i + (k + 1) * n] for k in range(1, times))
               for n in range(1, max_words + 1) for i in range(len(words) - times * n + 1))


def judge_reply(reply: str, row: dict) -> dict:
    """A rule-based judge of BrewBot's reply to ``row``'s question.

    ``{"correct": the card's value (``row["answer"]``, e.g. "4.10 EUR" or "7:30") is in the reply,
    "refusal": it contains a refusal phrase, "repeats": it loops (a character six times or a word
    three times in a row), "words": its length in words, "good": correct, no refusal, no loop and at
    most 15 words}``. Prices match with or without "EUR" (and with a decimal comma); sizes with or
    without a space before "ml".
    """
    answer = row["answer"]
    number = answer.split()[0]
    text = reply.replace(",", ".")
    if answer.endswith("ml"):
        correct = bool(re.search(rf"(?<![\d.]){re.escape(number)}\s*ml", text, re.I))
    else:
        correct = bool(re.search(rf"(?<![\d.:]){re.escape(number)}(?![\d]|\.\d|:\d)", text))
    refusal = bool(REFUSAL.search(reply))
    repeats = loops(reply)
    words = len(reply.split())
    return {"correct": correct, "refusal": refusal, "repeats": repeats, "words": words,
            "good": correct and not refusal and not repeats and words <= 15}
