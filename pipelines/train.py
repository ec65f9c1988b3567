"""Train RetinaNet with Ray Train (PyTorch DDP), evaluate with COCOeval, track and register in MLflow.

    python pipelines/train.py --config configs/NAME.yaml [--set section.key=value ...]

The config is typed (`retina.config`): an unknown or ill-typed key is an error naming it, before anything
starts. Sections: model, data, train, scaling, run, tracking (see configs/*.yaml and retina/config.py).

Cluster: with RAY_ADDRESS set (or under ``ray job submit``) the run uses that cluster; otherwise it starts a
local Ray with its dashboard on 127.0.0.1.

Resume: re-running the same command (same run.name and run.storage_path) continues from the latest
checkpoint in ``<storage_path>/<name>``, in the same MLflow run. Worker failures are recovered the same way, up
to run.max_failures times.

MLflow: tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else ``sqlite:///mlflow.db`` in the working
directory (view it with ``mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python pipelines/train.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402
import ray.train  # noqa: E402
from ray.train.torch import TorchConfig, TorchTrainer  # noqa: E402

from cluster import s3  # noqa: E402
from pipelines import cli, plots, tracking  # noqa: E402
from pipelines.checkpointing import load_checkpoint  # noqa: E402
from pipelines.data import build_dataset, label_map, load_manifest  # noqa: E402
from pipelines.model_logging import LoggedModel, log_and_register  # noqa: E402
from pipelines.sample_data import ensure_sample_data  # noqa: E402
from pipelines.train_loop import NONFINITE_KEY, train_func  # noqa: E402
from retina.config import Config, ConfigError, flatten, load_config, to_dict  # noqa: E402
from retina.data.coco import DataError  # noqa: E402
from retina.model import build_retinanet  # noqa: E402

logger = logging.getLogger("retina.train")

MODEL_URI_TAG = "retina.model_uri"


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


class _SplitValUnequally(ray.train.DataConfig):
    """Train splits equally (every DDP rank takes the same number of steps); val splits without dropping rows.

    Ray's default splits every dataset with ``equal=True``, which drops rows to even the parts out: fine for
    training, wrong for evaluation (the dropped images would be missing from COCOeval). Uneven val parts are
    safe because evaluation has no per-batch collective (see pipelines/evaluation_loop.py).
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        rest = {k: v for k, v in datasets.items() if k != "val"}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            val = datasets["val"]
            if val.name is None:
                val.set_name("val")
            for i, part in enumerate(val.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                output[i]["val"] = part
        return output


# ------------------------------------------------------------------------------------------------ set-up


def connect_ray(cfg: Config) -> None:
    """Join the cluster named by RAY_ADDRESS (also set by `ray job submit`), else start a local Ray."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(configure_logging=False)
        return
    needed = math.ceil(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)
    # Logical CPUs: the workers' reservation plus room for Ray Data's decode tasks; Ray does not pin cores.
    ray.init(
        num_cpus=max(os.cpu_count() or 1, needed + 2),
        include_dashboard=True,  # Train V2's placement-group cleanup uses the state API in the dashboard
        dashboard_host="127.0.0.1",
        configure_logging=False,
    )


def storage_location(path: str) -> tuple[str, Any, str]:
    """(storage_path for Ray, pyarrow filesystem or None, display URI). Local paths become absolute."""
    if s3.is_s3(path):
        fs, inner = s3.arrow_filesystem(path)
        return inner, fs, path.rstrip("/")
    absolute = str(Path(path).absolute())
    return absolute, None, absolute


def with_absolute_paths(cfg: Config) -> Config:
    """Local data paths made absolute: Ray workers (and `ray job submit` drivers) run in other directories."""

    def fix(path: str) -> str:
        return path if not path or s3.is_s3(path) else str(Path(path).absolute())

    data = dataclasses.replace(
        cfg.data, root=fix(cfg.data.root), train_shards=fix(cfg.data.train_shards), val_shards=fix(cfg.data.val_shards)
    )
    train = dataclasses.replace(cfg.train, fail_marker=fix(cfg.train.fail_marker))
    return dataclasses.replace(cfg, data=data, train=train)


def check_data(cfg: Config) -> list[dict[str, Any]]:
    """The train manifest's label map; model.num_classes must match it, val must use the same categories."""
    train_manifest = load_manifest(
        cfg.data.train_shards, s3.S3Settings.from_env() if s3.is_s3(cfg.data.train_shards) else None
    )
    val_manifest = load_manifest(
        cfg.data.val_shards, s3.S3Settings.from_env() if s3.is_s3(cfg.data.val_shards) else None
    )
    labels = label_map(train_manifest)
    if label_map(val_manifest) != labels:
        raise DataError(f"{cfg.data.val_shards}: val categories differ from the train shards' {cfg.data.train_shards}")
    if cfg.model.num_classes != labels.num_classes:
        raise ConfigError(
            f"model.num_classes: {cfg.model.num_classes}, but {cfg.data.train_shards} has {labels.num_classes} "
            f"categories ({', '.join(labels.names)})"
        )
    counts = train_manifest.get("counts", {})
    if counts.get("images_written", cfg.data.batch_size) < cfg.data.batch_size:
        raise DataError(f"{cfg.data.train_shards}: {counts['images_written']} images, fewer than one batch of "
                        f"data.batch_size={cfg.data.batch_size}")  # fmt: skip
    return labels.to_json()


def build_datasets(cfg: Config) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """Train (multi-scale + flip, reshuffled each epoch as data.shuffle says) and val (plain resize) datasets."""
    inp = cfg.model.input
    train = build_dataset(
        cfg.data.train_shards, train=True, min_sizes=list(cfg.data.train_min_sizes) or [inp.min_size],
        max_size=inp.max_size, flip_prob=cfg.data.flip_prob, seed=cfg.train.seed, shuffle=cfg.data.shuffle,
    )  # fmt: skip
    val = build_dataset(cfg.data.val_shards, train=False, min_sizes=[inp.min_size], max_size=inp.max_size)
    return train, val


def build_trainer(cfg: Config, loop_config: dict[str, Any], datasets: dict[str, Any]) -> TorchTrainer:
    storage_path, filesystem, _ = storage_location(cfg.run.storage_path)
    sc = cfg.scaling
    return TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker={
                "CPU": sc.cpus_per_worker,
                **({"GPU": 1} if sc.use_gpu else {}),
                **sc.resources_per_worker,
            },
        ),  # fmt: skip
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.num_to_keep, checkpoint_score_attribute="val/AP", checkpoint_score_order="max"
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
        ),
        datasets=datasets,
        dataset_config=_SplitValUnequally(),
    )


