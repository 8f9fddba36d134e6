"""The kiosk browser of ``bench_runtime.py --screen``: one headless Chromium showing the page, and its CPU.

It is driven with the tests' DevTools-over-a-pipe driver (``tests/browser.py``: no port, no extra package) and
loads nothing but the screen's own loopback page.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from _common import ROOT, process_cpu_s

sys.path.insert(0, str(ROOT / "tests"))
from browser import CHROMIUM, PipeBrowser

# Counts the frames the page shows (body[data-seq] changes) with the page's own clock; installed by DevTools.
COUNTER_JS = """(() => { window.__bench = {n: 0, first: null, last: null};
  new MutationObserver(() => { const t = performance.now(); const b = window.__bench; b.n += 1;
    if (b.first === null) b.first = t; b.last = t; })
    .observe(document.body, {attributes: true, attributeFilter: ["data-seq"]}); return true; })()"""


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # the process ended while we looked
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it (Chromium's zygote, renderers and GPU process are its descendants)."""
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


class Browser:
    """One headless Chromium for the whole benchmark: the kiosk browser of the device's screen."""

    def __init__(self, folder: Path) -> None:
        if not Path(CHROMIUM).exists():
            raise SystemExit("--screen needs headless Chromium: apt-get install -y chromium")
        self.page = PipeBrowser(folder, "about:blank", ("--window-size=800,480",))
        self.pids = process_tree(self.page.proc.pid)
        self._last_scan = time.monotonic()
        self.settle()

    def settle(self, timeout_s: float = 20.0) -> None:
        """Wait (bounded) until the browser is idle: a fresh Chromium keeps starting up for a second or two."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            c0 = self.cpu_s()
            time.sleep(0.5)
            if self.cpu_s() - c0 < 0.025:  # under 5% of a core
                return

    def open(self, url: str) -> None:
        self.page.call("Page.navigate", {"url": url}, self.page.session)

    def blank(self) -> None:
        self.page.call("Page.navigate", {"url": "about:blank"}, self.page.session)

    def shown_seq(self) -> str:
        return str(self.page.evaluate("document.body ? (document.body.dataset.seq || '') : ''"))

    def count_frames(self) -> None:
        self.page.evaluate(COUNTER_JS)

    def counted(self) -> dict[str, Any]:
        return dict(self.page.evaluate("window.__bench || {n: 0, first: null, last: null}"))

    def cpu_s(self) -> float:
        """CPU seconds of the browser's processes (the list of processes is refreshed about once a second)."""
        if time.monotonic() - self._last_scan > 1.0:
            self.pids, self._last_scan = process_tree(self.page.proc.pid), time.monotonic()
        total = 0.0
        for pid in self.pids:
            try:
                total += process_cpu_s(pid)
            except (OSError, IndexError):
                continue  # a renderer of the previous page went away
        return total

    def close(self) -> None:
        self.page.close()
