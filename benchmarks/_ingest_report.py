"""bench_ingest.py's reading of the store (with the database's own client) and its table."""

from __future__ import annotations

import io
import pstats
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from _common import median


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between the closest ranks; NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


class StoreReader:
    """Read-only counts from the store with psycopg or sqlite3, not through the code being measured."""

    def __init__(self, db: str) -> None:
        self.db = db
        self.lock = threading.Lock()
        self.conn: Any = None

    def __enter__(self) -> StoreReader:
        if self.db.startswith("postgresql://"):
            import psycopg

            self.conn = psycopg.connect(self.db, autocommit=True, connect_timeout=10)
        else:
            self.conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10, check_same_thread=False)
        return self

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with self.lock:
            return list(self.conn.execute(sql).fetchall())

    def wait_for(self, n: int, deadline: float, poll_s: float) -> tuple[int, float]:
        """Poll ``count(*)`` until ``n`` results are stored or ``deadline`` (monotonic); (stored, when).

        A count scans the table (tens of thousands of rows, a few ms of the database's CPU), so it runs every
        0.25 s until 95% are there and every ``poll_s`` after that: the end is timed to ``poll_s`` and the count
        costs the database under 2% of a core.
        """
        stored = 0
        while time.monotonic() < deadline:
            stored = int(self.rows("SELECT count(*) FROM results")[0][0])
            if stored >= n:
                break
            time.sleep(poll_s if stored >= 0.95 * n else 0.25)
        return stored, time.monotonic()

    def disk_bytes(self) -> int:
        """What the database holds on disk: its tables with their indexes and TOAST (PostgreSQL), its pages (SQLite)."""
        if self.db.startswith("postgresql://"):
            sql = (
                "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n ON n.oid = "
                "c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'"
            )
            return int(self.rows(sql)[0][0] or 0)
        page_count = int(self.rows("PRAGMA page_count")[0][0])
        return page_count * int(self.rows("PRAGMA page_size")[0][0])

    def watch_last(
        self, batch: int, since: list[float], seen: dict[tuple[str, int], float], stop: threading.Event
    ) -> None:
        """Every 20 ms, note when the last element of each message appears (a batch is filed in one transaction,
        so it appears with the rest of its message). ``since[0]``: only rows received from then on (wall clock;
        the index on ``received_at`` keeps each poll small)."""
        last = batch - 1
        while not stop.wait(0.02):
            sql = f"SELECT device_id, seq FROM results WHERE received_at >= {since[0]:.3f} AND seq % {batch} = {last}"
            rows = self.rows(sql)
            now = time.monotonic()
            for device_id, seq in rows:
                seen.setdefault((device_id, int(seq)), now)

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.conn.close()


def top_functions(files: list[Path], n: int = 30) -> str:
    """The ``n`` functions with the most own CPU time over the merged profiles in ``files``."""
    buf = io.StringIO()
    st = pstats.Stats(*[str(f) for f in files], stream=buf)
    st.strip_dirs().sort_stats("tottime").print_stats(n)
    return buf.getvalue()


def _cpu(run: dict[str, Any], key: str) -> float:
    return float(run["cpu_us_per_result"].get(key, 0.0))


def table(configs: list[str], runs: dict[str, list[dict[str, Any]]], lat: dict[str, dict[str, Any]], batch: int) -> str:
    """The Markdown table of medians: rate, spread, share of the bare subscriber, CPU per result, latency."""
    bare = median([r["rate"] for r in runs.get("bare", [])]) if runs.get("bare") else 0.0
    lines = [
        f"| configuration (batches of {batch}) | results/s (median) | min | max | of bare subscriber "
        "| CPU µs per result: ingest / PostgreSQL / mosquitto | publish -> stored p50 / p95 (at half rate) "
        "| on disk per result |",
        "|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for config in configs:
        rs = runs[config]
        rates = [r["rate"] for r in rs]
        ingest = median([_cpu(r, "workers") or _cpu(r, "subscriber") for r in rs])
        cpu = f"{ingest:.0f} / {median([_cpu(r, 'postgresql') for r in rs]):.0f} / "
        cpu += f"{median([_cpu(r, 'mosquitto') for r in rs]):.0f}"
        got = lat.get(config)
        latency = f"{got['p50_s'] * 1e3:.0f} / {got['p95_s'] * 1e3:.0f} ms ({got['rate']:,.0f}/s)" if got else "-"
        share = f"{median(rates) / bare:.0%}" if bare > 0 else "-"
        row = f"| {config} | {median(rates):,.0f} | {min(rates):,.0f} | {max(rates):,.0f} | {share} | {cpu} "
        disk = median([r.get("disk_bytes_per_result", 0.0) for r in rs])
        lines.append(row + f"| {latency} | {f'{disk / 1024:.1f} KB' if disk else '-'} |")
    return "\n".join(lines)


def verdicts(medians: dict[str, float], lat: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's targets against the figures: PostgreSQL with 2 workers."""
    if "postgresql-2" not in medians:
        return []
    pg2, bare = medians["postgresql-2"], medians.get("bare")
    out = [f"PostgreSQL, 2 workers: {pg2:,.0f} results/s (target >= 10,000): {'met' if pg2 >= 10_000 else 'MISSED'}"]
    if bare:
        share = pg2 / bare
        out.append(f"{share:.0%} of the bare subscriber's rate (target >= 50%): {'met' if share >= 0.5 else 'MISSED'}")
    if "postgresql-2" in lat:
        p95 = lat["postgresql-2"]["p95_s"]
        out.append(f"p95 publish -> stored {p95 * 1e3:.0f} ms (target <= 1 s): {'met' if p95 <= 1 else 'MISSED'}")
    return out
