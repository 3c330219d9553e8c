"""Regenerate lesson 7's arithmetic task: ``python -m brewslm_helpers.data.make_arith_data``.

Addition problems with a natural difficulty axis (how many digits, how many carries), drawn with a
fixed seed so the files are reproducible byte for byte:

- ``arith_train.jsonl``: 4000 rows, 1000 for each size of the longer operand (1 to 4 digits);
- ``arith_test.jsonl``: 200 held-out rows, 50 per size; no (a, b) pair of the test split occurs in
  the train split.

Record schema (one JSON object per line)::

    {"id": "train-0007", "a": 4071, "b": 385, "question": "4071+385=", "answer": "4456", "digits": 4}

``digits`` is the number of digits of the longer operand; the shorter one has 1 to ``digits``
digits. Lesson 7 makes this the high-resource task (synthetic data is cheap) and asks for a finer
difficulty score (digits and carries) as an exercise.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
TRAIN_PER_SIZE = 1000
TEST_PER_SIZE = 50
SIZES = (1, 2, 3, 4)
SEED = 7


def _number(rng: random.Random, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10 ** digits - 1)


def _pair(rng: random.Random, digits: int) -> tuple[int, int]:
    other = rng.randint(1, digits)
    a, b = _number(rng, digits), _number(rng, other)
    return (a, b) if rng.random() < 0.5 else (b, a)


def _draw(rng: random.Random, per_size: int, exclude: set, unique: bool) -> list[tuple[int, tuple[int, int]]]:
    """``per_size`` pairs for each size, skipping pairs in ``exclude`` (which grows if ``unique``)."""
    out = []
    for digits in SIZES:
        made = 0
        while made < per_size:
            pair = _pair(rng, digits)
            if pair in exclude:
                continue
            if unique:
                exclude.add(pair)
            out.append((digits, pair))
            made += 1
    return out


def make_rows(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """``(train, test)`` rows; the test pairs are drawn first and excluded from the train split."""
    rng = random.Random(seed)
    held_out: set = set()
    test = _draw(rng, TEST_PER_SIZE, held_out, unique=True)
    train = _draw(rng, TRAIN_PER_SIZE, held_out, unique=False)
    rng.shuffle(train)
    rng.shuffle(test)

    def record(split, i, digits, pair):
        a, b = pair
        return {"id": f"{split}-{i:04d}", "a": a, "b": b, "question": f"{a}+{b}=",
                "answer": str(a + b), "digits": digits}

    return ([record("train", i, d, p) for i, (d, p) in enumerate(train)],
            [record("test", i, d, p) for i, (d, p) in enumerate(test)])


def write(folder: Path = HERE) -> list[Path]:
    """Write both files into ``folder``; returns their paths."""
    train, test = make_rows()
    paths = []
    for name, rows in (("arith_train.jsonl", train), ("arith_test.jsonl", test)):
        path = Path(folder) / name
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for path in write():
        print(f"wrote {path}")
