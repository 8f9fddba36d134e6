"""Escalation against a real webhook receiver on 127.0.0.1: an urgent result unacknowledged past the setting is
claimed once (even by two processes' escalators at once, on both engines), audited as ``escalated`` by ``system``,
POSTed with exactly the documented fields, retried with back-off after a failure, never posted once acknowledged,
counted in ``edgemed_dashboard_escalated``; the thread posts on its own and stops.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from dashboard_helpers import make_result, make_study, wait_until

from edgemed.dashboard import audit, escalation, review, review_settings
from edgemed.dashboard.escalation import Escalator
from edgemed.dashboard.metrics import render, store_collector
from edgemed.dashboard.secrets import Secrets, load_secrets
from edgemed.dashboard.store import DashboardStore

A, B = "clinic-a", "clinic-b"
BASE = "https://dashboard.example.org"
MIN = 60.0


class Receiver(ThreadingHTTPServer):
    """A webhook on 127.0.0.1: records each POST and answers the next status of ``answers`` (then 200)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.posts: list[dict[str, Any]] = []
        self.answers: list[int] = []
        self.trickle_s = 0.0  # > 0: answer 200 with a body that keeps coming for this long
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook/T0KEN"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def log_message(self, format: str, *args: Any) -> None:
        return  # quiet: the test reads what it received

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.posts.append(
                {"path": self.path, "type": self.headers["Content-Type"], "body": json.loads(body)}
            )
            status = self.server.answers.pop(0) if self.server.answers else 200
        if self.server.trickle_s > 0:
            self._trickle(self.server.trickle_s)
            return
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _trickle(self, seconds: float) -> None:
        # A webhook (or whatever the address points at) that never stops sending its answer's body.
        import time

        self.send_response(200)
        self.send_header("Content-Length", str(10**9))
        self.end_headers()
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                self.wfile.write(b"x" * 65536)
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            return  # the dashboard hung up: what it should do


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "fleet.sqlite3") if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))


@pytest.fixture
def secrets(tmp_path: Path) -> Secrets:
    return load_secrets(tmp_path / "fleet.key", create=True)


def _setup(store: DashboardStore, secrets: Secrets, url: str | None, minutes: int = 15) -> None:
    review_settings.save(
        store, secrets, actor="admin", address=None, escalate_after_min=minutes, webhook_url=url, at=0.5
    )


def _urgent(store: DashboardStore, at: float, site: str = A, seq: int = 0, level: str = "urgent") -> str:
    body = make_result(site=site, seq=seq, level=level, reason="malignant 0.91")
    store.add_result(body, at)
    return str(body["result_id"])


