"""Lesson 13 plumbing: calibration text, gating units to zero, timing, block influence, recovery.

What is here (none of it is an exercise's answer):
- ``calibration_texts``: paragraphs the unpruned model writes itself (greedy, from a fixed list of
  topics), cached under ``artifact_dir(budget)``; they are the calibration set of the gradient scores
  and the recovery set (sequence-level distillation). The held-out texts are never used for either.
- ``token_batches`` / ``lm_loss``: right-padded next-token batches and their mean loss;
- ``gate_units``: the *reference* for removal: the unpruned model with chosen MLP channels and query
  heads multiplied by zero (forward pre-hooks on ``down_proj`` and ``o_proj``), nothing removed;
- ``perplexity``, ``param_count``, ``weight_bytes``, ``speeds`` (decode and prefill tokens/s measured
  side by side, interleaved), ``sparse_vs_dense`` (``torch.sparse`` CSR against a dense matmul);
- ``block_influence``: how much each decoder block changes its input (1 - cosine, ShortGPT's measure);
- ``drop_layers`` (``models.cut_student``), ``save_and_reload``;
- ``lora_recover``: a short LoRA pass with TRL's ``SFTTrainer`` on the calibration paragraphs, merged
  back so the pruned shapes stay plain ``nn.Linear``; ``kd_recover``: the same LoRA adapters trained on
  the unpruned model's logits (forward KL at every token) instead of its sampled text;
- ``tiny_llama``: a small random Llama (GQA, 4 query heads over 2 KV heads) for tests.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from .paths import artifact_dir

CALIBRATION_FILE = "pruning_calibration.jsonl"

# Topics of the calibration / recovery paragraphs. Everyday prose, like the held-out texts, but the
# held-out texts themselves are never shown to the pruning scores or the recovery pass.
TOPICS = [
    "a lighthouse keeper's ordinary day", "how bread rises", "a train journey through the mountains",
    "the first day at a new school", "why leaves change colour in autumn", "a small fishing harbour",
    "learning to ride a bicycle", "a market on a Saturday morning", "how a bridge is built",
    "a thunderstorm in summer", "the history of the postal service", "keeping bees in a garden",
    "a library late in the evening", "how glass is made", "a walk along a frozen lake",
    "an old clock repair shop", "how rivers shape valleys", "a family dinner on a holiday",
    "the life of a city pigeon", "planting a vegetable garden", "a ferry crossing in fog",
    "how paper is recycled", "a night at an observatory", "the work of a village doctor",
    "a snowy mountain village", "how a violin is made", "a bakery before dawn", "the migration of birds",
    "a football match in the rain", "how a lock on a canal works", "a museum of old machines",
    "a road trip across a desert", "the smell of a forest after rain", "how tea is grown and dried",
    "a child's first visit to the sea", "a busy airport at night", "how volcanoes form islands",
    "an evening class in painting", "the care of old books", "a farmer's year", "how salt is harvested",
    "a carpenter building a table", "the moon and the tides", "a street musician in winter",
    "how a newspaper was printed", "a garden in early spring", "a long-distance runner's training",
    "the building of a cathedral", "a quiet railway station", "how cheese is made",
    "a storm at sea", "a visit to grandparents in the countryside", "how maps were drawn by hand",
    "the history of the bicycle", "a picnic by a river", "how a beehive is organised",
    "a fire station on a quiet day", "an island with no cars", "the making of a wool sweater",
    "a city park at dawn", "how a windmill grinds grain", "a school play", "the last day of summer",
    "a mountain hut in a blizzard", "how coral reefs grow", "a second-hand bookshop",
    "the invention of the telephone", "a harvest festival", "how a sailing boat moves against the wind",
    "a cat that lives in a shop", "the work of a lighthouse lens", "a rainy afternoon indoors",
    "how chocolate is made", "a hiking trail along the coast", "the history of street lamps",
    "a village bakery competition", "how a piano produces sound", "a winter market", "a kite festival",
    "how ice forms on a pond",
]


# ----------------------------------------------------------------------------------------------
# Calibration text and batches
# ----------------------------------------------------------------------------------------------

def calibration_texts(model, tokenizer, n: int, max_new_tokens: int, budget: str,
                      batch_size: int = 16) -> list[str]:
    """``n`` paragraphs written by ``model`` (greedy), one per topic of ``TOPICS``, cached.

    The cache (``artifact_dir(budget)/pruning_calibration.jsonl``) is reused when it holds at least
    ``n`` paragraphs written with the same ``max_new_tokens``; otherwise they are generated again
    (about a second per paragraph of 128 tokens on two cores, batched).
    """
    from .evaluation import generate_chat_replies
    if n > len(TOPICS):
        raise ValueError(f"at most {len(TOPICS)} calibration texts (one per topic), asked for {n}")
    path = artifact_dir(budget) / CALIBRATION_FILE
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if len(rows) >= n and all(r["max_new_tokens"] == max_new_tokens for r in rows):
            return [r["text"] for r in rows[:n]]
    conversations = [[{"role": "user", "content": f"Write a short paragraph about {t}."}] for t in TOPICS[:n]]
    texts = generate_chat_replies(model, tokenizer, conversations, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, desc="calibration text")
    path.write_text("".join(json.dumps({"topic": t, "max_new_tokens": max_new_tokens, "text": x}) + "\n"
                            for t, x in zip(TOPICS, texts)))
    return texts


def token_batches(tokenizer, texts: list[str], max_tokens: int, batch_size: int) -> list[dict]:
    """Right-padded batches ``{"input_ids", "attention_mask", "labels"}`` (``[B, T]`` long tensors).

    Texts are tokenized without special tokens and cut to ``max_tokens``; ``labels`` are the input ids
    with padding set to -100 (transformers shifts them inside the model).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        length = max(len(x) for x in chunk)
        input_ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), length, dtype=torch.long)
        for row, x in enumerate(chunk):
            input_ids[row, :len(x)] = torch.tensor(x)
            mask[row, :len(x)] = 1
        out.append({"input_ids": input_ids, "attention_mask": mask,
                    "labels": input_ids.masked_fill(mask == 0, -100)})
    return out


