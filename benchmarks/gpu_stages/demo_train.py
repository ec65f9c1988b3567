"""Stage 4: a short single-GPU training of the demo model with the `retina` library alone (no Ray, no MLflow).

The demo's model section (configs/demo.yaml: half-width ResNet-10, GN head, 5 classes, 160 px) is trained from
scratch for a few hundred bf16-autocast AdamW steps on the synthetic sample data (retina.data.synthetic, decoded
and collated once, then cycled). Wrong results stop the run: a non-finite loss or gradient norm, a loss that
does not fall, a checkpoint that does not load back on CPU with the same tensors, or CPU detections that differ
from the GPU's.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from gpu_stages.common import CheckFailed, Context, log, require
from retina.config import ModelConfig
from retina.data.coco import parse_coco
from retina.data.collate import collate_samples
from retina.data.synthetic import generate
from retina.data.transforms import EvalTransform, decode_image
from retina.model import build_retinanet

STAGE = "4 demo-train"
LR = 1e-3  # the demo's AdamW rate at batch 8 (configs/demo.yaml: base_lr 0.002 per 16 images)
BOX_TOL_PX, SCORE_TOL = 0.05, 1e-3  # GPU vs CPU detections, both IEEE fp32: ~100x what reordered sums give


@dataclass
class Plan:
    images: int
    batch: int
    steps: int
    window: int  # steps averaged at the start and at the end to decide whether the loss fell
    fall: float  # required: mean(last window) < fall * mean(first window)
    input_size: tuple[int, int] | None = None  # (min_size, max_size) override for the dry run


def _plan(ctx: Context) -> Plan:
    if ctx.dry_run:
        return Plan(images=8, batch=4, steps=12, window=3, fall=1.0, input_size=(96, 160))
    return Plan(images=128, batch=8, steps=300, window=30, fall=0.75)


def demo_model_config(path: Path) -> ModelConfig:
    """The model section of a run config. `retina.config.load_model_config` where the library has it (the config
    loader is being split between retina and pipelines), else the whole config's `.model`."""
    from retina import config as rc

    if hasattr(rc, "load_model_config"):
        return rc.load_model_config(path)
    return rc.load_config(path).model


