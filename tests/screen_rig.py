"""The rig of the nurse's-screen browser and privacy tests: a real ``edgemed run --screen`` watching a folder.

* ``ScreenRun`` starts ``python -m edgemed run --screen --screen-port 0 --model M --source watch:DIR`` with a small
  profile (the demo's triage policy, a fast watch, optionally a broker), reads the page's URL from the line the
  screen logs at start, and stops the run with SIGTERM (bounded).
* ``pick_images`` chooses the test inputs with the device's own ``Classifier`` in this process (no TensorFlow): a
  malignant BreastMNIST test image the device triages urgent, a blurred copy of a test image that the quality gate
  refuses with its default settings, and an ISIC dermoscopy photo the out-of-distribution check flags.
* ``drop`` writes a file into the watched folder the way a probe's export does it safely: under a hidden name
  (``watch:`` skips dot files), then renamed, so the watcher never sees half a file.
* ``Page`` wraps ``browser.PipeBrowser``: the page's state by the DOM contract's ids, bounded waits, screenshots.

Every wait is bounded; the run is stopped by its pid; everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml
from browser import PipeBrowser

from edgemed.capture.files import decode_image
from edgemed.config import BackendConfig
from edgemed.deploy import check_deployable
from edgemed.inference.classify import Classifier
from edgemed.ood import OodSetting
from edgemed.preprocess import to_colour_mode
from edgemed.quality import QualityConfig, check_quality
from edgemed.triage import TriagePolicy, triage, triage_ood

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
CINE = DATA / "dicom" / "examples_ybr_color.dcm"
URGENT_REASON = "suspicious for malignancy - refer for biopsy assessment today"
#: The demo's policy (examples/breast-ultrasound-triage.yaml) on the test models' labels. Without a profile
#: `edgemed run` has no rule for any label and never says urgent (edgemed.triage's docstring).
TRIAGE_YAML = f"""triage:
  min_confidence: 0.6
  min_margin: 0.1
  rules:
    malignant: {{level: urgent, min_probability: 0.4, reason: {URGENT_REASON}}}
    benign: {{level: no_finding, min_probability: 0.75}}
"""
#: The same policy as the run reads it from its profile (one text for both: the images picked in this process are
#: triaged by the very rules the run applies).
POLICY = TriagePolicy.model_validate(yaml.safe_load(TRIAGE_YAML)["triage"])
#: The blur applied to a 28x28 BreastMNIST image: at sigma 3 every test image's Laplacian variance falls below the
#: gate's default min_blur (12), at sigma 2 about a third still pass; so no upscaling is needed (measured here).
BLUR_SIGMA = 3.0
URL_LINE = re.compile(r"screen: (http://127\.0\.0\.1:(\d+)/) \(open it in the device's kiosk browser\)")
VIEWPORT = (800, 480)
TABLET = (1280, 800)


@dataclass(repr=False)  # a failing test prints no pixel arrays
class Picks:
    """The inputs the tests drop, chosen by the device's own classifier."""

    urgent: np.ndarray  # 28x28 uint8, malignant, triaged urgent, not flagged out of distribution
    urgent_p: float  # its p(malignant) on the device
    blurred: np.ndarray  # a blurred test image the quality gate refuses as too blurred
    blur_reason: str
    isic: Path  # a dermoscopy JPEG the OOD check flags
    ordinary: np.ndarray  # another test image that passes the gate (for the hold test)


def _assess(classifier: Classifier, image: np.ndarray) -> tuple[str, float, bool]:
    """(triage level, p(malignant), OOD flagged) of one frame, as the runtime's _assess computes them."""
    if classifier.gray and image.ndim == 3:
        image = to_colour_mode(image, "gray")
    raw = classifier.backend.invoke(classifier.preprocess(image))
    prediction = classifier.scores(raw)
    ood = classifier.check_ood(raw)
    verdict = triage(prediction, POLICY)
    flagged = ood is not None and ood.flagged
    if flagged:
        verdict = triage_ood(verdict, prediction)
    p = prediction.probabilities[prediction.labels.index("malignant")]
    return verdict.level, float(p), flagged


