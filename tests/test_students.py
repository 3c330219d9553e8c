"""brewslm_helpers.students: the arms of lesson 3 (a few labels against KD on the capture) and lesson 4's fallback.

A tiny random Llama stands in for the teacher (same tokenizer and vocabulary), so the training
path runs in seconds; the real layout, metadata and reload are exercised as lesson 4 uses them.
"""
from __future__ import annotations

import json

import pytest
import torch

from brewslm_helpers import models, students


@pytest.fixture(scope="module")
def tiny_teacher(tiny_llama_of):
    return tiny_llama_of(2)


SMALL = dict(rows=6, labels=2, seeds=[0, 1], steps=2, batch_size=2, k=4)
RUNS = {students.run_name(arm, seed) for arm in students.ARMS for seed in (0, 1)}


def test_missing_students_are_trained_saved_and_then_loaded(tmp_path, tiny_teacher, tok):
    assert not students.students_present(tmp_path)
    made = students.load_or_train_students("ci", teacher=tiny_teacher, tokenizer=tok,
                                           folder=tmp_path, **SMALL)
    assert made.source == "trained" and "trained here" in made.describe()
    assert set(made.models) == RUNS and students.students_present(tmp_path)
    meta = json.loads((tmp_path / students.META_FILE).read_text())
    assert set(meta) == RUNS
    for name in RUNS:
        assert meta[name]["steps"] == 2 and meta[name]["teacher_layers"] == [0]
        assert meta[name]["params"] == made.models[name].num_parameters()
        assert (tmp_path / name / "tokenizer_config.json").exists()
    assert meta["kd-seed0"]["alpha"] == 0.5 and meta["ce_few-seed0"]["alpha"] == 1.0
    assert meta["ce_few-seed1"]["labels"] == 2 and meta["ce_all-seed1"]["labels"] == 6
    assert made.runs("kd") == ["kd-seed0", "kd-seed1"]
    # same init and steps, different arm or seed: different students
    weights = {n: made.models[n].model.layers[0].self_attn.q_proj.weight for n in RUNS}
    assert len({w.sum().item() for w in weights.values()}) == len(RUNS)

    again = students.load_or_train_students("ci", tokenizer=tok, folder=tmp_path)
    assert again.source == "loaded" and "loaded from" in again.describe()
    for name in RUNS:
        assert not again.models[name].training
        for (k, a), (_, b) in zip(made.models[name].state_dict().items(),
                                  again.models[name].state_dict().items()):
            assert torch.equal(a, b), (name, k)


def test_an_incomplete_set_is_retrained(tmp_path, tiny_teacher, tok):
    students.load_or_train_students("ci", teacher=tiny_teacher, tokenizer=tok, folder=tmp_path, **SMALL)
    for f in (tmp_path / "kd-seed1").glob("*.safetensors"):
        f.unlink()
    assert not students.students_present(tmp_path)
    made = students.load_or_train_students("ci", teacher=tiny_teacher, tokenizer=tok,
                                           folder=tmp_path, **SMALL)
    assert made.source == "trained" and students.students_present(tmp_path)
    (tmp_path / students.META_FILE).write_text("{not json")
    assert not students.students_present(tmp_path)


def test_the_fallback_trains_what_lesson_3_trains():
    """Lesson 3's CFG and the fallback's ARM_SIZES name the same sizes at both budgets."""
    import re

    from grader.lessons import find_lesson

    text = find_lesson("03").source.read_text()
    for budget, sizes in students.ARM_SIZES.items():
        cfg = re.search(rf"{budget}=dict\((.*?)\),\n", text, re.S).group(1)
        got = eval(f"dict({cfg})")  # noqa: S307 (the course's own source)
        for key in ("k", "labels", "seeds", "steps", "batch_size", "lr", "alpha", "T"):
            want = {"k": "capture_k"}.get(key, key)
            assert got[want] == sizes[key], (budget, key, got[want], sizes[key])
        assert got["n_texts"] == sizes["rows"], budget


