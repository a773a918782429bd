"""How much data a stage may hold in memory before it must stream instead."""

from __future__ import annotations

import os
import re

from kubetrain.core.errors import KubetrainError

#: A stage streams when holding its data would exceed this share of the memory available.
BUDGET_SHARE = 0.4


def memory_budget() -> int:
    """Bytes a stage may hold: `KUBETRAIN_MEMORY_BUDGET` if set, else a share of the memory
    this process can use (the cgroup limit in a pod, else the machine's)."""
    given = os.environ.get("KUBETRAIN_MEMORY_BUDGET", "").strip()
    if given:
        return parse_bytes(given, "KUBETRAIN_MEMORY_BUDGET")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return int(total * BUDGET_SHARE)


_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str, name: str) -> int:
    """``1073741824``, ``1GiB``, ``512MiB`` or ``2G`` as bytes; one-line error otherwise."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower().removesuffix("b") if match else ""
    unit = {"ki": "kib", "mi": "mib", "gi": "gib"}.get(unit, unit)
    try:
        value = float(match.group(1)) * _UNITS[unit] if match else -1.0
    except (KeyError, ValueError):
        value = -1.0
    if value <= 0:
        raise KubetrainError(
            f"{name}={text!r} is not a size; give bytes or a size such as 512MiB or 2GiB"
        )
    return int(value)


def fits(nbytes: int, budget: int | None = None) -> bool:
    return nbytes <= (memory_budget() if budget is None else budget)


#: Arrow's allocator for stage processes (see `reuse_freed_memory`): set in the
#: environment by `kubetrain.cli` and the images, before pyarrow loads.
ARROW_POOL = {"ARROW_DEFAULT_MEMORY_POOL": "jemalloc"}

#: glibc's mallopt parameters (malloc.h) and what `reuse_freed_memory` sets them to.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_MALLOC = {_M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: 2**30, _M_ARENA_MAX: 2}


def reuse_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of handing it back to the kernel.

    A batch stage allocates and frees arrays of tens of MB per batch. With the
    allocators' defaults freed memory goes back to the kernel and every page faults
    (and is zeroed) again on its next use: cleaning 1M rows spent 1.4 to 3.1 of its
    7 to 8 CPU seconds in the kernel. Two changes, measured on that clean
    (`make bench-scale`):

    * Arrow allocates through jemalloc instead of mimalloc, which purged freed pages
      within milliseconds here: kernel time 0.9 s, wall time 3.9 s instead of 4 to 5 s,
      and a lower peak (1.15 GiB instead of 1.3). Arrow's C++ side reads its pool
      from the environment only (`ARROW_POOL`, set by the entry points); this sets
      the pool pyarrow's Python side allocates from;
    * glibc (numpy, pandas) serves large blocks from its heap (up to 32 MiB, glibc's
      ceiling for this setting), keeps up to 1 GiB of freed heap and uses two arenas.

    Returns whether both took effect; where one is unavailable (no glibc, an Arrow
    built without jemalloc) that one stays as it was.
    """
    import ctypes
    import ctypes.util

    import pyarrow as pa

    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
        arrow = True
    except NotImplementedError:  # a pyarrow built without jemalloc
        arrow = False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return arrow and all(mallopt(param, value) == 1 for param, value in _MALLOC.items())
