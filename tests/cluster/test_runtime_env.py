"""What a job submitted with ``ray job submit --working-dir .`` uploads (cluster/runtime_env.py): never the
virtualenv, data, runs or MLflow stores; always the packages, the commands and the configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cluster.runtime_env import EXCLUDES, job_runtime_env, submit_env

REPO = Path(__file__).resolve().parents[2]


def test_job_upload_excludes_stores_but_keeps_packages():
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", EXCLUDES)  # how Ray matches runtime_env excludes
    for path in (".venv/bin/python", "data/sample/images/000001.jpg", "runs/demo/x", "mlflow.db", "mlruns/0/a"):
        assert spec.match_file(path), path
    kept = ("retina/data/coco.py", "pipelines/data/datasets.py", "pipelines/data/prepare.py",
            "pipelines/training/loop.py", "pipelines/train.py", "tuning/search.py", "configs/smoke.yaml")  # fmt: skip
    for path in kept:
        assert (REPO / path).exists(), f"{path}: a file this test names does not exist any more"
        assert not spec.match_file(path), path


def test_runtime_env_json_and_submit_environment():
    assert job_runtime_env() == {"excludes": EXCLUDES}
    assert job_runtime_env({"A": "1"})["env_vars"] == {"A": "1"}
    env = submit_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "RAY_AUTH_MODE": "token", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1"}
    proc = subprocess.run([sys.executable, "-m", "cluster.runtime_env"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    assert json.loads(proc.stdout) == job_runtime_env()  # what the documented --runtime-env-json "$(...)" gets
