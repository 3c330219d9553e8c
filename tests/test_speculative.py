"""brewslm_helpers.speculative: lesson 14's plumbing (drafts, assisted-generation set-up, tiny models).

Tiny models only: a random Llama over the real tokenizer stands in for the teacher.
"""
from __future__ import annotations

import json

import numpy as np
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


def _hf_proposer(K_max_ngram=3, eos=None):
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    def propose(context, K):
        gen = PromptLookupCandidateGenerator(eos_token_id=None if eos is None else torch.tensor([eos]),
                                             num_output_tokens=K, max_matching_ngram_size=K_max_ngram,
                                             max_length=10 ** 9)
        ids, _ = gen.get_candidates(torch.tensor([context]))
        return ids[0, len(context):].tolist()
    return propose


def test_replay_greedy_rounds_by_hand():
    reply = [5, 6, 7, 8, 9]
    oracle = lambda ctx, K: reply[len(ctx) - 3:len(ctx) - 3 + K]  # noqa: E731 (the true continuation)
    for K in (1, 2, 4):
        st = speculative.replay_greedy_rounds([1, 2, 3], reply, oracle, K, max_new_tokens=64)
        rounds = -(-len(reply) // (K + 1))
        assert st["rounds"] == rounds and st["accepted"] == len(reply) - rounds, (K, st)
        assert st["kept"][:-1] == [K] * (rounds - 1)
    st = speculative.replay_greedy_rounds([1, 2, 3], reply, lambda ctx, K: [], 3, max_new_tokens=64)
    assert (st["rounds"], st["drafted"], st["accepted"]) == (5, 0, 0)
    wrong = speculative.replay_greedy_rounds([1, 2, 3], reply, lambda ctx, K: [0] * K, 3, max_new_tokens=64)
    assert (wrong["rounds"], wrong["drafted"], wrong["accepted"]) == (5, 15, 0)
    # with one token left to generate, nothing is proposed (transformers does the same)
    st = speculative.replay_greedy_rounds([1, 2, 3], reply, oracle, 1, max_new_tokens=5)
    assert st["proposed"] == [1, 1, 0] and st["rounds"] == 3


def test_replay_counts_the_target_forwards_of_prompt_lookup_generate():
    with speculative.threads(1):
        target = speculative.tiny_llama(vocab_size=12, seed=3)   # a small vocabulary: n-grams repeat
        calls = []
        hook = target.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)
        try:
            for seed, K in [(0, 2), (1, 4), (2, 8)]:
                prompt = torch.randint(0, 12, (1, 30), generator=torch.Generator().manual_seed(seed))
                kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
                plain = target.generate(prompt, **kw)
                calls.clear()
                looked = target.generate(prompt, **kw, prompt_lookup_num_tokens=K, max_matching_ngram_size=3)
                assert torch.equal(plain, looked)
                reply = plain[0, 30:].tolist()
                st = speculative.replay_greedy_rounds(prompt[0].tolist(), reply, _hf_proposer(3), K, 24)
                assert st["rounds"] == len(calls), (K, st["rounds"], len(calls))
                assert st["accepted"] == 24 - st["rounds"] and st["drafted"] > 0
        finally:
            hook.remove()


def test_tool_call_prompt_and_bootstrap(tok):
    from brewslm_helpers import tools

    shots = speculative.few_shot_rows(tools.load_tool_data("train"))
    assert [s["call"]["name"] if s["call"] else None for s in shots] == list(speculative.FEW_SHOT_KINDS)
    msgs = speculative.tool_call_messages("Weather in Oslo?", shots)
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * len(shots) + ["user"]
    assert msgs[2]["content"] == tools.target_reply(shots[0]) and msgs[-1]["content"] == "Weather in Oslo?"
    ids = speculative.tool_call_ids(tok, "Weather in Oslo?", shots)
    assert ids.shape[0] == 1 and tok.decode(ids[0]).endswith("<|im_start|>assistant\n")
    x = [1.0, 2.0, 3.0, 4.0, 10.0]
    lo, hi = speculative.bootstrap_interval(lambda a: float(np.mean(a)), x)
    assert lo <= np.mean(x) <= hi and lo >= 1.0 and hi <= 10.0
    assert all(np.isnan(v) for v in speculative.bootstrap_interval(lambda a: float(np.mean(a)), [1.0]))
