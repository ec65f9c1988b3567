"""Load a trained detector by URI and run it on images: the notebook API and the core of batch inference.

    from pipelines.inference import load_model
    detector = load_model("models:/retinanet@champion")      # or models:/NAME/VERSION, models:/<model_id>,
                                                              # runs:/<run_id>/model, a checkpoint dir (local, s3://)
    [dets] = detector.predict(["photo.jpg"])                  # PIL images, numpy arrays, (3,H,W) tensors or paths
    dets["boxes"], dets["scores"], dets["category_ids"], dets["names"]

Images go through the same steps as the validation pipeline of training (decode with EXIF/colour-mode handling,
uint8 resize by `retina.data.transforms.resize_image`, normalise + pad by `BatchCollator`, `predict_batch`), so
the detections equal what training's evaluation saw for the same image and batch.

MLflow models are pickled RetinaNets (pipelines/model_logging.py): loading one runs pickle, so load only models
from a registry you trust. Checkpoints load with ``torch.load(weights_only=True)`` (pipelines/checkpointing.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from cluster import s3
from pipelines.checkpointing import STATE_FILE, CheckpointError, load_checkpoint
from pipelines.tracking import resolve_tracking_uri
from retina.config import ConfigError, ModelConfig, config_from_dict
from retina.data.coco import LabelMap
from retina.data.collate import BatchCollator
from retina.data.transforms import decode_image, resize_image
from retina.model import RetinaNet, build_retinanet


class ModelLoadError(RuntimeError):
    """The model URI cannot be resolved or loaded; the message names the URI and the step that failed."""


MODEL_ID = re.compile(r"m-[0-9a-f]{32}")
_USAGE = (
    "expected models:/NAME@ALIAS, models:/NAME/VERSION, models:/<model_id>, runs:/<run_id>/<path> "
    "or a checkpoint directory holding state.pt (local or s3://)"
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved on the driver; picklable, so Ray actors load exactly the same model."""

    uri: str  # as the user gave it
    kind: str  # "alias" | "version" | "logged_model" | "run" | "checkpoint"
    load_uri: str  # pinned: an alias becomes models:/NAME/VERSION (the alias may move while a job runs)
    tracking_uri: str | None = None
    registered_name: str | None = None
    version: str | None = None
    model_id: str | None = None  # the MLflow 3 LoggedModel id, when known
    run_id: str | None = None  # the training run that logged the model, when known

    def describe(self) -> str:
        if self.registered_name:
            return f"{self.uri} ({self.registered_name} version {self.version})"
        return self.uri


# ------------------------------------------------------------------------------------------------ resolve


