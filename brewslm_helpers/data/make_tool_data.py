"""Regenerate lesson 12's tool-use data: ``python -m brewslm_helpers.data.make_tool_data``.

Two JSON-lines files of user requests for the router of lesson 12, built from phrase templates with a
fixed seed (reproducible byte for byte):

- ``tool_train.jsonl``: 400 rows (300 that need a tool call, 100 that need none);
- ``tool_test.jsonl``: 80 held-out rows (60 tool calls, 20 no-tool).

Record schema (one JSON object per line)::

    {"id": "test-0007", "request": "How much is 250 euros in yen?",
     "call": {"name": "convert_currency",
              "arguments": {"amount": 250, "from_currency": "EUR", "to_currency": "JPY"}}}
    {"id": "test-0008", "request": "Write a haiku about autumn.", "call": null}

``call`` is the gold call for the catalogue in ``brewslm_helpers/tools.py`` (``null``: no tool is
needed). Gold arguments hold exactly what the user said: an optional argument the user did not ask
for (``unit``, ``label``) is absent.

What is held out: the test split uses cities, countries and topics that never occur in the train
split, and one phrasing per tool (the last template of each list below) that only the test split
uses. Amounts and minutes are drawn from the same ranges in both splits. The no-tool requests include
near misses that mention weather, time, money or timers without needing a tool.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

TRAIN_CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Prague", "Dublin",
                "Oslo", "Stockholm", "Helsinki", "Warsaw", "Athens", "Cairo", "Nairobi", "Lagos",
                "Tokyo", "Seoul", "Beijing", "Bangkok", "Singapore", "Sydney", "Auckland",
                "Toronto", "Chicago", "Boston", "Denver", "Lima", "Bogota", "Santiago",
                "New York", "Los Angeles", "Mexico City", "Rio de Janeiro", "Cape Town"]
TEST_CITIES = ["Amsterdam", "Brussels", "Budapest", "Copenhagen", "Istanbul", "Mumbai", "Hanoi",
               "Manila", "Montreal", "Seattle", "Buenos Aires", "San Francisco", "Kuala Lumpur"]
CURRENCIES = {"USD": ["dollars", "US dollars"], "EUR": ["euros"], "GBP": ["pounds", "British pounds"],
              "JPY": ["yen", "Japanese yen"], "CHF": ["Swiss francs"], "CAD": ["Canadian dollars"],
              "AUD": ["Australian dollars"], "INR": ["rupees", "Indian rupees"],
              "SEK": ["Swedish kronor"], "MXN": ["Mexican pesos"]}
UNITS = {"celsius": ["celsius", "Celsius", "degrees Celsius"],
         "fahrenheit": ["fahrenheit", "Fahrenheit", "degrees Fahrenheit"]}
LABELS = ["pasta", "laundry", "tea", "oven", "meeting", "workout", "eggs", "bread", "nap", "pizza"]

WEATHER = ["What's the weather in {city}?", "What is the weather like in {city} right now?",
           "Is it raining in {city}?", "weather {city}", "How warm is it in {city} today?",
           "I'm heading to {city} this afternoon. What's the weather there?",
           "Can you check the current weather for {city}?"]
WEATHER_UNIT = ["What's the temperature in {city} in {unit}?",
                "Weather in {city} please, in {unit}.",
                "How hot is it in {city}? Give it to me in {unit}.",
                "Show me the weather for {city} in {unit}."]
TIME = ["What time is it in {city}?", "Current local time in {city}, please.",
        "Do you know the time in {city} right now?", "time in {city}?",
        "I need to call a friend in {city}. What time is it there?",
        "Tell me the local time in {city}."]
CONVERT = ["Convert {amount} {frm} to {to}.", "How much is {amount} {frm_name} in {to_name}?",
           "What are {amount} {frm} worth in {to}?", "{amount} {frm} to {to}",
           "I have {amount} {frm_name}. How many {to_name} is that?",
           "Please change {amount} {frm_name} into {to_name}."]
TIMER = ["Set a timer for {minutes} minutes.", "Start a {minutes} minute timer.",
         "timer {minutes} min", "Count down {minutes} minutes for me.",
         "Please set a {minutes}-minute timer."]
TIMER_LABEL = ["Set a timer for {minutes} minutes for the {label}.",
               "Start a {minutes} minute timer called {label}.",
               "Can you time {minutes} minutes for my {label}?",
               "Timer for the {label}: {minutes} minutes."]

TRAIN_COUNTRIES = ["France", "Italy", "Japan", "Kenya", "Peru", "Norway", "Egypt", "Canada",
                   "Chile", "Spain", "Greece", "India"]
TEST_COUNTRIES = ["Portugal", "Vietnam", "Morocco", "Finland", "Colombia", "Ireland"]
TRAIN_TOPICS = ["cats", "the sea", "autumn", "coffee", "mountains", "trains", "the moon", "rain"]
TEST_TOPICS = ["owls", "winter", "bicycles", "libraries", "the desert"]
NO_TOOL = ["What is the capital of {country}?", "Tell me a joke about {topic}.",
           "Write a haiku about {topic}.", "Give me three fun facts about {country}.",
           "What language do people speak in {country}?", "Why is the sky blue?",
           "Thanks, that's all for now!", "How do I boil an egg?",
           "What is the difference between Celsius and Fahrenheit?",
           "Why do exchange rates change?", "What is a time zone?",
           "Is {city} a nice place to visit?", "Explain what a timer is to a child.",
           "Summarise the plot of Romeo and Juliet in one sentence.",
           "What is 12 times 7?", "Suggest a name for a black cat.",
           "What should I pack for a trip to {country}?",
           "Who was the first person to walk on the moon?",
           "Recommend a good book about {topic}."]
TEST_ONLY_NO_TOOL = ["Can you explain how weather forecasts are made?"]


def _amount(rng: random.Random):
    if rng.random() < 0.7:
        return rng.choice([5, 10, 20, 25, 40, 50, 75, 100, 120, 150, 200, 250, 300, 500, 750,
                           1000, 1200, 2500, 5000])
    return round(rng.uniform(1, 500), 2)


def _tool_row(rng: random.Random, cities: list[str], held_out: bool) -> tuple[str, dict]:
    """One request that needs a tool. ``held_out``: may use each list's last (test-only) template."""
    def pick(templates):
        return rng.choice(templates if held_out else templates[:-1])

    tool = rng.choice(["get_weather", "get_time", "convert_currency", "set_timer"])
    if tool == "get_weather":
        city = rng.choice(cities)
        if rng.random() < 0.4:
            unit = rng.choice(sorted(UNITS))
            return pick(WEATHER_UNIT).format(city=city, unit=rng.choice(UNITS[unit])), {
                "name": tool, "arguments": {"city": city, "unit": unit}}
        return pick(WEATHER).format(city=city), {"name": tool, "arguments": {"city": city}}
    if tool == "get_time":
        city = rng.choice(cities)
        return pick(TIME).format(city=city), {"name": tool, "arguments": {"city": city}}
    if tool == "convert_currency":
        frm, to = rng.sample(sorted(CURRENCIES), 2)
        amount = _amount(rng)
        text = pick(CONVERT).format(amount=amount, frm=frm, to=to, frm_name=rng.choice(CURRENCIES[frm]),
                                    to_name=rng.choice(CURRENCIES[to]))
        return text, {"name": tool, "arguments": {"amount": amount, "from_currency": frm, "to_currency": to}}
    minutes = rng.choice(list(range(1, 16)) + [20, 25, 30, 40, 45, 60, 90, 120])
    if rng.random() < 0.4:
        label = rng.choice(LABELS)
        return pick(TIMER_LABEL).format(minutes=minutes, label=label), {
            "name": tool, "arguments": {"minutes": minutes, "label": label}}
    return pick(TIMER).format(minutes=minutes), {"name": tool, "arguments": {"minutes": minutes}}


