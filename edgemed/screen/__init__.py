"""The nurse's screen: a local page with each frame, its triage and where the model looked (``edgemed run --screen``).

    runtime thread   Device.process -> Screen.show(result, image, study, class_map)     references only, O(1)
    push thread      the latest shown result, at most max_fps a second -> JPEG/PNG data URLs -> SSE events
    http threads     ThreadingHTTPServer on 127.0.0.1: the page, its script and style, /events, POST /occlusion
    occlusion        on request, one worker thread: edgemed.cam.occlusion_map under the runtime's invoke lock

Modules: ``security`` (Host/Origin/token checks, headers), ``server`` (routes), ``hub`` (connected pages),
``events`` (the JSON the page receives), ``render`` (images), ``screen`` (the push loop), ``static/`` (the page).

Privacy: frames and maps exist only in memory and on the loopback; they are never logged, published or written to
disk, and the page is served with ``Cache-Control: no-store``. File names are not shown unless the profile says
``privacy.print_source_names: always``: the kiosk page is not a terminal where only the operator reads them, and a
screen beside a bed is seen by whoever passes.
"""

from __future__ import annotations

from edgemed.screen.screen import Screen
from edgemed.screen.security import host_allowed

__all__ = ["Screen", "host_allowed"]
