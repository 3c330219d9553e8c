"""Regenerate lesson 5's preference pairs: ``python -m brewslm_helpers.data.make_preference_data``.

BrewBot is the assistant of a coffee shop. Each user message holds the shop's card (two drinks with
their prices and sizes, and the opening hours) and one question about it. Each row pairs two replies
to it: ``chosen`` is short, correct and taken from the card; ``rejected`` is worse in one of three
ways (``kind``):

- ``wrong``: the same short sentence with the wrong value *from the card*: the other drink's price or
  size, or the closing time for the opening time (and back), so copying a number from the card is not
  enough, the reply has to take the right one;
- ``refusal``: an unhelpful refusal, although the answer is on the card;
- ``verbose``: the correct sentence buried in filler (a preamble, hedging, a sign-off).

Files, built from templates with a fixed seed (reproducible byte for byte):

- ``preference_train.jsonl``: 480 pairs, 160 of each kind;
- ``preference_test.jsonl``: 120 held-out pairs, 40 of each kind.

Record schema (one JSON object per line)::

    {"id": "test-0007", "kind": "wrong", "field": "price",
     "user": "Card: iced latte 4.10 EUR, 350 ml; affogato 3.60 EUR, 120 ml. …\\nQuestion: How much is the iced latte?",
     "answer": "4.10 EUR",
     "chosen": "The iced latte costs 4.10 EUR.", "rejected": "The iced latte costs 3.60 EUR."}

``answer`` is the value on the card that a correct reply must state (lesson 5's judge looks for it).

What is held out: the test split uses drinks that never occur in the train split, one question
phrasing per field, one refusal and one filler phrasing that only the test split uses. Prices, sizes
and hours are drawn from the same ranges in both splits.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

TRAIN_DRINKS = ["espresso", "flat white", "cappuccino", "latte", "mocha", "americano", "cortado",
                "chai latte", "cold brew", "hot chocolate", "matcha latte", "filter coffee",
                "oat latte", "caramel latte", "lungo", "doppio"]
TEST_DRINKS = ["iced latte", "macchiato", "affogato", "pour-over", "ristretto", "spiced mocha",
               "honey latte", "golden milk"]

# The last phrasing of each list is held out: only the test split uses it.
QUESTIONS = {
    "price": ["How much is the {drink}?", "What does a {drink} cost?", "Price of the {drink}?",
              "How much do you charge for a {drink}?", "I'd like a {drink}. How much will that be?"],
    "size": ["How big is the {drink}?", "What size is the {drink}?", "How many ml is a {drink}?",
             "Is the {drink} a large cup? How much is in it?"],
    "open": ["When do you open?", "What time do you open?", "What time can I come in the morning?",
             "How early are you open?"],
    "close": ["When do you close?", "What time do you close today?", "Until when are you open?",
              "How late can I drop by?"],
}
ANSWERS = {"price": "The {drink} costs {value}.", "size": "The {drink} is {value}.",
           "open": "We open at {value}.", "close": "We close at {value}."}
REFUSALS = ["I'm sorry, but I can't help with that.", "I don't have access to that information.",
            "As an AI, I cannot know the details of this shop.",
            "I'm not able to answer questions about prices or hours.",
            "Unfortunately, I can't provide that information. Please ask a staff member."]
PREAMBLES = ["Great question! Let me look at the card for you.", "Thanks for asking, I'm happy to help!",
             "Sure thing! That's something a lot of our customers ask about.",
             "Of course! I checked the information available to me."]
SIGNOFFS = ["I hope this helps, and have a wonderful day!",
            "Let me know if there's anything else I can do for you.",
            "Details can change, so you may want to double-check with the barista.",
            "Enjoy your visit, and feel free to ask me anything else!"]
KINDS = ("wrong", "refusal", "verbose")


def _card(rng: random.Random) -> dict:
    """Prices and sizes of two drinks (the asked-about one, then the other; never equal), and the
    opening hours."""
    prices = rng.sample(range(180, 560, 10), 2)
    sizes = rng.sample([60, 120, 180, 240, 300, 350, 400], 2)
    return {"price": f"{prices[0] / 100:.2f} EUR",
            "other_price": f"{prices[1] / 100:.2f} EUR", "size": f"{sizes[0]} ml", "other_size": f"{sizes[1]} ml",
            "open": f"{rng.choice([6, 7, 8])}:{rng.choice(['00', '30'])}",
            "close": f"{rng.choice([16, 17, 18, 19, 20])}:{rng.choice(['00', '30'])}"}


WRONG_FIELD = {"price": "other_price", "size": "other_size", "open": "close", "close": "open"}


def _pair(rng: random.Random, drinks: list[str], kind: str, held_out: bool) -> dict:
    drink, other = rng.sample(drinks, 2)
    card = _card(rng)
    field = rng.choice(list(QUESTIONS))
    pick = (lambda xs: xs[-1]) if held_out else (lambda xs: rng.choice(xs[:-1]))
    question = pick(QUESTIONS[field]).format(drink=drink)
    listed = [f"{drink} {card['price']}, {card['size']}", f"{other} {card['other_price']}, {card['other_size']}"]
    rng.shuffle(listed)
    user = f"Card: {'; '.join(listed)}. Open {card['open']} to {card['close']}.\nQuestion: {question}"
    chosen = ANSWERS[field].format(drink=drink, value=card[field])
    if kind == "wrong":
        rejected = ANSWERS[field].format(drink=drink, value=card[WRONG_FIELD[field]])
    elif kind == "refusal":
        rejected = pick(REFUSALS)
    else:
        rejected = f"{pick(PREAMBLES)} {chosen} {pick(SIGNOFFS)}"
    return {"kind": kind, "field": field, "user": user, "answer": card[field],
            "chosen": chosen, "rejected": rejected}


def make_split(name: str, drinks: list[str], per_kind: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = [_pair(rng, drinks, kind, held_out=name == "test")
            for kind in KINDS for _ in range(per_kind)]
    rng.shuffle(rows)
    return [{"id": f"{name}-{i:04d}", **row} for i, row in enumerate(rows)]


def main(out_dir: Path = HERE) -> None:
    for name, drinks, per_kind, seed in (("train", TRAIN_DRINKS, 160, 5), ("test", TEST_DRINKS, 40, 55)):
        rows = make_split(name, drinks, per_kind, seed)
        with open(Path(out_dir) / f"preference_{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"preference_{name}.jsonl: {len(rows)} pairs")


if __name__ == "__main__":
    main()