def pick_images(model: Path) -> Picks:
    """Choose the inputs with the device's Classifier (default OOD setting, as ``edgemed run`` builds it)."""
    deployable = check_deployable(model)
    assert tuple(deployable.manifest.labels) == ("malignant", "benign"), deployable.manifest.labels
    backend = deployable.open_backend(BackendConfig())
    try:
        classifier = Classifier(backend, deployable.manifest, deployable.artifact, ood=OodSetting())
        with np.load(DATA / "breastmnist_28.npz") as npz:
            images, labels = npz["test_images"], npz["test_labels"].ravel()
        malignant = deployable.manifest.labels.index("malignant")
        urgent: list[tuple[float, int]] = []
        ordinary = None
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            level, p, flagged = _assess(classifier, image)
            if label == malignant and level == "urgent" and not flagged:
                urgent.append((p, i))
            elif ordinary is None and label != malignant and not flagged:
                ordinary = image
        assert urgent, "the device triages no malignant test image urgent: the model is too weak for the test"
        assert ordinary is not None
        p_best, best = max(urgent)
        blurred = cv2.GaussianBlur(images[best], (0, 0), BLUR_SIGMA)
        report = check_quality(blurred, QualityConfig())
        assert not report.passed and report.reason is not None and report.reason.startswith("too blurred"), report
        isic = None
        for path in sorted((DATA / "isic_samples").glob("*.jpg")):
            item = decode_image(path.read_bytes(), path.name)
            assert item.image is not None
            if not check_quality(to_colour_mode(item.image, "gray"), QualityConfig()).passed:
                continue
            if _assess(classifier, item.image)[2]:
                isic = path
                break
        assert isic is not None, "the OOD check flags no ISIC sample passing the gate"
        return Picks(images[best], p_best, blurred, report.reason, isic, ordinary)
    finally:
        backend.close()


