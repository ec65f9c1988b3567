"""`ray job submit --working-dir . -- python pipelines/train.py --config configs/smoke.yaml` against a local head
node on 127.0.0.1 with token authentication (cluster/local.py), stopped through its own process group.

The head is a second Ray cluster beside the session's `ray_local`: its own temp dir and ports, never `ray stop`.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

import pytest

from cluster.local import RAY, start_head
from cluster.runtime_env import job_runtime_env, submit_env
from tests._train_helpers import REPO, data_overrides, smoke_data  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    head = start_head(num_cpus=4)
    try:
        yield head
    finally:
        head.stop()
    assert not head._leftovers()


def test_job_api_requires_a_token(head):
    """An unauthenticated job submission is refused."""
    request = urllib.request.Request(
        f"{head.dashboard_url}/api/jobs/", data=json.dumps({"entrypoint": "echo hi"}).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code in (401, 403)


def test_job_submit_smoke_training(head, smoke_data, tmp_path):  # noqa: F811
    from mlflow.tracking import MlflowClient

    overrides = data_overrides(smoke_data) + [
        f"run.storage_path={tmp_path}/runs",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "train.max_steps=2",  # half an epoch, then the final evaluation: the job path, not the training, is tested
    ]
    command = [
        RAY, "job", "submit", "--address", head.dashboard_url, "--working-dir", ".",
        "--runtime-env-json", json.dumps(job_runtime_env()),
        "--", "python", "pipelines/train.py", "--config", "configs/smoke.yaml",
        *[arg for o in overrides for arg in ("--set", o)],
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=submit_env(), capture_output=True, text=True, timeout=420)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "succeeded" in output
    assert "done in" in output and "registered retinanet-smoke v1" in output
    assert "Uploading package" in output  # the working dir travelled (what it leaves out: cluster/test_runtime_env.py)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("retina-smoke").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert str(client.get_model_version_by_alias("retinanet-smoke", "smoke").version) == "1"  # int from SQLite
