"""Every metric, tag and result-key name the pipelines and the search share: one owner, so a reader of a
dashboard, a test and the code all see the same spelling (a typo here is a test failure, not a silent zero).

Metric names carry a slash namespace used identically in ``ray.train.report``, Tune and MLflow.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------- metrics
VAL_PREFIX = "val/"  # training's evaluation: val/AP, val/AP50, ... val/class_AP/<name>, val/agnostic_AP
EVAL_PREFIX = "eval/"  # pipelines/evaluate.py's evaluation of a stored model
VAL_AP = "val/AP"  # the score of checkpoints, of Tune's trials and of the registry's alias gate
VAL_AP50 = "val/AP50"
VAL_AP75 = "val/AP75"
VAL_SECONDS = "val/seconds"  # how long an evaluation stopped training (inference; scoring unless in the background)
VAL_SCORE_SECONDS = "val/score_seconds"  # COCOeval's own time (in the background task, or on rank 0)
TRAIN_LOSS = "train/loss"
TRAIN_LOSS_CLS = "train/loss_cls"
TRAIN_LOSS_BOX = "train/loss_box"
TRAIN_LR = "train/lr"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_IMAGES_PER_S = "train/images_per_s"
TRAIN_EPOCH = "train/epoch"
TRAIN_EPOCH_IMAGES_PER_S = "train/epoch_images_per_s"
TRAIN_WORLD_SIZE = "train/world_size"  # workers in the group now (elastic runs change it)
TRAIN_GLOBAL_BATCH = "train/global_batch"  # images per optimizer step now: per-worker batch x world size
# The first step's loss of a fresh run, before any update (mean over the ranks), logged once at step 0: what the
# prior π sets (the paper's §3.3: with π = 0.5 the background anchors swamp it). Not logged again on resume.
TRAIN_INITIAL_LOSS = "train/initial_loss"
STARTUP_FIRST_STEP_S = "startup/first_step_s"  # the run's start on the driver → its first optimizer step done
CHECKPOINT_SECONDS = "checkpoint/seconds"  # how long the ranks waited for rank 0 to write (and, sync, upload) it
# Every checkpoint's score for Ray's retention: val/AP for an evaluated checkpoint, -1 for a step checkpoint (so
# Ray keeps the best evaluated ones plus the latest, and never scores a checkpoint by a missing key).
CHECKPOINT_SCORE = "checkpoint/score"
STEP_CHECKPOINT_SCORE = -1.0
STEP = "step"  # optimizer steps done, in every report
EPOCH = "epoch"  # epochs completed; Tune's ASHA counts time in it

# pipelines/evaluate.py --loss-analysis: the paper's Figure 4 on a stored model (pipelines/inference/loss_analysis.py)
LOSS_ANALYSIS_PREFIX = "loss_analysis/"
LOSS_ANALYSIS_KINDS = {"negative": "neg", "positive": "pos"}  # the curve → its short name in a metric
LOSS_ANALYSIS_NUM_NEGATIVES = "loss_analysis/num_negatives"  # background anchors analysed
LOSS_ANALYSIS_NUM_POSITIVES = "loss_analysis/num_positives"  # foreground anchors analysed
LOSS_ANALYSIS_NUM_IGNORED = "loss_analysis/num_ignored"  # anchors between the matcher's thresholds: in no curve


def loss_analysis_metric(gamma: float, kind: str, fraction: float) -> str:
    """The share of `kind`'s loss carried by its hardest `fraction` at γ: loss_analysis/gamma_2/neg_hardest_1pct."""
    return f"{LOSS_ANALYSIS_PREFIX}gamma_{gamma:g}/{LOSS_ANALYSIS_KINDS[kind]}_hardest_{100 * fraction:g}pct"


