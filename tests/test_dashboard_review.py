"""The review workflow on both engines (an SQLite file and a real PostgreSQL 15): the queue per site, oldest urgent
first; new -> acknowledged -> closed with its audit rows in the same transaction; site limits answered as "not
found"; the counts from result_hourly equal a direct count; the settings; the results export (CSV and JSONL,
paged, merged in time order, formula cells neutralised).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from dashboard_helpers import make_result, make_study

from edgemed.dashboard import audit, results_export, review, review_queue, review_settings
from edgemed.dashboard.secrets import Secrets, load_secrets
from edgemed.dashboard.store import DashboardStore
from edgemed.errors import ConfigError

A, B = "clinic-a", "clinic-b"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    db = str(tmp_path / "fleet.sqlite3") if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))
    s = DashboardStore(db)
    yield s
    s.close()


@pytest.fixture
def secrets(tmp_path: Path) -> Secrets:
    return load_secrets(tmp_path / "fleet.key", create=True)


def _result(store: DashboardStore, at: float, *, site: str = A, level: str = "urgent", seq: int = 0, **kw: Any) -> str:
    body = make_result(site=site, level=level, seq=seq, **kw)
    assert store.add_result(body, at)
    return str(body["result_id"])


def _study(store: DashboardStore, at: float, *, site: str = A, level: str = "urgent") -> str:
    body = make_study(site=site, level=level)
    assert store.add_study(body, at)
    return str(body["result_id"])


def _fill(store: DashboardStore) -> dict[str, str]:
    return {
        "a_inconclusive_old": _result(store, 10.0, level="inconclusive", seq=1, reason="image too dark"),
        "a_urgent_new": _result(store, 30.0, seq=2, reason="malignant 0.91"),
        "a_routine": _result(store, 5.0, level="routine", seq=3),
        "a_study": _study(store, 20.0),
        "b_urgent_old": _result(store, 1.0, site=B, seq=4, device_id="us-09"),
        "b_inconclusive": _result(store, 40.0, site=B, level="inconclusive", seq=5, device_id="us-09"),
    }


def _direct_counts(store: DashboardStore) -> dict[str, dict[str, int]]:
    rows = store._query(
        "SELECT q.site, q.level, count(*) AS n FROM (SELECT result_id, site, level FROM results UNION ALL "
        "SELECT result_id, site, level FROM studies) q LEFT JOIN reviews v ON v.result_id = q.result_id "
        "WHERE q.level IN ('urgent', 'inconclusive') AND (v.state IS NULL OR v.state <> 'closed') "
        "GROUP BY q.site, q.level"
    )
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        out.setdefault(r["site"], {"urgent": 0, "inconclusive": 0, "escalated": 0})[r["level"]] = int(r["n"])
    return out


def test_the_queue_is_urgent_oldest_first_then_inconclusive_per_site(store: DashboardStore) -> None:
    ids = _fill(store)
    everything = review.queue(store, None)
    assert [r["result_id"] for r in everything] == [
        ids["b_urgent_old"],
        ids["a_study"],
        ids["a_urgent_new"],
        ids["a_inconclusive_old"],
        ids["b_inconclusive"],
    ]
    first = everything[0]
    assert first["kind"] == "frame" and first["site"] == B and first["device_id"] == "us-09"
    assert (first["state"], first["acked_by"], first["escalated"], first["level"]) == ("new", None, False, "urgent")
    assert first["confidence"] == pytest.approx(0.7) and first["label"] == "benign" and first["received_at"] == 1.0
    assert everything[1]["kind"] == "study" and everything[1]["confidence"] is None
    mine = review.queue(store, {A})
    assert [r["result_id"] for r in mine] == [ids["a_study"], ids["a_urgent_new"], ids["a_inconclusive_old"]]
    assert review.queue(store, set()) == [] and review.queue_count(store, set()) == {}
    # Pages: the same order, in slices, across the urgent/inconclusive boundary.
    pages = [review.queue(store, {A, B}, limit=2, offset=o) for o in (0, 2, 4)]
    assert [r["result_id"] for p in pages for r in p] == [r["result_id"] for r in everything]
    with pytest.raises(review.ReviewInvalid, match="limit must be between 1 and 1000"):
        review.queue(store, None, limit=0)
    assert review.queue_count(store, None) == {
        A: {"urgent": 2, "inconclusive": 1, "escalated": 0},
        B: {"urgent": 1, "inconclusive": 1, "escalated": 0},
    }
    assert review.queue_count(store, {B}) == {B: {"urgent": 1, "inconclusive": 1, "escalated": 0}}


def test_new_acknowledged_closed_each_audited_in_its_transaction(store: DashboardStore, secrets: Secrets) -> None:
    ids = _fill(store)
    rid = ids["a_urgent_new"]
    with pytest.raises(review.ReviewConflict, match="not acknowledged yet: acknowledge it, then close it"):
        review.close(store, rid, "seen", None, "rev1", "10.0.0.5", secrets, 50.0)
    row = review.acknowledge(store, rid, "rev1", "10.0.0.5", secrets, 51.0)
    assert (row["state"], row["acked_by"], row["acked_at"], row["site"]) == ("acknowledged", "rev1", 51.0, A)
    with pytest.raises(review.ReviewConflict, match=r"already acknowledged by rev1 at 1970-01-01 00:00:51 UTC"):
        review.acknowledge(store, rid, "rev2", "10.0.0.6", secrets, 52.0)
    [waiting] = [r for r in review.queue(store, {A}) if r["result_id"] == rid]
    assert (waiting["state"], waiting["acked_by"], waiting["acked_at"]) == ("acknowledged", "rev1", 51.0)
    assert rid not in {r["result_id"] for r in store.unacknowledged_urgent()}
    with pytest.raises(review.ReviewInvalid, match="outcome 'cured' is not one of referred, seen, false_alarm, other"):
        review.close(store, rid, "cured", None, "rev1", None, secrets)
    with pytest.raises(review.ReviewInvalid, match="2001 characters; keep it to 2000"):
        review.close(store, rid, "seen", "x" * 2001, "rev1", None, secrets)
    done = review.close(store, rid, "referred", "  sent to the breast clinic  ", "rev2", "10.0.0.6", secrets, 60.0)
    assert (done["state"], done["closed_by"], done["outcome"], done["note"]) == (
        "closed",
        "rev2",
        "referred",
        "sent to the breast clinic",
    )
    with pytest.raises(review.ReviewConflict, match="already closed by rev2"):
        review.close(store, rid, "seen", None, "rev1", None, secrets)
    assert rid not in {r["result_id"] for r in review.queue(store, None)}
    assert review.queue_count(store, None) == _direct_counts(store)
    # A routine result is not reviewed; an unknown id is not found.
    with pytest.raises(review.ReviewConflict, match="is routine: only urgent and inconclusive ones are reviewed"):
        review.acknowledge(store, ids["a_routine"], "rev1", None, secrets)
    with pytest.raises(review.ReviewNotFound):
        review.acknowledge(store, "f" * 32, "rev1", None, secrets)
    rows = audit.rows(store, limit=10)
    mine = sorted((r["action"], r["actor"], r["target"], r["site"], r["address"]) for r in rows)
    assert mine == [
        ("acknowledged", "rev1", rid, A, "10.0.0.5"),
        ("closed", "rev2", rid, A, "10.0.0.6"),
    ]
    closed = next(r for r in rows if r["action"] == "closed")
    detail = closed["detail"] if isinstance(closed["detail"], dict) else json.loads(closed["detail"])
    assert detail["outcome"] == "referred" and "breast clinic" not in json.dumps(detail)  # the note stays private
    assert audit.verify(store, secrets.audit_key).ok


def test_a_site_limited_reviewer_cannot_act_on_another_site(store: DashboardStore, secrets: Secrets) -> None:
    ids = _fill(store)
    for act in (
        lambda: review.acknowledge(store, ids["b_urgent_old"], "a-only", None, secrets, sites={A}),
        lambda: review.close(store, ids["b_urgent_old"], "seen", None, "a-only", None, secrets, sites={A}),
        lambda: review.item(store, ids["b_urgent_old"], {A}),
    ):
        with pytest.raises(review.ReviewNotFound, match="or not one of your sites"):
            act()
    assert store._count("SELECT count(*) FROM reviews") == 0 and audit.rows(store, limit=5) == []
    shown = review.item(store, ids["a_study"], {A})
    assert shown["kind"] == "study" and shown["review"] is None and shown["row"]["site"] == A
    assert "payload" not in shown["row"] and json.loads(shown["payload"])["schema"] == "edgemed.study/1"


def test_an_audit_append_that_fails_keeps_no_review(
    store: DashboardStore, secrets: Secrets, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = _fill(store)

    def broken(*_: Any, **__: Any) -> int:
        raise ValueError("the audit trail refused the row")

    monkeypatch.setattr(audit, "append", broken)
    with pytest.raises(ValueError, match="refused the row"):
        review.acknowledge(store, ids["a_urgent_new"], "rev1", None, secrets)
    assert store._count("SELECT count(*) FROM reviews") == 0  # rolled back with the audit row


def test_counts_from_result_hourly_equal_a_direct_count_after_closes(store: DashboardStore, secrets: Secrets) -> None:
    ids = [_result(store, float(i), site=(A, B)[i % 2], level=("urgent", "inconclusive")[i % 3 == 0], seq=i)
           for i in range(24)]  # fmt: skip
    ids += [_study(store, 100.0 + i, site=A, level="inconclusive") for i in range(3)]
    for i, rid in enumerate(ids[::2]):
        review.acknowledge(store, rid, "rev", None, secrets, 200.0 + i)
        if i % 2:
            review.close(store, rid, "false_alarm", None, "rev", None, secrets, 300.0 + i)
    assert review.queue_count(store, None) == _direct_counts(store)
    assert review.queue_count(store, {A}) == {A: _direct_counts(store)[A]}


def test_settings_are_checked_stored_and_audited_with_the_webhook_origin_only(
    store: DashboardStore, secrets: Secrets
) -> None:
    assert review_settings.load(store) == review_settings.ReviewSettings(15, None)
    for bad, message in (
        ("ftp://host/x", "must start with http:// or https://"),
        ("https:///nohost", "name a host"),
        ("https://host:notaport/", "is not a URL"),
        ("https://host/a b", "without spaces"),
    ):
        with pytest.raises(ConfigError, match=message):
            review_settings.save(
                store, secrets, actor="root", address=None, escalate_after_min=10, webhook_url=bad, at=1.0
            )
    for minutes in ("0", "1441", "ten"):
        with pytest.raises(ConfigError, match="minutes"):
            review_settings.save(store, secrets, actor="root", address=None, escalate_after_min=minutes, webhook_url="")
    url = "https://hooks.example.org:8443/services/T0KEN-SECRET?x=1"
    saved = review_settings.save(
        store, secrets, actor="root", address="10.0.0.1", escalate_after_min="5", webhook_url=url, at=2.0
    )
    assert saved == review_settings.load(store) == review_settings.ReviewSettings(5, url)
    [row] = audit.rows(store, limit=5)
    assert (row["action"], row["actor"], row["address"]) == ("settings_changed", "root", "10.0.0.1")
    text = json.dumps(row["detail"])
    assert "https://hooks.example.org:8443" in text and "T0KEN" not in text


# -- export ----------------------------------------------------------------------------------------------------


def _export(store: DashboardStore, fmt: str, **kw: Any) -> bytes:
    return b"".join(results_export.export_results(store, fmt, **kw))


def test_export_csv_and_jsonl_of_a_period_and_sites_in_time_order(
    store: DashboardStore, secrets: Secrets, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(results_export, "PAGE_ROWS", 3)  # several pages per stream, merged across streams
    ids = [_result(store, 100.0 + i, site=(A, B)[i % 2], seq=i, level=("urgent", "routine")[i % 2]) for i in range(9)]
    same_time = [_result(store, 200.0, site=A, seq=20 + i, level="routine") for i in range(5)]  # one commit
    study = _study(store, 104.5)
    hostile = _result(store, 150.0, site=A, seq=40, reason='=HYPERLINK("http://x","click")', label="+SUM(A1)")
    _result(store, 99.0, site=A, seq=50)  # before the period
    _result(store, 300.0, site=A, seq=51)  # at its end: excluded
    review.acknowledge(store, ids[0], "rev1", None, secrets, 400.0)
    review.close(store, ids[0], "seen", 'a "quoted", note', "rev1", None, secrets, 401.0)

    lines = _export(store, "jsonl", since=100.0, until=300.0, sites=None).decode().splitlines()
    got = [json.loads(line) for line in lines]
    assert len(got) == 9 + 5 + 1 + 1 == results_export.count_rows(store, since=100.0, until=300.0, sites=None)
    assert [g["received_at"] for g in got] == sorted(g["received_at"] for g in got)
    assert {g["result_id"] for g in got} == {*ids, *same_time, study, hostile}
    assert set(got[0]) == set(results_export.COLUMNS) and "payload" not in got[0]
    assert got[0]["received_at"] == "1970-01-01T00:01:40.000Z"
    first = got[0]
    assert (first["review_state"], first["outcome"], first["note"], first["closed_by"]) == (
        "closed",
        "seen",
        'a "quoted", note',
        "rev1",
    )
    assert (first["model"], first["confidence"], first["delegate"]) == ("breast-cnn", 0.7, "cpu")
    assert next(g for g in got if g["result_id"] == study)["kind"] == "study"

    text = _export(store, "csv", since=100.0, until=300.0, sites={A}).decode()
    table = list(csv.DictReader(io.StringIO(text)))
    assert {r["site"] for r in table} == {A} and len(table) == 5 + 5 + 1 + 1
    assert len(table) == results_export.count_rows(store, since=100.0, until=300.0, sites={A})
    bad = next(r for r in table if r["result_id"] == hostile)
    assert bad["reason"] == '\'=HYPERLINK("http://x","click")' and bad["label"] == "'+SUM(A1)"
    assert next(r for r in table if r["result_id"] == ids[0])["note"] == 'a "quoted", note'
    assert text.splitlines()[0] == ",".join(results_export.COLUMNS)
    assert _export(store, "csv", since=100.0, until=300.0, sites=set()).decode().splitlines() == [
        ",".join(results_export.COLUMNS)
    ]
    with pytest.raises(ConfigError, match="format 'xml' is not one of csv, jsonl"):
        results_export.export_results(store, "xml", since=0.0, until=1.0, sites=None)
    with pytest.raises(ConfigError, match="must end after it starts"):
        results_export.export_results(store, "csv", since=2.0, until=1.0, sites=None)


def test_period_times_are_parsed_with_a_clear_error() -> None:
    assert results_export.parse_time("1970-01-02", "since") == 86400.0
    assert results_export.parse_time("1970-01-01T01:00:00+01:00", "until") == 0.0
    with pytest.raises(ConfigError, match="since 'yesterday' is not a date; write it like 2026-11-25"):
        results_export.parse_time("yesterday", "since")


def test_closing_takes_a_result_out_of_the_waiting_index_which_the_queue_reads(
    store: DashboardStore, secrets: Secrets
) -> None:
    import sqlalchemy as sa

    ids = _fill(store)
    rid = ids["a_urgent_new"]
    review.acknowledge(store, rid, "rev", None, secrets, 50.0)
    assert store._query("SELECT closed_at FROM results WHERE result_id = ?", (rid,))[0][0] is None
    review.close(store, rid, "seen", None, "rev", None, secrets, 60.0)
    assert store._query("SELECT closed_at FROM results WHERE result_id = ?", (rid,))[0][0] == 60.0
    study = ids["a_study"]
    review.acknowledge(store, study, "rev", None, secrets, 61.0)
    review.close(store, study, "referred", None, "rev", None, secrets, 62.0)
    assert store._query("SELECT closed_at FROM studies WHERE result_id = ?", (study,))[0][0] == 62.0
    assert review.queue_count(store, None) == _direct_counts(store)
    if store.database.dialect != "sqlite":
        return  # PostgreSQL's choice of index depends on its statistics: checked at scale (see the report)
    with store._read() as conn:
        for (kind, table), name in zip(review_queue.TABLES, ("results_waiting", "studies_waiting"), strict=True):
            stmt = sa.select(*review_queue._slice(kind, table, "urgent", A, 50, "sqlite").c)
            sql = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
            plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
            assert f"USING INDEX {name}" in plan, plan
