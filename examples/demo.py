"""The whole edgemed path on one laptop, with real ultrasound images.

1. train the reference CNN on BreastMNIST (real breast ultrasound, 28x28)      edgemed train
2. quantize it to full-integer int8, calibrated on the training images         edgemed convert
3. start an MQTT broker on a free loopback port (embedded amqtt, or --broker)
4. run the device runtime over the held-out test images                        edgemed run
5. print what the broker received: count, on-device accuracy against the labels, triage levels, latency
6. the dashboard's own ingest stores every result in demo-out/dashboard.sqlite3; the last lines print how to
   create the first admin and the one command that opens the dashboard on those results

Run it with ``scripts/demo`` (creates a virtual environment first) or ``python examples/demo.py`` in one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "breastmnist_28.npz"
LABELS = ["malignant", "normal_benign"]
PROFILE = ROOT / "examples" / "breast-ultrasound-triage.yaml"


def sh(args: list[str], env: dict[str, str]) -> int:
    """Run one edgemed command, showing it as the user would type it."""
    print("\n$ edgemed " + " ".join(args), flush=True)
    return subprocess.call([sys.executable, "-m", "edgemed", *args], env=env)


def run_device(args: list[str], env: dict[str, str], show: int = 8) -> int:
    """Run `edgemed run`, showing the first lines the person at the device would read."""
    print("\n$ edgemed " + " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, "-m", "edgemed", *args], env=env, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    print("\n".join(lines[:show]) + (f"\n... ({len(lines) - show} more lines)" if len(lines) > show else ""))
    print("\n".join(x for x in proc.stderr.splitlines() if x.startswith("edgemed")))
    return proc.returncode


def export_test_images(out: Path) -> list[int]:
    """Write the BreastMNIST test split as PNG files (img0.png ...); return the labels in natural file order."""
    sys.path.insert(0, str(ROOT / "examples"))
    from export_images import export_images

    return export_images(DATA, out, "test")


def train_args(model_dir: Path, epochs: int | None = None) -> list[str]:
    """The `edgemed train` arguments of the demo's model (the README's first run uses the same model)."""
    args = ["train", "--data", str(DATA), "--out", str(model_dir), "--labels", ",".join(LABELS), "--seed", "0"]
    return args + (["--epochs", str(epochs)] if epochs else [])


def convert_args(keras_model: Path, model_dir: Path) -> list[str]:
    """The `edgemed convert` arguments that turn the demo's model into ``*_int8.tflite`` with its manifest."""
    return ["convert", str(keras_model), "--calibration", str(DATA), "--out", str(model_dir)]


