"""brewslm_helpers.speculative: lesson 14's plumbing (drafts, assisted-generation set-up, tiny models).

Tiny models only: a random Llama over the real tokenizer stands in for the teacher.
"""
from __future__ import annotations

import json

import pytest
import torch

from brewslm_helpers import speculative


@pytest.fixture(scope="module")
def tiny_teacher(tiny_llama_of):
    return tiny_llama_of(3)


def test_to_probs_greedy_is_one_hot_and_sampling_is_softmax():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    assert torch.equal(speculative.to_probs(logits, 0.0), torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    assert torch.allclose(speculative.to_probs(logits, 2.0), torch.softmax(logits / 2.0, -1))
    assert speculative.to_probs(logits.half(), 1.0).dtype == torch.float32


def test_configure_assistant_pins_k(tok):
    with speculative.threads(1):
        target = speculative.tiny_llama(seed=0)
        draft = speculative.noisy_copy(target, 0.5, seed=1)
        speculative.configure_assistant(draft, 3)
        cfg = draft.generation_config
        assert (cfg.num_assistant_tokens, cfg.num_assistant_tokens_schedule,
                cfg.assistant_confidence_threshold) == (3, "constant", 0.0)
        prompt = torch.tensor([[1, 5, 7, 3, 9]])
        plain = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
        assisted = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                                   assistant_model=draft)
        assert torch.equal(plain, assisted)
        # a constant schedule: K is unchanged after the call (the heuristic schedule would move it)
        assert draft.generation_config.num_assistant_tokens == 3


def test_tiny_llama_text_varies_and_noisy_copy():
    with speculative.threads(1):
        m = speculative.tiny_llama(seed=0)
        prompt = torch.tensor([[1, 5, 7, 3, 9]])
        out = m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
        assert len(set(out[0, 5:].tolist())) >= 6, "a useful test target does not repeat one token"
        same = speculative.noisy_copy(m, 0.0)
        assert all(torch.equal(a, b) for a, b in zip(m.parameters(), same.parameters()))
        other = speculative.noisy_copy(m, 0.5, seed=1)
        assert not torch.equal(m.model.layers[0].mlp.up_proj.weight, other.model.layers[0].mlp.up_proj.weight)


def test_threads_restores_the_count():
    before = torch.get_num_threads()
    with speculative.threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_cut_draft_keeps_first_layers_and_head(tiny_teacher):
    draft = speculative.cut_draft(tiny_teacher, 1)
    assert draft.config.num_hidden_layers == 1
    assert torch.equal(draft.lm_head.weight, tiny_teacher.lm_head.weight)
    q_proj = tiny_teacher.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(draft.model.layers[0].self_attn.q_proj.weight, q_proj)


def test_chat_ids_ends_where_the_reply_starts(tok):
    ids = speculative.chat_ids(tok, "Hello")
    assert ids.shape[0] == 1 and ids.dtype == torch.long
    assert tok.decode(ids[0]).rstrip().endswith("assistant")


def test_distilled_draft_is_trained_cached_and_reloaded(tmp_path, monkeypatch, tiny_teacher, tok):
    monkeypatch.setenv("BREWSLM_CACHE", str(tmp_path))
    kw = dict(n_layers=1, steps=3, n_requests=2, max_new_tokens=4, progress=False)
    with speculative.threads(1):
        draft, info = speculative.load_draft(tiny_teacher, tok, **kw)
        assert not info["from_cache"] and len(info["losses"]) == 3
        assert all(not p.requires_grad for p in draft.parameters())
        # embeddings (and the tied head) stay the teacher's; the layer moved
        assert torch.equal(draft.model.embed_tokens.weight, tiny_teacher.model.embed_tokens.weight)
        cut = speculative.cut_draft(tiny_teacher, 1)
        assert not torch.equal(draft.model.layers[0].mlp.up_proj.weight, cut.model.layers[0].mlp.up_proj.weight)
        folders = list((tmp_path / "models").glob("draft-*"))
        assert len(folders) == 1 and json.loads((folders[0] / "info.json").read_text())["steps"] == 3
        again, info2 = speculative.load_draft(tiny_teacher, tok, **kw)
        assert info2["from_cache"]
        assert all(torch.equal(a, b) for a, b in zip(draft.state_dict().values(), again.state_dict().values()))
        plain, info0 = speculative.load_draft(tiny_teacher, tok, n_layers=1, steps=0)
        assert info0["steps"] == 0 and not info0["from_cache"]


def test_distillation_lowers_the_kl(tiny_teacher):
    with speculative.threads(1):
        draft = speculative.cut_draft(tiny_teacher, 1)
        torch.manual_seed(0)
        seqs = [torch.randint(0, 1000, (12,)) for _ in range(4)]
        losses = speculative.distill_draft(draft, tiny_teacher, seqs, [4] * 4, steps=20, lr=3e-3, batch_size=4,
                                           progress=False)
        assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_tokens_per_second_is_best_of_n():
    calls = []

    def fn():
        calls.append(1)
        return 10

    tps, seconds = speculative.tokens_per_second(fn, repeats=3)
    assert len(calls) == 3 and seconds > 0 and tps == pytest.approx(10 / seconds)
