"""Regenerate lesson 15's reasoning data: ``python -m brewslm_helpers.data.make_reasoning_data``.

Two JSON-lines files of short multi-step arithmetic word problems with an exact integer answer,
built from phrase templates with a fixed seed (reproducible byte for byte):

- ``reasoning_train.jsonl``: 600 problems, 200 at each difficulty level 1, 2, 3;
- ``reasoning_test.jsonl``: 150 held-out problems, 50 per level.

The difficulty ``level`` is the number of arithmetic steps (1 to 3). A problem starts with an amount
and applies one operation per step (add, subtract, multiply by 2 or 3, share equally and keep one
share); every intermediate value is a whole number between 1 and 99. Record schema::

    {"id": "test-0007", "level": 2,
     "question": "Ana has 12 shells. She finds 5 more. Then she gives away 3. How many shells does Ana have now?",
     "steps": [{"expr": "12 + 5", "value": 17}, {"expr": "17 - 3", "value": 14}],
     "answer": 14}

The worked trace of a row (``brewslm_helpers.reasoning.format_trace``) is one line per step,
``Step k: <expr> = <value>``, then ``Answer: <answer>``.

What is held out: the test split uses names and objects that never occur in the train split, and
one phrasing per operation (the last template of each list below) that only the test split uses.
Numbers are drawn from the same ranges in both splits.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SEED = 15
LEVELS = (1, 2, 3)

TRAIN_NAMES = [("Ana", "She", "her"), ("Ben", "He", "his"), ("Chloe", "She", "her"), ("Dev", "He", "his"),
               ("Emma", "She", "her"), ("Felix", "He", "his"), ("Grace", "She", "her"), ("Hugo", "He", "his"),
               ("Iris", "She", "her"), ("Jack", "He", "his"), ("Lena", "She", "her"), ("Max", "He", "his")]
TEST_NAMES = [("Nora", "She", "her"), ("Omar", "He", "his"), ("Priya", "She", "her"), ("Sam", "He", "his"),
              ("Tara", "She", "her"), ("Victor", "He", "his")]
TRAIN_ITEMS = ["apples", "shells", "stickers", "marbles", "coins", "books", "cookies", "pencils", "stamps",
               "cards"]
TEST_ITEMS = ["beads", "candles", "buttons", "ribbons", "tickets"]

START = ["{name} has {a} {items}.", "{name} starts with {a} {items}.", "{name} keeps {a} {items} in a box.",
         "{name} owns {a} {items}."]
ADD = ["{pron} buys {b} more.", "{pron} finds {b} more.", "A friend gives {name} {b} more.",
       "{pron} gets {b} more."]
SUB = ["{pron} gives away {b}.", "{pron} loses {b}.", "{pron} uses {b} of them.",
       "{pron} hands {b} to a neighbour."]
MUL = ["{pron} doubles the pile.", "The number of {items} doubles.", "{pron} ends up with twice as many.",
       "{pron} makes the pile two times bigger."]
MUL3 = ["{pron} triples the pile.", "The number of {items} triples.", "{pron} ends up with three times as many.",
        "{pron} makes the pile three times bigger."]
DIV = ["{pron} shares them equally among {b} friends and keeps one share.",
       "{pron} splits them into {b} equal groups and keeps one group.",
       "{pron} divides them evenly into {b} bags and keeps one bag.",
       "{pron} sorts them into {b} equal piles and keeps one pile."]
QUESTION = ["How many {items} does {name} have now?", "How many {items} are left?",
            "How many {items} does {name} end up with?", "What is the number of {items} at the end?"]
LINKS = ["", "Then ", "After that, "]


def phrasing(templates: list[str], split: str, rng: random.Random) -> str:
    """The train split draws from all but the last template, the test split uses only the last one."""
    return templates[-1] if split == "test" else rng.choice(templates[:-1])


def next_step(value: int, rng: random.Random, split: str) -> tuple[str, str, int]:
    """One operation on ``value``: ``(sentence template, expression, new value)``, staying in 1..99."""
    ops = []
    if value <= 90:
        ops.append("add")
    if value >= 3:
        ops.append("sub")
    if value <= 33:
        ops.append("mul")
    if any(value % d == 0 and value // d >= 1 for d in (2, 3, 4, 5)) and value >= 4:
        ops.append("div")
    op = rng.choice(ops)
    if op == "add":
        b = rng.randint(2, min(9, 99 - value))
        return phrasing(ADD, split, rng).replace("{b}", str(b)), f"{value} + {b}", value + b
    if op == "sub":
        b = rng.randint(1, min(9, value - 1))
        return phrasing(SUB, split, rng).replace("{b}", str(b)), f"{value} - {b}", value - b
    if op == "mul":
        k = 2 if value > 24 or rng.random() < 0.6 else 3
        return phrasing(MUL if k == 2 else MUL3, split, rng), f"{value} * {k}", value * k
    d = rng.choice([d for d in (2, 3, 4, 5) if value % d == 0])
    return phrasing(DIV, split, rng).replace("{b}", str(d)), f"{value} / {d}", value // d


def make_problem(level: int, split: str, rng: random.Random) -> dict:
    """One problem with ``level`` steps, from the phrasings and entities of ``split``."""
    name, pron, poss = rng.choice(TRAIN_NAMES if split == "train" else TEST_NAMES)
    items = rng.choice(TRAIN_ITEMS if split == "train" else TEST_ITEMS)
    a = rng.randint(3, 20)
    names = {"name": name, "pron": pron, "poss": poss, "items": items}
    sentences = [phrasing(START, split, rng).replace("{a}", str(a)).format(**names)]
    steps, value = [], a
    for k in range(level):
        sentence, expr, value = next_step(value, rng, split)
        sentence = sentence.format(**names)
        link = "" if k == 0 else rng.choice(LINKS)
        if link and not sentence.startswith(name):
            sentence = sentence[0].lower() + sentence[1:]
        sentences.append(link + sentence)
        steps.append({"expr": expr, "value": value})
    sentences.append(phrasing(QUESTION, split, rng).format(**names))
    question = " ".join(sentences)
    return {"level": level, "question": question, "steps": steps, "answer": value}


def make_split(split: str, per_level: int, rng: random.Random) -> list[dict]:
    """``per_level`` distinct problems per level, shuffled, with ids ``<split>-NNNN``."""
    rows, seen = [], set()
    for level in LEVELS:
        count = 0
        while count < per_level:
            row = make_problem(level, split, rng)
            if row["question"] in seen:
                continue
            seen.add(row["question"])
            rows.append(row)
            count += 1
    rng.shuffle(rows)
    return [{"id": f"{split}-{i:04d}", "level": r["level"], "question": r["question"],
             "steps": r["steps"], "answer": r["answer"]} for i, r in enumerate(rows)]


def build() -> dict[str, list[dict]]:
    """Both splits, from one seeded generator (train first, then test)."""
    rng = random.Random(SEED)
    return {"train": make_split("train", 200, rng), "test": make_split("test", 50, rng)}


def write(folder: Path = HERE) -> dict[str, Path]:
    """Write ``reasoning_{train,test}.jsonl`` into ``folder``; returns the paths."""
    paths = {}
    for split, rows in build().items():
        path = Path(folder) / f"reasoning_{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        paths[split] = path
    return paths


if __name__ == "__main__":
    for split, path in write().items():
        print(f"{split}: {path}")
