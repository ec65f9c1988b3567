"""The run config of a training job (`pipelines.config.Config`): every layer's sections composed (model, data,
train, scaling, run, tracking), the paper's defaults, the shipped configs, and clear errors for bad keys and values,
also across sections."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import Config, ConfigError, config_from_dict, load_config
from retina.typed_config import flatten, to_dict

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_compose_every_section():
    cfg = Config()
    assert list(to_dict(cfg)) == ["model", "data", "train", "scaling", "run", "tracking"]
    assert cfg.data.batch_size == 16 and cfg.scaling.num_workers == 8 and cfg.scaling.use_gpu
    assert cfg.run.num_to_keep >= 1 and cfg.tracking.tracking_uri == ""
    cfg.check()  # the defaults pass their own rules


def test_defaults_are_the_paper_recipe():
    t, d = Config().train, Config().data
    assert (t.base_lr, t.base_batch_size, d.batch_size) == (0.01, 16, 16)
    assert (t.momentum, t.weight_decay) == (0.9, 1e-4)
    assert t.max_steps == 90_000 and t.lr_steps == [60_000, 80_000] and t.lr_gamma == 0.1


def test_each_section_checks_its_own_rules():
    from pipelines.data.settings import DataConfig
    from pipelines.training.settings import TrainConfig, check_lr

    with pytest.raises(ConfigError, match="data.flip_prob"):
        DataConfig(flip_prob=2.0).check()
    with pytest.raises(ConfigError, match="train.optimizer"):
        TrainConfig(optimizer="adam").check()
    with pytest.raises(ConfigError, match="k: the learning rate must be a finite number > 0"):
        check_lr(float("inf"), "k")


@pytest.mark.parametrize("name", ["smoke", "demo", "coco_r50_1x"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, Config)
    assert cfg.data.batch_size % cfg.scaling.num_workers == 0


def test_coco_config_is_the_paper_recipe():
    cfg = load_config(CONFIGS / "coco_r50_1x.yaml")
    assert cfg.data.batch_size == 16 and cfg.train.base_lr == 0.01
    assert cfg.train.max_steps == 90_000 and cfg.train.lr_steps == [60_000, 80_000]
    assert cfg.model.backbone.name == "resnet50" and cfg.model.backbone.fpn_channels == 256
    assert cfg.model.input.min_size == 800 and cfg.train.amp == "bf16" and cfg.scaling.use_gpu


def test_a_search_config_is_not_a_run_config():
    with pytest.raises(ConfigError, match=r"search_sample\.yaml: unknown config key\(s\): tuning"):
        load_config(CONFIGS / "search_sample.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.bogus=1", "unknown config key(s): train.bogus"),
        ("bogus.key=1", "unknown config key(s): bogus"),
        ("train.max_steps=lots", "train.max_steps: expected an integer"),
        ("train.lr_steps=[100, 50]", "train.lr_steps: must be increasing"),
        ("train.amp=fp8", "train.amp: must be none, bf16, fp16 or auto"),
        ("scaling.num_workers=0", "scaling.num_workers: must be >= 1"),
        ("scaling.resources_per_worker={GPU: 1}", "scaling.resources_per_worker: CPU/GPU come from"),
        ("scaling.resources_per_worker={A100: many}", "scaling.resources_per_worker.A100: expected a number"),
        ("run.name=a/b", "run.name: must be 1-128 characters"),
        ("run.num_to_keep=0", "run.num_to_keep: must be >= 1"),
        ("tracking.alias=latest", "tracking.alias"),
        ("tracking.alias=v3", "tracking.alias"),
        ("tracking.alias_min_ap=2", "tracking.alias_min_ap: must be in [0, 1]"),
        # the test-only fault hooks are not config keys (they come from RETINA_TEST_FAULTS: test_faults.py)
        ("train.fail_at_step=3", "unknown config key(s): train.fail_at_step"),
        ("train.nan_at_step=3", "unknown config key(s): train.nan_at_step"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", "\\[").replace("(", "\\(").replace(")", "\\)")):
        load_config(CONFIGS / "smoke.yaml", [override])


def test_cross_section_checks():
    with pytest.raises(ConfigError, match="data.batch_size: 4 images per step do not split evenly"):
        load_config(CONFIGS / "smoke.yaml", ["scaling.num_workers=3"])
    with pytest.raises(ConfigError, match="train.amp: fp16 needs scaling.use_gpu"):
        load_config(CONFIGS / "smoke.yaml", ["train.amp=fp16"])


def test_error_names_the_file():
    with pytest.raises(ConfigError, match="smoke.yaml: unknown config key"):
        load_config(CONFIGS / "smoke.yaml", ["train.nope=1"])


def test_exponent_floats_read_as_numbers_only_where_a_number_is_expected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {base_lr: 1e-3, weight_decay: 5E-5}\ntracking: {experiment: 1e-3}\n")
    cfg = load_config(path, ["tracking.alias_min_ap=2.5e-1"])
    assert (cfg.train.base_lr, cfg.train.weight_decay, cfg.tracking.alias_min_ap) == (1e-3, 5e-5, 0.25)
    assert cfg.tracking.experiment == "1e-3"  # a string field keeps the text
    with pytest.raises(ConfigError, match="train.base_lr: expected a number, got '1e-'"):
        load_config(path, ["train.base_lr=1e-"])


def test_overrides_are_typed_and_flatten_for_mlflow():
    cfg = load_config(CONFIGS / "smoke.yaml", ["train.base_lr=1", "scaling.resources_per_worker={A100: 1}"])
    assert cfg.train.base_lr == 1.0 and isinstance(cfg.train.base_lr, float)
    flat = flatten(to_dict(cfg))
    assert flat["train.base_lr"] == 1.0 and flat["scaling.resources_per_worker.A100"] == 1.0
    assert flat["model.backbone.name"] == "resnet18"


def test_plain_dict_round_trip_as_checkpoints_store_it():
    cfg = load_config(CONFIGS / "smoke.yaml", ["run.name=again"])
    assert config_from_dict(to_dict(cfg)) == cfg
    changed = config_from_dict(to_dict(cfg), ["train.max_steps=2"])
    assert changed.train.max_steps == 2 and changed.run.name == "again"
    with pytest.raises(ConfigError, match="scaling.num_workers: must be >= 1"):
        config_from_dict(to_dict(cfg), ["scaling.num_workers=0"])  # checked like a loaded file


def test_cli_rejects_a_bad_key_before_starting_anything():
    """The command as users type it: exit 2 and one line naming the key, before Ray or MLflow start."""
    import subprocess
    import sys

    from pipelines.cli import EXIT_BAD_INPUT

    command = [sys.executable, "pipelines/train.py", "--config", "configs/smoke.yaml", "--set", "train.max_stepz=5"]
    proc = subprocess.run(command, cwd=CONFIGS.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert proc.stderr.startswith("train: error: ") and "unknown config key(s): train.max_stepz" in proc.stderr
    assert "Ray" not in proc.stderr and "mlflow" not in proc.stderr.lower()


def test_ctrl_c_ends_a_command_with_one_line_and_exit_130(capsys):
    from pipelines import cli

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert cli.run_command("train", interrupted, resumable=True) == cli.EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == (
        "train: interrupted: run the same command again to continue from the latest checkpoint\n"
    )
    assert cli.run_command("predict", interrupted) == 130
    assert capsys.readouterr().err == "predict: interrupted\n"
