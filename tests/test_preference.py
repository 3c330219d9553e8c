"""Lesson 5's plumbing: the shipped pairs, their batches, TRL's losses on our batches, the reply judge.

The exercises are checked against ``preference.trl_dpo_loss`` / ``trl_orpo_loss``; here those TRL
references are checked against the losses written from their papers' definitions, so a TRL upgrade
that changes what they compute fails here, loudly, not in a student's notebook.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from brewslm_helpers import preference
from brewslm_helpers.data import DATA_DIR, make_preference_data

TRAIN = preference.load_preference_data("train")
TEST = preference.load_preference_data("test")


def drinks(row: dict) -> list[str]:
    """The two drinks on a row's card."""
    return re.findall(r"(?:Card: |; )([a-z -]+?) \d", row["user"])


@pytest.mark.parametrize("rows,n", [(TRAIN, 480), (TEST, 120)], ids=["train", "test"])
def test_splits_sizes_kinds_and_answers(rows, n):
    assert len(rows) == n and len({r["id"] for r in rows}) == n
    for kind in preference.KINDS:
        assert sum(r["kind"] == kind for r in rows) == n // 3
    for r in rows:
        assert set(r) == {"id", "kind", "field", "user", "answer", "chosen", "rejected"}
        assert len(drinks(r)) == 2 and r["answer"] in r["user"] and r["chosen"] != r["rejected"]
        assert preference.judge_reply(r["chosen"], r)["good"]
        rejected = preference.judge_reply(r["rejected"], r)
        if r["kind"] == "wrong":  # a value from the card, the wrong one
            assert not rejected["correct"] and re.search(r"\d[.:]?\d+", r["rejected"]).group() in r["user"]
        elif r["kind"] == "verbose":
            assert r["chosen"] in r["rejected"] and len(r["rejected"]) > 2 * len(r["chosen"])
        else:
            assert rejected["refusal"] and not rejected["correct"]


def test_held_out_split_is_disjoint_from_train():
    assert not {d for r in TRAIN for d in drinks(r)} & {d for r in TEST for d in drinks(r)}
    assert not {r["user"] for r in TRAIN} & {r["user"] for r in TEST}

    def question(r):
        text = r["user"].split("Question: ")[1]
        for d in drinks(r):
            text = text.replace(d, "X")
        return text
    train_questions, test_questions = {question(r) for r in TRAIN}, {question(r) for r in TEST}
    assert not train_questions & test_questions  # one phrasing per field is held out


def test_data_files_are_reproducible(tmp_path):
    make_preference_data.main(tmp_path)
    for name in ("preference_train.jsonl", "preference_test.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name


def test_load_and_examples():
    assert preference.load_preference_data("test", 3) == TEST[:3]
    with pytest.raises(ValueError, match="unknown preference split"):
        preference.load_preference_data("dev")
    (ex,) = preference.preference_examples(TEST[:1])
    assert ex["prompt"] == [{"role": "system", "content": preference.SYSTEM},
                            {"role": "user", "content": TEST[0]["user"]}]
    assert ex["chosen"] == [{"role": "assistant", "content": TEST[0]["chosen"]}]
    assert ex["rejected"] == [{"role": "assistant", "content": TEST[0]["rejected"]}]


def test_batch_layout_chosen_first_reply_only_masked(tok):
    rows = TEST[:3]
    batch = preference.collate_pairs(tok, rows)
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}
    assert batch["input_ids"].shape[0] == 6
    for i, row in enumerate(rows):
        for j, reply in ((i, row["chosen"]), (3 + i, row["rejected"])):
            ids = batch["input_ids"][j]
            assert tok.decode(ids[batch["completion_mask"][j].bool()]) == reply + "<|im_end|>\n"
            assert (batch["completion_mask"][j] <= batch["attention_mask"][j]).all()
            prompt = tok.decode(ids[(batch["attention_mask"][j] - batch["completion_mask"][j]).bool()])
            assert prompt.endswith("<|im_start|>assistant\n") and row["user"] in prompt


def test_tokenization_matches_trl_dpo_trainer(tok, tiny_llama_of):
    trainer = preference.trl_dpo_trainer(tiny_llama_of(1), tok, TEST[:4], beta=0.1, ref_model=tiny_llama_of(1))
    for row, trl_row in zip(TEST[:4], trainer.train_dataset):
        ours = preference.tokenize_pair(tok, row)
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert ours[key] == list(trl_row[key]), key


def reply_logps(model, batch, average=False):
    """Reply log-probabilities written out position by position (float64), the definition."""
    logp = torch.log_softmax(preference.pair_logits(model, batch).double(), -1)
    ids, mask = batch["input_ids"], batch["completion_mask"]
    out = []
    for n in range(ids.shape[0]):
        terms = [logp[n, t - 1, ids[n, t]] for t in range(1, ids.shape[1]) if mask[n, t]]
        total = torch.stack(terms).sum()
        out.append(total / len(terms) if average else total)
    return torch.stack(out)


def test_trl_sequence_logprob_is_the_definition(tok):
    (model,) = preference.tiny_models(tok, seeds=(3,))
    batch = preference.collate_pairs(tok, TEST[:2])
    logits = preference.pair_logits(model, batch)
    for average in (False, True):
        got = preference.trl_sequence_logprob(logits, batch["input_ids"], batch["completion_mask"], average)
        assert torch.allclose(got.double(), reply_logps(model, batch, average), atol=1e-4)