# ------------------------------------------------------------------------------------------------ finish


def _best_checkpoint(result: ray.train.Result) -> ray.train.Checkpoint | None:
    scored = [(m.get("val/AP", -1.0), c) for c, m in (result.best_checkpoints or []) if m]
    if scored:
        return max(scored, key=lambda t: t[0])[1]
    return result.checkpoint


def _log_curves(tracking_uri: str, run_id: str) -> None:
    losses = {k: tracking.metric_history(tracking_uri, run_id, k) for k in ("train/loss", "train/loss_cls",
                                                                             "train/loss_box")}  # fmt: skip
    aps = {k: tracking.metric_history(tracking_uri, run_id, k) for k in ("val/AP", "val/AP50", "val/AP75")}
    client = tracking.MlflowClient(tracking_uri)
    for name, series, title, ylabel in (("loss_curve.png", losses, "training loss", "loss"),
                                        ("ap_curve.png", aps, "validation AP", "COCO AP")):  # fmt: skip
        fig = plots.curves_figure(series, title, ylabel)
        client.log_figure(run_id, fig, f"curves/{name}")
        plots.close(fig)


def _finish(cfg: Config, result: ray.train.Result, tracking_uri: str, run_id: str, labels: list[dict]) -> tuple:
    """Log curves and the model (best checkpoint by val/AP), register it; return (model, checkpoint path)."""
    best = _best_checkpoint(result)
    if best is None:
        raise RuntimeError(f"training finished without a checkpoint in {result.path}")
    with best.as_directory() as ckpt_dir:
        state = load_checkpoint(ckpt_dir)
    model = build_retinanet(cfg.model)
    model.load_state_dict(state.model)
    _log_curves(tracking_uri, run_id)
    val_ap = float((state.metrics or {}).get("val/AP", 0.0))  # the checkpoint keeps the metrics as reported
    logged = log_and_register(
        model,
        label_map=labels,
        config=to_dict(cfg),
        tracking_uri=tracking_uri,
        run_id=run_id,
        registered_model_name=cfg.tracking.registered_model_name,
        alias=cfg.tracking.alias,
        alias_min_ap=cfg.tracking.alias_min_ap,
        val_ap=val_ap,
    )
    client = tracking.MlflowClient(tracking_uri)
    client.set_tag(run_id, MODEL_URI_TAG, logged.model_uri)
    client.set_tag(run_id, "retina.registered_version", f"{logged.registered_name}/{logged.version}")
    client.set_tag(run_id, "retina.best_checkpoint", best.path)
    return logged, best.path


