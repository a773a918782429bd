"""kubetrain.core.memory: the budget a stage holds data within, from the environment."""

from __future__ import annotations

import pytest

from kubetrain.core.errors import KubetrainError
from kubetrain.core.memory import fits, memory_budget, parse_bytes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1073741824", 2**30),
        ("1GiB", 2**30),
        ("512MiB", 512 * 2**20),
        ("512mi", 512 * 2**20),
        ("2G", 2 * 10**9),
        ("1.5GB", 1_500_000_000),
        ("64KiB", 64 * 1024),
    ],
)
def test_sizes_parse(text: str, expected: int) -> None:
    assert parse_bytes(text, "X") == expected


@pytest.mark.parametrize("text", ["lots", "1TiB", "-5", "0", "GiB"])
def test_bad_sizes_fail_with_one_line(text: str) -> None:
    with pytest.raises(KubetrainError, match="is not a size; give bytes or a size such as"):
        parse_bytes(text, "KUBETRAIN_MEMORY_BUDGET")


def test_the_environment_overrides_the_budget(monkeypatch) -> None:
    monkeypatch.setenv("KUBETRAIN_MEMORY_BUDGET", "256MiB")
    assert memory_budget() == 256 * 2**20
    assert fits(256 * 2**20) and not fits(256 * 2**20 + 1)
    monkeypatch.delenv("KUBETRAIN_MEMORY_BUDGET")
    assert memory_budget() > 0


def test_reuse_freed_memory_tunes_glibc_and_allocations_still_work() -> None:
    import platform

    import numpy as np
    import pyarrow as pa

    from kubetrain.core.memory import reuse_freed_memory

    tuned = reuse_freed_memory()
    if platform.libc_ver()[0] == "glibc":
        assert tuned  # every mallopt call was accepted, and Arrow took jemalloc
        assert pa.default_memory_pool().backend_name == "jemalloc"
    assert len(pa.array(np.arange(1_000_000))) == 1_000_000  # Arrow still allocates
    blocks = [np.ones(4_000_000) for _ in range(3)]  # 32 MB each: past the mmap threshold
    assert sum(float(b.sum()) for b in blocks) == 12_000_000
