"""A hyperparameter search as a library: the Tune experiment over γ, α, π (, lr), each configuration trained with
`tuning.seeds` seeds (`tuning.seeds`), each trial one Ray Train run (`tuning.trial`), results read back from storage
(`tuning.results`) and grouped by configuration (`tuning.configurations`), the best configuration's best seed's
model registered and promoted.
The command over it is ``python tuning/search.py`` (its --help describes resume, MLflow and the cluster).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray
import ray.train
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from cluster import s3
from cluster.storage import absolute, storage_location
from pipelines import console, names
from pipelines.tracking import store
from pipelines.tracking.alias import ChampionDecision
from pipelines.tracking.model_logging import LoggedModel, log_and_register
from pipelines.training.capacity import CapacityError
from pipelines.training.checkpoint import model_from_state
from pipelines.training.faults import Faults
from pipelines.training.run import Prepared, prepare_run
from pipelines.training.trainer import read_checkpoint
from retina.typed_config import flatten, to_dict
from tuning import configurations as cf
from tuning import paper as pp
from tuning import results as res
from tuning import seeds, status
from tuning.config import SearchConfig
from tuning.console import TrialLines, configure, shown_names, tune_output
from tuning.space import DIMENSIONS, METRIC, Dimension, searched
from tuning.trial import (
    TrialNamer,
    TrialRunStatus,
    TrialSetup,
    close_interrupted,
    find_child_run,
    recorded_status,
    run_trial,
)

logger = logging.getLogger("retina.tune")


@dataclass
class SearchOutcome:
    experiment_path: str  # the Tune experiment (restore from here)
    parent_run_id: str
    tracking_uri: str
    rows: list[res.TrialRow]
    table: str
    best: res.TrialRow | None  # the trial registered: the best seed of the best configuration (`best_config`)
    best_run_id: str | None  # the best trial's MLflow child run
    model: LoggedModel | None  # registered model of the best trial (None: no trial finished, or done before)
    champion: ChampionDecision | None
    resumed: bool
    seconds: float
    paper_table: str = ""  # a grid over one or two hyperparameters: the paper's layout (tuning.results)
    experiment: str = ""  # the MLflow experiment of the parent run
    experiment_id: str = ""
    best_config: cf.Configuration | None = None  # the best mean val/AP over its seeds (tuning.configurations)
    configurations_table: str = ""  # one line per configuration, best mean first (only with several seeds)
    interrupted: bool = False  # Ctrl-C: Tune saved its state; nothing was logged to the parent or registered


# ------------------------------------------------------------------------------------------------ set-up


def with_search_defaults(cfg: SearchConfig) -> SearchConfig:
    """tuning.name/storage_path filled in (from run.*), local paths absolute (trials run in other directories)."""
    t = cfg.tuning
    storage = absolute(t.storage_path or cfg.run.storage_path)
    tuning = dataclasses.replace(t, name=t.name or f"{cfg.run.name}_search", storage_path=storage)
    return dataclasses.replace(cfg, tuning=tuning)


def build_scheduler(cfg: SearchConfig, epochs: int) -> TrialScheduler | None:
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


def trial_resources(cfg: SearchConfig) -> dict[str, float]:
    """What one trial holds: its workers (scaling.*) plus the trial's own driver process."""
    sc = cfg.scaling
    need = {"CPU": sc.num_workers * sc.cpus_per_worker + cfg.tuning.driver_cpus}
    if sc.use_gpu:
        need["GPU"] = float(sc.num_workers)
    for name, amount in sc.resources_per_worker.items():
        need[name] = need.get(name, 0.0) + sc.num_workers * amount
    for name, amount in cfg.tuning.driver_resources.items():
        need[name] = need.get(name, 0.0) + amount
    return need


