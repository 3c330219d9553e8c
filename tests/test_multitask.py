"""Lesson 7's helpers (brewslm_helpers.multitask) and its shipped arithmetic data."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from brewslm_helpers import multitask
from brewslm_helpers.data import DATA_DIR, make_arith_data
from brewslm_helpers.distill import IGNORE_INDEX


def test_arith_data_is_reproducible_byte_for_byte(tmp_path):
    written = make_arith_data.write(tmp_path)
    for path in written:
        assert path.read_bytes() == (DATA_DIR / path.name).read_bytes(), f"{path.name} differs: rerun the generator"


def test_arith_data_schema_sizes_and_held_out():
    train, test = multitask.load_arith("train"), multitask.load_arith("test")
    assert len(train) == 4000 and len(test) == 200
    for rows, per in ((train, 1000), (test, 50)):
        for d in (1, 2, 3, 4):
            assert sum(r["digits"] == d for r in rows) == per
        for r in rows:
            assert r["answer"] == str(r["a"] + r["b"]) and r["question"] == f"{r['a']}+{r['b']}="
            assert max(len(str(r["a"])), len(str(r["b"]))) == r["digits"]
    assert not {(r["a"], r["b"]) for r in train} & {(r["a"], r["b"]) for r in test}
    with pytest.raises(ValueError):
        multitask.load_arith("gold")


def test_task_rows_formats():
    sizes = {t: (len(multitask.task_rows(t, "train")), len(multitask.task_rows(t, "eval"))) for t in multitask.TASKS}
    assert sizes == {"arith": (4000, 200), "sentiment": (600, 120), "tool": (400, 80)}
    tool = multitask.task_rows("tool", "train")
    assert {r["answer"] for r in tool} == {" get_weather", " get_time", " convert_currency", " set_timer", " none"}
    sent = multitask.task_rows("sentiment", "eval")[0]
    assert sent["prompt"].endswith("\nSentiment:") and sent["answer"] in (" positive", " negative")
    assert multitask.task_rows("arith", "train")[0]["prompt"].startswith("Add: ")
    with pytest.raises(ValueError):
        multitask.task_rows("poetry", "train")
    with pytest.raises(ValueError):
        multitask.task_rows("arith", "test")


def tiny_model(seed=0, vocab=50):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.get_input_embeddings().weight.requires_grad_(False)
    return model


def fake_examples(n, seed=0, vocab=50):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        n_prompt = int(torch.randint(2, 6, (1,), generator=g))
        n_answer = int(torch.randint(1, 4, (1,), generator=g))
        ids = torch.randint(1, vocab, (n_prompt + n_answer,), generator=g).tolist()
        out.append(multitask.Example(ids, n_prompt))
    return out


def test_make_batch_labels_only_the_answer():
    ex = [multitask.Example([5, 6, 7, 8, 9], 3), multitask.Example([1, 2, 3], 2)]
    batch = multitask.make_batch(ex, pad_id=0)
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 8, 9, IGNORE_INDEX],
                                        [IGNORE_INDEX, 3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]


def test_answer_losses_match_full_logits():
    model = tiny_model().eval()
    examples = fake_examples(6)
    batch = multitask.make_batch(examples, pad_id=0)
    nll, exact, counts = multitask.answer_losses(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for b, e in enumerate(examples):
        n_answer = len(e.ids) - e.n_prompt
        assert int(counts[b]) == n_answer
        pos = torch.arange(e.n_prompt - 1, len(e.ids) - 1)
        target = torch.tensor(e.ids[e.n_prompt:])
        ref = torch.nn.functional.cross_entropy(logits[b, pos], target)
        assert torch.allclose(nll[b], ref, atol=1e-5)
        assert bool(exact[b]) == bool((logits[b, pos].argmax(-1) == target).all())


def test_evaluate_and_train_reduce_the_loss():
    model = tiny_model()
    data = {"x": fake_examples(8, seed=1), "y": fake_examples(8, seed=2)}
    before = multitask.evaluate(model, data["x"], pad_id=0)
    assert 0 <= before["accuracy"] <= 1 and len(before["correct"]) == 8
    schedule = [[("x", i % 8), ("y", (i + 3) % 8)] * 2 for i in range(40)]
    result = multitask.train(model, data, schedule, pad_id=0, lr=1e-2, eval_sets={"x": data["x"]},
                             eval_every=10, progress=False)
    assert len(result.losses) == 40 and result.losses[-1] < result.losses[0]
    assert [s for s, _, _ in result.curves["x"]] == [0, 10, 20, 30, 40]
    assert result.final["x"]["loss"] < before["loss"]
    assert len(result.task_losses["y"]) == 40


def test_pcgrad_step_equals_sum_without_conflict_and_runs_with_one():
    data = {"x": fake_examples(4, seed=3), "y": fake_examples(4, seed=4)}
    schedule = [[("x", 0), ("x", 1), ("y", 0), ("y", 1)]]
    a, b = tiny_model(), tiny_model()
    ra = multitask.train(a, data, schedule, pad_id=0, lr=1e-2, combine="sum", progress=False)
    rb = multitask.train(b, data, schedule, pad_id=0, lr=1e-2, combine="pcgrad", progress=False)
    assert ra.losses == rb.losses
    if rb.conflicts == 0:  # no conflicting pair: PCGrad is the plain sum
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p, q, atol=1e-6)
    with pytest.raises(ValueError):
        multitask.train(a, data, schedule, pad_id=0, combine="mean")


def test_pcgrad_algorithm():
    torch.manual_seed(0)
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(multitask.pcgrad(g), g.sum(0))  # no conflict: the plain sum
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    # g1 projected off g2: [1,0] - (-1/2)[-1,1] = [0.5, 0.5]; g2 off g1: [-1,1] - (-1)[1,0] = [0, 1]
    assert torch.allclose(multitask.pcgrad(g), torch.tensor([0.5, 1.5], dtype=torch.float64))


def test_pcgrad_matches_torchjd():
    aggregation = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(1)
    for trial in range(10):
        G = torch.randn(4, 30, generator=gen, dtype=torch.float64)
        G[1] = -G[0] + 0.2 * G[1]
        torch.manual_seed(trial)
        ours = multitask.pcgrad(G)
        torch.manual_seed(trial)
        ref = aggregation.PCGrad()(G)
        assert torch.allclose(ours, ref, atol=1e-10)


def test_task_gradients_shapes_and_no_update():
    model = tiny_model()
    data = {"x": fake_examples(8, seed=5), "y": fake_examples(8, seed=6)}
    before = [p.detach().clone() for p in model.parameters()]
    grads = multitask.task_gradients(model, data, pad_id=0, n=4)
    params = multitask.shared_parameters(model)
    assert list(grads) == ["x", "y"]
    for gs in grads.values():
        assert [g.shape for g in gs] == [p.shape for p in params]
        assert any(float(g.abs().sum()) > 0 for g in gs)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_t_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    d = [0.03, -0.01, 0.05, 0.02, 0.04]
    mean, low, high = multitask.t_interval(d)
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert math.isclose(mean, sum(d) / 5) and math.isclose(low, ci.low) and math.isclose(high, ci.high)
    assert all(math.isnan(x) for x in multitask.t_interval([0.1])[1:])
