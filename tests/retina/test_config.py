"""The library's own config section (model) with the paper's defaults, and the one loader every layer composes its
config with (`retina.typed_config`): typed keys, errors naming the dotted key and the file, a section's ``check()``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

import retina
from retina import config as rc
from retina import typed_config as tc
from retina.config import ModelConfig
from retina.typed_config import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_are_the_paper_model():
    m = ModelConfig()
    assert m.backbone.name == "resnet50" and m.input.min_size == 800 and m.num_classes == 80
    assert (m.loss.gamma, m.loss.alpha, m.head.prior) == (2.0, 0.25, 0.01)
    m.check()


def test_the_package_exports_the_model_config_loader():
    assert retina.load_model_config is rc.load_model_config
    assert not hasattr(retina, "Config") and not hasattr(rc, "Config")  # the run config lives in pipelines


def test_load_model_config_reads_only_the_model_section():
    m = rc.load_model_config(CONFIGS / "demo.yaml")
    assert isinstance(m, ModelConfig) and m.backbone.name == "resnet10"
    m = rc.load_model_config(CONFIGS / "smoke.yaml", ["head.prior=0.05"])
    assert m.backbone.name == "resnet18" and m.head.prior == 0.05 and m.num_classes == 5
    with pytest.raises(ConfigError, match=r"smoke\.yaml: model\.head\.prior: expected a number, got 'x'"):
        rc.load_model_config(CONFIGS / "smoke.yaml", ["head.prior=x"])
    with pytest.raises(ConfigError, match=r"head\.prior: π must be in \(0, 1\)"):
        rc.load_model_config(CONFIGS / "smoke.yaml", ["head.prior=1.5"])  # ModelConfig.check: the model's rules
    with pytest.raises(ConfigError, match=r"cannot read config file"):
        rc.load_model_config(CONFIGS / "no-such.yaml")


def test_load_model_config_errors_name_the_dotted_key_once():
    with pytest.raises(ConfigError, match=r"smoke\.yaml: model\.head\.prior: π must be in \(0, 1\)"):
        rc.load_model_config(CONFIGS / "smoke.yaml", ["head.prior=1.5"])
    with pytest.raises(ConfigError, match=r"smoke\.yaml: unknown config key\(s\): model\.head\.priro"):
        rc.load_model_config(CONFIGS / "smoke.yaml", ["head.priro=1"])


@dataclass
class _Note:
    text: str = ""
    weight: float = 1.0

    def check(self) -> None:  # only the top-level class's check() runs; sections are checked from there
        tc.require(self.weight >= 0, "note.weight", "must be >= 0")


@dataclass
class _Recipe:
    max_steps: int = 10
    base_lr: float = 0.01
    lr_steps: list[int] = field(default_factory=lambda: [5, 8])
    optimizer: str = "sgd"

    def check(self) -> None:
        tc.require(self.lr_steps == sorted(self.lr_steps), "train.lr_steps", "must be increasing")
        tc.require(self.optimizer in ("sgd", "adamw"), "train.optimizer", "must be sgd or adamw")


@dataclass
class _LayerConfig:
    """What a layer above the library composes: the library's model section plus its own."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: _Recipe = field(default_factory=_Recipe)
    note: _Note = field(default_factory=_Note)

    def check(self) -> None:
        for section in (self.model, self.train, self.note):
            section.check()


def test_loader_builds_any_composed_class_and_runs_its_check(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {num_classes: 3}\ntrain: {base_lr: 1e-3}\nnote: {text: 1e-3}\n")
    cfg = tc.load_config(path, ["note.weight=2.5e-1"], cls=_LayerConfig)
    assert isinstance(cfg, _LayerConfig) and cfg.model.num_classes == 3
    # PyYAML reads 1e-3 as a string: a number where a number is expected, the text where a string is
    assert (cfg.train.base_lr, cfg.note.weight, cfg.note.text) == (1e-3, 0.25, "1e-3")
    assert tc.load_config(None, cls=_LayerConfig) == _LayerConfig()
    with pytest.raises(ConfigError, match=r"c\.yaml: note\.weight: must be >= 0"):
        tc.load_config(path, ["note.weight=-1"], cls=_LayerConfig)
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key\(s\): scaling"):
        tc.load_config(path, ["scaling.num_workers=2"], cls=_LayerConfig)  # not a section of this class
    assert tc.config_from_dict(tc.to_dict(cfg), cls=_LayerConfig) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.bogus=1", "unknown config key(s): train.bogus"),
        ("train.max_steps=lots", "train.max_steps: expected an integer"),
        ("train.max_steps=true", "train.max_steps: expected an integer"),
        ("train.lr_steps=[100, 50]", "train.lr_steps: must be increasing"),
        ("train.optimizer=adam", "train.optimizer: must be sgd or adamw"),
        ("model.backbone=resnet50", "model.backbone: expected a section"),
        ("model.loss.gamma=-1", "model.loss.gamma: γ must be >= 0"),
        ("train", "override 'train' must look like section.key=value"),
        ("train..lr=1", "has an empty key"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        tc.config_from_dict({}, [override], cls=_LayerConfig)
    assert message in str(info.value)


def test_range_rules_shared_with_the_search_space():
    rc.check_gamma(0.0, "k")
    rc.check_alpha(-1.0, "k")  # < 0 disables α-weighting
    with pytest.raises(ConfigError, match="k: α must be in \\[0, 1\\]"):
        rc.check_alpha(-1.0, "k", allow_disabled=False)
    with pytest.raises(ConfigError, match="k: π must be in"):
        rc.check_prior(0.0, "k")


def test_flatten_for_mlflow_params():
    flat = tc.flatten(tc.to_dict(_LayerConfig()))
    assert flat["model.backbone.name"] == "resnet50" and flat["train.lr_steps"] == [5, 8]
    assert flat["note.text"] == ""
