"""The runtime_env for jobs submitted to a Ray cluster: which files of the checkout travel with the job.

``ray job submit --working-dir .`` uploads the working directory (at most a few hundred MiB, and every byte
is re-uploaded for every job). The virtualenv, datasets, run folders and MLflow stores must stay behind:

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env-json "$(python -m cluster.runtime_env)" -- python pipelines/train.py --config configs/smoke.yaml

Patterns are gitignore-style and anchored at the checkout root ("/data/"): an unanchored "data/" would also
drop the ``retina/data`` package. Ray additionally applies the checkout's .gitignore unless
RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 (`submit_env` sets it, so this list alone decides).
Secrets never go in here: the dashboard shows every job's runtime_env.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

EXCLUDES: list[str] = [
    "/.venv/",
    "/.git/",
    "/data/",  # datasets and prepared shards (the sample data is regenerated on first use)
    "/runs/",  # checkpoints
    "/mlruns/",
    "/mlartifacts/",
    "/mlflow.db",
    "*.db",
    "__pycache__/",
    "*.egg-info/",
    "/.pytest_cache/",
    "/.ruff_cache/",
    "/build/",
    "/dist/",
]


def job_runtime_env(env_vars: Mapping[str, str] | None = None) -> dict:
    """runtime_env for ``--runtime-env-json`` (working_dir itself comes from ``--working-dir``)."""
    env = {"excludes": list(EXCLUDES)}
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def submit_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the ``ray job submit`` client: token auth on, and only EXCLUDES decide the upload."""
    env = dict(os.environ if base is None else base)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_RUNTIME_ENV_IGNORE_GITIGNORE"] = "1"
    return env


if __name__ == "__main__":
    json.dump(job_runtime_env(), sys.stdout)
    sys.stdout.write("\n")
