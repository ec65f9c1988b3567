"""Search the focal-loss hyperparameters (γ, α, π, optionally lr) with Ray Tune; each trial trains with Ray Train.

    python tuning/search.py --config configs/NAME.yaml --num-samples N [--max-concurrent-trials M]
        [--search-alg tpe|random|grid] [--scheduler asha|none] [--set section.key=value ...] [--resume-errored]

The space is the config's ``tuning`` section (defaults: γ uniform [0, 5], α uniform [0.1, 0.9], π log-uniform
[1e-3, 0.2]; ``--set tuning.lr.kind=loguniform`` adds the learning rate). An invalid space is an error naming
the key before Ray starts. The command-line flags override tuning.num_samples, .max_concurrent_trials,
.search_alg and .scheduler.

Each trial runs one multi-worker TorchTrainer (scaling.*) and reports val/AP after every evaluation; ASHA stops
weak trials between epochs. Trials run side by side as far as the cluster's CPUs/GPUs allow. A trial that
diverges or fails is recorded as failed and the search goes on.

Resume: the search lives in ``<tuning.storage_path or run.storage_path>/<tuning.name or run.name_search>``.
Running the same command again restores it there: finished trials are kept, interrupted ones continue (from
their Train checkpoints), failed ones stay failed unless --resume-errored. The restored search keeps its
original settings (num_samples, searcher, scheduler).

MLflow: one parent run per search, one nested child run per trial (params gamma/alpha/prior, its metrics); the
parent gets the results table (CSV) and a plot of val/AP against each hyperparameter. The best trial's model is
registered (tracking.registered_model_name); tracking.alias (e.g. champion) moves to it only if it beats the
current champion's val/AP.

Cluster: with RAY_ADDRESS set (or under ``ray job submit``) the search uses that cluster; otherwise it starts a
local Ray with its dashboard on 127.0.0.1 (Train V2 under Tune needs it to release stopped trials' workers).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python tuning/search.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow.fs  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, TrialScheduler  # noqa: E402

from cluster import s3  # noqa: E402
from pipelines import cli, tracking  # noqa: E402
from pipelines.checkpointing import load_checkpoint  # noqa: E402
from pipelines.data import load_manifest  # noqa: E402
from pipelines.model_logging import LoggedModel, log_and_register  # noqa: E402
from pipelines.sample_data import ensure_sample_data  # noqa: E402
from pipelines.train import MODEL_URI_TAG, check_data, connect_ray, storage_location, with_absolute_paths  # noqa: E402
from retina.config import Config, ConfigError, config_from_dict, flatten, load_config, to_dict  # noqa: E402
from retina.data.coco import DataError  # noqa: E402
from retina.model import build_retinanet  # noqa: E402
from tuning import results as res  # noqa: E402
from tuning.space import METRIC, build_searcher, grid_size, grid_space, searched, validate_tuning  # noqa: E402
from tuning.trial import (  # noqa: E402
    BEST_CHECKPOINT_TAG,
    TrialNamer,
    TrialRunStatus,
    TrialSetup,
    find_child_run,
    run_trial,
)

logger = logging.getLogger("retina.tune")

BEST_TRIAL_TAG = "retina.tune.best_trial"
# CPUs a trial's Ray Data decode tasks need beside its workers: not reserved, but counted when deciding how many
# trials run side by side (with none left over, every trial's input pipeline crawls one task at a time).
DATA_CPUS_PER_TRIAL = 1.0


@dataclass
class SearchOutcome:
    experiment_path: str  # the Tune experiment (restore from here)
    parent_run_id: str
    tracking_uri: str
    rows: list[res.TrialRow]
    table: str
    best: res.TrialRow | None
    best_run_id: str | None  # the best trial's MLflow child run
    model: LoggedModel | None  # registered model of the best trial (None: no trial finished, or done before)
    champion: res.ChampionDecision | None
    resumed: bool
    seconds: float


# ------------------------------------------------------------------------------------------------ set-up


def with_search_defaults(cfg: Config) -> Config:
    """tuning.name/storage_path filled in (from run.*), local paths absolute (trials run in other directories)."""
    cfg = with_absolute_paths(cfg)
    t = cfg.tuning
    storage = t.storage_path or cfg.run.storage_path
    if not s3.is_s3(storage):
        storage = str(Path(storage).absolute())
    tuning = dataclasses.replace(t, name=t.name or f"{cfg.run.name}_search", storage_path=storage)
    return dataclasses.replace(cfg, tuning=tuning)


def expected_epochs(cfg: Config) -> int:
    """Epochs a full trial runs: train.max_steps over the steps one pass of the train split gives each worker."""
    shards = cfg.data.train_shards
    manifest = load_manifest(shards, s3.S3Settings.from_env() if s3.is_s3(shards) else None)
    images = int(manifest.get("counts", {}).get("images_written", 0)) or cfg.data.batch_size
    world = cfg.scaling.num_workers
    # every worker gets an equal part of the rows (the train split is equal=True) and drops its last partial batch
    steps_per_epoch = max(1, (images // world) // max(1, cfg.data.batch_size // world))
    return math.ceil(cfg.train.max_steps / steps_per_epoch)


def build_scheduler(cfg: Config, epochs: int) -> TrialScheduler | None:
    """ASHA on val/AP by epoch, with its last rung before the final epoch; None when the trials are too short.

    A decision at the final evaluation saves nothing (the trial is done) but would end the trial from outside
    before it closes its own records, hence max_t = epochs - 1 and stop_last_trials=False.
    """
    t = cfg.tuning
    if t.scheduler != "asha":
        return None
    max_t = epochs - 1
    if max_t < t.grace_period:
        logger.warning("ASHA off: trials run %d epoch(s), no rung fits before the last one (grace_period=%d)",
                       epochs, t.grace_period)  # fmt: skip
        return None
    return ASHAScheduler(
        time_attr="epoch",
        metric=METRIC,
        mode="max",
        max_t=max_t,
        grace_period=t.grace_period,
        reduction_factor=t.reduction_factor,
        stop_last_trials=False,
    )


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial holds: its workers (scaling.*) plus the trial's own driver process."""
    sc = cfg.scaling
    need = {"CPU": sc.num_workers * sc.cpus_per_worker + cfg.tuning.driver_cpus}
    if sc.use_gpu:
        need["GPU"] = float(sc.num_workers)
    for name, amount in sc.resources_per_worker.items():
        need[name] = need.get(name, 0.0) + sc.num_workers * amount
    return need