def test_claimed_once_audited_posted_retried_and_counted(db: str, secrets: Secrets, receiver: Receiver) -> None:
    store = DashboardStore(db)
    try:
        _setup(store, secrets, receiver.url)
        late = _urgent(store, 1000.0)
        acked = _urgent(store, 1000.0, seq=1)
        _urgent(store, 1000.0, seq=2, level="routine")
        other = _urgent(store, 1000.0 + 10 * MIN, site=B, seq=3)
        study = make_study(site=B)
        store.add_study(study, 1000.0)
        review.acknowledge(store, acked, "rev", None, secrets, 1000.0 + 5 * MIN)
        esc = Escalator(store, secrets, BASE + "/", retry_base_s=30.0)
        try:
            assert esc.run_once(1000.0 + 14 * MIN) == (0, 0)  # not yet 15 minutes
            receiver.answers = [503]  # the webhook is down at first
            assert esc.run_once(1000.0 + 16 * MIN) == (2, 1)  # the result and the study: one post failed
            assert len(receiver.posts) == 2
            rows = {r["result_id"]: r for r in store._query("SELECT * FROM escalations")}
            assert set(rows) == {late, study["result_id"]}
            failed = next(r for r in rows.values() if r["webhook_status"] == "HTTP 503")
            assert failed["attempts"] == 1 and failed["next_attempt_at"] == 1000.0 + 16 * MIN + 30.0
            ok = next(r for r in rows.values() if r is not failed)
            assert ok["webhook_status"] == "delivered (HTTP 200)" and ok["next_attempt_at"] is None
            assert esc.run_once(1000.0 + 16 * MIN + 10) == (0, 0)  # the back-off holds
            assert esc.run_once(1000.0 + 16 * MIN + 31) == (0, 1)  # retried once due
            assert len(receiver.posts) == 3 and receiver.posts[2]["body"]["result_id"] == failed["result_id"]
            retried = store._query("SELECT * FROM escalations WHERE result_id = ?", (failed["result_id"],))[0]
            assert retried["webhook_status"] == "delivered (HTTP 200)" and retried["attempts"] == 2
            assert esc.run_once(1000.0 + 40 * MIN) == (1, 1)  # clinic-b's urgent result is due now
        finally:
            esc.stop()
        posted: dict[str, dict[str, Any]] = {}
        for post in receiver.posts:
            posted.setdefault(post["body"]["result_id"], post)  # its first post
        assert set(posted) == {late, study["result_id"], other}
        first = posted[late]
        assert first["path"] == "/hook/T0KEN" and first["type"] == "application/json"
        assert first["body"] == {
            "result_id": late,
            "site": A,
            "device_id": "us-01",
            "level": "urgent",
            "reason": "malignant 0.91",
            "received_at": 1000.0,
            "minutes_waiting": 16.0,
            "link": f"{BASE}/results/{late}",
        }
        trail = [r for r in audit.rows(store, limit=20) if r["action"] == "escalated"]
        assert sorted(r["target"] for r in trail) == sorted([late, study["result_id"], other])
        assert {r["actor"] for r in trail} == {"system"}
        assert audit.verify(store, secrets.audit_key).ok
        # Escalated and unacknowledged: highlighted in the queue, counted per site, exported as a gauge.
        assert {r["result_id"]: r["escalated"] for r in review.queue(store, None)}[late] is True
        assert escalation.escalated_waiting(store) == {A: 1, B: 2}
        assert review.queue_count(store, None)[B]["escalated"] == 2
        review.acknowledge(store, late, "rev", None, secrets, 1000.0 + 41 * MIN)
        assert escalation.escalated_waiting(store) == {B: 2}
        text = render(store_collector(store, device_expiry_s=None)).decode()
        assert 'edgemed_dashboard_escalated{site="clinic-b"} 2.0' in text
        assert 'edgemed_dashboard_escalated{site="clinic-a"}' not in text
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        store.close()


def test_two_processes_escalating_at_once_claim_each_result_once(db: str, secrets: Secrets) -> None:
    stores = [DashboardStore(db) for _ in range(2)]
    try:
        _setup(stores[0], secrets, None, minutes=1)
        ids = {_urgent(stores[0], 100.0 + i, site=(A, B)[i % 2], seq=i) for i in range(30)}
        claimed: list[list[str]] = [[], []]
        go = threading.Barrier(2)

        def claim(i: int) -> None:
            go.wait(10)
            for round_ in range(3):
                claimed[i] += escalation.claim_due(stores[i], secrets, 1000.0 + round_, 1, webhook=False)

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(claimed[0] + claimed[1]) == sorted(ids)  # every one, none twice
        trail = [r["target"] for r in audit.rows(stores[0], limit=100) if r["action"] == "escalated"]
        assert sorted(trail) == sorted(ids)
        statuses = {r[0] for r in stores[0]._query("SELECT webhook_status FROM escalations")}
        assert statuses == {"no webhook set"}
        assert audit.verify(stores[0], secrets.audit_key).ok
    finally:
        for s in stores:
            s.close()


def test_a_result_acknowledged_after_its_claim_is_not_posted(
    tmp_path: Path, secrets: Secrets, receiver: Receiver
) -> None:
    store = DashboardStore(tmp_path / "fleet.sqlite3")
    try:
        _setup(store, secrets, receiver.url, minutes=1)
        rid = _urgent(store, 100.0)
        assert escalation.claim_due(store, secrets, 200.0, 1, webhook=True) == [rid]
        review.acknowledge(store, rid, "rev", None, secrets, 201.0)
        with Escalator(store, secrets, BASE)._client as client:
            assert escalation.deliver_due(store, receiver.url, BASE, 202.0, client=client, retry_base_s=1.0) == 0
        assert receiver.posts == []
        row = store._query("SELECT webhook_status, next_attempt_at FROM escalations")[0]
        assert tuple(row) == ("acknowledged before it was posted", None)
    finally:
        store.close()