def max_concurrent(cfg: SearchConfig, cluster: dict[str, float], num_trials: int) -> int:
    """floor(cluster resources / one trial's needs) over CPU, GPU and custom resources, capped by the flag."""
    # each trial also reserves its own data CPUs (pipelines/training/reservation.py), outside its placement group
    need = trial_resources(cfg) | {"CPU": cfg.scaling.run_cpus + cfg.tuning.driver_cpus}
    fits = min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0)
    if fits < 1:
        have = {k: cluster.get(k, 0.0) for k in need}
        if cfg.scaling.capacity_wait_s <= 0:  # nothing will add the nodes: refuse now, not a trial that never starts
            raise CapacityError(
                f"one trial needs {need} (its workers, tuning.driver_cpus and scaling.data_cpus) but the cluster "
                f"has {have}: lower scaling.num_workers, scaling.cpus_per_worker or scaling.data_cpus, add nodes, "
                "or on an autoscaling cluster set scaling.capacity_wait_s to run the trials one at a time as nodes "
                "come"
            )
        logger.warning("one trial needs %s but the cluster has %s now; running one trial at a time (an autoscaling "
                       "cluster may add the nodes: scaling.capacity_wait_s)", need, have)  # fmt: skip
        fits = 1
    cap = cfg.tuning.max_concurrent_trials or fits
    return max(1, min(fits, cap, num_trials))


# ------------------------------------------------------------------------------------------------ finish


def _exists(path: str, filesystem: pyarrow.fs.FileSystem | None) -> bool:
    if filesystem is None:
        return Path(path).exists()
    return filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def register_best(
    cfg: SearchConfig, best: res.TrialRow, run_id: str, tracking_uri: str, filesystem: pyarrow.fs.FileSystem | None
) -> tuple[LoggedModel, float]:
    """Log the best trial's best checkpoint as a model in its child run and register it; (model, its val/AP)."""
    client = MlflowClient(tracking_uri)
    tagged = client.get_run(run_id).data.tags.get(names.BEST_CHECKPOINT_TAG)
    # the trial's own pick (Train's best checkpoint) when it finished; a stopped trial's Tune-reported paths else
    paths = [p for p in [tagged, *best.checkpoints] if p and _exists(p, filesystem)]
    if not paths:
        raise RuntimeError(f"trial {best.trial_id}: none of its checkpoints exists any more ({best.checkpoints})")
    state = read_checkpoint(ray.train.Checkpoint(paths[0], filesystem=filesystem))
    val_ap = float((state.metrics or {}).get(names.VAL_AP, best.best_ap or 0.0))
    logged = log_and_register(
        model_from_state(state),
        label_map=state.label_map,
        config=state.config,
        tracking_uri=tracking_uri,
        run_id=run_id,
        registered_model_name=cfg.tracking.registered_model_name,
        alias=cfg.tracking.alias,  # the one alias rule (pipelines/tracking/alias.py), as for a training run
        alias_min_ap=cfg.tracking.alias_min_ap,
        val_ap=val_ap,
    )
    client.set_tag(run_id, names.MODEL_URI_TAG, logged.model_uri)
    client.set_tag(run_id, names.BEST_CHECKPOINT_TAG, paths[0])
    return logged, val_ap


def base_values(cfg: SearchConfig) -> dict[str, float]:
    """Each hyperparameter's value in the search's config (what a trial that does not search it trains with)."""
    values = {}
    for d in DIMENSIONS:
        node: Any = cfg
        for key in d.target:
            node = getattr(node, key)
        values[d.name] = float(node)
    return values


def trial_lines(
    cfg: SearchConfig, experiment_display: str, recorded: Callable[[str], str | None] | None = None
) -> TrialLines:
    """The console's line per ended trial: γ, α, π (searched or not) and whatever else is searched; `recorded`:
    trial id → the status the trial recorded in MLflow (`tuning.trial.recorded_status`)."""
    return TrialLines(shown_names(searched(cfg.tuning)), base_values(cfg), experiment_display, recorded)


def paper_dims(cfg: SearchConfig) -> list[Dimension] | None:
    """The searched dimensions when the search is a grid the paper's table can show (one or two), else None."""
    dims = searched(cfg.tuning)
    return dims if cfg.tuning.search_alg == "grid" and pp.paper_layout(dims) is not None else None


