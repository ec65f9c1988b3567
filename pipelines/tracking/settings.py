"""The config section only MLflow reads (`TrackingConfig`). Composed into `pipelines.config.Config`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from retina.typed_config import require

# MLflow rejects aliases that look like versions ("v3") and the reserved "latest".
_ALIAS = re.compile(r"(?![vV]\d+$)[A-Za-z_][A-Za-z0-9_-]{0,254}")


@dataclass
class TrackingConfig:
    """MLflow. tracking_uri: this value, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd."""

    tracking_uri: str = ""
    experiment: str = "retina"
    registered_model_name: str = "retinanet"
    alias: str = "champion"  # set on the new model version when its final val/AP >= alias_min_ap
    alias_min_ap: float = 0.0
    # Every node of a training run logs its CPU, memory, disk, network (and GPU, with nvidia-ml-py) into the run as
    # system/<host>/<metric> (MLflow's SystemMetricsMonitor, one per node); false: none.
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0  # seconds between samples (each sample is one logged point)

    def check(self) -> None:
        require(bool(self.experiment), "tracking.experiment", "must not be empty")
        require(bool(self.registered_model_name), "tracking.registered_model_name", "must not be empty")
        ok_alias = self.alias == "" or (_ALIAS.fullmatch(self.alias) and self.alias.lower() != "latest")
        require(bool(ok_alias), "tracking.alias", "must be empty or a name like 'champion' (not 'latest', not v<N>)")
        require(0 <= self.alias_min_ap <= 1, "tracking.alias_min_ap", "must be in [0, 1]")
        require(self.system_metrics_interval_s > 0, "tracking.system_metrics_interval_s", "must be > 0 (seconds)")
