"""Restarts as the worker log shows them: the one reader of the lines `hooks.py` (``step N/M loss=...``) and
`loop.py` (rank 0's ``resumed from <checkpoint> at step N``) write, for the fault tests and benchmarks."""

from __future__ import annotations

import re

STEP_LINE = re.compile(r"step (\d+)/\d+ loss=")
RESUMED_LINE = re.compile(r"resumed from .* at step (\d+)")


def last_step(text: str) -> int:
    """The highest step a worker logged in `text` (0 before the first)."""
    return max((int(m.group(1)) for m in STEP_LINE.finditer(text)), default=0)


def steps_redone(text: str) -> list[int]:
    """Per restart, in order: the last step trained before it minus the step its checkpoint resumed from."""
    redone, last = [], 0
    for line in text.splitlines():
        if m := STEP_LINE.search(line):
            last = max(last, int(m.group(1)))
        elif m := RESUMED_LINE.search(line):
            redone.append(last - int(m.group(1)))
            last = int(m.group(1))
    return redone
