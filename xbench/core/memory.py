"""Giving memory the process has freed back to the operating system.

glibc keeps freed memory in its heaps: after PyTorch frees a large batch's activations (and
glibc's dynamic mmap threshold has risen, so later large blocks come from the heap too), a
server's RSS stays at its highest point long after a burst of large requests: +400 MB after one
request of 1,000 long pairs, here. `malloc_trim` hands the free pages back (5-20 ms). The model
pool calls `MemoryReleaser.maybe_release` when the batcher has gone idle; it trims only when RSS
has grown by `slack_bytes` since the last trim, so a steady load never pays for it. Elsewhere
than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

SLACK_BYTES = 64 * 1024 * 1024


def _malloc_trim() -> ctypes._CFuncPtr | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def rss_bytes() -> int:
    """Resident set size of this process (Linux; 0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class MemoryReleaser:
    def __init__(self, slack_bytes: int = SLACK_BYTES):
        self.slack_bytes = slack_bytes
        self._trim = _malloc_trim()
        self._floor = rss_bytes()
        self._lock = threading.Lock()

    def maybe_release(self) -> bool:
        """Trim if the process has grown by the slack since the last trim; True if it trimmed."""
        if self._trim is None or not self._lock.acquire(blocking=False):
            return False
        try:
            if rss_bytes() - self._floor < self.slack_bytes:
                return False
            self._trim(0)
            self._floor = rss_bytes()
            return True
        finally:
            self._lock.release()
