"""The faults of issue 11, as steps on running rigs (``receipt_faults.Rig``), shared by tests/test_receipt_faults.py
and by this module's command line, which measures the same faults without a consumer (today's PUBACK release).

Each step acts on several rigs at once (one per persistence mode, side by side), so one test covers both modes in
the wall time of one. Every wait is bounded.

    python tests/fault_cases.py baseline MODEL FOLDER     # the faults without a consumer: what they lose
    python tests/fault_cases.py table FIGURES.jsonl       # the Markdown table of recorded figures
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from broker_fixtures import Mosquitto
from fault_counts import DASHBOARD_CLIENT, holds_write_lock
from receipt_faults import Rig, wait_until


def wait_each_stored(rigs: list[Rig], n: int) -> None:
    """Wait until every device of every rig has ``n`` results stored."""
    for rig in rigs:
        for dev in rig.devices:
            rig.wait_stored(n, dev)


def broker_sigkill(
    rigs: list[Rig], *, after: int, down_s: float = 3.0, dashboard_late_s: float = 2.0, hold_s: float = 10.0
) -> None:
    """SIGKILL each broker once every device has ``after`` results stored; restart it ``down_s`` later on the same
    port and persistence file; the devices reconnect first, the dashboard ``dashboard_late_s`` after the last one.

    The dashboard is held back by SIGSTOP from just before the kill until then (its connection dies with the
    broker; on SIGCONT it finds it gone and reconnects with its own back-off), so the devices find the broker
    without it. With persistence on, the broker restored the dashboard's session and its retained ``online``
    state from its last save: the devices take the consumer for online and publish, and the broker queues at most
    ``max_queued_messages`` (1000) for the absent dashboard and drops the rest. There the dashboard is held until
    the broker says it drops (at most ``hold_s`` more), so that the case reaches the hole it is about.
    """
    wait_each_stored(rigs, after)
    connects = {}
    for rig in rigs:
        connects[id(rig)] = [rig.broker.log_count(f"as {d.client_id} ") for d in rig.devices]
        rig.dashboard.signal(signal.SIGSTOP)
        rig.broker.kill()
    time.sleep(down_s)
    for rig in rigs:
        rig.broker.start()
    for rig in rigs:
        for dev, before in zip(rig.devices, connects[id(rig)], strict=True):
            wait_until(
                lambda r=rig, d=dev, b=before: r.broker.log_count(f"as {d.client_id} ") > b,
                30,
                f"{dev.name} to reconnect ({rig.mode})",
            )
    time.sleep(dashboard_late_s)
    deadline = time.monotonic() + hold_s
    while time.monotonic() < deadline and not all(r.broker_dropped() for r in rigs if r.persistence):
        time.sleep(0.1)
    for rig in rigs:
        before = rig.broker.log_count(f"Sending SUBACK to {DASHBOARD_CLIENT}")
        rig.dashboard.signal(signal.SIGCONT)
        rig.dashboard.wait_subscribed(before, 60)


def dashboard_down(rigs: list[Rig], *, after: int, down_s: float) -> int:
    """Stop each dashboard (SIGTERM) once every device has ``after`` results stored; start it ``down_s`` later.

    Returns:
        The fewest results committed by the devices of one rig while its dashboard was down.
    """
    wait_each_stored(rigs, after)
    at_stop = {}
    for rig in rigs:
        rig.dashboard.stop()
        at_stop[id(rig)] = rig.stored()
    time.sleep(down_s)
    produced = []
    for rig in rigs:
        produced.append(sum(d.committed() for d in rig.devices) - at_stop[id(rig)])
        rig.dashboard.start()
    return min(produced)


def dashboard_sigkill_while_committing(rigs: list[Rig], *, after: int, down_s: float = 1.0) -> None:
    """SIGKILL each dashboard at a moment it holds its store's write lock, once every device has ``after`` results
    stored; start it again ``down_s`` later."""
    wait_each_stored(rigs, after)
    for rig in rigs:
        wait_until(lambda r=rig: holds_write_lock(r.dashboard.db), 30, f"the dashboard to commit ({rig.mode})")
        rig.dashboard.kill()
    time.sleep(down_s)
    for rig in rigs:
        rig.dashboard.start()


def device_sigkill(rigs: list[Rig], *, after: int) -> None:
    """SIGKILL every device once it has ``after`` results stored, and start it again on the same data directory."""
    wait_each_stored(rigs, after)
    for rig in rigs:
        for dev in rig.devices:
            dev.kill()
            dev.start()


@contextmanager
def rigs(
    folder: Path, factory: type[Mosquitto], model: Path, images: Path, modes: tuple[bool, ...] = (True, False)
) -> Iterator[list[Rig]]:
    """One rig per persistence mode (on, off), all closed at the end."""
    made = [
        Rig(folder / f"persistence-{'on' if p else 'off'}", factory, persistence=p, model=model, images=images)
        for p in modes
    ]
    try:
        yield made
    finally:
        for rig in made:
            rig.close()


def _baseline(model: Path, folder: Path) -> None:
    """The broker-SIGKILL and dashboard-down faults without a consumer: what today's PUBACK release loses."""
    sys.path.insert(0, str(Path(__file__).parent))
    from dashboard_helpers import export_images

    folder.mkdir(parents=True)
    images = export_images(Path(__file__).resolve().parent.parent / "data", folder / "images", 24)
    for case, run in (("broker SIGKILLed mid-run", _baseline_broker), ("dashboard down 60 s", _baseline_dashboard)):
        with rigs(folder / case.split()[0], Mosquitto, model, images) as made:
            for rig in made:
                rig.start()
            run(made)
            for rig in made:
                rig.finish()
                rig.settle()
                rig.figures(case, consumer=False).record()


