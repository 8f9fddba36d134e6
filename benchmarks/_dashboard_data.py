"""A month of a 100-device fleet in a dashboard database, loaded with COPY: the data side of bench_dashboard_web.py.

What goes in, as the ingest would have written it over 30 days:

* ``devices``: 100 ultrasound devices on 5 sites (20 each). Their retained status names the model (two versions of
  ``breastmnist_28`` with distinct sha256s), edgemed's version, the delegate and the model's validation
  ``reference`` (class mix and mean confidence, as the converter writes it into the manifest); their last heartbeat
  has every field a device sends. 90 are online, 6 said offline, 4 are silent (online, last heard 2 h ago).
* ``results``: ``n`` real ``edgemed.result/1`` envelopes (``edgemed.envelope.build_result``, triaged by
  ``edgemed.triage.triage`` under the demo's policy), each device on its own seq stream, received over the last
  30 days with clinic hours busier than nights, stored as ``edgemed.dashboard.rows.result_row`` makes the row.
  The malignant probability is drawn so that about 3% of all results are urgent and 7% inconclusive. Site
  ``clinic-e`` is a small clinic (a quarter of the others' traffic per device) where 20% are urgent: its class mix
  drifts from the model's reference (population stability index about 0.3), so the drift view flags it.
* ``settled``/``stream_progress``/``stream_seen``: every seq stored, as receipts would have left them.
* ``result_hourly``: one ``GROUP BY`` over the loaded results (what the storing commits add up to).
* ``health_history``: one heartbeat a minute per device for the last 2 days; ``health_hourly``: every hour of the
  30 days that ended (the last 2 days aggregated from those raw rows in SQL, older hours generated).
* ``reviews``: the oldest 4,000 urgent or inconclusive results: 3,000 closed with an outcome, 1,000 acknowledged.

The secondary indexes of ``results`` are dropped for the COPY and rebuilt from their own definitions afterwards
(faster than keeping them up to date row by row), then the tables are vacuumed and analysed, as autovacuum would
have left a month-old database. Everything is seeded: the same ``n`` loads the same data.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

SITES = ("clinic-a", "clinic-b", "clinic-c", "clinic-d", "clinic-e")
DRIFTING_SITE = "clinic-e"
DRIFTING_WEIGHT = 0.25  # results per device at the drifting site, against 1 elsewhere
DEVICES_PER_SITE = 20
DAYS = 30
LABELS = ("malignant", "normal_benign")
REVIEWERS = ("dr.amara", "dr.chen", "n.okafor", "dr.silva")
OUTCOMES = ("referred", "seen", "false_alarm", "other")
RAW_HEARTBEAT_DAYS = 2
_HOUR = 3600
# Clinic hours: relative results per hour of the day (UTC), a quiet night and a busy morning.
_HOUR_WEIGHTS = np.array([1, 1, 1, 1, 1, 2, 4, 8, 12, 14, 14, 12, 10, 12, 13, 12, 10, 7, 5, 3, 2, 2, 1, 1], float)


@dataclass(frozen=True)
class Device:
    """One device of the benchmark fleet."""

    site: str
    device_id: str
    stream: str
    model: dict[str, str]
    state: str  # "online", "offline" or "silent"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


MODELS = (
    {"name": "breastmnist_28", "version": "1.0.0", "sha256": _sha("breastmnist_28 1.0.0"), "target": "int8"},
    {"name": "breastmnist_28", "version": "1.1.0", "sha256": _sha("breastmnist_28 1.1.0"), "target": "int8"},
)


def policy() -> Any:
    """The demo's triage policy (firmware_configs/first-run.yaml): malignant >= 0.4 urgent, benign needs 0.75."""
    from edgemed.triage import ClassRule, TriagePolicy

    return TriagePolicy(
        min_confidence=0.6,
        min_margin=0.1,
        rules={
            "malignant": ClassRule(
                level="urgent",
                min_probability=0.4,
                reason="suspicious for malignancy - refer for biopsy assessment today",
            ),
            "normal_benign": ClassRule(level="no_finding", min_probability=0.75),
        },
    )


