"""Rank-0 logging from inside a Ray Train worker into the run the driver opened."""

from __future__ import annotations

import concurrent.futures
import math
import time
from collections.abc import Mapping
from typing import Any


class RunLogger:
    """Logs into an existing run from a Ray worker; a no-op unless `enabled` (rank 0).

    MLflow is imported and the client made in a background thread, and only by an enabled logger: ~1.6 s of CPU
    (import ~1.1 s, client and first query ~0.6 s) that made rank 0 the last to reach the first step. The worker
    builds its model and waits for its first batch meanwhile; the first call that logs waits for the client."""

    def __init__(self, tracking_uri: str, run_id: str, enabled: bool):
        self.run_id = run_id
        self.enabled = enabled and bool(run_id)
        self._made: concurrent.futures.Future | None = None
        self._made_client: Any = None
        if self.enabled:
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mlflow-client")
            self._made = pool.submit(_make_client, tracking_uri, run_id)
            pool.shutdown(wait=False)
        self._last_step: dict[str, int] = {}

    @property
    def _client(self) -> Any:
        if self._made is not None:
            self._made_client, self._made = self._made.result(), None  # re-raises what making it raised
        return self._made_client

    def _high_water(self, key: str) -> int:
        if key not in self._last_step:
            history = self._client.get_metric_history(self.run_id, key)
            self._last_step[key] = max((m.step for m in history), default=-1)
        return self._last_step[key]

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Finite metrics only (NaN/inf are dropped, not sent); a (key, step) already logged is skipped."""
        if not self.enabled:
            return
        fresh = {}
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value) and step > self._high_water(key):
                fresh[key] = value
                self._last_step[key] = int(step)
        self._send(fresh, step)

    def log_events(self, metrics: Mapping[str, float], step: int) -> None:
        """Values that describe an attempt rather than a point of a curve (the world size each (re)start trains
        with): logged even at a step the run already holds, so a run's history shows every restart and resize."""
        if self.enabled:
            self._send({k: v for k, v in metrics.items() if math.isfinite(v)}, step)

    def _send(self, values: Mapping[str, float], step: int) -> None:
        """One batched MLflow call (chunked) for `values` at `step`, stamped now."""
        from mlflow.entities import Metric

        from pipelines.tracking.store import log_metric_batch

        now = int(time.time() * 1000)
        log_metric_batch(self._client, self.run_id, [Metric(k, float(v), now, int(step)) for k, v in values.items()])

    def log_dict(self, data: Any, artifact_file: str) -> None:
        if self.enabled:
            self._client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        if self.enabled:
            self._client.log_figure(self.run_id, figure, artifact_file)

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            self._client.set_tag(self.run_id, key, value)


def _make_client(tracking_uri: str, run_id: str) -> Any:
    """An MLflow client of `tracking_uri`, its store connected (the run is read once)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    client.get_run(run_id)
    return client