def max_concurrent(cfg: Config, cluster: dict[str, float], num_trials: int) -> int:
    """floor(cluster resources / one trial's needs) over CPU, GPU and custom resources, capped by the flag."""
    need = trial_resources(cfg)
    need["CPU"] += DATA_CPUS_PER_TRIAL
    fits = min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0)
    if fits < 1:
        # An autoscaling cluster may add the nodes later: run one at a time rather than refuse.
        logger.warning("one trial needs %s but the cluster has %s now; running one trial at a time", need,
                       {k: cluster.get(k, 0.0) for k in need})  # fmt: skip
        fits = 1
    cap = cfg.tuning.max_concurrent_trials or fits
    return max(1, min(fits, cap, num_trials))


# ------------------------------------------------------------------------------------------------ finish


def _exists(path: str, filesystem: pyarrow.fs.FileSystem | None) -> bool:
    if filesystem is None:
        return Path(path).exists()
    return filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def register_best(
    cfg: Config, best: res.TrialRow, run_id: str, tracking_uri: str, filesystem: pyarrow.fs.FileSystem | None
) -> tuple[LoggedModel, float]:
    """Log the best trial's best checkpoint as a model in its child run and register it; (model, its val/AP)."""
    client = MlflowClient(tracking_uri)
    tagged = client.get_run(run_id).data.tags.get(BEST_CHECKPOINT_TAG)
    # the trial's own pick (Train's best checkpoint) when it finished; a stopped trial's Tune-reported paths else
    paths = [p for p in [tagged, *best.checkpoints] if p and _exists(p, filesystem)]
    if not paths:
        raise RuntimeError(f"trial {best.trial_id}: none of its checkpoints exists any more ({best.checkpoints})")
    with ray.train.Checkpoint(paths[0], filesystem=filesystem).as_directory() as ckpt_dir:
        state = load_checkpoint(ckpt_dir)
    model = build_retinanet(config_from_dict(state.config).model)
    model.load_state_dict(state.model)
    val_ap = float((state.metrics or {}).get("val/AP", best.best_ap or 0.0))
    logged = log_and_register(
        model,
        label_map=state.label_map,
        config=state.config,
        tracking_uri=tracking_uri,
        run_id=run_id,
        registered_model_name=cfg.tracking.registered_model_name,
        alias="",  # the champion alias moves only on improvement: promote_if_better decides
        alias_min_ap=0.0,
        val_ap=val_ap,
    )
    client.set_tag(run_id, MODEL_URI_TAG, logged.model_uri)
    client.set_tag(run_id, BEST_CHECKPOINT_TAG, paths[0])
    return logged, val_ap


