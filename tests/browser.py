"""Headless Chromium for browser tests, driven over the DevTools protocol on a pipe (no port, no extra package)."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def headless_flags(profile_dir: Path) -> list[str]:
    """Chromium flags for tests: headless, no sandbox (root in CI), and no traffic of its own to the internet."""
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile_dir}",
    ]


class PipeBrowser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4): no port, no extra package."""

    def __init__(
        self,
        tmp_path: Path,
        url: str,
        extra_flags: tuple[str, ...] = (),
        *,
        viewport: tuple[int, int] | None = None,
        record: bool = False,
    ) -> None:
        """Start Chromium and open ``url``.

        Args:
            viewport: (width, height) in CSS pixels at a device scale factor of 1, set before the page loads.
            record: keep every DevTools event of the page (console, log entries such as CSP violations,
                exceptions, network requests) in ``events``, from before the navigation on.
        """
        if not Path(CHROMIUM).exists():
            pytest.fail("headless Chromium is needed for the browser test: apt-get install -y chromium")
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        def wire() -> None:  # in the child, before exec: Chromium expects commands on fd 3, replies on fd 4
            os.dup2(cmd_r, 3)
            os.dup2(out_w, 4)

        flags = [*headless_flags(tmp_path / "chromium-cdp"), "--remote-debugging-pipe", *extra_flags]
        self.proc = subprocess.Popen(
            [CHROMIUM, *flags, "about:blank"],
            pass_fds=(3, 4, cmd_r, out_w),
            preexec_fn=wire,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._closed = False
        self._next_id = 0
        self._record = record
        self.events: list[dict[str, Any]] = []
        try:
            self._open(url, viewport, record)
        except BaseException:  # a browser that failed to start or to open the page is not left running
            self.close()
            raise

    def _open(self, url: str, viewport: tuple[int, int] | None, record: bool) -> None:
        # The first answer waits for Chromium to start: on a loaded 2-core machine (CI runs the suite beside its own
        # installs) a cold start took over 10 s once; the browser's behaviour is what the tests time, not its start.
        targets = self.call("Target.getTargets", timeout_s=60.0)["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
        if viewport is not None:
            self.set_viewport(*viewport)
        if record:
            for domain in ("Runtime", "Log", "Network", "Page"):
                self.call(f"{domain}.enable", session=self.session)
        # Navigate only once attached, so that no evaluation runs in the blank page being replaced.
        self.call("Page.navigate", {"url": url}, self.session)

    def set_viewport(self, width: int, height: int) -> None:
        """Lay the page out as on a screen of ``width`` x ``height`` CSS pixels (scale factor 1, not mobile)."""
        params = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.call("Emulation.setDeviceMetricsOverride", params, self.session)

    def screenshot(self, path: Path) -> Path:
        """Save what the viewport shows as a PNG at ``path``."""
        import base64

        shot = self.call("Page.captureScreenshot", {"format": "png"}, self.session, timeout_s=30.0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def drain(self) -> list[dict[str, Any]]:
        """Read what Chromium already sent (without waiting) and return the events recorded so far."""
        while select.select([self._out_r], [], [], 0)[0]:
            chunk = os.read(self._out_r, 1 << 16)
            if not chunk:
                break
            self._buf += chunk
        self._take_events()
        return self.events

    def _take_events(self) -> None:
        # Replies stay in the buffer for ``call``; whole event messages move to ``events`` (or are dropped).
        kept: list[bytes] = []
        *whole, rest = self._buf.split(b"\0")
        for raw in whole:
            message = json.loads(raw)
            if "id" in message:
                kept.append(raw)
            elif self._record:
                self.events.append(message)
        self._buf = b"".join(m + b"\0" for m in kept) + rest

    def call(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None, timeout_s: float = 10.0
    ) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._next_id:
                    assert "error" not in reply, reply
                    return dict(reply["result"])
                if self._record and "method" in reply:
                    self.events.append(reply)
            ready, _, _ = select.select([self._out_r], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"Chromium did not answer {method} within {timeout_s} s"
            chunk = os.read(self._out_r, 1 << 16)
            assert chunk, "Chromium closed the DevTools pipe"
            self._buf += chunk

    def evaluate(self, expression: str) -> Any:
        """Run JS in the page (awaiting a promise) and return its JSON value."""
        result = self.call(
            "Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}, self.session
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def close(self) -> None:
        """Kill Chromium and close the pipe (again: nothing)."""
        if self._closed:
            return
        self._closed = True
        self.proc.kill()
        self.proc.wait(10)
        os.close(self._cmd_w)
        os.close(self._out_r)


WAIT_FOR_JS = """new Promise((resolve, reject) => {
  const t0 = Date.now();
  const t = setInterval(() => { const v = (%s); if (v) { clearInterval(t); resolve(v); }
    else if (Date.now() - t0 > 8000) { clearInterval(t); reject(new Error("timed out")); } }, 50);
})"""