def lm_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on one ``token_batches`` batch (a scalar tensor)."""
    return model(**batch).loss


# ----------------------------------------------------------------------------------------------
# The reference for removal: units gated to zero
# ----------------------------------------------------------------------------------------------

@contextmanager
def gate_units(model, mlp_keep: dict[int, torch.Tensor] | None = None,
               head_keep: dict[int, torch.Tensor] | None = None):
    """``with gate_units(model, mlp_keep={layer: kept channels}, head_keep={layer: kept query heads}):``
    runs ``model`` with every other MLP channel / query head of those layers multiplied by zero.

    Nothing is removed: a forward pre-hook zeroes the input columns of ``down_proj`` (the channel's
    activation) and the head's slice of the input of ``o_proj`` (the head's attention output). The
    pruned model must give the same output as this.
    """
    handles = []
    layers = model.model.layers

    def masker(mask):
        def hook(module, args):
            return (args[0] * mask.to(args[0].dtype),) + tuple(args[1:])
        return hook
    try:
        for i, keep in (mlp_keep or {}).items():
            mask = torch.zeros(layers[i].mlp.down_proj.in_features)
            mask[torch.as_tensor(keep, dtype=torch.long)] = 1.0
            handles.append(layers[i].mlp.down_proj.register_forward_pre_hook(masker(mask)))
        for i, keep in (head_keep or {}).items():
            attn = layers[i].self_attn
            head_mask = torch.zeros(attn.o_proj.in_features // attn.head_dim)
            head_mask[torch.as_tensor(keep, dtype=torch.long)] = 1.0
            handles.append(attn.o_proj.register_forward_pre_hook(masker(head_mask.repeat_interleave(attn.head_dim))))
        yield model
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------
# Sizes, perplexity, speed
# ----------------------------------------------------------------------------------------------

def param_count(model) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def weight_bytes(model) -> int:
    """Bytes of the distinct parameters as stored in memory."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def perplexity(model, ids_per_text: list[list[int]]) -> float:
    """exp(mean next-token NLL) of ``model`` over the token-id lists (one forward pass per text)."""
    model.eval()
    nll, count = 0.0, 0
    for ids in ids_per_text:
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
        count += len(ids) - 1
    return math.exp(nll / count)


@torch.no_grad()
def _decode_seconds(model, prompt: torch.Tensor, n_new: int) -> tuple[float, float]:
    """(prefill seconds, seconds per decode step) of one greedy ``generate``."""
    from .timing import timed_generate
    _, start, times = timed_generate(model, prompt, n_new + 1)
    return times[0] - start, (times[-1] - times[0]) / n_new


