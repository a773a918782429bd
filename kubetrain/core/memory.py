"""How much data a stage may hold in memory before it must stream instead."""

from __future__ import annotations

import os

#: A stage streams when holding its data would exceed this share of the memory available.
BUDGET_SHARE = 0.4


def memory_budget() -> int:
    """Bytes a stage may hold: `KUBETRAIN_MEMORY_BUDGET` if set, else a share of the memory
    this process can use (the cgroup limit in a pod, else the machine's)."""
    given = os.environ.get("KUBETRAIN_MEMORY_BUDGET", "")
    if given:
        return int(float(given))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return int(total * BUDGET_SHARE)


def fits(nbytes: int, budget: int | None = None) -> bool:
    return nbytes <= (memory_budget() if budget is None else budget)