def _no_tool_row(rng: random.Random, countries, topics, cities, held_out: bool) -> str:
    templates = NO_TOOL + (TEST_ONLY_NO_TOOL if held_out else [])
    return rng.choice(templates).format(country=rng.choice(countries), topic=rng.choice(topics),
                                        city=rng.choice(cities))


def make_split(prefix: str, n_tool: int, n_none: int, seed: int, held_out: bool,
               exclude: set[str] = frozenset()) -> list[dict]:
    """``n_tool`` + ``n_none`` unique requests (shuffled), none of them in ``exclude``."""
    rng = random.Random(seed)
    cities = TEST_CITIES if held_out else TRAIN_CITIES
    countries = TEST_COUNTRIES if held_out else TRAIN_COUNTRIES
    topics = TEST_TOPICS if held_out else TRAIN_TOPICS
    seen, rows = set(exclude), []
    while sum(r["call"] is not None for r in rows) < n_tool:
        text, call = _tool_row(rng, cities, held_out)
        if text not in seen:
            seen.add(text)
            rows.append({"request": text, "call": call})
    n_unique_none = 0
    tries = 0
    while n_unique_none < n_none:
        text = _no_tool_row(rng, countries, topics, cities, held_out)
        tries += 1
        if text not in seen or tries > 50 * n_none:  # a few fixed questions may repeat
            seen.add(text)
            rows.append({"request": text, "call": None})
            n_unique_none += 1
    rng.shuffle(rows)
    return [{"id": f"{prefix}-{i:04d}", **row} for i, row in enumerate(rows)]


def main(out_dir: Path = HERE) -> None:
    """Write ``tool_train.jsonl`` and ``tool_test.jsonl`` to ``out_dir``."""
    test = make_split("test", 60, 20, seed=12_001, held_out=True)
    train = make_split("train", 300, 100, seed=12_000, held_out=False,
                       exclude={r["request"] for r in test})
    for name, rows in (("tool_train.jsonl", train), ("tool_test.jsonl", test)):
        with open(Path(out_dir) / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows)} rows to {Path(out_dir) / name}")


if __name__ == "__main__":
    main()
