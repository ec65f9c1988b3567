"""Training step (forward + loss + backward + SGD step): retina vs torchvision's retinanet_resnet50_fpn.

Both models carry the same weights and settings (ours is built with ``retina.from_torchvision``), see the same
images and targets, and run alternately in one process, so the ratio isolates the implementation: our batched
matcher and loss with the fused focal loss against torchvision's per-image loop with a one-hot target.

    python benchmarks/train_step.py [--batch 2] [--size 512] [--classes 80] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
from torchvision.models.detection import retinanet_resnet50_fpn

import retina


def make_inputs(batch: int, size: int, classes: int, seed: int = 0, *, width: int | None = None):
    """`batch` random (3, size, width or size) images in 0..1 and 6 random boxes per image."""
    g = torch.Generator().manual_seed(seed)
    width = width or size
    images = [torch.rand(3, size, width, generator=g) for _ in range(batch)]
    extent = torch.tensor([float(width), float(size)])  # (x, y) limits; (size, size) for the square default
    targets = []
    for _ in range(batch):
        n = 6
        xy = torch.rand(n, 2, generator=g) * extent * 0.7
        wh = 16 + torch.rand(n, 2, generator=g) * extent * 0.3
        boxes = torch.cat([xy, torch.minimum(xy + wh, extent)], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(0, classes, (n,), generator=g)})
    return images, targets


def build_models(classes: int, min_size: int, max_size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(torchvision's retinanet_resnet50_fpn, ours built from it with the same weights), both in train mode."""
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=classes, min_size=min_size, max_size=max_size
    ).train()
    ours = retina.from_torchvision(tv).train()
    # Separate copies of the weights: each model's SGD steps must not move the other's parameters.
    ours.load_state_dict({k: v.clone() for k, v in ours.state_dict().items()})
    return tv, ours


def step_fn(model: torch.nn.Module, images, targets, amp_dtype: torch.dtype | None = None):
    """A closure running one SGD step on fixed inputs; returns the loss (a host sync). `amp_dtype`: autocast."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    device_type = images[0].device.type

    def step() -> float:
        amp = torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with amp:
            losses = model(images, targets)
            loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def time_alternating(steps: dict[str, Callable[[], float]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per step for each closure, run alternately; each closure returns a host value, so the time
    includes all of its device work."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():  # alternate, so drift on a shared machine hits both alike
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tv, ours = build_models(args.classes, args.size, args.size)
    images, targets = make_inputs(args.batch, args.size, args.classes)
    steps = {"torchvision": step_fn(tv, images, targets), "retina": step_fn(ours, images, targets)}
    times = time_alternating(steps, args.warmup, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"train step, CPU threads={torch.get_num_threads()}, batch {args.batch}, {args.size}x{args.size}, "
          f"R50-FPN, K={args.classes}, median of {args.repeats}")  # fmt: skip
    print("| implementation | median step (s) | images/s |")
    print("| --- | --- | --- |")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {args.batch / v:.2f} |")
    print(f"speed-up (torchvision / retina): {med['torchvision'] / med['retina']:.2f}x")


if __name__ == "__main__":
    main()
