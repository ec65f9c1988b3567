"""Stage 3: a training step of RetinaNet R50-FPN, ours vs torchvision's (benchmarks/train_step.py's models and
inputs): batch 8 of 800×1333 images, 80 classes, bf16 autocast, SGD; images/s and the step's peak memory.

Both models carry the same weights and see the same images and targets, alternately. Then, if the time budget
allows, ours again with its backbone and head compiled by torch.compile (the convolutions are the bulk; the
loss and matcher stay eager). The targets are judged on the faster of ours eager and ours compiled.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import train_step as bench  # benchmarks/train_step.py

from gpu_stages.common import (
    CheckFailed,
    Context,
    DeadlinePassed,
    is_h100_class,
    log,
    require,
    soft_deadline,
    synchronize,
)

STAGE = "3 train-step"
CLASSES = 80
COMPILE_NEEDS_S = 90.0  # at least this much budget left to try (a cold R50-FPN compile: ~1 min; it has a deadline)


@dataclass
class Sizes:
    batch: int
    height: int
    width: int
    warmup: int
    repeats: int


def _sizes(ctx: Context) -> Sizes:
    return Sizes(1, 64, 96, 0, 1) if ctx.dry_run else Sizes(8, 800, 1333, 5, 20)


def _inputs(ctx: Context, sz: Sizes):
    images, targets = bench.make_inputs(sz.batch, sz.height, CLASSES, width=sz.width)
    images = [img.to(ctx.device) for img in images]
    targets = [{k: v.to(ctx.device) for k, v in t.items()} for t in targets]
    return images, targets


def _checked(name: str, step: Callable[[], float]) -> Callable[[], float]:
    """A wrong result stops the run: every step's loss must be finite."""

    def run() -> float:
        loss = step()
        require(math.isfinite(loss), f"{name}: non-finite training loss {loss}")
        return loss

    return run


def peak_step_bytes(step: Callable[[], float], device: torch.device) -> int | None:
    """Peak memory allocated during one step beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@contextlib.contextmanager
def _cudnn_benchmark() -> Iterator[None]:
    # fixed input shapes: let cuDNN pick its fastest convolution algorithms (during the warm-up steps), for both
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _compiled_img_s(ctx: Context, ours: torch.nn.Module, images, targets, sz: Sizes) -> float | None:
    """Ours with backbone and head compiled: images/s, or None when skipped or failed (reported as info)."""
    r = ctx.report
    needs = 10.0 if ctx.dry_run else COMPILE_NEEDS_S
    if ctx.budget.left() < needs:
        r.info(STAGE, "ours + torch.compile", f"skipped: {ctx.budget.left():.0f} s of the budget left (< {needs:.0f})")
        return None
    backend = "eager" if ctx.dry_run else "inductor"  # dry run: Dynamo tracing only (no C++ compile on CPU)
    try:
        # leave 20 s of the budget for the table and the JSON, whatever the compiler does
        with soft_deadline(ctx.budget.left() - 20):
            ours.backbone.compile(backend=backend)
            ours.head.compile(backend=backend)
            step = _checked("retina compiled", bench.step_fn(ours, images, targets, torch.bfloat16))
            t0 = time.perf_counter()
            step()  # compiles forward and backward
            r.info(STAGE, "torch.compile time (first step)", time.perf_counter() - t0, "s")
            times = bench.time_alternating({"compiled": step}, sz.warmup, sz.repeats)["compiled"]
    except CheckFailed:
        raise  # a non-finite loss is a wrong result, compiled or not
    except DeadlinePassed as exc:
        r.info(STAGE, "ours + torch.compile", f"stopped: {exc}")
        return None
    except Exception as exc:  # "if it helps": a compiler failure is reported, not a wrong result of ours
        r.info(STAGE, "ours + torch.compile", f"failed: {type(exc).__name__}: {str(exc)[:100]}")
        return None
    img_s = sz.batch / statistics.median(times)
    r.info(STAGE, "ours + torch.compile(backbone, head)", img_s, "img/s")
    return img_s


def run(ctx: Context) -> None:
    sz = _sizes(ctx)
    r = ctx.report
    tv, ours = bench.build_models(CLASSES, min(sz.height, sz.width), max(sz.height, sz.width))
    tv, ours = tv.to(ctx.device), ours.to(ctx.device)
    images, targets = _inputs(ctx, sz)
    steps = {
        "torchvision": _checked("torchvision", bench.step_fn(tv, images, targets, torch.bfloat16)),
        "retina": _checked("retina", bench.step_fn(ours, images, targets, torch.bfloat16)),
    }
    log(f"{STAGE}: batch {sz.batch} of {sz.height}x{sz.width}, bf16, {sz.warmup} + {sz.repeats} steps each")
    with _cudnn_benchmark():
        times = bench.time_alternating(steps, sz.warmup, sz.repeats)
        img_s = {k: sz.batch / statistics.median(v) for k, v in times.items()}
        peaks = {k: peak_step_bytes(step, ctx.device) for k, step in steps.items()}
        r.info(STAGE, f"torchvision, batch {sz.batch} {sz.height}x{sz.width} bf16", img_s["torchvision"], "img/s")
        r.info(STAGE, "ours (eager)", img_s["retina"], "img/s")
        for name, peak in peaks.items():
            if peak is None:
                r.info(STAGE, f"peak step memory, {name}", "n/a (no CUDA)")
            else:
                r.info(STAGE, f"peak step memory, {name}", peak / 2**30, "GiB")
        del steps, tv
        compiled = _compiled_img_s(ctx, ours, images, targets, sz)
    best = max(img_s["retina"], compiled or 0.0)
    which = "compiled" if compiled and compiled > img_s["retina"] else "eager"
    ratio = best / img_s["torchvision"]
    if which == "compiled":
        r.info(STAGE, "ours (eager) / torchvision, img/s", img_s["retina"] / img_s["torchvision"], "x")
    r.judge(STAGE, f"ours ({which}) / torchvision, img/s", ratio, "x", ">= 1.5x", ratio >= 1.5)
    h100 = ctx.cuda and is_h100_class(torch.cuda.get_device_name(ctx.device))
    r.judge(STAGE, f"ours ({which}) img/s", best, "img/s", ">= 100 (H100-class)", best >= 100 if h100 else None)
    r.values["train_img_s"] = best
    del ours, images, targets
    if ctx.cuda:
        torch.cuda.empty_cache()