def make_batches(cfg: ModelConfig, plan: Plan, folder: Path, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Generate the synthetic set, decode and resize each image once, collate fixed batches onto the device."""
    ann = generate(folder, plan.images, seed=0)
    parsed = parse_coco(ann.read_bytes(), str(ann))
    transform = EvalTransform(cfg.input.min_size, cfg.input.max_size)
    samples = []
    for rec in parsed.images:
        image = decode_image((folder / "images" / rec.file_name).read_bytes(), rec.file_name).image
        samples.append(transform(image, rec.boxes, rec.labels, rec.image_id))
    ic = cfg.input
    batches = []
    for i in range(0, len(samples) - plan.batch + 1, plan.batch):
        batch = collate_samples(
            samples[i : i + plan.batch], size_divisible=ic.size_divisible, mean=ic.image_mean, std=ic.image_std
        )
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def train(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], plan: Plan) -> list[float]:
    """AdamW with a linear warm-up, bf16 autocast, gradient clipping at 10 (the demo's); the losses per step."""
    device_type = batches[0]["images"].device.type
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.05)
    warmup = max(1, plan.steps // 10)
    losses = []
    for step in range(plan.steps):
        for group in opt.param_groups:
            group["lr"] = LR * min(1.0, 0.1 + 0.9 * step / warmup)
        with torch.autocast(device_type, dtype=torch.bfloat16):
            b = batches[step % len(batches)]
            parts = model.losses(b["images"], b["gt_boxes"], b["gt_labels"])
            loss = parts["loss_cls"] + parts["loss_box"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 10.0))
        value = float(loss.detach())  # one host sync per step: checked before the optimizer can spread a NaN
        if not (math.isfinite(value) and math.isfinite(grad_norm)):
            terms = {k: float(v.detach()) for k, v in parts.items()}
            raise CheckFailed(f"step {step}: non-finite loss {terms} or gradient norm {grad_norm}")
        opt.step()
        losses.append(value)
    return losses


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """IEEE fp32 convolutions and matmuls on the GPU: cuDNN's default TF32 differs from CPU fp32 by ~1e-3."""
    knobs = [torch.backends.cudnn.conv, torch.backends.cuda.matmul]
    if all(hasattr(k, "fp32_precision") for k in knobs):
        # torch >= 2.9: the new API only (mixing it with allow_tf32 raises when the legacy flags are read)
        saved = [k.fp32_precision for k in knobs]
        for knob in knobs:
            knob.fp32_precision = "ieee"
    else:
        saved = [torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32]
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        if all(hasattr(k, "fp32_precision") for k in knobs):
            for knob, value in zip(knobs, saved, strict=True):
                knob.fp32_precision = value
        else:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _one_way(src: dict, dst: dict, cap: int, where: str) -> int:
    """Every detection of `src` above the threshold margin (and above `dst`'s cut, when `dst` holds `cap`
    detections) has a partner in `dst`: same label, score within SCORE_TOL, box within BOX_TOL_PX."""
    floor = 0.05 + 10 * SCORE_TOL  # the model's score threshold is 0.05: nearer than that may fall either way
    if len(dst["scores"]) >= cap:
        floor = max(floor, float(dst["scores"].min()) + SCORE_TOL)
    keep = src["scores"] >= floor
    boxes, scores, labels = src["boxes"][keep], src["scores"][keep], src["labels"][keep]
    same = (labels[:, None] == dst["labels"][None]) & ((scores[:, None] - dst["scores"][None]).abs() <= SCORE_TOL)
    same &= (boxes[:, None] - dst["boxes"][None]).abs().amax(-1) <= BOX_TOL_PX
    missing = (~same.any(1)).nonzero()[:, 0]
    if len(missing):
        j = int(missing[0])
        box = [round(v, 3) for v in boxes[j].tolist()]
        raise CheckFailed(f"{where}: detection label {int(labels[j])} score {float(scores[j]):.5f} box {box} unmatched")
    return int(keep.sum())


def compare_detections(ours: list[dict], other: list[dict], cap: int) -> int:
    """Both directions, per image; returns how many detections were compared; raises CheckFailed on a mismatch."""
    compared = 0
    for i, (a, b) in enumerate(zip(ours, other, strict=True)):
        compared += _one_way(a, b, cap, f"image {i}, GPU vs CPU")
        _one_way(b, a, cap, f"image {i}, CPU vs GPU")
    return compared


def roundtrip(model: torch.nn.Module, cfg: ModelConfig, batch: dict[str, torch.Tensor], folder: Path) -> int:
    """Save the state dict, load it on CPU (weights_only), compare tensors and detections; the count compared."""
    path = folder / "demo_state.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key, value in model.state_dict().items():
        require(torch.equal(state[key], value.cpu()), f"checkpoint tensor {key} changed in the save/load round trip")
    cpu_model = build_retinanet(cfg)
    cpu_model.load_state_dict(state)
    model.eval()
    cpu_model.eval()
    with ieee_fp32():
        dets = [{k: v.cpu() for k, v in d.items()} for d in model.predict_batch(batch)]
    cpu_dets = cpu_model.predict_batch({k: v.cpu() for k, v in batch.items()})
    return compare_detections(dets, cpu_dets, cfg.postprocess.detections_per_img)


def run(ctx: Context) -> None:
    plan = _plan(ctx)
    cfg = demo_model_config(ctx.repo / "configs" / "demo.yaml")
    if plan.input_size:
        cfg.input.min_size, cfg.input.max_size = plan.input_size
    r = ctx.report
    with tempfile.TemporaryDirectory(prefix="gpu-check-demo-") as tmp:
        folder = Path(tmp)
        batches = make_batches(cfg, plan, folder, ctx.device)
        torch.manual_seed(0)
        model = build_retinanet(cfg).to(ctx.device).train()
        log(f"{STAGE}: {plan.steps} steps of batch {plan.batch} ({len(batches)} fixed batches), bf16 autocast")
        t0 = time.perf_counter()
        losses = train(model, batches, plan)
        seconds = time.perf_counter() - t0
        first, last = statistics.mean(losses[: plan.window]), statistics.mean(losses[-plan.window :])
        require(
            last < plan.fall * first,
            f"the loss did not fall: first {plan.window} steps {first:.4f}, last "
            f"{last:.4f} (needs < {plan.fall} x first)",
        )
        compared = roundtrip(model, cfg, batches[0], folder)
    require(compared > 0 or ctx.dry_run, "no detection above the score threshold to compare after training")
    r.info(
        STAGE,
        f"{plan.steps} steps, batch {plan.batch}, {cfg.input.min_size} px",
        plan.steps * plan.batch / seconds,
        "img/s",
    )
    r.correct(
        STAGE,
        f"loss, mean of first {plan.window} steps -> last {plan.window}",
        f"{first:.4f} -> {last:.4f}",
        target=f"finite, last < {plan.fall} x first",
    )
    r.correct(
        STAGE,
        "detections compared, CPU checkpoint vs GPU",
        compared,
        target=f"box <= {BOX_TOL_PX} px, score <= {SCORE_TOL}",
    )