def _log_results(
    client: MlflowClient, parent: str, rows: list[res.TrialRow], cfg: SearchConfig, table: str, paper: str
) -> None:
    dims = searched(cfg.tuning)
    configs = cf.by_mean(cf.group(rows))
    with tempfile.TemporaryDirectory() as tmp:
        res.write_csv(rows, dims, Path(tmp) / "results.csv")
        (Path(tmp) / "results.txt").write_text(table + "\n")
        # per configuration, whatever tuning.seeds is (n = 1 each with one seed): one schema for every search
        cf.write_csv(configs, dims, Path(tmp) / "configurations.csv")
        (Path(tmp) / "configurations.txt").write_text(cf.format_table(configs, dims) + "\n")
        if paper:  # the study presets (configs/focal_study.yaml): the paper's Table 1 layout
            pp.write_paper_csv(rows, dims, Path(tmp) / "paper_table.csv")
            (Path(tmp) / "paper_table.txt").write_text(paper + "\n")
        client.log_artifacts(parent, tmp, "search")
    fig = res.plot(rows, dims)
    client.log_figure(parent, fig, "search/val_AP_vs_hyperparameters.png")
    if paper:
        client.log_figure(parent, pp.heatmap(rows, dims), "search/val_AP_heatmap.png")
    counts = {s: sum(r.status == s for r in rows) for s in status.ENDED}
    metrics = {f"search/trials_{s}": float(n) for s, n in counts.items()}
    aps = [r.best_ap for r in rows if r.best_ap is not None and not r.failed]
    if aps:
        metrics["search/best_val_AP"] = max(aps)  # the best single trial (seed), whichever configuration it is in
    metrics["search/configurations"] = float(len(configs))
    best = cf.champion(configs)
    if best is not None:  # the champion configuration: its mean, spread and n over its seeds
        metrics["search/best_config_mean_val_AP"] = float(best.mean or 0.0)
        metrics["search/best_config_n"] = float(best.n)
        if best.std is not None:
            metrics["search/best_config_std_val_AP"] = best.std
    for key, value in metrics.items():
        client.log_metric(parent, key, value)


# ------------------------------------------------------------------------------------------------ search


