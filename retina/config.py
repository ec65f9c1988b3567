"""Typed configuration of the library's own sections (model, data, train) with the paper's defaults, and the
loader every layer shares.

One loader reads configuration: YAML files and ``--set section.key=value`` overrides are merged onto typed
dataclasses, and every key is checked against the field's type. An unknown key or a value of the wrong type is a
``ConfigError`` naming the dotted key, raised before anything expensive starts.

Each layer declares the sections it reads beside the code that reads them and composes them into one typed
config: ``pipelines.config.Config`` adds scaling, run and tracking (Ray Train, MLflow), ``tuning.config.SearchConfig``
adds tuning (Ray Tune). A config class may define ``check()``: the loader calls it after building the object, so
the range rules of a section live with the section.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Exponent floats (1e-4, 2.5E3): PyYAML follows YAML 1.1 and reads them as strings unless they hold a dot.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration key is unknown, ill-typed or out of range; the message names the dotted key."""


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # resnet10 | resnet18 | resnet34 | resnet50 | resnet101 | resnext101_32x8d
    # Planes of the stem and first stage; later stages double them. 64 = the standard ResNet (ImageNet weights
    # need it); 32 quarters the compute and the parameters, for small models trained from scratch.
    width: int = 64
    weights: str | None = None  # path to an ImageNet state dict (torchvision layout); None = random init
    norm: str = "frozen_bn"  # frozen_bn (fine-tuning from ImageNet) | bn (from scratch) | gn
    trainable_layers: int = 3  # how many of (conv1, layer1..layer4) train, counted from the top, 0..5
    fpn_channels: int = 256
    # The paper builds P6 from C5; torchvision's v1 RetinaNet builds it from P5 (from_torchvision sets "p5").
    p6_input: str = "c5"  # c5 | p5


@dataclass
class AnchorConfig:
    sizes: list[float] = field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])  # base size P3..P7
    scales: list[float] = field(default_factory=lambda: [1.0, 2 ** (1 / 3), 2 ** (2 / 3)])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # height / width
    # torchvision truncates the scaled sizes to integers (int(32 * 2**(1/3)) = 40); from_torchvision sets this.
    integer_sizes: bool = False


@dataclass
class MatcherConfig:
    fg_iou: float = 0.5  # IoU >= fg_iou: foreground
    bg_iou: float = 0.4  # IoU < bg_iou: background; between the two: ignored
    allow_low_quality: bool = True  # each ground truth keeps its best anchor(s) even below fg_iou


@dataclass
class HeadConfig:
    num_convs: int = 4
    prior: float = 0.01  # π: the class-output bias starts at -log((1 - π) / π)
    norm: str = "none"  # none (paper) | gn (GroupNorm(32), helps training from scratch)


@dataclass
class LossConfig:
    gamma: float = 2.0
    alpha: float = 0.25  # < 0 disables α-weighting
    box_loss: str = "smooth_l1"  # l1 | smooth_l1 | giou
    smooth_l1_beta: float = 0.11  # Detectron's RetinaNet value
    box_weight: float = 1.0


@dataclass
class PostprocessConfig:
    score_thresh: float = 0.05
    topk_candidates: int = 1000  # per level, before NMS
    nms_thresh: float = 0.5  # class-wise
    detections_per_img: int = 100


@dataclass
class InputConfig:
    min_size: int = 800  # shorter side after resizing
    max_size: int = 1333  # longer side limit
    # Stride of P7 is 128: padding to it gives every level an integer grid and exact anchor strides.
    size_divisible: int = 128
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class ModelConfig:
    num_classes: int = 80
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    input: InputConfig = field(default_factory=InputConfig)

    def check(self) -> None:
        validate_model(self)