def run(cfg: Config, config_path: str | None = None) -> TrainOutcome:
    """The whole run: data, MLflow run, TorchTrainer.fit, model registration. Raises on failure (MLflow FAILED)."""
    started = time.time()
    cfg = with_absolute_paths(cfg)
    connect_ray(cfg)
    ensure_sample_data(cfg.data)
    labels = check_data(cfg)
    _, _, run_dir = storage_location(cfg.run.storage_path)
    run_dir = s3.join(run_dir, cfg.run.name)
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    params = {k: v for k, v in flatten(to_dict(cfg)).items()}
    run_id, resumed = tracking.start_or_resume_run(tracking_uri, cfg.tracking.experiment, cfg.run.name, run_dir, params)
    client = tracking.MlflowClient(tracking_uri)
    done = client.get_run(run_id).data.tags.get(MODEL_URI_TAG) if resumed else None
    if done:
        logger.info("run %s already finished and its model is logged (%s); nothing to do", cfg.run.name, done)
        client.set_terminated(run_id, "FINISHED")
        return TrainOutcome(run_dir, run_id, tracking_uri, dict(client.get_run(run_id).data.metrics), None, None,
                            True, time.time() - started)  # fmt: skip
    try:
        client.log_dict(run_id, to_dict(cfg), "config/config.json")
        if config_path:
            client.log_artifact(run_id, config_path, "config")
        client.log_dict(run_id, labels, "label_map.json")
        quiet = ray.data.DataContext.get_current()
        quiet.enable_progress_bars = False  # per-operator bars from every split coordinator drown the step logs
        train_ds, val_ds = build_datasets(cfg)
        loop_config = {
            "config": to_dict(cfg),
            "tracking_uri": tracking_uri,
            "mlflow_run_id": run_id,
            "label_map": labels,
        }
        trainer = build_trainer(cfg, loop_config, {"train": train_ds, "val": val_ds})
        result = trainer.fit()
        returned = result.return_value or {}  # rank 0's return value
        if returned.get(NONFINITE_KEY):
            raise NonFiniteLossError(returned[NONFINITE_KEY])
        metrics = dict(result.metrics or {})  # those of the latest checkpoint
        logged, best_path = _finish(cfg, result, tracking_uri, run_id, labels)
    except KeyboardInterrupt:
        tracking.end_run(tracking_uri, run_id, "KILLED")
        raise
    except BaseException as exc:
        client.set_tag(run_id, "retina.error", f"{type(exc).__name__}: {exc}"[:5000])
        tracking.end_run(tracking_uri, run_id, "FAILED")
        raise
    tracking.end_run(tracking_uri, run_id, "FINISHED")
    return TrainOutcome(run_dir, run_id, tracking_uri, metrics, best_path, logged, resumed, time.time() - started)


# ------------------------------------------------------------------------------------------------ CLI


def _summary(outcome: TrainOutcome) -> str:
    m = outcome.metrics
    aps = " ".join(f"{k}={m[k]:.3f}" for k in ("val/AP", "val/AP50", "val/AP75") if k in m)
    lines = [
        f"done in {outcome.seconds:.0f} s{' (resumed)' if outcome.resumed else ''}: step {m.get('step', '?')}, {aps}",
        f"  run folder (checkpoints): {outcome.run_dir}",
    ]
    if outcome.best_checkpoint:
        lines.append(f"  best checkpoint:          {outcome.best_checkpoint}")
    lines.append(f"  MLflow run:               {outcome.mlflow_run_id} in {outcome.tracking_uri}")
    if outcome.model:
        lines.append(f"  model:                    {outcome.model.model_uri} "
                     f"(registered {outcome.model.registered_name} v{outcome.model.version})")  # fmt: skip
        if outcome.model.alias_uri:
            lines.append(f"  load it with:             mlflow.pytorch.load_model('{outcome.model.alias_uri}')")
    if outcome.tracking_uri.startswith("sqlite:///"):
        db = Path(outcome.tracking_uri[len("sqlite:///") :])
        store = f"sqlite:///{db.relative_to(Path.cwd())}" if db.is_relative_to(Path.cwd()) else outcome.tracking_uri
        lines.append(f"  MLflow UI:                mlflow ui --backend-store-uri {store} --host 127.0.0.1")
    else:
        lines.append(f"  MLflow UI:                {outcome.tracking_uri}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.docstring_parser(__doc__)
    cli.add_config_arguments(parser, "configs/demo.yaml", "--set train.max_steps=100 --set run.name=x")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"train: config error: {exc}", file=sys.stderr)
        return 2
    try:
        outcome = run(cfg, args.config)
    except (ConfigError, DataError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"train: stopped: {exc}", file=sys.stderr)
        return 1
    except ray.train.TrainingFailedError as exc:
        print(f"train: training failed: {exc}", file=sys.stderr)
        return 1
    print(_summary(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())
