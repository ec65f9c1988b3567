"""A model URI → its weights, label map and training config: resolve (without loading), then load.

URIs: models:/NAME@ALIAS, models:/NAME/VERSION, models:/<model_id>, runs:/<run_id>/model, or a checkpoint
directory holding state.pt (local or s3://). An alias is pinned to its version when resolved, so a batch job's
actors all load the same model even if the alias moves meanwhile.

Nothing is unpickled, also not with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false: an MLflow model is rebuilt by
`retina.inference.bundle` from the weights-only state dict, config and label map it carries (the pyfunc model's
artifact; models logged in the earlier mlflow.pytorch format carry the same files under ``extra_files/``), and a
checkpoint loads with ``torch.load(weights_only=True)`` (pipelines/training/checkpoint.py). Models logged before
the weights travelled beside the pickled module are refused with a message that says so.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import s3
from pipelines import names
from pipelines.tracking.store import resolve_tracking_uri
from pipelines.training.checkpoint import STATE_FILE, CheckpointError, load_checkpoint, model_from_state
from retina.config import ConfigError
from retina.data.coco import LabelMap
from retina.inference.bundle import FILES, Bundle, BundleError, is_bundle, read_bundle


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


def _label_map_from(entries: Any, where: str) -> LabelMap:
    try:
        return LabelMap.from_json(entries)
    except Exception as exc:
        raise ModelLoadError(f"{where}: unreadable label map: {exc}") from None


def _load_checkpoint(source: ModelSource, settings: s3.S3Settings | None) -> Bundle:
    try:
        if s3.is_s3(source.load_uri):
            with tempfile.TemporaryDirectory() as tmp:
                data = s3.read_bytes(s3.join(source.load_uri, STATE_FILE), settings)
                Path(tmp, STATE_FILE).write_bytes(data)
                state = load_checkpoint(tmp)
        else:
            state = load_checkpoint(source.load_uri)
        model = model_from_state(state)
    except (CheckpointError, ConfigError, OSError) as exc:
        raise ModelLoadError(f"model {source.uri!r}: loading the checkpoint failed: {exc}") from None
    return Bundle(model, _label_map_from(state.label_map, source.uri), state.config)


def bundle_dir(model_dir: Path) -> Path | None:
    """Where a downloaded MLflow model keeps its weights-only bundle: the pyfunc model's artifact, else (the earlier
    mlflow.pytorch format) ``extra_files/``; None when it has neither (a pickle-only model)."""
    from mlflow.models import Model

    artifacts = Model.load(model_dir).flavors.get("python_function", {}).get("artifacts", {})
    entry = artifacts.get(names.MODEL_BUNDLE_ARTIFACT)
    for candidate in ([model_dir / entry["path"]] if entry else []) + [model_dir / names.LEGACY_BUNDLE_DIR]:
        if is_bundle(candidate):
            return candidate
    return None


def _load_mlflow(source: ModelSource) -> Bundle:
    """The logged model's bundle rebuilt into a RetinaNet of this repository's code (no unpickling)."""
    # MLflow draws a progress bar per artifact file (a model has dozens); a notebook user asked for a model, not that
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(source.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source.load_uri, dst_path=tmp))
        except MlflowException as exc:
            raise _mlflow_error(source.uri, "download of the MLflow model", exc) from None
        found = bundle_dir(local)
        if found is None:
            raise ModelLoadError(
                f"model {source.uri!r}: carries no weights-only bundle ({', '.join(FILES)}): it was logged before "
                "the weights travelled beside its pickled module, and this loader runs no pickle. Load the training "
                "run's checkpoint directory instead, or that model with mlflow.pytorch.load_model from a registry "
                "you trust."
            )
        try:
            return read_bundle(found)
        except BundleError as exc:
            raise ModelLoadError(f"model {source.uri!r}: {exc}") from None


def load_source(source: ModelSource, s3_settings: s3.S3Settings | None = None) -> Bundle:
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
