"""Focal loss forward + backward: torchvision's RetinaNet usage vs batched vs torch.compile vs the fused op.

    python benchmarks/focal_loss.py --device cpu                       # 2 x 120,087 x 80 fp32 (defaults)
    python benchmarks/focal_loss.py --device cuda --batch 16 --dtype bf16

Variants, all on identical inputs (logits ~ N(-4.6, 1.5), ~0.2 % foreground, ~1 % ignored anchors):

  (a) torchvision RetinaNet: per-image loop, dense one-hot via zeros_like + index assignment, boolean-mask valid
      anchors, ``torchvision.ops.sigmoid_focal_loss(..., "sum") / max(1, num_fg)`` per image, mean over images;
  (b) the same torchvision formula batched: one one-hot for the batch, one boolean mask, one call;
  (c) torch.compile of the class-index formula (targets from ``labels == arange(K)``), autograd backward;
  (d) ours: ``retina.ops.sigmoid_focal_loss`` (CPU: compiled single pass; CUDA: Triton), default backend.
(b)-(d) divide the batch sum by max(1, total foreground) on the device; the normaliser changes no cost.

Time: median of up to ``--repeats`` forward+backward steps (at least 5, within ``--budget-s`` seconds per variant;
this 2-core VM's timings vary by ±30 % between runs) after ``--warmup`` steps (compilation happens there).
Peak extra memory:
  CPU: every variant runs once more in a fresh subprocess: build the inputs, warm up, free everything but the
  inputs, ``malloc_trim``, reset the kernel's RSS high-water mark (``echo 5 > /proc/self/clear_refs``), run one
  step and read ``VmHWM - VmRSS(before)`` from /proc/self/status. The child runs with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so every allocation over 64 KiB is its own mapping, returned on free: RSS then
  follows the live tensors, not glibc's heap caching. The kept ``logits.grad`` is included (1.0x is the floor).
  CUDA: ``torch.cuda.max_memory_allocated()`` during one step minus the allocation before it.
Roofline (CUDA only): ``dst.copy_(src)`` of the logits (reads and writes the bytes a single-pass loss must move);
our effective bandwidth counts the same bytes (read logits + write grad) over our time.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as tv_sigmoid_focal_loss

from retina.ops import sigmoid_focal_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALPHA, GAMMA = 0.25, 2.0
VARIANTS = {
    "a": "(a) torchvision RetinaNet (per-image loop)",
    "b": "(b) torchvision formula, batched",
    "c": "(c) torch.compile class-index formula",
    "d": "(d) retina fused (ours)",
}


def make_inputs(args) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.anchors)
    logits = torch.randn(*shape, args.classes, generator=gen) * 1.5 - 4.6  # [B, A, K]: prior-init-like logits
    u = torch.rand(shape, generator=gen)
    classes = torch.randint(0, args.classes, shape, generator=gen)
    labels = torch.where(u < 0.002, classes, torch.full_like(classes, -1))  # [B, A]: class, -1 background
    labels = torch.where(u > 0.99, torch.full_like(classes, -2), labels)  # -2 ignored
    return logits.to(args.device, DTYPES[args.dtype]), labels.to(args.device)


def torchvision_retinanet(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # torchvision/models/detection/retinanet.py RetinaNetClassificationHead.compute_loss, with matched_idxs
    # replaced by labels (>= 0 foreground, -2 = BETWEEN_THRESHOLDS)
    losses = []
    for logits_per_image, labels_per_image in zip(logits, labels, strict=True):
        foreground = labels_per_image >= 0
        num_foreground = foreground.sum()
        target = torch.zeros_like(logits_per_image)  # [A, K] dense one-hot
        target[foreground, labels_per_image[foreground]] = 1.0
        valid = labels_per_image != -2
        loss = tv_sigmoid_focal_loss(logits_per_image[valid], target[valid], alpha=ALPHA, gamma=GAMMA, reduction="sum")
        losses.append(loss / max(1, num_foreground))
    return sum(losses) / len(losses)


def torchvision_batched(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    foreground = labels >= 0
    target = torch.zeros_like(logits)  # [B, A, K] dense one-hot
    target[foreground, labels[foreground]] = 1.0
    valid = labels != -2
    loss = tv_sigmoid_focal_loss(logits[valid], target[valid], alpha=ALPHA, gamma=GAMMA, reduction="sum")
    return loss / foreground.sum().clamp(min=1)


def class_index_formula(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = logits.float()
    target = (labels.unsqueeze(-1) == torch.arange(logits.shape[-1], device=logits.device)).float()  # no one-hot
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = (ALPHA * target + (1 - ALPHA) * (1 - target)) * ce * (1 - p_t) ** GAMMA
    loss = torch.where((labels != -2).unsqueeze(-1), loss, 0.0)
    return loss.sum() / (labels >= 0).sum().clamp(min=1)


def ours(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    loss = sigmoid_focal_loss(logits, labels, alpha=ALPHA, gamma=GAMMA, reduction="sum")
    return loss / (labels >= 0).sum().clamp(min=1)


def variant_fn(name: str) -> Callable:
    if name == "a":
        return torchvision_retinanet
    if name == "b":
        return torchvision_batched
    if name == "c":
        return torch.compile(class_index_formula)
    return ours


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step(fn: Callable, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits.grad = None
    loss = fn(logits, labels)
    loss.backward()
    return loss.detach()


def time_variant(fn: Callable, logits, labels, args) -> tuple[float, float]:
    """(median ms, loss value)."""
    for _ in range(args.warmup):
        loss = step(fn, logits, labels)
    times: list[float] = []
    budget_end = time.perf_counter() + args.budget_s
    # at least 5 timed steps; up to --repeats while the time budget lasts (the 1 s torchvision steps stop early)
    while len(times) < args.repeats and (len(times) < 5 or time.perf_counter() < budget_end):
        synchronize(args.device)
        start = time.perf_counter()
        loss = step(fn, logits, labels)
        synchronize(args.device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), loss.float().item()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure_memory_here(name: str, args) -> int:
    """Peak extra bytes of one step of variant ``name`` in this process (see the module docstring)."""
    logits, labels = make_inputs(args)
    logits.requires_grad_()
    fn = variant_fn(name)
    for _ in range(max(1, args.warmup)):
        step(fn, logits, labels)
    logits.grad = None
    gc.collect()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(fn, logits, labels)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS
    step(fn, logits, labels)
    return (_status_kib("VmHWM") - before) * 1024


def measure_memory(name: str, args) -> int:
    if args.device == "cuda":
        return measure_memory_here(name, args)
    cmd = [sys.executable, __file__, "--child-memory", name, *args.forwarded]
    # A fixed mmap threshold makes glibc map every allocation over 64 KiB separately and unmap it on free, so RSS
    # follows the live tensors. With glibc's default dynamic threshold, chunk-sized temporaries freed into the
    # heap after a 73 MiB free inflate RSS by allocator caching that says nothing about the variant.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_extra_bytes"]


def copy_roofline_ms(logits: torch.Tensor, args) -> float:
    src = logits.detach()
    dst = torch.empty_like(src)
    for _ in range(args.warmup):
        dst.copy_(src)
    times = []
    for _ in range(max(args.repeats, 10)):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--anchors", type=int, default=120_087)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=30, help="most timed steps per variant (median reported)")
    parser.add_argument("--budget-s", type=float, default=6.0, help="time budget per variant (at least 5 steps)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default="abcd", help="subset of abcd")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.forwarded = [
        f"--device={args.device}",
        f"--batch={args.batch}",
        f"--anchors={args.anchors}",
        f"--classes={args.classes}",
        f"--dtype={args.dtype}",
        f"--warmup={args.warmup}",
    ]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child_memory:
        print(json.dumps({"peak_extra_bytes": measure_memory_here(args.child_memory, args)}))
        return
    logits, labels = make_inputs(args)
    logits.requires_grad_()
    logits_bytes = logits.numel() * logits.element_size()
    rows = []
    for name in args.variants:
        ms, loss = time_variant(variant_fn(name), logits, labels, args)
        rows.append((name, ms, loss, measure_memory(name, args)))
        print(f"# {VARIANTS[name]}: {ms:.1f} ms, loss {loss:.6g}", file=sys.stderr)
    shape = f"{args.batch} x {args.anchors:,} x {args.classes} {args.dtype}"
    print(f"\nFocal loss forward + backward, {shape} on {args.device} ({torch.get_num_threads()} threads)\n")
    print("| variant | median ms | speed-up vs (a) | peak extra memory | x logits size | loss |")
    print("|---|---:|---:|---:|---:|---:|")
    base_ms = rows[0][1] if rows[0][0] == "a" else float("nan")
    for name, ms, loss, peak in rows:
        print(
            f"| {VARIANTS[name]} | {ms:.1f} | {base_ms / ms:.1f}x | {peak / 2**20:.0f} MiB "
            f"| {peak / logits_bytes:.2f}x | {loss:.6g} |"
        )
    print(f"\nlogits: {logits_bytes / 2**20:.0f} MiB. Loss of (a) is per-image normalised, (b)-(d) batch-normalised.")
    if args.device == "cuda" and "d" in args.variants:
        copy_ms = copy_roofline_ms(logits, args)
        ours_ms = dict((r[0], r[1]) for r in rows)["d"]
        moved = 2 * logits_bytes + labels.numel() * labels.element_size()
        print(
            f"copy_ roofline: {copy_ms:.3f} ms ({2 * logits_bytes / copy_ms / 1e6:.0f} GB/s); ours moves >= "
            f"{moved / 2**20:.0f} MiB in {ours_ms:.3f} ms = {moved / ours_ms / 1e6:.0f} GB/s "
            f"= {copy_ms / ours_ms * 100:.0f}% of copy_"
        )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    main()
