"""The RunEvent spine's plumbing: the SQLite connection, the table, canonical JSON, digests, a
simulated clock and the views later cells read from the events.

Lesson 9 builds the spine: every train, eval, export and serve step of the course is one *RunEvent*
row in a real SQLite database. What the lesson teaches is **not here** (it is the student's work):

- the append-only guard (triggers that make the database itself refuse ``UPDATE`` and ``DELETE``),
- the hash chain (each row's ``hash`` covers the previous row's) and appending under the write lock,
- the verification that finds the first broken link, and the lineage / time-window queries.

What is here is the plumbing around it, which every lesson that keeps events shares (lesson 11
appends its logging and tagging events to the same kind of database):

- :data:`EVENTS_TABLE`: the table's columns (``CREATE TABLE IF NOT EXISTS``; no guard in it);
- :func:`connect`: a connection in WAL mode (readers never block the writer), with a busy timeout
  (a second writer waits for the lock instead of failing) and autocommit, so the caller opens its
  own transactions (``BEGIN IMMEDIATE`` takes the write lock at once);
- :func:`canonical_json` and :func:`digest`: the one serialisation every hash in the course uses;
- :func:`event_record`: the dict of the columns a row's hash covers, read back from a row;
- :class:`SimClock`: a simulated clock (a notebook never sleeps);
- :func:`read_events` and :func:`metrics_view`: reading rows back as dicts, and the serving metrics
  (latency percentiles, error rate, tokens/s) computed from ``serve`` events.

Row layout: ``id`` (1, 2, ... in append order), ``run_id``, ``kind`` (``"train"``, ``"eval"``,
``"export"``, ``"serve"``, ``"drift_check"``, ``"retrain_decision"``, ...), ``time`` (ISO-8601 UTC,
``YYYY-MM-DDTHH:MM:SS.ffffffZ``: sorts as text), ``actor`` (who or what wrote it), ``inputs_hash``
and ``outputs_hash`` (:func:`digest` of what went in and came out), ``metrics`` (canonical JSON
object), ``parent`` (the ``id`` of the event this one derives from, or NULL), ``prev_hash`` and
``hash`` (the chain).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import sqlite3
from pathlib import Path

import numpy as np

GENESIS = "0" * 64  # the prev_hash of the first event

RECORD_FIELDS = ("run_id", "kind", "time", "actor", "inputs_hash", "outputs_hash", "metrics", "parent")

EVENTS_TABLE = """
CREATE TABLE IF NOT EXISTS events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id       TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    time         TEXT    NOT NULL,
    actor        TEXT    NOT NULL,
    inputs_hash  TEXT    NOT NULL,
    outputs_hash TEXT    NOT NULL,
    metrics      TEXT    NOT NULL,
    parent       INTEGER REFERENCES events(id),
    prev_hash    TEXT    NOT NULL,
    hash         TEXT    NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS events_kind_time ON events(kind, time);
CREATE INDEX IF NOT EXISTS events_parent ON events(parent);
"""


def connect(path: str | Path, timeout_s: float = 30.0) -> sqlite3.Connection:
    """A connection to the SQLite file ``path`` in WAL mode, autocommit, with a busy timeout.

    ``isolation_level=None``: Python's sqlite3 opens no transaction behind your back; write
    ``BEGIN IMMEDIATE`` ... ``COMMIT`` yourself. WAL lets readers read while one writer writes;
    ``busy_timeout`` makes a second writer wait up to ``timeout_s`` for the lock. Rows come back as
    ``sqlite3.Row`` (index by column name). ``check_same_thread=False``: one connection per thread
    is still the rule, but a connection may be closed from another thread.
    """
    conn = sqlite3.connect(str(path), timeout=timeout_s, isolation_level=None,
                           check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _plain(obj):
    """numpy scalars/arrays, tuples and paths as JSON types; floats must be finite."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_plain(v) for v in obj.tolist()]
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        if not math.isfinite(value):
            raise ValueError(f"canonical JSON has no {value}: store it as a string or None")
        return value
    if isinstance(obj, Path):
        return str(obj)
    return obj


