"""End to end: 2-worker DDP training on CPU with the smoke config, against a real MLflow server on 127.0.0.1
whose artifact store is S3 on a local moto server, with the Ray Train checkpoints on that S3 too. One worker
raises once at step 5 (after the step-4 checkpoint; ``RETINA_TEST_FAULTS`` in this process, the run's driver):
the run must resume from that checkpoint, finish with a continuous step count, and keep a single MLflow run. The
training runs once (module fixture); each test below checks one consequence.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from pipelines import names
from pipelines.training.faults import ENV as FAULTS_ENV
from tests._train_helpers import SMOKE_CONFIG, data_overrides, smoke_data  # noqa: F401
from tests.s3_server import _free_port, s3_server  # noqa: F401

pytestmark = pytest.mark.slow

RUN_NAME = "smoke_e2e"
MODEL_NAME = "retinanet-e2e"
ALIAS = "candidate"


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory):  # noqa: F811
    """`mlflow server` on 127.0.0.1 (SQLite backend), proxying artifacts to s3://<bucket>/mlflow on moto."""
    bucket = s3_server.new_bucket("mlflow")
    work = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = dict(os.environ, **s3_server.env, MLFLOW_S3_ENDPOINT_URL=s3_server.endpoint_url)
    command = [
        str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{work}/mlflow.db", "--artifacts-destination", f"{bucket}/mlflow",
        "--workers", "1",
    ]  # fmt: skip
    log = open(work / "server.log", "wb")  # noqa: SIM115  (closed below)
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180  # a loaded 2-core machine has taken 60 s
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError as exc:
                if process.poll() is not None or time.time() > deadline:
                    log_text = (work / "server.log").read_text()[-2000:]
                    raise RuntimeError(f"mlflow server did not start: {log_text}") from exc
                time.sleep(0.5)
        yield {"uri": uri, "bucket": bucket}
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # its own process group: the server and its uvicorn workers
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def trained(ray_local, smoke_data, mlflow_server, s3_server, tmp_path_factory):  # noqa: F811
    from pipelines.config import load_config
    from pipelines.training.run import run_training

    storage = s3_server.new_bucket("ckpt") + "/runs"
    marker = tmp_path_factory.mktemp("fault") / "failed_once"
    cfg = load_config(
        SMOKE_CONFIG,
        data_overrides(smoke_data)
        + [
            f"run.name={RUN_NAME}",
            f"run.storage_path={storage}",
            "run.max_failures=1",
            # scored in place: the step-4 checkpoint is reported before the failure injected at step 5 (scored in
            # the background it would be reported a step or two later; tests/pipelines/test_background_eval.py)
            "train.background_eval=false",
            # uploaded before report() returns: an asynchronous upload may still be running when step 5 fails, and
            # Ray rightly never resumes from a checkpoint whose upload did not finish
            "run.async_upload=false",
            f"tracking.tracking_uri={mlflow_server['uri']}",
            "tracking.experiment=retina-e2e",
            f"tracking.registered_model_name={MODEL_NAME}",
            f"tracking.alias={ALIAS}",
            "tracking.system_metrics_interval_s=1",  # points enough in a run of seconds (default: every 10 s)
        ],
    )
    mp = pytest.MonkeyPatch()
    mp.setenv(FAULTS_ENV, json.dumps({"fail_at_step": 5, "fail_marker": str(marker)}))
    try:
        outcome = run_training(cfg, str(SMOKE_CONFIG))
    finally:
        mp.undo()
    return {"outcome": outcome, "cfg": cfg, "storage": storage, "marker": marker}


