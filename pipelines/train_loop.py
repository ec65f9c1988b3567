"""The per-worker training loop that Ray Train runs on every DDP worker (`train_func`).

Reads top to bottom: config → model, optimizer, schedule → resume from the latest checkpoint → epochs of
steps → evaluation, checkpoint and report every `eval_every_epochs` and at the end.

Collectives per step: one all-reduce of a 2-flag tensor [non-finite loss or gradient, out of data]. It makes
every rank stop together, both on a non-finite loss (E1: no rank steps the optimizer with NaN gradients, so no
checkpoint can hold NaN weights) and when one rank's data part ends first (C8: no rank waits forever in a DDP
gradient all-reduce that the others never join).

A non-finite loss ends the run without raising: a raise would make Ray Train restart the workers from the
last checkpoint (FailureConfig), which replays the same steps into the same NaN. Instead every rank returns
``{"nonfinite": message}`` (naming the step and each rank's loss terms); the driver reads rank 0's return value
(``Result.return_value``), raises `NonFiniteLossError` and marks the MLflow run FAILED.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from pipelines import plots
from pipelines.checkpointing import TrainState, load_checkpoint, save_checkpoint
from pipelines.data import coco_gt_from_shards, make_collate_fn
from pipelines.evaluation_loop import EvalResult, evaluate
from pipelines.optim import WarmupMultiStepLR, build_optimizer
from pipelines.tracking import RunLogger
from retina.config import Config, config_from_dict, to_dict
from retina.evaluation import agnostic_line, agnostic_metrics, per_class_metrics, per_class_rows, per_class_table
from retina.model import RetinaNet, build_retinanet

logger = logging.getLogger("retina.train")

NONFINITE_KEY = "nonfinite"  # in the dict train_func returns


class _LossModule(nn.Module):
    """DDP synchronises gradients through `forward`; the model's batched loss lives in `losses`, so wrap it."""

    def __init__(self, model: RetinaNet):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.losses(images, gt_boxes, gt_labels)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.MAX) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t, op=op)
    return t


def _autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    # bf16 needs no loss scaling (fp32's exponent range); fp16 pairs with the GradScaler below.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _maybe_fail(cfg: Config, step: int, rank: int, world: int) -> None:
    """Test hook: one rank raises once at `fail_at_step` (the marker file remembers it across restarts)."""
    t = cfg.train
    if step != t.fail_at_step or rank != min(1, world - 1):
        return
    marker = Path(t.fail_marker)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"failed once at step {step} on rank {rank}\n")
    raise RuntimeError(f"injected failure at step {step} on rank {rank} (train.fail_at_step)")


def _nonfinite_message(step: int, losses: dict[str, torch.Tensor], grad_norm: torch.Tensor | None) -> str:
    """Every rank's loss terms (gathered) in one line, e.g. 'rank 0: loss_cls=nan loss_box=0.51'."""
    terms = {k: float(v.detach()) for k, v in losses.items()}
    terms = {"loss": sum(terms.values()), **terms}
    if grad_norm is not None:
        terms["grad_norm"] = float(grad_norm)
    gathered = [None] * dist.get_world_size() if _distributed() else [terms]
    if _distributed():
        dist.all_gather_object(gathered, terms)
    per_rank = "; ".join(f"rank {r}: " + " ".join(f"{k}={v:.4g}" for k, v in t.items()) for r, t in enumerate(gathered))
    return f"non-finite loss at step {step}: {per_rank}"


