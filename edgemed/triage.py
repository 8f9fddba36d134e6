"""The triage policy: class probabilities in, a clinical decision a nurse can act on out.

Pure code: no I/O, no numpy. The same probabilities and policy always give the same single result.

Levels a prediction can get, from least to most in need of attention (``SEVERITY``)::

    no_finding  <  routine (refer)  <  inconclusive (recapture or refer)  <  urgent (refer now)

``inconclusive`` ranks above ``routine`` on purpose: an uncertain result may hide an urgent finding, a
confident routine one does not. With that order, raising the probability of an urgent class never lowers the
level (the property tests check it). Frames without a prediction get ``recapture`` (quality gate) or ``error``
(unreadable).

How ``triage`` decides, in this order:

1. **Escalation** (``escalate_urgent``, on by default): a class whose rule is ``urgent`` and whose probability
   reaches that rule's ``min_probability`` makes the result ``urgent`` even when it is not the most probable
   class. A missed urgent finding costs more than a false alarm.
2. **Confidence**: the top probability below ``min_confidence``, or its margin over the runner-up below
   ``min_margin`` -> ``inconclusive``.
3. **Top class**: the level of the top class's rule, provided its probability reaches the rule's
   ``min_probability`` (otherwise ``inconclusive``). A label without a rule is ``routine`` ("no triage rule for
   this finding in the device profile: refer for review"): a device whose policy was never configured (``edgemed
   run`` without ``--profile``) refers everything for review and never says ``no_finding``.

A frame the out-of-distribution check flags (``edgemed.ood``) is ``inconclusive`` whatever the model said
(:func:`triage_ood`): its probabilities describe an image unlike any the model learned from. Its prediction is still
recorded for audit, and the study decision counts it like a frame that failed the quality gate.

Reasons print two decimals, more where two would make a comparison read false ("0.7996 < 0.8000", never
"0.80 < 0.80").
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from edgemed.errors import ConfigError
from edgemed.types import Prediction, QualityReport, TriageLevel, TriageResult
from edgemed.validation import FrozenModel

RuleLevel = Literal["urgent", "routine", "no_finding"]

SEVERITY: dict[TriageLevel, int] = {"no_finding": 0, "routine": 1, "inconclusive": 2, "urgent": 3}
"""Rank of the levels a prediction can get; higher needs more attention. ``recapture`` and ``error`` are not
ranked: they mean there is no prediction to rank."""

NO_RULE_REASON = "no triage rule for this finding in the device profile: refer for review"
"""What a nurse reads for a label the profile gives no rule (every label, when the device runs without a profile)."""

OOD_REASON = (
    "this image does not look like the images the model was trained on: check the probe, body part and preset, or refer"
)
"""What a nurse reads for a frame the out-of-distribution check flagged (:func:`triage_ood`)."""

#: What to do next at each level, the end of every reason (the study decision's too: ``edgemed.study``).
ACTION: dict[str, str] = {
    "urgent": "refer now",
    "routine": "refer for review",
    "no_finding": "no finding; continue the usual care pathway",
    "inconclusive": "recapture or refer",
}


class ClassRule(FrozenModel):
    """What a class means clinically when the model picks it."""

    level: RuleLevel = Field(description="urgent (refer now), routine (refer) or no_finding")
    min_probability: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="probability the class needs for its level; for an urgent class this is also the "
        "escalation threshold, so set it low for sensitivity",
    )
    reason: str | None = Field(
        None, description="plain-language reason shown to the nurse instead of the generated one"
    )


class StudyPolicy(FrozenModel):
    """How the frames of one session (video, cine loop, burst) are combined into one decision."""

    rule: Literal["worst_case", "majority", "mean_probability"] = Field(
        "worst_case",
        description="worst_case: the most severe level seen in at least min_frames_per_level usable frames; "
        "majority: the most common level (ties go to the more severe); mean_probability: triage of the "
        "frame-averaged probabilities",
    )
    min_valid_frames: int = Field(
        3, ge=1, description="usable frames (not recapture or error) needed before the study gets a decision"
    )
    min_frames_per_level: int = Field(
        1,
        ge=1,
        description="worst_case: frames a level needs before it can decide the study (filters one-frame flickers)",
    )
    urgent_overrides: bool = Field(
        True,
        description="majority and mean_probability: a study with min_frames_per_level urgent frames is urgent",
    )


class TriagePolicy(FrozenModel):
    """Per-class rules and the confidence a prediction needs before it is acted on."""

    rules: dict[str, ClassRule] = Field(
        default_factory=dict,
        description="rule per label; labels without a rule are routine (refer for review)",
    )
    min_confidence: float = Field(0.6, ge=0.0, le=1.0, description="top probability below this -> inconclusive")
    min_margin: float = Field(
        0.1, ge=0.0, le=1.0, description="top probability minus the runner-up below this -> inconclusive"
    )
    escalate_urgent: bool = Field(
        True,
        description="an urgent class at or above its min_probability wins even when it is not the top class",
    )
    study: StudyPolicy | None = Field(
        None, description="aggregation of the frames of one session; null uses the StudyPolicy defaults"
    )

    @model_validator(mode="after")
    def _reasons_not_blank(self) -> TriagePolicy:
        for label, rule in self.rules.items():
            if rule.reason is not None and not rule.reason.strip():
                raise ValueError(f"rules.{label}.reason is blank; write the instruction for the nurse or remove it")
        return self


def validate_policy(policy: TriagePolicy, labels: list[str]) -> None:
    """Check a policy against the labels of the model it will judge.

    Args:
        policy: the profile's triage policy.
        labels: the model's labels, in manifest order.

    Raises:
        ConfigError: a rule names a label the model does not have (the message lists the valid labels).
    """
    unknown = [label for label in policy.rules if label not in labels]
    if unknown:
        raise ConfigError(
            f"triage.rules names {', '.join(repr(u) for u in unknown)}, which the model does not have; "
            f"use one of its labels: {', '.join(labels)} in the profile, or give the model the profile's names "
            "(`edgemed train` or `edgemed convert` with --labels NAME,NAME,... in label order)"
        )


def _level_of(policy: TriagePolicy, label: str) -> tuple[RuleLevel, ClassRule | None]:
    rule = policy.rules.get(label)
    return (rule.level if rule is not None else "routine"), rule


def _escalation(pred: Prediction, policy: TriagePolicy) -> TriageResult | None:
    hits = [
        (p, label, rule)
        for label, p in zip(pred.labels, pred.probabilities, strict=True)
        if (rule := policy.rules.get(label)) is not None and rule.level == "urgent" and p >= rule.min_probability
    ]
    if not hits:
        return None
    p, label, rule = max(hits, key=lambda hit: hit[0])
    if rule.reason:
        reason = rule.reason
    elif label == pred.label:
        reason = f"{label} {p:.2f} (urgent at {rule.min_probability:.2f}): refer now"
    else:
        reason = (
            f"{label} {p:.2f} reaches its urgent threshold {rule.min_probability:.2f} although "
            f"{pred.label} is more likely ({pred.confidence:.2f}): refer now"
        )
    return TriageResult("urgent", reason, {"label": label, "basis": "urgent_threshold"})


def _shown_below(value: float, threshold: float) -> tuple[str, str]:
    """``value`` and ``threshold`` printed with the fewest decimals (at least 2) that show ``value < threshold``.

    Two decimals alone can print a comparison that reads false ("0.80 < 0.80" for 0.7996 against 0.80); rounding
    is monotonic, so the first precision at which the two texts differ shows the comparison that was made.
    """
    for digits in range(2, 10):
        shown = f"{value:.{digits}f}", f"{threshold:.{digits}f}"
        if shown[0] != shown[1]:
            return shown
    return repr(value), repr(threshold)


def _digits(text: str) -> int:
    return len(text.partition(".")[2]) if "e" not in text else 17


def triage(pred: Prediction, policy: TriagePolicy) -> TriageResult:
    """Turn one frame's class probabilities into a triage level with a reason.

    Args:
        pred: probabilities in the model's label order.
        policy: the profile's policy (checked against the labels at start-up with ``validate_policy``).

    Returns:
        Exactly one ``TriageResult``; level ``error`` when the probabilities are not finite numbers.
    """
    probs = pred.probabilities
    if not probs or len(probs) != len(pred.labels) or not all(math.isfinite(p) for p in probs):
        return triage_error("the model returned invalid probabilities; check the model and its manifest")
    if policy.escalate_urgent and (urgent := _escalation(pred, policy)) is not None:
        return urgent
    top, label = pred.confidence, pred.label
    runner_up = max((p for i, p in enumerate(probs) if i != pred.index), default=0.0)
    if top < policy.min_confidence:
        shown, needed = _shown_below(top, policy.min_confidence)
        return TriageResult(
            "inconclusive",
            f"top probability {shown} ({label}) < {needed}: recapture or refer",
            {"label": label, "basis": "confidence"},
        )
    margin = top - runner_up
    if margin < policy.min_margin:
        shown, needed = _shown_below(margin, policy.min_margin)
        # When the margin needs more than two decimals, the probabilities get one more, so that their shown
        # difference matches the shown margin ("0.5496 ... 0.4504; margin 0.099", not "0.550 ... 0.450").
        d = 2 if _digits(shown) == 2 else _digits(shown) + 1
        return TriageResult(
            "inconclusive",
            f"{label} {top:.{d}f} is too close to the next class ({runner_up:.{d}f}; margin "
            f"{shown} < {needed}): recapture or refer",
            {"label": label, "basis": "margin"},
        )
    level, rule = _level_of(policy, label)
    if rule is not None and top < rule.min_probability:
        shown, needed = _shown_below(top, rule.min_probability)
        return TriageResult(
            "inconclusive",
            f"{label} {shown} < {needed} needed for {level.replace('_', ' ')}: recapture or refer",
            {"label": label, "basis": "class_threshold"},
        )
    if rule is not None and rule.reason:
        reason = rule.reason
    elif rule is None:
        reason = f"{label} ({top:.2f}): {NO_RULE_REASON}"
    else:
        reason = f"{label} ({top:.2f}): {ACTION[level]}"
    return TriageResult(level, reason, {"label": label, "basis": "top_class" if rule else "no_rule"})


def triage_ood(verdict: TriageResult, pred: Prediction) -> TriageResult:
    """The result for a classified frame the out-of-distribution check flagged.

    The level is ``inconclusive`` (basis ``ood``) whatever the model's own verdict: its probabilities describe an
    image unlike the ones it learned from, so they are not evidence either way. When that verdict was ``urgent``
    the reason says so, with the label and probability the model gave, because a nurse who sees a suspicious
    lesion on a wrongly set probe should still refer.

    Args:
        verdict: what :func:`triage` made of the prediction.
        pred: the prediction (kept on the result for audit; quoted here only when it was urgent).

    Returns:
        The ``inconclusive`` result, with the model's verdict level kept in ``model_level``; an ``error`` verdict
        (probabilities that are not finite numbers, which also make the score non-finite and flagged) unchanged:
        its fix is the model, not the probe.
    """
    if verdict.level == "error":
        return verdict
    # An escalated verdict names the urgent class, which need not be the most probable one.
    label = verdict.extra.get("label", pred.label)
    reason = OOD_REASON
    if verdict.level == "urgent":
        p = pred.probabilities[pred.labels.index(label)] if label in pred.labels else pred.confidence
        reason = f"{OOD_REASON}; the model read it as urgent ({label} {p:.2f}): refer if in doubt"
    return TriageResult("inconclusive", reason, {"label": label, "basis": "ood", "model_level": verdict.level})


def triage_recapture(report: QualityReport) -> TriageResult:
    """The result for a frame that failed the image-quality gate (it was not classified)."""
    why = report.reason or "the image quality check failed"
    return TriageResult("recapture", f"{why}: recapture the image")


def triage_error(message: str) -> TriageResult:
    """The result for an input that could not be read or classified.

    Args:
        message: what went wrong and what to do; must not contain file names or patient identifiers.
    """
    return TriageResult("error", message.strip() or "the input could not be processed")
