"""The worker loop's protocol: the named parts (`Hook`) that run around every step, in a declared order, and the one
cross-rank record of a step (`Decision`).

The loop (`pipelines.training.loop.Loop`) takes a step; everything else a run does is a hook, called on every rank
at the same points, in the order of `pipelines.training.hooks.default_hooks`:

    before_train(loop)                       once per attempt (start or restart of the worker group)
    wrap_batches(batches, split) -> batches  each stream the loop opens ("train" at the start, "val" per evaluation)
    before_step(loop)                        before the forward pass
    votes(loop, result) -> {name: bool}      this rank's flags for the step's one collective
    after_step(loop, result, decision)       after the optimizer step, with what every rank agreed
    after_train(loop)                        when the run reached train.max_steps

**Invariants** (what every rank must do together, or the group hangs):

1. Each step has exactly one collective of the loop's own: the all-reduce (MAX) of every hook's votes. A flag
   raised on any rank is raised on all, so every rank takes the same branch at the same step. A hook declares the
   names it votes with in `VOTES`; the order of the hooks fixes the record's layout on every rank.
2. A hook that calls a collective (a metric all-reduce, Ray's preemption query, an evaluation's gather,
   ``ray.train.report``) calls it at a step every rank chooses the same way: a step count, or a `Decision` flag.
   Never from a rank-local condition such as rank 0's clock: that goes through a vote.
3. Every rank calls ``ray.train.report`` at the same steps, in the same order; reports reach Ray in step order;
   only rank 0 attaches a checkpoint or writes to MLflow. `pipelines.training.reporter.Reporter` is the one caller
   of ``ray.train.report`` and keeps this.
4. A non-finite loss or gradient on any rank stops every rank before the optimizer step (the loop's own vote,
   ``nonfinite``): no NaN reaches the weights or a checkpoint.

Adding a behaviour: write a `Hook` subclass and put it in `default_hooks` at its place in the order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipelines.training.distributed import all_reduce

if TYPE_CHECKING:
    from pipelines.training.loop import Loop
    from pipelines.training.step import StepResult

NONFINITE = "nonfinite"  # the loop's own vote: this rank's loss or gradient is not finite


class Hook:
    """One named part of the worker loop; every method is optional (see the module docstring for the order)."""

    VOTES: tuple[str, ...] = ()  # the flags this hook raises in the step's collective (its `votes` keys)

    def before_train(self, loop: Loop) -> None:
        pass

    def wrap_batches(self, batches: Iterator[Any], split: str) -> Iterator[Any]:
        return batches

    def before_step(self, loop: Loop) -> None:
        pass

    def votes(self, loop: Loop, result: StepResult) -> Mapping[str, bool]:
        return {}

    def after_step(self, loop: Loop, result: StepResult, decision: Decision) -> None:
        pass

    def after_train(self, loop: Loop) -> None:
        pass


@dataclass(frozen=True)
class Decision:
    """What every rank agreed on at one step: each named flag, raised if any rank raised it."""

    flags: Mapping[str, bool]

    def __getitem__(self, name: str) -> bool:
        return self.flags[name]


def vote_names(hooks: list[Hook]) -> tuple[str, ...]:
    """The record's layout: the loop's own vote, then every hook's, in hook order (identical on every rank)."""
    names = (NONFINITE, *(n for h in hooks for n in h.VOTES))
    if len(set(names)) != len(names):
        raise ValueError(f"two hooks vote with the same name: {names}")
    return names


def agree(layout: tuple[str, ...], nonfinite: torch.Tensor, mine: Mapping[str, bool]) -> Decision:
    """The step's one collective: this rank's flags → the group's (MAX over ranks) as a `Decision`.

    `nonfinite`: the step's () bool tensor, left on its device (no host sync before the all-reduce)."""
    hosts = torch.tensor([float(bool(mine.get(n, False))) for n in layout[1:]], device=nonfinite.device)
    local = torch.cat([nonfinite.float().reshape(1), hosts])  # (len(layout),) 0/1, in layout order
    return Decision(dict(zip(layout, (bool(v) for v in all_reduce(local).tolist()), strict=True)))
