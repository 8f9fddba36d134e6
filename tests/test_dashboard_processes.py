"""The dashboard as separate processes on one database and a real mosquitto: `edgemed dashboard ingest` and
`edgemed dashboard serve`, one or two workers of a --group (MQTT 5 shared subscriptions), clean stops."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from broker_fixtures import Amqtt, Mosquitto, free_port
from process_helpers import Client, answers, edgemed, online, procs, result, stream_of, wait_until
from web_helpers import login, make_user

from edgemed.dashboard.ingest import Ingest, default_client_id, subscriptions
from edgemed.dashboard.store import DashboardStore
from edgemed.errors import ConfigError
from edgemed.publish.config import MqttConfig
from edgemed.receipts import Progress

__all__ = ["procs"]  # the fixture, used by name


def test_a_group_subscribes_to_each_device_kind_shared_and_to_status_plainly() -> None:
    filters = [(s.topic_filter, s.no_local) for s in subscriptions("central", retained_if_new=True)]
    assert filters == [
        ("$share/central/edgemed/+/+/results", False),
        ("$share/central/edgemed/+/+/studies", False),
        ("$share/central/edgemed/+/+/batches", False),
        ("$share/central/edgemed/+/+/lost", False),
        ("edgemed/+/+/status", False),
        ("edgemed/+/+/health", False),
    ]
    assert not any("receipts" in f or f.endswith("#") for f, _ in filters)
    plain = subscriptions(None, retained_if_new=False)
    assert [(s.topic_filter, s.no_local) for s in plain] == [("edgemed/+/+/#", True)]


def test_default_client_ids_are_fixed_and_fit_a_topic() -> None:
    assert default_client_id(None) == "edgemed-dashboard"
    assert default_client_id("central", "ingest-host.example.org") == "edgemed-ingest-central-ingest-host"
    assert default_client_id("g", "we!rd host") == "edgemed-ingest-g-we-rd-host"
    assert len(default_client_id("g" * 64, "h" * 60)) == 64


def test_a_group_is_refused_with_mqtt_311_and_with_a_bad_name(tmp_path: Path) -> None:
    store = DashboardStore(tmp_path / "fleet.sqlite3")
    try:
        with pytest.raises(ConfigError, match="--group needs MQTT 5"):
            Ingest(MqttConfig(url="mqtt://127.0.0.1:1", protocol="3.1.1"), store, group="central")
        with pytest.raises(ConfigError, match="--group 'a/b' must be"):
            Ingest(MqttConfig(url="mqtt://127.0.0.1:1"), store, group="a/b")
    finally:
        store.close()


def test_a_group_on_a_broker_without_mqtt5_is_a_clear_error(amqtt_broker: Amqtt, tmp_path: Path) -> None:
    store = DashboardStore(tmp_path / "fleet.sqlite3")
    cfg = MqttConfig(url=f"mqtt://127.0.0.1:{amqtt_broker.port}", connect_timeout_s=1.0)
    ingest = Ingest(cfg, store, group="central", client_id="w1")
    ingest.start()
    try:

        def refused() -> bool:
            try:
                ingest.check()
            except ConfigError as exc:
                assert "speaks only MQTT 3.1.1, which has no shared subscriptions" in str(exc)
                assert "without --group" in str(exc)
                return True
            return False

        assert wait_until(refused, 20), ingest.snapshot()
        assert "no shared subscriptions" in ingest.snapshot()["broker_error"]
    finally:
        ingest.stop()
        store.close()


def test_two_workers_with_one_client_id_are_told_to_pass_client_id(
    broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = DashboardStore(tmp_path / "fleet.sqlite3")
    cfg = MqttConfig(url=broker.url, reconnect_min_s=0.2, reconnect_max_s=0.5)
    first, second = Ingest(cfg, store, group="central"), Ingest(cfg, store, group="central")
    assert first.client_id == second.client_id  # same host, no --client-id: the mistake under test
    caplog.set_level(logging.WARNING, logger="edgemed.dashboard.ingest")
    first.start()
    second.start()
    try:
        problem = lambda: first.snapshot()["broker_error"] or second.snapshot()["broker_error"]  # noqa: E731
        assert wait_until(lambda: bool(problem()) and "--client-id" in str(problem()), 30), (
            first.snapshot(),
            second.snapshot(),
        )
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any(
            "take the broker session" in m and "another client" in m and "--client-id" in m and "\n" not in m
            for m in lines
        ), lines
    finally:
        first.stop()
        second.stop()
        store.close()


def _stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


def test_ingest_and_serve_run_apart_on_one_database(
    default_broker: Mosquitto, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    db, log, port = tmp_path / "fleet.sqlite3", tmp_path / "processes.log", free_port()
    store = DashboardStore(db)  # the first admin, before anything runs (the CLI does the same: users add)
    make_user(store, "ada", "admin")
    store.close()
    watcher = Client(default_broker.port, "edgemed-consumer/#", "edgemed/+/+/receipts")
    device = Client(default_broker.port)
    try:
        procs.append(edgemed("dashboard", "ingest", "--db", str(db), "--broker", default_broker.url, log=log))
        procs.append(edgemed("dashboard", "serve", "--db", str(db), "--port", str(port), log=log))
        assert wait_until(lambda: online(watcher, "dashboard", "edgemed-dashboard"), 30), log.read_text()
        base = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: answers(f"{base}/login"), 30), log.read_text()
        http = login(base, "ada")

        def get_json(path: str) -> dict[str, Any]:
            answer: dict[str, Any] = http.get(path).json()
            return answer

        for seq in range(5):
            device.publish(
                "edgemed/clinic-a/us-01/results", result("us-01", seq, level="urgent" if seq == 2 else "routine")
            )
        assert wait_until(lambda: len(get_json("/api/results")["results"]) == 5, 20), log.read_text()
        summary = get_json("/api/summary")
        assert summary["ingest"] is None  # no ingest in the web process...
        assert summary["attention_total"] == 1
        # ...its page shows the worker from its reports in the database.

        def worker() -> dict[str, Any]:
            workers = get_json("/api/summary")["workers"]
            return workers[0] if workers else {"stats": {}}

        assert wait_until(lambda: worker()["stats"].get("stored") == 5, 20), worker()
        row = worker()
        assert (row["worker_id"], row["group"], row["stats"]["connected"]) == ("edgemed-dashboard", None, 1)
        topic = "edgemed/clinic-a/us-01/receipts"
        assert wait_until(lambda: watcher.receipt(topic) == Progress(4, (), 4), 15), watcher.last(topic)

        _stop(procs[0], log)  # SIGTERM: clean offline, the last report says disconnected
        state = watcher.last("edgemed-consumer/dashboard/edgemed-dashboard")
        assert state is not None and (state["state"], state["clean"]) == ("offline", True)
        assert worker()["stats"]["connected"] == 0  # its last report, written as it stopped
        http.close()
        _stop(procs[1], log)
    finally:
        watcher.close()
        device.close()


def test_two_workers_of_a_group_store_every_result_once_with_right_receipts(
    default_broker: Mosquitto, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    db, log = tmp_path / "fleet.sqlite3", tmp_path / "workers.log"
    devices, per_device = [f"us-{i:02d}" for i in range(4)], 60
    watcher = Client(default_broker.port, "edgemed-consumer/#")
    publisher = Client(default_broker.port)
    try:
        for name in ("w1", "w2"):
            args = ["dashboard", "ingest", "--db", str(db), "--broker", default_broker.url, "--group", "central"]
            procs.append(edgemed(*args, "--client-id", name, log=log))
        assert wait_until(lambda: online(watcher, "dashboard", "w1") and online(watcher, "dashboard", "w2"), 30), (
            log.read_text()
        )
        for seq in range(per_device):
            for device in devices:
                publisher.publish(f"edgemed/clinic-a/{device}/results", result(device, seq))
            publisher.publish("edgemed/clinic-a/us-00/status", b'{"state":"online"}', retain=True)
        total = len(devices) * per_device
        store = DashboardStore(db)
        try:
            assert wait_until(lambda: store.result_count() == total, 30), (store.result_count(), log.read_text())

            def stored() -> dict[str, int]:
                return {w["worker_id"]: int(w["stats"]["stored"]) for w in store.workers()}

            # Each worker's report: together every result exactly once, and both took a share.
            assert wait_until(lambda: sum(stored().values()) == total, 15), stored()
            assert all(n > 0 for n in stored().values()) and set(stored()) == {"w1", "w2"}, stored()
            assert sum(int(w["stats"]["duplicates"]) for w in store.workers()) == 0
        finally:
            store.close()
        # The retained receipt of each device, as a device connecting now gets it, covers every seq, whichever
        # worker stored which.
        late = Client(default_broker.port, "edgemed/+/+/receipts")
        try:

            def receipts_right() -> bool:
                return all(
                    late.receipt(f"edgemed/clinic-a/{d}/receipts") == Progress(per_device - 1, (), per_device - 1)
                    for d in devices
                )

            assert wait_until(receipts_right, 15), {d: late.receipt(f"edgemed/clinic-a/{d}/receipts") for d in devices}
            assert {late.last(f"edgemed/clinic-a/{d}/receipts")["stream"] for d in devices} == {  # type: ignore[index]
                stream_of(d) for d in devices
            }
        finally:
            late.close()
        for proc in procs:
            _stop(proc, log)
        for name in ("w1", "w2"):
            state = watcher.last(f"edgemed-consumer/dashboard/{name}")
            assert state is not None and (state["state"], state["clean"]) == ("offline", True)
    finally:
        watcher.close()
        publisher.close()


@pytest.mark.parametrize(
    "command",
    [
        ["dashboard", "ingest", "--broker", "mqtt://127.0.0.1:1"],
        ["dashboard", "serve"],
        ["dashboard", "acl"],
        ["dashboard", "--broker", "mqtt://127.0.0.1:1"],
    ],
)
def test_a_database_url_reaches_the_store_as_given(command: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Path("postgresql://u@h:5432/fleet") is "postgresql:/u@h:5432/fleet": the host is gone. Every command must
    # hand --db to the store untouched (the seam: a store that records what it was given and stops there).
    import edgemed.dashboard.store as store_module
    from edgemed.cli import make_parser

    url = "postgresql://edgemed@127.0.0.1:5432/fleet"
    given: list[object] = []

    def opened(db: object, **kwargs: object) -> None:
        given.append(db)
        raise ConfigError("stop here: the store was opened")

    monkeypatch.setattr(store_module, "DashboardStore", opened)
    argv = [*command, "--db", url]
    args = make_parser(argv).parse_args(argv)
    with pytest.raises(ConfigError, match="stop here"):
        args.func(args)
    assert given == [url]


def test_a_worker_killed_mid_stream_loses_nothing_on_sqlite(
    default_broker: Mosquitto, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    # The dead worker's session keeps what the broker dealt it (mosquitto 2.0.11 goes on dealing the group's
    # messages to it while it is away). Recovery is the devices' part: re-send every seq no receipt settles. Here
    # the devices are a loop doing just that on the retained receipts (the real outbox: tests/test_fleet_scale.py).
    db, log = tmp_path / "fleet.sqlite3", tmp_path / "workers.log"
    devices, per_device = [f"us-{i:02d}" for i in range(4)], 150
    total = len(devices) * per_device
    watcher = Client(default_broker.port, "edgemed-consumer/#", "edgemed/+/+/receipts")
    publisher = Client(default_broker.port)
    base = ["dashboard", "ingest", "--db", str(db), "--broker", default_broker.url, "--group", "central"]
    # One payload per seq, sent again as it was (its result_id too), as the outbox does.
    payloads = {(d, seq): result(d, seq) for d in devices for seq in range(per_device)}
    store: DashboardStore | None = None
    try:
        for name in ("w1", "w2"):
            procs.append(edgemed(*base, "--client-id", name, log=log))
        assert wait_until(lambda: online(watcher, "dashboard", "w1") and online(watcher, "dashboard", "w2"), 30), (
            log.read_text()
        )
        store = DashboardStore(db)
        for seq in range(per_device):
            for device in devices:
                publisher.publish(f"edgemed/clinic-a/{device}/results", payloads[device, seq])
            if seq == per_device // 4:
                assert wait_until(lambda: store.result_count() > 0, 10)
                procs[1].kill()  # SIGKILL mid-stream: what it held uncommitted was never acknowledged
                procs[1].wait(10)

        def settled(device: str) -> set[int]:
            state = watcher.receipt(f"edgemed/clinic-a/{device}/receipts")
            return {s for s in range(per_device) if state is not None and state.settles(s)}

        resent = 0
        for _ in range(40):  # re-send rounds, as a device does after its receipt timeout
            time.sleep(1.0)
            unsettled = {d: set(range(per_device)) - settled(d) for d in devices}
            if not any(unsettled.values()):
                break
            for device, seqs in unsettled.items():
                for seq in sorted(seqs):
                    publisher.publish(f"edgemed/clinic-a/{device}/results", payloads[device, seq])
                    resent += 1
        assert resent > 0, "nothing needed sending again: the killed worker held nothing?"
        assert store.result_count() == total, (store.result_count(), log.read_text()[-2000:])
        for device in devices:
            assert watcher.receipt(f"edgemed/clinic-a/{device}/receipts") == Progress(
                per_device - 1, (), per_device - 1
            )
        # Back on its session, the killed worker gets what the broker kept for it: copies, dropped by result id.
        procs.append(edgemed(*base, "--client-id", "w2", log=log))
        assert wait_until(lambda: online(watcher, "dashboard", "w2"), 30), log.read_text()

        def w2_duplicates() -> int:
            return sum(int(w["stats"]["duplicates"]) for w in store.workers() if w["worker_id"] == "w2")  # type: ignore[union-attr]

        assert wait_until(lambda: w2_duplicates() > 0, 20), store.workers()
        assert store.result_count() == total
        for proc in (procs[0], procs[2]):
            _stop(proc, log)
    finally:
        if store is not None:
            store.close()
        watcher.close()
        publisher.close()


@pytest.mark.parametrize(
    ("argv", "days"),
    [
        (["dashboard", "--broker", "mqtt://127.0.0.1:1", "--db", "x.sqlite3"], 7.0),
        (["dashboard", "--broker", "mqtt://127.0.0.1:1", "--db", "x.sqlite3", "--health-retention-days", "2"], 2.0),
        (["dashboard", "ingest", "--broker", "mqtt://127.0.0.1:1", "--db", "x", "--health-retention-days", "3"], 3.0),
        (["dashboard", "--health-retention-days", "4", "ingest", "--broker", "mqtt://127.0.0.1:1", "--db", "x"], 4.0),
    ],
)
def test_health_retention_days_reaches_the_store_setting(argv: list[str], days: float) -> None:
    from edgemed.cli import make_parser
    from edgemed.dashboard.cli_args import retention_days

    assert retention_days(make_parser(argv).parse_args(argv)) == days


def test_a_retention_that_is_not_positive_is_refused() -> None:
    from edgemed.cli import make_parser
    from edgemed.dashboard.cli_args import retention_days

    argv = ["dashboard", "--db", "x", "--health-retention-days", "0"]
    args = make_parser(argv).parse_args(argv)
    with pytest.raises(ConfigError, match="--health-retention-days must be a positive number"):
        retention_days(args)


def test_a_group_worker_asks_for_a_short_session_so_a_dead_member_leaves_the_group() -> None:
    from edgemed.dashboard.processes import GROUP_SESSION_EXPIRY_S, session_expiry

    assert session_expiry(None, "fleet") == GROUP_SESSION_EXPIRY_S
    assert session_expiry(None, None) is None  # a single consumer: the broker keeps its queue for a day
    assert session_expiry(600, "fleet") == 600
    with pytest.raises(ConfigError, match="--session-expiry must be between"):
        session_expiry(-1, None)
