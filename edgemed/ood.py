"""Out-of-distribution abstention on the device: does this frame look like the images the model was trained on?

The statistics and thresholds come from the manifest (``edgemed.manifest.OodSpec``, fitted by ``edgemed convert``
on the training split and thresholded on the validation split); the profile's ``ood:`` section
(:class:`OodSetting`) picks the method, overrides the threshold, or turns the check off.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgemed.triage import OOD_REASON as OOD_REASON  # re-exported: the wording lives with the other reasons
from edgemed.validation import FrozenModel


class OodSetting(FrozenModel):
    """Whether a frame looks like the model's training images; one that does not is ``inconclusive``.

    The profile's ``ood:`` section. A method or threshold the model cannot use (it was converted without
    out-of-distribution statistics, or without that method) stops the device at start with the fix.
    """

    method: Literal["auto", "energy", "features", "none"] = Field(
        "auto",
        description="auto: the method the manifest names as default; energy or features: that score (the model "
        "must have it); none: no check (every result records that it was off)",
    )
    threshold: float | None = Field(
        None, description="override the manifest's threshold for the chosen method (recorded on every result)"
    )