def test_gives_up_after_max_attempts(tmp_path: Path, secrets: Secrets, receiver: Receiver) -> None:
    store = DashboardStore(tmp_path / "fleet.sqlite3")
    try:
        _setup(store, secrets, receiver.url, minutes=1)
        _urgent(store, 100.0)
        receiver.answers = [500] * escalation.MAX_ATTEMPTS
        esc = Escalator(store, secrets, BASE, retry_base_s=1.0)
        try:
            now = 200.0
            for _ in range(escalation.MAX_ATTEMPTS):
                esc.run_once(now)
                now += escalation.MAX_BACKOFF_S + 1
            assert esc.run_once(now) == (0, 0)
        finally:
            esc.stop()
        assert len(receiver.posts) == escalation.MAX_ATTEMPTS
        row = store._query("SELECT webhook_status, attempts, next_attempt_at FROM escalations")[0]
        assert tuple(row) == (f"gave up after {escalation.MAX_ATTEMPTS} attempts: HTTP 500", 8, None)
    finally:
        store.close()


def test_a_webhook_answer_is_never_read_beyond_its_status(tmp_path: Path, secrets: Secrets, receiver: Receiver) -> None:
    import time

    store = DashboardStore(tmp_path / "fleet.sqlite3")
    try:
        _setup(store, secrets, receiver.url, minutes=1)
        _urgent(store, 100.0)
        receiver.trickle_s = 4.0  # each piece well inside the 5 s read time-out: only ignoring the body ends it
        esc = Escalator(store, secrets, BASE)
        try:
            started = time.monotonic()
            assert esc.run_once(200.0) == (1, 1)
            assert time.monotonic() - started < 2.0, "the escalation thread read the webhook's endless answer"
        finally:
            esc.stop()
        assert store._query("SELECT webhook_status FROM escalations")[0][0] == "delivered (HTTP 200)"
    finally:
        store.close()


def test_the_thread_posts_on_its_own_and_stops(tmp_path: Path, secrets: Secrets, receiver: Receiver) -> None:
    import time

    store = DashboardStore(tmp_path / "fleet.sqlite3")
    try:
        _setup(store, secrets, receiver.url, minutes=1)
        rid = _urgent(store, time.time() - 2 * MIN)
        esc = Escalator(store, secrets, BASE, interval_s=0.05)
        esc.start()
        try:
            assert wait_until(lambda: len(receiver.posts) == 1, 10), "the escalation was never posted"
        finally:
            esc.stop()
        assert receiver.posts[0]["body"]["result_id"] == rid
        assert esc._thread is not None and not esc._thread.is_alive()
    finally:
        store.close()


def test_the_web_process_runs_the_escalation_thread_unless_told_not_to(tmp_path: Path) -> None:
    from edgemed.dashboard.web.launch import WebOptions, start_web

    db = tmp_path / "fleet.sqlite3"
    store = DashboardStore(db)
    try:
        for escalate in (True, False):
            server = start_web(
                store,
                db=db,
                host="127.0.0.1",
                port=0,
                options=WebOptions(escalation=escalate),
                public_origins=("https://dashboard.example.org",),
                device_expiry_s=None,
                metrics=None,
                metrics_allow=None,
            )
            threads = [t for t in threading.enumerate() if t.name == "edgemed-escalation"]
            escalators = [c for c in server._companions if isinstance(c, Escalator)]
            server.stop()
            assert len(threads) == len(escalators) == (1 if escalate else 0)
            if escalate:
                assert escalators[0].base_url == "https://dashboard.example.org"  # the links name the proxy
                threads[0].join(10)
                assert not threads[0].is_alive(), "the escalation thread outlived its server"
    finally:
        store.close()
