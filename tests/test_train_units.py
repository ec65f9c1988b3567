"""Fast checks of the training pipeline's parts: lr schedule, checkpoints (weights_only), tracking URI, upload list."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch

from pipelines.checkpointing import CheckpointError, TrainState, load_checkpoint, save_checkpoint
from pipelines.optim import WarmupMultiStepLR, build_optimizer, lr_factor, scaled_lr
from pipelines.tracking import resolve_tracking_uri
from retina.config import ConfigError, TrainConfig, load_config


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
    assert not (tmp_path / "state.pt").exists()


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_crafted_pickle_checkpoint_never_runs(tmp_path, monkeypatch):
    """G1: a checkpoint carrying code is rejected by weights_only=True before the payload runs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    with open(tmp_path / "ckpt" / "state.pt", "wb") as f:
        pickle.dump({"format": "retina-checkpoint/1", "model": _Payload()}, f)
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "ckpt")
    assert not (tmp_path / "pwned").exists()


def test_truncated_checkpoint_names_the_path(tmp_path):
    save_checkpoint(tmp_path, _state())
    data = (tmp_path / "state.pt").read_bytes()
    (tmp_path / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(tmp_path / "state.pt")):
        load_checkpoint(tmp_path)


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("") == f"sqlite:///{tmp_path}/mlflow.db"  # absolute: workers run elsewhere
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri("") == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == f"sqlite:///{tmp_path}/x.db"


def test_job_upload_excludes_stores_but_keeps_packages():
    from ray._private.thirdparty.pathspec import PathSpec

    from cluster.runtime_env import EXCLUDES

    spec = PathSpec.from_lines("gitwildmatch", EXCLUDES)  # how Ray matches runtime_env excludes
    for path in (".venv/bin/python", "data/sample/images/000001.jpg", "runs/demo/x", "mlflow.db", "mlruns/0/a"):
        assert spec.match_file(path), path
    for path in ("retina/data/coco.py", "pipelines/data.py", "pipelines/train.py", "configs/smoke.yaml"):
        assert not spec.match_file(path), path
