"""The triage policy: examples a nurse would recognise, and properties checked with hypothesis."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edgemed.errors import ConfigError
from edgemed.study import StudyAggregator
from edgemed.triage import (
    SEVERITY,
    ClassRule,
    StudyPolicy,
    TriagePolicy,
    triage,
    triage_error,
    triage_recapture,
    validate_policy,
)
from edgemed.types import Prediction, QualityReport, TriageResult

ROOT = Path(__file__).resolve().parent.parent
LEVELS = {"urgent", "routine", "no_finding", "inconclusive", "recapture", "error"}
SKIN = ("nevus", "melanoma", "keratosis")
SKIN_POLICY = TriagePolicy(
    rules={
        "melanoma": ClassRule(level="urgent", min_probability=0.3),
        "nevus": ClassRule(level="no_finding", min_probability=0.8),
        "keratosis": ClassRule(level="routine"),
    },
    min_confidence=0.6,
    min_margin=0.15,
)


def pred(*probs: float, labels: tuple[str, ...] = SKIN) -> Prediction:
    return Prediction(labels, tuple(probs))


# --- examples -----------------------------------------------------------------------------------------------


def test_confident_benign_is_no_finding() -> None:
    result = triage(pred(0.9, 0.05, 0.05), SKIN_POLICY)
    assert result.level == "no_finding" and "nevus (0.90)" in result.reason


def test_urgent_class_above_its_threshold_wins_even_when_not_top() -> None:
    result = triage(pred(0.62, 0.33, 0.05), SKIN_POLICY)
    assert result.level == "urgent"
    assert "melanoma 0.33" in result.reason and "refer now" in result.reason
    assert result.extra["basis"] == "urgent_threshold"


def test_escalation_can_be_switched_off() -> None:
    policy = SKIN_POLICY.model_copy(update={"escalate_urgent": False})
    assert triage(pred(0.62, 0.33, 0.05), policy).level == "inconclusive"  # nevus 0.62 < its 0.80


def test_low_top_probability_is_inconclusive_with_the_numbers() -> None:
    result = triage(pred(0.52, 0.0, 0.48), SKIN_POLICY)
    assert result.level == "inconclusive"
    assert result.reason == "top probability 0.52 (nevus) < 0.60: recapture or refer"


def test_small_margin_is_inconclusive() -> None:
    tight = triage(Prediction(("a", "b"), (0.55, 0.45)), TriagePolicy(min_confidence=0.5, min_margin=0.2))
    assert tight.level == "inconclusive"
    assert tight.reason == "a 0.55 is too close to the next class (0.45; margin 0.10 < 0.20): recapture or refer"


def test_confident_routine_class_is_referred() -> None:
    result = triage(pred(0.3, 0.0, 0.7), SKIN_POLICY)
    assert result == TriageResult(
        "routine", "keratosis (0.70): refer for review", {"label": "keratosis", "basis": "top_class"}
    )


def test_top_class_below_its_own_threshold_is_inconclusive() -> None:
    result = triage(pred(0.75, 0.1, 0.15), SKIN_POLICY)
    assert result.level == "inconclusive"
    assert "nevus 0.75 < 0.80 needed for no finding" in result.reason


def test_unconfigured_label_is_routine_so_an_unconfigured_device_never_says_no_finding() -> None:
    result = triage(Prediction(("benign", "malignant"), (0.97, 0.03)), TriagePolicy())
    assert result.level == "routine"
    # Worded for the nurse: what is missing, and what to do.
    assert result.reason == "benign (0.97): no triage rule for this finding in the device profile: refer for review"


def test_a_reason_never_prints_a_comparison_that_reads_false() -> None:
    policy = TriagePolicy(
        rules={"a": ClassRule(level="no_finding", min_probability=0.8)}, min_confidence=0.6, min_margin=0.1
    )
    two = ("a", "b")
    below_rule = triage(Prediction(two, (0.7996, 0.2004)), policy)
    assert below_rule.reason == "a 0.7996 < 0.8000 needed for no finding: recapture or refer"
    below_confidence = triage(Prediction(("a", "b", "c"), (0.5999, 0.2, 0.2001)), policy)
    assert below_confidence.reason == "top probability 0.5999 (a) < 0.6000: recapture or refer"
    tight = triage(Prediction(("b", "a"), (0.5496, 0.4504)), TriagePolicy(min_confidence=0.5, min_margin=0.1))
    assert tight.reason == (
        "b 0.5496 is too close to the next class (0.4504; margin 0.099 < 0.100): recapture or refer"
    )
    # Two decimals stay the rule when they already show the comparison.
    assert triage(Prediction(two, (0.75, 0.25)), policy).reason == (
        "a 0.75 < 0.80 needed for no finding: recapture or refer"
    )


def test_rule_reason_replaces_the_generated_one() -> None:
    policy = TriagePolicy(
        rules={
            "malignant": ClassRule(
                level="urgent", min_probability=0.4, reason="suspicious lesion: call the dermatologist today"
            )
        }
    )
    result = triage(Prediction(("benign", "malignant"), (0.5, 0.5)), policy)
    assert result == TriageResult(
        "urgent",
        "suspicious lesion: call the dermatologist today",
        {"label": "malignant", "basis": "urgent_threshold"},
    )


def test_invalid_probabilities_give_an_error_result() -> None:
    assert triage(pred(float("nan"), 0.5, 0.5), SKIN_POLICY).level == "error"
    assert triage(Prediction(SKIN, (0.5, 0.5)), SKIN_POLICY).level == "error"


def test_recapture_and_error_results() -> None:
    report = QualityReport(
        passed=False,
        blur=3.0,
        brightness=0.4,
        clipped_fraction=0.0,
        reason="image too blurred (sharpness 3.0 < 40.0)",
    )
    result = triage_recapture(report)
    assert result.level == "recapture"
    assert result.reason == "image too blurred (sharpness 3.0 < 40.0): recapture the image"
    assert triage_recapture(QualityReport(False, 0, 0, 0)).reason.startswith("the image quality check failed")
    assert triage_error("cannot decode JPEG 2000: install pillow").level == "error"
    assert triage_error("  ").reason == "the input could not be processed"


def test_validate_policy_names_the_unknown_label_and_the_valid_ones() -> None:
    validate_policy(SKIN_POLICY, list(SKIN))
    with pytest.raises(ConfigError, match=r"'melanoma'.*use one of its labels: benign, malignant") as info:
        validate_policy(SKIN_POLICY, ["benign", "malignant"])
    assert info.value.exit_code == 2
    assert "--labels" in str(info.value)  # the other fix: name the model's classes as the profile does


def test_policy_rejects_unknown_keys_bad_thresholds_and_blank_reasons() -> None:
    with pytest.raises(ValidationError, match="extra"):
        TriagePolicy.model_validate({"min_confidance": 0.5})
    with pytest.raises(ValidationError):
        TriagePolicy.model_validate({"min_confidence": 1.5})
    with pytest.raises(ValidationError):
        TriagePolicy.model_validate({"rules": {"x": {"level": "emergency"}}})
    with pytest.raises(ValidationError, match=r"rules.x.reason is blank"):
        TriagePolicy.model_validate({"rules": {"x": {"level": "routine", "reason": " "}}})
    for model in (TriagePolicy, ClassRule, StudyPolicy):
        assert all(f.description for f in model.model_fields.values()), model


def test_the_yaml_example_in_the_docs_is_a_valid_policy() -> None:
    text = (ROOT / "docs" / "triage.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block is not None
    policy = TriagePolicy.model_validate(yaml.safe_load(block.group(1))["triage"])
    validate_policy(policy, ["benign", "malignant"])
    assert triage(Prediction(("benign", "malignant"), (0.6, 0.4)), policy).level == "urgent"


# --- study aggregation -------------------------------------------------------------------------------------


def _feed(agg: StudyAggregator, results: list[TriageResult]) -> TriageResult:
    for r in results:
        agg.add(r, Prediction(("a", "b"), (0.5, 0.5)) if r.level in SEVERITY else None)
    return agg.decision()


def R(level: str) -> TriageResult:
    return TriageResult(level, f"{level} reason")  # type: ignore[arg-type]


def test_study_worst_case_refers_a_cine_with_one_urgent_frame() -> None:
    agg = StudyAggregator(TriagePolicy())
    decision = _feed(agg, [R("no_finding")] * 28 + [R("urgent"), R("recapture")])
    assert decision.level == "urgent" and "29 usable frames" in decision.reason
    assert decision.extra["frames"] == 30 and decision.extra["valid_frames"] == 29


def test_study_worst_case_can_require_several_frames_per_level() -> None:
    agg = StudyAggregator(TriagePolicy(study=StudyPolicy(min_frames_per_level=3)))
    assert _feed(agg, [R("no_finding")] * 10 + [R("urgent")] * 2).level == "no_finding"
    agg.reset()
    assert _feed(agg, [R("routine"), R("no_finding"), R("urgent")]).level == "inconclusive"


def test_study_majority_with_urgent_override() -> None:
    majority = TriagePolicy(study=StudyPolicy(rule="majority"))
    assert _feed(StudyAggregator(majority), [R("no_finding")] * 5 + [R("routine")] * 3).level == "no_finding"
    assert _feed(StudyAggregator(majority), [R("no_finding")] * 5 + [R("urgent")]).level == "urgent"
    no_override = TriagePolicy(study=StudyPolicy(rule="majority", urgent_overrides=False))
    assert _feed(StudyAggregator(no_override), [R("no_finding")] * 5 + [R("urgent")]).level == "no_finding"
    # ties go to the more severe level
    assert _feed(StudyAggregator(no_override), [R("no_finding")] * 3 + [R("routine")] * 3).level == "routine"


def test_study_mean_probability_triages_the_average() -> None:
    policy = TriagePolicy(
        rules={
            "benign": ClassRule(level="no_finding", min_probability=0.7),
            "malignant": ClassRule(level="urgent", min_probability=0.9),
        },
        study=StudyPolicy(rule="mean_probability", urgent_overrides=False),
    )
    agg = StudyAggregator(policy)
    for probs in [(0.95, 0.05), (0.85, 0.15), (0.75, 0.25)]:
        p = Prediction(("benign", "malignant"), probs)
        agg.add(triage(p, policy), p)
    decision = agg.decision()
    assert decision.level == "no_finding" and decision.reason.startswith("average of 3 frames: benign (0.85)")


def test_study_with_too_few_usable_frames_asks_for_a_new_recording() -> None:
    agg = StudyAggregator(TriagePolicy())
    blurred = TriageResult("recapture", "image too blurred (sharpness 3.0 < 40.0): recapture the image")
    for _ in range(8):
        agg.add(blurred, None)
    agg.add(R("no_finding"), Prediction(("a", "b"), (0.9, 0.1)))
    decision = agg.decision()
    assert decision.level == "recapture"
    assert decision.reason == (
        "only 1 of 9 frames were usable, 3 are needed (most often: image too blurred "
        "(sharpness 3.0 < 40.0)): record the study again"
    )


def test_study_without_readable_frames_is_an_error() -> None:
    assert StudyAggregator(TriagePolicy()).decision().level == "error"
    assert _feed(StudyAggregator(TriagePolicy()), [R("error")] * 4).level == "error"


# --- properties --------------------------------------------------------------------------------------------

probabilities = (
    st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=2, max_size=5)
    .filter(lambda ps: sum(ps) > 1e-3)
    .map(lambda ps: tuple(p / sum(ps) for p in ps))
)
unit = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def policies(draw: st.DrawFn, n: int, urgent: int | None = None) -> TriagePolicy:
    """Random rules over labels c0..c{n-1}; with ``urgent`` set, that label is the only urgent one."""
    rules = {}
    for i in range(n):
        if draw(st.booleans()) or i == urgent:
            level = (
                "urgent"
                if i == urgent
                else draw(
                    st.sampled_from(
                        ["routine", "no_finding"] if urgent is not None else ["urgent", "routine", "no_finding"]
                    )
                )
            )
            rules[f"c{i}"] = ClassRule(level=level, min_probability=draw(unit))
    return TriagePolicy(
        rules=rules, min_confidence=draw(unit), min_margin=draw(unit), escalate_urgent=draw(st.booleans())
    )


def labels(n: int) -> tuple[str, ...]:
    return tuple(f"c{i}" for i in range(n))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_probabilities_give_exactly_one_level_with_a_reason(data: st.DataObject) -> None:
    probs = data.draw(probabilities)
    policy = data.draw(policies(len(probs)))
    result = triage(Prediction(labels(len(probs)), probs), policy)
    assert result.level in SEVERITY  # a prediction never yields recapture or error
    assert result.reason.strip() and result.reason == result.reason.strip()
    assert triage(Prediction(labels(len(probs)), probs), policy) == result  # deterministic


_BELOW = re.compile(r"(\d+\.\d+) < (\d+\.\d+)")


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_every_printed_comparison_is_true(data: st.DataObject) -> None:
    probs = data.draw(probabilities)
    policy = data.draw(policies(len(probs)))
    reason = triage(Prediction(labels(len(probs)), probs), policy).reason
    for shown, needed in _BELOW.findall(reason):
        assert float(shown) < float(needed), reason


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_raising_an_urgent_probability_never_lowers_severity(data: st.DataObject) -> None:
    probs = data.draw(probabilities)
    n = len(probs)
    u = data.draw(st.integers(0, n - 1))
    policy = data.draw(policies(n, urgent=u))
    new_pu = data.draw(st.floats(probs[u] + 1e-6, 1.0)) if probs[u] + 1e-6 < 1.0 else None
    assume(new_pu is not None and probs[u] < 1.0)
    assert new_pu is not None
    # the other classes give up probability in proportion, as a softmax does when one logit rises
    scale = (1.0 - new_pu) / (1.0 - probs[u])
    raised = tuple(new_pu if i == u else p * scale for i, p in enumerate(probs))
    before = triage(Prediction(labels(n), probs), policy)
    after = triage(Prediction(labels(n), raised), policy)
    assert SEVERITY[after.level] >= SEVERITY[before.level], (probs, raised, before, after)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_inconclusive_exactly_when_confidence_or_margin_or_class_threshold_is_short(
    data: st.DataObject,
) -> None:
    probs = data.draw(probabilities)
    policy = data.draw(policies(len(probs)))
    p = Prediction(labels(len(probs)), probs)
    escalates = policy.escalate_urgent and any(
        (rule := policy.rules.get(lab)) is not None and rule.level == "urgent" and q >= rule.min_probability
        for lab, q in zip(p.labels, p.probabilities, strict=True)
    )
    runner_up = sorted(probs)[-2]
    top_rule = policy.rules.get(p.label)
    short = (
        p.confidence < policy.min_confidence
        or p.confidence - runner_up < policy.min_margin
        or (top_rule is not None and p.confidence < top_rule.min_probability)
    )
    level = triage(p, policy).level
    assert (level == "inconclusive") == (short and not escalates)
    if escalates:
        assert level == "urgent"


@settings(max_examples=200, deadline=None)
@given(probabilities, unit, unit)
def test_a_policy_without_urgent_rules_never_says_urgent_and_without_rules_never_no_finding(
    probs: tuple[float, ...], min_confidence: float, min_margin: float
) -> None:
    policy = TriagePolicy(min_confidence=min_confidence, min_margin=min_margin)
    level = triage(Prediction(labels(len(probs)), probs), policy).level
    assert level in ("routine", "inconclusive")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(sorted(LEVELS)), min_size=0, max_size=40), st.integers(1, 4), st.integers(1, 4))
def test_worst_case_study_is_at_least_as_severe_as_every_well_supported_frame_level(
    levels: list[str], min_valid: int, per_level: int
) -> None:
    policy = TriagePolicy(study=StudyPolicy(min_valid_frames=min_valid, min_frames_per_level=per_level))
    agg = StudyAggregator(policy)
    decision = _feed(agg, [R(lv) for lv in levels])
    assert decision.level in LEVELS and decision.reason
    valid = [lv for lv in levels if lv in SEVERITY]
    if len(valid) >= min_valid:
        assert decision.level in SEVERITY
        for lv in set(valid):
            if valid.count(lv) >= per_level:
                assert SEVERITY[decision.level] >= SEVERITY[lv]
        # one more urgent frame never makes the study less severe
        before = decision.level
        agg.add(R("urgent"), Prediction(("a", "b"), (0.5, 0.5)))
        assert SEVERITY[agg.decision().level] >= SEVERITY[before]
    else:
        assert decision.level in ("recapture", "error")
