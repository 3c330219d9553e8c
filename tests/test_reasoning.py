"""Lesson 15's plumbing: the word-problem data and its generator, traces, injected errors, reward-head
features, intervals, and the TRL GRPO references the exercises are checked against."""
from __future__ import annotations

import random
import re

import pytest
import torch

from brewslm_helpers import reasoning
from brewslm_helpers.data import DATA_DIR, make_reasoning_data


def _evaluate(expr: str) -> int:
    a, op, b = expr.split()
    a, b = int(a), int(b)
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]


def test_generator_is_byte_reproducible(tmp_path):
    paths = make_reasoning_data.write(tmp_path)
    for split, path in paths.items():
        assert path.read_bytes() == (DATA_DIR / f"reasoning_{split}.jsonl").read_bytes(), split


def test_data_sizes_levels_and_arithmetic():
    train, test = reasoning.load_reasoning_data("train"), reasoning.load_reasoning_data("test")
    assert len(train) == 600 and len(test) == 150
    for rows, per_level in ((train, 200), (test, 50)):
        for level in (1, 2, 3):
            assert sum(r["level"] == level for r in rows) == per_level
        for r in rows:
            assert len(r["steps"]) == r["level"]
            value = int(r["steps"][0]["expr"].split()[0])
            for s in r["steps"]:
                assert int(s["expr"].split()[0]) == value  # each step starts from the previous result
                value = _evaluate(s["expr"])
                assert value == s["value"] and 1 <= value <= 99
                if "/" in s["expr"]:
                    a, _, b = s["expr"].split()
                    assert int(a) % int(b) == 0
            assert r["answer"] == value
    assert len(reasoning.load_reasoning_data("test", 5)) == 5
    with pytest.raises(ValueError):
        reasoning.load_reasoning_data("dev")


def test_test_split_is_held_out():
    train, test = reasoning.load_reasoning_data("train"), reasoning.load_reasoning_data("test")
    words = lambda rows: {w for r in rows for w in re.findall(r"[A-Za-z]+", r["question"])}  # noqa: E731
    train_words = words(train)
    for name, _, _ in make_reasoning_data.TEST_NAMES:
        assert name not in train_words
    for item in make_reasoning_data.TEST_ITEMS:
        assert item not in train_words
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert not any("sorts them into" in r["question"] for r in train)
    assert any("sorts them into" in r["question"] for r in test)


def test_trace_format_and_parsing():
    row = {"question": "q", "steps": [{"expr": "12 + 5", "value": 17}, {"expr": "17 - 3", "value": 14}], "answer": 14}
    trace = reasoning.format_trace(row["steps"], row["answer"])
    assert trace == "Step 1: 12 + 5 = 17\nStep 2: 17 - 3 = 14\nAnswer: 14"
    assert reasoning.target(row, cot=False) == "Answer: 14"
    assert reasoning.format_ok(trace) and reasoning.format_ok("Answer: 3")
    assert not reasoning.format_ok(trace + "\nThat's it!") and not reasoning.format_ok("The answer is 14")
    assert not reasoning.format_ok("") and not reasoning.format_ok("Step 1: 3 + 4 =\nAnswer: 7")
    assert reasoning.step_values(trace) == [17, 14]
    assert reasoning.step_values("Step 1: 3 + 4 =\nnoise = 5\nStep 2: 7 * 2 = 1,4") == [None, 14]
    ex = reasoning.sft_examples([row])[0]
    assert ex["prompt"][0]["content"] == reasoning.SYSTEM and ex["completion"][0]["content"] == trace
    assert reasoning.grpo_examples([row])[0]["answer"] == 14
    # fine-tuned models are prompted zero-shot; the base model gets the worked example (1-shot)
    assert [m["role"] for m in ex["prompt"]] == ["system", "user"] and ex["prompt"][1]["content"] == "q"
    one_shot = reasoning.messages("q", shots=1)
    assert [m["role"] for m in one_shot] == ["system", "user", "assistant", "user"]
    assert one_shot[2]["content"] == reasoning.EXAMPLE_TRACE and one_shot[-1]["content"] == "q"
    assert reasoning.grpo_examples([row], shots=1)[0]["prompt"] == one_shot
    with pytest.raises(ValueError, match="shots"):
        reasoning.messages("q", shots=2)


