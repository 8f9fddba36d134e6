"""The longest string the dashboard accepts at each place a device can put one (characters, not bytes).

A device, or anyone who can publish on the broker, controls every string of a payload: a 20,000-character triage
reason froze the page for everyone. ``validate.check_strings`` refuses a payload with a string over its limit (it
becomes a dead letter with its raw bytes; nothing is shortened). The limits are generous for what edgemed
devices send (a triage reason is one sentence) and are meant to go into the JSON Schemas in
``edgemed/schemas`` as ``maxLength`` too.
"""

from __future__ import annotations

MAX_TEXT = 1000
"""Any string without a limit of its own."""
MAX_KEY = 128
"""Any object key (a class label in ``prediction.probabilities``, a level in a study's ``counts``)."""

_MODEL_LIMITS = {"model.name": 128, "model.version": 64, "model.sha256": 64, "model.target": 32}
#: Longest string allowed at each path the dashboard reads, per topic kind (characters, not bytes).
FIELD_LIMITS: dict[str, dict[str, int]] = {
    "results": {
        "schema": 32,
        "result_id": 32,
        "device_id": 64,
        "site": 64,
        "created_at": 40,
        "session_id": 64,
        **_MODEL_LIMITS,
        "preprocess_sha256": 64,
        "runtime.backend": 32,
        "runtime.delegate": 16,
        "runtime.edgemed": 32,
        "runtime.backend_version": 64,
        "source.kind": 16,
        "source.name": 255,
        "quality.reason": 500,
        "prediction.label": 128,
        "triage.level": 16,
        "triage.reason": 1000,
        "triage.label": 128,
        "triage.basis": 32,
        "triage.model_level": 16,
        "ood.method": 16,
        "ood.source": 16,
    },
    "studies": {
        "schema": 32,
        "result_id": 32,
        "device_id": 64,
        "site": 64,
        "created_at": 40,
        "session_id": 64,
        **_MODEL_LIMITS,
        "source_kind": 16,
        "triage.level": 16,
        "triage.reason": 1000,
        "triage.label": 128,
        "triage.rule": 32,
    },
    "status": {
        "state": 32,
        "reason": 200,
        "error": 100,
        "at": 40,
        "device_id": 64,
        "site": 64,
        "delegate": 16,
        "model": 128,
        "model_sha256": 64,
        "edgemed": 32,
    },
    "health": {
        "schema": 32,
        "device_id": 64,
        "site": 64,
        "delegate": 16,
        "degraded_reason": 500,
        "source_state": 32,
    },
}