def _log_results(client: MlflowClient, parent: str, rows: list[res.TrialRow], cfg: Config, table: str) -> None:
    dims = searched(cfg.tuning)
    with tempfile.TemporaryDirectory() as tmp:
        res.write_csv(rows, dims, Path(tmp) / "results.csv")
        (Path(tmp) / "results.txt").write_text(table + "\n")
        client.log_artifacts(parent, tmp, "search")
    fig = res.plot(rows, dims)
    client.log_figure(parent, fig, "search/val_AP_vs_hyperparameters.png")
    counts = {s: sum(r.status == s for r in rows) for s in ("completed", "stopped", "failed")}
    metrics = {f"search/trials_{s}": float(n) for s, n in counts.items()}
    aps = [r.best_ap for r in rows if r.best_ap is not None and r.status != "failed"]
    if aps:
        metrics["search/best_val_AP"] = max(aps)
    for key, value in metrics.items():
        client.log_metric(parent, key, value)


# ------------------------------------------------------------------------------------------------ search


def run_search(cfg: Config, *, resume_errored: bool = False, config_path: str | None = None) -> SearchOutcome:
    """The whole search: checks, parent MLflow run, Tune (new or restored), table, registration, champion."""
    started = time.time()
    validate_tuning(cfg)  # before Ray starts: an invalid space never costs a trial
    cfg = with_search_defaults(cfg)
    t = cfg.tuning
    connect_ray(cfg)
    ensure_sample_data(cfg.data)
    labels = check_data(cfg)
    storage, filesystem, display = storage_location(t.storage_path)
    experiment_display = s3.join(display, t.name)
    experiment_path = s3.join(storage, t.name) if filesystem is not None else str(Path(storage) / t.name)
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    client = MlflowClient(tracking_uri)
    parent_id, parent_resumed = tracking.start_or_resume_run(
        tracking_uri, cfg.tracking.experiment, t.name, experiment_display, flatten(to_dict(cfg))
    )
    try:
        if config_path:
            client.log_artifact(parent_id, config_path, "config")
        setup = TrialSetup(
            base=to_dict(cfg),
            trials_dir=s3.join(experiment_display, "trials"),
            tracking_uri=tracking_uri,
            experiment=cfg.tracking.experiment,
            parent_run_id=parent_id,
            label_map=labels,
        )
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": t.driver_cpus})
        resumed = tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem)
        if resumed:
            logger.info("resuming the search in %s", experiment_display)
            tuner = tune.Tuner.restore(
                experiment_path, trainable, resume_errored=resume_errored, storage_filesystem=filesystem
            )
        else:
            tuner = _new_tuner(cfg, trainable, storage, filesystem, parent_id, tracking_uri)
        tuner.fit()
        rows = res.collect(experiment_path, filesystem)
        table = res.format_table(rows, searched(t))
        _log_results(client, parent_id, rows, cfg, table)
        best = res.best_row(rows)
        best_run_id, model, champion = None, None, None
        if best is not None:
            best_run_id = find_child_run(tracking_uri, cfg.tracking.experiment, parent_id, best.trial_id)
            parent_tags = client.get_run(parent_id).data.tags
            if parent_tags.get(BEST_TRIAL_TAG) == best.trial_id and MODEL_URI_TAG in parent_tags:
                logger.info("best trial %s already registered (%s)", best.trial_id, parent_tags[MODEL_URI_TAG])
            elif best_run_id is not None:
                model, val_ap = register_best(cfg, best, best_run_id, tracking_uri, filesystem)
                if cfg.tracking.alias:
                    champion = res.promote_if_better(
                        client, model.registered_name, cfg.tracking.alias, model.version, val_ap,
                        cfg.tracking.alias_min_ap,
                    )  # fmt: skip
                    for key, value in champion.tags().items():
                        client.set_tag(parent_id, key, value)
                client.set_tag(parent_id, BEST_TRIAL_TAG, best.trial_id)
                client.set_tag(parent_id, "retina.tune.best_run_id", best_run_id)
                client.set_tag(parent_id, MODEL_URI_TAG, model.model_uri)
                client.set_tag(parent_id, "retina.registered_version", f"{model.registered_name}/{model.version}")
    except KeyboardInterrupt:
        tracking.end_run(tracking_uri, parent_id, "KILLED")
        raise
    except BaseException as exc:
        client.set_tag(parent_id, "retina.error", f"{type(exc).__name__}: {exc}"[:5000])
        tracking.end_run(tracking_uri, parent_id, "FAILED")
        raise
    tracking.end_run(tracking_uri, parent_id, "FINISHED" if best is not None else "FAILED")
    return SearchOutcome(experiment_display, parent_id, tracking_uri, rows, table, best, best_run_id, model, champion,
                         resumed or parent_resumed, time.time() - started)  # fmt: skip


