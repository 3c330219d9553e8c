"""Issue 14's experiment, before it goes into lessons 3-4: when does KD on the capture beat a few labels?

Not a lesson (not graded, not released): the design the lessons will follow, runnable as is.

    .venv/bin/python drafts/kd_few_labels.py                 # 3 arms x 3 seeds, 400 steps (~30 min on 2 cores)
    .venv/bin/python drafts/kd_few_labels.py --seeds 0 --steps 150 --arms kd   # one ablation

Set-up (what lesson 2's capture gives in production: the teacher ran once over many unlabelled
texts; only a few were labelled by hand):
* lesson 2's capture (the teacher, SmolLM2-135M-Instruct, top-16 at every position of the 600 train
  reviews), made here in memory. At the **answer position**, the one whose next token is " positive" /
  " negative" after the fixed reply prefix "This review is", the context holds no label: the teacher's
  top-k there is a soft label for a text nobody labelled;
* the student: ``models.cut_student(teacher, [0])`` (21 % of the teacher's parameters), embeddings
  frozen, as in lesson 3;
* arms, same init, same steps, batch and learning rate:
  - ``ce_few``: cross-entropy at the answer position of ``--labels`` hand-labelled texts only;
  - ``kd``: every one of the 600 capture texts at the answer position; a labelled one gets alpha * CE +
    (1 - alpha) * T^2 * KL(teacher top-k || student), an unlabelled one T^2 * KL;
  - ``ce_all``: cross-entropy on all 600 labels (the control: when labels are plentiful, KD is not needed);
  (``brewslm_helpers.students.arm_batches`` / ``train_arm``: the code lessons 3-4 will use;
  ``--positions reply`` distils a labelled text's whole reply and an unlabelled one's up to the answer);
* the few labels are drawn per seed (balanced); the seed also orders the batches;
* scored on gold (120 reviews, phrasings from training) and novel (80 reviews whose phrasings occur
  in no training text) by ``evaluation.score_sentiment``, with the diagnostics a practitioner looks at:
  share of "positive" predictions (the constant-predictor check), agreement with the teacher, and
  KL(teacher || student) over the two answers on gold.

Prints per run and a summary: mean accuracy per arm, Wilson 95 % intervals, and the paired bootstrap
95 % interval of KD - CE(few) on gold (per item, averaged over seeds; 10,000 resamples).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from brewslm_helpers import data, distill, evaluation, models, students

def capture(teacher, tok, rows: list[dict], k: int) -> list[dict]:
    """Lesson 2's capture, in memory: the teacher's top-k at every position of every text."""
    seqs = distill.kd_token_ids(tok, rows)
    out = []
    for i in range(0, len(rows), 16):
        chunk = seqs[i:i + 16]
        batch = distill.collate(chunk, tok.pad_token_id)
        with torch.no_grad():
            lp = torch.log_softmax(teacher(input_ids=batch["input_ids"],
                                           attention_mask=batch["attention_mask"]).logits.float(), -1)
        top_lp, top_ids = lp.topk(k, dim=-1)
        for j, seq in enumerate(chunk):
            out.append({"input_ids": seq, "k": k, "topk_ids": top_ids[j, :len(seq)].tolist(),
                        "topk_logprobs": top_lp[j, :len(seq)].tolist()})
    return out


def topk_kd(student_logits, topk_ids, topk_logprobs, labels, alpha, T):
    """Lesson 3's top-k KD loss (teacher renormalised over its k ids at T, student's full softmax)."""
    mask = labels != -100
    n = mask.sum().clamp_min(1)
    V = student_logits.shape[-1]
    ce = F.cross_entropy(student_logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="sum") / n
    log_p = torch.log_softmax(topk_logprobs / T, -1)
    log_q = torch.log_softmax(student_logits / T, -1).gather(-1, topk_ids)
    kl = ((log_p.exp() * (log_p - log_q)).sum(-1) * mask).sum() / n
    return alpha * ce + (1 - alpha) * T ** 2 * kl


def wilson(k: int, n: int) -> tuple[float, float]:
    ci = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
    return ci.low, ci.high


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arms", nargs="+", default=["ce_few", "kd", "ce_all"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--labels", type=int, default=32)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--T", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--positions", choices=["answer", "reply"], default="answer")
    ap.add_argument("--out", default=None, help="append one JSON line per run here")
    args = ap.parse_args()
    torch.set_num_threads(2)

    teacher, tok = models.load_teacher()
    train, gold, novel = data.load_reviews("train"), data.load_reviews("gold"), data.load_reviews("novel")
    t0 = time.perf_counter()
    records = capture(teacher, tok, train, args.k)
    teacher_gold, teacher_novel = (evaluation.score_sentiment(teacher, tok, rows) for rows in (gold, novel))
    print(f"teacher capture: {len(records)} texts in {time.perf_counter() - t0:.0f} s; "
          f"teacher gold {teacher_gold['accuracy']:.3f}, novel {teacher_novel['accuracy']:.3f}")
    p_t = np.clip(teacher_gold["p_positive"], 1e-6, 1 - 1e-6)

    runs = []
    init = models.cut_student(teacher, [0])
    init.model.embed_tokens.weight.requires_grad_(False)  # tied: the head is frozen too
    for seed in args.seeds:
        labelled = students.few_label_ids(train, args.labels, seed)
        for arm in args.arms:
            batches = students.arm_batches(records, train, tok, arm, labelled, args.steps, args.batch_size,
                                           seed, args.positions)
            t1 = time.perf_counter()
            model, history = students.train_arm(init, batches, arm, topk_kd, args.alpha, args.T, args.lr, seed)
            secs = time.perf_counter() - t1
            g, n = evaluation.score_sentiment(model, tok, gold), evaluation.score_sentiment(model, tok, novel)
            p_s = np.clip(g["p_positive"], 1e-6, 1 - 1e-6)
            kl = float(np.mean(p_t * np.log(p_t / p_s) + (1 - p_t) * np.log((1 - p_t) / (1 - p_s))))
            run = {"arm": arm, "seed": seed, "labels": args.labels, "steps": args.steps, "T": args.T,
                   "positions": args.positions,
                   "alpha": args.alpha, "gold": g["accuracy"], "novel": n["accuracy"],
                   "share_positive": float((g["p_positive"] > 0.5).mean()),
                   "agreement": float(((g["p_positive"] > 0.5) == (teacher_gold["p_positive"] > 0.5)).mean()),
                   "kl_teacher_student_gold": kl, "first_loss": history[0],
                   "final_loss": float(np.mean(history[-10:])), "seconds": round(secs, 1),
                   "gold_correct": g["correct"].astype(int).tolist()}
            flag = "  <- CONSTANT PREDICTOR" if run["share_positive"] in (0.0, 1.0) or abs(run["share_positive"] - 0.5) > 0.3 else ""
            print(f"{arm:<10} seed {seed}: gold {run['gold']:.3f} novel {run['novel']:.3f} "
                  f"share+ {run['share_positive']:.2f} agree {run['agreement']:.3f} KL {kl:.3f} "
                  f"loss {run['first_loss']:.2f}->{run['final_loss']:.3f} ({secs:.0f} s){flag}", flush=True)
            runs.append(run)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(run) + "\n")

    print("\narm         gold mean (seeds)   Wilson 95% (pooled)   novel mean")
    for arm in args.arms:
        rs = [r for r in runs if r["arm"] == arm]
        k = sum(sum(r["gold_correct"]) for r in rs)
        lo, hi = wilson(k, len(gold) * len(rs))
        each = ", ".join(format(r["gold"], ".3f") for r in rs)
        print(f"{arm:<10}  {np.mean([r['gold'] for r in rs]):.3f} ({each})   [{lo:.3f}, {hi:.3f}]   "
              f"{np.mean([r['novel'] for r in rs]):.3f}")
    if {"kd", "ce_few"} <= set(args.arms):
        kd = np.mean([r["gold_correct"] for r in runs if r["arm"] == "kd"], axis=0)
        ce = np.mean([r["gold_correct"] for r in runs if r["arm"] == "ce_few"], axis=0)
        res = stats.bootstrap((kd, ce), lambda a, b: np.mean(a) - np.mean(b), paired=True, n_resamples=10_000,
                              method="percentile", random_state=np.random.default_rng(0))
        ci = res.confidence_interval
        print(f"KD - CE(few) on gold: {kd.mean() - ce.mean():+.3f}, paired bootstrap 95% [{ci.low:+.3f}, {ci.high:+.3f}]; "
              f"quality retained (KD / teacher): {kd.mean() / teacher_gold['accuracy']:.3f}")


if __name__ == "__main__":
    main()