def test_trl_topk_kd_equals_the_lessons_loss(tok):
    """The fallback's KL (TRL's generalized_jsd_loss on a dense row that is -1e4 off the top-k) is
    lesson 3's top-k loss: the teacher renormalised over its k ids, the student's full softmax."""
    import types

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 5, 50, generator=g)
    ids = torch.stack([torch.randperm(50, generator=g)[:4] for _ in range(5)])[None]
    lps = torch.log_softmax(torch.randn(1, 5, 4, generator=g), -1) - 0.3
    labels = torch.randint(0, 50, (1, 5), generator=g)
    captured = {}

    def fake_train_arm(init, batches, arm, kd_loss, alpha, T, lr, seed):
        captured["kd_loss"] = kd_loss
        raise StopIteration

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(students, "train_arm", fake_train_arm)
        mp.setattr(students, "capture_records", lambda *a, **k: [])
        mp.setattr(students, "arm_batches", lambda *a, **k: [])
        mp.setattr(students.models, "cut_student", lambda *a, **k: types.SimpleNamespace(
            get_input_embeddings=lambda: torch.nn.Embedding(1, 1)))
        with pytest.raises(StopIteration):
            students.train_students(types.SimpleNamespace(eval=lambda: None), tok, "ci", rows=8)
    for alpha, T in ((0.5, 1.0), (0.2, 2.0), (0.0, 4.0)):
        got = captured["kd_loss"](logits, ids, lps, labels, alpha, T)
        assert torch.allclose(got, _topk_kd(logits, ids, lps, labels, alpha, T), atol=1e-5), (alpha, T)


def test_foreign_vocabulary_is_refused(tmp_path, tok):
    other = models.student_from_config(tok, hidden_size=16, num_layers=1, num_heads=1,
                                       num_kv_heads=1, intermediate_size=32)
    other.resize_token_embeddings(1000)
    other.save_pretrained(tmp_path / "kd-seed0")
    (tmp_path / students.META_FILE).write_text(json.dumps({"kd-seed0": {"arm": "kd", "seed": 0}}))
    with pytest.raises(ValueError, match="tokenizer"):
        students.load_or_train_students("ci", tokenizer=tok, folder=tmp_path)


def test_unknown_budget_is_refused(tmp_path, tok):
    with pytest.raises(ValueError, match="budget"):
        students.load_or_train_students("huge", tokenizer=tok, folder=tmp_path)


def test_reply_start_marks_where_the_answer_begins(tok):
    from brewslm_helpers import distill

    rows = distill.load_kd_rows(3)
    for row, seq in zip(rows, distill.kd_token_ids(tok, rows)):
        n = students.reply_start(tok, row, seq)
        assert tok.decode(seq[n:]).startswith("This review is " + row["label"])
        assert tok.decode(seq[:n]).rstrip().endswith("assistant")


def test_reply_logits_match_the_full_logits_at_labelled_positions(tiny_teacher, tok):
    from brewslm_helpers import distill

    batch = distill.collate([[1, 5, 9, 7, 3], [4, 2, 8]], tok.pad_token_id)
    batch["labels"][:, :2] = distill.IGNORE_INDEX  # a "prompt" of two positions
    keep = batch["labels"] != distill.IGNORE_INDEX
    logits, labels = students.reply_logits(tiny_teacher, batch)
    with torch.no_grad():
        full = tiny_teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (1, int(keep.sum()), tiny_teacher.config.vocab_size)
    assert torch.equal(labels[0], batch["labels"][keep])
    torch.testing.assert_close(logits[0], full[keep], rtol=1e-5, atol=1e-5)


# --- issue 14's arms: a few labels against KD on the capture (students.arm_batches / train_arm) ----

def _fake_capture(tok, rows, k=4, seed=0):
    """Capture records in lesson 2's schema for ``rows``, with random top-k (ids and log-probs)."""
    from brewslm_helpers import distill

    g = torch.Generator().manual_seed(seed)
    records = []
    for seq in distill.kd_token_ids(tok, rows):
        lp = torch.log_softmax(torch.randn(len(seq), k, generator=g), -1) - 0.1
        ids = torch.randint(0, len(tok), (len(seq), k), generator=g)
        records.append({"input_ids": seq, "k": k, "topk_ids": ids.tolist(), "topk_logprobs": lp.tolist()})
    return records


def _topk_kd(student_logits, topk_ids, topk_logprobs, labels, alpha, T):
    mask = labels != -100
    n = mask.sum().clamp_min(1)
    ce = torch.nn.functional.cross_entropy(student_logits[0], labels[0], ignore_index=-100, reduction="sum") / n
    log_p = torch.log_softmax(topk_logprobs / T, -1)
    log_q = torch.log_softmax(student_logits / T, -1).gather(-1, topk_ids)
    kl = ((log_p.exp() * (log_p - log_q)).sum(-1) * mask).sum() / n
    return alpha * ce + (1 - alpha) * T ** 2 * kl


@pytest.fixture(scope="module")
def reviews():
    from brewslm_helpers import data

    return data.load_reviews("train", 12)


