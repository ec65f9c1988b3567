"""GPU check: proves the CUDA path on one GPU in about 5 minutes and prints one summary table.

    python benchmarks/gpu_check.py --out DIR [--cpu-dry-run] [--skip STAGE ...] [--budget-s 300]
    make gpu-check                       # the same with the project venv, --out runs/gpu-check

Stages (the table's order; stage 3 runs last so that its optional torch.compile part gets the time left):
  1 cuda-tests  `pytest -m gpu` on the focal-loss test files: the Triton kernel against the fp64 reference for
                γ ∈ {0, 0.5, 2, 5}, α ∈ {0.25, -1}, fp32/bf16/fp16, K ∈ {1, 80, 81}, ±100 logits, ignored
                labels; bitwise determinism; CUDA-graph capture; no recompiles for new γ/α.
  2 focal-loss  16 × 120,087 × 80 bf16 forward + backward: ours vs torchvision's way (≥ 25×) and torch.compile
                (≥ 1.3×); bandwidth as a fraction of a device-to-device copy of the same bytes (≥ 60 %).
  3 train-step  R50-FPN RetinaNet, batch 8 of 800×1333, bf16: ours vs torchvision's RetinaNet, img/s (≥ 1.5×,
                ≥ 100 img/s on an H100-class GPU) and peak memory; ours with torch.compile if time is left.
  4 demo-train  300 bf16 steps of the demo model (configs/demo.yaml) with `retina` alone: finite, falling
                loss; the checkpoint loads on CPU and gives the GPU's detections within tolerance.
  5 decode      JPEG decode + resize to 800/1333 on all CPUs: img/s per core, cores needed per GPU.

A wrong result (parity, NaN, a loss that does not fall, differing detections, any error) stops the run at once
with exit 1; a missed speed target is only "below target" in the table. Over --budget-s: exit 3. Without a CUDA
device it prints one line and exits 0; --cpu-dry-run instead runs every stage on CPU at tiny sizes (targets
printed, not judged) to prove the script itself. DIR/gpu_check.json holds every row and the versions it ran with
(rewritten after each stage); DIR/pytest-gpu.xml is stage 1's JUnit report.

What it needs on the GPU machine: Python 3.12 with torch, torchvision, numpy, pillow, pyyaml (configs), pytest
and triton, all in that image already; no wheels to send. pycocotools is not needed (nothing here imports
retina.evaluation), nor Ray or MLflow (nothing imports pipelines, tuning or cluster). The repo is not installed
there: this script puts the repo root on sys.path, and stage 1 passes it to pytest through PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# No installed project on the GPU machine: the repo root makes `retina` importable; benchmarks/ (this script's
# folder, already first when run as a script) makes the sibling benchmark modules and gpu_stages importable.
for _path in (REPO / "benchmarks", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

STAGES = ("cuda-tests", "focal-loss", "train-step", "demo-train", "decode")  # numbered 1..5 in this order


def _stage_name(text: str) -> str:
    if text.isdigit() and 1 <= int(text) <= len(STAGES):
        return STAGES[int(text) - 1]
    if text not in STAGES:
        raise argparse.ArgumentTypeError(f"unknown stage {text!r}: one of {', '.join(STAGES)} or 1..{len(STAGES)}")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check", help="folder for gpu_check.json")
    parser.add_argument("--cpu-dry-run", action="store_true", help="every stage on CPU at tiny sizes, not judged")
    parser.add_argument("--skip", nargs="+", type=_stage_name, default=[], metavar="STAGE", help="names or 1..5")
    parser.add_argument("--budget-s", type=float, default=300.0, help="time limit of the whole run (exit 3)")
    return parser.parse_args(argv)


def cuda_available() -> bool:
    import torch

    with warnings.catch_warnings():  # a CUDA build on a machine without a driver may warn: one line means one
        warnings.simplefilter("ignore")
        return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not args.cpu_dry_run and not cuda_available():
        import torch

        print(f"gpu-check: skipped, no CUDA device (torch {torch.__version__}); --cpu-dry-run checks the script")
        return 0
    from gpu_stages.runner import run

    return run(args.out, dry_run=args.cpu_dry_run, skip=set(args.skip), budget_s=args.budget_s, argv=argv)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is written and flushed. Skip the interpreter's exit handlers: Inductor's compile workers, left
    # busy by a torch.compile that ran out of time, could otherwise hold the exit past the watchdog.
    os._exit(code)
