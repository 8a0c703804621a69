"""Progress lines of long evaluations and generations: stage, done/total, rate, ETA.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """Prints `desc: done/total items, rate items/s, ETA` to stderr every `every_s` seconds."""

    def __init__(self, total: int, desc: str, enabled: bool = True, every_s: float = 10.0):
        self.total, self.desc, self.enabled, self.every_s = total, desc, enabled, every_s
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"{self.desc}: {self.done}/{self.total} items, {rate:.1f} items/s, "
                  f"ETA {eta:.0f}s", file=sys.stderr, flush=True)


def fmt_time(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"
