"""Fault injection for the tests, outside the user-facing config.

The tests set ``RETINA_TEST_FAULTS`` (JSON) in the environment of the driver process (the training or search
command); the driver reads it once and hands a `Faults` to the workers inside the Train loop config (env
variables do not reach workers of an already running Ray cluster). Never set it in a real run.

    RETINA_TEST_FAULTS='{"fail_at_step": 5, "fail_marker": "/tmp/failed-once"}'   # one rank raises once
    RETINA_TEST_FAULTS='{"nan_at_step": 5}'                                      # the loss turns NaN
    RETINA_TEST_FAULTS='{"nan_trials": [1]}'                                     # search: trial 1 diverges
    RETINA_TEST_FAULTS='{"step_delay_s": 0.3}'                                   # each step takes >= 0.3 s
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

ENV = "RETINA_TEST_FAULTS"


@dataclass(frozen=True)
class Faults:
    fail_at_step: int = -1  # rank 1 (or 0 with one worker) raises once at this step...
    fail_marker: str = ""  # ...and creates this file, so the restarted run does not raise again
    nan_at_step: int = -1  # the class loss is multiplied by NaN at this step (flows into the gradients)
    nan_trials: list[int] = field(default_factory=list)  # search: these trials (0-based) get nan_at_step=0
    step_delay_s: float = 0.0  # every step takes at least this long: cluster events land at predictable steps

    @classmethod
    def from_env(cls) -> Faults:
        text = os.environ.get(ENV, "")
        if not text:
            return cls()
        faults = cls(**json.loads(text))
        if faults.fail_at_step >= 0 and not faults.fail_marker:
            raise ValueError(f"{ENV}: fail_marker is required with fail_at_step")
        return faults

    def for_trial(self, number: int) -> Faults:
        """The faults of search trial `number`: a NaN from the first step when it is one of `nan_trials`."""
        return dataclasses.replace(self, nan_at_step=0) if number in self.nan_trials else self

    def maybe_fail(self, step: int, rank: int, world: int) -> None:
        """Raise once at `fail_at_step` on rank 1 (0 with one worker); the marker file remembers it. Also slows
        every step down to `step_delay_s`."""
        if self.step_delay_s > 0:
            time.sleep(self.step_delay_s)
        if step != self.fail_at_step or rank != min(1, world - 1):
            return
        marker = Path(self.fail_marker)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"failed once at step {step} on rank {rank}\n")
        raise RuntimeError(f"injected failure at step {step} on rank {rank} ({ENV} fail_at_step)")
