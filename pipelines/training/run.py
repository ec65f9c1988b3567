"""The driver of a training run: data checks, the MLflow run, ``TorchTrainer.fit``, the model's registration.

    outcome = run_training(load_config("configs/demo.yaml"))

Resume: the same run.name and run.storage_path continue from the latest checkpoint in ``<storage_path>/<name>``,
in the same MLflow run (found by its ``retina.run_key`` tag). Worker failures are recovered the same way, up to
run.max_failures times.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train

from cluster import s3
from cluster.connect import connect_ray
from cluster.storage import absolute, storage_location
from pipelines import console, names
from pipelines.config import Config
from pipelines.data.plan import ShardIndex, TrainPlan
from pipelines.data.sample import ensure_sample_data
from pipelines.data.shards import check_shards, shard_index
from pipelines.tracking import plots, store
from pipelines.tracking.model_logging import LoggedModel, log_and_register
from pipelines.training.capacity import check_capacity
from pipelines.training.checkpoint import model_from_state
from pipelines.training.faults import Faults
from pipelines.training.loop import RunInputs
from pipelines.training.reservation import reserve_data_cpus
from pipelines.training.trainer import best_checkpoint, build_trainer, read_checkpoint
from retina.data.coco import DataError
from retina.typed_config import ConfigError, flatten, to_dict

logger = logging.getLogger("retina.train")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the message names the step and every rank's loss terms."""


@dataclass
class TrainOutcome:
    run_dir: str  # <storage_path>/<name>: checkpoints and Ray's run state
    mlflow_run_id: str
    tracking_uri: str
    metrics: dict[str, Any]  # the last metrics rank 0 reported (val/AP ...)
    best_checkpoint: str | None
    model: LoggedModel | None
    resumed: bool  # this command continued an existing run
    seconds: float


def with_absolute_paths(cfg: Config) -> Config:
    """Local data paths made absolute: Ray workers (and `ray job submit` drivers) run in other directories."""
    d = cfg.data
    data = dataclasses.replace(
        d, root=absolute(d.root), train_shards=absolute(d.train_shards), val_shards=absolute(d.val_shards)
    )
    return dataclasses.replace(cfg, data=data)


@dataclass(frozen=True)
class Prepared:
    """A run's config with local paths absolute, and what its data is: the label map and the shards as the data plan
    sees them (read once, on the driver, and handed to every worker)."""

    config: Config
    label_map: list[dict[str, Any]]  # JSON form: [{"id", "name", "label"}]
    train_index: ShardIndex
    val_index: ShardIndex

    def steps_per_epoch(self, cfg: Config | None = None) -> int:
        """Steps in one epoch of `cfg` (default: this run's) with its full group (`TrainPlan.steps_per_epoch`)."""
        cfg = cfg or self.config
        return TrainPlan.for_run(self.train_index, cfg).steps_per_epoch(cfg.scaling.num_workers)

    def epochs(self, cfg: Config | None = None) -> int:
        """Epochs `cfg` (default: this run's) trains with its full group (`TrainPlan.epochs`)."""
        cfg = cfg or self.config
        return TrainPlan.for_run(self.train_index, cfg).epochs(cfg.train.max_steps, cfg.scaling.num_workers)


