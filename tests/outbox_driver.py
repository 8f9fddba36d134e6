"""A stand-in device for fault tests: produces numbered results into an Outbox and delivers them.

Usage: python tests/outbox_driver.py DATA_DIR BROKER_URL COUNT [RATE_PER_S]

Each result is ``{"result_id": <uuid hex>, "seq": n}`` on ``edgemed/test/driver/results``. ``seq`` comes from the
outbox's persisted counter, so a restarted driver continues where the committed results stopped, and produces
until ``seq`` reaches COUNT. Exits 0 when everything was acknowledged, 10 when results are still pending.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from pathlib import Path

from edgemed.lock import DataDirLock
from edgemed.outbox import OUTBOX_FILENAME, Outbox, OutboxConfig
from edgemed.publish.config import MqttConfig
from edgemed.publish.delivery import Delivery
from edgemed.publish.mqtt import MqttLink

TOPIC = "edgemed/test/driver/results"


def main(argv: list[str]) -> int:
    data_dir, url, count = Path(argv[0]), argv[1], int(argv[2])
    rate = float(argv[3]) if len(argv) > 3 else 0.0
    logging.basicConfig(level=logging.WARNING, format="driver: %(message)s")
    with DataDirLock(data_dir):
        outbox = Outbox(data_dir / OUTBOX_FILENAME, OutboxConfig(commit_every=50, commit_interval_s=0.05))
        link = MqttLink(
            MqttConfig(url=url, reconnect_min_s=0.1, reconnect_max_s=0.5),
            status_topic="edgemed/test/driver/status",
            client_id="edgemed-driver",
        )
        delivery = Delivery(outbox, link)
        link.start()
        delivery.start()
        start = time.monotonic()
        produced = 0
        while True:
            seq = outbox.next_seq()
            if seq >= count:
                break
            rid = uuid.uuid4().hex
            outbox.put(rid, TOPIC, json.dumps({"result_id": rid, "seq": seq}).encode(), seq=seq)
            produced += 1
            if rate:
                ahead = produced / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
        remaining = delivery.drain(60)
        delivery.stop()
        link.stop(5)
        outbox.close()
    print(f"produced {produced} remaining {remaining}", flush=True)
    return 0 if remaining == 0 else 10


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
