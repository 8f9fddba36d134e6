"""A month of a 100-device fleet, as the dashboard database would hold it: the data of bench_dashboard_web.py.

What goes in, as the ingest would have written it over 30 days:

* ``devices``: 100 ultrasound devices on 5 sites (20 each). Their retained status names the model (two versions of
  ``breastmnist_28`` with distinct sha256s), edgemed's version, the delegate and the model's validation
  ``reference`` (class mix and mean confidence, as the converter writes it into the manifest); their last heartbeat
  has every field a device sends. 90 are online, 6 said offline, 4 are silent (online, last heard 2 h ago).
* ``results``: ``n`` real ``edgemed.result/1`` envelopes (``edgemed.envelope.build_result``, triaged by
  ``edgemed.triage.triage`` under the demo's policy), each device on its own seq stream, received over the last
  30 days with clinic hours busier than nights, stored as ``edgemed.dashboard.rows.result_row`` makes the row.
  The malignant probability is drawn so that about 3% of all results are urgent and 7% inconclusive. Site
  ``clinic-e`` is a small clinic (a quarter of the others' traffic per device) where 20% are urgent: its class mix
  drifts from the model's reference (population stability index about 0.3), so the drift view flags it.
* ``settled``/``stream_progress``/``stream_seen``: every seq stored, as receipts would have left them.
* ``result_hourly``: one ``GROUP BY`` over the loaded results (what the storing commits add up to).
* ``health_history``: one heartbeat a minute per device for the last 2 days; ``health_hourly``: every hour of the
  30 days that ended (the last 2 days aggregated from those raw rows in SQL, older hours generated).
* ``reviews``: the oldest 4,000 urgent or inconclusive results: 3,000 closed with an outcome, 1,000 acknowledged.

The loading itself (COPY) is ``_dashboard_load.py``. Everything is seeded: the same ``n`` gives the same data.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

SITES = ("clinic-a", "clinic-b", "clinic-c", "clinic-d", "clinic-e")
DRIFTING_SITE = "clinic-e"
DRIFTING_WEIGHT = 0.25  # results per device at the drifting site, against 1 elsewhere
DEVICES_PER_SITE = 20
DAYS = 30
LABELS = ("malignant", "normal_benign")
REVIEWERS = ("dr.amara", "dr.chen", "n.okafor", "dr.silva")
OUTCOMES = ("referred", "seen", "false_alarm", "other")
RAW_HEARTBEAT_DAYS = 2
HOUR_S = 3600
# Clinic hours: relative results per hour of the day (UTC), a quiet night and a busy morning.
_HOUR_WEIGHTS = np.array([1, 1, 1, 1, 1, 2, 4, 8, 12, 14, 14, 12, 10, 12, 13, 12, 10, 7, 5, 3, 2, 2, 1, 1], float)


@dataclass(frozen=True)
class Device:
    """One device of the benchmark fleet."""

    site: str
    device_id: str
    stream: str
    model: dict[str, str]
    state: str  # "online", "offline" or "silent"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


MODELS = (
    {"name": "breastmnist_28", "version": "1.0.0", "sha256": _sha("breastmnist_28 1.0.0"), "target": "int8"},
    {"name": "breastmnist_28", "version": "1.1.0", "sha256": _sha("breastmnist_28 1.1.0"), "target": "int8"},
)


def policy() -> Any:
    """The demo's triage policy (firmware_configs/first-run.yaml): malignant >= 0.4 urgent, benign needs 0.75."""
    from edgemed.triage import ClassRule, TriagePolicy

    return TriagePolicy(
        min_confidence=0.6,
        min_margin=0.1,
        rules={
            "malignant": ClassRule(
                level="urgent",
                min_probability=0.4,
                reason="suspicious for malignancy - refer for biopsy assessment today",
            ),
            "normal_benign": ClassRule(level="no_finding", min_probability=0.75),
        },
    )