def _mlflow_error(uri: str, step: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(f"model {uri!r}: {step} failed: {exc}")


def resolve_model(uri: str, tracking_uri: str | None = None) -> ModelSource:
    """Parse and check `uri` without loading weights; ModelLoadError naming the URI when it points nowhere."""
    uri = str(uri).strip()
    if not uri:
        raise ModelLoadError(f"empty model URI: {_USAGE}")
    if MODEL_ID.fullmatch(uri):
        uri = f"models:/{uri}"
    if uri.startswith(("models:/", "runs:/")):
        return _resolve_mlflow(uri, resolve_tracking_uri(tracking_uri or ""))
    if "://" in uri and not s3.is_s3(uri):
        raise ModelLoadError(f"model {uri!r}: unsupported scheme; {_USAGE}")
    return _resolve_checkpoint(uri)


def _resolve_checkpoint(uri: str) -> ModelSource:
    path = uri[: -len(STATE_FILE)].rstrip("/") if uri.endswith("/" + STATE_FILE) else uri.rstrip("/")
    try:
        found = s3.exists(s3.join(path, STATE_FILE))
    except OSError as exc:
        raise ModelLoadError(f"model {uri!r}: cannot check the checkpoint: {exc}") from None
    if not found:
        what = "no such file or directory" if not (s3.is_s3(path) or Path(path).exists()) else f"no {STATE_FILE}"
        raise ModelLoadError(f"model {uri!r}: not a checkpoint ({what}); {_USAGE}")
    load_uri = path if s3.is_s3(path) else str(Path(path).absolute())  # Ray actors run in other directories
    return ModelSource(uri=uri, kind="checkpoint", load_uri=load_uri)


def _resolve_mlflow(uri: str, tracking_uri: str) -> ModelSource:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    rest = uri.split(":/", 1)[1].strip("/")
    try:
        if uri.startswith("runs:/"):
            run_id = rest.split("/", 1)[0]
            if "/" not in rest:
                raise ModelLoadError(f"model {uri!r}: a run URI needs the model path, e.g. runs:/{run_id}/model")
            client.get_run(run_id)  # a clear "run not found" before any download
            return ModelSource(uri, "run", uri, tracking_uri, run_id=run_id)
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
            kind = "alias"
        elif MODEL_ID.fullmatch(rest):
            logged = client.get_logged_model(rest)
            return ModelSource(uri, "logged_model", uri, tracking_uri, model_id=rest, run_id=logged.source_run_id)
        elif "/" in rest:
            name, version = rest.rsplit("/", 1)
            if not version.isdigit():
                raise ModelLoadError(f"model {uri!r}: version {version!r} is not a number; {_USAGE}")
            mv = client.get_model_version(name, version)
            kind = "version"
        else:
            raise ModelLoadError(f"model {uri!r}: names no version or alias; {_USAGE}")
    except MlflowException as exc:
        raise _mlflow_error(uri, f"MLflow lookup in {tracking_uri}", exc) from None
    model_id = mv.model_id or (mv.source.split("/", 1)[1] if MODEL_ID.fullmatch(mv.source[len("models:/") :]) else None)
    return ModelSource(
        uri, kind, f"models:/{mv.name}/{mv.version}", tracking_uri, mv.name, str(mv.version), model_id, mv.run_id
    )


# ------------------------------------------------------------------------------------------------ load


@dataclass
class LoadedModel:
    model: RetinaNet
    label_map: LabelMap
    train_config: dict[str, Any]  # the training run's config (data.val_batch_size ...); {} when unknown


def _label_map_from(entries: Any, where: str) -> LabelMap:
    try:
        return LabelMap.from_json(entries)
    except Exception as exc:
        raise ModelLoadError(f"{where}: unreadable label map: {exc}") from None


def _load_checkpoint(source: ModelSource, settings: s3.S3Settings | None) -> LoadedModel:
    try:
        if s3.is_s3(source.load_uri):
            with tempfile.TemporaryDirectory() as tmp:
                data = s3.read_bytes(s3.join(source.load_uri, STATE_FILE), settings)
                Path(tmp, STATE_FILE).write_bytes(data)
                state = load_checkpoint(tmp)
        else:
            state = load_checkpoint(source.load_uri)
        model_cfg = config_from_dict(state.config).model
    except (CheckpointError, ConfigError, OSError) as exc:
        raise ModelLoadError(f"model {source.uri!r}: loading the checkpoint failed: {exc}") from None
    # The weights come from the checkpoint: never read the backbone's ImageNet file (may not exist here).
    model_cfg = dataclasses.replace(model_cfg, backbone=dataclasses.replace(model_cfg.backbone, weights=None))
    model = build_retinanet(model_cfg)
    try:
        model.load_state_dict(state.model)
    except RuntimeError as exc:
        raise ModelLoadError(f"model {source.uri!r}: weights do not fit the checkpoint's config: {exc}") from None
    return LoadedModel(model, _label_map_from(state.label_map, source.uri), state.config)


def _load_mlflow(source: ModelSource) -> LoadedModel:
    import mlflow
    import mlflow.artifacts
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(source.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            # one download gives the pickled model and the extra files (label_map.json, config.json)
            local = mlflow.artifacts.download_artifacts(artifact_uri=source.load_uri, dst_path=tmp)
            model = mlflow.pytorch.load_model(local, map_location="cpu")
        except MlflowException as exc:
            raise _mlflow_error(source.uri, "download/load of the MLflow model", exc) from None
        extra = Path(local, "extra_files")
        config = json.loads((extra / "config.json").read_text()) if (extra / "config.json").exists() else {}
        entries = getattr(model, "label_map", None)
        if entries is None and (extra / "label_map.json").exists():
            entries = json.loads((extra / "label_map.json").read_text())
    if not isinstance(getattr(model, "cfg", None), ModelConfig) or not hasattr(model, "predict_batch"):
        raise ModelLoadError(f"model {source.uri!r}: not a retina RetinaNet (got {type(model).__name__})")
    if entries is None:
        raise ModelLoadError(f"model {source.uri!r}: carries no label map (model.label_map / label_map.json)")
    return LoadedModel(model, _label_map_from(entries, source.uri), config)


def load_source(source: ModelSource, s3_settings: s3.S3Settings | None = None) -> LoadedModel:
    """Weights, label map and training config for a resolved source (in eval mode, on CPU).

    `s3_settings`: how to reach an s3:// checkpoint (Ray workers may not share the driver's environment).
    """
    loaded = _load_checkpoint(source, s3_settings) if source.kind == "checkpoint" else _load_mlflow(source)
    if loaded.model.cfg.num_classes != loaded.label_map.num_classes:
        raise ModelLoadError(
            f"model {source.uri!r}: {loaded.model.cfg.num_classes} classes but the label map has "
            f"{loaded.label_map.num_classes}"
        )
    loaded.model.eval()
    return loaded


# ------------------------------------------------------------------------------------------------ detector

ImageLike = Any  # PIL.Image.Image | np.ndarray (H, W[, C]) | torch.Tensor (3, H, W) float 0..1 | str | Path


def to_rgb_uint8(image: ImageLike, name: str = "image") -> np.ndarray:
    """Any supported image → (H, W, 3) uint8 RGB. Paths/s3 URIs and bytes go through `decode_image` (EXIF, modes)."""
    if isinstance(image, (str, os.PathLike)):
        return decode_image(s3.read_bytes(image), str(image)).image
    if isinstance(image, (bytes, bytearray)):
        return decode_image(bytes(image), name).image
    if isinstance(image, Image.Image):
        img = ImageOps.exif_transpose(image)  # a PIL image opened by the caller still carries its EXIF rotation
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"{name}: a tensor must be (3, H, W), got {tuple(image.shape)}")
        x = image.detach().cpu()
        x = x.float().mul(255.0).add_(0.5).clamp_(0, 255) if x.is_floating_point() else x.clamp(0, 255)
        return x.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ValueError(f"{name}: an array must be (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
        arr = arr[..., :3]
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.size and float(arr.max()) <= 1.0:
                arr = arr * 255.0 + 0.5  # 0..1 floats
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(arr)
    raise TypeError(f"{name}: unsupported image type {type(image).__name__}")


@dataclass
class Prepared:
    """One image ready for batching: what pipelines/data.py's val pipeline emits per row."""

    image: np.ndarray  # (h, w, 3) uint8 resized
    image_size: tuple[int, int]  # (h, w) after resize
    orig_size: tuple[int, int]  # (H, W)


def prepare(image_rgb: np.ndarray, model_cfg: ModelConfig) -> Prepared:
    """Resize like the val pipeline (`EvalTransform`): shorter side to input.min_size, longer ≤ input.max_size."""
    resized = resize_image(image_rgb, model_cfg.input.min_size, model_cfg.input.max_size)
    return Prepared(resized, tuple(resized.shape[:2]), tuple(image_rgb.shape[:2]))


class Detector:
    """A loaded RetinaNet with its label map; `predict` returns COCO category ids and class names."""

    def __init__(self, loaded: LoadedModel, source: ModelSource, device: str | torch.device | None = None):
        self.source = source
        self.label_map = loaded.label_map
        self.train_config = loaded.train_config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = loaded.model.to(self.device).eval()
        self.collate = BatchCollator.from_input_config(self.model.cfg.input)

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def score_threshold(self) -> float:
        return self.model.cfg.postprocess.score_thresh

    def set_score_threshold(self, value: float) -> None:
        """Applied before NMS and the per-image cap, exactly like the model's own postprocess.score_thresh."""
        if not 0 <= value < 1:
            raise ValueError(f"score threshold must be in [0, 1), got {value}")
        cfg = self.model.cfg
        self.model.cfg = dataclasses.replace(cfg, postprocess=dataclasses.replace(cfg.postprocess, score_thresh=value))

    @torch.no_grad()
    def predict_prepared(self, items: Sequence[Prepared]) -> list[dict[str, np.ndarray]]:
        """One forward pass over `items` (one batch, padded together) → per image numpy detections."""
        if not items:
            return []
        batch = self.collate(
            {
                "image": [p.image for p in items],
                "image_size": np.array([p.image_size for p in items], dtype=np.int64),
                "orig_size": np.array([p.orig_size for p in items], dtype=np.int64),
                "boxes": [np.zeros((0,), np.float32) for _ in items],
                "labels": [np.zeros((0,), np.int64) for _ in items],
                "image_id": np.arange(len(items), dtype=np.int64),
            }
        )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        dets = self.model.predict_batch(batch)  # boxes in original-image pixels
        return [self._to_output(d) for d in dets]

    def _to_output(self, det: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        labels = det["labels"].cpu().numpy().astype(np.int64)
        ids = np.asarray(self.label_map.coco_ids, dtype=np.int64)
        names = np.asarray(self.label_map.names, dtype=object)
        return {
            "boxes": det["boxes"].float().cpu().numpy(),  # (N, 4) xyxy in original-image pixels
            "scores": det["scores"].float().cpu().numpy(),  # (N,) descending
            "labels": labels,  # (N,) contiguous 0..K-1
            "category_ids": ids[labels],  # (N,) original COCO category ids
            "names": names[labels].tolist(),
        }

    def predict(self, images: Sequence[ImageLike] | ImageLike, batch_size: int = 8) -> list[dict[str, Any]]:
        """Detections per image: {"boxes" (N, 4) xyxy, "scores", "labels", "category_ids", "names"}.

        `images`: PIL images, numpy arrays (H, W[, 3]) uint8 or 0..1 floats, (3, H, W) tensors in 0..1, file
        paths or s3:// URIs (one of them alone is accepted too). Images are padded together per batch of
        `batch_size`, as in training's evaluation.
        """
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)):
            images = [images]
        prepared = [prepare(to_rgb_uint8(img, f"image {i}"), self.cfg) for i, img in enumerate(images)]
        out: list[dict[str, Any]] = []
        for start in range(0, len(prepared), max(1, batch_size)):
            out.extend(self.predict_prepared(prepared[start : start + batch_size]))
        return out

    def __repr__(self) -> str:
        return f"Detector({self.source.describe()}, {self.label_map.num_classes} classes, device={self.device})"


def load_model(
    uri: str | ModelSource,
    *,
    tracking_uri: str | None = None,
    device: str | torch.device | None = None,
    score_threshold: float | None = None,
    s3_settings: s3.S3Settings | None = None,
) -> Detector:
    """A `Detector` for a model URI (see module docstring); ModelLoadError naming the URI when it fails."""
    source = uri if isinstance(uri, ModelSource) else resolve_model(uri, tracking_uri)
    detector = Detector(load_source(source, s3_settings), source, device)
    if score_threshold is not None:
        detector.set_score_threshold(score_threshold)
    return detector
