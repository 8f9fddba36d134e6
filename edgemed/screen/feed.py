"""The runtime's side of the screen: start it, compute each frame's class activation map, hand each result over.

Kept out of ``edgemed.runtime`` so that the pipeline reads as a pipeline: ``Device`` makes one ``ScreenFeed`` when
the screen is on and calls :meth:`ScreenFeed.class_map` and :meth:`ScreenFeed.show` per frame. A screen (or a map)
that fails mid-run is logged once and switched off; the run and its results go on.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import TYPE_CHECKING

from edgemed.screen.screen import Screen, StatusFn

if TYPE_CHECKING:
    import numpy as np

    from edgemed.cam import CamComputer
    from edgemed.config import DeviceProfile
    from edgemed.inference.classify import Classifier
    from edgemed.types import ClassMap, FrameResult, TriageResult

log = logging.getLogger("edgemed.screen")


class ScreenFeed:
    """The screen and the CAM computer of one run."""

    def __init__(self, screen: Screen, cam: CamComputer | None) -> None:
        """Args:
        screen: the started screen.
        cam: computes the class activation map of each classified frame (None: no per-frame map).
        """
        self.screen: Screen | None = screen
        self.cam = cam

    @classmethod
    def start(
        cls, profile: DeviceProfile, classifier: Classifier, lock: threading.Lock, status: StatusFn
    ) -> ScreenFeed:
        """Build the CAM computer (when the profile wants maps and the model has one) and start the screen.

        Args:
            profile: the device profile (its ``screen:`` and ``privacy:`` sections).
            classifier: the loaded model.
            lock: the lock the runtime holds around each invoke and output read (shared with occlusion maps).
            status: the device's state for the page's status bar.

        Raises:
            ModelError: the model's manifest promises a class activation map its file does not have.
            ConfigError: the screen's port is in use.
        """
        cfg = profile.screen
        cam = None
        if cfg.class_map == "cam":
            # Only a model whose manifest records a CAM gets one (CamComputer.build returns None otherwise).
            if classifier.artifact.cam is not None:
                from edgemed.cam import CamComputer

                cam = CamComputer.build(classifier)
            if cam is None:
                log.info(
                    "screen: this model has no class activation map (it does not end in global average pooling, "
                    "or was converted with --cam none); the page offers an occlusion map on request instead"
                )
        screen = Screen(
            cfg,
            status=status,
            classifier=classifier,
            lock=lock,
            has_cam=cam is not None,
            # The kiosk page is not a terminal only its operator reads: names only where the profile says always.
            show_names=profile.privacy.print_source_names == "always",
        )
        try:
            screen.start()
        except BaseException:
            screen.close()
            raise
        return cls(screen, cam)

    def class_map(self, class_index: int) -> ClassMap | None:
        """The class activation map of the frame just invoked, for ``class_index`` (call before the next invoke).

        Its ``seq`` is a placeholder (-1): the frame's number is handed out after the map (see :meth:`show`).
        Returns None when there is no CAM, or after it failed once (logged once; the run goes on without maps).
        """
        cam = self.cam
        if cam is None or self.screen is None:
            return None
        try:
            return cam.compute(class_index, -1)
        except Exception as exc:  # noqa: BLE001 - the map is for the screen only: the frame's result must not fail
            self.cam = None
            log.error(
                "screen: the class activation map failed (%s: %s); the screen goes on without maps",
                type(exc).__name__,
                exc,
            )
            return None

    def show(
        self,
        result: FrameResult,
        image: np.ndarray | None,
        study: TriageResult | None,
        class_map: ClassMap | None,
    ) -> None:
        """Hand a result to the screen (references only); a failing screen is logged once and closed."""
        screen = self.screen
        if screen is None:
            return
        if class_map is not None and class_map.seq != result.seq:
            class_map = dataclasses.replace(class_map, seq=result.seq)
        try:
            screen.show(result, image, study, class_map)
        except Exception as exc:  # noqa: BLE001 - a broken screen must not stop the run (its results still count)
            self.screen = None
            log.error("screen: stopped (%s: %s); the run goes on without it", type(exc).__name__, exc)
            self._close(screen)

    @property
    def url(self) -> str | None:
        """The page's address while the screen runs."""
        return self.screen.url if self.screen is not None else None

    def close(self) -> None:
        """Stop the screen (safe to call twice)."""
        screen, self.screen = self.screen, None
        if screen is not None:
            self._close(screen)

    @staticmethod
    def _close(screen: Screen) -> None:
        try:
            screen.close()
        except Exception as exc:  # noqa: BLE001 - shutting down: the other closers still have to run
            log.error("screen: could not be stopped cleanly (%s: %s)", type(exc).__name__, exc)