def canonical_json(obj) -> str:
    """The one JSON text of ``obj`` every hash in the course is computed over: keys sorted, no
    spaces, UTF-8 kept as is, finite floats only (numpy values converted)."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def digest(obj) -> str:
    """Hex sha256 of ``bytes`` as they are, of a ``str`` as UTF-8, or of anything else's
    :func:`canonical_json`."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
    else:
        data = canonical_json(obj).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def event_record(row) -> dict:
    """The columns a row's hash covers (:data:`RECORD_FIELDS`), from a row (``sqlite3.Row`` or
    dict), with ``metrics`` as the stored canonical JSON *text*."""
    row = dict(row)
    record = {k: row[k] for k in RECORD_FIELDS}
    if not isinstance(record["metrics"], str):
        record["metrics"] = canonical_json(record["metrics"])
    return record


def read_events(conn: sqlite3.Connection, where: str = "", params: tuple = ()) -> list[dict]:
    """Rows of ``events`` (optionally filtered by an SQL ``where`` clause) as dicts in ``id``
    order, with ``metrics`` decoded."""
    sql = "SELECT * FROM events" + (f" WHERE {where}" if where else "") + " ORDER BY id"
    out = []
    for row in conn.execute(sql, params):
        d = dict(row)
        d["metrics"] = json.loads(d["metrics"])
        out.append(d)
    return out


# -------------------------------------------------------------------------------------------------
# Time


def iso(t: dt.datetime) -> str:
    """A UTC datetime as the spine's time text, ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (sorts as text)."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class SimClock:
    """A simulated UTC clock: ``now()`` returns the current simulated time; ``advance(seconds)``
    and ``set(datetime)`` move it. Schedules run on it, so a notebook replays days in seconds
    and never sleeps."""

    def __init__(self, start: dt.datetime | None = None):
        self.t = start or dt.datetime(2026, 1, 5, 9, 0, tzinfo=dt.timezone.utc)
        if self.t.tzinfo is None:
            self.t = self.t.replace(tzinfo=dt.timezone.utc)

    def now(self) -> dt.datetime:
        return self.t

    def now_iso(self) -> str:
        return iso(self.t)

    def advance(self, seconds: float) -> dt.datetime:
        self.t = self.t + dt.timedelta(seconds=seconds)
        return self.t

    def set(self, t: dt.datetime) -> dt.datetime:
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.timezone.utc)
        if t < self.t:
            raise ValueError("a clock does not run backwards")
        self.t = t
        return self.t


# -------------------------------------------------------------------------------------------------
# The metrics view


def metrics_view(events: list[dict], group: str = "parent"):
    """Serving metrics from ``serve`` events, one row per group (default: per parent event, i.e.
    per scheduled check): requests, error rate, p50/p95/p99 latency (ms), tokens/s.

    Each serve event's ``metrics`` holds ``requests``, ``errors``, ``latency_ms`` (a list, one per
    successful request), ``tokens`` and ``busy_s`` (seconds spent serving). Percentiles are over
    the requests of the group (numpy's linear interpolation); tokens/s is tokens over busy seconds.
    """
    import pandas as pd

    rows: dict = {}
    for e in events:
        if e["kind"] != "serve":
            continue
        m = e["metrics"]
        key = e.get(group)
        r = rows.setdefault(key, {"group": key, "requests": 0, "errors": 0, "latency": [],
                                  "tokens": 0, "busy_s": 0.0, "time": e["time"]})
        r["requests"] += int(m["requests"])
        r["errors"] += int(m["errors"])
        r["latency"] += list(m["latency_ms"])
        r["tokens"] += int(m["tokens"])
        r["busy_s"] += float(m["busy_s"])
    out = []
    for r in rows.values():
        lat = np.asarray(r["latency"], dtype=float)
        p50, p95, p99 = (np.percentile(lat, [50, 95, 99]) if lat.size else (np.nan,) * 3)
        out.append({group: r["group"], "time": r["time"], "requests": r["requests"],
                    "error_rate": r["errors"] / max(r["requests"], 1),
                    "p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
                    "tokens_per_s": r["tokens"] / r["busy_s"] if r["busy_s"] > 0 else np.nan})
    return pd.DataFrame(out)
