"""What the processes on the way to a run's first step import. On a small machine every Ray process of a run starts
at once (Train's controller and workers, Ray Data's coordinators and decode tasks), so a heavy import in one of them
delays the first step: these tests keep the light modules light."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _imported(module: str, heavy: tuple[str, ...]) -> list[str]:
    """The `heavy` modules that importing `module` in a fresh interpreter pulls in."""
    code = f"import sys, {module}; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return [m for m in out.stdout.strip().split(",") if m]


@pytest.mark.parametrize(
    ("module", "heavy"),
    [
        # every process that unpickles a Dataset plan (split coordinators, Train's dataset manager, read tasks)
        ("pipelines.data.datasets", ("torch", "torchvision", "mlflow", "matplotlib")),
        # the run config travels to Train's controller and every worker
        ("pipelines.config", ("torch", "torchvision", "mlflow", "matplotlib")),
        # the training worker: the model needs torch and torchvision; MLflow (rank 0's logger) and matplotlib (the
        # last evaluation's pictures) load when used
        ("pipelines.training.loop", ("mlflow", "matplotlib")),
    ],
)
def test_light_modules_stay_light(module: str, heavy: tuple[str, ...]) -> None:
    assert _imported(module, heavy) == []


def test_lazy_package_names_still_resolve() -> None:
    import retina

    assert retina.build_retinanet.__module__ == "retina.model"
    assert all(callable(getattr(retina, name)) for name in retina.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = retina.nope
