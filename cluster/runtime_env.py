"""What a job submitted with ``ray job submit --working-dir .`` uploads: the checkout's ``.rayignore`` decides.

Ray 2.60 reads ``.rayignore`` (gitignore syntax) when it packs a working dir, so the stock command needs no
flags (token auth aside, see docs/cluster.md):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
        -- python pipelines/train.py --config configs/smoke.yaml

``.rayignore`` is the one list. This module only reads it, for callers that pass a runtime_env themselves:
``python -m cluster.runtime_env`` prints ``{"excludes": [...]}`` with the same patterns, which keeps the older
``--runtime-env-json "$(python -m cluster.runtime_env)"`` form working (Ray joins the two lists; nothing changes).
Secrets never go in a runtime_env: the dashboard shows every job's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RAYIGNORE = Path(__file__).resolve().parents[1] / ".rayignore"


def excludes() -> list[str]:
    """The patterns of the checkout's .rayignore (comments and blank lines dropped)."""
    lines = (line.strip() for line in RAYIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def job_runtime_env() -> dict:
    """A runtime_env with .rayignore's excludes (working_dir itself comes from ``--working-dir``)."""
    return {"excludes": excludes()}


if __name__ == "__main__":
    json.dump(job_runtime_env(), sys.stdout)
    sys.stdout.write("\n")
