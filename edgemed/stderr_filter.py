"""Keep the notices native libraries write to the process's stderr off the terminal, and nothing else.

LiteRT's C++ code prints ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`` for every interpreter,
TensorFlow's converter ``fully_quantize: 0, inference_type: 6, ...`` for every conversion, OpenCV and FFmpeg
``[ WARN:0@0.086] ...`` and ``moov atom not found`` for inputs edgemed already reports as error results. To a
nurse or a field engineer each reads like a fault. None of them can be turned off through their libraries' own
settings (LiteRT honours no environment variable), so ``filtered_stderr`` points file descriptor 2 at a small
filter process for the duration of the call that prints: it drops lines matching the known notices and passes
every other line straight on. A real error, even a fatal one that aborts the process inside the call, still
reaches the terminal, because the filter outlives this process. ``--log-level DEBUG`` (an ``edgemed`` logger
enabled for DEBUG) shows everything.

OpenCV's and FFmpeg's own log levels can be set, so ``quiet_opencv`` does that instead.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

LITERT_NOTICES = re.compile(r"^INFO: (Created TensorFlow Lite (XNNPACK )?delegate for|\[[\w./-]+:\d+\] )")
"""LiteRT's INFO lines: the one for every interpreter (XNNPACK is applied by default on the CPU), and those of its
``CompiledModel`` runtime (``INFO: [environment.cc:36] ...``); its warnings and errors are not notices."""

LIBJPEG_NOTICES = re.compile(r"^(Corrupt JPEG data: |Premature end of JPEG file|Invalid SOS parameters for sequential)")
"""libjpeg's warnings, which OpenCV's decoder lets it print for a damaged JPEG while decoding it anyway."""

RUN_NOTICES = re.compile(f"{LITERT_NOTICES.pattern}|{LIBJPEG_NOTICES.pattern}")
"""Everything ``edgemed run`` keeps off stderr for the whole run (the capture thread decodes while it classifies)."""

# Runs as `python -I -S -c`: the standard library only. Lines end at "\n" or at "\r" (a progress bar redraws its
# line with "\r"), and each is passed on as soon as it is complete, so a progress bar keeps moving.
# It ignores SIGINT and SIGTERM: Ctrl-C signals the whole foreground process group and `systemctl stop` every
# process of the service, and the filter must outlive edgemed's own shutdown to pass on what it logs while
# draining (killed first, it would turn every later write to fd 2 into EPIPE). It exits when its input closes:
# when edgemed leaves the block or dies; SIGKILL (systemd's stop timeout) still ends it.
_FILTER = r"""
import signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
import os, re, sys
notice = re.compile(sys.argv[1])
out, held = sys.stderr.buffer, b""
def emit(part):
    if not notice.search(part.decode("utf-8", "replace")):
        out.write(part)
while True:
    chunk = os.read(0, 65536)
    if not chunk:
        break
    *done, held = re.split(rb"(?<=[\r\n])", held + chunk)
    for part in done:
        emit(part)
    out.flush()
if held:
    emit(held)
    out.flush()
"""


def showing_everything() -> bool:
    """True when the user asked for debug output (``--log-level DEBUG``): then nothing is filtered."""
    return logging.getLogger("edgemed").isEnabledFor(logging.DEBUG)


@contextmanager
def filtered_stderr(notices: re.Pattern[str]) -> Iterator[None]:
    """Drop the lines matching ``notices`` that native code writes to file descriptor 2 inside the block.

    Python's own ``sys.stderr`` is flushed first and reaches the terminal unchanged afterwards. Without a way to
    start the filter process (or with debug output asked for), nothing is filtered: better every line than none.

    Args:
        notices: lines to drop; everything else is passed on as it is written.
    """
    if showing_everything():
        yield
        return
    sys.stderr.flush()
    try:
        # Started before fd 2 is redirected, so it inherits the real stderr.
        filt = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER, notices.pattern], stdin=subprocess.PIPE)
    except OSError:
        yield
        return
    pipe = filt.stdin
    if pipe is None:  # cannot happen with stdin=PIPE; no filter rather than a broken stderr
        filt.kill()
        yield
        return
    saved = os.dup(2)
    os.dup2(pipe.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        pipe.close()  # the filter sees end of input, forwards what is left and exits
        try:
            filt.wait(timeout=10)
        except subprocess.TimeoutExpired:
            filt.kill()


def quiet_opencv() -> None:
    """Keep OpenCV's warnings and FFmpeg's errors about unreadable inputs off stderr (each becomes an edgemed
    error result already); errors of OpenCV itself, and FFmpeg's fatal ones, still show. A value the user set in
    ``OPENCV_LOG_LEVEL`` or ``OPENCV_FFMPEG_LOGLEVEL`` is kept, and ``--log-level DEBUG`` changes nothing."""
    if showing_everything():
        return
    if "OPENCV_LOG_LEVEL" not in os.environ:
        os.environ["OPENCV_LOG_LEVEL"] = "ERROR"
        cv2 = sys.modules.get("cv2")
        if cv2 is not None:  # already imported (a library caller), so it has read the variable: set it directly
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "8")  # AV_LOG_FATAL; read when FFmpeg is first used
