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

    def __init__(self, tmp_path: Path, url: str, extra_flags: tuple[str, ...] = ()) -> None:
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
        self._next_id = 0
        # The first answer waits for Chromium to start: on a loaded 2-core machine (CI runs the suite beside its own
        # installs) a cold start took over 10 s once; the browser's behaviour is what the tests time, not its start.
        targets = self.call("Target.getTargets", timeout_s=60.0)["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
        # Navigate only once attached, so that no evaluation runs in the blank page being replaced.
        self.call("Page.navigate", {"url": url}, self.session)

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
        self.proc.kill()
        self.proc.wait(10)
        os.close(self._cmd_w)
        os.close(self._out_r)


WAIT_FOR_JS = """new Promise((resolve, reject) => {
  const t0 = Date.now();
  const t = setInterval(() => { const v = (%s); if (v) { clearInterval(t); resolve(v); }
    else if (Date.now() - t0 > 8000) { clearInterval(t); reject(new Error("timed out")); } }, 50);
})"""
