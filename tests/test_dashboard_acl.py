"""`edgemed dashboard acl` on a real mosquitto (password file + the generated acl_file): a device publishes and
reads only under its own site and device id, cannot spoof the consumer state, and the dashboard (a --group
worker too) works end to end under the ACL.

Found on mosquitto 2.0.11 (see test_a_share_subscription_needs_no_rule_of_its_own): a SUBSCRIBE is granted
whatever the ACL says; each message is checked against the subscriber's ``read`` rules on the message's own topic
when it is delivered, also through ``$share/{group}/...``. So "cannot read" is shown by what never arrives.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pytest
from broker_fixtures import Mosquitto
from process_helpers import ROOT, Client, edgemed, online, procs, result, wait_until

from edgemed.dashboard.acl import AclDevice, acl_text, load_devices_file, merge_devices, run_acl
from edgemed.dashboard.store import DashboardStore
from edgemed.errors import ConfigError
from edgemed.receipts import Progress

__all__ = ["procs"]

USERS = {"dashboard": "dash-pw", "us-01": "pw-1", "us-02": "pw-2", "probe-b": "pw-3"}


def _acl(tmp_path: Path) -> str:
    """The acl_file the command prints for a database that saw clinic-a/us-01 and a file naming two more."""
    db = tmp_path / "fleet.sqlite3"
    store = DashboardStore(db)
    store.set_status("clinic-a", "us-01", {"state": "online"})
    store.close()
    devices = tmp_path / "devices.csv"
    devices.write_text("site,device_id,username\nclinic-a,us-02,\nclinic-b,us-01,probe-b\n")
    out = subprocess.run(
        [sys.executable, "-m", "edgemed", "dashboard", "acl", "--db", str(db), "--devices", str(devices)],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "acl_file for 3 devices" in out.stderr
    return out.stdout


def test_the_acl_binds_site_and_device_and_refuses_what_it_cannot_tell_apart(tmp_path: Path) -> None:
    text = _acl(tmp_path)
    block = text.split("# clinic-b/us-01\n", 1)[1]
    assert block.splitlines()[:8] == [
        "user probe-b",
        "topic write edgemed/clinic-b/us-01/results",
        "topic write edgemed/clinic-b/us-01/studies",
        "topic write edgemed/clinic-b/us-01/batches",
        "topic write edgemed/clinic-b/us-01/lost",
        "topic write edgemed/clinic-b/us-01/status",
        "topic write edgemed/clinic-b/us-01/health",
        "topic read edgemed/clinic-b/us-01/receipts",
    ]
    assert "pattern" not in text and "%u" not in text  # a username pattern would leave the site open
    with pytest.raises(ConfigError, match="both log in as 'x'"):
        merge_devices([AclDevice("a", "d1", "x"), AclDevice("b", "d2", "x")], "dashboard")
    with pytest.raises(ConfigError, match="dashboard's user name"):
        merge_devices([AclDevice("a", "dashboard", "dashboard")], "dashboard")
    bad = tmp_path / "bad.csv"
    bad.write_text("site,device_id,username\nclinic-a,us-09,evil\\ntopic readwrite #\n")
    with pytest.raises(ConfigError, match=r"username .* must be"):
        load_devices_file(bad)
    yaml_file = tmp_path / "devices.yaml"
    yaml_file.write_text("devices:\n  - {site: clinic-c, device_id: cam-1}\n")
    assert load_devices_file(yaml_file) == [AclDevice("clinic-c", "cam-1", "cam-1")]
    with pytest.raises(ConfigError, match=r"needs --db .* or --devices"):
        run_acl(argparse.Namespace(db=None, devices=None, dashboard_user="dashboard", consumer_id="dashboard"))
    with pytest.raises(ConfigError, match="must be 1-64"):
        acl_text([], consumer_id="a/#")


@pytest.fixture
def acl_broker(mosquitto_factory: type[Mosquitto], tmp_path: Path) -> Mosquitto:
    return mosquitto_factory(defaults=True, users=USERS, acl=_acl(tmp_path)).start()


def _settle() -> None:
    time.sleep(0.5)  # what the broker would still deliver has arrived by now (loopback)


def test_a_device_cannot_publish_or_read_outside_its_own_topics(acl_broker: Mosquitto) -> None:
    port = acl_broker.port
    dashboard = Client(port, "edgemed/#", "edgemed-consumer/#", username="dashboard", password="dash-pw")
    us02 = Client(
        port, "edgemed/+/+/receipts", "edgemed/+/+/results", "edgemed-consumer/#", username="us-02", password="pw-2"
    )
    us01 = Client(port, username="us-01", password="pw-1")
    try:
        us01.publish("edgemed/clinic-a/us-01/results", result("us-01", 0))  # its own: arrives
        for topic in (
            "edgemed/clinic-a/us-02/results",  # another device of its site
            "edgemed/clinic-b/us-01/results",  # its own device id under another site
            "edgemed/clinic-a/us-01/receipts",  # receipts are the dashboard's to write
            "edgemed-consumer/dashboard/edgemed-dashboard",  # spoofing the consumer state
        ):
            us01.publish(topic, b'{"state":"online"}' if "consumer" in topic else result("us-01", 1))
        dashboard.publish("edgemed/clinic-a/us-01/receipts", b'{"for":"us-01"}')
        dashboard.publish("edgemed/clinic-a/us-02/receipts", b'{"for":"us-02"}')
        dashboard.publish("edgemed-consumer/dashboard/edgemed-dashboard", b'{"state":"online"}')
        _settle()
        assert dashboard.topics().count("edgemed/clinic-a/us-01/results") == 1
        assert not {"edgemed/clinic-a/us-02/results", "edgemed/clinic-b/us-01/results"} & set(dashboard.topics())
        # us-02 got its own receipt and the dashboard's consumer state (once: us-01's spoof never arrived), never
        # us-01's receipt or result.
        assert sorted(us02.topics()) == [
            "edgemed-consumer/dashboard/edgemed-dashboard",
            "edgemed/clinic-a/us-02/receipts",
        ]
    finally:
        for c in (dashboard, us01, us02):
            c.close()


def test_a_share_subscription_needs_no_rule_of_its_own(acl_broker: Mosquitto) -> None:
    port = acl_broker.port
    dash = Client(port, "$share/central/edgemed/+/+/results", username="dashboard", password="dash-pw")
    thief = Client(port, "$share/central/edgemed/+/+/results", username="us-02", password="pw-2")
    us01 = Client(port, username="us-01", password="pw-1")
    try:
        for seq in range(6):
            us01.publish("edgemed/clinic-a/us-01/results", result("us-01", seq))
        _settle()
        # The broker hands each message to one member of the group; one the ACL forbids us-02 to read is not
        # delivered to it (and, on mosquitto 2.0.11, not to the other member either).
        assert thief.topics() == []
        assert 0 < len(dash.topics()) <= 6
    finally:
        for c in (dash, thief, us01):
            c.close()


def test_the_dashboard_works_end_to_end_under_the_acl(
    acl_broker: Mosquitto, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    db, log = tmp_path / "ingest.sqlite3", tmp_path / "ingest.log"
    (tmp_path / "dash-pw").write_text("dash-pw\n")
    (tmp_path / "dash-pw").chmod(0o600)
    device = Client(
        acl_broker.port, "edgemed/clinic-a/us-01/receipts", "edgemed-consumer/#", username="us-01", password="pw-1"
    )
    try:
        common = ["--db", str(db), "--broker", acl_broker.url, "--username", "dashboard"]
        common += ["--password-file", str(tmp_path / "dash-pw"), "--group", "central"]
        procs.append(edgemed("dashboard", "ingest", *common, "--client-id", "w1", log=log))
        procs.append(edgemed("dashboard", "ingest", *common, "--client-id", "w2", log=log))
        assert wait_until(lambda: online(device, "dashboard", "w1") and online(device, "dashboard", "w2"), 30), (
            log.read_text()
        )
        for seq in range(10):
            device.publish("edgemed/clinic-a/us-01/results", result("us-01", seq))
        topic = "edgemed/clinic-a/us-01/receipts"
        assert wait_until(lambda: device.receipt(topic) == Progress(9, (), 9), 20), (
            device.last(topic),
            log.read_text(),
        )
        store = DashboardStore(db)
        try:
            assert store.result_count() == 10
        finally:
            store.close()
        for proc in procs:
            proc.terminate()
            assert proc.wait(20) == 0, log.read_text()
        assert "refused" not in log.read_text() and "Traceback" not in log.read_text(), log.read_text()
    finally:
        device.close()
