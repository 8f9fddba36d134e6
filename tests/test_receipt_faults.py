"""Issue 11, what it must show: nothing lost end to end, on a real mosquitto with its DEFAULT limits.

Each test runs two rigs side by side (``receipt_faults.Rig``): mosquitto with its defaults (``max_queued_messages``
1000, ``max_inflight_messages`` 20) and persistence on with the default autosave interval (1800 s; the rig makes
the broker save once the dashboard and devices are connected, as the last autosave before the fault), and the
same with persistence off. In each, the real dashboard (``python -m edgemed dashboard``, the consumer of record,
``--consumer-id`` left at its default ``dashboard``) and real devices (``python -m edgemed run`` on the real int8
model over real BreastMNIST images, profile ``delivery.consumer: dashboard``), each a process of its own.

Every case: every ``seq`` of every device stored exactly once in the dashboard's ``results``/``studies`` tables,
none settled as lost, every device exits 0 (every result receipted) with its outbox empty.

The minute-long case is marked ``minute`` (CI runs it; ``-m "not minute"`` leaves it out locally). Figures:
``EDGEMED_FAULT_FIGURES=FILE`` appends them to FILE, ``python tests/fault_cases.py table FILE`` prints the table.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_fixtures import Mosquitto
from dashboard_helpers import export_images
from fault_cases import (
    broker_sigkill,
    dashboard_down,
    dashboard_sigkill_while_committing,
    device_sigkill,
    rigs,
)
from receipt_faults import IMAGES_PER_PASS, Rig

pytestmark = pytest.mark.slow


@pytest.fixture
def two_rigs(
    mosquitto_factory: type[Mosquitto], tmp_path: Path, int8_model: Path, data_dir: Path
) -> Iterator[list[Rig]]:
    """A rig with broker persistence on and one with it off; every process is killed at teardown."""
    images = export_images(data_dir, tmp_path / "images", IMAGES_PER_PASS)
    with rigs(tmp_path, mosquitto_factory, int8_model, images) as made:
        for rig in made:
            rig.start()
        yield made


def _finish(made: list[Rig], case: str) -> None:
    for rig in made:
        rig.finish()
    for rig in made:
        rig.check(case)


def test_broker_sigkilled_mid_run_restarted_3_s_later_with_the_device_back_first(two_rigs: list[Rig]) -> None:
    # 3,000 results at 200/s: the fault comes after 600 are stored and production goes on after the restart,
    # so the dashboard sees later seqs beyond whatever the broker lost or dropped.
    for rig in two_rigs:
        rig.device("dev-1", 3000, fps_cap=200).start()
    for rig in two_rigs:
        rig.save_after_connect()
    broker_sigkill(two_rigs, after=600)
    _finish(two_rigs, "broker SIGKILLed mid-run, restarted 3 s later, device first")


@pytest.mark.minute
def test_dashboard_stopped_for_a_minute_while_5000_results_are_published_by_three_devices(
    two_rigs: list[Rig],
) -> None:
    # One device alone publishes more than 5,000 while the dashboard is down (five times the broker's queue
    # limit for the dashboard's session); two more publish beside it. When the dashboard is back, the devices
    # send their backlogs faster than it stores them and the broker drops what the dashboard falls behind by
    # more than 1000 (connected or not): the devices send those again once receipts stopped advancing for
    # delivery.receipt_timeout_s. The default 60 s would make this test a minute longer; 10 s runs the same path.
    for rig in two_rigs:
        rig.device("dev-1", 5500, receipt_timeout_s=10).start()
        rig.device("dev-2", 2000, fps_cap=100, receipt_timeout_s=10).start()
        rig.device("dev-3", 2000, fps_cap=100, receipt_timeout_s=10).start()
    published = dashboard_down(two_rigs, after=100, down_s=60)
    assert published >= 5000, f"only {published} results were published while the dashboard was down"
    _finish(two_rigs, "dashboard stopped, restarted 60 s later, 3 devices")


def test_dashboard_sigkilled_while_committing(two_rigs: list[Rig]) -> None:
    for rig in two_rigs:
        rig.device("dev-1", 3000, fps_cap=300).start()
    dashboard_sigkill_while_committing(two_rigs, after=800)
    _finish(two_rigs, "dashboard SIGKILLed while committing")


def test_device_sigkilled_mid_run_and_restarted(two_rigs: list[Rig]) -> None:
    # The restarted run plays its looped source again (a looped run keeps no ledger), under new seqs: every seq
    # the two runs committed must be stored once.
    for rig in two_rigs:
        rig.device("dev-1", 3000, fps_cap=400).start()
    device_sigkill(two_rigs, after=800)
    _finish(two_rigs, "device SIGKILLed mid-run, restarted")


def test_three_devices_through_a_broker_sigkill_one_of_them_batching(two_rigs: list[Rig]) -> None:
    # dev-3 sends edgemed.batch/1 messages of up to 100 results (publish.batch, as the ultrasound cine example
    # does): one dropped message then holds many results, each receipted and sent again on its own seq.
    for rig in two_rigs:
        for n in (1, 2, 3):
            rig.device(f"dev-{n}", 2000, fps_cap=150, batch=n == 3).start()
    for rig in two_rigs:
        rig.save_after_connect()
    broker_sigkill(two_rigs, after=400)
    _finish(two_rigs, "broker SIGKILLed mid-run, 3 devices")