def malignant_probability(rng: np.random.Generator, n: int, drifting: bool) -> np.ndarray:
    """Malignant probabilities: >= 0.4 urgent (1.9%, 20% drifting), 0.25-0.4 inconclusive (6.7%, 12%), else
    benign; with the drifting site's share of the traffic (``DRIFTING_WEIGHT``) that is 3% and 7% of all results."""
    urgent, unsure = (0.20, 0.12) if drifting else (0.019, 0.067)
    band = rng.random(n)
    low = 0.25 * rng.random(n) ** 2  # most benign frames are clear-cut
    mid = rng.uniform(0.2501, 0.3999, n)
    high = rng.uniform(0.40, 0.97, n)
    return np.where(band < urgent, high, np.where(band < urgent + unsure, mid, low))


def fleet(seed: int = 13) -> list[Device]:
    """The 100 devices (5 sites x 20): one in five runs model 1.1.0; 6 offline, 4 silent."""
    rng = np.random.default_rng(seed)
    out = []
    for s, site in enumerate(SITES):
        for k in range(DEVICES_PER_SITE):
            number = s * DEVICES_PER_SITE + k
            state = "offline" if number % 17 == 5 else "silent" if number % 25 == 12 else "online"
            out.append(Device(site, f"us-{number + 1:03d}", rng.bytes(8).hex(), MODELS[1 if k % 5 == 4 else 0], state))
    return out