def train_func(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point. `config`: {"config": Config as a dict, "tracking_uri", "mlflow_run_id",
    "label_map": [{"id", "name", "label"}, ...]}. Returns {"step": last step} (+ NONFINITE_KEY when stopped)."""
    cfg = config_from_dict(config["config"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(tc.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    tracker = RunLogger(config["tracking_uri"], config["mlflow_run_id"], enabled=rank == 0)
    label_map = config["label_map"]
    coco_ids = [int(c["id"]) for c in label_map]
    names = [str(c["name"]) for c in label_map]
    class_names = dict(zip(coco_ids, names, strict=True))  # COCO id → name, for the per-class metrics

    # 1. model, optimizer, learning-rate schedule, loss scaler
    model = build_retinanet(cfg.model)
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_checkpoint(ckpt_dir)
        model.load_state_dict(state.model)
    ddp_model = ray.train.torch.prepare_model(_LossModule(model))  # moves to `device`; DDP when world > 1
    optimizer = build_optimizer(model, tc, cfg.data.batch_size)
    scheduler = WarmupMultiStepLR(optimizer, tc)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.amp == "fp16")
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = _autocast(tc.amp, device)

    # 2. resume: step counter, epoch and lr schedule continue where the checkpoint left them
    step, epoch = 0, 0
    if state is not None:
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        if state.scaler:
            scaler.load_state_dict(state.scaler)
        step, epoch = state.step, state.epoch
        logger.info("rank %d: resumed from %s at step %d, epoch %d", rank, checkpoint.path, step, epoch)
        tracker.set_tag("retina.resumed_from_step", str(step))
    if step >= tc.max_steps:
        logger.info("rank %d: the run already finished (step %d of %d)", rank, step, tc.max_steps)
        return {"step": step}

    collate = make_collate_fn(cfg.model.input)  # Ray's collate class form (plain callables are deprecated)
    per_worker_batch = cfg.data.batch_size // world
    train_data = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")
    gt_cache: dict[str, Any] = {}

    def load_gt() -> dict[str, Any]:
        if "gt" not in gt_cache:
            gt_cache["gt"] = coco_gt_from_shards(cfg.data.val_shards)
        return gt_cache["gt"]

    # 3. epochs of steps
    window = torch.zeros(4, device=device)  # running sums over the log window: loss, loss_cls, loss_box, grad_norm
    window_steps, window_start = 0, time.perf_counter()
    last_train: dict[str, float] = {}
    while step < tc.max_steps:
        model.train()
        epoch_start, epoch_steps = time.perf_counter(), 0
        batches = iter(train_data.iter_torch_batches(batch_size=per_worker_batch, collate_fn=collate, drop_last=True))
        batch = next(batches, None)
        # every rank needs a batch before the first DDP step of the epoch, or none of them steps (C8)
        empty = _all_reduce(torch.tensor([float(batch is None)], device=device))
        if bool(empty[0]):
            raise RuntimeError(f"rank {rank}: no training batch in epoch {epoch + 1} (train split smaller than "
                               f"{cfg.data.batch_size} images?)")  # fmt: skip
        while True:
            _maybe_fail(cfg, step, rank, world)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast:
                losses = ddp_model(batch["images"], batch["gt_boxes"], batch["gt_labels"])
            if step == tc.nan_at_step:  # test hook: a NaN that flows into the gradients, as a real blow-up does
                losses = {**losses, "loss_cls": losses["loss_cls"] * float("nan")}
            loss = losses["loss_cls"] + losses["loss_box"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            grad_norm = None
            if tc.grad_clip > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            nxt = next(batches, None)
            bad = ~torch.isfinite(loss.detach())
            if grad_norm is not None and tc.amp != "fp16":  # under fp16 the scaler skips inf-gradient steps itself
                bad = bad | ~torch.isfinite(grad_norm)
            flags = _all_reduce(torch.stack([bad.float(), torch.tensor(float(nxt is None), device=device)]))
            if bool(flags[0]):
                message = _nonfinite_message(step, losses, grad_norm)
                logger.error("rank %d: %s", rank, message)
                tracker.set_tag("retina.error", message[:5000])
                return {NONFINITE_KEY: message, "step": step}
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            epoch_steps += 1
            window += torch.stack(
                [loss.detach(), losses["loss_cls"].detach(), losses["loss_box"].detach(),
                 grad_norm.detach() if grad_norm is not None else torch.zeros((), device=device)]
            ).float()  # fmt: skip
            window_steps += 1
            if step % tc.log_every == 0 or step == tc.max_steps:
                sums = _all_reduce(window.clone(), dist.ReduceOp.SUM) / (window_steps * world)
                elapsed = time.perf_counter() - window_start
                last_train = {
                    "train/loss": float(sums[0]),
                    "train/loss_cls": float(sums[1]),
                    "train/loss_box": float(sums[2]),
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/images_per_s": window_steps * cfg.data.batch_size / max(elapsed, 1e-9),
                    "train/epoch": epoch + 1,
                }
                if tc.grad_clip > 0:
                    last_train["train/grad_norm"] = float(sums[3])
                tracker.log_metrics(last_train, step)
                if rank == 0:
                    logger.info("step %d/%d %s", step, tc.max_steps,
                                " ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in last_train.items()))  # fmt: skip
                window.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if step >= tc.max_steps or bool(flags[1]):
                break
            batch = nxt
        epoch += 1
        epoch_time = time.perf_counter() - epoch_start

        # 4. evaluation, checkpoint, report (every rank reports; rank 0 attaches the checkpoint)
        if epoch % tc.eval_every_epochs != 0 and step < tc.max_steps:
            continue
        eval_start = time.perf_counter()
        result = evaluate(
            model,
            val_data.iter_torch_batches(batch_size=cfg.data.val_batch_size, collate_fn=collate),
            coco_ids=coco_ids,
            load_gt=load_gt,
            device=device,
            autocast=_autocast(tc.amp, device),
            num_samples=tc.num_logged_images if step >= tc.max_steps else 0,
        )
        metrics = {
            **last_train,
            **result.metrics(),
            "step": step,
            "epoch": epoch,
            "train/epoch_images_per_s": epoch_steps * cfg.data.batch_size / max(epoch_time, 1e-9),
            "val/seconds": time.perf_counter() - eval_start,
        }
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            continue
        _log_evaluation(tracker, result, metrics, step, epoch, names, class_names)
        state = TrainState(
            step=step, epoch=epoch, config=to_dict(cfg), label_map=label_map, model=model.state_dict(),
            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler.is_enabled() else None, metrics=result.metrics(),
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as ckpt_dir:
            save_checkpoint(ckpt_dir, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir))
        logger.info("epoch %d step %d: %s", epoch, step, {k: round(v, 4) for k, v in result.metrics().items()})
    return {"step": step}


def _log_evaluation(
    tracker: RunLogger,
    result: EvalResult,
    metrics: dict[str, Any],
    step: int,
    epoch: int,
    names: list[str],
    class_names: dict[int, str],
) -> None:
    """Rank 0: val metrics (also per class and class-agnostic, to MLflow only: Tune's table stays the summary),
    the evaluation report, and (at the end) a few val images with boxes."""
    per_class = per_class_rows(result.coco, class_names)
    val = {k: v for k, v in metrics.items() if k.startswith("val/")}
    extra = {**per_class_metrics(per_class, "val/"), **agnostic_metrics(result.coco.agnostic, "val/")}
    tracker.log_metrics({**val, **extra}, step)
    report = {
        "step": step,
        "epoch": epoch,
        "metrics": result.coco.metrics,
        "undefined_metrics": result.coco.undefined,
        "per_class": per_class,
        "agnostic": result.coco.agnostic,
        "num_images": result.num_images,
        "num_detections": result.num_detections,
    }
    tracker.log_dict(report, "evaluation/report.json")
    coco = result.coco
    text = "\n".join([coco.report, per_class_table(per_class), agnostic_line(coco.agnostic, coco.metrics)])
    tracker.log_text(text, "evaluation/cocoeval.txt")
    for sample in result.samples:
        fig = plots.detections_figure(sample, names)
        tracker.log_figure(fig, f"val_images/image_{sample.image_id:06d}.png")
        plots.close(fig)