def malignant_probability(rng: np.random.Generator, n: int, drifting: bool) -> np.ndarray:
    """Malignant probabilities: >= 0.4 urgent (1.9%, 20% drifting), 0.25-0.4 inconclusive (6.7%, 12%), else
    benign; with the drifting site's share of the traffic (``DRIFTING_WEIGHT``) that is 3% and 7% of all results."""
    urgent, unsure = (0.20, 0.12) if drifting else (0.019, 0.067)
    band = rng.random(n)
    low = 0.25 * rng.random(n) ** 2  # most benign frames are clear-cut
    mid = rng.uniform(0.2501, 0.3999, n)
    high = rng.uniform(0.40, 0.97, n)
    return np.where(band < urgent, high, np.where(band < urgent + unsure, mid, low))


def fleet(seed: int = 13) -> list[Device]:
    """The 100 devices (5 sites x 20): one in five runs model 1.1.0; 6 offline, 4 silent."""
    rng = np.random.default_rng(seed)
    out = []
    for s, site in enumerate(SITES):
        for k in range(DEVICES_PER_SITE):
            number = s * DEVICES_PER_SITE + k
            state = "offline" if number % 17 == 5 else "silent" if number % 25 == 12 else "online"
            out.append(Device(site, f"us-{number + 1:03d}", rng.bytes(8).hex(), MODELS[1 if k % 5 == 4 else 0], state))
    return out


