"""What the OOD triage tests share: a two-class policy with an urgent class, predictions, and a study fed frames
flagged or not (``tests/test_ood_device.py``, ``tests/test_ood_review.py``)."""

from __future__ import annotations

from edgemed.study import StudyAggregator
from edgemed.triage import StudyPolicy, TriagePolicy, triage, triage_ood
from edgemed.types import Prediction

LABELS = ("benign", "malignant")
POLICY = TriagePolicy.model_validate(
    {"rules": {"malignant": {"level": "urgent", "min_probability": 0.3}, "benign": {"level": "no_finding"}}}
)


def pred(p_malignant: float) -> Prediction:
    """A prediction with this probability of ``malignant``."""
    return Prediction(LABELS, (1.0 - p_malignant, p_malignant))


def study(rule: str = "worst_case", min_valid: int = 3) -> StudyAggregator:
    """A study aggregator over :data:`POLICY` with this rule and number of usable frames."""
    return StudyAggregator(
        TriagePolicy(rules=POLICY.rules, study=StudyPolicy(rule=rule, min_valid_frames=min_valid))  # type: ignore[arg-type]
    )


def add_frame(agg: StudyAggregator, p: float, *, ood: bool) -> None:
    """Add one frame with this probability of ``malignant``, flagged out of distribution or not."""
    prediction = pred(p)
    verdict = triage(prediction, POLICY)
    agg.add(triage_ood(verdict, prediction) if ood else verdict, prediction)
