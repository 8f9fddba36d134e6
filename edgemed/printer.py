"""The nurse's line: one line per result on the device's terminal, read from the typed result.

    #12    malignant (91%)  -> URGENT: malignant 0.91 (urgent at 0.50): refer now

A frame the out-of-distribution check flagged says so before its level, with the score that did it::

    #13    benign (97%)  [unlike the training images: features 9.41 > 2.13]  -> INCONCLUSIVE: this image does ...

A headless device (under systemd) writes the same lines to its journal, so file names, which can carry a
medical record number, appear only where ``privacy.print_source_names`` allows (see :func:`shows_names`).
"""

from __future__ import annotations

from typing import IO

from edgemed.types import FrameResult


def shows_names(setting: str, out: IO[str]) -> bool:
    """Whether the printout may show file names (``privacy.print_source_names``).

    ``auto`` shows them only when ``out`` is a terminal, where a person reads them. Under a service manager
    stdout is not a terminal (systemd's is the journal, which keeps it and may forward it), nor is it when piped
    to a file or a log collector: a file name can carry a medical record number, so none is written there unless
    the profile says ``always``.

    Args:
        setting: ``auto``, ``always`` or ``never``.
        out: the stream the lines go to.

    Returns:
        True when the lines may name the input file.
    """
    if setting != "auto":
        return setting == "always"
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError, OSError):  # a closed or unusual stream: not a terminal
        return False


def result_line(result: FrameResult, *, show_name: bool) -> str:
    """The line for one result: frame number, (file name), top class and its probability, the out-of-distribution
    flag when raised, level and reason."""
    frame, pred, tri, ood = result.frame, result.prediction, result.triage, result.ood
    # Rounded as the envelope rounds it, so the line and the published result never disagree by a percent.
    what = f"{pred.label} ({round(pred.confidence, 6):.0%})" if pred is not None else "-"
    if ood is not None and ood.flagged:
        # The model's label stays on the line (it is recorded), but never without the warning beside it. A score
        # that is not a finite number (a float model's overflow) is flagged and recorded as null.
        score = f"{ood.score:.2f}" if ood.score is not None else "not a finite number"
        above = f" > {ood.threshold:.2f}" if ood.threshold is not None and ood.score is not None else ""
        what += f"  [unlike the training images: {ood.method} {score}{above}]"
    name = f" {frame.name}" if frame.name and show_name else ""
    return f"#{frame.index:<5}{name}  {what}  -> {tri.level.upper()}: {tri.reason}\n"


class Printer:
    """Writes the nurse's line for each result to a stream (stdout by default)."""

    def __init__(self, out: IO[str], *, show_names: bool) -> None:
        """Args:
        out: where the lines go.
        show_names: whether they may name the input file (:func:`shows_names`).
        """
        self.out = out
        self.show_names = show_names

    def print(self, result: FrameResult) -> None:
        """Write one result's line."""
        self.out.write(result_line(result, show_name=self.show_names))
