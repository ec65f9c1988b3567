"""One optimizer step of the worker loop (pipelines/training/step.py) and the log window's averages
(pipelines/training/metrics.py), in a single process: torch.distributed is not initialised, so every collective
is a no-op and the window's mean is over steps only. Fast: no Ray session (the parts are put together by hand)."""

from __future__ import annotations

import pytest
import torch

from pipelines import names
from pipelines.training.distributed import all_gather_objects, all_reduce, is_distributed
from pipelines.training.metrics import MetricWindow
from pipelines.training.optim import WarmupMultiStepLR, build_optimizer
from pipelines.training.settings import TrainConfig
from pipelines.training.step import LossModule, StepResult, TrainingParts, apply_update, autocast, forward_backward
from retina.config import ModelConfig
from retina.model import build_retinanet


def _step_result(loss_cls: float, loss_box: float, grad_norm: float | None) -> StepResult:
    losses = {"loss_cls": torch.tensor(loss_cls), "loss_box": torch.tensor(loss_box)}
    norm = None if grad_norm is None else torch.tensor(grad_norm)
    return StepResult(losses, losses["loss_cls"] + losses["loss_box"], norm, torch.tensor(False))


def test_collectives_are_no_ops_in_one_process():
    assert not is_distributed()
    t = torch.tensor([1.0, 2.0])
    assert all_reduce(t) is t and t.tolist() == [1.0, 2.0]
    assert all_gather_objects({"rank": 0}) == [{"rank": 0}]


def test_metric_window_averages_over_the_steps_of_the_window():
    window = MetricWindow(torch.device("cpu"), world=1, global_batch=4)
    window.add(_step_result(1.0, 0.5, 3.0))
    window.add(_step_result(3.0, 1.5, 5.0))
    metrics = window.flush(lr=0.01, epoch=2, with_grad_norm=True)
    assert metrics[names.TRAIN_LOSS] == pytest.approx(3.0)  # mean of 1.5 and 4.5
    assert metrics[names.TRAIN_LOSS_CLS] == pytest.approx(2.0)
    assert metrics[names.TRAIN_LOSS_BOX] == pytest.approx(1.0)
    assert metrics[names.TRAIN_GRAD_NORM] == pytest.approx(4.0)
    assert (metrics[names.TRAIN_LR], metrics[names.TRAIN_EPOCH]) == (0.01, 2)
    assert (metrics[names.TRAIN_WORLD_SIZE], metrics[names.TRAIN_GLOBAL_BATCH]) == (1, 4)
    assert metrics[names.TRAIN_IMAGES_PER_S] > 0
    assert all(k.startswith("train/") for k in metrics)

    # the next window starts empty; without clipping there is no gradient norm to log
    window.add(_step_result(0.25, 0.25, None))
    metrics = window.flush(lr=0.001, epoch=3, with_grad_norm=False)
    assert metrics[names.TRAIN_LOSS] == pytest.approx(0.5) and names.TRAIN_GRAD_NORM not in metrics
    assert window.flush(lr=0.001, epoch=3, with_grad_norm=False)[names.TRAIN_LOSS] == 0.0  # no step: no division


@pytest.fixture(autouse=True)
def _eager_focal_loss(monkeypatch):
    """The loss backend is not what these tests are about: skip Inductor's compile (tens of seconds on 2 cores)."""
    monkeypatch.setenv("RETINA_FOCAL_LOSS", "eager")


def _parts(grad_clip: float) -> TrainingParts:
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=2)
    cfg.backbone.name, cfg.backbone.width, cfg.backbone.norm, cfg.backbone.fpn_channels = "resnet10", 8, "bn", 16
    cfg.head.num_convs = 1
    model = build_retinanet(cfg).train()
    train = TrainConfig(base_lr=0.01, warmup_iters=0, lr_steps=[100], grad_clip=grad_clip)
    optimizer = build_optimizer(model, train, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    return TrainingParts(model, LossModule(model), optimizer, WarmupMultiStepLR(optimizer, train),
                         torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), train, params)  # fmt: skip


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor(
        [[[10.0, 12.0, 60.0, 70.0], [0.0, 0.0, 0.0, 0.0]], [[30.0, 20.0, 100.0, 90.0], [5, 5, 40, 40]]]
    )
    labels = torch.tensor([[0, -1], [1, 0]])  # -1: a padding row
    return {"images": torch.randn(2, 3, 128, 128, generator=g), "gt_boxes": boxes, "gt_labels": labels}


def test_forward_backward_then_apply_update_steps_the_weights_and_the_schedule():
    parts = _parts(grad_clip=10.0)
    before = [p.detach().clone() for p in parts.params]
    result = forward_backward(parts, _batch())
    assert not bool(result.bad) and torch.isfinite(result.loss)
    assert float(result.loss.detach()) == pytest.approx(
        float(result.losses["loss_cls"]) + float(result.losses["loss_box"])
    )
    assert result.grad_norm is not None and float(result.grad_norm) > 0
    assert all(torch.equal(b, p) for b, p in zip(before, parts.params, strict=True))  # not stepped yet
    apply_update(parts)
    assert any(not torch.equal(b, p) for b, p in zip(before, parts.params, strict=True))
    assert parts.scheduler.last_epoch == 1


def test_an_injected_nan_is_flagged_before_any_update():
    parts = _parts(grad_clip=0.0)  # no clipping: the loss alone raises the flag
    result = forward_backward(parts, _batch(), inject_nan=True)
    assert bool(result.bad) and result.grad_norm is None
    assert torch.isnan(result.losses["loss_cls"]) and torch.isfinite(result.losses["loss_box"])


def test_autocast_follows_train_amp():
    cpu = torch.device("cpu")
    with autocast("none", cpu):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("bf16", cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_bf16_on_a_cpu_that_emulates_it_is_warned_about(caplog):
    from pathlib import Path

    from pipelines.training.step import NATIVE_BF16_FLAGS, warn_if_bf16_is_emulated

    native = any(flag in Path("/proc/cpuinfo").read_text() for flag in NATIVE_BF16_FLAGS)
    with caplog.at_level("WARNING", logger="retina.train"):
        warn_if_bf16_is_emulated("none", torch.device("cpu"))
        assert not caplog.records
        warn_if_bf16_is_emulated("bf16", torch.device("cpu"))
    assert bool(caplog.records) == (not native)
    assert all("train.amp=auto or none" in r.getMessage() for r in caplog.records)


def test_auto_precision_is_bf16_only_where_it_runs_natively():
    from pathlib import Path

    from pipelines.training.step import NATIVE_BF16_FLAGS, resolve_amp

    native = any(flag in Path("/proc/cpuinfo").read_text() for flag in NATIVE_BF16_FLAGS)
    assert resolve_amp("auto", torch.device("cpu")) == ("bf16" if native else "none")
    assert [resolve_amp(a, torch.device("cpu")) for a in ("none", "bf16", "fp16")] == ["none", "bf16", "fp16"]
