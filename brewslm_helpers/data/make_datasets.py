"""Regenerate the shipped data sets: ``python -m brewslm_helpers.data.make_datasets``.

The course ships small generated data sets instead of downloading any (no hub here).
``reviews_*.jsonl`` are short coffee-shop reviews with a sentiment label. They are built
from phrase templates with a fixed seed, so the files are reproducible byte for byte;
the train and gold splits use disjoint (opener, subject, phrase) combinations, and the
gold split is balanced 50/50. ``reviews_novel.jsonl`` (80 rows, balanced) is a second held-out set
whose opinion phrases and closing sentences occur in no train or gold text: a student that only
memorised the training phrases is at chance there, while the teacher, a real language model, is not.

Record schema (one JSON object per line)::

    {"id": "gold-0007", "text": "The flat white was rich and smooth. ...", "label": "positive"}
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

SUBJECTS = ["espresso", "flat white", "cappuccino", "latte", "cold brew", "pour-over",
            "mocha", "americano", "cortado", "filter coffee", "macchiato", "chai latte"]
PLACES = ["this café", "the new roastery", "the corner coffee bar", "the station kiosk",
          "our office café", "the little place downtown"]
POSITIVE = ["was rich and smooth", "was the best I have had in years", "tasted wonderful",
            "was perfectly balanced", "had a lovely sweet finish", "was absolutely delicious",
            "was fresh and fragrant", "was excellent", "made my morning great",
            "was a delight from the first sip"]
NEGATIVE = ["was bitter and burnt", "tasted stale", "was awful", "was watery and bland",
            "was cold and sour", "was the worst I have had in years", "was disappointing",
            "tasted like dishwater", "was overpriced and terrible", "made me feel sick"]
POS_EXTRA = ["The staff were friendly.", "I will definitely come back.", "Highly recommended.",
             "Great value too.", "Five stars.", "The service was quick and kind."]
NEG_EXTRA = ["The staff were rude.", "I will not come back.", "Avoid this place.",
             "A waste of money.", "One star.", "We waited forty minutes."]


# the novel set's phrasings: none of them occurs in the train or gold split
NOVEL_POSITIVE = ["was heavenly", "tasted superb", "was outstanding", "was a real treat",
                  "was simply perfect", "was creamy and bright", "was the highlight of my week",
                  "was spot on"]
NOVEL_NEGATIVE = ["was revolting", "tasted horrible", "was undrinkable", "was a huge letdown",
                  "was dreadful", "was lukewarm and muddy", "was the low point of my week",
                  "was way off"]
NOVEL_POS_EXTRA = ["Lovely atmosphere.", "Worth every penny.", "My new favourite spot.", "A gem."]
NOVEL_NEG_EXTRA = ["Never again.", "The barista ignored us.", "Not worth the money.", "A mess."]
PHRASES = {"seen": (POSITIVE, NEGATIVE, POS_EXTRA, NEG_EXTRA),
           "novel": (NOVEL_POSITIVE, NOVEL_NEGATIVE, NOVEL_POS_EXTRA, NOVEL_NEG_EXTRA)}


def _review(rng: random.Random, label: str, phrases: str = "seen") -> str:
    positive, negative, pos_extra, neg_extra = PHRASES[phrases]
    subject, place = rng.choice(SUBJECTS), rng.choice(PLACES)
    phrase = rng.choice(positive if label == "positive" else negative)
    extra = rng.choice(pos_extra if label == "positive" else neg_extra)
    return f"The {subject} at {place} {phrase}. {extra}"


def make_reviews(n: int, seed: int, prefix: str, exclude: set[str] = frozenset(),
                 phrases: str = "seen") -> list[dict]:
    """``n`` balanced, unique reviews whose text is not in ``exclude``, from the ``phrases`` pool
    (``"seen"``: the train and gold phrasings; ``"novel"``: those of the novel set)."""
    rng, rows, seen = random.Random(seed), [], set(exclude)
    while len(rows) < n:
        label = "positive" if len(rows) % 2 == 0 else "negative"
        text = _review(rng, label, phrases)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"id": f"{prefix}-{len(rows):04d}", "text": text, "label": label})
    rng.shuffle(rows)
    return rows


def main() -> None:
    gold = make_reviews(120, seed=7, prefix="gold")
    train = make_reviews(600, seed=11, prefix="train", exclude={r["text"] for r in gold})
    novel = make_reviews(80, seed=23, prefix="novel", phrases="novel")
    for name, rows in [("reviews_gold", gold), ("reviews_train", train), ("reviews_novel", novel)]:
        with open(HERE / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {name}.jsonl ({len(rows)} rows)")


if __name__ == "__main__":
    main()
