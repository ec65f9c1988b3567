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


def _mapping_flags(address: int) -> set[str]:
    """VmFlags of the mapping holding `address`, from /proc/self/smaps (``hg``: advised MADV_HUGEPAGE)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    return set()


def test_small_and_non_cpu_requests_are_plain_empty_tensors():
    out = cpu_buffers.empty((3, 5), torch.float32, torch.device("cpu"))
    assert out.shape == (3, 5) and out.dtype == torch.float32 and out.is_contiguous()


@pytest.mark.skipif(not sys.platform.startswith("linux") or _thp_mode() not in ("always", "madvise"),
                    reason="needs Linux with transparent huge pages in always/madvise mode")  # fmt: skip
def test_large_buffer_is_advised_to_huge_pages():
    out = cpu_buffers.empty((64, 1 << 18), torch.float32, torch.device("cpu"))  # 64 MiB
    out.fill_(1.5)
    assert float(out[-1, -1]) == 1.5
    # The advice is what this package controls; whether the kernel then finds free 2 MiB pages depends on the
    # host's memory fragmentation (a CI host once backed none), so the test checks the advice, not the backing.
    assert "hg" in _mapping_flags(out.data_ptr() + out.numel() * 2)
    plain = torch.empty((64, 1 << 18), dtype=torch.float32)
    assert "hg" not in _mapping_flags(plain.data_ptr() + plain.numel() * 2)