class Collector:
    """An independent subscriber that keeps every result the broker delivers."""

    def __init__(self, url: str) -> None:
        import paho.mqtt.client as mqtt

        host, port = url.split("://", 1)[1].rsplit(":", 1)
        self.results: dict[str, dict] = {}
        self.copies = 0
        self.health: list[dict] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edgemed-demo-dashboard")
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.subscribe([("edgemed/+/+/results", 1), ("edgemed/+/+/health", 0)])
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: object) -> None:
        payload = json.loads(msg.payload)  # type: ignore[attr-defined]
        with self._lock:
            if msg.topic.endswith("/health"):  # type: ignore[attr-defined]
                self.health.append(payload)
                return
            self.copies += 1
            self.results.setdefault(payload["result_id"], payload)  # drop duplicates by result_id

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Dashboard:
    """The dashboard's own ingest (``edgemed.dashboard.ingest``) storing what the broker delivers into ``db``."""

    def __init__(self, url: str, db: Path) -> None:
        from edgemed.dashboard.ingest import Ingest
        from edgemed.dashboard.store import DashboardStore
        from edgemed.publish.config import MqttConfig

        self.db = db
        self.store = DashboardStore(db)
        self.ingest = Ingest(MqttConfig(url=url, client_id="edgemed-demo-ingest"), self.store)
        self.ingest.start()
        if not self.ingest.wait_subscribed(20):
            raise SystemExit(f"demo: the dashboard's ingest did not subscribe at {url} within 20 s")

    def wait_for(self, result_ids: set[str], timeout_s: float = 20.0) -> int:
        """How many of ``result_ids`` are stored, waiting up to ``timeout_s`` for all of them."""
        deadline = time.monotonic() + timeout_s
        while True:
            newest = self.store.recent_results(limit=min(max(len(result_ids), 1), 1000))
            stored = sum(1 for row in newest if row["result_id"] in result_ids)
            if stored == len(result_ids) or time.monotonic() > deadline:
                return stored
            time.sleep(0.2)

    def close(self) -> None:
        self.ingest.stop()
        self.store.close()


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", help="use this broker (mqtt://HOST:PORT) instead of an embedded one")
    parser.add_argument("--out", type=Path, default=ROOT / "demo-out", help="working folder (default demo-out/)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    args = parser.parse_args()

    out: Path = args.out.resolve()
    env = dict(os.environ, KERAS_HOME=str(out / "keras"), TF_CPP_MIN_LOG_LEVEL="2")
    model_dir, device_dir = out / "model", out / "device"
    if sh(train_args(model_dir, args.epochs), env) != 0:
        return 1
    keras_files = sorted(model_dir.glob("*.keras"))
    if not keras_files:
        print(f"demo: no .keras model in {model_dir}", file=sys.stderr)
        return 1
    if sh(convert_args(keras_files[0], model_dir), env) != 0:
        return 1
    int8 = sorted(model_dir.glob("*_int8.tflite"))[0]
    images = out / "images"
    labels = export_test_images(images)

    from contextlib import ExitStack

    with ExitStack() as stack:
        url = args.broker
        if url is None:
            sys.path.insert(0, str(ROOT / "examples"))
            from broker import EmbeddedBroker

            url = stack.enter_context(EmbeddedBroker()).url
            print(f"\nembedded MQTT broker (amqtt) listening on {url}")
        collector = Collector(url)
        stack.callback(collector.close)
        store = Dashboard(url, out / "dashboard.sqlite3")
        stack.callback(store.close)
        t0 = time.monotonic()
        code = run_device(
            [
                "run",
                "--profile",
                str(PROFILE),
                "--model",
                str(int8),
                "--source",
                str(images),
                "--broker",
                url,
                "--data-dir",
                str(device_dir),
            ]
            # amqtt speaks MQTT 3.1.1 only (a production broker speaks 5)
            + (["--mqtt-protocol", "3.1.1"] if args.broker is None else []),
            env,
        )
        elapsed = time.monotonic() - t0
        deadline = time.monotonic() + 10
        while len(collector.results) < len(labels) and time.monotonic() < deadline:
            time.sleep(0.1)
        results = list(collector.results.values())
        stored = store.wait_for({r["result_id"] for r in results})

    correct = sum(1 for r in results if r["prediction"] and r["prediction"]["index"] == labels[r["source"]["index"]])
    predicted = sum(1 for r in results if r["prediction"])
    levels: dict[str, int] = {}
    for r in results:
        levels[r["triage"]["level"]] = levels.get(r["triage"]["level"], 0) + 1
    malignant = [r for r in results if labels[r["source"]["index"]] == 0]
    flagged = sum(1 for r in malignant if r["triage"]["level"] == "urgent")
    inf = [r["latency_ms"]["inference"] for r in results if r["prediction"]]
    tot = [r["latency_ms"]["total"] for r in results]
    rt = results[0]["runtime"] if results else {}
    print("\n== What the broker received ==")
    print(
        table(
            [
                ("results received", f"{len(results)} unique of {len(labels)} frames ({collector.copies} copies)"),
                (
                    "on-device accuracy",
                    f"{correct}/{predicted} = {correct / max(predicted, 1):.3f} (vs BreastMNIST labels)",
                ),
                ("triage levels", ", ".join(f"{k} {v}" for k, v in sorted(levels.items()))),
                (
                    "malignant -> urgent",
                    f"{flagged}/{len(malignant)} malignant test images triaged urgent (illustrative thresholds)",
                ),
                ("latency inference", f"median {statistics.median(inf):.3f} ms" if inf else "-"),
                ("latency total", f"median {statistics.median(tot):.3f} ms per frame" if tot else "-"),
                ("runtime", f"{rt.get('backend')} on {rt.get('delegate')}, degraded={rt.get('degraded')}"),
                ("heartbeats", f"{len(collector.health)} received"),
                ("edgemed run", f"exit {code} in {elapsed:.1f} s"),
                ("dashboard", f"{stored}/{len(results)} stored in {shown_path(store.db)}"),
                ("artifacts", str(model_dir)),
            ]
        )
    )
    ok = code == 0 and len(results) == len(labels) and stored == len(results)
    print("\ndemo " + ("finished: every frame produced exactly one delivered result" if ok else "FAILED"))
    if ok and out == ROOT / "demo-out":
        print("next: README.md, 'First run against your own broker' (firmware_configs/first-run.yaml runs this model)")
    if ok:
        print(dashboard_lines(store.db))
    return 0 if ok else 1


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it is inside it (scripts/demo runs from the repository)."""
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


def dashboard_lines(db: Path) -> str:
    """How to look at the demo's results in the dashboard: the first admin (once), then the one command."""
    shown, tool = shown_path(db), shown_path(Path(sys.executable).with_name("edgemed"))
    return (
        f"\nthe dashboard: the results are in {shown}. Create its first admin once (asks for a password of 12 or"
        f" more characters):\n  {tool} dashboard users add admin --db {shown} --role admin\n"
        f"then open the dashboard on them and log in as admin at http://127.0.0.1:8080 :\n"
        f"  {tool} dashboard serve --db {shown}"
    )


if __name__ == "__main__":
    sys.exit(main())