def _baseline_broker(made: list[Rig]) -> None:
    for rig in made:
        rig.device("dev-1", 3000, consumer=None, fps_cap=200).start()
    for rig in made:
        rig.save_after_connect()
    broker_sigkill(made, after=600)


def _baseline_dashboard(made: list[Rig]) -> None:
    for rig in made:
        rig.device("dev-1", 5500, consumer=None).start()
    dashboard_down(made, after=300, down_s=60)


def table(rows: list[dict[str, object]]) -> str:
    """The Markdown table of recorded figures (docs/delivery.md and the README)."""
    head = "| case | broker persistence | devices | results | stored | duplicates received | lost | left on disk | "
    head += "broker dropped (queue limit) | time (s) |\n|---|---|---:|---:|---:|---:|---:|---:|---|---:|"
    lines = [head]
    for r in rows:
        mode = "on (autosave 1800 s)" if r["persistence"] else "off"
        case = str(r["case"]) + ("" if r["consumer"] else " (no consumer: today's PUBACK release)")
        if r.get("batching_devices"):
            case += f" ({r['batching_devices']} batching)"
        lines.append(
            f"| {case} | {mode} | {r['devices']} | {r['results']:,} | {r['stored']:,} | {r['duplicates']:,} | "
            f"{r['lost']:,} | {r['left_on_disk']:,} | {'yes' if r['broker_dropped'] else 'no'} | {r['seconds']} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    base = sub.add_parser("baseline", help="run the faults without a consumer and print their figures")
    base.add_argument("model", type=Path, help="an int8 .tflite with its manifest beside it")
    base.add_argument("folder", type=Path, help="a new folder for brokers, stores and data directories")
    tab = sub.add_parser("table", help="print the Markdown table of a figures file")
    tab.add_argument("figures", type=Path)
    args = parser.parse_args(argv)
    if args.command == "table":
        print(table([json.loads(line) for line in args.figures.read_text().splitlines() if line.strip()]))
        return 0
    if args.folder.exists():
        shutil.rmtree(args.folder)
    _baseline(args.model, args.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