@torch.no_grad()
def speeds(models: dict, prompt_ids: list[int], n_new: int, repeats: int = 3,
           prefill_tokens: int = 256) -> pd.DataFrame:
    """Decode and prefill tokens/s of each model, measured side by side.

    The models take turns (round robin, ``repeats`` rounds, after one warm-up round) so a busy machine
    slows them alike; each figure is the median over rounds. Decode: greedy ``generate`` with the KV
    cache after a ``len(prompt_ids)``-token prompt. Prefill: one forward pass over ``prefill_tokens``
    tokens (the prompt repeated). Columns: ``decode tok/s``, ``prefill tok/s`` (index: the names).
    """
    prompt = torch.tensor([prompt_ids])
    long = torch.tensor([(prompt_ids * (prefill_tokens // len(prompt_ids) + 1))[:prefill_tokens]])
    decode = {k: [] for k in models}
    prefill = {k: [] for k in models}
    for round_ in range(repeats + 1):
        for name, model in models.items():
            model.eval()
            _, step = _decode_seconds(model, prompt, n_new)
            start = time.perf_counter()
            model(input_ids=long)
            seconds = time.perf_counter() - start
            if round_:
                decode[name].append(1.0 / step)
                prefill[name].append(prefill_tokens / seconds)
    return pd.DataFrame({"decode tok/s": {k: float(np.median(v)) for k, v in decode.items()},
                         "prefill tok/s": {k: float(np.median(v)) for k, v in prefill.items()}})


def sparse_vs_dense(shapes: dict[str, tuple[int, int]], sparsities: list[float], n_cols: list[int],
                    repeats: int = 20, seed: int = 0) -> pd.DataFrame:
    """Time ``W @ X`` dense against ``torch.sparse`` CSR for weights ``[out, in]`` with a fraction
    ``sparsity`` of entries set to zero (the smallest by magnitude: unstructured pruning).

    ``n_cols``: the number of columns of ``X`` (1 = a decode step, many = a prefill). Each row of the
    result: shape name, sparsity, columns, dense and sparse milliseconds (the best of ``repeats``,
    interleaved), and ``speed-up`` = dense / sparse.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []

    def best_ms(a, b) -> tuple[float, float]:
        """Best-of-``repeats`` milliseconds of ``a @ b`` for dense ``a`` and its CSR copy, in turn."""
        sparse, best = a.to_sparse_csr(), [float("inf"), float("inf")]
        for _ in range(repeats):
            for i, w in enumerate((a, sparse)):
                start = time.perf_counter()
                w @ b
                best[i] = min(best[i], time.perf_counter() - start)
        return best[0] * 1e3, best[1] * 1e3
    for name, (n_out, n_in) in shapes.items():
        w = torch.randn(n_out, n_in, generator=gen)
        for sparsity in sparsities:
            k = int(round(sparsity * w.numel()))
            threshold = w.abs().flatten().kthvalue(max(k, 1)).values
            pruned = torch.where(w.abs() > threshold, w, torch.zeros(()))
            for cols in n_cols:
                x = torch.randn(n_in, cols, generator=gen)
                assert torch.allclose(pruned.to_sparse_csr() @ x, pruned @ x, atol=1e-3)
                dense_ms, sparse_ms = best_ms(pruned, x)
                rows.append({"matrix": name, "shape": f"{n_out}x{n_in}", "sparsity": sparsity, "columns": cols,
                             "dense ms": dense_ms, "sparse CSR ms": sparse_ms, "speed-up": dense_ms / sparse_ms})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def block_influence(model, batches: list[dict]) -> torch.Tensor:
    """``[L]``: mean over real tokens of 1 - cos(block input, block output) for each decoder block.

    A block that barely turns its input (influence near 0) can be dropped with little change to the
    residual stream (Men et al. 2024, "ShortGPT"). Read from ``output_hidden_states``: hidden state
    ``i`` is block ``i``'s input and ``i + 1`` its output (the last one is after the final norm, so
    the last block is measured on the pre-norm output, captured with a hook).
    """
    model.eval()
    n = model.config.num_hidden_layers
    total, count = torch.zeros(n), 0
    last = {}
    handle = model.model.layers[-1].register_forward_hook(
        lambda module, args, out: last.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    try:
        for batch in batches:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True)
            hs = list(out.hidden_states[:n]) + [last["h"]]
            mask = batch["attention_mask"].bool()
            for i in range(n):
                cos = torch.nn.functional.cosine_similarity(hs[i][mask].float(), hs[i + 1][mask].float(), dim=-1)
                total[i] += (1 - cos).sum()
            count += int(mask.sum())
    finally:
        handle.remove()
    return total / count


def drop_layers(model, drop: list[int]) -> LlamaForCausalLM:
    """A copy of ``model`` without the decoder blocks ``drop`` (config updated; see ``models.cut_student``)."""
    from .models import cut_student
    keep = [i for i in range(model.config.num_hidden_layers) if i not in set(drop)]
    return cut_student(model, keep).eval()


def save_and_reload(model, folder: str | Path | None = None, tokenizer=None):
    """``save_pretrained`` then ``AutoModelForCausalLM.from_pretrained``: ``(reloaded model, folder)``."""
    folder = Path(folder or tempfile.mkdtemp(prefix="brewslm-13-"))
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=next(model.parameters()).dtype).eval(), folder


# ----------------------------------------------------------------------------------------------
# Recovery: LoRA with TRL's SFTTrainer, merged back
# ----------------------------------------------------------------------------------------------

def _lora_config(r: int):
    """Rank-``r`` LoRA on every projection of a Llama (alpha 2r, no dropout): both recoveries use it."""
    from peft import LoraConfig
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def lora_recover(model, tokenizer, texts: list[str], steps: int, batch_size: int = 8, lr: float = 1e-3,
                 r: int = 16, max_length: int = 160, seed: int = 0):
    """Train LoRA adapters on every projection of ``model`` on plain ``texts`` (next-token loss, TRL
    ``SFTTrainer``), then merge them: returns ``(merged model, losses per step, seconds)``.

    The texts are the unpruned model's own paragraphs, so this is sequence-level distillation from the
    unpruned model. Merging (``merge_and_unload``) folds ``B @ A`` into each weight: the result has the
    pruned shapes and plain ``nn.Linear`` layers, so it saves and reloads like any Llama.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    lora = _lora_config(r)
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="brewslm-13-lora-"), use_cpu=True, bf16=False,
                     gradient_checkpointing=False, seed=seed, max_steps=steps, per_device_train_batch_size=batch_size,
                     learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=min(5, steps // 5),
                     max_length=max_length, logging_steps=1, save_strategy="no", report_to="none",
                     dataloader_num_workers=0, disable_tqdm=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"text": t} for t in texts]),
                         processing_class=tokenizer, peft_config=lora)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    merged = trainer.model.merge_and_unload()
    merged.eval()
    return merged, losses, seconds


