"""The study decision: the frame results of one session (a video, a cine loop, a burst) combined into one.

Pure code beside the per-frame policy (``edgemed.triage``): the same frames and policy always give the same
decision. ``edgemed.sessions`` keeps one aggregator per open study.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any, get_args

from edgemed.triage import ACTION, SEVERITY, StudyPolicy, TriagePolicy, triage
from edgemed.types import Prediction, TriageLevel, TriageResult


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
                f"worst case over {valid} usable frames: {levels[level]} {level.replace('_', ' ')}: {ACTION[level]}"
            )
            return TriageResult(level, reason, extra)
        if st.rule == "majority" or self._with_probs == 0:
            level = max(SEVERITY, key=lambda lv: (levels[lv], SEVERITY[lv]))
            reason = f"{levels[level]} of {valid} usable frames {level.replace('_', ' ')}: {ACTION[level]}"
            return TriageResult(level, reason, extra)
        mean = Prediction(self._labels, tuple(s / self._with_probs for s in self._prob_sums))
        result = triage(mean, self.policy)
        return TriageResult(
            result.level, f"average of {self._with_probs} frames: {result.reason}", {**extra, **result.extra}
        )


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