def _new_tuner(
    cfg: Config, trainable: Any, storage: str, filesystem: Any, parent_id: str, tracking_uri: str
) -> tune.Tuner:
    t = cfg.tuning
    grid = t.search_alg == "grid"
    num_trials = grid_size(t) if grid else t.num_samples
    if grid and t.num_samples != num_trials:
        logger.info("grid search: %d trials (one per grid point; tuning.num_samples is not used)", num_trials)
    concurrency = max_concurrent(cfg, ray.cluster_resources(), num_trials)
    epochs = expected_epochs(cfg)
    logger.info("search %s: %d trial(s), %d at a time, %d epoch(s) each, %s + %s", t.name, num_trials, concurrency,
                epochs, t.search_alg, t.scheduler)  # fmt: skip
    return tune.Tuner(
        trainable,
        param_space=grid_space(t) if grid else {},
        tune_config=tune.TuneConfig(
            search_alg=build_searcher(t),
            scheduler=build_scheduler(cfg, epochs),
            num_samples=1 if grid else t.num_samples,
            max_concurrent_trials=concurrency,
            reuse_actors=False,  # a trial's process holds its Train controller; never hand it to the next trial
            trial_name_creator=TrialNamer(offset=0 if grid else 1),
        ),
        run_config=tune.RunConfig(
            name=t.name,
            storage_path=storage,
            storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=t.max_failures, fail_fast=False),
            callbacks=[TrialRunStatus(tracking_uri, cfg.tracking.experiment, parent_id)],
        ),
    )


# ------------------------------------------------------------------------------------------------ CLI


def summary(outcome: SearchOutcome) -> str:
    lines = [
        f"search done in {outcome.seconds:.0f} s{' (resumed)' if outcome.resumed else ''}: {len(outcome.rows)} trials",
        "",
        outcome.table,
        "",
        f"  search folder (restore): {outcome.experiment_path}",
        f"  MLflow parent run:       {outcome.parent_run_id} in {outcome.tracking_uri}",
    ]
    if outcome.best is not None:
        b = outcome.best
        params = " ".join(f"{k}={v:.4g}" for k, v in b.params.items())
        lines.append(f"  best trial:              {b.name} ({params}) {METRIC}={b.best_ap:.4f}")
    if outcome.model is not None:
        lines.append(f"  registered:              {outcome.model.registered_name} v{outcome.model.version} "
                     f"({outcome.model.model_uri})")  # fmt: skip
    if outcome.champion is not None:
        lines.append(f"  champion:                {outcome.champion.summary()}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.docstring_parser(__doc__)
    cli.add_config_arguments(parser, "configs/smoke.yaml", "--set tuning.gamma.high=3")
    parser.add_argument("--num-samples", type=int, help="trials to run (tuning.num_samples)")
    parser.add_argument("--max-concurrent-trials", type=int, help="cap on trials at a time (0: as the cluster fits)")
    parser.add_argument("--search-alg", choices=["tpe", "random", "grid"], help="tuning.search_alg (default tpe)")
    parser.add_argument("--scheduler", choices=["asha", "none"], help="tuning.scheduler (default asha)")
    parser.add_argument("--resume-errored", action="store_true", help="on restore, run failed trials again")
    return parser.parse_args(argv)


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """--set values, then the dedicated flags (which win)."""
    flags = {
        "tuning.num_samples": args.num_samples,
        "tuning.max_concurrent_trials": args.max_concurrent_trials,
        "tuning.search_alg": args.search_alg,
        "tuning.scheduler": args.scheduler,
    }
    return [*args.overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, overrides_from_args(args))
        validate_tuning(cfg)
    except ConfigError as exc:
        print(f"search: config error: {exc}", file=sys.stderr)
        return 2
    try:
        outcome = run_search(cfg, resume_errored=args.resume_errored, config_path=args.config)
    except (ConfigError, DataError) as exc:
        print(f"search: error: {exc}", file=sys.stderr)
        return 2
    print(summary(outcome))
    return 0 if outcome.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
