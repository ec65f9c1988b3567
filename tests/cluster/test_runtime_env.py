"""What ``ray job submit --working-dir .`` uploads, packed by Ray 2.60's own code the way its job client does
(runtime_env.working_dir.upload_working_dir_if_needed: Ray's default excludes, the working dir's .gitignore and
.rayignore in every folder, then packaging.create_package): never the virtualenv, data, runs, MLflow stores or
caches; always the packages, the commands and the configs. The checkout's .rayignore decides alone
(cluster/runtime_env.py only reads it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from zipfile import ZipFile

import pytest

from cluster.runtime_env import excludes, job_runtime_env

REPO = Path(__file__).resolve().parents[2]

KEPT = (
    "retina/data/coco.py",  # a package named like the root /data folder
    "pipelines/data/datasets.py",
    "pipelines/train.py",
    "pipelines/training/loop.py",
    "tuning/search.py",
    "cluster/connect.py",
    "configs/smoke.yaml",
    "pyproject.toml",
    ".rayignore",
    ".gitignore",
)
DROPPED = (
    ".venv/bin/python",
    ".git/HEAD",
    "data/sample/images/000001.jpg",
    "data/smoke/shards/train/manifest.json",
    "runs/demo/checkpoint_000001/model.pt",
    "mlruns/0/meta.yaml",
    "mlartifacts/1/model.pt",
    "mlflow.db",
    "other.db",
    "retina/__pycache__/model.cpython-311.pyc",
    "retina.egg-info/PKG-INFO",
    ".pytest_cache/v/cache/lastfailed",
    ".ruff_cache/0.6/cache",
    "build/lib/retina/model.py",
    "dist/retina-0.1.0.whl",
)


def packed_files(working_dir: Path, out: Path, *, gitignore: bool = True) -> set[str]:
    """The files Ray packs for ``--working-dir working_dir`` (`gitignore`: False is what
    RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 makes of it)."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    def pack(path: str, excludes: list[str], is_file: bool = False) -> None:
        create_package(path, out, include_gitignore=gitignore, excludes=excludes)

    upload_working_dir_if_needed({"working_dir": str(working_dir)}, include_gitignore=gitignore, upload_fn=pack)
    with ZipFile(out) as package:
        return {name for name in package.namelist() if not name.endswith("/")}


@pytest.mark.parametrize("alone", [False, True], ids=["stock", "rayignore-alone"])
def test_upload_keeps_packages_and_drops_stores(alone, tmp_path, monkeypatch):
    """A checkout with every kind of file: the stock upload (Ray's defaults + .gitignore + .rayignore) and the
    .rayignore alone (no defaults, no .gitignore) both take exactly the kept files."""
    checkout = tmp_path / "checkout"
    for name in KEPT + DROPPED:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text(name)
    for name in (".rayignore", ".gitignore"):
        shutil.copy(REPO / name, checkout / name)
    if alone:
        monkeypatch.setenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    assert packed_files(checkout, tmp_path / "pkg.zip", gitignore=not alone) == set(KEPT)


def test_upload_of_this_checkout(tmp_path):
    """The real checkout, packed as the stock ``ray job submit --working-dir .`` packs it: every tracked file of the
    packages, commands and configs travels; nothing under the dropped folders does."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    needed = {p for p in tracked if p.split("/")[0] in ("retina", "pipelines", "tuning", "cluster", "configs")}
    needed = {p for p in needed if (REPO / p).is_file()}  # a tracked file deleted in the working tree stays behind
    assert "retina/data/coco.py" in needed and "pipelines/train.py" in needed
    files = packed_files(REPO, tmp_path / "pkg.zip")
    assert not needed - files, sorted(needed - files)
    dropped_dirs = (".venv", ".git", "data", "runs", "mlruns", "mlartifacts", ".pytest_cache", ".ruff_cache")
    wrong = [f for f in files if f.split("/")[0] in dropped_dirs or "__pycache__" in f or f.endswith(".db")]
    assert not wrong, wrong[:20]
    assert (tmp_path / "pkg.zip").stat().st_size < 20 * 2**20


def test_runtime_env_module_reads_rayignore():
    """One list: cluster.runtime_env serves .rayignore's patterns, also to ``python -m cluster.runtime_env``."""
    patterns = excludes()
    assert "/data" in patterns and "/.venv" in patterns and not any(p.startswith("#") for p in patterns)
    assert job_runtime_env() == {"excludes": patterns}
    proc = subprocess.run([sys.executable, "-m", "cluster.runtime_env"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    assert json.loads(proc.stdout) == job_runtime_env()