def test_trl_dpo_loss_is_the_papers_loss(tok):
    policy, reference = preference.tiny_models(tok)
    rows = TEST[:3]
    batch = preference.collate_pairs(tok, rows)
    beta = 0.2
    trainer = preference.trl_dpo_trainer(policy, tok, rows, beta=beta, ref_model=reference)
    got = preference.trl_dpo_loss(trainer, batch)
    pc, pr = reply_logps(policy, batch).chunk(2)
    rc, rr = reply_logps(reference, batch).chunk(2)
    margin = beta * ((pc - rc) - (pr - rr))
    assert margin.abs().max() > 0.1  # the tiny models differ enough for a sign error to show
    assert math.isclose(got["loss"], float(-F.logsigmoid(margin).mean()), abs_tol=1e-4)
    assert math.isclose(got["chosen_reward"], float(beta * (pc - rc).mean()), abs_tol=1e-4)
    assert math.isclose(got["rejected_reward"], float(beta * (pr - rr).mean()), abs_tol=1e-4)


def test_trl_dpo_loss_with_precomputed_reference_still_runs_the_reference(tok):
    policy, reference = preference.tiny_models(tok)
    trainer = preference.trl_dpo_trainer(policy, tok, TEST[:2], beta=0.1, ref_model=reference,
                                         precompute_ref_log_probs=True)
    batch = preference.collate_pairs(tok, TEST[2:4])  # pairs the trainer has no precomputed values for
    assert trainer.precompute_ref_logps
    assert math.isfinite(preference.trl_dpo_loss(trainer, batch)["loss"])
    assert trainer.precompute_ref_logps  # restored


def test_trl_orpo_loss_is_the_papers_loss_as_trl_computes_sft(tok):
    (host,), (model,) = preference.tiny_models(tok, seeds=(1,)), preference.tiny_models(tok, seeds=(4,), scale=3.0)
    rows = TEST[:3]
    batch = preference.collate_pairs(tok, rows)
    lam = 0.3
    got = preference.trl_orpo_loss(preference.trl_orpo_trainer(host, tok, rows, lam=lam), batch, model=model)
    mean_lp = reply_logps(model, batch, average=True)
    c, r = mean_lp.chunk(2)
    log_odds = (c - torch.log1p(-torch.exp(c))) - (r - torch.log1p(-torch.exp(r)))
    # SFT: token-mean NLL of the chosen rows over every real token after the first (TRL's choice)
    logp = torch.log_softmax(preference.pair_logits(model, batch).double(), -1)[:3, :-1]
    target = batch["input_ids"][:3, 1:]
    real = batch["attention_mask"][:3, 1:].double()
    nll = -(logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * real).sum() / real.sum()
    assert math.isclose(got["nll"], float(nll), abs_tol=1e-4)
    assert math.isclose(got["log_odds"], float(log_odds.mean()), abs_tol=1e-4)
    assert math.isclose(got["loss"], float(nll - lam * F.logsigmoid(log_odds).mean()), abs_tol=1e-4)


def test_trl_version_is_checked(monkeypatch):
    import trl

    preference.check_trl_version()
    monkeypatch.setattr(trl, "__version__", "9.9.9")
    with pytest.raises(RuntimeError, match="trl==1.16.0"):
        preference.check_trl_version()


@pytest.mark.parametrize("reply,answer,correct,refusal", [
    ("The iced latte costs 4.10 EUR.", "4.10 EUR", True, False),
    ("That's 4.10 euros.", "4.10 EUR", True, False),
    ("It costs 4,10 EUR.", "4.10 EUR", True, False),
    ("It costs 14.10 EUR.", "4.10 EUR", False, False),
    ("It costs 4.105 EUR.", "4.10 EUR", False, False),
    ("The macchiato is 120ml.", "120 ml", True, False),
    ("The macchiato is 1120 ml.", "120 ml", False, False),
    ("The macchiato is 120 g.", "120 ml", False, False),
    ("We open at 7:30.", "7:30", True, False),
    ("We open at 17:30.", "7:30", False, False),
    ("We open at 7:30 and close at 18:00.", "18:00", True, False),
    ("We close at 18:005.", "18:00", False, False),
    ("I'm sorry, but I can't help with that.", "7:30", False, True),
    ("As an AI, I cannot know that, but the card says 7:30.", "7:30", True, True),
])
def test_judge_reply(reply, answer, correct, refusal):
    got = preference.judge_reply(reply, {"answer": answer})
    assert (got["correct"], got["refusal"], got["repeats"]) == (correct, refusal, False)
    assert got["words"] == len(reply.split())
    assert got["good"] == (correct and not refusal and got["words"] <= 15)


@pytest.mark.parametrize("reply,repeats", [
    ("The latte is 120 ml.", False), ("We close at 20:00 and open at 7:00.", False),
    ("It is 120\xa0120\xa0120\xa0120 ml", True), ("dropping by 66666666666", True),
    ("A pour-over 6:30 to 17:30 to 17:30 to 17:30 to", True),
    ("We open at 7:30, 7:30 is early.", False), ("to to to", True), ("We open at 1000000.", True),
])
def test_judge_flags_loops(reply, repeats):
    got = preference.judge_reply(reply, {"answer": "120 ml"})
    assert got["repeats"] == repeats
    assert not (repeats and got["good"])
