"""The loading of ``_dashboard_data``'s fleet month into an empty dashboard PostgreSQL, with COPY.

The schema comes from ``DashboardStore`` (the migrations). The secondary indexes of ``results`` are dropped for the
COPY and rebuilt from their own definitions afterwards (faster than keeping them up to date row by row); the per-hour
counts, the settled seqs and the raw heartbeats' hours are then derived in SQL from what was loaded, as the storing
commits and the downsampling pass would have written them; last the tables are vacuumed and analysed, as autovacuum
would have left a month-old database.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
from _dashboard_data import (
    DAYS,
    DRIFTING_SITE,
    HOUR_S,
    LABELS,
    OUTCOMES,
    RAW_HEARTBEAT_DAYS,
    REVIEWERS,
    Device,
    Progress,
    arrival_times,
    context,
    fleet,
    heartbeat,
    last_seen,
    malignant_probability,
    policy,
    print_progress,
    status_text,
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
    from edgemed.envelope import build_result, encode
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
    ctxs = [context(d) for d in devices]
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
    raw_hour = int(raw_from // HOUR_S) * HOUR_S
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
            for hour in range(first_hour, raw_hour, HOUR_S):
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
        (int(now // HOUR_S) * HOUR_S,),
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