def _client(mlflow_server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(mlflow_server["uri"])


def test_failure_injected_and_resumed_from_checkpoint(trained, mlflow_server):
    outcome = trained["outcome"]
    assert trained["marker"].exists(), "the injected failure never fired"
    assert outcome.metrics[names.STEP] == 6 and outcome.metrics[names.EPOCH] == 2
    tags = _client(mlflow_server).get_run(outcome.mlflow_run_id).data.tags
    assert tags[names.RESUMED_FROM_TAG] == "4"  # restarted from the step-4 checkpoint, not from scratch


def test_one_mlflow_run_with_continuous_metrics(trained, mlflow_server):
    client = _client(mlflow_server)
    outcome = trained["outcome"]
    exp = client.get_experiment_by_name("retina-e2e")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [outcome.mlflow_run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags[names.RUN_KEY_TAG] == f"{trained['storage']}/{RUN_NAME}"
    assert run.data.tags[names.MODEL_URI_TAG] == outcome.model.model_uri
    assert run.data.tags[names.REGISTERED_VERSION_TAG] == f"{MODEL_NAME}/{outcome.model.version}"
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, names.TRAIN_LOSS)]
    assert loss_steps == [2, 4, 6]  # steps 5-6 ran twice, logged once
    ap_steps = [m.step for m in client.get_metric_history(run.info.run_id, names.VAL_AP)]
    assert ap_steps == [4, 6]
    for key in ("val/AP", "val/AP50", "val/AP75", "val/APs", "val/APm", "val/APl", "train/lr", "train/images_per_s"):
        assert key in run.data.metrics, key
        assert 0 <= run.data.metrics[key] < 1e6
    per_class = {k for k in run.data.metrics if k.startswith("val/class_AP/")}
    assert per_class and per_class <= {f"val/class_AP/{n}" for n in ("circle", "square", "triangle", "cross", "star")}
    # class-agnostic AP bounds the class-aware one from above: classification can only lose matches
    assert run.data.metrics["val/agnostic_AP50"] >= run.data.metrics["val/AP50"] - 1e-9
    assert run.data.params["train.base_lr"] == "0.01"
    assert run.data.params["model.backbone.name"] == "resnet18"
    assert run.data.params["scaling.num_workers"] == "2"


def test_system_metrics_one_series_per_node(trained, mlflow_server):
    """Each node's local rank 0 logs MLflow's system metrics into the run as system/<host>/<metric>: this one node
    (2 workers) has one monitor, whose steps never repeat, also across the restart after step 5."""
    client = _client(mlflow_server)
    run_id = trained["outcome"].mlflow_run_id
    node = socket.gethostname()
    system = [k for k in client.get_run(run_id).data.metrics if k.startswith("system/")]
    assert all(k.startswith(f"system/{node}/") for k in system), system
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "system_memory_usage_percentage"):
        assert f"system/{node}/{name}" in system, system
    history = client.get_metric_history(run_id, f"system/{node}/cpu_utilization_percentage")
    steps = [m.step for m in history]
    assert len(steps) >= 2 and len(steps) == len(set(steps)), steps
    assert all(0 <= m.value <= 100 for m in history)


def test_artifacts_logged(trained, mlflow_server):
    client = _client(mlflow_server)
    run_id = trained["outcome"].mlflow_run_id

    def files(path=None):
        out = []
        for item in client.list_artifacts(run_id, path):
            out.extend(files(item.path) if item.is_dir else [item.path])
        return out

    logged = set(files())
    for name in ("config/config.json", "config/smoke.yaml", "label_map.json", "evaluation/report.json",
                 "evaluation/cocoeval.txt", "evaluation/confusion.txt", "curves/loss_curve.png",
                 "curves/ap_curve.png"):  # fmt: skip
        assert name in logged, (name, sorted(logged))
    assert len([f for f in logged if f.startswith("val_images/")]) == 2
    report = json.loads(Path(client.download_artifacts(run_id, "evaluation/report.json")).read_text())
    assert report["step"] == 6 and report["num_images"] == 8
    # every val object is counted once: found as itself, as another class, or missed
    confusion = report["confusion"]
    assert {r["name"] for r in confusion} == {"circle", "square", "triangle", "cross", "star"}
    assert all(r["correct"] + sum(r["as_other"].values()) + r["missed"] == r["objects"] for r in confusion)
    labels = json.loads(Path(client.download_artifacts(run_id, "label_map.json")).read_text())
    assert [c["id"] for c in labels] == [1, 3, 7, 12, 90]  # the synthetic set's non-contiguous COCO ids