def kd_recover(model, teacher, tokenizer, texts: list[str], steps: int, batch_size: int = 8,
               lr: float = 1e-3, r: int = 16, max_length: int = 160, seed: int = 0):
    """LoRA adapters (PEFT, every projection) trained to match the unpruned ``teacher``'s next-token
    distribution at every real token of ``texts``: the forward KL(teacher || student) at T = 1,
    averaged over tokens (logit distillation). AdamW, linear warm-up then cosine decay, as
    ``lora_recover``; the texts are reshuffled each pass. Merged back, so the pruned shapes stay plain
    ``nn.Linear``. Returns ``(merged model, KL per step in nats/token, seconds)``.
    """
    import torch.nn.functional as F
    from peft import get_peft_model
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    lora = _lora_config(r)
    student = get_peft_model(model, lora)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warm = min(5, steps // 5)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warm) if s < warm
        else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    order, batches, losses = torch.Generator().manual_seed(seed), [], []
    teacher.eval()
    student.train()
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc="KD recovery", leave=False):
        if not batches:  # a new pass over the texts, in a new order
            perm = torch.randperm(len(texts), generator=order).tolist()
            batches = token_batches(tokenizer, [texts[i] for i in perm], max_length, batch_size)[::-1]
        batch = batches.pop()
        real = batch["attention_mask"].bool()
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=batch["input_ids"],
                                           attention_mask=batch["attention_mask"]).logits[real], dim=-1)
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[real]
        loss = F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    merged = student.merge_and_unload()
    merged.eval()
    return merged, losses, seconds


# ----------------------------------------------------------------------------------------------
# Tiny models for tests
# ----------------------------------------------------------------------------------------------

def tiny_llama(vocab_size: int = 64, hidden_size: int = 16, num_layers: int = 2, num_heads: int = 4,
               num_kv_heads: int = 2, intermediate_size: int = 24, seed: int = 0) -> LlamaForCausalLM:
    """A small random Llama in eval mode (fp32, eager attention, untied embeddings); weights scaled up
    so that removing a unit visibly changes the output."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         intermediate_size=intermediate_size, max_position_embeddings=128,
                         tie_word_embeddings=False, attn_implementation="eager")
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()
