"""Lesson 11 plumbing for the production feedback loop: a labelled PII corpus, Presidio set up to run
offline, the request log's table, the simulated production week (traffic, users' thumbs-down, a
reviewer), and the retrain's data and training call.

What the lesson teaches is **not here** (it is the student's work): the Luhn check, redaction from
findings, the per-day sampling budget, turning tags into SFT examples, and the retrain trigger.

- :func:`pii_corpus` — support messages with realistic PII made by Faker in five locales (emails,
  phone numbers in each country's formats, Luhn-valid card numbers of several brands and lengths,
  IPv4/IPv6, customers' names) with the gold character spans, plus *decoys*: the numbers a redactor
  must leave alone (order numbers of 16 digits that fail Luhn, versions, dates, times, prices, SKUs,
  tracking numbers).
- :func:`presidio_analyzer` / :func:`presidio_findings` — Microsoft Presidio in recogniser-only mode
  (no spaCy model: none ships on the package registry), with its network lookups switched off; names
  come from a deny-list of the CRM's customers.
- :func:`span_scores` — recall per entity type, precision per type, and how many decoys survive.
- :func:`leaks` / :func:`normalise_text` — raw values found in a text; the text key that dedupe and
  the leakage check compare.
- :data:`REQUEST_LOG` — the redacted request log's table (next to the RunEvent ``events`` table).
- :func:`week_traffic`, :func:`thumbs_down`, :func:`review` — the simulated week.
- :func:`contrast_eval` — the held-out evaluation set of the slice the model gets wrong.
- :func:`sft_train` — LoRA SFT with TRL's ``SFTTrainer`` on prompt/completion examples.
"""
from __future__ import annotations

import random
import re
import unicodedata

import numpy as np

ENTITIES = ("EMAIL", "PHONE", "CARD", "IP", "PERSON")
PRESIDIO_ENTITY = {"EMAIL_ADDRESS": "EMAIL", "PHONE_NUMBER": "PHONE", "CREDIT_CARD": "CARD",
                   "IP_ADDRESS": "IP", "PERSON": "PERSON"}
LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES")
PHONE_REGIONS = ("US", "GB", "DE", "FR", "ES")
CARD_TYPES = ("visa16", "visa19", "mastercard", "amex", "discover", "jcb16", "diners")
DECOY_KINDS = ("ORDER16", "ORDER_ID", "VERSION", "DATE", "TIME", "PRICE", "SKU", "TRACKING")

# -------------------------------------------------------------------------------------------------
# Names and the labelled PII corpus


def _fakers(seed: int):
    from faker import Faker

    fakers = {}
    for i, loc in enumerate(LOCALES):
        f = Faker(loc)
        f.seed_instance(seed * 31 + i)
        fakers[loc] = f
    return fakers


def customer_roster(n: int = 300, seed: int = 0) -> list[str]:
    """``n`` distinct customer names ("First Last") from the CRM, in the five locales: what the
    deny-list recogniser knows. Names of anyone else (a friend, a barista) are not on it."""
    fakers = _fakers(1000 + seed)
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < n:
        f = fakers[rng.choice(LOCALES)]
        name = f"{f.first_name()} {f.last_name()}"
        if name not in names:
            names.append(name)
    return names


def _card(f, rng: random.Random) -> str:
    number = f.credit_card_number(card_type=rng.choice(CARD_TYPES))
    style = rng.random()
    if style < 0.4:
        return number
    sep = " " if style < 0.8 else "-"
    return sep.join(number[i:i + 4] for i in range(0, len(number), 4))


def _luhn_by_presidio(digits: str) -> bool:
    from presidio_analyzer.predefined_recognizers import CreditCardRecognizer

    return CreditCardRecognizer().validate_result(digits)