def reference(model: dict[str, str]) -> dict[str, Any]:
    """The model's validation reference (what the converter records): top-1 mix and mean confidence.

    Computed on 2,000 draws of the same non-drifting distribution the sites see, so the steady sites match it.
    """
    rng = np.random.default_rng(int(model["sha256"][:8], 16))
    p = malignant_probability(rng, 2000, drifting=False)
    malignant = float(np.mean(p >= 0.5))
    confidence = float(np.mean(np.maximum(p, 1 - p)))
    return {
        "n": 2000,
        "class_mix": {"malignant": round(malignant, 4), "normal_benign": round(1 - malignant, 4)},
        "mean_confidence": round(confidence, 4),
        "split": "test",
    }


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def status_text(device: Device, now: float) -> str:
    """The device's retained status as ``runtime._status_extra`` and the MQTT link publish it (sorted keys)."""
    body: dict[str, Any] = {
        "state": "offline" if device.state == "offline" else "online",
        "at": _iso(now - 86400 if device.state == "offline" else now - 6 * 86400),
        "device_id": device.device_id,
        "site": device.site,
        "delegate": "cpu",
        "degraded": False,
        "model": device.model["name"],
        "model_version": device.model["version"],
        "model_sha256": device.model["sha256"],
        "reference": reference(device.model),
        "edgemed": "0.1.0",
    }
    if device.state == "offline":
        body.update(reason="stopped", clean=True, pending=0, awaiting_receipt=0)
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def heartbeat(device: Device, at: float, rng: np.random.Generator) -> dict[str, Any]:
    """A heartbeat with every field ``Runtime.health_payload`` sends."""
    busy = float(_HOUR_WEIGHTS[int(at // HOUR_S) % 24] / _HOUR_WEIGHTS.max())
    pending = int(rng.poisson(0.5 + 3 * busy))
    return {
        "schema": "edgemed.health/1",
        "uptime_s": round(at % 86400, 1),
        "frames": int(at // 60) % 100000,
        "errors": int(rng.poisson(0.02)),
        "recaptures": int(rng.poisson(0.3)),
        "fps": round(float(2 + 6 * busy + rng.normal(0, 0.3)), 2),
        "latency_ms": {"p50": round(float(rng.normal(6, 0.4)), 3), "p95": round(float(rng.normal(9 + 3 * busy, 1)), 3)},
        "disk_free_mb": round(float(12000 - (at % 86400) / 40), 1),
        "cpu_temp_c": round(float(48 + 12 * busy + rng.normal(0, 1)), 1),
        "cpu_percent": round(float(20 + 60 * busy + rng.normal(0, 4)), 1),
        "peak_rss_mb": 212.5,
        "device_id": device.device_id,
        "site": device.site,
        "delegate": "cpu",
        "degraded": False,
        "degraded_reason": None,
        "pending": pending,
        "awaiting_receipt": int(rng.poisson(1.0)),
        "oldest_pending_s": round(float(rng.exponential(2.0)), 1) if pending else None,
        "oldest_awaiting_s": round(float(rng.exponential(1.0)), 1),
        "consumer_online": True,
        "outbox_full": False,
        "source_state": "watching",
        "connected": device.state != "offline",
        "source_reconnects": 0,
        "evicted_total": 0,
    }


def last_seen(device: Device, now: float) -> float:
    return {"online": now - 5.0, "offline": now - 86400.0, "silent": now - 2 * 3600.0}[device.state]


def arrival_times(rng: np.random.Generator, n: int, now: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` arrival times over the last ``DAYS`` days (clinic hours weighted), sorted, and each one's device index."""
    days = rng.integers(0, DAYS, n)
    hours = rng.choice(24, n, p=_HOUR_WEIGHTS / _HOUR_WEIGHTS.sum())
    start = (int(now // 86400) - DAYS + 1) * 86400.0
    at = start + days * 86400.0 + hours * 3600.0 + rng.random(n) * 3600.0
    at = np.minimum(at, now - rng.random(n) * 60)  # today's later hours have not happened yet
    order = np.argsort(at, kind="stable")
    weights = np.repeat([DRIFTING_WEIGHT if site == DRIFTING_SITE else 1.0 for site in SITES], DEVICES_PER_SITE)
    return at[order], rng.choice(len(weights), n, p=weights / weights.sum())


Progress = Callable[[str, int, int], None]


def print_progress(stage: str, done: int, total: int, _state: dict[str, float] = {}) -> None:  # noqa: B006
    """``stage done/total (pct) elapsed, ~left`` on stderr, at most twice a second, and always at the end."""
    now = time.monotonic()
    started = _state.setdefault(stage, now)
    if done < total and now - _state.get("last", 0.0) < 0.5:
        return
    _state["last"] = now
    elapsed = now - started
    left = elapsed / done * (total - done) if done else float("nan")
    end = "\n" if done >= total else "\r"
    print(
        f"  {stage}: {done:,}/{total:,} ({100 * done / max(total, 1):.0f}%) {elapsed:.0f} s, ~{left:.0f} s left ",
        end=end,
        file=sys.stderr,
        flush=True,
    )


def context(device: Device) -> Any:
    """The device's ``EnvelopeContext`` (what its runtime builds envelopes from)."""
    from edgemed.envelope import EnvelopeContext

    return EnvelopeContext(
        device_id=device.device_id,
        site=device.site,
        model=device.model,
        preprocess_sha256=_sha("preprocess 28x28 grayscale"),
        backend="ai_edge_litert",
        delegate="cpu",
        degraded=False,
        stream=device.stream,
    )


def urgent_envelope(k: int) -> dict[str, Any]:
    """A new urgent result of the first device (seq far above the loaded ones), as its runtime would build it."""
    from edgemed.envelope import build_result
    from edgemed.triage import triage
    from edgemed.types import Frame, Prediction, QualityReport

    seq = 10_000_000 + k
    pred = Prediction(LABELS, (0.83, 0.17))
    return build_result(
        context(fleet()[0]),
        frame=Frame(index=seq, source_kind="folder"),
        seq=seq,
        created_at=time.time(),
        clock_synced=True,
        session_id=None,
        quality=QualityReport(True, 150.0, 0.5, 0.001),
        prediction=pred,
        triage=triage(pred, policy()),
        latency_ms={"preprocess": 0.4, "inference": 4.4, "total": 5.3},
    )