def prepare_run(cfg: Config, *, driver_cpus: float = 0.0) -> Prepared:
    """What every training run (and every search) does first: absolute paths, Ray, the sample data on first use,
    and the shards' checks.

    `driver_cpus`: what a search trial's own process holds besides the run's workers and data CPUs. A local Ray
    is sized for all of it: sized for the workers and data CPUs alone (3 on the 2-core machine for the demo's
    recipe), a trial needing 3.25 would wait for a placement forever."""
    cfg = with_absolute_paths(cfg)
    logger.info("connecting to Ray (%s)", os.environ.get("RAY_ADDRESS") or "a local Ray on this machine")
    connect_ray(cpus_needed=cfg.scaling.run_cpus + driver_cpus, log_to_driver=console.is_verbose())
    capacity = check_capacity(cfg.scaling, cfg.run.storage_path)  # fail fast, not a job that waits forever
    logger.info(
        "Ray: %g CPUs, %g GPUs on %d node(s)",
        capacity.total.get("CPU", 0),
        capacity.total.get("GPU", 0),
        capacity.nodes,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False  # per-operator bars drown the step logs
    console.quiet_libraries()
    ensure_sample_data(cfg.data)
    labels = check_shards(cfg.data, cfg.model.num_classes).to_json()
    prepared = Prepared(cfg, labels, shard_index(cfg.data.train_shards), shard_index(cfg.data.val_shards))
    if prepared.steps_per_epoch() < 1:
        raise DataError(
            f"{cfg.data.train_shards}: {prepared.train_index.num_train_rows} usable train images, fewer than one "
            f"batch of data.batch_size={cfg.data.batch_size}"
        )
    return prepared


def fit(
    run: Prepared,
    cfg: Config,
    tracking_uri: str,
    run_id: str,
    *,
    faults: Faults,
    callbacks: list[Any] | None = None,
) -> ray.train.Result:
    """One TorchTrainer run of `cfg` (the prepared run's config, or a search trial's variant of it) logging into
    MLflow run `run_id`; raises NonFiniteLossError on divergence."""
    started = time.time()
    sc = cfg.scaling
    reservation = reserve_data_cpus(sc.data_cpus, wait_s=sc.capacity_wait_s, requester_id=f"retina-data-{run_id}",
                                    elastic=sc.elastic)  # fmt: skip
    inputs = RunInputs(cfg, tracking_uri, run_id, run.label_map, run.train_index, run.val_index, faults, started,
                       reservation.group)  # fmt: skip
    try:
        result = build_trainer(cfg, inputs, callbacks).fit()
    finally:
        reservation.release()
    returned = result.return_value or {}  # rank 0's return value
    if isinstance(returned, dict) and returned.get(names.NONFINITE_KEY):
        raise NonFiniteLossError(returned[names.NONFINITE_KEY])
    return result


def run_training(cfg: Config, config_path: str | None = None, *, restart: bool = False) -> TrainOutcome:
    """The whole run: data, MLflow run, TorchTrainer.fit, model registration. Raises on failure (MLflow FAILED).

    The same run.name + run.storage_path continues the run (after a failure: from its latest checkpoint). A run
    that already finished is reported as it is, unless its settings changed: then ConfigError names the changed
    keys and the ways forward. `restart`: discard the run's checkpoints and start it anew (the old MLflow run
    stays, detached from the name)."""
    started = time.time()
    run = prepare_run(cfg)
    cfg, labels = run.config, run.label_map
    run_dir = s3.join(storage_location(cfg.run.storage_path)[2], cfg.run.name)
    tracking_uri = store.resolve_tracking_uri(cfg.tracking.tracking_uri)
    params = flatten(to_dict(cfg))
    previous = store.find_run(tracking_uri, cfg.tracking.experiment, run_dir)
    if previous is not None and restart:
        _discard(run_dir, previous, tracking_uri)
    elif previous is not None and names.MODEL_URI_TAG in previous.data.tags:
        return _finished(cfg, previous, params, run_dir, tracking_uri, started)
    run_id, resumed = store.start_or_resume_run(tracking_uri, cfg.tracking.experiment, cfg.run.name, run_dir, params)
    client = store.MlflowClient(tracking_uri)
    with store.tracked_run(tracking_uri, run_id):
        client.log_dict(run_id, to_dict(cfg), "config/config.json")
        if config_path:
            client.log_artifact(run_id, config_path, "config")
        client.log_dict(run_id, labels, "label_map.json")
        sc, t = cfg.scaling, cfg.train
        workers = f"{sc.min_workers}..{sc.num_workers}" if sc.elastic else str(sc.num_workers)
        logger.info("training %s: %s workers x %g CPUs%s, %d steps, batch %d -> MLflow run %s", cfg.run.name, workers,
                    sc.cpus_per_worker, " + 1 GPU" if sc.use_gpu else "", t.max_steps, cfg.data.batch_size,
                    run_id)  # fmt: skip
        progress = console.TrainingProgress(tracking_uri, run_id, console.Plan(t.max_steps, run.epochs()))
        progress.start()
        try:
            result = fit(run, cfg, tracking_uri, run_id, faults=Faults.from_env())
        finally:
            progress.stop()
        metrics = dict(result.metrics or {})  # those of the latest checkpoint
        logger.info("logging and registering the model (the best checkpoint by %s)", names.VAL_AP)
        logged, best_path = _finish(cfg, result, tracking_uri, run_id, labels)
    return TrainOutcome(run_dir, run_id, tracking_uri, metrics, best_path, logged, resumed, time.time() - started)


def _finished(cfg: Config, run: Any, params: dict, run_dir: str, tracking_uri: str, started: float) -> TrainOutcome:
    """A finished run asked for again: its outcome when the settings are the same, else a ConfigError."""
    changed = store.changed_params(run, params)
    if changed:
        shown = ", ".join(f"{k}: {run.data.params[k]} -> {params[k]}" for k in changed[:8])
        more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
        raise ConfigError(
            f"run {cfg.run.name!r} already finished in {run_dir} with other settings: {shown}{more}. To train with "
            f"the new settings, give the run a new name (--set run.name={cfg.run.name}-2) or replace it (--restart)"
        )
    logger.info("run %s already finished and its model is logged (%s); nothing to do", cfg.run.name,
                run.data.tags[names.MODEL_URI_TAG])  # fmt: skip
    metrics = dict(run.data.metrics)
    return TrainOutcome(run_dir, run.info.run_id, tracking_uri, metrics, None, None, True, time.time() - started)


def _discard(run_dir: str, run: Any, tracking_uri: str) -> None:
    """--restart: delete the run's checkpoints and Ray state, detach the old MLflow run from the name."""
    logger.info("restart: deleting %s and starting a new MLflow run (the old one, %s, stays)", run_dir,
                run.info.run_id)  # fmt: skip
    if s3.is_s3(run_dir):
        s3.delete_prefix(run_dir)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    store.retire_run_key(tracking_uri, run)


def _log_curves(tracking_uri: str, run_id: str) -> None:
    losses = {k: store.metric_history(tracking_uri, run_id, k)
              for k in (names.TRAIN_LOSS, names.TRAIN_LOSS_CLS, names.TRAIN_LOSS_BOX)}  # fmt: skip
    aps = {k: store.metric_history(tracking_uri, run_id, k) for k in (names.VAL_AP, names.VAL_AP50, names.VAL_AP75)}
    client = store.MlflowClient(tracking_uri)
    for name, series, title, ylabel in (("loss_curve.png", losses, "training loss", "loss"),
                                        ("ap_curve.png", aps, "validation AP", "COCO AP")):  # fmt: skip
        fig = plots.curves_figure(series, title, ylabel)
        client.log_figure(run_id, fig, f"curves/{name}")
        plots.close(fig)


def _finish(cfg: Config, result: ray.train.Result, tracking_uri: str, run_id: str, labels: list[dict]) -> tuple:
    """Log curves and the model (best checkpoint by val/AP), register it; return (model, checkpoint path)."""
    best = best_checkpoint(result)
    if best is None:
        raise RuntimeError(f"training finished without a checkpoint in {result.path}")
    state = read_checkpoint(best)
    _log_curves(tracking_uri, run_id)
    val_ap = float((state.metrics or {}).get(names.VAL_AP, 0.0))  # the checkpoint keeps the metrics as reported
    logged = log_and_register(
        model_from_state(state),
        label_map=labels,
        config=to_dict(cfg),
        tracking_uri=tracking_uri,
        run_id=run_id,
        registered_model_name=cfg.tracking.registered_model_name,
        alias=cfg.tracking.alias,
        alias_min_ap=cfg.tracking.alias_min_ap,
        val_ap=val_ap,
    )
    client = store.MlflowClient(tracking_uri)
    client.set_tag(run_id, names.MODEL_URI_TAG, logged.model_uri)
    client.set_tag(run_id, names.REGISTERED_VERSION_TAG, f"{logged.registered_name}/{logged.version}")
    client.set_tag(run_id, names.BEST_CHECKPOINT_TAG, best.path)
    client.set_tag(run_id, names.MLFLOW_NOTE_TAG, _run_description(cfg, state, logged))
    return logged, best.path


def _run_description(cfg: Config, state: Any, logged: LoggedModel) -> str:
    """The run's description in the MLflow UI: what was trained, on what, how well, and where the model is."""
    m = state.metrics or {}
    aps = ", ".join(f"{k} {m[k]:.4f}" for k in (names.VAL_AP, names.VAL_AP50, names.VAL_AP75) if k in m)
    alias = f" (alias `{logged.alias}`)" if logged.alias else ""
    return (
        f"RetinaNet `{cfg.model.backbone.name}` trained for {state.step} steps ({state.epoch} epochs) on "
        f"`{cfg.data.train_shards}` with {cfg.scaling.num_workers} workers; best checkpoint: {aps}.\n\n"
        f"Registered as **{logged.registered_name}** version {logged.version}{alias}: "
        f"`from pipelines.inference import load_model; load_model('models:/{logged.registered_name}/"
        f"{logged.version}')`. Charts: train/* and val/*; artifacts: `evaluation/` (COCOeval report, per class), "
        "`val_images/`, `curves/`, `config/`."
    )