def _decoy(kind: str, rng: random.Random) -> str:
    if kind == "ORDER16":  # 16 digits grouped like a card, failing Luhn (checked by Presidio's own)
        while True:
            digits = str(rng.choice([4, 5])) + "".join(str(rng.randrange(10)) for _ in range(15))
            if not _luhn_by_presidio(digits):
                return " ".join(digits[i:i + 4] for i in range(0, 16, 4))
    if kind == "ORDER_ID":
        return f"ORD-{rng.randrange(2024, 2027)}-{rng.randrange(10**5, 10**6)}"
    if kind == "VERSION":
        return f"v{rng.randrange(1, 20)}.{rng.randrange(0, 40)}.{rng.randrange(0, 12)}"
    if kind == "DATE":
        y, m, d = rng.randrange(2024, 2027), rng.randrange(1, 13), rng.randrange(1, 29)
        return rng.choice([f"{y}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y}", f"{d}.{m}.{y}"])
    if kind == "TIME":
        return f"{rng.randrange(6, 23):02d}:{rng.randrange(0, 60):02d}"
    if kind == "PRICE":
        return rng.choice([f"€{rng.randrange(2, 40)}.{rng.randrange(100):02d}",
                           f"${rng.randrange(1, 3)},{rng.randrange(100, 1000)}.00",
                           f"£{rng.randrange(2, 12)}.{rng.randrange(100):02d}"])
    if kind == "SKU":
        return f"SKU-{rng.randrange(10**4, 10**5)}-{rng.choice('ABCDEFGH')}"
    if kind == "TRACKING":
        return "1Z" + "".join(rng.choice("0123456789ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(16))
    raise ValueError(f"unknown decoy kind {kind!r}: one of {DECOY_KINDS}")


_PII_LEADS = {
    "EMAIL": ["Send the receipt to {}.", "My email is {}.", "Reply to {} please.", "contact: {}"],
    "PHONE": ["Call me back on {}.", "My number is {}.", "Phone: {}", "Text me at {} after six."],
    "CARD": ["My card {} was charged twice.", "Refund it to card {} please.", "card no. {}"],
    "IP": ["The app logged me out from {}.", "Login attempt from {} was not me.", "IP {}"],
    "PERSON": ["This is {}.", "Regards, {}", "{} here, from the Friday group.",
               "The barista {} was lovely."],
}
_DECOY_LEADS = {
    "ORDER16": ["Order number {} never arrived.", "Reference {} on the invoice."],
    "ORDER_ID": ["Order {} is late.", "It's about order {}."],
    "VERSION": ["The app ({}) crashes at checkout.", "Since update {} the menu is empty."],
    "DATE": ["I visited on {}.", "Booked for {}."],
    "TIME": ["We came at {}.", "Pick-up at {}."],
    "PRICE": ["I paid {} for one latte.", "Charged {} instead of the menu price."],
    "SKU": ["The grinder {} is out of stock.", "Item {} was missing from the box."],
    "TRACKING": ["Tracking {} shows no movement.", "Parcel {} was returned."],
}


def _pii_value(entity: str, f, rng: random.Random, roster: list[str]) -> str:
    if entity == "EMAIL":
        return rng.choice([f.email, f.free_email, f.company_email])()
    if entity == "PHONE":
        return f.phone_number()
    if entity == "CARD":
        return _card(f, rng)
    if entity == "IP":
        return f.ipv4_public() if rng.random() < 0.7 else f.ipv6()
    if entity == "PERSON":
        return rng.choice(roster) if rng.random() < 0.8 else f"{f.first_name()} {f.last_name()}"
    raise ValueError(f"unknown entity {entity!r}: one of {ENTITIES}")


def pii_corpus(n: int, seed: int = 0, roster: list[str] | None = None,
               decoy_share: float = 0.3) -> list[dict]:
    """``n`` labelled support messages, seeded (the same arguments give the same corpus).

    Each: ``{"id", "locale", "text", "spans": [(start, end, entity, value)], "decoys": [(start, end,
    kind, value)]}``; offsets are Python string indices (``text[start:end] == value``). A share
    ``decoy_share`` of the messages hold only decoys (hard negatives); the rest hold 1-3 PII values
    (phone numbers in the message's locale; names from the customer ``roster`` four times in five,
    otherwise someone else's) and sometimes a decoy too.
    """
    roster = roster if roster is not None else customer_roster()
    fakers = _fakers(seed)
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        loc = rng.choice(LOCALES)
        f = fakers[loc]
        parts = []  # (sentence with {}, value, label)
        if rng.random() < decoy_share:
            for kind in rng.sample(DECOY_KINDS, rng.randint(1, 2)):
                parts.append((rng.choice(_DECOY_LEADS[kind]), _decoy(kind, rng), kind))
        else:
            for entity in rng.sample(ENTITIES, rng.randint(1, 3)):
                parts.append((rng.choice(_PII_LEADS[entity]), _pii_value(entity, f, rng, roster), entity))
            if rng.random() < 0.3:
                kind = rng.choice(DECOY_KINDS)
                parts.insert(rng.randrange(len(parts) + 1),
                             (rng.choice(_DECOY_LEADS[kind]), _decoy(kind, rng), kind))
        text, spans, decoys = "", [], []
        for lead, value, label in parts:
            before, after = lead.split("{}")
            text += (" " if text else "") + before
            (decoys if label in DECOY_KINDS else spans).append((len(text), len(text) + len(value), label, value))
            text += value + after
        docs.append({"id": f"pii-{seed}-{i:04d}", "locale": loc, "text": text, "spans": spans,
                     "decoys": decoys})
    return docs


# -------------------------------------------------------------------------------------------------
# Presidio, offline


def _offline_tldextract() -> None:
    """Presidio's email recogniser validates domains with ``tldextract``, which fetches the public
    suffix list from the network on first use (and prints a traceback when it cannot). Its bundled
    snapshot is enough: empty the URL list so it never asks."""
    import tldextract

    tldextract.tldextract.TLD_EXTRACTOR.suffix_list_urls = ()


def presidio_analyzer(person_names: list[str], *, extended: bool = True, phone_leniency: int = 1,
                      phone_regions: tuple[str, ...] = PHONE_REGIONS):
    """A Presidio ``AnalyzerEngine`` that runs offline: no NLP model (``NoOpNlpEngine``), and the
    recognisers for email, phone (Google's ``phonenumbers``, in ``phone_regions``), credit card
    (Luhn-validated), IPv4/IPv6, and a deny-list of ``person_names`` for PERSON.

    ``extended=False`` is Presidio's card and phone recognisers as they ship: the card pattern has at
    most 17 digits, and the phone recogniser only finds numbers in ranges a country has assigned.
    ``extended=True`` adds a second card pattern for 12-19 digits in groups (the 19-digit Visa and
    others), validated by the same Luhn check, and a phone-*shape* pattern (:class:`PhoneShape`:
    an optional +country code, an optional area code in brackets, groups of digits, an optional
    extension; 10-15 digits before the extension, the E.164 limit) at a lower score, which also finds
    numbers in unassigned or fictional ranges. ``phone_leniency`` is ``phonenumbers``' leniency
    (0 = the number's length is possible for its region, 1 = the number is valid: an assigned range).
    """
    _offline_tldextract()
    from presidio_analyzer import AnalyzerEngine, Pattern, PatternRecognizer, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NoOpNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IpRecognizer,
        PhoneRecognizer,
    )

    registry = RecognizerRegistry(supported_languages=["en"])
    registry.add_recognizer(EmailRecognizer())
    registry.add_recognizer(PhoneRecognizer(supported_regions=phone_regions, leniency=phone_leniency))
    registry.add_recognizer(CreditCardRecognizer())
    if extended:
        long_cards = Pattern("cards of 12-19 digits in groups", r"\b\d{4}(?:[ -]?\d{2,6}){2,4}\b", 0.3)
        registry.add_recognizer(CreditCardRecognizer(patterns=[long_cards], name="LongCardRecognizer"))
        registry.add_recognizer(PhoneShape())
    registry.add_recognizer(IpRecognizer())
    registry.add_recognizer(PatternRecognizer(supported_entity="PERSON", deny_list=list(person_names),
                                              name="CustomerNames"))
    nlp = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
    return AnalyzerEngine(nlp_engine=nlp, registry=registry, supported_languages=["en"])


_PHONE_SHAPE = (r"(?:\+\d{1,3}[ .-]?|00\d{1,3}[ .-]?)?(?:\(0\)[ ]?)?(?:\(\d{2,5}\)[ .-]?)?"
                r"\d{2,5}(?:[ .-]?\d{2,5}){1,4}(?:[ ]?(?:x|ext\.?)[ ]?\d{1,6})?")


def _phone_shape_class():
    from presidio_analyzer import Pattern, PatternRecognizer

    class PhoneShape(PatternRecognizer):
        """A phone number by its shape: 10-15 digits (E.164's limit) before an optional extension."""

        def __init__(self):
            super().__init__(supported_entity="PHONE_NUMBER", name="PhoneShape",
                             patterns=[Pattern("phone shape", _PHONE_SHAPE, 0.3)])

        def invalidate_result(self, pattern_text: str) -> bool:  # True drops it; the score stays 0.3
            main = re.split(r"\s?(?:x|ext)", pattern_text, maxsplit=1)[0]
            return not 10 <= len(_digits(main)) <= 15

    return PhoneShape


def PhoneShape():  # noqa: N802 - a factory that reads like the class it makes (presidio imports lazily)
    return _phone_shape_class()()


_DATE = re.compile(r"\d{1,4}[./-]\d{1,2}[./-]\d{1,4}")


def _plausible(text: str, start: int, end: int, entity: str) -> bool:
    """Filters every finding goes through: no finding starts or ends inside a longer token (the
    digits of "ORD-2026-118734" or "SKU-48213-C" are an identifier, not a phone number); a phone
    number has at most 15 digits before its extension (E.164), is not a date, and is not part of a
    longer run of digit groups (a 16-digit order number is not a phone number followed by more)."""
    def joined(i: int, step: int) -> bool:  # text[i] continues the token (one separator allowed)
        if not 0 <= i < len(text):
            return False
        if text[i].isalnum():
            return True
        j = i + step
        return text[i] in "-/." and 0 <= j < len(text) and text[j].isalnum()

    if joined(start - 1, -1) or joined(end, 1):
        return False
    if entity == "PHONE":
        span = text[start:end]
        main = re.split(r"\s?(?:x|ext)", span, maxsplit=1)[0]
        if len(_digits(main)) > 15 or _DATE.fullmatch(span.strip()):
            return False
        if (start >= 2 and text[start - 1] in " -" and text[start - 2].isdigit()) or \
                (end + 1 < len(text) and text[end] in " -" and text[end + 1].isdigit()):
            return False
    return True


def presidio_findings(analyzer, text: str, min_score: float = 0.0,
                      filters: bool = True) -> list[tuple[int, int, str, float]]:
    """What ``analyzer`` finds in ``text``: ``(start, end, entity, score)`` with the course's entity
    names (:data:`ENTITIES`), sorted by start, end. Overlapping findings are all returned (a card
    number is often also a possible phone number, at a lower score): resolving them is redaction's
    job. ``filters=True`` drops the findings :func:`_plausible` rejects (inside identifiers, phone
    numbers that are too long, dates, or pieces of longer numbers)."""
    out = []
    for r in analyzer.analyze(text=text, language="en", entities=list(PRESIDIO_ENTITY)):
        entity = PRESIDIO_ENTITY[r.entity_type]
        if r.score >= min_score and (not filters or _plausible(text, int(r.start), int(r.end), entity)):
            out.append((int(r.start), int(r.end), entity, float(r.score)))
    return sorted(set(out))


# -------------------------------------------------------------------------------------------------
# Scores


def _covered(start: int, end: int, text: str, findings) -> bool:
    """Every letter and digit of text[start:end] lies inside some finding."""
    mask = np.zeros(len(text), bool)
    for s, e, *_ in findings:
        mask[s:e] = True
    return all(mask[i] for i in range(start, end) if text[i].isalnum())


def span_scores(docs: list[dict], findings: list[list[tuple]]):
    """Per entity type: ``gold`` spans, ``recall`` (spans whose every letter and digit lies inside
    some finding, whatever its label: redaction hides it), ``found`` (findings with that label),
    ``precision`` (of those, the share overlapping a gold PII span); and per decoy kind: ``decoys``
    and ``untouched`` (the share no finding overlaps). Returns two pandas DataFrames."""
    import pandas as pd

    rows = {e: {"gold": 0, "recalled": 0, "found": 0, "true": 0} for e in ENTITIES}
    dec = {k: {"decoys": 0, "kept": 0} for k in DECOY_KINDS}
    for doc, fs in zip(docs, findings):
        text = doc["text"]
        for s, e, ent, _ in doc["spans"]:
            rows[ent]["gold"] += 1
            rows[ent]["recalled"] += _covered(s, e, text, fs)
        for fs_, fe, ent, _ in fs:
            rows[ent]["found"] += 1
            rows[ent]["true"] += any(fs_ < e and s < fe for s, e, *_ in doc["spans"])
        for s, e, kind, _ in doc["decoys"]:
            dec[kind]["decoys"] += 1
            dec[kind]["kept"] += not any(fs_ < e and s < fe for fs_, fe, *_ in fs)
    per_entity = pd.DataFrame([{"entity": e, "gold": r["gold"],
                                "recall": r["recalled"] / r["gold"] if r["gold"] else np.nan,
                                "found": r["found"],
                                "precision": r["true"] / r["found"] if r["found"] else np.nan}
                               for e, r in rows.items()]).set_index("entity")
    per_decoy = pd.DataFrame([{"decoy": k, "decoys": d["decoys"],
                               "untouched": d["kept"] / d["decoys"] if d["decoys"] else np.nan}
                              for k, d in dec.items()]).set_index("decoy")
    return per_entity, per_decoy


def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def leaks(text: str, values: list[str]) -> list[str]:
    """The raw PII ``values`` still readable in ``text``: verbatim (case-insensitive), or for a value
    of 7 or more digits, its digit string inside the text's digits with separators removed."""
    low, digits = text.casefold(), _digits(text)
    out = []
    for v in values:
        d = _digits(v)
        if v.casefold() in low or (len(d) >= 7 and d in digits):
            out.append(v)
    return out


def normalise_text(text: str) -> str:
    """The key two texts are "the same review" under: Unicode NFKC, case-folded, every run of
    punctuation, symbols and white space one space, stripped."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c if c.isalnum() else " " for c in text)
    return " ".join(text.split())


# -------------------------------------------------------------------------------------------------
# The request log

REQUEST_LOG = """
CREATE TABLE IF NOT EXISTS requests (
    request_id  TEXT PRIMARY KEY,
    day         INTEGER NOT NULL,
    time        TEXT    NOT NULL,
    text        TEXT    NOT NULL,   -- the user's message, redacted before it was written
    predicted   TEXT    NOT NULL,   -- the model's answer: positive / negative / error
    p_positive  REAL,
    latency_ms  REAL    NOT NULL,
    redactions  TEXT    NOT NULL    -- JSON {entity: count}
);
"""


# -------------------------------------------------------------------------------------------------
# The slice the model gets wrong: contrast and negation

_ITEMS = ["espresso", "latte", "flat white", "cappuccino", "cortado", "mocha", "cold brew",
          "chai latte", "americano", "croissant", "banana bread", "oat latte", "macchiato", "filter coffee"]
_GOOD = ["delicious", "smooth", "rich", "perfectly balanced", "wonderful", "excellent", "lovely",
         "fantastic", "spot on", "really good"]
_BAD = ["bitter", "burnt", "watery", "stale", "lukewarm", "sour", "bland", "awful", "terrible", "flat"]
_CONTRAST = {
    "positive": [
        "I expected the {item} to be {bad}, but it was {good}.",
        "The {item} was not {bad} at all.",
        "Everyone warned me the {item} was {bad}. It was {good}.",
        "I was ready to complain, yet the {item} was {good}.",
        "The queue was awful and the chairs were terrible, but the {item} was {good}.",
        "Never had a {bad} {item} here.",
        "The {item} was anything but {bad}.",
        "The reviews said {bad}, I found the {item} {good}.",
    ],
    "negative": [
        "I wanted to love the {item}, but it was {bad}.",
        "The {item} was not {good} at all.",
        "Everyone said the {item} was {good}. It was {bad}.",
        "Lovely staff and a beautiful room, but the {item} was {bad}.",
        "The {item} looked {good}, then it tasted {bad}.",
        "I would never call this {item} {good}.",
        "The {item} was anything but {good}.",
        "The reviews said {good}, I found the {item} {bad}.",
    ],
}


def contrast_review(rng: random.Random, label: str) -> str:
    """A review whose sentiment words point the other way (contrast, negation): the slice a small
    model that reads the words and not the sentence gets wrong."""
    template = rng.choice(_CONTRAST[label])
    return template.format(item=rng.choice(_ITEMS), good=rng.choice(_GOOD), bad=rng.choice(_BAD))


def contrast_eval(n: int, seed: int = 12345) -> list[dict]:
    """``n`` held-out contrast reviews, balanced: ``{"id", "text", "label"}``, distinct texts."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        label = ("positive", "negative")[len(rows) % 2]
        text = contrast_review(rng, label)
        if text not in seen:
            seen.add(text)
            rows.append({"id": f"contrast-eval-{len(rows):04d}", "text": text, "label": label})
    return rows


def _retype(rng: random.Random, text: str) -> str:
    """How people retype the same review: case, spacing and punctuation change, the words do not."""
    r = rng.random()
    if r < 0.15:
        return text.lower()
    if r < 0.25:
        return text.replace(" ", "  ", 1)
    if r < 0.35:
        return text.rstrip(".") + "!!"
    if r < 0.4:
        return text.upper()
    return text


# -------------------------------------------------------------------------------------------------
# The simulated week


def week_traffic(days: int, per_day: int, seed: int, *, spike_day: int | None = None,
                 spike_factor: int = 5, contrast_from: int = 2, contrast_share: float = 0.35,
                 shifted_share: float = 0.15, pii_share: float = 0.3,
                 roster: list[str] | None = None) -> list[dict]:
    """The requests of ``days`` simulated days, in arrival order.

    Each day has ``per_day`` requests (``spike_factor`` times as many on ``spike_day``): reviews from
    the training distribution, lesson 9's shifted stream (other languages, coffee machines) with share
    ``shifted_share``, and from day ``contrast_from`` on a share ``contrast_share`` of contrast reviews
    (a new in-app prompt, "what did you expect, and what did you get?"). A share ``pii_share`` of the
    requests carry PII after the review (a customer's signature, with a name from ``roster``; an
    email, a phone number, a card number pasted by mistake). People retype reviews, so some texts
    repeat with other case or punctuation.

    Each request: ``{"request_id", "day", "second" (of the day), "text" (raw, with the PII),
    "label" (the truth: the simulation's, never the log's), "stream", "pii": [values]}``.
    """
    from .data import load_reviews
    from .drift import traffic

    roster = roster if roster is not None else customer_roster()
    rng = random.Random(seed)
    fakers = _fakers(seed + 7)
    normal = load_reviews("train")
    shifted = traffic("shifted", 4 * days * per_day, seed=seed)
    out = []
    for day in range(days):
        n = per_day * (spike_factor if day == spike_day else 1)
        seconds = sorted(rng.uniform(0, 86400) for _ in range(n))
        for j, sec in enumerate(seconds):
            r = rng.random()
            share = contrast_share if day >= contrast_from else 0.0
            if r < share:
                label = rng.choice(["positive", "negative"])
                text, stream = contrast_review(rng, label), "contrast"
            elif r < share + shifted_share:
                row = rng.choice(shifted)
                text, label, stream = row["text"], row["label"], "shifted"
            else:
                row = rng.choice(normal)
                text, label, stream = row["text"], row["label"], "normal"
            text = _retype(rng, text)
            pii = []
            if rng.random() < pii_share:
                f = fakers[rng.choice(LOCALES)]
                entity = rng.choice(["EMAIL", "PHONE", "CARD", "PERSON"])
                if entity == "PERSON":  # a customer signs the review with their own name
                    value, lead = rng.choice(roster), rng.choice(["This is {}.", "Regards, {}"])
                else:
                    value, lead = _pii_value(entity, f, rng, roster), rng.choice(_PII_LEADS[entity])
                text += " " + lead.format(value)
                pii.append(value)
            out.append({"request_id": f"req-{day}-{j:04d}", "day": day, "second": sec, "text": text,
                        "label": label, "stream": stream, "pii": pii})
    return out


def thumbs_down(requests: list[dict], predicted: list[str], seed: int, p_wrong: float = 0.7,
                p_right: float = 0.03) -> list[str]:
    """The request ids whose users pressed thumbs-down: with probability ``p_wrong`` when the model's
    answer was wrong, ``p_right`` when it was right (people also press it by mistake, or at the
    coffee)."""
    rng = np.random.default_rng(seed)
    out = []
    for r, pred in zip(requests, predicted):
        p = p_wrong if pred != r["label"] else p_right
        if rng.random() < p:
            out.append(r["request_id"])
    return out


def review(request_ids: list[str], truth: dict[str, str], seed: int, error_rate: float = 0.03,
           second_opinion: float = 0.2, reviewers=("ana", "ben")) -> list[dict]:
    """A human reviewer's corrections for the queued ``request_ids``: ``{"request_id", "source":
    "manual", "reviewer", "correction"}`` with the right label, except a share ``error_rate`` of
    slips; a share ``second_opinion`` of the rows is reviewed by a second person too (so two
    corrections of one row can disagree). ``truth`` maps request ids to labels."""
    rng = random.Random(seed)
    other = {"positive": "negative", "negative": "positive"}
    tags = []
    for rid in request_ids:
        people = [reviewers[0]] + ([reviewers[1]] if rng.random() < second_opinion else [])
        for who in people:
            label = truth[rid] if rng.random() >= error_rate else other[truth[rid]]
            tags.append({"request_id": rid, "source": "manual", "reviewer": who, "correction": label})
    return tags


# -------------------------------------------------------------------------------------------------
# The retrain


def sft_train(model, tokenizer, examples: list[dict], *, steps: int, batch_size: int, lr: float,
              lora_r: int = 8, seed: int = 0):
    """LoRA SFT of ``model`` on prompt/completion ``examples`` (TRL ``SFTTrainer``, loss on the
    completion only, CPU). Returns ``(peft_model, losses)``; the base weights are not changed
    (``peft_model.unload()`` gives them back)."""
    import tempfile

    from datasets import Dataset
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in examples])
    lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, bias="none",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="brewslm-11-"), use_cpu=True, bf16=False,
                     gradient_checkpointing=False, seed=seed, data_seed=seed, max_steps=steps,
                     per_device_train_batch_size=batch_size, learning_rate=lr,
                     lr_scheduler_type="constant_with_warmup", warmup_steps=min(3, steps // 5),
                     max_length=256, logging_steps=1, save_strategy="no", report_to="none",
                     dataloader_num_workers=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=lora)
    trainer.remove_callback(PrinterCallback)   # the losses are returned, not printed line by line
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer.model, losses
