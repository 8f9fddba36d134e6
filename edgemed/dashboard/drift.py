"""Drift at a glance: is what a model sees at a site still like the data it was validated on?

For each site and model, the class mix of the top-1 predictions and their mean confidence over the last
``DEFAULT_DAYS`` days (from ``result_hourly``) are compared with the model's validation reference: the mix and
mean confidence its converter measured on the held-out split with the shipped int8 model, which the device
publishes with its status (``reference``, from the manifest). The comparison is the population stability index

    PSI = sum over classes of (recent_i - reference_i) * ln(recent_i / reference_i)

with each fraction raised to at least ``EPSILON`` (a class never predicted would otherwise make it infinite).
It is flagged above ``PSI_THRESHOLD`` = 0.2, the conventional line between "moderate" (0.1-0.2) and
"significant" shift. A class mix moves for good reasons too (a clinic that sees sicker patients): a flag asks a
person to look, it decides nothing. Fewer than ``MIN_RESULTS`` recent results give no verdict (on a handful of
images the index is mostly noise).

The reference is the device's: it is checked as the manifest checks it (``edgemed.manifest.Reference``) and one
that fails is ignored (the row then says there is no usable reference). Where devices of a site run the same
model with different references (two versions), the newest status's reference is used and the row says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from edgemed.dashboard.fleet_data import Sites, class_mix_rows, device_references
from edgemed.manifest import Reference

if TYPE_CHECKING:
    from edgemed.dashboard.store import DashboardStore

__all__ = ["DEFAULT_DAYS", "EPSILON", "MIN_RESULTS", "PSI_THRESHOLD", "Drift", "drift_report", "psi", "verdict"]

#: PSI above this is flagged (the usual rule of thumb: < 0.1 stable, 0.1-0.2 moderate, > 0.2 significant).
PSI_THRESHOLD = 0.2
#: Smallest fraction a class counts with in the index.
EPSILON = 1e-4
#: Recent results are those of the last this many days.
DEFAULT_DAYS = 7.0
#: Fewer recent results than this (with a prediction) give no verdict.
MIN_RESULTS = 30


def psi(recent: Mapping[str, float], reference: Mapping[str, float], epsilon: float = EPSILON) -> float:
    """The population stability index of ``recent`` against ``reference``.

    Args:
        recent: label -> count or fraction (normalised here).
        reference: label -> count or fraction (normalised here).
        epsilon: smallest fraction a class counts with (a class absent from one side).

    Returns:
        The index (0 for identical mixes; larger the more they differ).

    Raises:
        ValueError: either side is empty, negative or not finite.
    """
    p, q = _fractions(recent, "recent"), _fractions(reference, "reference")
    total = 0.0
    for label in sorted(set(p) | set(q)):
        a, b = max(p.get(label, 0.0), epsilon), max(q.get(label, 0.0), epsilon)
        total += (a - b) * math.log(a / b)
    return total


def _fractions(mix: Mapping[str, float], what: str) -> dict[str, float]:
    if any(not math.isfinite(v) or v < 0 for v in mix.values()):
        raise ValueError(f"the {what} class mix holds a negative or non-finite value")
    total = sum(mix.values())
    if total <= 0:
        raise ValueError(f"the {what} class mix is empty")
    return {label: v / total for label, v in mix.items()}


@dataclass(frozen=True)
class Drift:
    """One site and model: the recent mix against the reference, and the verdict.

    Attributes:
        site: the site.
        model: the model's name.
        n: recent results with a prediction.
        class_mix: label -> fraction of those results.
        mean_confidence: their mean top-class probability (None without results).
        reference: the validation reference used (None: no device of the site published a usable one).
        reference_version: the model version whose reference it is.
        reference_device: the device whose status it came from.
        versions_differ: devices of the site run this model with different references.
        psi: the index (None without a reference or with too few results).
        status: ``drift`` (psi above the threshold), ``ok``, ``too_few`` or ``no_reference``.
        labels: every label of the recent mix and the reference, sorted (the rows of a table of both).
    """

    site: str
    model: str
    n: int
    class_mix: dict[str, float]
    mean_confidence: float | None
    reference: Reference | None = None
    reference_version: str | None = None
    reference_device: str | None = None
    versions_differ: bool = False
    psi: float | None = None
    status: str = "no_reference"
    labels: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        """True when the mix diverged (``psi`` above ``PSI_THRESHOLD``)."""
        return self.status == "drift"

    @property
    def confidence_change(self) -> float | None:
        """Recent mean confidence minus the reference's (None when either is missing)."""
        if self.mean_confidence is None or self.reference is None:
            return None
        return self.mean_confidence - self.reference.mean_confidence

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``/api/drift``)."""
        ref = self.reference
        return {
            "site": self.site,
            "model": self.model,
            "n": self.n,
            "class_mix": self.class_mix,
            "mean_confidence": self.mean_confidence,
            "reference": None if ref is None else ref.model_dump(mode="json"),
            "reference_version": self.reference_version,
            "reference_device": self.reference_device,
            "versions_differ": self.versions_differ,
            "psi": self.psi,
            "threshold": PSI_THRESHOLD,
            "status": self.status,
            "flagged": self.flagged,
            "confidence_change": self.confidence_change,
            "labels": self.labels,
        }


def _checked(raw: Any) -> Reference | None:
    if not isinstance(raw, dict):
        return None
    try:
        return Reference.model_validate(raw)
    except ValidationError:
        return None  # a device's broken reference: the row says "no usable reference"


def _references(store: DashboardStore, sites: Sites) -> dict[tuple[str, str], tuple[Reference, str | None, str, bool]]:
    found: dict[tuple[str, str], tuple[Reference, str | None, str, bool]] = {}
    for row in device_references(store, sites):  # newest status first
        ref, model = _checked(row["reference"]), row["model"]
        if ref is None or model is None:
            continue
        key = (row["site"], model)
        if key not in found:
            found[key] = (ref, row["model_version"], row["device_id"], False)
        elif found[key][0] != ref:
            first = found[key]
            found[key] = (first[0], first[1], first[2], True)
    return found


def verdict(n: int, mix: Mapping[str, float], reference: Reference | None) -> tuple[float | None, str]:
    """The index and status of ``n`` recent results with class mix ``mix`` against ``reference``."""
    if reference is None:
        return None, "no_reference"
    if n < MIN_RESULTS:
        return None, "too_few"
    value = psi(mix, reference.class_mix)
    return value, "drift" if value > PSI_THRESHOLD else "ok"


def drift_report(
    store: DashboardStore, sites: Sites, *, days: float = DEFAULT_DAYS, now: float | None = None
) -> list[Drift]:
    """The drift view: one row per site and model seen in the last ``days`` days or with a reference.

    Args:
        store: the dashboard's store.
        sites: the sites the reader may see (None: every site).
        days: how far back "recent" reaches (whole hours, from ``result_hourly``).
        now: dashboard clock; now when None.

    Returns:
        Rows sorted by site and model; results without a model name or a prediction are not counted.
    """
    t = time.time() if now is None else now
    counts: dict[tuple[str, str], dict[str, float]] = {}
    confidence: dict[tuple[str, str], float] = {}
    for row in class_mix_rows(store, sites, t - days * 86400.0):
        if not row["model"] or not row["label"]:
            continue
        key = (row["site"], row["model"])
        per_label = counts.setdefault(key, {})
        per_label[row["label"]] = per_label.get(row["label"], 0) + row["n"]
        confidence[key] = confidence.get(key, 0.0) + row["confidence_sum"]
    references = _references(store, sites)
    out = []
    for key in sorted(set(counts) | set(references)):
        mix_n = counts.get(key, {})
        n = int(sum(mix_n.values()))
        mix = {label: c / n for label, c in mix_n.items()} if n else {}
        ref, version, device, differ = references.get(key, (None, None, None, False))
        value, status = verdict(n, mix, ref)
        labels = sorted(set(mix) | set(ref.class_mix if ref is not None else ()))
        out.append(
            Drift(
                site=key[0],
                model=key[1],
                n=n,
                class_mix=mix,
                mean_confidence=confidence[key] / n if n else None,
                reference=ref,
                reference_version=version,
                reference_device=device,
                versions_differ=differ,
                psi=value,
                status=status,
                labels=labels,
            )
        )
    return out