def test_corrupt_injects_one_error_and_carries_it():
    rng = random.Random(0)
    kinds = set()
    for row in reasoning.load_reasoning_data("train", 120):
        gold = [s["value"] for s in row["steps"]]
        bad = reasoning.corrupt(row, rng)
        kinds.add(bad["kind"])
        k = bad["error_step"]
        assert bad["values"][:k] == gold[:k] and bad["values"][k] != gold[k], (row, bad)
        assert reasoning.step_values(bad["trace"]) == bad["values"]
        assert bad["trace"].endswith(f"Answer: {bad['values'][-1]}") and reasoning.format_ok(bad["trace"])
        # later steps are computed correctly from the wrong value (the error propagates)
        for line, value in zip(bad["trace"].splitlines()[k + 1:-1], bad["values"][k + 1:]):
            assert _evaluate(line.split(": ", 1)[1].split(" =")[0]) == value
    assert kinds == {"slip", "operand", "operator"}


def test_step_end_chars():
    trace = "Step 1: 12 + 5 = 17\nStep 2: 17 - 3 = 14\nAnswer: 14"
    ends = reasoning.step_end_chars(trace)
    assert [trace[i] for i in ends] == ["7", "4", "4"]
    assert ends[0] == trace.index("\n") - 1 and ends[-1] == len(trace) - 1
    assert reasoning.step_end_chars("Answer: 5  \n") == [8]


def test_trace_features_and_head(tok, tiny_llama_of):
    tiny_llama = tiny_llama_of(1)
    feats = reasoning.trace_features(tiny_llama, tok, ["q one", "q two"],
                                     ["Step 1: 1 + 2 = 3\nAnswer: 3", "Answer: 4"], batch_size=2)
    assert [tuple(f.shape) for f in feats] == [(2, tiny_llama.config.hidden_size), (1, tiny_llama.config.hidden_size)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=gen)
    y = (x[:, 0] > 0).long()
    head = reasoning.train_head(x, y, steps=200)
    p = head(x).detach()
    assert p.shape == (200,) and reasoning.auc(p.numpy(), y.numpy()) > 0.95


def test_auc_and_intervals():
    assert reasoning.auc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert reasoning.auc([0.5, 0.5], [1, 0]) == 0.5
    assert reasoning.auc([0.1, 0.2], [1, 1]) != reasoning.auc([0.1, 0.2], [1, 1])  # nan
    lo, hi = reasoning.wilson(50, 100)
    assert lo == pytest.approx(0.404, abs=1e-3) and hi == pytest.approx(0.596, abs=1e-3)
    assert reasoning.wilson(0, 10)[0] == 0.0 and reasoning.wilson(0, 0) == (0.0, 1.0)
    d, lo, hi = reasoning.paired_bootstrap([1, 1, 1, 0] * 10, [0, 1, 0, 0] * 10)
    assert d == pytest.approx(0.5) and lo < d < hi and lo > 0
    m, lo, hi = reasoning.bootstrap_mean([1, 0] * 20)
    assert m == 0.5 and lo < 0.5 < hi


def test_trl_advantages_reference():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = reasoning.trl_advantages(r, 4, "group")
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased
    assert torch.allclose(adv[:4], (torch.tensor([1.0, 0.0, 0.0, 1.0]) - 0.5) / (std + 1e-4))
    assert (adv[4:] == 0).all()
    assert torch.allclose(reasoning.trl_advantages(r, 4, "none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    batch = reasoning.trl_advantages(r, 4, "batch")
    assert torch.allclose(batch[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (r.std() + 1e-4))
    with pytest.raises(ValueError):
        reasoning.trl_advantages(r, 4, "global")


def test_trl_grpo_loss_reference(tok):
    trainer = reasoning.trl_loss_trainer(tok)
    gen = torch.Generator().manual_seed(0)
    logps = -torch.rand(3, 4, generator=gen)
    adv = torch.tensor([1.0, -0.5, 0.25])
    mask = torch.ones(3, 4)
    # on policy, no KL: minus the mean advantage, for every normalisation
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        got = reasoning.trl_grpo_loss(trainer, logps, logps, logps, adv, mask, beta=0.0, loss_type=loss_type)
        assert float(got) == pytest.approx(-float(adv.mean()), abs=1e-6)
    # the KL term alone (zero advantages): k3 of the policy against the reference, token mean
    ref = logps + 0.3
    got = reasoning.trl_grpo_loss(trainer, logps, logps, ref, torch.zeros(3), mask, beta=1.0, loss_type="bnpo")
    k3 = torch.exp(ref - logps) - (ref - logps) - 1
    assert float(got) == pytest.approx(float(k3.mean()), abs=1e-6)
    # a clipped ratio with a positive advantage: the gain stops at 1 + epsilon
    got = reasoning.trl_grpo_loss(trainer, logps + 1.0, logps, logps, torch.ones(3), mask, beta=0.0, loss_type="bnpo")
    assert float(got) == pytest.approx(-1.2, abs=1e-6)