@dataclass
class DataConfig:
    # Sample data: when train/val shards are missing and `synthetic_images` > 0, the pipeline generates the
    # synthetic dataset under `root` and prepares its shards on first use.
    root: str = "data/sample"
    train_shards: str = "data/sample/shards/train"
    val_shards: str = "data/sample/shards/val"
    synthetic_images: int = 0  # 0: never generate; the shards must exist
    synthetic_seed: int = 0
    train_min_sizes: list[int] = field(default_factory=list)  # multi-scale training; empty = model.input.min_size
    flip_prob: float = 0.5
    batch_size: int = 16  # global images per step, split across workers
    val_batch_size: int = 8  # per worker
    synthetic_val_images: int = 0  # size of the generated val split (its own seed: synthetic_seed + 1)
    # rows: an exact random_shuffle of the train rows every epoch (an all-to-all barrier at each epoch start);
    # files: a new shard order every epoch, rows permuted within each decode task of 8 batches (streamed, no
    # barrier; mixing is only as fine as the shards: prepare with a smaller --rows-per-shard for small datasets)
    shuffle: str = "rows"
    # with shuffle "files": one Ray Data execution streams every epoch of the run, so the next epoch's first batches
    # are decoded while the current one ends; false: a new execution per epoch (an idle pipeline at each start)
    stream_epochs: bool = True


@dataclass
class TrainConfig:
    """The optimisation recipe. Defaults: the paper's COCO 1x schedule (Detectron's RetinaNet settings)."""

    max_steps: int = 90_000  # optimizer steps (iterations); epochs follow from the data size
    base_lr: float = 0.01  # for `base_batch_size` images per step; scaled linearly with data.batch_size
    base_batch_size: int = 16
    optimizer: str = (
        "sgd"  # sgd (the paper: momentum + weight decay) | adamw (decoupled decay; short runs from scratch)
    )
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4
    warmup_iters: int = 500  # linear warm-up from warmup_factor * lr (Detectron: 500 iters from 1/3)
    warmup_factor: float = 1 / 3
    lr_steps: list[int] = field(default_factory=lambda: [60_000, 80_000])  # iterations where lr *= lr_gamma
    lr_gamma: float = 0.1
    grad_clip: float = 0.0  # max total gradient norm; 0 disables clipping (the paper does not clip)
    amp: str = "none"  # none | bf16 (autocast; GPU, or CPU with AVX-512 BF16 / AMX) | fp16 (+ GradScaler, GPU)
    seed: int = 0
    log_every: int = 20  # steps between loss/lr/throughput logs
    eval_every_epochs: int = 1  # evaluation (and a checkpoint) every N epochs, and always at the end
    num_logged_images: int = 4  # val images drawn with predicted and true boxes into MLflow
    # COCOeval of every evaluation but the last in a Ray task while training goes on; the val metrics and the
    # checkpoint are reported when it is done (pipelines/training/background_eval.py). false: the ranks wait
    background_eval: bool = True
    eval_task_cpus: float = 0.0  # CPUs the scoring task reserves (0: it shares the cores the workers hold)
    # fetch the first batch in a thread while the model is wrapped in DDP and restored. Off by default: on the
    # 2-core machine it reached the first step 3-4 s later, not sooner (benchmarks/training_stalls.py, twice)
    overlap_startup: bool = False


# ------------------------------------------------------------------------------------------------ loading


def _check_union(value: Any, tp: Any, key: str) -> Any:
    # The first member that accepts the value wins; the error names the whole union, not one member.
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _check_type(value, arg, key)
        except ConfigError:
            continue
    raise ConfigError(f"{key}: expected {tp}, got {value!r}")


def _check_list(value: Any, tp: Any, key: str) -> list[Any]:
    (item_tp,) = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]


