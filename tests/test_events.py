"""brewslm_helpers.events: the spine's plumbing (WAL, busy timeout, canonical JSON, digests, clock,
metrics view). The lesson's exercises (guard triggers, chain, verify, queries) are graded in the
notebook, not here: the helper must not contain them."""
from __future__ import annotations

import datetime as dt
import hashlib
import multiprocessing as mp
import sqlite3

import numpy as np
import pytest

from brewslm_helpers import events


def _writer(path, worker, n):
    conn = events.connect(path)
    for i in range(n):
        conn.execute("BEGIN IMMEDIATE")
        last = conn.execute("SELECT hash FROM events ORDER BY id DESC LIMIT 1").fetchone()
        prev = last[0] if last else events.GENESIS
        rec = {"run_id": "r", "kind": "serve", "time": events.iso(dt.datetime(2026, 1, 1)), "actor": f"w{worker}",
               "inputs_hash": events.digest(i), "outputs_hash": events.digest(-i),
               "metrics": events.canonical_json({"i": i}), "parent": None}
        conn.execute("INSERT INTO events (run_id, kind, time, actor, inputs_hash, outputs_hash, metrics, parent,"
                     " prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?)",
                     (*[rec[k] for k in events.RECORD_FIELDS], prev,
                      events.digest(prev + events.canonical_json(rec) + f"{worker}-{i}")))
        conn.execute("COMMIT")
    conn.close()


def test_connect_is_wal_autocommit_with_busy_timeout(tmp_path):
    conn = events.connect(tmp_path / "s.sqlite", timeout_s=3)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 3000
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.isolation_level is None
    conn.executescript(events.EVENTS_TABLE)
    cols = [r[1] for r in conn.execute("PRAGMA table_info(events)")]
    assert cols == ["id", *events.RECORD_FIELDS, "prev_hash", "hash"]
    # the table itself carries no guard: that is the lesson's exercise
    assert conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'trigger'").fetchone()[0] == 0


def test_two_writer_processes_lose_nothing(tmp_path):
    path = tmp_path / "s.sqlite"
    events.connect(path).executescript(events.EVENTS_TABLE)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 60)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = events.read_events(events.connect(path))
    assert len(rows) == 120 and [r["id"] for r in rows] == list(range(1, 121))
    prev = events.GENESIS
    for r in rows:        # BEGIN IMMEDIATE before reading the head: one linear chain
        assert r["prev_hash"] == prev
        prev = r["hash"]


def test_canonical_json_and_digest():
    assert events.canonical_json({"b": 1, "a": [np.float32(0.5), np.int64(2), (1, 2)], "c": "é"}) == \
        '{"a":[0.5,2,[1,2]],"b":1,"c":"é"}'
    with pytest.raises(ValueError):
        events.canonical_json({"x": float("nan")})
    assert events.digest(b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert events.digest("é") == hashlib.sha256("é".encode()).hexdigest()
    assert events.digest({"b": 1, "a": 2}) == events.digest({"a": 2, "b": 1})


def test_event_record_and_read_events(tmp_path):
    conn = events.connect(tmp_path / "s.sqlite")
    conn.executescript(events.EVENTS_TABLE)
    conn.execute("INSERT INTO events (run_id, kind, time, actor, inputs_hash, outputs_hash, metrics, parent,"
                 " prev_hash, hash) VALUES ('r','eval','t','a','i','o','{\"acc\":0.5}',NULL,'p','h')")
    row = conn.execute("SELECT * FROM events").fetchone()
    assert events.event_record(row) == {"run_id": "r", "kind": "eval", "time": "t", "actor": "a",
                                        "inputs_hash": "i", "outputs_hash": "o", "metrics": '{"acc":0.5}',
                                        "parent": None}
    assert events.event_record({**dict(row), "metrics": {"acc": 0.5}})["metrics"] == '{"acc":0.5}'
    assert events.read_events(conn)[0]["metrics"] == {"acc": 0.5}
    assert events.read_events(conn, "kind = ?", ("serve",)) == []


def test_sim_clock_and_iso():
    c = events.SimClock(dt.datetime(2026, 1, 1, 12, 0))
    assert c.now_iso() == "2026-01-01T12:00:00.000000Z"
    c.advance(90.5)
    assert c.now_iso() == "2026-01-01T12:01:30.500000Z"
    with pytest.raises(ValueError):
        c.set(dt.datetime(2025, 1, 1))
    assert events.iso(dt.datetime(2026, 1, 1, 13, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))) == \
        "2026-01-01T12:00:00.000000Z"


def test_cron_trigger_on_a_simulated_clock():
    from apscheduler.triggers.cron import CronTrigger

    trigger = CronTrigger(hour="*/6", minute=0, timezone="UTC")
    clock = events.SimClock(dt.datetime(2026, 1, 5, 8, 0, tzinfo=dt.timezone.utc))
    fired = []
    for _ in range(3):
        clock.advance(1)
        fired.append(clock.set(trigger.get_next_fire_time(None, clock.now())).hour)
    assert fired == [12, 18, 0]


def test_metrics_view():
    evs = [{"kind": "serve", "parent": 1, "time": "t1",
            "metrics": {"requests": 4, "errors": 1, "latency_ms": [10, 20, 30], "tokens": 60, "busy_s": 2.0}},
           {"kind": "serve", "parent": 1, "time": "t2",
            "metrics": {"requests": 2, "errors": 0, "latency_ms": [40, 50], "tokens": 40, "busy_s": 3.0}},
           {"kind": "eval", "parent": 1, "time": "t3", "metrics": {}}]
    v = events.metrics_view(evs)
    assert len(v) == 1
    row = v.iloc[0]
    assert row["requests"] == 6 and row["error_rate"] == pytest.approx(1 / 6)
    assert row["p50_ms"] == 30 and row["p95_ms"] == pytest.approx(np.percentile([10, 20, 30, 40, 50], 95))
    assert row["tokens_per_s"] == pytest.approx(20.0)


def test_sqlite_has_json_extract():
    assert sqlite3.connect(":memory:").execute("SELECT json_extract('{\"a\": 1}', '$.a')").fetchone()[0] == 1
