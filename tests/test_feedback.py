"""brewslm_helpers.feedback: the labelled PII corpus, Presidio offline, the scores, the simulated
week and the SFT call. The Luhn check, redaction, the sampling budget, tags -> SFT examples and the
retrain trigger are lesson 11's exercises and are not here."""
from __future__ import annotations

import random
import sqlite3
from collections import Counter

import pytest

from brewslm_helpers import feedback as fb
from brewslm_helpers.data import load_reviews


@pytest.fixture(scope="module")
def roster():
    return fb.customer_roster()


@pytest.fixture(scope="module")
def corpus(roster):
    return fb.pii_corpus(300, seed=3, roster=roster)


@pytest.fixture(scope="module")
def analyzer(roster):
    return fb.presidio_analyzer(roster)


def test_corpus_is_seeded_and_its_spans_are_exact(corpus, roster):
    assert corpus == fb.pii_corpus(300, seed=3, roster=roster)
    assert corpus != fb.pii_corpus(300, seed=4, roster=roster)
    for doc in corpus:
        for s, e, _label, value in doc["spans"] + doc["decoys"]:
            assert doc["text"][s:e] == value, (doc["text"], s, e, value)
    kinds = Counter(s[2] for d in corpus for s in d["spans"])
    assert set(kinds) == set(fb.ENTITIES) and min(kinds.values()) > 40
    assert set(Counter(s[2] for d in corpus for s in d["decoys"])) == set(fb.DECOY_KINDS)
    only_decoys = sum(not d["spans"] for d in corpus) / len(corpus)
    assert 0.2 < only_decoys < 0.4
    assert {d["locale"] for d in corpus} == set(fb.LOCALES)


def test_cards_pass_luhn_and_order_numbers_fail_it(corpus):
    from presidio_analyzer.predefined_recognizers import CreditCardRecognizer

    luhn = CreditCardRecognizer().validate_result
    cards = [v for d in corpus for s, e, k, v in d["spans"] if k == "CARD"]
    orders = [v for d in corpus for s, e, k, v in d["decoys"] if k == "ORDER16"]
    assert cards and orders
    assert all(luhn(c.replace(" ", "").replace("-", "")) for c in cards)
    assert not any(luhn(o.replace(" ", "")) for o in orders)
    assert {len(c.replace(" ", "").replace("-", "")) for c in cards} >= {15, 16, 19}


def test_presidio_runs_offline_and_quietly(roster, capfd):
    an = fb.presidio_analyzer(roster[:5])
    found = fb.presidio_findings(an, f"Mail me at jo@example.org, I am {roster[0]}.")
    assert [f[2] for f in found] == ["EMAIL", "PERSON"]
    assert all(0 <= f[3] <= 1 for f in found)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "suffix" not in err.lower(), err


def test_presidio_scores_on_the_corpus(corpus, roster, analyzer):
    findings = [fb.presidio_findings(analyzer, d["text"]) for d in corpus]
    per_entity, per_decoy = fb.span_scores(corpus, findings)
    for entity in ("EMAIL", "CARD", "IP", "PHONE"):
        assert per_entity.loc[entity, "recall"] >= 0.95, per_entity
        assert per_entity.loc[entity, "precision"] >= 0.95, per_entity
    for kind in fb.DECOY_KINDS:
        assert per_decoy.loc[kind, "untouched"] >= 0.95, per_decoy
    # Presidio's phone recogniser alone finds only numbers in assigned ranges (Faker makes fictional ones)
    shipped_phone = fb.presidio_analyzer(roster, extended=False)
    sp, _ = fb.span_scores(corpus, [fb.presidio_findings(shipped_phone, d["text"]) for d in corpus])
    assert sp.loc["PHONE", "recall"] < per_entity.loc["PHONE", "recall"] - 0.05
    # without the plausibility filters, order ids are taken for phone numbers
    _, raw = fb.span_scores(corpus, [fb.presidio_findings(analyzer, d["text"], filters=False) for d in corpus])
    assert raw.loc["ORDER_ID", "untouched"] < 0.5
    # the card pattern Presidio ships stops at 17 digits: the course's second pattern finds the rest
    shipped = fb.presidio_analyzer(roster, extended=False)
    shipped_scores, _ = fb.span_scores(corpus, [fb.presidio_findings(shipped, d["text"]) for d in corpus])
    assert shipped_scores.loc["CARD", "recall"] < per_entity.loc["CARD", "recall"] - 0.1
    # third-party names are not on the deny-list, and are missed
    third = [(d, s) for d in corpus for s in d["spans"] if s[2] == "PERSON" and s[3] not in roster]
    assert third and per_entity.loc["PERSON", "recall"] < 1.0


def test_plausibility_filters(analyzer):
    kinds = lambda text: [(text[s:e], ent) for s, e, ent, _ in fb.presidio_findings(analyzer, text)]  # noqa: E731
    assert kinds("Order ORD-2026-118734 is late.") == []
    assert kinds("Reference 4925 2639 8308 3787 on the invoice.") == []          # 16 digits, not Luhn-valid
    assert kinds("I visited on 3.3.2025.") == [] and kinds("Charged $1,907.00 twice") == []
    found = kinds("Call me on (460)648-7647x5938 or 0115 496 0706.")             # fictional ranges: by shape
    assert ("(460)648-7647x5938", "PHONE") in found and ("0115 496 0706", "PHONE") in found
    assert ("4539 1488 0343 6467", "CARD") in kinds("card 4539 1488 0343 6467 thanks")