def _check_dict(value: Any, tp: Any, key: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    key_tp, value_tp = typing.get_args(tp) or (Any, Any)
    return {_check_type(k, key_tp, key): _check_type(v, value_tp, f"{key}.{k}") for k, v in value.items()}


def _check_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    return value


def _check_int(value: Any, key: str) -> int:
    # bool is an int subclass, but `true` for a count is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return value


def _check_float(value: Any, key: str) -> float:
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads 1e-4 as a string; YAML 1.2 and users read a number
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return float(value)


def _check_str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


# Matched by identity (`tp is bool`), in this order, like the field annotations they check.
_SCALAR_CHECKS: tuple[tuple[type, Any], ...] = (
    (bool, _check_bool),
    (int, _check_int),
    (float, _check_float),
    (str, _check_str),
)


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return `value` coerced to `tp` (int → float allowed), or raise ConfigError naming `key`."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _check_union(value, tp, key)
    if origin is list:
        return _check_list(value, tp, key)
    if origin is dict:
        return _check_dict(value, tp, key)
    for scalar, check in _SCALAR_CHECKS:
        if tp is scalar:
            return check(value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return _from_dict(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key(s): {', '.join(where + k for k in unknown)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _check_type(value, hints[name], key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as YAML (numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from None
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def config_from_dict(data: dict[str, Any], overrides: Sequence[str] = (), *, cls: type) -> Any:
    """Build a typed config of class `cls` from a plain mapping plus dotted overrides; run its ``check()``."""
    merged = dict(data or {})
    for text in overrides:
        path, value = parse_override(text)
        merged = _merge(merged, _nest(path, value))
    cfg = _from_dict(cls, merged)
    if hasattr(cfg, "check"):
        cfg.check()
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file's top-level mapping; ConfigError naming the file when it cannot be read."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping")
    return data


def load_config(path: str | Path | None, overrides: Sequence[str] = (), *, cls: type) -> Any:
    """Load a YAML config file (or the defaults when `path` is None) as `cls` and apply overrides."""
    data = read_yaml(path) if path is not None else {}
    try:
        return config_from_dict(data, overrides, cls=cls)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


def load_model_config(path: str | Path, overrides: Sequence[str] = ()) -> ModelConfig:
    """Only the ``model`` section of a run config (for code that builds a model without Ray or MLflow).

    `overrides` are dotted keys inside the model section (``head.prior=0.5``); errors name ``model.<key>``."""
    merged = dict(read_yaml(path).get("model") or {})
    try:
        for text in overrides:
            key, value = parse_override(text)
            merged = _merge(merged, _nest(key, value))
        cfg = _from_dict(ModelConfig, merged, "model")
        cfg.check()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested sections to dotted keys (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


# ------------------------------------------------------------------------------------------------ checks

_BACKBONES = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnext101_32x8d")


def require(ok: bool, key: str, message: str) -> None:
    """The one form of a range rule: ConfigError('<dotted key>: <message>') unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


# The focal-loss hyperparameters' ranges, shared by the model's checks and the search space's (tuning/space.py).
def check_gamma(value: float, key: str) -> None:
    require(math.isfinite(value) and value >= 0, key, f"γ must be >= 0, got {value}")


def check_alpha(value: float, key: str, *, allow_disabled: bool = True) -> None:
    require(math.isfinite(value), key, f"must be a finite number, got {value!r}")
    if allow_disabled:
        require(value <= 1, key, f"α must be in [0, 1] (or < 0 to disable), got {value}")
    else:
        require(0 <= value <= 1, key, f"α must be in [0, 1] (a choice value < 0 disables α-weighting), got {value}")


def check_prior(value: float, key: str) -> None:
    require(0 < value < 1, key, f"π must be in (0, 1), got {value}")


def check_lr(value: float, key: str) -> None:
    require(math.isfinite(value) and value > 0, key, f"the learning rate must be a finite number > 0, got {value}")


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    b = m.backbone
    require(m.num_classes >= 1, f"{prefix}.num_classes", "must be >= 1")
    require(b.name in _BACKBONES, f"{prefix}.backbone.name", f"must be one of {_BACKBONES}")
    require(b.norm in ("frozen_bn", "bn", "gn"), f"{prefix}.backbone.norm", "must be frozen_bn, bn or gn")
    require(b.width >= 8, f"{prefix}.backbone.width", "must be >= 8")
    require(b.width == 64 or b.name != "resnext101_32x8d", f"{prefix}.backbone.width", "must be 64 for resnext")
    require(b.norm != "gn" or b.width % 32 == 0, f"{prefix}.backbone.width", "must be a multiple of 32 with gn")
    require(0 <= b.trainable_layers <= 5, f"{prefix}.backbone.trainable_layers", "must be in 0..5")
    require(b.fpn_channels >= 1, f"{prefix}.backbone.fpn_channels", "must be >= 1")
    require(b.p6_input in ("c5", "p5"), f"{prefix}.backbone.p6_input", "must be c5 or p5")
    a = m.anchors
    require(len(a.sizes) == 5, f"{prefix}.anchors.sizes", "needs one base size per level P3..P7 (5)")
    require(all(s > 0 for s in a.sizes + a.scales + a.aspect_ratios), f"{prefix}.anchors", "must be > 0")
    mt = m.matcher
    require(0 < mt.bg_iou <= mt.fg_iou <= 1, f"{prefix}.matcher", "needs 0 < bg_iou <= fg_iou <= 1")
    h = m.head
    check_prior(h.prior, f"{prefix}.head.prior")
    require(h.norm in ("none", "gn"), f"{prefix}.head.norm", "must be none or gn")
    require(h.num_convs >= 0, f"{prefix}.head.num_convs", "must be >= 0")
    lo = m.loss
    check_gamma(lo.gamma, f"{prefix}.loss.gamma")
    check_alpha(lo.alpha, f"{prefix}.loss.alpha")
    require(lo.box_loss in ("l1", "smooth_l1", "giou"), f"{prefix}.loss.box_loss", "must be l1, smooth_l1, giou")
    require(lo.smooth_l1_beta >= 0, f"{prefix}.loss.smooth_l1_beta", "must be >= 0")
    p = m.postprocess
    require(0 <= p.score_thresh < 1, f"{prefix}.postprocess.score_thresh", "must be in [0, 1)")
    require(p.topk_candidates >= 1, f"{prefix}.postprocess.topk_candidates", "must be >= 1")
    require(p.detections_per_img >= 1, f"{prefix}.postprocess.detections_per_img", "must be >= 1")
    i = m.input
    require(0 < i.min_size <= i.max_size, f"{prefix}.input", "needs 0 < min_size <= max_size")
    require(i.size_divisible >= 1, f"{prefix}.input.size_divisible", "must be >= 1")
    require(len(i.image_mean) == 3 and len(i.image_std) == 3, f"{prefix}.input", "mean/std need 3 values")
    require(all(s > 0 for s in i.image_std), f"{prefix}.input.image_std", "must be > 0")


def validate_data(d: DataConfig) -> None:
    require(0 <= d.flip_prob <= 1, "data.flip_prob", "must be in [0, 1]")
    require(d.batch_size >= 1 and d.val_batch_size >= 1, "data.batch_size", "must be >= 1")
    require(all(s > 0 for s in d.train_min_sizes), "data.train_min_sizes", "must be > 0")
    require(d.synthetic_images >= 0, "data.synthetic_images", "must be >= 0")
    require(d.synthetic_val_images >= 0, "data.synthetic_val_images", "must be >= 0")
    require(d.shuffle in ("rows", "files"), "data.shuffle", "must be rows or files")


def validate_train(t: TrainConfig) -> None:
    require(t.max_steps >= 1, "train.max_steps", "must be >= 1")
    check_lr(t.base_lr, "train.base_lr")
    require(t.base_batch_size >= 1, "train.base_batch_size", "must be >= 1")
    require(0 <= t.momentum < 1, "train.momentum", "must be in [0, 1)")
    require(t.optimizer in ("sgd", "adamw"), "train.optimizer", "must be sgd or adamw")
    require(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    require(t.warmup_iters >= 0, "train.warmup_iters", "must be >= 0")
    require(0 < t.warmup_factor <= 1, "train.warmup_factor", "must be in (0, 1]")
    require(t.lr_steps == sorted(t.lr_steps), "train.lr_steps", "must be increasing")
    require(all(s >= 1 for s in t.lr_steps), "train.lr_steps", "must be >= 1 (iterations)")
    require(0 < t.lr_gamma <= 1, "train.lr_gamma", "must be in (0, 1]")
    require(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    require(t.amp in ("none", "bf16", "fp16"), "train.amp", "must be none, bf16 or fp16")
    require(t.log_every >= 1, "train.log_every", "must be >= 1")
    require(t.eval_every_epochs >= 1, "train.eval_every_epochs", "must be >= 1")
    require(t.num_logged_images >= 0, "train.num_logged_images", "must be >= 0")
    require(t.eval_task_cpus >= 0, "train.eval_task_cpus", "must be >= 0")
