"""The dashboard and the ``ood`` object of a result (issue 14): an envelope with it is filed and stored like any
other (no migration: the payload keeps it), one with a malformed ``ood`` is a dead letter, and the result page
says "unlike the training images" with the score and threshold; a result from an older device shows as before.
The page is served by a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from dashboard_helpers import make_result
from web_helpers import login, make_user, running_web

from edgemed.dashboard.store import DashboardStore
from edgemed.dashboard.validate import classify
from edgemed.envelope import result_schema
from edgemed.triage import OOD_REASON

SITE, DEVICE = "clinic-a", "us-01"
TOPIC = f"edgemed/{SITE}/{DEVICE}/results"


def _flagged(seq: int) -> dict[str, Any]:
    body = make_result(site=SITE, device_id=DEVICE, seq=seq, level="inconclusive", reason=OOD_REASON)
    body["triage"].update({"label": "benign", "basis": "ood", "model_level": "no_finding"})
    body["ood"] = {"method": "features", "score": 9.4123, "threshold": 2.13, "flagged": True, "source": "manifest"}
    body["latency_ms"] = {"preprocess": 0.1, "inference": 0.2, "ood": 0.05, "triage": 0.01, "total": 0.45}
    return body


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    store = DashboardStore(tmp_path_factory.mktemp("web-ood") / "fleet.sqlite3")
    flagged, passed, old = _flagged(1), _flagged(2), make_result(site=SITE, device_id=DEVICE, seq=3, level="urgent")
    passed["triage"] = {"level": "routine", "reason": "benign (0.91): refer for review", "basis": "top_class"}
    passed["ood"] = {"method": "energy", "score": -7.5, "threshold": -3.25, "flagged": False, "source": "profile"}
    bad = _flagged(4)
    bad["ood"]["flagged"] = "yes"
    overflow = _flagged(5)
    overflow["ood"].update({"method": "energy", "score": None})  # a float model's overflow: flagged, score null
    bodies = {"flagged": flagged, "passed": passed, "old": old, "bad": bad, "overflow": overflow}
    for body in (flagged, passed, old, overflow):
        jsonschema.validate(body, result_schema())
    filings = [classify(TOPIC, json.dumps(b).encode()) for b in bodies.values()]
    assert [f.kind for f in filings] == ["results", "results", "results", "dead", "results"]
    assert filings[3].reason == "ood.flagged is not true or false"
    store.file(filings, 1000.0)
    make_user(store, "rob", "reviewer")
    with running_web(store) as base:
        yield {"store": store, "base": base, "ids": {k: b["result_id"] for k, b in bodies.items()}}
    store.close()


def test_a_result_with_ood_is_stored_with_it(site: dict[str, Any]) -> None:
    rob = login(site["base"], "rob")
    page = rob.get(f"/results/{site['ids']['flagged']}")
    assert page.status_code == 200
    # The stored payload keeps the object: the table of what the device published lists it.
    for key in ("ood.method", "ood.score", "ood.threshold", "ood.flagged", "latency_ms.ood", "triage.basis"):
        assert key in page.text


def test_the_result_page_says_unlike_the_training_images_with_score_and_threshold(site: dict[str, Any]) -> None:
    rob = login(site["base"], "rob")
    text = rob.get(f"/results/{site['ids']['flagged']}").text
    assert "<strong>Unlike the training images</strong>: features score 9.41 is above the threshold 2.13" in text
    assert "(set by the conversion)" in text and "was not acted on" in text
    passed = rob.get(f"/results/{site['ids']['passed']}").text
    assert "Like the training images: energy score -7.50, threshold -3.25 (set by the device profile)" in passed
    assert "Unlike the training images" not in passed
    overflow = rob.get(f"/results/{site['ids']['overflow']}").text
    assert "energy score not a finite number is above the threshold 2.13" in overflow


def test_a_result_from_an_older_device_shows_as_before(site: dict[str, Any]) -> None:
    rob = login(site["base"], "rob")
    text = rob.get(f"/results/{site['ids']['old']}").text
    assert "training images" not in text and "ood." not in text


def test_a_malformed_ood_is_a_dead_letter_not_a_result(site: dict[str, Any]) -> None:
    rob = login(site["base"], "rob")
    assert rob.get(f"/results/{site['ids']['bad']}").status_code == 404