def test_span_scores_count_coverage_overlap_and_decoys():
    doc = {"text": "call 555 1234 or order 42", "spans": [(5, 13, "PHONE", "555 1234")],
           "decoys": [(23, 25, "ORDER_ID", "42")]}
    pe, pd_ = fb.span_scores([doc], [[(5, 8, "PHONE", 0.4)]])
    assert pe.loc["PHONE", "recall"] == 0.0 and pe.loc["PHONE", "precision"] == 1.0
    pe, pd_ = fb.span_scores([doc], [[(5, 8, "PHONE", 0.4), (9, 13, "CARD", 1.0), (23, 25, "PHONE", 0.4)]])
    assert pe.loc["PHONE", "recall"] == 1.0                  # covered, whatever the label
    assert pe.loc["PHONE", "precision"] == 0.5 and pd_.loc["ORDER_ID", "untouched"] == 0.0
    assert pe.loc["CARD", "precision"] == 1.0


def test_leaks_and_normalise_text():
    assert fb.leaks("Call +44 20 7946 0018 now", ["+44 (20) 7946-0018", "Ann Lee"]) == ["+44 (20) 7946-0018"]
    assert fb.leaks("ANN LEE wrote", ["Ann Lee"]) == ["Ann Lee"]
    assert fb.leaks("order 1-2-3", ["123"]) == []               # under 7 digits: verbatim only
    assert fb.leaks("ref 4111-1111-1111-1111", ["4111 1111 1111 1111"]) == ["4111 1111 1111 1111"]
    assert fb.normalise_text("  The LATTE was  great!!") == fb.normalise_text("the latte was great.")
    assert fb.normalise_text("Ｃａｆé") == "café"
    assert fb.normalise_text("great") != fb.normalise_text("not great")


def test_request_log_table_is_valid_sql(tmp_path):
    conn = sqlite3.connect(tmp_path / "log.sqlite")
    conn.executescript(fb.REQUEST_LOG)
    cols = [r[1] for r in conn.execute("PRAGMA table_info(requests)")]
    assert cols == ["request_id", "day", "time", "text", "predicted", "p_positive", "latency_ms", "redactions"]


def test_contrast_eval_is_balanced_distinct_and_new():
    rows = fb.contrast_eval(120)
    assert rows == fb.contrast_eval(120) and len({r["text"] for r in rows}) == 120
    assert Counter(r["label"] for r in rows) == {"positive": 60, "negative": 60}
    train = {fb.normalise_text(r["text"]) for r in load_reviews("train") + load_reviews("gold")}
    assert not any(fb.normalise_text(r["text"]) in train for r in rows)


def test_week_traffic(roster):
    week = fb.week_traffic(4, 30, seed=1, spike_day=2, spike_factor=4, roster=roster)
    assert week == fb.week_traffic(4, 30, seed=1, spike_day=2, spike_factor=4, roster=roster)
    per_day = Counter(r["day"] for r in week)
    assert per_day == {0: 30, 1: 30, 2: 120, 3: 30}
    assert len({r["request_id"] for r in week}) == len(week)
    assert [(r["day"], r["second"]) for r in week] == sorted((r["day"], r["second"]) for r in week)
    assert not any(r["stream"] == "contrast" for r in week if r["day"] < 2)
    late = Counter(r["stream"] for r in week if r["day"] >= 2)
    assert 0.2 < late["contrast"] / sum(late.values()) < 0.5
    assert all(v in r["text"] for r in week for v in r["pii"])
    assert 0.15 < sum(bool(r["pii"]) for r in week) / len(week) < 0.45
    names = [v for r in week for v in r["pii"] if not any(c.isdigit() for c in v) and "@" not in v]
    assert names and all(n in roster for n in names)        # reviews are signed by customers


def test_thumbs_down_and_review_rates():
    rng = random.Random(0)
    reqs = [{"request_id": f"r{i}", "label": rng.choice(["positive", "negative"])} for i in range(4000)]
    wrong = {r["request_id"] for r in reqs[:2000]}
    other = {"positive": "negative", "negative": "positive"}
    pred = [other[r["label"]] if r["request_id"] in wrong else r["label"] for r in reqs]
    down = set(fb.thumbs_down(reqs, pred, seed=0))
    assert 0.66 < len(down & wrong) / 2000 < 0.74 and 0.015 < len(down - wrong) / 2000 < 0.045
    truth = {r["request_id"]: r["label"] for r in reqs}
    tags = fb.review(sorted(truth), truth, seed=0)
    assert all(t["source"] == "manual" for t in tags)
    twice = Counter(t["request_id"] for t in tags)
    assert 0.17 < sum(v == 2 for v in twice.values()) / len(twice) < 0.23
    slips = sum(t["correction"] != truth[t["request_id"]] for t in tags) / len(tags)
    assert 0.02 < slips < 0.04


def test_sft_train_learns_and_leaves_the_base(roster):
    import torch

    from brewslm_helpers import models
    from brewslm_helpers.data import sentiment_answer, sentiment_question

    tok = models.load_tokenizer()
    model = models.student_from_config(tok, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ex = [{"prompt": [{"role": "user", "content": sentiment_question(r["text"])}],
           "completion": [{"role": "assistant", "content": sentiment_answer(r["label"])}]}
          for r in load_reviews("train", 8)]
    peft_model, losses = fb.sft_train(model, tok, ex, steps=6, batch_size=4, lr=1e-2, lora_r=4)
    assert len(losses) == 6 and losses[-1] < losses[0]
    base = peft_model.unload()
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
