"""Huge-page-advised CPU buffers (retina.ops.cpu_buffers)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from retina.ops import cpu_buffers

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str:
    try:
        text = THP.read_text()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1 : text.index("]")]


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping holding `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_small_and_non_cpu_requests_are_plain_empty_tensors():
    out = cpu_buffers.empty((3, 5), torch.float32, torch.device("cpu"))
    assert out.shape == (3, 5) and out.dtype == torch.float32 and out.is_contiguous()


@pytest.mark.skipif(not sys.platform.startswith("linux") or _thp_mode() not in ("always", "madvise"),
                    reason="needs Linux with transparent huge pages in always/madvise mode")  # fmt: skip
def test_large_buffer_is_backed_by_huge_pages_once_written():
    out = cpu_buffers.empty((64, 1 << 18), torch.float32, torch.device("cpu"))  # 64 MiB
    out.fill_(1.5)  # first touch: the faults happen here
    assert float(out[-1, -1]) == 1.5
    # at least half of the 2 MiB-aligned interior is huge pages (the kernel may fall back for a few under pressure)
    assert _anon_huge_kib(out.data_ptr() + out.numel() * 2) >= 16 * 1024
