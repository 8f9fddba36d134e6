"""The yardstick of bench_ingest.py: a bare paho subscriber that decodes every result and throws it away.

    python benchmarks/_bare_subscriber.py PORT EXPECTED_RESULTS

MQTT 5, QoS 1 on ``edgemed/+/+/batches`` (paho acknowledges each message itself, after the callback), one
``json.loads`` per message (which decodes every result envelope in the batch) and a look at each result's
``result_id``. No checks, no store, no receipts: what one Python process on this machine can take off the broker.
Prints ``ready`` once subscribed, then one JSON line when EXPECTED_RESULTS have arrived: the ``time.monotonic()``
of the last one (the same clock in every process of this machine), the count and its CPU seconds.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import paho.mqtt.client as paho


def main() -> int:
    port, expected = int(sys.argv[1]), int(sys.argv[2])
    done = threading.Event()
    seen = {"results": 0, "last": 0.0}

    def on_message(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        body = json.loads(msg.payload)
        for result in body["results"]:
            _ = result["result_id"]
            seen["results"] += 1
        seen["last"] = time.monotonic()
        if seen["results"] >= expected:
            done.set()

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"bare-{os.getpid()}", protocol=paho.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *a: print("ready", flush=True)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("edgemed/+/+/batches", qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    ok = done.wait(300)
    t = os.times()
    print(json.dumps({"last": seen["last"], "results": seen["results"], "cpu_s": t.user + t.system}), flush=True)
    client.disconnect()
    client.loop_stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
