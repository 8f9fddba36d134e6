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
from collections import Counter
from collections.abc import Mapping
from typing import Any, Literal, get_args

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

_ACTION: dict[str, str] = {
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
            f"use one of its labels: {', '.join(labels)}"
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
        reason = f"{label} ({top:.2f}): {_ACTION[level]}"
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


class StudyAggregator:
    """Combines the frame results of one session into one study decision (see ``StudyPolicy``).

    Frames with level ``recapture`` or ``error``, and frames the out-of-distribution check flagged (basis
    ``ood``, level ``inconclusive``: :func:`triage_ood`), are counted but are not evidence. With fewer than
    ``min_valid_frames`` usable frames the decision is ``recapture`` (or ``error`` when no frame was readable),
    and its reason says when flagged frames were among the unusable ones.
    """

    def __init__(self, policy: TriagePolicy) -> None:
        self.policy = policy
        self.study = policy.study or StudyPolicy()
        self.reset()

    def reset(self) -> None:
        """Forget every frame (start a new session)."""
        self.frames = 0
        self.levels: Counter[str] = Counter()
        self._prob_sums: list[float] = []
        self._labels: tuple[str, ...] = ()
        self._with_probs = 0
        self._quality_reasons: Counter[str] = Counter()
        self.ood_frames = 0  # flagged frames: counted under "inconclusive" in levels, but not evidence
        self.ood_urgent_frames = 0  # ...of which the model's own verdict was urgent (the study reason says so)

    def add(self, result: TriageResult, pred: Prediction | None) -> None:
        """Record one frame's result and, when it was classified, its prediction."""
        self.frames += 1
        self.levels[result.level] += 1
        if result.level == "recapture":
            self._quality_reasons[result.reason] += 1
        if result.level == "inconclusive" and result.extra.get("basis") == "ood":
            # Its probabilities describe an image unlike the training images: not evidence, not averaged.
            self.ood_frames += 1
            self.ood_urgent_frames += result.extra.get("model_level") == "urgent"
            return
        if pred is None or result.level in ("recapture", "error"):
            return
        if not self._labels:
            self._labels = pred.labels
            self._prob_sums = [0.0] * len(pred.labels)
        usable = len(pred.probabilities) == len(self._labels) and all(math.isfinite(p) for p in pred.probabilities)
        if pred.labels == self._labels and usable:
            self._prob_sums = [s + p for s, p in zip(self._prob_sums, pred.probabilities, strict=True)]
            self._with_probs += 1

    def export(self) -> dict[str, Any]:
        """What the frames added so far left behind, as plain JSON values (kept with the ledger of processed
        inputs, so that a resumed run decides over the whole study: ``edgemed.resume``)."""
        return {
            "frames": self.frames,
            "levels": dict(self.levels),
            "labels": list(self._labels),
            "prob_sums": list(self._prob_sums),
            "with_probs": self._with_probs,
            "quality_reasons": dict(self._quality_reasons),
            "ood_frames": self.ood_frames,
            "ood_urgent_frames": self.ood_urgent_frames,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from what :meth:`export` returned: the decision is then the one over both runs' frames.

        A state written before the out-of-distribution check existed has no ``ood_frames``: it restores as 0 (no
        frame was flagged then).

        Raises:
            ValueError: ``state`` is not what :meth:`export` writes (a damaged or foreign ledger row).
        """
        frames, levels, labels = state["frames"], state["levels"], state["labels"]
        sums, with_probs, reasons = state["prob_sums"], state["with_probs"], state["quality_reasons"]
        ood_frames = state.get("ood_frames", 0)
        ood_urgent = state.get("ood_urgent_frames", 0)  # absent in states written before it was counted
        known = set(get_args(TriageLevel))
        if not (
            _count(frames)
            and _count(with_probs)
            and isinstance(levels, dict)
            and all(lv in known and _count(n) for lv, n in levels.items())
            and sum(levels.values()) == frames
            and isinstance(reasons, dict)
            and all(isinstance(r, str) and _count(n) for r, n in reasons.items())
            and isinstance(labels, list)
            and all(isinstance(label, str) for label in labels)
            and isinstance(sums, list)
            and len(sums) == len(labels)
            and all(isinstance(p, float | int) and math.isfinite(p) for p in sums)
            and _count(ood_frames)
            and ood_frames <= levels.get("inconclusive", 0)
            and _count(ood_urgent)
            and ood_urgent <= ood_frames
        ):
            raise ValueError("not a study state this version of edgemed wrote")
        self.reset()
        self.frames = frames
        self.levels = Counter(levels)
        self._labels = tuple(labels)
        self._prob_sums = [float(p) for p in sums]
        self._with_probs = with_probs
        self._quality_reasons = Counter(reasons)
        self.ood_frames = ood_frames
        self.ood_urgent_frames = ood_urgent

    @property
    def valid_frames(self) -> int:
        """Frames that carry a prediction-based level and were not flagged as unlike the training images."""
        return sum(n for level, n in self.levels.items() if level in SEVERITY) - self.ood_frames

    def _evidence(self) -> Counter[str]:
        """The levels of the usable frames (``levels`` without the flagged frames' ``inconclusive``)."""
        evidence = Counter(self.levels)
        evidence["inconclusive"] -= self.ood_frames
        return evidence

    def _unusable_why(self) -> str:
        """Why frames were not usable, for a ``recapture`` decision: flagged frames and the commonest quality
        failure, the more frequent first; empty when neither applies."""
        notes: list[tuple[int, str]] = []
        if self.ood_frames:
            notes.append(
                (
                    self.ood_frames,
                    f"{self.ood_frames} did not look like the images the model was trained on: check the probe, "
                    f"body part and preset{self._urgent_note()}",
                )
            )
        worst = self._quality_reasons.most_common(1)
        if worst:
            notes.append((self.levels["recapture"], f"most often: {worst[0][0].rsplit(': recapture', 1)[0]}"))
        notes.sort(key=lambda note: -note[0])  # stable: flagged frames first on a tie
        return f" ({'; '.join(text for _, text in notes)})" if notes else ""

    def decision(self) -> TriageResult:
        """The study-level result for the frames added so far."""
        result = self._decide()
        # A flagged frame the model read as urgent is not evidence, but a study decision that says only "continue
        # the usual care pathway" would lose what the frame's own reason told the nurse.
        urgent = self._urgent_note()
        if self.ood_frames and result.level not in ("recapture", "error"):
            # The decision stands on the other frames; the nurse learns that some were set aside, and why.
            n = self.ood_frames
            left_out = f"{n} {'frame' if n == 1 else 'frames'} unlike the training images left out"
            reason = f"{result.reason} ({left_out}{urgent})"
            return TriageResult(result.level, reason, result.extra)
        return result

    def _urgent_note(self) -> str:
        n = self.ood_urgent_frames
        return f"; the model read {n} of them as urgent: refer if in doubt" if n else ""

    def _decide(self) -> TriageResult:
        valid, st, levels = self.valid_frames, self.study, self._evidence()
        extra: dict[str, Any] = {
            "frames": self.frames,
            "valid_frames": valid,
            "rule": st.rule,
            "counts": dict(self.levels),
        }
        if self.ood_frames:  # only then: decisions without flagged frames read as before
            extra["ood_frames"] = self.ood_frames
        if self.ood_urgent_frames:
            extra["ood_urgent_frames"] = self.ood_urgent_frames
        if self.frames == 0 or (valid == 0 and levels["error"] == self.frames):
            return TriageResult("error", "no readable frame in this session: check the probe and record again", extra)
        if valid < st.min_valid_frames:
            return TriageResult(
                "recapture",
                f"only {valid} of {self.frames} frames were usable, "
                f"{st.min_valid_frames} are needed{self._unusable_why()}: record the study again",
                extra,
            )
        urgent_n = levels["urgent"]
        if st.rule != "worst_case" and st.urgent_overrides and urgent_n >= st.min_frames_per_level:
            return TriageResult("urgent", f"{urgent_n} of {valid} usable frames are urgent: refer now", extra)
        if st.rule == "worst_case":
            eligible = [lv for lv in SEVERITY if levels[lv] >= st.min_frames_per_level]
            if not eligible:
                return TriageResult(
                    "inconclusive",
                    f"the {valid} usable frames disagree and no level is seen in "
                    f"{st.min_frames_per_level} frames: recapture or refer",
                    extra,
                )
            level = max(eligible, key=SEVERITY.__getitem__)
            reason = (
                f"worst case over {valid} usable frames: {levels[level]} {level.replace('_', ' ')}: {_ACTION[level]}"
            )
            return TriageResult(level, reason, extra)
        if st.rule == "majority" or self._with_probs == 0:
            level = max(SEVERITY, key=lambda lv: (levels[lv], SEVERITY[lv]))
            reason = f"{levels[level]} of {valid} usable frames {level.replace('_', ' ')}: {_ACTION[level]}"
            return TriageResult(level, reason, extra)
        mean = Prediction(self._labels, tuple(s / self._with_probs for s in self._prob_sums))
        result = triage(mean, self.policy)
        return TriageResult(
            result.level, f"average of {self._with_probs} frames: {result.reason}", {**extra, **result.extra}
        )


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
