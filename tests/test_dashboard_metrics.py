"""`/metrics`: the allow-list (IPv4, IPv6, several CIDRs), the real output checked by `promtool check metrics`
for a few devices and two workers, the served route on 127.0.0.1, and an ingest worker's own `--metrics-port`."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from broker_fixtures import Mosquitto, free_port
from dashboard_helpers import make_result, make_study
from process_helpers import answers, edgemed, get, procs, wait_until
from web_helpers import login, make_user, running_web

from edgemed.dashboard.ingest import Ingest
from edgemed.dashboard.metrics import (
    DEFAULT_ALLOW,
    CommitTimes,
    address_allowed,
    parse_allow,
    render,
    store_collector,
)
from edgemed.dashboard.store import DashboardStore
from edgemed.envelope import encode
from edgemed.errors import ConfigError
from edgemed.publish.config import MqttConfig
from edgemed.receipts import Lost, batch_payload

__all__ = ["procs"]

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def test_the_allow_list_checks_ipv4_and_ipv6_against_several_networks() -> None:
    nets = parse_allow(["10.20.0.0/16", "192.0.2.7", "fd00::/8", *DEFAULT_ALLOW])
    assert address_allowed("127.0.0.1", nets) and address_allowed("127.8.9.10", nets)
    assert address_allowed("::1", nets) and address_allowed("10.20.255.1", nets)
    assert address_allowed("192.0.2.7", nets) and not address_allowed("192.0.2.8", nets)
    assert address_allowed("fd12:3456::1", nets) and not address_allowed("fe80::1%eth0", nets)
    assert address_allowed("::ffff:10.20.1.1", nets)  # an IPv4 client of a dual-stack socket
    assert not address_allowed("10.21.0.1", nets) and not address_allowed("2001:db8::1", nets)
    assert not address_allowed("not an address", nets) and not address_allowed("", nets)
    loopback = parse_allow(DEFAULT_ALLOW)
    assert not address_allowed("10.20.0.1", loopback) and not address_allowed("::ffff:10.0.0.1", loopback)
    for typo in ("10.20.0.1/16", "10.0.0.0/33", "lan"):
        with pytest.raises(ConfigError, match="--metrics-allow"):
            parse_allow([typo])


def _fleet(tmp_path: Path) -> DashboardStore:
    """A store with three devices (heartbeats, statuses, an urgent result, a dead letter) and two workers."""
    store = DashboardStore(tmp_path / "fleet.sqlite3")
    for i, device in enumerate(("us-01", "us-02", "us-03")):
        store.set_health("clinic-a", device, {"pending": i, "awaiting_receipt": 10 * i, "fps": 1.0})
    store.set_status("clinic-b", "cam-1", {"state": "online"})
    store.add_result(make_result(level="urgent", seq=1))
    ingest = Ingest(MqttConfig(url="mqtt://127.0.0.1:1"), store)  # never started: handle() files directly
    ingest.handle("edgemed/clinic-a/us-01/results", b"not json")
    ingest.handle("edgemed/clinic-a/us-01/results", json.dumps(make_result(device_id="us-09")).encode())
    for worker, stored in (("w1", 7), ("w2", 5)):
        times = CommitTimes()
        for seconds in (0.0004, 0.003, 0.2):
            times.observe(seconds)
        stats = {"stored": stored, "connected": 1, "messages_results": stored + 1, **times.as_stats()}
        store.report_worker(worker, consumer_id="dashboard", group="central", stats=stats)
    return store


def test_promtool_accepts_the_real_output(tmp_path: Path) -> None:
    store = _fleet(tmp_path)
    try:
        text = render(store_collector(store, device_expiry_s=None)).decode()
    finally:
        store.close()
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr + text
    for line in (
        'edgemed_results_stored_total{worker="w1"} 7.0',
        'edgemed_ingest_messages_total{kind="results",worker="w2"} 6.0',
        'edgemed_store_commit_seconds_bucket{le="0.005",worker="w1"} 2.0',
        'edgemed_store_commit_seconds_count{worker="w2"} 3.0',
        'edgemed_device_pending_results{device="us-03",site="clinic-a"} 2.0',
        'edgemed_device_awaiting_receipt_results{device="us-02",site="clinic-a"} 10.0',
        "edgemed_urgent_unacknowledged 1.0",
        'edgemed_dead_letters_total{reason="payload is not JSON"} 1.0',
        'edgemed_dead_letters_total{reason="site/device_id in the payload differ from the topic"} 1.0',
    ):
        assert line in text, (line, text)
    assert 'edgemed_device_last_seen_timestamp_seconds{device="cam-1",site="clinic-b"}' in text
    # cam-1 sent no heartbeat: no pending figure rather than a made-up 0.
    assert 'edgemed_device_pending_results{device="cam-1"' not in text


def test_metrics_are_served_on_127_0_0_1_and_refused_elsewhere(tmp_path: Path) -> None:
    store = _fleet(tmp_path)
    make_user(store, "ada", "admin")
    collector = store_collector(store, device_expiry_s=None)
    try:
        with (
            running_web(store, metrics=collector) as base,
            running_web(store, metrics=collector, metrics_allow=parse_allow(["10.0.0.0/8"])) as other,
        ):
            status, body, kind = get(f"{base}/metrics")  # no login: a scraper has none
            assert status == 200 and kind.startswith("text/plain; version=0.0.4") and b"edgemed_results_stored" in body
            # From an address outside the list (the loopback is not in 10.0.0.0/8 here): 403 and nothing else.
            status, body, _ = get(f"{other}/metrics")
            assert (status, body) == (403, b"")
            # The page's other routes are unaffected by the metrics allow-list.
            with login(other, "ada") as http:
                assert http.get("/api/summary").status_code == 200
    finally:
        store.close()


def test_a_request_through_a_proxy_is_refused(tmp_path: Path) -> None:
    import urllib.request

    store = _fleet(tmp_path)
    try:
        with running_web(store, metrics=store_collector(store, device_expiry_s=None)) as base:
            request = urllib.request.Request(f"{base}/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 403 and refused.value.read() == b""
    finally:
        store.close()


def test_an_ingest_worker_serves_its_own_metrics(
    broker: Mosquitto, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    port, log = free_port(), tmp_path / "ingest.log"
    args = ["dashboard", "ingest", "--db", str(tmp_path / "fleet.sqlite3"), "--broker", broker.url]
    procs.append(edgemed(*args, "--client-id", "w1", "--metrics-port", str(port), log=log))
    url = f"http://127.0.0.1:{port}/metrics"
    assert wait_until(lambda: answers(url), 30), log.read_text()
    status, body, _ = get(url)
    assert status == 200 and b'edgemed_ingest_worker_connected{worker="w1"}' in body
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert get(f"http://127.0.0.1:{port}/other")[0] == 404
    procs[0].terminate()
    assert procs[0].wait(20) == 0, log.read_text()


def test_a_payload_naming_another_device_is_a_dead_letter_on_the_page_and_in_metrics(tmp_path: Path) -> None:
    store = DashboardStore(tmp_path / "fleet.sqlite3")
    ingest = Ingest(MqttConfig(url="mqtt://127.0.0.1:1"), store)
    topic = "edgemed/clinic-a/us-01/"
    other = encode(make_result(device_id="us-09"))
    outcomes = [
        ingest.handle(topic + "results", other),
        ingest.handle(topic + "results", encode(make_result(site="clinic-b"))),
        ingest.handle(topic + "studies", json.dumps(make_study(device_id="us-09")).encode()),
        ingest.handle(topic + "batches", batch_payload("clinic-a", "us-09", [other])),  # the batch names another
        ingest.handle(topic + "batches", batch_payload("clinic-a", "us-01", [other])),  # one element does
        ingest.handle(topic + "lost", Lost("clinic-b", "us-01", "0123456789abcdef", ((1, 2),), "evicted").encode()),
    ]
    assert all("rejected" in o for o in outcomes), outcomes
    assert store.result_count() == 0 and store.fleet(expire_after_s=None) == []  # nothing filed as us-01 or us-09
    make_user(store, "ada", "admin")
    try:
        with running_web(store, metrics=store_collector(store, device_expiry_s=None)) as base:
            with login(base, "ada") as http:
                summary = http.get("/api/summary").json()
            metrics = get(f"{base}/metrics")[1].decode()
    finally:
        store.close()
    expected = {
        "site/device_id in the payload differ from the topic": 3,
        "site/device_id in the batch differ from the topic": 1,
        "batch element: site/device_id in the payload differ from the topic": 1,
        "site/device_id in the lost announcement differ from the topic": 1,
    }
    assert summary["dead_letters"] == expected
    for reason, n in expected.items():
        assert f'edgemed_dead_letters_total{{reason="{reason}"}} {n}.0' in metrics, metrics


def test_the_embedded_dashboard_serves_metrics_with_its_live_counters(broker: Mosquitto, tmp_path: Path) -> None:
    from edgemed.dashboard import serve

    stop, urls = threading.Event(), []
    runner = threading.Thread(
        target=serve,
        args=(broker.url,),
        kwargs={"db": tmp_path / "fleet.sqlite3", "port": 0, "stop": stop, "on_ready": urls.append},
        daemon=True,
    )
    runner.start()
    try:
        assert wait_until(lambda: bool(urls), 20)
        assert wait_until(
            lambda: b'edgemed_ingest_worker_connected{worker="edgemed-dashboard"} 1.0' in get(f"{urls[0]}metrics")[1],
            20,
        )
        status, body, _ = get(f"{urls[0]}metrics")
        check = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=60)
        assert status == 200 and check.returncode == 0, check.stdout + check.stderr
    finally:
        stop.set()
        runner.join(20)
    assert not runner.is_alive()


@pytest.mark.parametrize(
    ("argv", "action"),
    [
        (["dashboard", "--metrics-allow", "10.0.0.0/8", "serve", "--db", "x"], "serve"),
        (["dashboard", "serve", "--db", "x", "--metrics-allow", "10.0.0.0/8"], "serve"),
        (
            ["dashboard", "--metrics-allow", "10.0.0.0/8", "ingest", "--db", "x", "--broker", "mqtt://127.0.0.1"],
            "ingest",
        ),
        (["dashboard", "--broker", "mqtt://127.0.0.1", "--db", "x", "--metrics-allow", "10.0.0.0/8"], None),
    ],
)
def test_metrics_allow_takes_one_network_and_never_the_sub_command(argv: list[str], action: str | None) -> None:
    from edgemed.cli import make_parser
    from edgemed.dashboard.cli_args import metrics_networks

    args = make_parser(argv).parse_args(argv)
    assert getattr(args, "dashboard_action", None) == action
    # the parent's value is kept when the sub-command is named after it, not replaced by the loopback default
    assert metrics_networks(args) == parse_allow(["10.0.0.0/8"])


def test_metrics_allow_repeats_or_takes_a_comma_list() -> None:
    from edgemed.cli import make_parser
    from edgemed.dashboard.cli_args import metrics_networks

    base = ["dashboard", "serve", "--db", "x"]
    nets = parse_allow(["10.0.0.0/8", "fd00::/8", "192.0.2.7/32"])
    for extra in (
        ["--metrics-allow", "10.0.0.0/8", "--metrics-allow", "fd00::/8", "--metrics-allow", "192.0.2.7"],
        ["--metrics-allow", "10.0.0.0/8,fd00::/8", "--metrics-allow", "192.0.2.7"],
    ):
        assert metrics_networks(make_parser(base + extra).parse_args(base + extra)) == nets
    assert metrics_networks(make_parser(base).parse_args(base)) == parse_allow(DEFAULT_ALLOW)
