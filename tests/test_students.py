"""brewslm_helpers.students: lesson 4's load-or-train fallback for lesson 3's two students.

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


SMALL = dict(rows=4, batch_size=2, steps=2)


def test_missing_students_are_trained_saved_and_then_loaded(tmp_path, tiny_teacher, tok):
    assert not students.students_present(tmp_path)
    pair = students.load_or_train_students("ci", teacher=tiny_teacher, tokenizer=tok,
                                           folder=tmp_path, **SMALL)
    assert pair.source == "trained" and "trained here" in pair.describe()
    assert set(pair.models) == set(students.STUDENT_NAMES)
    assert students.students_present(tmp_path)
    meta = json.loads((tmp_path / students.META_FILE).read_text())
    assert set(meta) == set(students.STUDENT_NAMES)
    for name in students.STUDENT_NAMES:
        assert meta[name]["steps"] == 2 and meta[name]["teacher_layers"] == [0]
        assert meta[name]["params"] == pair.models[name].num_parameters()
        assert (tmp_path / name / "tokenizer_config.json").exists()
    assert meta["kd_student"]["alpha"] == 0.5 and meta["ce_student"]["alpha"] == 1.0
    # same init and batches, different loss: the two students differ
    kd, ce = (pair.models[n].model.layers[0].self_attn.q_proj.weight for n in students.STUDENT_NAMES)
    assert not torch.equal(kd, ce)

    again = students.load_or_train_students("ci", tokenizer=tok, folder=tmp_path)
    assert again.source == "loaded" and "loaded from" in again.describe()
    assert again.meta["kd_student"]["steps"] == 2
    for name in students.STUDENT_NAMES:
        assert not again.models[name].training
        for (k, a), (_, b) in zip(pair.models[name].state_dict().items(),
                                  again.models[name].state_dict().items()):
            assert torch.equal(a, b), (name, k)


def test_half_present_pair_is_retrained(tmp_path, tiny_teacher, tok):
    students.load_or_train_students("ci", teacher=tiny_teacher, tokenizer=tok, folder=tmp_path, **SMALL)
    for f in (tmp_path / "ce_student").glob("*.safetensors"):
        f.unlink()
    assert not students.students_present(tmp_path)
    pair = students.load_or_train_students("ci", teacher=tiny_teacher, tokenizer=tok,
                                           folder=tmp_path, **SMALL)
    assert pair.source == "trained" and students.students_present(tmp_path)


def test_lesson3_layout_without_metadata_loads(tmp_path, tiny_teacher, tok):
    for name in students.STUDENT_NAMES:
        models.cut_student(tiny_teacher, [1]).save_pretrained(tmp_path / name)
    pair = students.load_or_train_students("ci", tokenizer=tok, folder=tmp_path)
    assert pair.source == "loaded" and pair.meta == {"kd_student": {}, "ce_student": {}}
    assert "lesson 3" in pair.describe()


def test_foreign_vocabulary_is_refused(tmp_path, tok):
    other = models.student_from_config(tok, hidden_size=16, num_layers=1, num_heads=1,
                                       num_kv_heads=1, intermediate_size=32)
    other.resize_token_embeddings(1000)
    for name in students.STUDENT_NAMES:
        other.save_pretrained(tmp_path / name)
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
