"""Progress lines every stage prints: `kubetrain | <stage> | <message>`.

One prefix makes them easy to pick out of KFP's (verbose) executor logs, in
the local runner's console filter and in `kubectl logs` alike.
"""

from __future__ import annotations

import sys
import time

PREFIX = "kubetrain |"


def log(stage: str, message: str) -> None:
    print(f"{PREFIX} {stage} | {message}", file=sys.stdout, flush=True)


def eta(started: float, done: int, total: int, budget_s: float | None = None) -> str:
    """Remaining time from the mean pace so far, e.g. '12s' or '3m05s'; with a time
    budget (seconds since `started`) no more than what is left of it."""
    if done <= 0 or total <= done:
        return "0s"
    elapsed = time.perf_counter() - started
    left = elapsed / done * (total - done)
    if budget_s is not None:
        left = max(0.0, min(left, budget_s - elapsed))
    return f"{int(left // 60)}m{int(left % 60):02d}s" if left >= 60 else f"{left:.0f}s"