def run_search(cfg: SearchConfig, *, resume_errored: bool = False, config_path: str | None = None) -> SearchOutcome:
    """The whole search: checks, parent MLflow run, Tune (new or restored), table, registration, champion."""
    started = time.time()
    console.quiet_libraries()  # Optuna (imported with tuning.space) set its logger to INFO: "A new study created"
    run = prepare_run(with_search_defaults(cfg), driver_cpus=cfg.tuning.driver_cpus)
    cfg = run.config
    t = cfg.tuning
    storage, filesystem, display = storage_location(t.storage_path)
    experiment_display = s3.join(display, t.name)
    experiment_path = s3.join(storage, t.name) if filesystem is not None else str(Path(storage) / t.name)
    tracking_uri = store.resolve_tracking_uri(cfg.tracking.tracking_uri)
    parent_id, parent_resumed = store.start_or_resume_run(
        tracking_uri, cfg.tracking.experiment, t.name, experiment_display, flatten(to_dict(cfg))
    )
    with store.tracked_run(tracking_uri, parent_id) as parent_status:
        if config_path:
            MlflowClient(tracking_uri).log_artifact(parent_id, config_path, "config")
        setup = TrialSetup(run, s3.join(experiment_display, "trials"), tracking_uri, cfg.tracking.experiment,
                           parent_id, Faults.from_env())  # fmt: skip
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, setup=setup), {"CPU": t.driver_cpus, **t.driver_resources}
        )
        resumed = tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem)
        if resumed:
            logger.info("resuming the search in %s", experiment_display)
            tuner = tune.Tuner.restore(experiment_path, trainable, resume_errored=resume_errored,
                                       storage_filesystem=filesystem)  # fmt: skip
        else:
            tuner = _new_tuner(run, trainable, storage, filesystem, parent_id, tracking_uri)
        recorded = functools.partial(recorded_status, tracking_uri, cfg.tracking.experiment, parent_id)
        configure(tuner, trial_lines(cfg, experiment_display, recorded), console.is_verbose())
        with tune_output(console.is_verbose()):
            tuner.fit()
        client = MlflowClient(tracking_uri)
        rows = res.with_run_facts(res.collect(experiment_path, filesystem), client, parent_id)
        table = res.format_table(res.by_ap(rows), searched(t))
        configs = cf.group(rows)
        # with one seed each configuration is one trial: the trial table says it all
        config_table = cf.format_table(cf.by_mean(configs), searched(t)) if res.seeded(rows) else ""
        dims = paper_dims(cfg)
        paper = pp.format_paper_table(rows, dims) if dims and rows else ""
        experiment_id = client.get_run(parent_id).info.experiment_id
        # Tune returns normally from Ctrl-C (it saves its state first): with trials not ended, nothing is decided
        unfinished = [r.trial_id for r in rows if r.status not in status.ENDED]
        if unfinished:
            close_interrupted(tracking_uri, cfg.tracking.experiment, parent_id, unfinished)
            parent_status.status = "KILLED"
            return SearchOutcome(experiment_display, parent_id, tracking_uri, rows, table, None, None, None, None,
                                 resumed or parent_resumed, time.time() - started, paper, cfg.tracking.experiment,
                                 experiment_id, None, config_table, interrupted=True)  # fmt: skip
        _log_results(client, parent_id, rows, cfg, table, paper)
        best_config = cf.champion(configs)  # the best mean val/AP; its best seed's model is the one registered
        best = best_config.best if best_config is not None else None
        best_run_id, model, champion = _register_best_trial(cfg, best, parent_id, tracking_uri, filesystem)
        parent_status.status = "FINISHED" if best is not None else "FAILED"
    return SearchOutcome(experiment_display, parent_id, tracking_uri, rows, table, best, best_run_id, model, champion,
                         resumed or parent_resumed, time.time() - started, paper, cfg.tracking.experiment,
                         experiment_id, best_config, config_table)  # fmt: skip


def _register_best_trial(
    cfg: SearchConfig, best: res.TrialRow | None, parent_id: str, tracking_uri: str, filesystem: Any
) -> tuple[str | None, LoggedModel | None, ChampionDecision | None]:
    """Register the best trial's model (once: a resumed search that registered it already skips this) and move
    the alias to it if it beats the current champion. (best trial's MLflow run, model, champion decision)."""
    if best is None:
        return None, None, None
    client = MlflowClient(tracking_uri)
    best_run_id = find_child_run(tracking_uri, cfg.tracking.experiment, parent_id, best.trial_id)
    parent_tags = client.get_run(parent_id).data.tags
    if parent_tags.get(names.BEST_TRIAL_TAG) == best.trial_id and names.MODEL_URI_TAG in parent_tags:
        logger.info("best trial %s already registered (%s)", best.trial_id, parent_tags[names.MODEL_URI_TAG])
        return best_run_id, None, None
    if best_run_id is None:
        return None, None, None
    model, _ = register_best(cfg, best, best_run_id, tracking_uri, filesystem)
    champion = model.champion
    if champion is not None:  # on the parent run too: the search's decision, next to its table
        for key, value in champion.tags().items():
            client.set_tag(parent_id, key, value)
    tags = {
        names.BEST_TRIAL_TAG: best.trial_id,
        names.BEST_RUN_ID_TAG: best_run_id,
        names.MODEL_URI_TAG: model.model_uri,
        names.REGISTERED_VERSION_TAG: f"{model.registered_name}/{model.version}",
    }
    for key, value in tags.items():
        client.set_tag(parent_id, key, value)
    return best_run_id, model, champion


