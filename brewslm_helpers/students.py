"""Lesson 3's two students (KD and CE-only): loaded from the artefact folder, or trained here.

Lesson 3 trains two students that share the SmolLM2 tokenizer and saves them as::

    artifact_dir(budget) / "kd_student"     save_pretrained folder (model + tokenizer)
    artifact_dir(budget) / "ce_student"     save_pretrained folder (model + tokenizer)
    artifact_dir(budget) / "students.json"  {"kd_student": {...}, "ce_student": {...}}: training metadata

Lesson 4 evaluates them. So that lesson 4 is never blocked on lesson 3 (a fresh clone, a failed
run), ``load_or_train_students`` recreates the pair when it is missing, without any of lesson 3's
graded code: both students start from the same layer-cut copy of the teacher
(``models.cut_student(teacher, [0])``), see the same batches for the same number of steps
(``training.train_loop``), and differ only in the loss:

* CE-only: plain next-token cross-entropy on ``distill.collate``'s labels;
* KD: ``alpha * CE + (1 - alpha) * T**2 * KL(teacher_T || student_T)``, the KL term being TRL's
  ``GKDTrainer.generalized_jsd_loss(..., beta=0, temperature=T)`` (forward KL, mean over unmasked
  tokens) on teacher logits computed live, full vocabulary.

Both losses are taken on the assistant's reply only ("This review is positive.<|im_end|>"): the
labels of the prompt positions are set to -100, as TRL's SFT and GKD trainers do for
prompt/completion data. Measured here (60 steps, batch 8, lr 1e-3, CE-only): with the loss on
every position the student memorised the template (train loss 0.28) and stayed at chance on the
gold set (0.52 on 60 rows); with the loss on the reply it reached 0.92.

The result says which path was taken (``source``: ``"loaded"`` or ``"trained"``).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from . import distill, evaluation, models, training
from .budget import pick, resolve
from .paths import artifact_dir

KD_STUDENT = "kd_student"
CE_STUDENT = "ce_student"
STUDENT_NAMES = (KD_STUDENT, CE_STUDENT)
META_FILE = "students.json"

# the fallback's training sizes: a few steps at ci, a few dozen at full (the reply-only loss
# converges fast: 60 steps of 8 took a CE-only student from chance to the teacher's gold accuracy)
TRAIN_SIZES = {
    "ci": dict(rows=8, batch_size=4, steps=2, lr=1e-3, alpha=0.5, temperature=2.0,
               freeze_embeddings=True),
    "full": dict(rows=600, batch_size=8, steps=60, lr=1e-3, alpha=0.5, temperature=2.0,
                 freeze_embeddings=True),
}
TEACHER_LAYERS = [0]


@dataclass
class Students:
    """The pair of students and where they came from."""

    models: dict[str, torch.nn.Module]  # {"kd_student": model, "ce_student": model}, eval mode
    meta: dict[str, dict]  # students.json's content ({} per student if the file had none)
    source: str  # "loaded" (lesson 3's artefacts, or an earlier fallback run) or "trained" (now)
    folder: Path  # where they live
    seconds: float = 0.0  # time spent loading or training
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line saying which path was taken."""
        if self.source == "trained":
            return (f"trained here by brewslm_helpers.students (no usable students in {self.folder}) "
                    f"in {self.seconds:.0f} s, and saved there for next time")
        who = {m.get("trained_by", "lesson 3 (03_kd_loss)") for m in self.meta.values()}
        return f"loaded from {self.folder} (trained by {', '.join(sorted(who))})"


