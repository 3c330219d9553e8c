"""Lesson 3's students, one per training arm and seed: trained there, loaded by lesson 4 (or trained here).

The experiment (lesson 3 runs it with its own ``topk_kd_loss``): the teacher ran once over many
unlabelled texts (lesson 2's capture), and only a few were labelled by hand. Every student starts as
the same layer-cut copy of the teacher (``models.cut_student(teacher, [0])``, embeddings frozen),
sees ``steps`` batches of ``batch_size`` texts and differs only in its arm:

* ``ce_few``: cross-entropy on ``labels`` hand-labelled texts only;
* ``kd``: every capture text: alpha * CE + (1 - alpha) * T^2 * KL(teacher top-k || student) where a
  human label is in play, the KL alone where none is;
* ``ce_all``: cross-entropy on every text's label (the control: with plenty of labels, no KD needed).

The loss is taken at the **answer position** (the one position whose next token is the label word,
after the fixed reply prefix "This review is"): its context holds no label, so the teacher's top-k
there is a soft label for a text nobody labelled. ``positions="reply"`` (lesson 3's ablation) takes a
labelled text's whole reply and an unlabelled text's reply up to the answer (after it, the capture's
own reply, written with the true label, is in the context).

Saved layout (lesson 3 writes it, lesson 4 reads it)::

    artifact_dir(budget) / "students" / "<arm>-seed<seed>"   save_pretrained folder (model + tokenizer)
    artifact_dir(budget) / "students" / "students.json"      {"<arm>-seed<seed>": {...training record}}

So that lesson 4 is never blocked on lesson 3 (a fresh clone, a failed run, grading in a sandbox),
``load_or_train_students`` trains the same arms, seeds and sizes (``ARM_SIZES``, lesson 3's ``CFG``)
when the folder is incomplete, without lesson 3's graded code: its KL term is TRL's
``GKDTrainer.generalized_jsd_loss(beta=0)`` on the captured top-k (the teacher renormalised over its
k ids, as lesson 3's loss), and its capture is made here with the teacher. The result says which path
was taken (``source``: ``"loaded"`` or ``"trained"``).
"""
from __future__ import annotations

import copy
import json
import os
import random
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

ARMS = ("ce_few", "kd", "ce_all")
ARM_TITLES = {"ce_few": "CE, few labels", "kd": "KD on the capture", "ce_all": "CE, all labels"}
REPLY_PREFIX = "This review is"
META_FILE = "students.json"
FOLDER = "students"
TEACHER_LAYERS = [0]
# lesson 3's CFG uses the same values (tests/test_students.py checks): the fallback trains what it trains
ARM_SIZES = {
    "ci": dict(rows=8, k=8, labels=4, seeds=[0], steps=4, batch_size=4, lr=1e-3, alpha=0.5, T=1.0),
    "full": dict(rows=600, k=16, labels=32, seeds=[0, 1, 2], steps=400, batch_size=8, lr=1e-3, alpha=0.5,
                 T=1.0),
}


def run_name(arm: str, seed: int) -> str:
    """The folder (and ``students.json`` key) of one trained student: ``"<arm>-seed<seed>"``."""
    return f"{arm}-seed{seed}"


@dataclass
class Students:
    """Trained students by run name, and where they came from."""

    models: dict[str, torch.nn.Module]  # {"kd-seed0": model, ...}, eval mode
    meta: dict[str, dict]  # students.json's content, by run name
    source: str  # "loaded" (lesson 3's artefacts, or an earlier fallback run) or "trained" (now)
    folder: Path  # where they live
    seconds: float = 0.0  # time spent loading or training
    notes: list[str] = field(default_factory=list)

    def runs(self, arm: str) -> list[str]:
        """The run names of ``arm``, by seed."""
        return sorted((n for n, m in self.meta.items() if m.get("arm") == arm),
                      key=lambda n: self.meta[n].get("seed", 0))

    def describe(self) -> str:
        """One line saying which path was taken."""
        if self.source == "trained":
            return (f"trained here by brewslm_helpers.students (no complete set in {self.folder}) "
                    f"in {self.seconds:.0f} s, and saved there for next time")
        who = {m.get("trained_by", "lesson 3 (03_kd_loss)") for m in self.meta.values()}
        return f"loaded from {self.folder} (trained by {', '.join(sorted(who))})"


