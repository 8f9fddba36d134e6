"""Out-of-distribution abstention on the device: does this frame look like the images the model was trained on?

The statistics and thresholds come from the manifest (``edgemed.manifest.OodSpec``, fitted by ``edgemed convert``
on the training split and thresholded on the validation split); the profile's ``ood:`` section
(:class:`OodSetting`) picks the method, overrides the threshold, or turns the check off.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgemed.validation import FrozenModel

OOD_REASON = (
    "this image does not look like the images the model was trained on: check the probe, body part and preset, or refer"
)
"""What a nurse reads for a flagged frame."""


class OodSetting(FrozenModel):
    """The profile's ``ood:`` section."""

    method: Literal["auto", "energy", "features", "none"] = Field(
        "auto",
        description="auto: the method the manifest names as default; energy or features: that score (the model "
        "must have it); none: no check (every result records that it was off)",
    )
    threshold: float | None = Field(
        None, description="override the manifest's threshold for the chosen method (recorded on every result)"
    )
