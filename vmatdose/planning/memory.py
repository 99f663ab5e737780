"""Peak resident memory (RSS) of a block of work, sampled from ``/proc/self/statm``.

``resource.getrusage`` only knows the peak of the whole process so far, which after the
first case says nothing about the next one; a sampling thread gives each case its own
peak (to within the sampling interval). Without ``/proc`` the process peak stands in.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from pathlib import Path

_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    """Resident memory of this process now (bytes)."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return process_peak_rss_bytes()


def process_peak_rss_bytes() -> int:
    """The process's lifetime peak RSS (bytes; ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakRSS:
    """Context manager sampling RSS every ``interval_s``; ``peak_gb`` after the block."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.peak_bytes = current_rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes())

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / 1e9
