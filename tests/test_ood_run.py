"""`edgemed run` over a folder mixing breast ultrasound with other modalities: the OOD check flags the others.

A real run (child process, the command line a user types) of the real int8 BreastMNIST model (the ``int8_model``
fixture, converted with the default ``--ood auto``) over real images: BreastMNIST test images (PNG), the
PneumoniaMNIST chest X-ray sample and the full-size ISIC dermoscopy photographs from ``data/``, interleaved in one
folder. The results are read from the device's local copy (``results.jsonl``); no broker is needed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import jsonschema
import numpy as np
import pytest
from helpers import run_edgemed

from edgemed.envelope import result_schema
from edgemed.manifest import verify_model
from edgemed.triage import OOD_REASON

N_BREAST = 40
#: At most this share of in-distribution frames may be flagged. The converter sets the threshold so that 3% of the
#: validation split is flagged (the manifest records the fraction; asserted below); the test split of a model
#: trained for 3 epochs may differ from its validation split, and 40 frames are few: 20% leaves room for both
#: while still failing a check that flags ultrasound wholesale.
ID_FLAGGED_MAX = 0.20


@pytest.fixture
def mixed_folder(tmp_path: Path, data_dir: Path) -> tuple[Path, list[str]]:
    """A folder of ultrasound, chest X-ray and dermoscopy files in a shuffled order; also each index's kind."""
    breast = np.load(data_dir / "breastmnist_28.npz")["test_images"][:N_BREAST]
    xray = np.load(data_dir / "pneumoniamnist_28_sample.npz")["test_images"]
    skin = sorted((data_dir / "isic_samples").glob("*.jpg"))
    items: list[tuple[str, Any]] = [("breast", img) for img in breast]
    items += [("xray", img) for img in xray] + [("skin", path) for path in skin]
    order = np.random.default_rng(14).permutation(len(items))
    folder = tmp_path / "mixed"
    folder.mkdir()
    kinds = []
    for position, i in enumerate(order):
        kind, item = items[i]
        # Numbered names: the folder's natural order is the index each result carries.
        if kind == "skin":
            shutil.copy(item, folder / f"{position:03d}.jpg")
        else:
            assert cv2.imwrite(str(folder / f"{position:03d}.png"), item)
        kinds.append(kind)
    return folder, kinds


def test_other_modalities_are_flagged_inconclusive_and_ultrasound_mostly_not(
    int8_model: Path, mixed_folder: tuple[Path, list[str]], tmp_path: Path
) -> None:
    folder, kinds = mixed_folder
    manifest, artifact = verify_model(int8_model)
    assert artifact.ood is not None and artifact.ood.default == "features"  # the reference CNN has taps
    shipped = artifact.ood.features
    assert shipped is not None and shipped.flagged_fraction <= 0.05  # ~3% of validation, by construction
    device = tmp_path / "device"

    proc = run_edgemed(
        "run", "--model", str(int8_model), "--source", str(folder), "--device-id", "d1",
        "--data-dir", str(device), "--quiet",
    )  # fmt: skip
    assert proc.returncode == 10, proc.stderr  # offline: every result kept in the outbox and the local copy
    assert "Traceback" not in proc.stderr
    results = [json.loads(line) for line in (device / "results.jsonl").read_text().splitlines()]
    assert sorted(r["source"]["index"] for r in results) == list(range(len(kinds)))

    flagged = {"breast": 0, "xray": 0, "skin": 0}
    classified = {"breast": 0, "xray": 0, "skin": 0}
    for r in results:
        jsonschema.validate(r, result_schema())
        kind = kinds[r["source"]["index"]]
        if r["prediction"] is None:  # refused by the quality gate: not classified, so no OOD check either
            assert r["triage"]["level"] in ("recapture", "error") and "ood" not in r
            continue
        classified[kind] += 1
        ood = r["ood"]
        assert ood["method"] == "features" and ood["source"] == "manifest"
        assert ood["threshold"] == pytest.approx(shipped.threshold, abs=1e-6)
        assert ood["flagged"] == (ood["score"] > ood["threshold"])
        if ood["flagged"]:
            flagged[kind] += 1
            # Abstained, with the reason a nurse can act on, and the model's reading still recorded for audit.
            assert r["triage"]["level"] == "inconclusive" and r["triage"]["basis"] == "ood"
            assert OOD_REASON in r["triage"]["reason"]
            assert set(r["prediction"]["probabilities"]) == set(manifest.labels)
        else:
            assert r["triage"].get("basis") != "ood"

    # Every chest X-ray and dermoscopy photograph reached the model (none is blank or blurred) and was flagged.
    for kind in ("xray", "skin"):
        assert classified[kind] == kinds.count(kind), f"{kind}: the quality gate refused some"
        assert flagged[kind] == classified[kind], f"{kind}: {flagged[kind]} of {classified[kind]} flagged"
    assert classified["breast"] >= N_BREAST * 0.8
    assert flagged["breast"] <= ID_FLAGGED_MAX * classified["breast"], flagged