def test_few_labels_are_balanced_seeded_and_checked(reviews):
    few = students.few_label_ids(reviews, 4, seed=0)
    assert len(few) == 4 and sum(reviews[i]["label"] == "positive" for i in few) == 2
    assert few == students.few_label_ids(reviews, 4, seed=0) != students.few_label_ids(reviews, 4, seed=1)
    with pytest.raises(ValueError, match="balanced"):
        students.few_label_ids(reviews, 40, seed=0)


def test_answer_position_predicts_the_label_word(reviews, tok):
    from brewslm_helpers import distill

    for row, seq in zip(reviews, distill.kd_token_ids(tok, reviews)):
        t = students.answer_position(tok, row, seq)
        assert tok.decode(seq[t + 1]).strip() == row["label"]
        assert tok.decode(seq[:t + 1]).endswith("This review is")


@pytest.mark.parametrize("positions", ["answer", "reply"])
def test_arm_batches_put_labels_only_where_a_human_gave_one(reviews, tok, positions):
    records = _fake_capture(tok, reviews)
    few = students.few_label_ids(reviews, 4, seed=0)
    id_of = {tuple(r["input_ids"]): i for i, r in enumerate(records)}
    for arm in students.ARMS:
        batches = students.arm_batches(records, reviews, tok, arm, few, steps=6, batch_size=4, seed=0,
                                       positions=positions)
        assert len(batches) == 6
        for b in batches:
            assert not (b["hard"] & b["soft"]).any()
            assert not (b["labels"][b["hard"] | b["soft"]] == -100).any()
            for row in range(b["input_ids"].shape[0]):
                n = int(b["attention_mask"][row].sum())
                i = id_of[tuple(b["input_ids"][row, :n].tolist())]
                ans = students.answer_position(tok, reviews[i], records[i]["input_ids"])
                hard, soft = b["hard"][row].nonzero()[:, 0].tolist(), b["soft"][row].nonzero()[:, 0].tolist()
                labelled = arm == "ce_all" or i in few
                assert arm != "ce_few" or i in few  # CE(few) sees the labelled texts only
                if labelled:
                    assert not soft and ans in hard and (positions == "reply" or hard == [ans])
                else:
                    assert not hard
                    # a label-free position never has the true label in its context: none after the answer
                    assert (soft and max(soft) == ans) if arm == "kd" else not soft
    with pytest.raises(ValueError, match="unknown arm"):
        students.arm_batches(records, reviews, tok, "kd_all", few, 1, 2, 0)


def test_arm_loss_is_ce_for_the_ce_arms_and_weights_kd_by_positions(reviews, tok, tiny_teacher):
    records = _fake_capture(tok, reviews)
    few = students.few_label_ids(reviews, 4, seed=0)
    b = students.arm_batches(records, reviews, tok, "kd", few, steps=3, batch_size=12, seed=0,
                             positions="reply")[0]
    with torch.no_grad():
        logits = tiny_teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        got = students.arm_loss(tiny_teacher, b, "kd", _topk_kd, 0.3, 2.0)
        parts, n = 0.0, 0
        for mask, alpha, labels in ((b["hard"], 0.3, b["labels"]), (b["soft"], 0.0, b["topk_ids"][..., 0])):
            m = int(mask.sum())
            parts += m * _topk_kd(logits[mask][None], b["topk_ids"][mask][None], b["topk_logprobs"][mask][None],
                                  labels[mask][None], alpha, 2.0)
            n += m
        assert torch.allclose(got, parts / n, atol=1e-5)
        ce = students.arm_loss(tiny_teacher, b, "ce_few", None, 0.3, 2.0)
        want = torch.nn.functional.cross_entropy(logits[b["hard"]], b["labels"][b["hard"]])
        assert torch.allclose(ce, want, atol=1e-5)


def test_train_arm_trains_a_copy(reviews, tok, tiny_teacher):
    records = _fake_capture(tok, reviews)
    few = students.few_label_ids(reviews, 4, seed=0)
    init = models.cut_student(tiny_teacher, [0])
    before = init.model.layers[0].mlp.up_proj.weight.clone()
    batches = students.arm_batches(records, reviews, tok, "kd", few, steps=3, batch_size=4, seed=0)
    model, history = students.train_arm(init, batches, "kd", _topk_kd, 0.5, 1.0, lr=1e-2, seed=0)
    assert len(history) == 3 and all(h == h for h in history)
    assert torch.equal(init.model.layers[0].mlp.up_proj.weight, before)  # the init is untouched
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before)
    with pytest.raises(ValueError, match="kd_loss"):
        students.train_arm(init, batches, "kd", None)