def _is_saved_model(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors"))


def students_present(folder: Path) -> bool:
    """True if both student folders hold a saved model."""
    return all(_is_saved_model(Path(folder) / name) for name in STUDENT_NAMES)


def load_students(folder: Path, vocab_size: int | None = None) -> Students:
    """Load both students (fp32, eval mode) and ``students.json`` from ``folder``.

    With ``vocab_size``, check that each student uses a vocabulary of that size (the
    same-tokenizer assumption of distillation) and fail clearly if not.
    """
    folder = Path(folder)
    start = time.perf_counter()
    loaded = {}
    for name in STUDENT_NAMES:
        model = AutoModelForCausalLM.from_pretrained(folder / name, dtype=torch.float32)
        model.eval()
        if vocab_size is not None and model.config.vocab_size != vocab_size:
            raise ValueError(
                f"{folder / name} has a vocabulary of {model.config.vocab_size} tokens, not the "
                f"teacher's {vocab_size}: it does not share the teacher's tokenizer. Delete "
                f"{folder / name} to have it retrained.")
        loaded[name] = model
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta = {name: dict(meta.get(name, {})) for name in STUDENT_NAMES}
    return Students(loaded, meta, "loaded", folder, time.perf_counter() - start)


def reply_start(tokenizer, row: dict, sequence: list[int]) -> int:
    """Number of tokens of ``row``'s chat prompt, i.e. the index in ``sequence`` (its
    ``distill.kd_token_ids``) where the assistant's reply starts."""
    prompt = tokenizer(evaluation.sentiment_prompt(tokenizer, row["text"]),
                       add_special_tokens=False)["input_ids"]
    if sequence[:len(prompt)] != prompt:
        raise ValueError(f"row {row.get('id')}: the prompt's tokens are not a prefix of the "
                         "training text's tokens")
    return len(prompt)


def reply_logits(model, batch):
    """Logits ``[1, N, V]`` and labels ``[1, N]`` at the N labelled (reply) positions only.

    The decoder runs on every position (attention needs them); the 49,152-way output head,
    most of a 1-layer student's compute, only where there is a loss. Same loss value as
    masking full ``[B, T, V]`` logits, for a fraction of the cost.
    """
    keep = batch["labels"] != distill.IGNORE_INDEX
    hidden = model.model(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).last_hidden_state
    logits = model.get_output_embeddings()(hidden[keep])
    return logits.float().unsqueeze(0), batch["labels"][keep].unsqueeze(0)


def train_students(teacher, tokenizer, budget: str = "ci", **overrides) -> tuple[dict, dict]:
    """Train the KD and CE-only students from the same layer-cut init, batches and steps.

    ``overrides`` replace entries of ``TRAIN_SIZES[budget]`` (rows, batch_size, steps, lr,
    alpha, temperature, freeze_embeddings). With ``freeze_embeddings`` the token embeddings (tied
    with the output head: 28 M of the student's 32 M parameters) keep the teacher's values and
    only the decoder layer and the final norm train, which makes a step cheaper.
    Returns ``(models, meta)`` keyed by ``STUDENT_NAMES``; the models are in eval mode and
    ``meta`` is what ``students.json`` records.
    """
    budget = resolve(budget)
    cfg = {**pick(budget, ci=TRAIN_SIZES["ci"], full=TRAIN_SIZES["full"]), **overrides}
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDTrainer
    jsd = GKDTrainer.generalized_jsd_loss
    alpha, T = float(cfg["alpha"]), float(cfg["temperature"])

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = distill.load_kd_rows(cfg["rows"])
    sequences = distill.kd_token_ids(tokenizer, rows)
    prompt_lens = [reply_start(tokenizer, row, seq) for row, seq in zip(rows, sequences)]
    batches = []
    for start in range(0, len(sequences), cfg["batch_size"]):
        batch = distill.collate(sequences[start:start + cfg["batch_size"]], pad)
        for b, n_prompt in enumerate(prompt_lens[start:start + cfg["batch_size"]]):
            batch["labels"][b, :n_prompt - 1] = distill.IGNORE_INDEX  # loss on the reply only
        batches.append(batch)
    teacher.eval()

    def ce_only(model, batch):
        logits, labels = reply_logits(model, batch)
        return F.cross_entropy(logits[0], labels[0])

    def kd_mixed(model, batch):
        with torch.no_grad():
            t_logits, _ = reply_logits(teacher, batch)
        s_logits, labels = reply_logits(model, batch)
        kl = jsd(s_logits, t_logits, labels=labels, beta=0.0, temperature=T)
        return alpha * F.cross_entropy(s_logits[0], labels[0]) + (1 - alpha) * T ** 2 * kl

    trained, meta = {}, {}
    for name, loss_fn, loss_text in (
            (KD_STUDENT, kd_mixed,
             f"{alpha} * CE + {1 - alpha} * T^2 * forward KL (TRL generalized_jsd_loss, beta=0), "
             f"T={T}, full vocabulary, teacher logits live"),
            (CE_STUDENT, ce_only, "cross-entropy on the hard labels only")):
        student = models.cut_student(teacher, TEACHER_LAYERS)
        student.get_input_embeddings().weight.requires_grad_(not cfg["freeze_embeddings"])
        start = time.perf_counter()
        history = training.train_loop(student, batches, loss_fn, steps=cfg["steps"], lr=cfg["lr"],
                                      desc=f"fallback: {name}", seed=0)
        trained[name] = student
        meta[name] = {
            "trained_by": "brewslm_helpers.students (lesson 4's fallback)",
            "loss": loss_text + " (on the assistant's reply tokens)", "steps": cfg["steps"],
            "batch_size": cfg["batch_size"],
            "train_rows": len(sequences), "lr": cfg["lr"],
            "alpha": alpha if name == KD_STUDENT else 1.0,
            "T": T if name == KD_STUDENT else None, "k": None,
            "teacher_layers": list(TEACHER_LAYERS), "params": student.num_parameters(),
            "trainable_params": sum(p.numel() for p in student.parameters() if p.requires_grad),
            "frozen_embeddings": bool(cfg["freeze_embeddings"]), "positions": "assistant reply only",
            "final_train_loss": history[-1], "first_train_loss": history[0],
            "train_seconds": round(time.perf_counter() - start, 1), "budget": budget}
    return trained, meta


def save_students(trained: dict, tokenizer, meta: dict, folder: Path) -> None:
    """Write the pair in lesson 3's layout (each folder replaced as a whole, then ``students.json``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in STUDENT_NAMES:
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".tmp-{name}-"))
        tmp.chmod(0o755)
        trained[name].save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        target = folder / name
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    (folder / META_FILE).write_text(json.dumps(meta, indent=1))


def load_or_train_students(budget: str, teacher=None, tokenizer=None, folder: Path | None = None,
                           **overrides) -> Students:
    """The KD and CE-only students of ``artifact_dir(budget)``, trained (and saved) if missing.

    If either folder lacks a saved model, both are retrained together (they are a matched pair:
    same init, batches and steps) with ``train_students`` and saved in the same layout, so the
    next run loads them. ``teacher``/``tokenizer`` default to ``models.load_teacher()`` (only
    loaded if training is needed); ``folder`` defaults to ``artifact_dir(budget)``.
    """
    budget = resolve(budget)
    folder = Path(folder) if folder is not None else artifact_dir(budget)
    if students_present(folder):
        vocab = len(tokenizer) if tokenizer is not None else None
        return load_students(folder, vocab_size=vocab)
    if teacher is None or tokenizer is None:
        teacher, tokenizer = models.load_teacher()
    start = time.perf_counter()
    trained, meta = train_students(teacher, tokenizer, budget, **overrides)
    save_students(trained, tokenizer, meta, folder)
    return Students(trained, meta, "trained", folder, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Issue 14's experiment (lessons 3-4 will move to it; drafts/kd_few_labels.py runs it today): a few
# hand labels against KD on the whole capture, same init, steps and batches.
#
# * ``ce_few``: cross-entropy on ``n`` hand-labelled texts only;
# * ``kd``: every capture text; where a human label is in play, ``kd_loss(..., alpha, T)`` (alpha *
#   CE + (1 - alpha) * T^2 * KL); at label-free positions, ``kd_loss(..., 0.0, T)`` (the KL only);
# * ``ce_all``: cross-entropy on every label (the control: with plenty of labels KD is not needed).
#
# Which positions (``positions``):
# * ``"answer"``: the one position whose next token is the label word (" positive"/" negative" after
#   the fixed reply prefix "This review is"). Its context holds no label, so the teacher's top-k there
#   is a soft label for a text nobody labelled;
# * ``"reply"``: a labelled text's whole reply; an unlabelled text's reply up to the answer position
#   (after it, the capture's own reply, written with the true label, is in the context: a leak).
ARMS = ("ce_few", "kd", "ce_all")
REPLY_PREFIX = "This review is"


def few_label_ids(rows: list[dict], n: int, seed: int) -> set[int]:
    """Indices of ``n`` hand-labelled ``rows`` (half of each label, the odd one negative), drawn
    with ``seed``."""
    import random

    rng = random.Random(seed)
    pos = [i for i, r in enumerate(rows) if r["label"] == "positive"]
    neg = [i for i, r in enumerate(rows) if r["label"] == "negative"]
    if n // 2 > len(pos) or n - n // 2 > len(neg):
        raise ValueError(f"{n} balanced labels need {n // 2} positive and {n - n // 2} negative rows; "
                         f"there are {len(pos)} and {len(neg)}")
    rng.shuffle(pos)
    rng.shuffle(neg)
    return set(pos[:n // 2] + neg[:n - n // 2])


def answer_position(tokenizer, row: dict, sequence: list[int]) -> int:
    """The index ``t`` of ``sequence`` (``row``'s ``distill.kd_token_ids``) whose logits predict the
    label word: the last token of the reply prefix "This review is"."""
    prefix = len(tokenizer(REPLY_PREFIX, add_special_tokens=False)["input_ids"])
    return reply_start(tokenizer, row, sequence) + prefix - 1


def arm_batches(records: list[dict], rows: list[dict], tokenizer, arm: str, labelled: set[int],
                steps: int, batch_size: int, seed: int, positions: str = "answer") -> list[dict]:
    """``steps`` batches of ``arm`` over capture ``records`` (lesson 2's schema; ``rows[i]`` is the
    review of ``records[i]``), in an order drawn with ``seed``.

    ``ce_few`` draws from the ``labelled`` indices only, the other arms from every record; ``ce_all``
    treats every record as labelled. Each batch is ``distill.collate_capture``'s plus two [B, L] bool
    masks: ``hard``, positions with a human label (CE, and KD's alpha term), and ``soft``, label-free
    positions (KD's KL only; empty for the CE arms).
    """
    import random

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}: use one of {ARMS}")
    if positions not in ("answer", "reply"):
        raise ValueError(f"positions must be 'answer' or 'reply', got {positions!r}")
    if arm == "ce_all":
        labelled = set(range(len(records)))
    pool = sorted(labelled) if arm == "ce_few" else list(range(len(records)))
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        chunk = pool[:]
        rng.shuffle(chunk)
        order += chunk
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for s in range(steps):
        idx = order[s * batch_size:(s + 1) * batch_size]
        batch = distill.collate_capture([records[i] for i in idx], pad)
        hard = torch.zeros_like(batch["labels"], dtype=torch.bool)
        soft = torch.zeros_like(hard)
        for b, i in enumerate(idx):
            seq = records[i]["input_ids"]
            ans = answer_position(tokenizer, rows[i], seq)
            if i in labelled:
                if positions == "answer":
                    hard[b, ans] = True
                else:
                    hard[b, reply_start(tokenizer, rows[i], seq) - 1:len(seq) - 1] = True
            elif arm == "kd":
                if positions == "answer":
                    soft[b, ans] = True
                else:
                    soft[b, reply_start(tokenizer, rows[i], seq) - 1:ans + 1] = True
        batch.update(hard=hard, soft=soft)
        out.append(batch)
    return out


def arm_loss(model, batch: dict, arm: str, kd_loss, alpha: float, T: float) -> torch.Tensor:
    """The loss of ``arm`` on one ``arm_batches`` batch, the mean over its hard and soft positions.

    ``kd_loss(student_logits [1, N, V], topk_ids [1, N, k], topk_logprobs [1, N, k], labels [1, N],
    alpha, T)`` is lesson 3's ``topk_kd_loss`` signature; at soft positions it is called with
    ``alpha = 0`` (the labels there, the teacher's top-1, only mark the positions). The decoder runs
    on every position; the output head only where there is a loss."""
    keep = batch["hard"] | batch["soft"]
    hidden = model.model(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).last_hidden_state
    logits = model.get_output_embeddings()(hidden[keep]).float().unsqueeze(0)  # [1, N, V]
    hard = batch["hard"][keep]
    labels = batch["labels"][keep]
    if arm != "kd":
        return F.cross_entropy(logits[0, hard], labels[hard])
    ids, lps = batch["topk_ids"][keep], batch["topk_logprobs"][keep]
    total, n = logits.new_zeros(()), 0
    for part, a, targets in ((hard, alpha, labels), (~hard, 0.0, ids[:, 0])):
        if part.any():
            m = int(part.sum())
            total = total + m * kd_loss(logits[:, part], ids[part].unsqueeze(0), lps[part].unsqueeze(0),
                                        targets[part].unsqueeze(0), a, T)
            n += m
    return total / max(n, 1)


def train_arm(init_student, batches: list[dict], arm: str, kd_loss=None, alpha: float = 0.5,
              T: float = 1.0, lr: float = 1e-3, seed: int = 0) -> tuple[torch.nn.Module, list[float]]:
    """A copy of ``init_student`` trained on ``batches`` (``arm_batches``) with ``arm_loss``, one
    AdamW step per batch (``training.train_loop``). Returns ``(model, loss history)``."""
    import copy

    if arm == "kd" and kd_loss is None:
        raise ValueError("the kd arm needs kd_loss (lesson 3's topk_kd_loss signature)")
    model = copy.deepcopy(init_student)
    history = training.train_loop(model, batches, lambda m, b: arm_loss(m, b, arm, kd_loss, alpha, T),
                                  steps=len(batches), lr=lr, desc=f"{arm} (seed {seed})", seed=seed)
    return model, history