def _new_tuner(
    run: Prepared, trainable: Any, storage: str, filesystem: Any, parent_id: str, tracking_uri: str
) -> tune.Tuner:
    cfg = run.config
    t = cfg.tuning
    grid = t.search_alg == "grid"
    configurations, num_trials = seeds.num_configurations(cfg), seeds.num_trials(cfg)
    if grid and t.num_samples != configurations:
        logger.info("grid search: %d configurations (one per grid point; tuning.num_samples is not used)",
                    configurations)  # fmt: skip
    concurrency = max_concurrent(cfg, ray.cluster_resources(), num_trials)
    epochs = run.epochs()
    per_seed = f" ({configurations} configurations x {t.seeds} seeds)" if t.seeds > 1 else ""
    logger.info("search %s: %d trial(s)%s, %d at a time, %d epoch(s) each, %s + %s", t.name, num_trials, per_seed,
                concurrency, epochs, t.search_alg, t.scheduler)  # fmt: skip
    scheduler = build_scheduler(cfg, epochs)
    if scheduler is not None and t.seeds > 1:
        logger.info("ASHA judges each seed as its own trial: it may stop some seeds of a configuration and not "
                    "others (docs/search.md, Seeds); --scheduler none compares whole trainings")  # fmt: skip
    return tune.Tuner(
        trainable,
        param_space=seeds.param_space(cfg),
        tune_config=tune.TuneConfig(
            search_alg=seeds.searcher(cfg),
            scheduler=scheduler,
            num_samples=seeds.tune_num_samples(cfg),
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


def summary(outcome: SearchOutcome) -> str:
    """What the command prints at the end: every trial, best val/AP first, then the best trial, its registered
    model and where to look (the MLflow parent run, the Tune folder to resume from)."""
    ended = "interrupted after" if outcome.interrupted else "done in"
    lines = [
        f"search {ended} {console.duration(outcome.seconds)}{' (resumed)' if outcome.resumed else ''}: "
        f"{len(outcome.rows)} trials, {res.state_counts(outcome.rows) or 'none ran'}",
        "",
        *([outcome.configurations_table, ""] if outcome.configurations_table else []),
        outcome.table,
        "",
        *([outcome.paper_table, ""] if outcome.paper_table else []),
    ]
    if outcome.interrupted:
        lines.append("  nothing registered yet:  run the same command again to continue the search (finished trials "
                     "are kept, interrupted ones continue from their checkpoints)")  # fmt: skip
    else:
        lines += _best_lines(outcome)
    if outcome.model is not None:
        lines.append(f"  registered:              {outcome.model.registered_name} v{outcome.model.version} "
                     f"({outcome.model.model_uri})")  # fmt: skip
    if outcome.champion is not None:
        lines.append(f"  champion:                {outcome.champion.summary()}")
    where = f" in experiment '{outcome.experiment}'" if outcome.experiment else ""
    ui = console.mlflow_ui(outcome.tracking_uri, outcome.experiment_id, outcome.parent_run_id)
    lines += [
        f"  MLflow parent run:       {outcome.parent_run_id}{where} at {outcome.tracking_uri} "
        "(one child run per trial)",
        f"  MLflow UI:               {ui}",
        f"  search folder (restore): {outcome.experiment_path}",
    ]
    return "\n".join(lines)


def _best_lines(outcome: SearchOutcome) -> list[str]:
    """The best trial; with several seeds, the best configuration (highest mean) and its best seed, whose model is
    the one registered."""
    b, c = outcome.best, outcome.best_config
    if b is None:
        return ["  best trial:              none (no trial evaluated without failing)"]
    ap50 = "" if b.ap50 is None else f" AP50={b.ap50:.4f}"
    if c is None or b.seed is None:
        params = " ".join(f"{k}={v:.4g}" for k, v in b.params.items())
        return [f"  best trial:              {b.name} ({params}) {METRIC}={b.best_ap:.4f}{ap50}"]
    params = " ".join(f"{k}={v:.4g}" for k, v in c.params.items())
    return [
        f"  best configuration:      {params}: mean {METRIC}={cf.mean_text(c)}, the highest mean; "
        "its best seed's model is registered",
        f"  its best seed:           {b.name} (seed={b.seed}) {METRIC}={b.best_ap:.4f}{ap50}",
    ]
