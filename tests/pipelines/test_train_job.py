"""The stock `ray job submit --address URL --working-dir . -- python pipelines/train.py --config configs/smoke.yaml`
(no --runtime-env-json: the checkout's .rayignore decides the upload) against a local head node on 127.0.0.1 with
token authentication (cluster/local.py), stopped through its own process group.

The head is a second Ray cluster beside the session's `ray_local`: its own temp dir and ports, never `ray stop`.
The client's one setting is RAY_AUTH_MODE=token: without it Ray 2.60's job client sends no token, even with
~/.ray/auth_token present (test_job_client_needs_token_mode).
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request

import pytest

from cluster.local import RAY, start_head
from tests._train_helpers import REPO, data_overrides, smoke_data  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    head = start_head(num_cpus=4)
    try:
        yield head
    finally:
        head.stop()
    assert not head.processes()


def client_env(**extra: str) -> dict[str, str]:
    """This shell's environment as a user's would be, without the settings the stock command must do without."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE")}
    return env | extra


def test_job_api_requires_a_token(head):
    """An unauthenticated job submission is refused."""
    request = urllib.request.Request(
        f"{head.dashboard_url}/api/jobs/", data=json.dumps({"entrypoint": "echo hi"}).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code in (401, 403)


def test_job_client_needs_token_mode(head):
    """With ~/.ray/auth_token present but RAY_AUTH_MODE unset, the job client sends no token and is refused."""
    command = [RAY, "job", "list", "--address", head.dashboard_url]
    refused = subprocess.run(command, env=client_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "Authentication required" in refused.stdout + refused.stderr
    accepted = subprocess.run(command, env=client_env(RAY_AUTH_MODE="token"), capture_output=True, text=True,
                              timeout=120)  # fmt: skip
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr


def test_job_submit_smoke_training(head, smoke_data, tmp_path):  # noqa: F811
    from mlflow.tracking import MlflowClient

    overrides = data_overrides(smoke_data) + [
        f"run.storage_path={tmp_path}/runs",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "train.max_steps=2",  # half an epoch, then the final evaluation: the job path, not the training, is tested
    ]
    command = [
        RAY, "job", "submit", "--address", head.dashboard_url, "--working-dir", ".",
        "--", "python", "pipelines/train.py", "--config", "configs/smoke.yaml",
        *[arg for o in overrides for arg in ("--set", o)],
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=client_env(RAY_AUTH_MODE="token"), capture_output=True, text=True,
                          timeout=420)  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "succeeded" in output
    assert "done in" in output and "registered retinanet-smoke v1" in output
    assert "Uploading package" in output  # the working dir travelled (what it leaves out: cluster/test_runtime_env.py)
    assert "/.rayignore" in output  # Ray read the exclude list ("Ignoring upload to cluster for these files: ...")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("retina-smoke").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert str(client.get_model_version_by_alias("retinanet-smoke", "smoke").version) == "1"  # int from SQLite