def reference(model: dict[str, str]) -> dict[str, Any]:
    """The model's validation reference (what the converter records): top-1 mix and mean confidence.

    Computed on 2,000 draws of the same non-drifting distribution the sites see, so the steady sites match it.
    """
    rng = np.random.default_rng(int(model["sha256"][:8], 16))
    p = malignant_probability(rng, 2000, drifting=False)
    malignant = float(np.mean(p >= 0.5))
    confidence = float(np.mean(np.maximum(p, 1 - p)))
    return {
        "n": 2000,
        "class_mix": {"malignant": round(malignant, 4), "normal_benign": round(1 - malignant, 4)},
        "mean_confidence": round(confidence, 4),
        "split": "test",
    }


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def status_text(device: Device, now: float) -> str:
    """The device's retained status as ``runtime._status_extra`` and the MQTT link publish it (sorted keys)."""
    body: dict[str, Any] = {
        "state": "offline" if device.state == "offline" else "online",
        "at": _iso(now - 86400 if device.state == "offline" else now - 6 * 86400),
        "device_id": device.device_id,
        "site": device.site,
        "delegate": "cpu",
        "degraded": False,
        "model": device.model["name"],
        "model_version": device.model["version"],
        "model_sha256": device.model["sha256"],
        "reference": reference(device.model),
        "edgemed": "0.1.0",
    }
    if device.state == "offline":
        body.update(reason="stopped", clean=True, pending=0, awaiting_receipt=0)
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def heartbeat(device: Device, at: float, rng: np.random.Generator) -> dict[str, Any]:
    """A heartbeat with every field ``Runtime.health_payload`` sends."""
    busy = float(_HOUR_WEIGHTS[int(at // _HOUR) % 24] / _HOUR_WEIGHTS.max())
    pending = int(rng.poisson(0.5 + 3 * busy))
    return {
        "schema": "edgemed.health/1",
        "uptime_s": round(at % 86400, 1),
        "frames": int(at // 60) % 100000,
        "errors": int(rng.poisson(0.02)),
        "recaptures": int(rng.poisson(0.3)),
        "fps": round(float(2 + 6 * busy + rng.normal(0, 0.3)), 2),
        "latency_ms": {"p50": round(float(rng.normal(6, 0.4)), 3), "p95": round(float(rng.normal(9 + 3 * busy, 1)), 3)},
        "disk_free_mb": round(float(12000 - (at % 86400) / 40), 1),
        "cpu_temp_c": round(float(48 + 12 * busy + rng.normal(0, 1)), 1),
        "cpu_percent": round(float(20 + 60 * busy + rng.normal(0, 4)), 1),
        "peak_rss_mb": 212.5,
        "device_id": device.device_id,
        "site": device.site,
        "delegate": "cpu",
        "degraded": False,
        "degraded_reason": None,
        "pending": pending,
        "awaiting_receipt": int(rng.poisson(1.0)),
        "oldest_pending_s": round(float(rng.exponential(2.0)), 1) if pending else None,
        "oldest_awaiting_s": round(float(rng.exponential(1.0)), 1),
        "consumer_online": True,
        "outbox_full": False,
        "source_state": "watching",
        "connected": device.state != "offline",
        "source_reconnects": 0,
        "evicted_total": 0,
    }


def last_seen(device: Device, now: float) -> float:
    return {"online": now - 5.0, "offline": now - 86400.0, "silent": now - 2 * 3600.0}[device.state]


def arrival_times(rng: np.random.Generator, n: int, now: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` arrival times over the last ``DAYS`` days (clinic hours weighted), sorted, and each one's device index."""
    days = rng.integers(0, DAYS, n)
    hours = rng.choice(24, n, p=_HOUR_WEIGHTS / _HOUR_WEIGHTS.sum())
    start = (int(now // 86400) - DAYS + 1) * 86400.0
    at = start + days * 86400.0 + hours * 3600.0 + rng.random(n) * 3600.0
    at = np.minimum(at, now - rng.random(n) * 60)  # today's later hours have not happened yet
    order = np.argsort(at, kind="stable")
    weights = np.repeat([DRIFTING_WEIGHT if site == DRIFTING_SITE else 1.0 for site in SITES], DEVICES_PER_SITE)
    return at[order], rng.choice(len(weights), n, p=weights / weights.sum())


Progress = Callable[[str, int, int], None]


def print_progress(stage: str, done: int, total: int, _state: dict[str, float] = {}) -> None:  # noqa: B006
    """``stage done/total (pct) elapsed, ~left`` on stderr, at most twice a second, and always at the end."""
    now = time.monotonic()
    started = _state.setdefault(stage, now)
    if done < total and now - _state.get("last", 0.0) < 0.5:
        return
    _state["last"] = now
    elapsed = now - started
    left = elapsed / done * (total - done) if done else float("nan")
    end = "\n" if done >= total else "\r"
    print(
        f"  {stage}: {done:,}/{total:,} ({100 * done / max(total, 1):.0f}%) {elapsed:.0f} s, ~{left:.0f} s left ",
        end=end,
        file=sys.stderr,
        flush=True,
    )


def _secondary_indexes(conn: Any, table: str) -> list[tuple[str, str]]:
    """``(name, CREATE INDEX ...)`` of ``table``'s non-unique indexes, as PostgreSQL itself would re-create them."""
    return conn.execute(
        "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
        "JOIN pg_class t ON t.oid = x.indrelid WHERE t.relname = %s AND NOT x.indisunique ORDER BY 1",
        (table,),
    ).fetchall()


def _copy_results(conn: Any, devices: list[Device], n: int, now: float, seed: int, progress: Progress) -> None:
    from edgemed.dashboard.rows import result_row
    from edgemed.dashboard.tables import results
    from edgemed.envelope import EnvelopeContext, build_result, encode
    from edgemed.triage import triage
    from edgemed.types import Frame, Prediction, QualityReport

    rng = np.random.default_rng(seed)
    at, who = arrival_times(rng, n, now)
    drifting = np.array([d.site == DRIFTING_SITE for d in devices])[who]
    p = np.where(drifting, malignant_probability(rng, n, True), malignant_probability(rng, n, False)).round(4)
    delay = rng.uniform(0.05, 1.5, n)
    blur, bright = rng.uniform(60, 400, n).round(3), rng.uniform(0.3, 0.7, n).round(3)
    infer = rng.normal(4.5, 0.5, n).round(3)
    ids = rng.bytes(16 * n)
    ctxs = [
        EnvelopeContext(
            device_id=d.device_id,
            site=d.site,
            model=d.model,
            preprocess_sha256=_sha("preprocess 28x28 grayscale"),
            backend="ai_edge_litert",
            delegate="cpu",
            degraded=False,
            stream=d.stream,
        )
        for d in devices
    ]
    seqs = [0] * len(devices)
    rules, verdicts = policy(), {}
    names = [column.name for column in results.columns]
    with conn.cursor().copy(f"COPY results ({', '.join(names)}) FROM STDIN") as copy:
        for i in range(n):
            d = int(who[i])
            seq, seqs[d] = seqs[d], seqs[d] + 1
            pm = float(p[i])
            pred = Prediction(LABELS, (pm, round(1.0 - pm, 4)))
            verdict = verdicts.get(pm)
            if verdict is None:
                verdict = verdicts[pm] = triage(pred, rules)
            rid = bytearray(ids[16 * i : 16 * i + 16])
            rid[6], rid[8] = (rid[6] & 0x0F) | 0x40, (rid[8] & 0x3F) | 0x80  # a version-4 UUID, as the device's
            received = float(at[i])
            envelope = build_result(
                ctxs[d],
                frame=Frame(index=seq, source_kind="folder"),
                seq=seq,
                created_at=received - float(delay[i]),
                clock_synced=True,
                session_id=None,
                quality=QualityReport(True, float(blur[i]), float(bright[i]), 0.001),
                prediction=pred,
                triage=verdict,
                latency_ms={"preprocess": 0.4, "inference": float(infer[i]), "total": float(infer[i]) + 0.9},
                result_id=rid.hex(),
            )
            row = result_row(envelope, received, encode(envelope))
            copy.write_row([row[c] for c in names])
            if i % 2000 == 0:
                progress("results", i, n)
    progress("results", n, n)


def _copy_heartbeats(conn: Any, devices: list[Device], now: float, seed: int, progress: Progress) -> None:
    """Raw heartbeats (one a minute) for the last RAW_HEARTBEAT_DAYS, and three samples per older hour."""
    from edgemed.dashboard.history import heartbeat_row
    from edgemed.dashboard.tables import HEALTH_FIELDS

    rng = np.random.default_rng(seed + 1)
    raw_from = now - RAW_HEARTBEAT_DAYS * 86400
    first_hour = (int(now // 86400) - DAYS + 1) * 86400
    raw_hour = int(raw_from // _HOUR) * _HOUR
    cols = ["site", "device_id", "at", "hour", *HEALTH_FIELDS]
    hourly_cols = ["site", "device_id", "hour", "n"] + [
        f"{f}_{a}" for f in HEALTH_FIELDS for a in ("min", "max", "last")
    ]
    cur = conn.cursor()
    with cur.copy(f"COPY health_history ({', '.join(cols)}) FROM STDIN") as copy:
        for k, device in enumerate(devices):
            end = last_seen(device, now)
            for at in np.arange(raw_hour, end, 60.0):
                row = heartbeat_row(device.site, device.device_id, heartbeat(device, float(at), rng), float(at))
                copy.write_row([row[c] for c in cols])
            progress("heartbeats", k + 1, 2 * len(devices))
    with cur.copy(f"COPY health_hourly ({', '.join(hourly_cols)}) FROM STDIN") as copy:
        for k, device in enumerate(devices):
            for hour in range(first_hour, raw_hour, _HOUR):
                samples = [
                    heartbeat_row(device.site, device.device_id, heartbeat(device, hour + s, rng), hour + s)
                    for s in (600.0, 1800.0, 3540.0)
                ]
                values: list[Any] = [device.site, device.device_id, hour, 60]
                for f in HEALTH_FIELDS:
                    got = [s[f] for s in samples if s[f] is not None]
                    values += [min(got), max(got), samples[-1][f]] if got else [None, None, None]
                copy.write_row(values)
            progress("heartbeats", len(devices) + k + 1, 2 * len(devices))
    # The hours of the raw window that ended: what history's downsampling pass would have written.
    aggs = ", ".join(f"min({f}), max({f}), (array_agg({f} ORDER BY at DESC, id DESC))[1]" for f in HEALTH_FIELDS)
    cur.execute(
        f"INSERT INTO health_hourly ({', '.join(hourly_cols)}) SELECT site, device_id, hour, count(*), {aggs} "
        "FROM health_history WHERE hour < %s GROUP BY site, device_id, hour",
        (int(now // _HOUR) * _HOUR,),
    )


def _devices_and_reviews(conn: Any, devices: list[Device], now: float, seed: int) -> int:
    rng = np.random.default_rng(seed + 2)
    cur = conn.cursor()
    cur.executemany(
        "INSERT INTO devices (site, device_id, last_seen, status, status_at, health, health_at) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s)",
        [
            (
                d.site,
                d.device_id,
                last_seen(d, now),
                status_text(d, now),
                now - (86400 if d.state == "offline" else 6 * 86400),
                json.dumps(heartbeat(d, last_seen(d, now), rng), separators=(",", ":")),
                last_seen(d, now),
            )
            for d in devices
        ],
    )
    queue = cur.execute(
        "SELECT result_id, site, received_at FROM results WHERE level IN ('urgent', 'inconclusive') "
        "ORDER BY received_at LIMIT 4000"
    ).fetchall()
    rows = []
    for k, (result_id, site, received) in enumerate(queue):
        acked = received + float(rng.uniform(60, 2400))
        who = REVIEWERS[k % len(REVIEWERS)]
        if k < 3000:
            closed = acked + float(rng.uniform(300, 7200))
            note = "seen in clinic, follow-up booked" if k % 7 == 0 else None
            rows.append((result_id, site, "closed", who, acked, who, closed, OUTCOMES[k % 4], note))
        else:
            rows.append((result_id, site, "acknowledged", who, acked, None, None, None, None))
    cur.executemany(
        "INSERT INTO reviews (result_id, site, state, acked_by, acked_at, closed_by, closed_at, outcome, note) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        rows,
    )
    return len(rows)


def load(url: str, n: int, *, seed: int = 13, progress: Progress = print_progress) -> dict[str, Any]:
    """Create the schema at ``url`` (``DashboardStore``: the migrations) and load the fleet's month into it.

    Args:
        url: ``postgresql://...`` of an empty database.
        n: how many results.
        seed: the random seed (the same seed and ``n`` load the same data).
        progress: called with (stage, done, total) as the load goes.

    Returns:
        Seconds per stage and row counts.
    """
    import psycopg

    from edgemed.dashboard.store import DashboardStore

    DashboardStore(url).close()
    now = time.time()
    devices = fleet(seed)
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    with psycopg.connect(url, connect_timeout=10) as conn:
        conn.execute("SET maintenance_work_mem = '256MB'")
        indexes = _secondary_indexes(conn, "results")
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        _copy_results(conn, devices, n, now, seed, progress)
        timings["results_copy_s"] = time.monotonic() - t0
        for k, (_, definition) in enumerate(indexes):
            conn.execute(definition)
            progress("indexes", k + 1, len(indexes))
        timings["results_indexes_s"] = time.monotonic() - t0 - timings["results_copy_s"]
        conn.execute(
            "INSERT INTO result_hourly (site, hour, model, level, label, n, confidence_sum) "
            "SELECT site, (floor(received_at / 3600) * 3600)::bigint, coalesce(model, ''), level, "
            "coalesce(label, ''), count(*), coalesce(sum(confidence), 0) FROM results GROUP BY 1, 2, 3, 4, 5"
        )
        conn.execute("INSERT INTO settled SELECT site, device_id, stream, seq, 'stored' FROM results")
        conn.execute(
            "INSERT INTO stream_progress SELECT site, device_id, stream, max(seq) FROM results GROUP BY 1, 2, 3"
        )
        conn.execute(
            "INSERT INTO stream_seen SELECT site, device_id, stream, max(received_at) FROM results GROUP BY 1, 2, 3"
        )
        timings["rollups_s"] = time.monotonic() - t0 - sum(timings.values())
        _copy_heartbeats(conn, devices, now, seed, progress)
        reviews = _devices_and_reviews(conn, devices, now, seed)
        timings["devices_heartbeats_reviews_s"] = time.monotonic() - t0 - sum(timings.values())
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute("VACUUM (ANALYZE)")
        timings["vacuum_analyze_s"] = time.monotonic() - t0 - sum(timings.values())
        counts = {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
            for table in ("results", "result_hourly", "devices", "health_history", "health_hourly", "reviews")
        }
        levels = dict(conn.execute("SELECT level, count(*) FROM results GROUP BY level").fetchall())
        size = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()[0]  # type: ignore[index]
    timings["total_s"] = time.monotonic() - t0
    print(f"  loaded in {timings['total_s']:.0f} s: {counts}, levels {levels}, database {size}", file=sys.stderr)
    return {"seconds": timings, "rows": counts, "levels": levels, "database_size": size, "reviews": reviews}