def test_model_registered_with_alias(trained, mlflow_server):
    client = _client(mlflow_server)
    outcome = trained["outcome"]
    version = client.get_model_version_by_alias(MODEL_NAME, ALIAS)
    assert version.version == outcome.model.version
    assert version.run_id == outcome.mlflow_run_id
    assert names.VERSION_VAL_AP_TAG in version.tags
    # the model page and the run explain themselves: how to load, what the labels mean
    uri = f"models:/{MODEL_NAME}/{outcome.model.version}"
    assert f"load_model('{uri}')" in version.description and "COCO id 90" in version.description
    note = client.get_run(outcome.mlflow_run_id).data.tags[names.MLFLOW_NOTE_TAG]
    assert f"Registered as **{MODEL_NAME}** version {outcome.model.version}" in note and "val/AP" in note


def test_checkpoints_on_s3_load_weights_only(trained, s3_server, tmp_path):  # noqa: F811
    from cluster import s3
    from pipelines.training.checkpoint import STATE_FILE, load_checkpoint

    run_dir = f"{trained['storage']}/{RUN_NAME}"
    files = list(s3.list_files(run_dir))
    states = sorted(f for f in files if f.endswith(f"/{STATE_FILE}"))
    # num_to_keep=1 best by val/AP, plus Ray always keeps the latest
    assert 1 <= len(states) <= 2, files
    latest = max(states)
    (tmp_path / STATE_FILE).write_bytes(s3.read_bytes(latest))
    state = load_checkpoint(tmp_path)  # torch.load(weights_only=True) inside
    # its place in the data: one epoch of 4 steps done, 2 steps into the next, by 2 ranks
    assert state.step == 6 and (state.epoch, state.epoch_step, state.world) == (1, 2, 2)
    assert [c["id"] for c in state.label_map] == [1, 3, 7, 12, 90]
    assert state.config["run"]["name"] == RUN_NAME
    assert all(torch.isfinite(v).all() for v in state.model.values() if v.is_floating_point())


def test_logged_model_loads_in_fresh_process(trained, mlflow_server, smoke_data):  # noqa: F811
    """From the tracking server (artifacts on S3) into a process that imports nothing of this repository: MLflow's
    own pyfunc loader, with pickle deserialisation refused."""
    script = f"""
import json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model("models:/{MODEL_NAME}@{ALIAS}")
out = model.predict(pd.DataFrame({{"image": [open(sys.argv[1], "rb").read()]}}))
row = out.iloc[0]
ids = sorted(set(row["category_ids"]))
print(json.dumps({{"columns": sorted(out.columns), "boxes": len(row["boxes"]), "ids": ids}}))
"""
    image = sorted(Path(smoke_data["root"], "val", "images").glob("*.jpg"))[0]
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server["uri"], MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    proc = subprocess.run([sys.executable, "-c", script, str(image)], env=env, capture_output=True, text=True,
                          timeout=180, cwd="/")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["columns"] == ["boxes", "category_ids", "error", "labels", "names", "scores"]
    assert set(out["ids"]) <= {1, 3, 7, 12, 90}


def test_rerun_of_finished_run_does_nothing(trained, mlflow_server):
    """Same command again: the run is found (same MLflow run id), nothing retrains, no new model version."""
    from pipelines.training.run import run_training

    again = run_training(trained["cfg"])
    assert again.resumed and again.mlflow_run_id == trained["outcome"].mlflow_run_id
    assert again.model is None
    versions = _client(mlflow_server).search_model_versions(f"name='{MODEL_NAME}'")
    assert len(versions) == 1


def test_finished_run_is_reported_again_and_changed_settings_are_refused(trained):
    """Re-running a finished run does not train; with changed settings it stops, naming them and the ways forward."""
    import dataclasses

    from pipelines.training.run import run_training
    from retina.typed_config import ConfigError

    cfg, first = trained["cfg"], trained["outcome"]
    again = run_training(cfg)
    assert again.resumed and again.model is None and again.mlflow_run_id == first.mlflow_run_id
    assert again.metrics[names.VAL_AP] == pytest.approx(first.metrics[names.VAL_AP])
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, base_lr=0.02))
    with pytest.raises(ConfigError, match=r"train\.base_lr: 0\.01 -> 0\.02.*run\.name=smoke_e2e-2.*--restart"):
        run_training(changed)