def png_bytes(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return bytes(buf)


def drop(folder: Path, name: str, data: bytes | Path) -> Path:
    """Put one file into the watched folder atomically (hidden name, then rename): the watcher sees it whole."""
    hidden = folder / f".{name}.part"
    if isinstance(data, Path):
        shutil.copyfile(data, hidden)
    else:
        hidden.write_bytes(data)
    final = folder / name
    os.replace(hidden, final)
    return final


class ScreenRun:
    """``edgemed run --screen`` on a watched folder, as a child process of the test."""

    def __init__(self, tmp_path: Path, model: Path, *, broker_url: str | None = None, extra: str = "") -> None:
        self.watched = tmp_path / "export"
        self.watched.mkdir()
        self.data_dir = tmp_path / "device"
        self.log = tmp_path / "run.stderr"
        profile = tmp_path / "screen-test.yaml"
        text = (
            "profile: screen-test\ndescription: the screen tests' device\n"
            f"device: {{id: screen-01, site: clinic-a, data_dir: '{self.data_dir}'}}\n"
            # watch_existing: a file that lands while the watcher starts up is read all the same.
            "source: {watch_poll_s: 0.05, watch_settle_s: 0.2, watch_existing: true}\n"
            "inference: {accelerator: cpu, threads: 1}\n"
            "run: {print_results: false}\nhealth: {interval_s: 1}\n" + TRIAGE_YAML + extra
        )
        if broker_url:
            text += f"mqtt: {{url: '{broker_url}'}}\n"
        profile.write_text(text)
        args = ["run", "--profile", str(profile), "--screen", "--screen-port", "0"]
        args += ["--model", str(model), "--source", f"watch:{self.watched}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgemed", *args], env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT
            )
        try:
            self.url, self.port = self._wait_for_url(60.0)
        except BaseException:  # no run is left behind watching a folder when its screen never came up
            self.stop(timeout_s=10.0)
            raise
        self.origin = self.url.rstrip("/")

    def _wait_for_url(self, timeout_s: float) -> tuple[str, int]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = URL_LINE.search(self.stderr())
            if found:
                return found.group(1), int(found.group(2))
            if self.proc.poll() is not None:
                raise AssertionError(f"edgemed run exited ({self.proc.returncode}) before its screen:\n{self.stderr()}")
            time.sleep(0.05)
        raise AssertionError(f"no screen URL on stderr within {timeout_s} s:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout_s: float = 40.0) -> int:
        """SIGTERM (the run drains and exits), then SIGKILL if it does not within ``timeout_s``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


#: The page's state by the DOM contract's ids (hidden = the element or an ancestor has the hidden attribute).
STATE_JS = """(() => {
  if (!document.body || document.readyState === 'loading') return null;
  const q = (id) => document.getElementById(id);
  const shown = (id) => { const e = q(id); return !!e && !e.closest('[hidden]'); };
  const text = (id) => { const e = q(id); return e ? e.textContent.trim().replace(/\\s+/g, ' ') : null; };
  const data = (id, k) => { const e = q(id); return e ? (e.dataset[k] ?? null) : null; };
  const src = (id) => { const e = q(id); return e && e.getAttribute('src') ? e.getAttribute('src').slice(0, 32) : ''; };
  const ids = ['level', 'reason', 'action', 'confidence', 'quality', 'recapture', 'ood-warning', 'study',
    'study-level', 'study-reason', 'study-frames', 'connection', 'pending', 'model', 'delegate', 'frame', 'map',
    'map-legend', 'map-toggle', 'occlusion-button', 'hold-button'];
  const s = {seq: document.body.dataset.seq ?? null, missing: ids.filter((id) => !q(id))};
  for (const id of ids) s[id] = {shown: shown(id), text: text(id)};
  s.level.data = data('level', 'level'); s['study-level'].data = data('study-level', 'level');
  s.quality.passed = data('quality', 'passed'); s.connection.state = data('connection', 'state');
  s.delegate.degraded = data('delegate', 'degraded'); s.frame.src = src('frame'); s.map.src = src('map');
  s.note = text('control-note');  // not in the DOM contract: what the page says about a button press, for diagnosis
  return s;
})()"""

#: Whether the page fits its viewport: no horizontal scroll, the level and the action inside the viewport, nothing in
#: the main panel that scrolls, and every visible button at least 48 px both ways (touch targets).
FIT_JS = """(() => {
  const w = window.innerWidth, h = window.innerHeight, out = [];
  if (document.documentElement.scrollWidth > w) out.push('horizontal scroll: ' + document.documentElement.scrollWidth);
  for (const id of ['level', 'action']) {
    const e = document.getElementById(id);
    if (e.closest('[hidden]')) continue;  // the action is hidden while waiting for the first image
    const r = e.getBoundingClientRect();
    if (r.top < 0 || r.left < 0 || r.bottom > h || r.right > w || r.height === 0) out.push(id + ' outside: ' +
      JSON.stringify([r.left, r.top, r.right, r.bottom]));
  }
  // The nurse reads the whole result without scrolling it (the contract: no scrolling of the main panel).
  if (document.documentElement.scrollHeight > h) out.push('page scrolls: ' + document.documentElement.scrollHeight);
  for (const e of document.querySelectorAll('main, main > *')) {
    const scrollable = getComputedStyle(e).overflowY !== 'visible';
    if (scrollable && e.scrollHeight > e.clientHeight + 1) out.push('scrolls: #' + e.id + ' ' + e.scrollHeight);
  }
  for (const b of document.querySelectorAll('button')) {
    if (b.closest('[hidden]')) continue;
    const r = b.getBoundingClientRect();
    if (r.width < 48 || r.height < 48) out.push('small button #' + b.id + ': ' + r.width + 'x' + r.height);
  }
  return out;
})()"""


def _count(text: str | None) -> int:
    found = re.search(r"\d+", text or "")
    return int(found.group()) if found else -1


class Page:
    """The screen's page in headless Chromium at 800x480, with every DevTools event recorded."""

    def __init__(self, tmp_path: Path, run: ScreenRun, viewport: tuple[int, int] = VIEWPORT) -> None:
        self.run = run
        self.tmp_path = tmp_path
        self.viewport = viewport
        self.browser = PipeBrowser(tmp_path, run.url, viewport=viewport, record=True)

    def set_viewport(self, width: int, height: int) -> None:
        self.browser.set_viewport(width, height)
        self.viewport = (width, height)

    def state(self) -> dict[str, Any]:
        """The page's state (``{"seq": None}`` while the page is still loading)."""
        value = self.browser.evaluate(STATE_JS)
        return value if isinstance(value, dict) else {"seq": None}

    def wait(self, what: str, check: Any, timeout_s: float = 30.0) -> dict[str, Any]:
        """Poll the page's state until ``check(state)`` holds (bounded); the last state on failure."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.state()
            self.browser.drain()
            if state["seq"] is not None and check(state):
                return state
            assert self.run.proc.poll() is None, f"edgemed run exited:\n{self.run.stderr()}"
            assert time.monotonic() < deadline, f"the page never showed {what} in {timeout_s} s: {state}"
            time.sleep(0.1)

    def wait_new_frame(self, seq_before: str | None, timeout_s: float = 30.0) -> dict[str, Any]:
        return self.wait(
            "a new frame", lambda s: s["seq"] not in (None, "", seq_before) and s["frame"]["src"], timeout_s
        )

    def wait_pending(self, n: int, timeout_s: float = 30.0) -> dict[str, Any]:
        """Wait until the status bar counts ``n`` results waiting to be sent: with no broker every result the device
        committed stays pending, so this is how many it has triaged (``results.jsonl`` is flushed only at the end)."""
        return self.wait(f"{n} results pending", lambda s: _count(s["pending"]["text"]) >= n, timeout_s)

    def click(self, element_id: str) -> None:
        self.browser.evaluate(f"document.getElementById('{element_id}').click(), true")

    def fit_problems(self) -> list[str]:
        """What does not fit the viewport (FIT_JS), and whether the page really is laid out at ``viewport``."""
        value = self.browser.evaluate(FIT_JS)
        assert isinstance(value, list)
        size = self.browser.evaluate("[window.innerWidth, window.innerHeight]")
        if tuple(size) != self.viewport:
            value.append(f"laid out at {size}, not {list(self.viewport)}")
        return value

    def frames_received(self) -> list[int]:
        """The seq of every ``frame`` event the page's own event stream received (DevTools Network events), in
        order: what reached the page, whether or not it drew it."""
        seqs = []
        for event in self.browser.drain():
            params = event.get("params", {})
            if event.get("method") == "Network.eventSourceMessageReceived" and params.get("eventName") == "frame":
                seqs.append(int(json.loads(params["data"])["seq"]))
        return seqs

    def wait_frame_received(self, seq: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while seq not in self.frames_received():
            assert self.run.proc.poll() is None, f"edgemed run exited:\n{self.run.stderr()}"
            assert time.monotonic() < deadline, f"the page's stream never carried frame {seq} in {timeout_s} s"
            time.sleep(0.1)

    def screenshot(self, name: str, *, export: bool = True) -> Path:
        """``screen-NAME.png`` of the viewport in tmp_path and, with EDGEMED_SCREENSHOTS=DIR and ``export``, copied
        into DIR (the README's images: 800x480 ones only, which stay well under 200 KB)."""
        shot = self.browser.screenshot(self.tmp_path / f"screen-{name}.png")
        assert shot.stat().st_size > 5_000, "a blank page"  # a real rendering has text and an image
        header = shot.read_bytes()[:24]  # PNG signature, IHDR: width and height big-endian at bytes 16-23
        size = (int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big"))
        assert size == self.viewport, f"screenshot {name} is {size}, not the viewport {self.viewport}"
        folder = os.environ.get("EDGEMED_SCREENSHOTS")
        if folder and export:
            Path(folder).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, Path(folder) / shot.name)
        return shot

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions, log errors (CSP violations among them) and requests to anything
        but the screen's own origin, from every event recorded since the page opened."""
        found = []
        for event in self.browser.drain():
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(f"console: {params.get('args')}")
            elif method == "Runtime.exceptionThrown":
                found.append(f"exception: {params.get('exceptionDetails', {}).get('text')}")
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                found.append(f"log: {entry.get('text')} ({entry.get('url', '')})")
            elif method == "Network.requestWillBeSent":
                url = params.get("request", {}).get("url", "")
                if not (url.startswith(self.run.origin + "/") or url.startswith("data:")):
                    found.append(f"request to {url[:80]}")
        return found

    def requests(self) -> list[str]:
        return [
            e["params"]["request"]["url"][:80]
            for e in self.browser.drain()
            if e.get("method") == "Network.requestWillBeSent"
        ]

    def close(self) -> None:
        self.browser.close()
