"""Run one ``edgemed`` command with every thread under cProfile, timed by each thread's CPU clock.

    python benchmarks/_profiled.py OUT.pstats dashboard ingest --db ... --broker ...

cProfile alone sees only the thread that enabled it; the ingest's work happens on its writer, receipt and network
threads. Every thread started after this script begins gets a profiler of its own (``threading.setprofile``), and
when the command returns (SIGTERM/SIGINT stop ``edgemed`` cleanly) the profiles are merged into OUT.pstats.
``time.thread_time`` makes it a profile of where the CPU goes, not of where threads wait.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import threading
import time
from pathlib import Path
from typing import Any

_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()


def _new() -> cProfile.Profile:
    prof = cProfile.Profile(time.thread_time)
    with _lock:
        _profiles.append(prof)
    prof.enable()
    return prof


def _start_in_thread(frame: Any, event: str, arg: Any) -> None:
    sys.setprofile(None)  # replaced by the thread's own profiler
    _new()


def main() -> int:
    out = Path(sys.argv[1])
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from edgemed.cli import main as edgemed_main

    threading.setprofile(_start_in_thread)
    main_prof = _new()
    try:
        return int(edgemed_main(sys.argv[2:]) or 0)
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
        main_prof.disable()
        with _lock:
            done = [p for p in _profiles if p.getstats()]
        for prof in done:
            prof.disable()
        merged = pstats.Stats(done[0])
        for prof in done[1:]:
            merged.add(prof)
        merged.dump_stats(str(out))


if __name__ == "__main__":
    sys.exit(main())