def students_folder(budget: str) -> Path:
    return artifact_dir(budget) / FOLDER


def _is_saved_model(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors"))


def students_present(folder: Path) -> bool:
    """Whether ``folder`` holds ``students.json`` and a saved model for every run it names."""
    try:
        meta = json.loads((Path(folder) / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return bool(meta) and all(_is_saved_model(Path(folder) / name) for name in meta)


def load_students(folder: Path, vocab_size: int | None = None) -> Students:
    """Load every student ``students.json`` names (refusing one with a foreign vocabulary)."""
    folder = Path(folder)
    start = time.perf_counter()
    meta = json.loads((folder / META_FILE).read_text())
    loaded = {}
    for name in meta:
        model = AutoModelForCausalLM.from_pretrained(folder / name, dtype=torch.float32)
        model.eval()
        if vocab_size is not None and model.config.vocab_size != vocab_size:
            raise ValueError(
                f"{folder / name} has a vocabulary of {model.config.vocab_size} tokens, not the "
                f"teacher's {vocab_size}: it does not share the teacher's tokenizer. Delete "
                f"{folder} to have the students retrained.")
        loaded[name] = model
    return Students(loaded, meta, "loaded", folder, time.perf_counter() - start)


def save_students(trained: dict, tokenizer, meta: dict, folder: Path) -> None:
    """Write ``trained`` (run name -> model) and ``students.json`` in the layout above; each model's
    folder is written beside its target and swapped in, and ``students.json`` goes last, so a
    reader never sees a half-written set."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, model in trained.items():
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".tmp-{name}-"))
        tmp.chmod(0o755)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        target = folder / name
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    tmp_meta = folder / (META_FILE + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, folder / META_FILE)


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


def few_label_ids(rows: list[dict], n: int, seed: int) -> set[int]:
    """Indices of ``n`` hand-labelled ``rows`` (half of each label, the odd one negative), drawn
    with ``seed``."""
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
    # each record's (reply start, answer position), found once (it tokenizes the prompt)
    where = {i: (reply_start(tokenizer, rows[i], records[i]["input_ids"]),
                 answer_position(tokenizer, rows[i], records[i]["input_ids"])) for i in set(order)}
    out = []
    for s in range(steps):
        idx = order[s * batch_size:(s + 1) * batch_size]
        batch = distill.collate_capture([records[i] for i in idx], pad)
        hard = torch.zeros_like(batch["labels"], dtype=torch.bool)
        soft = torch.zeros_like(hard)
        for b, i in enumerate(idx):
            start, ans = where[i]
            if i in labelled:
                if positions == "answer":
                    hard[b, ans] = True
                else:
                    hard[b, start - 1:len(records[i]["input_ids"]) - 1] = True
            elif arm == "kd":
                if positions == "answer":
                    soft[b, ans] = True
                else:
                    soft[b, start - 1:ans + 1] = True
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
    if arm == "kd" and kd_loss is None:
        raise ValueError("the kd arm needs kd_loss (lesson 3's topk_kd_loss signature)")
    model = copy.deepcopy(init_student)
    history = training.train_loop(model, batches, lambda m, b: arm_loss(m, b, arm, kd_loss, alpha, T),
                                  steps=len(batches), lr=lr, desc=f"{arm} (seed {seed})", seed=seed)
    return model, history


def capture_records(teacher, tokenizer, rows: list[dict], k: int, batch_size: int = 8) -> list[dict]:
    """Lesson 2's capture of ``rows``, in memory (its schema, without the fingerprint fields): the
    teacher's top-``k`` log-probs at every position of each chat-formatted text."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sequences = distill.kd_token_ids(tokenizer, rows)
    records = []
    for start in range(0, len(rows), batch_size):
        chunk = sequences[start:start + batch_size]
        batch = distill.collate(chunk, pad)
        with torch.no_grad():
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        top_lp, top_ids = torch.log_softmax(logits.float(), -1).topk(k, dim=-1)
        for b, (row, seq) in enumerate(zip(rows[start:start + batch_size], chunk)):
            records.append({"id": row["id"], "input_ids": seq, "k": k,
                            "topk_ids": top_ids[b, :len(seq)].tolist(),
                            "topk_logprobs": top_lp[b, :len(seq)].tolist()})
    return records


def train_students(teacher, tokenizer, budget: str = "ci", **overrides) -> tuple[dict, dict]:
    """Lesson 4's fallback: every arm of ``ARMS`` for every seed, at ``ARM_SIZES[budget]``
    (``overrides`` replace entries). Returns ``(models, meta)`` keyed by ``run_name``."""
    budget = resolve(budget)
    cfg = {**pick(budget, ci=ARM_SIZES["ci"], full=ARM_SIZES["full"]), **overrides}
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDTrainer
    jsd = GKDTrainer.generalized_jsd_loss

    def trl_topk_kd(student_logits, topk_ids, topk_logprobs, labels, alpha, T):
        # the teacher known on its k ids only: a dense row that is -1e4 elsewhere renormalises over them
        dense = torch.full_like(student_logits, -1e4).scatter(-1, topk_ids, topk_logprobs)
        kl = jsd(student_logits, dense, labels=labels, beta=0.0, temperature=T)
        return alpha * F.cross_entropy(student_logits[0], labels[0]) + (1 - alpha) * T ** 2 * kl

    rows = distill.load_kd_rows(cfg["rows"])
    teacher.eval()
    records = capture_records(teacher, tokenizer, rows, cfg["k"])
    init = models.cut_student(teacher, TEACHER_LAYERS)
    init.get_input_embeddings().weight.requires_grad_(False)  # tied: freezes the head too
    trained, meta = {}, {}
    for seed in cfg["seeds"]:
        labelled = few_label_ids(rows, cfg["labels"], seed)
        for arm in ARMS:
            batches = arm_batches(records, rows, tokenizer, arm, labelled, cfg["steps"],
                                  cfg["batch_size"], seed)
            start = time.perf_counter()
            model, history = train_arm(init, batches, arm, trl_topk_kd, cfg["alpha"], cfg["T"],
                                       cfg["lr"], seed)
            name = run_name(arm, seed)
            trained[name] = model
            meta[name] = {
                "arm": arm, "seed": seed, "trained_by": "brewslm_helpers.students (lesson 4's fallback)",
                "loss": ("alpha * CE + (1 - alpha) * T^2 * KL (TRL generalized_jsd_loss, beta=0, on the "
                         "captured top-k); the KL alone on unlabelled texts") if arm == "kd"
                        else "cross-entropy on the hand labels",
                "positions": "answer", "labels": len(rows) if arm == "ce_all" else cfg["labels"],
                "capture_texts": len(rows), "steps": cfg["steps"], "batch_size": cfg["batch_size"],
                "lr": cfg["lr"], "alpha": cfg["alpha"] if arm == "kd" else 1.0,
                "T": cfg["T"] if arm == "kd" else None, "k": cfg["k"] if arm == "kd" else None,
                "teacher_layers": list(TEACHER_LAYERS), "params": model.num_parameters(),
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "first_train_loss": history[0], "final_train_loss": history[-1],
                "train_seconds": round(time.perf_counter() - start, 1), "budget": budget}
    return trained, meta


def load_or_train_students(budget: str, teacher=None, tokenizer=None, folder: Path | None = None,
                           **overrides) -> Students:
    """Lesson 3's students of ``students_folder(budget)``, trained (and saved) if the set is incomplete.

    ``teacher``/``tokenizer`` default to ``models.load_teacher()`` (loaded only to train);
    ``overrides`` go to ``train_students``."""
    budget = resolve(budget)
    folder = Path(folder) if folder is not None else students_folder(budget)
    if students_present(folder):
        return load_students(folder, vocab_size=len(tokenizer) if tokenizer is not None else None)
    if teacher is None or tokenizer is None:
        teacher, tokenizer = models.load_teacher()
    start = time.perf_counter()
    trained, meta = train_students(teacher, tokenizer, budget, **overrides)
    save_students(trained, tokenizer, meta, folder)
    return Students(trained, meta, "trained", folder, time.perf_counter() - start)
