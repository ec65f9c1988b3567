"""ray_cluster.yaml and the KubeRay manifests pass Ray's own validation and say the same thing."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "ray_cluster.yaml"
RAYCLUSTER = ROOT / "cluster" / "kuberay" / "raycluster.yaml"
RAYJOB = ROOT / "cluster" / "kuberay" / "rayjob.yaml"
PLACEHOLDERS = {"<ACCOUNT_ID>", "<BUCKET>", "<MLFLOW_HOST>", "<REGISTRY>"}
# GPUs per node and max nodes of each GPU worker type, as the launcher config declares them
INSTANCE_GPUS = {"g5.12xlarge": 4, "p5.48xlarge": 8}


def _launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def test_launcher_config_passes_ray_validation():
    prepared = prepare_config(copy.deepcopy(_launcher()))
    validate_config(prepared)  # raises jsonschema.ValidationError / ValueError on a bad config
    assert prepared["head_node_type"] == "head"


def test_launcher_config_rejects_a_broken_copy():
    broken = copy.deepcopy(_launcher())
    broken["available_node_types"]["gpu_a10g"]["min_workers"] = 50  # more than max_workers allows
    with pytest.raises(ValueError):
        validate_config(prepare_config(broken))


def test_launcher_config_choices():
    cfg = _launcher()
    ray_version = ray.__version__
    python = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray_version}-py311-gpu" and "3.11" in python
    gpu_types = {k: v for k, v in cfg["available_node_types"].items() if k.startswith("gpu")}
    assert gpu_types, "needs at least one GPU worker type"
    for name, node in gpu_types.items():
        assert node["node_config"]["InstanceType"] in INSTANCE_GPUS, name
        assert 0 <= node["min_workers"] <= node["max_workers"], name
        assert "IamInstanceProfile" in node["node_config"], f"{name}: S3 access must come from an instance profile"
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds, "the dashboard must not listen on a public interface"
    run_options = " ".join(cfg["docker"]["run_options"])
    for var in ("MLFLOW_TRACKING_URI", "RETINA_STORAGE_PATH", "RAY_AUTH_MODE=token"):
        assert var in run_options
    assert any("pip install" in c and "/home/ray/retina" in c for c in cfg["setup_commands"])
    assert {".venv", "data", "mlflow.db"} <= set(cfg["rsync_exclude"])


@pytest.mark.parametrize("path", [LAUNCHER, RAYCLUSTER, RAYJOB])
def test_no_credentials_and_only_known_placeholders(path):
    text = path.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert "aws_secret_access_key" not in text.lower() and "AWS_SECRET_ACCESS_KEY" not in text
    assert set(re.findall(r"<[A-Z_]+>", text)) <= PLACEHOLDERS


def _kuberay_node_types(spec: dict) -> dict:
    cr = {"metadata": {"name": "retina", "namespace": "default"}, "spec": spec}
    config = _derive_autoscaling_config_from_ray_cr(cr)  # Ray's own RayCluster → autoscaler translation
    validate_config(config)
    return config["available_node_types"]


def test_kuberay_raycluster_matches_launcher_config():
    node_types = _kuberay_node_types(yaml.safe_load(RAYCLUSTER.read_text())["spec"])
    launcher = _launcher()["available_node_types"]
    for name, node in launcher.items():
        if name == "head":
            continue
        kube = node_types[name.replace("_", "-")]
        assert kube["max_workers"] == node["max_workers"] and kube["min_workers"] == node["min_workers"], name
        expected_gpus = INSTANCE_GPUS.get(node["node_config"]["InstanceType"], 0)
        assert kube["resources"].get("GPU", 0) == expected_gpus, name


def test_kuberay_rayjob_is_valid_and_runs_training():
    job = yaml.safe_load(RAYJOB.read_text())
    node_types = _kuberay_node_types(job["spec"]["rayClusterSpec"])
    assert node_types["gpu-h100"]["resources"]["GPU"] == 8
    assert job["spec"]["entrypoint"].startswith("python pipelines/train.py --config configs/")
    config_name = job["spec"]["entrypoint"].split("--config ")[1].split()[0]
    assert (ROOT / config_name).exists()
