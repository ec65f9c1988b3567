"""Fast checks of the training pipeline's parts: lr schedule, optimizer, checkpoints (weights_only) and the model
rebuilt from one, the driver's absolute paths."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle

import pytest
import torch

from pipelines.config import load_config
from pipelines.training.checkpoint import (
    STATE_FILE,
    CheckpointError,
    TrainState,
    load_checkpoint,
    model_from_state,
    save_checkpoint,
)
from pipelines.training.optim import WarmupMultiStepLR, build_optimizer, lr_factor, scaled_lr
from pipelines.training.settings import TrainConfig
from retina.config import ModelConfig
from retina.typed_config import ConfigError, to_dict


def test_linear_scaling_rule():
    t = TrainConfig()
    assert scaled_lr(t, 16) == pytest.approx(0.01)
    assert scaled_lr(t, 64) == pytest.approx(0.04)
    assert scaled_lr(t, 8) == pytest.approx(0.005)


def test_warmup_then_step_decay():
    t = TrainConfig(warmup_iters=100, warmup_factor=0.1, lr_steps=[1000, 2000], lr_gamma=0.1)
    assert lr_factor(0, t) == pytest.approx(0.1)
    assert lr_factor(50, t) == pytest.approx(0.1 * 0.5 + 0.5)  # linear from 0.1 to 1
    assert lr_factor(100, t) == pytest.approx(1.0)
    assert lr_factor(999, t) == pytest.approx(1.0)
    assert lr_factor(1000, t) == pytest.approx(0.1)
    assert lr_factor(2500, t) == pytest.approx(0.01)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_choice_scaled_lr_and_weights_only_state(name):
    t = TrainConfig(optimizer=name, base_lr=0.002, weight_decay=0.05)
    model = torch.nn.Linear(2, 1)
    opt = build_optimizer(model, t, 32)
    assert type(opt) is {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.004) and opt.param_groups[0]["weight_decay"] == 0.05
    model(torch.ones(3, 2)).sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    build_optimizer(torch.nn.Linear(2, 1), t, 32).load_state_dict(torch.load(buf, weights_only=True))


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config(None, ["train.optimizer=adam"])


def test_scheduler_restored_from_state_continues_the_schedule():
    t = TrainConfig(warmup_iters=4, warmup_factor=0.25, lr_steps=[6], lr_gamma=0.1)
    model = torch.nn.Linear(2, 1)
    opt = build_optimizer(model, t, 16)
    sched = WarmupMultiStepLR(opt, t)
    for _ in range(5):
        opt.step()
        sched.step()
    state = {"opt": opt.state_dict(), "sched": sched.state_dict()}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = torch.load(buf, weights_only=True)  # the scheduler state is plain data
    opt2 = build_optimizer(torch.nn.Linear(2, 1), t, 16)
    sched2 = WarmupMultiStepLR(opt2, t)
    opt2.load_state_dict(restored["opt"])
    sched2.load_state_dict(restored["sched"])
    for s in (sched, sched2):
        s.optimizer.step()
        s.step()
    assert sched2.last_epoch == sched.last_epoch == 6
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    assert sched2.get_last_lr() == pytest.approx([0.01 * 0.1])


def _state(**model) -> TrainState:
    return TrainState(step=3, epoch=1, config={"run": {"name": "x"}}, label_map=[{"id": 7, "name": "a", "label": 0}],
                      model=model or {"w": torch.ones(2)})  # fmt: skip


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    save_checkpoint(tmp_path, _state())
    state = load_checkpoint(tmp_path)
    assert state.step == 3 and state.epoch == 1
    assert state.config == {"run": {"name": "x"}}
    assert state.label_map == [{"id": 7, "name": "a", "label": 0}]
    assert torch.equal(state.model["w"], torch.ones(2))


def test_checkpoint_with_nan_weights_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="step 3: non-finite weights in \\['w'\\]"):
        save_checkpoint(tmp_path, _state(w=torch.tensor([1.0, float("nan")])))
    assert not (tmp_path / STATE_FILE).exists()


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_crafted_pickle_checkpoint_never_runs(tmp_path, monkeypatch):
    """A checkpoint carrying code is rejected by weights_only=True before the payload runs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    with open(tmp_path / "ckpt" / STATE_FILE, "wb") as f:
        pickle.dump({"format": "retina-checkpoint/1", "model": _Payload()}, f)
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "ckpt")
    assert not (tmp_path / "pwned").exists()


def test_truncated_checkpoint_names_the_path(tmp_path):
    save_checkpoint(tmp_path, _state())
    data = (tmp_path / STATE_FILE).read_bytes()
    (tmp_path / STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(tmp_path / STATE_FILE)):
        load_checkpoint(tmp_path)


def _tiny_model_config(num_convs: int = 1) -> ModelConfig:
    m = ModelConfig(num_classes=2)
    m.backbone.name, m.backbone.width, m.backbone.norm, m.backbone.fpn_channels = "resnet10", 8, "bn", 16
    m.head.num_convs = num_convs
    return m


def test_model_rebuilt_from_a_checkpoint_s_own_config(tmp_path):
    from retina.model import build_retinanet

    torch.manual_seed(0)
    cfg = _tiny_model_config()
    cfg.backbone.weights = str(tmp_path / "no-such-imagenet-file.pt")  # never read: the weights are in the state
    trained = build_retinanet(dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, weights=None)))
    save_checkpoint(tmp_path, TrainState(step=1, epoch=0, config={"model": to_dict(cfg)}, label_map=[],
                                         model=trained.state_dict()))  # fmt: skip
    model = model_from_state(load_checkpoint(tmp_path))
    assert model.cfg.num_classes == 2 and model.cfg.backbone.weights is None
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    other = TrainState(step=7, epoch=0, config={"model": to_dict(_tiny_model_config(num_convs=2))}, label_map=[],
                       model=trained.state_dict())  # fmt: skip
    with pytest.raises(CheckpointError, match="checkpoint at step 7: weights do not fit its config"):
        model_from_state(other)


def test_driver_makes_local_data_paths_absolute(tmp_path, monkeypatch):
    from pipelines.training.run import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.root=data/x", "data.train_shards=s3://bucket/train", "data.val_shards=val"])
    out = with_absolute_paths(cfg)
    assert out.data.root == str(tmp_path / "data" / "x") and out.data.val_shards == str(tmp_path / "val")
    assert out.data.train_shards == "s3://bucket/train"  # object storage is no working-directory path
    assert cfg.data.root == "data/x"  # a new config, the given one is unchanged