# ---------------------------------------------------------------------------------------------- MLflow tags
RUN_KEY_TAG = "retina.run_key"  # <storage_path>/<run name>: finds the MLflow run of a Train run on resume
MODEL_URI_TAG = "retina.model_uri"  # set once the model is logged: the run is done
REGISTERED_VERSION_TAG = "retina.registered_version"  # "<name>/<version>"
BEST_CHECKPOINT_TAG = "retina.best_checkpoint"
RESUMED_FROM_TAG = "retina.resumed_from_step"
ERROR_TAG = "retina.error"  # the exception (or non-finite loss message) that ended a run
MLFLOW_PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by
MLFLOW_NOTE_TAG = "mlflow.note.content"  # a run's description in the MLflow UI (markdown)
VERSION_VAL_AP_TAG = "val_AP"  # on a registered model version: the val/AP of the checkpoint it was made from
VERSION_RUN_ID_TAG = "mlflow_run_id"  # on a registered model version: the training run

# pipelines/evaluate.py: its run's tags, and the tags it sets on the registered version it evaluated (beside
# eval/AP ..., the metric names under EVAL_PREFIX)
TASK_TAG = "retina.task"  # what a run is for; an evaluation run's value is EVALUATION_TASK
EVALUATION_TASK = "evaluation"
MODEL_LOAD_URI_TAG = "retina.model_load_uri"  # the model URI as loaded (an alias pinned to its version)
TRAINING_RUN_ID_TAG = "retina.training_run_id"  # the run that trained the evaluated model
VERSION_EVAL_RUN_ID_TAG = f"{EVAL_PREFIX}run_id"  # on the version: the evaluation run
VERSION_EVAL_DATA_TAG = f"{EVAL_PREFIX}data"  # on the version: the shards it was evaluated on

# Tune: one parent run per search, one child per trial
TRIAL_ID_TAG = "retina.tune.trial_id"
TRIAL_STATUS_TAG = "retina.tune.status"  # completed | stopped (ASHA) | failed; set when the trial ends
BEST_TRIAL_TAG = "retina.tune.best_trial"
BEST_RUN_ID_TAG = "retina.tune.best_run_id"
CHAMPION_TAG_PREFIX = "retina.champion."  # on the search's parent run: the alias decision (candidate, previous...)

# ---------------------------------------------------------------------------------------------- artifacts
MODEL_ARTIFACT_PATH = "model"  # the logged model's name in its run: runs:/<run_id>/model
# The logged pyfunc model's one artifact: a folder with the weights-only state dict, config.json and
# label_map.json (the files are retina.inference.bundle's), from which the model is rebuilt without unpickling
MODEL_BUNDLE_ARTIFACT = "detector"
LEGACY_BUNDLE_DIR = "extra_files"  # where models of the earlier mlflow.pytorch format keep the same three files
EVAL_REPORT_ARTIFACT = "evaluation/report.json"  # an evaluation's numbers (training's and evaluate.py's)
EVAL_COCOEVAL_ARTIFACT = "evaluation/cocoeval.txt"  # pycocotools' summary, the agnostic line, the confusion table
EVAL_CONFUSION_ARTIFACT = "evaluation/confusion.txt"  # training's: per class, found as itself / as another / missed
VAL_IMAGES_ARTIFACT_DIR = "val_images"  # training's last evaluation: a few val images with true and predicted boxes
LOSS_ANALYSIS_FIGURE_ARTIFACT = "loss_analysis/loss_concentration.png"  # evaluate.py --loss-analysis: two panels
LOSS_ANALYSIS_TABLE_ARTIFACT = "loss_analysis/table.txt"  # the printed table
LOSS_ANALYSIS_RESULT_ARTIFACT = "loss_analysis/result.json"  # counts, totals, shares, curves

# ---------------------------------------------------------------------------------------------- result keys
NONFINITE_KEY = "nonfinite"  # in the dict a worker's train_func returns when the loss diverged
# In a trial's own last Tune report only: the trial ran to its end. Tune marks a scheduler-stopped trial's last
# result done=True too, so `done` cannot tell "completed" from "stopped by ASHA"; this key can.
TRIAL_FINISHED_KEY = "trial/finished"
